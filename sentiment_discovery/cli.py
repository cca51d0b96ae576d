"""Small helpers shared by the top-level scripts."""

from __future__ import annotations

import argparse
import math
import secrets
import sys
from collections.abc import Callable, Sequence

from .errors import INPUT_ERRORS


class Interrupted(Exception):
    """Training stopped on a signal after writing a resumable checkpoint; exit with ``exit_code``."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def flag_key(flag: str) -> str:
    """What two spellings of one long flag share: no leading dashes, ``-`` read as ``_``."""
    return flag.lstrip("-").replace("-", "_")


def normalize_argv(argv: Sequence[str], parser: argparse.ArgumentParser) -> list[str]:
    """Accept every spelling of a long flag that differs only in dashes: the original README's one-dash
    ``-loose_json``, the NVIDIA repository's later ``--loose-json``, and ``--log_interval`` for
    ``--log-interval``.

    An argument (or the part before ``=`` of ``-flag=value``) that is not itself an option of
    ``parser`` becomes the long option with the same ``flag_key``; anything else (short flags,
    negative numbers, values, abbreviations) is left as it is.
    """
    options = {opt for action in parser._actions for opt in action.option_strings}
    long_flags = {flag_key(opt): opt for opt in options if opt.startswith("--")}
    out = []
    for arg in argv:
        name, sep, value = arg.partition("=")
        if arg.startswith("-") and len(name) > 2 and name not in options and flag_key(name) in long_flags:
            arg = long_flags[flag_key(name)] + sep + value
        out.append(arg)
    return out


def run_script(
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], object],
    argv: Sequence[str] | None = None,
) -> int:
    """Parse ``argv`` (``normalize_argv`` spellings), call ``run(args)``; bad input -> ``error: ...``, 2.

    The project's own input errors (``errors.INPUT_ERRORS``: a data file, a checkpoint, a value) and an
    ``OSError`` about a named path (a file that cannot be read or written) are reported in one line;
    anything else is a bug and keeps its traceback.
    """
    # a bad flag is one line too, not the usage block (--help shows that)
    parser.error = lambda message: parser.exit(2, f"error: {message} (see --help)\n")
    args = parser.parse_args(normalize_argv(sys.argv[1:] if argv is None else argv, parser))
    try:
        run(args)
    except (*INPUT_ERRORS, OSError) as e:
        if not isinstance(e, INPUT_ERRORS) and e.filename is None:  # an OSError not about a given path: a bug
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:  # training stopped on a signal, after saving a checkpoint
        print(f"interrupted: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # Ctrl-C outside the training loop: nothing to save
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def script_parser(description: str, example: str, epilog: str = "", **kwargs) -> argparse.ArgumentParser:
    """A script's parser, its epilog saying how long flags may be spelled (``example``: one of its flags,
    in underscores), after the script's own ``epilog``."""
    spellings = (
        f"Every long flag may be spelled with dashes or underscores (--{example.replace('_', '-')}, "
        f"--{example}) and with one leading dash (-{example})."
    )
    return argparse.ArgumentParser(description=description, epilog=f"{spellings} {epilog}".strip(), **kwargs)


def add_load_model_flag(group, holds: str, default: str) -> None:
    """``--load_model`` of the inference scripts: the checkpoint that ``holds`` what the script needs."""
    group.add_argument(
        "--load_model",
        default=None,
        help=f"{holds} (default: {default}; 'default' names the shipped language model with its "
        "transferred classifier, 'finetuned' the shipped fine-tuned one)",
    )


def add_architecture_flags(group, *, generation: bool = False) -> None:
    """main.py's model-shape flags, which the original's inference scripts took to build the model before
    loading it: here the checkpoint records its architecture, so a given one is checked against it
    (``ModelConfig.check_given``). ``generation``: generate.py's ``--dropout`` and ``--tied`` too."""
    given = "given, checked against the checkpoint, which decides the architecture"
    group.add_argument("--model", default=None, help=f"recurrent type ({given})")
    group.add_argument("--emsize", type=int_at_least(1), default=None, help=f"byte embedding size ({given})")
    group.add_argument("--nhid", type=int_at_least(1), default=None, help=f"units per layer ({given})")
    group.add_argument("--nlayers", type=int_at_least(1), default=None, help=f"layers ({given})")
    if generation:
        group.add_argument(
            "--tied", action="store_true", default=None, help=f"tied embedding and decoder ({given})"
        )
        group.add_argument(
            "--dropout",
            type=finite_float(0, below=1),
            default=None,
            help="accepted for the original's commands; no effect: generation runs without dropout",
        )


def add_read_flags(group) -> None:
    """How a labelled csv/json file is read (readers.ReadOptions): transfer.py and classifier.py."""
    group.add_argument("--text_key", default="sentence", help="csv column / json key of the text")
    group.add_argument(
        "--label_key",
        default="label",
        help="csv column / json key of the label: 0/1, or (transfer.py) any class values, numbers or names",
    )
    group.add_argument("--delim", default=",", help="csv delimiter")
    group.add_argument("--loose_json", action="store_true", help="one json object per line")
    group.add_argument(
        "--binarize_labels",
        action="store_true",
        help="two classes from numeric labels (ratings): each file's labels rescaled to [0, 1] by its"
        " min and max, > 0.5 positive (the later NVIDIA suite's binarize_labels)",
    )


def add_eval_key_flags(group, label_use: str = "") -> None:
    """``--eval_text_key``/``--eval_label_key``: the keys of the --valid/--test files where they differ
    from --text_key/--label_key (main.py, transfer.py); ``label_use`` completes the label's help."""
    group.add_argument(
        "--eval_text_key", default=None, help="text key of --valid/--test (default: --text_key)"
    )
    group.add_argument(
        "--eval_label_key",
        default=None,
        help=f"label key of --valid/--test (default: --label_key){label_use}",
    )


def add_feature_flags(
    group, poolings: Sequence[str], states: Sequence[str], pooling_default: str, state_default: str
) -> None:
    """--pooling, --state, --all_layers: which features the readout reads (readout.FeatureSpec; its
    POOLINGS and STATES are passed in, so that this module stays below the model)."""
    group.add_argument(
        "--pooling",
        default=None,
        help=f"{'|'.join(poolings)}: the state after the last byte, or that pooling over all bytes; a comma "
        f"list (mean,max,last) concatenates them. Default: {pooling_default}",
    )
    group.add_argument(
        "--state",
        choices=states,
        default=None,
        help=f"cell state c or hidden state h. Default: {state_default}",
    )
    group.add_argument("--all_layers", action="store_true", help="features from every layer")


def add_write_results_flag(group, rows: str) -> None:
    """``--write_results``: one row per text with ``rows``, as csv (json for .json/.jsonl)."""
    group.add_argument("--write_results", default="", help=f"{rows} (csv, or json for .json/.jsonl)")


def add_inference_precision_flags(group) -> None:
    """``--fp16``/``--bf16`` of the inference scripts (transfer.py, classifier.py, generate.py)."""
    group.add_argument(
        "--fp16", action="store_true", help="float16 matrix products on a GPU; on a CPU the same as --bf16"
    )
    group.add_argument(
        "--bf16", action="store_true", help="bfloat16 matrix products (state math stays float32)"
    )


def pick_seed(seed: int) -> int:
    """``-1`` (any negative) picks a random seed; the caller prints it so the run can be repeated."""
    return secrets.randbelow(2**31 - 1) if seed < 0 else seed


def int_at_least(low: int, *also: int) -> Callable[[str], int]:
    """argparse ``type``: an integer >= ``low`` (or one of the special values ``also``, e.g. -1)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low and value not in also:
            special = "".join(f" or {v}" for v in also)
            raise argparse.ArgumentTypeError(f"{value} must be at least {low}{special}")
        return value

    return parse


def finite_float(
    low: float | None = None, *, above: float | None = None, below: float | None = None
) -> Callable[[str], float]:
    """argparse ``type``: a finite float, >= ``low``, > ``above``, < ``below`` where given."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} must be a finite number")
        if low is not None and value < low:
            raise argparse.ArgumentTypeError(f"{text} must be at least {low:g}")
        if above is not None and value <= above:
            raise argparse.ArgumentTypeError(f"{text} must be greater than {above:g}")
        if below is not None and value >= below:
            raise argparse.ArgumentTypeError(f"{text} must be less than {below:g}")
        return value

    return parse
