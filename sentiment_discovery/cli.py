"""Small helpers shared by the top-level scripts."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


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
