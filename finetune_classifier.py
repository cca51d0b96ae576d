"""Fine-tune a language model and a sentiment classifier head together on labelled texts (ULMFiT-style).

Writes --save (default finetuned.pt): the fine-tuned model with its classifier, which classifier.py,
generate.py and Encoder.predict_proba load like transfer.py's classifier.pt; beside it <stem>.best.pt (best
on validation so far), <stem>.results.json (per-epoch curves, final accuracies) and <stem>.curves.png.
"""

from __future__ import annotations

import argparse
import sys

from sentiment_discovery.cli import (
    add_feature_flags,
    add_inference_precision_flags,
    add_read_flags,
    finite_float,
    int_at_least,
    run_script,
    script_parser,
)
from sentiment_discovery.finetune import INIT_HEADS, FinetuneOptions
from sentiment_discovery.readout import POOLINGS, STATES

DEFAULTS = FinetuneOptions()


def build_parser() -> argparse.ArgumentParser:
    p = script_parser(
        __doc__,
        "head_lr",
        "--load of a checkpoint this script wrote during a run (it holds train_state) resumes that run "
        "exactly, with the options it was started with.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--load_model",
        "--load",
        dest="load_model",
        default="default",
        help="language model to fine-tune, or a run to resume (default: the shipped model; 'openai' for "
        "OpenAI's converted weights; any main.py, transfer.py or NVIDIA checkpoint)",
    )
    data = p.add_argument_group("data (as transfer.py)")
    data.add_argument("--data", default="data/binary_sst/train.csv", help="labelled training texts")
    data.add_argument(
        "--valid", default="data/binary_sst/val.csv", help="validation texts ('' or none: none)"
    )
    data.add_argument("--test", default="data/binary_sst/test.csv", help="test texts ('' or none: none)")
    add_read_flags(data)  # --label_key: 0/1, or class numbers for more classes (without --binarize_labels)
    data.add_argument(
        "--max_bytes",
        type=int_at_least(0),
        default=DEFAULTS.max_bytes,
        help="cut longer texts to their first and last N/2 bytes (after preprocessing); 0: no cut",
    )
    feat = p.add_argument_group("features and head")
    add_feature_flags(
        feat,
        POOLINGS,
        STATES,
        f"{DEFAULTS.pooling} (with --init_head checkpoint the stored classifier's)",
        f"{DEFAULTS.state} (with --init_head checkpoint the stored classifier's)",
    )
    feat.add_argument(
        "--init_head",
        choices=INIT_HEADS,
        default=DEFAULTS.init_head,
        help="random (nn.Linear's init) or zero weights; transfer: an L1 logistic regression fit on the "
        "initial features (C chosen on --valid); checkpoint: the loaded checkpoint's classifier",
    )
    feat.add_argument(
        "--dropout",
        type=finite_float(0, below=1),
        default=DEFAULTS.dropout,
        help="dropout on the standardised features",
    )
    feat.add_argument(
        "--neurons",
        type=int_at_least(1),
        default=DEFAULTS.neurons,
        help="strongest head features recorded in the checkpoint (generate.py's heatmap shows the first)",
    )
    t = p.add_argument_group("training")
    t.add_argument(
        "--lr", type=finite_float(0), default=DEFAULTS.lr, help="peak rate of the top layer (and decoder)"
    )
    t.add_argument("--head_lr", type=finite_float(0), default=DEFAULTS.head_lr, help="peak rate of the head")
    t.add_argument(
        "--lr_decay_per_layer",
        type=finite_float(above=0),
        default=DEFAULTS.lr_decay_per_layer,
        help="discriminative rates: each layer group below the top gets this factor more (ULMFiT: 1/2.6 = "
        "0.385); the embedding is the lowest group",
    )
    t.add_argument(
        "--warmup",
        type=finite_float(0, below=1),
        default=DEFAULTS.warmup,
        help="fraction of the steps with the rates rising linearly from 0; then linear decay to 0",
    )
    t.add_argument(
        "--unfreeze",
        type=int_at_least(0),
        default=DEFAULTS.unfreeze,
        help="gradual unfreezing: the head alone for N steps (--unfreeze_unit), then the top layer group "
        "too, then one more group every N, the embedding last; 0: everything trains from the start",
    )
    t.add_argument("--unfreeze_unit", choices=("steps", "epochs"), default=DEFAULTS.unfreeze_unit)
    t.add_argument(
        "--aux_lm_weight",
        type=finite_float(0),
        default=DEFAULTS.aux_lm_weight,
        help="add this times the language-model loss on the same texts (0: off)",
    )
    t.add_argument(
        "--weight_decay", type=finite_float(0), default=DEFAULTS.weight_decay, help="AdamW, matrices only"
    )
    t.add_argument(
        "--clip", type=finite_float(0), default=DEFAULTS.clip, help="gradient-norm clipping (0: off)"
    )
    t.add_argument("--epochs", type=int_at_least(1), default=DEFAULTS.epochs)
    t.add_argument(
        "--train_iters", type=int_at_least(0), default=0, help="stop after N steps (0: all epochs)"
    )
    t.add_argument("--batch_size", type=int_at_least(1), default=DEFAULTS.batch_size)
    t.add_argument("--eval_batch_size", type=int_at_least(1), default=DEFAULTS.eval_batch_size)
    t.add_argument(
        "--patience",
        type=int_at_least(0),
        default=DEFAULTS.patience,
        help="stop after N validations without a better accuracy (0: never); the best model is kept anyway",
    )
    t.add_argument(
        "--eval_interval",
        type=int_at_least(0),
        default=DEFAULTS.eval_interval,
        help="steps between validations besides epoch ends (0: epoch ends only)",
    )
    t.add_argument("--seed", type=int, default=DEFAULTS.seed, help="-1 picks a seed and prints it")
    add_inference_precision_flags(t)
    t.add_argument("--cpu", action="store_true", help="run on CPU even when a GPU is available")
    out = p.add_argument_group("output")
    out.add_argument("--save", default=DEFAULTS.save, help="checkpoint path (resumable during the run)")
    out.add_argument(
        "--save_interval",
        type=int_at_least(0),
        default=DEFAULTS.save_interval,
        help="steps between resumable checkpoints besides epoch ends (0: epoch ends only)",
    )
    out.add_argument(
        "--save_dtype",
        choices=("fp32", "fp16", "bf16"),
        default=DEFAULTS.save_dtype,
        help="dtype of the final checkpoint's model weights (fp16: half the bytes)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    from sentiment_discovery.finetune import run_finetune

    return run_script(build_parser(), run_finetune, argv)


if __name__ == "__main__":
    sys.exit(main())
