"""Pre-train a byte-level recurrent language model (``python main.py --help``)."""

from __future__ import annotations

import argparse
import sys

from sentiment_discovery import cli
from sentiment_discovery.cli import finite_float, int_at_least
from sentiment_discovery.model import RNN_TYPES
from sentiment_discovery.preprocess import PREPROCESSORS


def build_parser() -> argparse.ArgumentParser:
    p = cli.script_parser(
        __doc__,
        "text_key",
        "--load of a checkpoint written during training (it holds train_state) resumes that run exactly; "
        "a finished run's checkpoint starts a new run from its weights. --eval_only reports the val/test "
        "BPC of --load.",
    )
    m = p.add_argument_group("model")
    m.add_argument("--model", default="mLSTM", choices=RNN_TYPES)
    m.add_argument("--emsize", type=int_at_least(1), default=64, help="byte embedding size")
    m.add_argument("--nhid", type=int_at_least(1), default=4096, help="hidden units per layer")
    m.add_argument("--nlayers", type=int_at_least(1), default=1)
    m.add_argument("--dropout", type=finite_float(0, below=1), default=0.0)
    m.add_argument("--tied", action="store_true", help="tie embedding and decoder (needs nhid == emsize)")
    m.add_argument("--no_weight_norm", action="store_true", help="weight norm is on by default")
    m.add_argument(
        "--preprocess_variant",
        default="nvidia",
        choices=sorted(PREPROCESSORS),
        help="text preprocessing (recorded in the checkpoint; openai is what OpenAI's weights need)",
    )

    t = p.add_argument_group("training")
    t.add_argument(
        "--lr", type=finite_float(above=0), default=5e-4, help="initial learning rate, decayed linearly to 0"
    )
    t.add_argument("--optim", default="Adam", help="any torch.optim class name")
    t.add_argument("--clip", type=finite_float(0), default=0.0, help="gradient-norm clipping (0 = off)")
    t.add_argument("--epochs", type=int_at_least(1), default=1)
    t.add_argument(
        "--train_iters",
        type=int_at_least(0),
        default=0,
        help="stop after this many updates (0: epochs x batches)",
    )
    t.add_argument("--seed", type=int, default=-1, help="-1 picks a seed and prints it")
    t.add_argument(
        "--log-interval",
        type=int_at_least(1),
        default=100,
        help="batches between log lines (a progress bar as well when stderr is a terminal)",
    )
    t.add_argument(
        "--save",
        default="lang_model.pt",
        help="checkpoint path; <stem>.best.pt, <stem>.metrics.jsonl and <stem>.bpc.png go beside it",
    )
    t.add_argument(
        "--save_iters", type=int_at_least(0), default=2000, help="batches between checkpoints and validations"
    )
    t.add_argument(
        "--keep_checkpoints",
        type=int_at_least(0),
        default=0,
        help="also keep the last K checkpoints as a series <stem>.step<N>.pt beside --save (0: none)",
    )
    t.add_argument(
        "--load", "--load_model", dest="load", default="", help="checkpoint to start from or resume"
    )
    t.add_argument("--eval_only", action="store_true", help="report val/test BPC of --load, no training")
    t.add_argument(
        "--fp16",
        action="store_true",
        help="mixed precision: float16 matrix products with loss scaling on a GPU; on a CPU, --bf16",
    )
    t.add_argument(
        "--bf16",
        action="store_true",
        help="bfloat16 operands for every matrix product (parameters, optimizer, gates, cell state and loss "
        "stay float32; no loss scaling). Fast on GPUs since Ampere and CPUs with AVX-512-BF16/AMX; "
        "other CPUs get the same numbers, somewhat slower than float32 (operands and results rounded to "
        "bfloat16, multiplied in float32)",
    )
    t.add_argument(
        "--save_dtype",
        choices=("fp32", "fp16", "bf16"),
        default="fp32",
        help="dtype of the model weights in the checkpoints written: fp16/bf16 store the weights in half "
        "the bytes, so <stem>.best.pt (weights alone) halves; the resumable --save also holds the "
        "optimizer state, which stays float32 (Adam: two values per weight), so it shrinks by about a "
        "sixth. Loading makes the weights float32; resuming from one continues from the rounded weights",
    )
    t.add_argument(
        "--loss_scale", type=finite_float(above=0), default=1.0, help="static loss scale with --fp16"
    )
    t.add_argument(
        "--dynamic_loss_scale", action="store_true", help="with --fp16: dynamic loss scaling (GradScaler)"
    )
    t.add_argument("--cpu", action="store_true", help="run on CPU even when a GPU is available")

    g = p.add_argument_group(
        "distributed",
        "data-parallel training: `python -m multiproc main.py ARGS` (one process per GPU) or torchrun, "
        "whose RANK/WORLD_SIZE/LOCAL_RANK environment wins over these flags. --batch_size is per process.",
    )
    g.add_argument("--world_size", type=int_at_least(1), default=1, help="number of processes")
    g.add_argument("--rank", type=int, default=-1, help="this process's rank (0 .. world_size - 1)")
    g.add_argument(
        "--distributed_backend",
        default=None,
        choices=("nccl", "gloo"),
        help="torch.distributed backend (default: nccl on GPUs, gloo on CPU; the original always used gloo)",
    )

    d = p.add_argument_group("data")
    d.add_argument(
        "--data",
        default="./data/imdb/unsup.json",
        help="training file: csv, json, or .txt (plain UTF-8 text, one sample per line, blank lines skipped)",
    )
    d.add_argument("--valid", default=None, help="validation file (else a part of --split)")
    d.add_argument("--test", default=None, help="test file (else a part of --split)")
    d.add_argument(
        "--batch_size", type=int_at_least(1), default=128, help="rows of a batch (per process, distributed)"
    )
    d.add_argument("--eval_batch_size", type=int_at_least(0), default=0, help="0: --batch_size")
    d.add_argument(
        "--seq_length",
        type=int,
        default=256,
        help="TBPTT steps per batch (negative -N: chosen so an epoch has N batches)",
    )
    d.add_argument("--eval_seq_length", type=int, default=256, help="as --seq_length, for evaluation")
    d.add_argument("--loose_json", action="store_true", help="one json object per line")
    d.add_argument(
        "--lazy",
        action="store_true",
        help="encode each data file once into a cache ($XDG_CACHE_HOME or ~/.cache, under "
        "sentiment-discovery/lazy/) and memory-map it instead of holding the corpus in memory; "
        "rebuilt when the file changes",
    )
    d.add_argument("--preprocess", action="store_true", help="with --lazy: force rebuilding the cache")
    d.add_argument("--delim", default=",", help="csv delimiter")
    d.add_argument("--split", default="100,1,1", help="train/val/test proportions over shards")
    d.add_argument("--text_key", default="sentence", help="csv column / json key of the text")
    d.add_argument(
        "--label_key",
        default="label",
        help="label column/key (unused by language modelling; accepted so the original commands run)",
    )
    cli.add_eval_key_flags(d, "; unused by language modelling, as --label_key")
    d.add_argument(
        "--persist_state",
        type=int,
        default=1,
        choices=(-1, 0, 1),
        help="reset the state at every shard (1), every sample (0) or never (-1)",
    )
    d.add_argument(
        "--num_shards", type=int_at_least(1), default=102, help="contiguous shards of the training file"
    )
    d.add_argument(
        "--val_shards", type=int_at_least(0), default=0, help="shards of --valid (0: --num_shards)"
    )
    d.add_argument(
        "--test_shards", type=int_at_least(0), default=0, help="shards of --test (0: --num_shards)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    from sentiment_discovery.train import pretrain

    return cli.run_script(build_parser(), pretrain, argv)


if __name__ == "__main__":
    sys.exit(main())
