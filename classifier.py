"""Classify texts with a transferred model (classifier.pt from transfer.py): probability of positive."""

from __future__ import annotations

import argparse
import sys

from sentiment_discovery.cli import add_inference_precision_flags, int_at_least, run_script


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__,
        epilog="Every long flag may be spelled with dashes or underscores (--save-probs, --save_probs) and "
        "with one leading dash (-save_probs).",
    )
    p.add_argument(
        "--load_model",
        default=None,
        help="transferred checkpoint (default: lang_model_transfer/classifier.pt if present, else the "
        "shipped model; 'default' names the shipped one)",
    )
    p.add_argument("--data", default="data/binary_sst/test.csv", help="csv/json of texts (labels optional)")
    p.add_argument(
        "--text", nargs="+", action="extend", default=None, help="classify these texts instead of --data"
    )
    p.add_argument("--text_key", default="sentence")
    p.add_argument("--label_key", default="label")
    p.add_argument("--delim", default=",")
    p.add_argument("--loose_json", action="store_true")
    p.add_argument("--binarize_labels", action="store_true")
    p.add_argument("--all_layers", action="store_true", help="check that the classifier uses every layer")
    p.add_argument(
        "--neurons",
        type=int_at_least(1, -1),
        default=-1,
        help="keep only the N largest-|weight| weights (-1: all)",
    )
    p.add_argument("--batch_size", type=int_at_least(1), default=128)
    add_inference_precision_flags(p)
    p.add_argument(
        "--save_probs",
        default="clf_results.npy",
        help="predicted P(positive) (.npy); a bare file name goes beside --load_model",
    )
    p.add_argument(
        "--write_results",
        default="",
        help="per text: true label (when the file has one), predicted label, P(positive) with all weights "
        "and with the top N neurons (--neurons, else those transfer.py kept), each top neuron's value "
        "(csv, or json for .json/.jsonl)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    from sentiment_discovery.transfer import run_classifier

    return run_script(build_parser(), run_classifier, argv)


if __name__ == "__main__":
    sys.exit(main())
