"""Classify texts with a transferred or fine-tuned model (transfer.py's classifier.pt, the checkpoint of
finetune_classifier.py): probability of positive (of each class, for a classifier of more than two)."""

from __future__ import annotations

import argparse
import sys

from sentiment_discovery import cli


def build_parser() -> argparse.ArgumentParser:
    p = cli.script_parser(__doc__, "save_probs")
    cli.add_load_model_flag(
        p,
        "checkpoint with a classifier",
        "lang_model_transfer/classifier.pt if present, else 'finetuned'",
    )
    p.add_argument("--data", default="data/binary_sst/test.csv", help="csv/json of texts (labels optional)")
    p.add_argument(
        "--text", nargs="+", action="extend", default=None, help="classify these texts instead of --data"
    )
    cli.add_read_flags(p)
    arch = p.add_argument_group("architecture (the checkpoint's; given, checked)")
    cli.add_architecture_flags(arch)
    arch.add_argument("--all_layers", action="store_true", help="check that the classifier uses every layer")
    p.add_argument(
        "--neurons",
        type=cli.int_at_least(1, -1),
        default=-1,
        help="keep only the N largest-|weight| weights (-1: all)",
    )
    p.add_argument("--batch_size", type=cli.int_at_least(1), default=128)
    cli.add_inference_precision_flags(p)
    p.add_argument(
        "--save_probs",
        default="clf_results.npy",
        help="predicted P(positive) (.npy); a bare file name goes beside --load_model",
    )
    cli.add_write_results_flag(
        p,
        "per text: true label (when the file has one), predicted label, P(positive) with all weights and "
        "with the top N neurons (--neurons, else those transfer.py kept), each top neuron's value",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    from sentiment_discovery.transfer import run_classifier

    return cli.run_script(build_parser(), run_classifier, argv)


if __name__ == "__main__":
    sys.exit(main())
