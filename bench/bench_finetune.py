"""Fine-tuning chars/s beside main.py's pre-training chars/s, same model, same process, in turns.

Two kinds of update of the same model (the shipped H=1024 mLSTM unless ``--load``), each on its own
fresh copy, float32 (``--bf16``: bfloat16 products for both):

- **pre-training** (main.py: ``train.Trainer.train_step``): 32 rows x 256 steps of Binary SST train
  as one byte stream (``batching.lm_splits``), Adam; every step predicts 32 x 256 bytes.
- **fine-tuning** (finetune_classifier.py: ``finetune.Finetuner.train_step``): 32 sentences per batch in
  the first epoch's length-bucketed order, each batch padded to a multiple of 32 steps, mean,max,last
  cell-state head, AdamW; chars/s counts real bytes only (padding is work, not text).

Warm: before timing, one update of every product shape the measured updates use (pre-training has
one; fine-tuning one per padded length), so that no timed update pays matmul's first-shape library
choice. Then ``--rounds`` rounds of ``--steps`` updates of each kind in turn (the ratio of neighbours
is what a shared machine allows); the totals over all rounds are reported.

    python bench/bench_finetune.py                      # the run recorded in bench/RESULTS.md
    python bench/bench_finetune.py --steps 4 --rounds 2 # a quick look
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sentiment_discovery.batching import lm_splits  # noqa: E402
from sentiment_discovery.checkpoint import load_checkpoint  # noqa: E402
from sentiment_discovery.finetune import (  # noqa: E402
    SEQ_MULTIPLE,
    FinetuneOptions,
    Finetuner,
    Head,
    LabelledSplit,
)
from sentiment_discovery.preprocess import encode  # noqa: E402
from sentiment_discovery.readers import read_records  # noqa: E402
from sentiment_discovery.train import Trainer, TrainOptions  # noqa: E402


def pretraining(load: str, data: str, bf16: bool, folder: Path):
    """main.py's Trainer on ``data`` as a byte stream: (trainer, its batches)."""
    model = load_checkpoint(load).model
    splits = lm_splits(data, split="100,0,0", batch_size=32, seq_length=256, num_shards=1)
    options = TrainOptions(save=str(folder / "lm.pt"), bf16=bf16, progress=False, train_iters=10_000)
    trainer = Trainer(model, splits, options, torch.device("cpu"))
    return trainer, [splits.train.batch(i) for i in range(len(splits.train))]


def finetuning(load: str, data: str, bf16: bool, folder: Path):
    """finetune.py's Finetuner on ``data`` (head from zero, no validation): (finetuner, batches)."""
    model = load_checkpoint(load).model
    records = read_records(data, need_labels=True)
    tokens = [encode(text, model.config.preprocess) for text in records.texts]
    split = LabelledSplit("train", data, tokens, records.labels.astype(np.int64))
    opt = FinetuneOptions(bf16=bf16, save=str(folder / "ft.pt"), progress=False, init_head="zero")
    head = Head(opt.spec.num_features(model.config), 2, opt.dropout)
    torch.nn.init.zeros_(head.linear.weight)
    finetuner = Finetuner(model, head, [0, 1], {"train": split}, opt, torch.device("cpu"), seed=1)
    return finetuner, finetuner.epoch_batches(0)


def padded(lengths: np.ndarray) -> int:
    return int(-(-lengths.max() // SEQ_MULTIPLE) * SEQ_MULTIPLE)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", default="default", help="model (default: the shipped H=1024 mLSTM)")
    p.add_argument("--data", default=str(ROOT / "data" / "binary_sst" / "train.csv"))
    p.add_argument("--steps", type=int, default=8, help="timed updates of each kind per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--bf16", action="store_true", help="bfloat16 products for both")
    p.add_argument("--out", default="", help="also write the numbers as json")
    args = p.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        trainer, lm_batches = pretraining(args.load, args.data, args.bf16, Path(tmp))
        finetuner, ft_batches = finetuning(args.load, args.data, args.bf16, Path(tmp))
        n = args.steps * args.rounds
        lm_batches = [lm_batches[i % len(lm_batches)] for i in range(n)]
        ft_batches = ft_batches[:n]
        lengths = finetuner.train.lengths
        shapes = sorted({padded(lengths[idx]) for idx in ft_batches})
        print(
            f"model {args.load}: nhid {trainer.model.config.nhid}; {'bf16' if args.bf16 else 'float32'}; "
            f"torch threads {torch.get_num_threads()}; fine-tuning padded lengths {shapes}"
        )
        # warm-up: every product shape once (pre-training: one; fine-tuning: one per padded length)
        started = time.perf_counter()
        trainer.train_step(lm_batches[0])
        for T in shapes:
            finetuner.train_step(next(idx for idx in ft_batches if padded(lengths[idx]) == T))
        print(f"warm-up: {1 + len(shapes)} updates, {time.perf_counter() - started:.1f} s")
        totals = {"pretrain": [0, 0, 0.0], "finetune": [0, 0, 0.0]}  # real bytes, padded bytes, seconds
        for r in range(args.rounds):
            chunk = slice(r * args.steps, (r + 1) * args.steps)
            started = time.perf_counter()
            for batch in lm_batches[chunk]:
                trainer.train_step(batch)
            seconds = time.perf_counter() - started
            real = sum(b.num_targets for b in lm_batches[chunk])
            lm = totals["pretrain"]
            lm[0], lm[1], lm[2] = lm[0] + real, lm[1] + real, lm[2] + seconds
            lm_rate = real / seconds
            started = time.perf_counter()
            real = pad = 0
            for idx in ft_batches[chunk]:
                finetuner.train_step(idx)
                real += int(lengths[idx].sum())
                pad += padded(lengths[idx]) * len(idx)
            seconds_ft = time.perf_counter() - started
            ft = totals["finetune"]
            ft[0], ft[1], ft[2] = ft[0] + real, ft[1] + pad, ft[2] + seconds_ft
            print(
                f"round {r + 1}: pre-training {lm_rate:,.0f} chars/s, "
                f"fine-tuning {real / seconds_ft:,.0f} real chars/s ({pad / seconds_ft:,.0f} padded)"
            )
    rates = {kind: {"chars_per_s": t[0] / t[2], "padded_chars_per_s": t[1] / t[2], "seconds": t[2],
                    "updates": n, "real_bytes": t[0]} for kind, t in totals.items()}  # fmt: skip
    ratio = rates["finetune"]["chars_per_s"] / rates["pretrain"]["chars_per_s"]
    for kind, rate in rates.items():
        print(
            f"{kind}: {n} updates, {rate['real_bytes']:,} real bytes in {rate['seconds']:.1f} s: "
            f"{rate['chars_per_s']:,.0f} chars/s ({rate['padded_chars_per_s']:,.0f} with padding)"
        )
    print(f"fine-tuning / pre-training chars/s: {ratio:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "rates": rates, "ratio": ratio}, indent=1))


if __name__ == "__main__":
    main()
