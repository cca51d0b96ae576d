"""Transfer a pre-trained language model to sentiment classification (L1 logistic regression on its
features) and find the sentiment neuron(s). Writes ``<model>_transfer/`` with results and classifier.pt."""

from __future__ import annotations

import argparse
import sys

from sentiment_discovery import cli
from sentiment_discovery.readout import POOLINGS, STATES


def build_parser() -> argparse.ArgumentParser:
    p = cli.script_parser(__doc__, "save_results")
    cli.add_load_model_flag(
        p, "language-model checkpoint", "lang_model.pt if present, else the shipped model"
    )
    cli.add_architecture_flags(p.add_argument_group("architecture (the checkpoint's; given, checked)"))
    data = p.add_argument_group("data")
    data.add_argument("--data", default="data/binary_sst/train.csv", help="labelled training texts")
    data.add_argument(
        "--valid",
        default="data/binary_sst/val.csv",
        help="labelled validation texts (choose C); 'none' or '': a part of --split, else C by 3-fold "
        "cross-validation on --data",
    )
    data.add_argument(
        "--test",
        default="data/binary_sst/test.csv",
        help="test texts ('none' or '': a part of --split, else none)",
    )
    data.add_argument(
        "--split",
        default="1.",
        help="train/val/test proportions of --data's records (shuffled with --seed), as the original: a part "
        "is carved only for a split whose file is 'none' (e.g. --valid none --split 0.9,0.1); default 1.: "
        "all of --data trains",
    )
    cli.add_read_flags(data)
    cli.add_eval_key_flags(data)
    data.add_argument("--no_test_eval", action="store_true", help="the test set has no labels")
    feat = p.add_argument_group("features")
    cli.add_feature_flags(
        feat,
        POOLINGS,
        STATES,
        "the loaded model's classifier's, else last",
        "the loaded model's classifier's, else cell",
    )
    feat.add_argument("--batch_size", type=cli.int_at_least(1), default=128)
    cli.add_inference_precision_flags(feat)
    feat.add_argument(
        "--use_cached", action="store_true", help="reuse saved features if model/data/settings match"
    )
    feat.add_argument(
        "--preprocess",
        action="store_true",
        help="force preprocessing and featurizing the texts again, saved features or not (the original's "
        "'force preprocessing of datasets'; the opposite of --use_cached)",
    )
    reg = p.add_argument_group("regression")
    reg.add_argument(
        "--epochs", type=cli.int_at_least(1), default=100, help="max iterations of the logistic regression"
    )
    reg.add_argument("--seed", type=int, default=42)
    reg.add_argument(
        "--log2_C",
        type=int,
        nargs=2,
        default=[-8, 0],
        metavar=("MIN", "MAX"),
        help="sweep C = 2^MIN ... 2^MAX, best on validation",
    )
    reg.add_argument(
        "--neurons", type=cli.int_at_least(1), default=1, help="top features kept for the second regression"
    )
    reg.add_argument("--drop_neurons", action="store_true", help="also fit without the top neurons")
    out = p.add_argument_group("output")
    out.add_argument(
        "--save_results",
        default="",
        help="results folder (default <model>_transfer/): classifier.pt, results.json and the original's "
        "files: trXt/vaXt/teXt.npy features, trY/vaY/teY.npy labels, all_neurons_score.txt and "
        "neurons_score.txt ([train, val, test] accuracy %%), all_neurons_probs_<split>.npy and "
        "neurons_probs_<split>.npy, neurons.npy and neuron_bias.npy (the regression), weight_vis.png, "
        "logit_vis/<rank>_<feature>.png histograms, extreme_samples.json",
    )
    cli.add_write_results_flag(
        out,
        "test texts with true label, predicted label, P(positive) with all features and with the top "
        "--neurons, and each top neuron's value",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    from sentiment_discovery.transfer import run_transfer

    return cli.run_script(build_parser(), run_transfer, argv)


if __name__ == "__main__":
    sys.exit(main())
