"""Small helpers shared by the top-level scripts."""

from __future__ import annotations

import argparse
import secrets
import sys
from collections.abc import Callable, Sequence


def normalize_argv(argv: Sequence[str], parser: argparse.ArgumentParser) -> list[str]:
    """Accept the original README's one-dash spellings of long flags (``-loose_json``, ``-text``).

    ``-flag`` (or ``-flag=value``) becomes ``--flag`` when ``--flag`` is a long option of
    ``parser``; everything else (short flags, negative numbers, values) is left as it is.
    """
    long_flags = {opt for action in parser._actions for opt in action.option_strings if opt.startswith("--")}
    out = []
    for arg in argv:
        if arg.startswith("-") and not arg.startswith("--") and len(arg) > 2:
            name, sep, value = arg.partition("=")
            if "-" + name in long_flags:
                arg = "-" + name + sep + value
        out.append(arg)
    return out


def run_script(
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], object],
    argv: Sequence[str] | None = None,
) -> int:
    """Parse ``argv`` (one-dash long flags accepted), call ``run(args)``; bad input -> ``error: ...``, 2.

    Bad input (a data file, a checkpoint, a value, a path that cannot be read or written) is reported
    in one line, never as a traceback.
    """
    from .checkpoint import CheckpointError
    from .data import DataError

    args = parser.parse_args(normalize_argv(sys.argv[1:] if argv is None else argv, parser))
    try:
        run(args)
    except (DataError, CheckpointError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def pick_seed(seed: int) -> int:
    """``-1`` (any negative) picks a random seed; the caller prints it so the run can be repeated."""
    return secrets.randbelow(2**31 - 1) if seed < 0 else seed
