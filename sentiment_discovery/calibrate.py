"""Decide MKL or oneDNN for every product class an mLSTM meets, ahead of time, once per machine:
``python -m sentiment_discovery.calibrate`` (``matmul.py`` keeps the decisions; without this warm-up a
class is timed the first time any run meets it). Without ``--calibrate`` it lists the decisions kept."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from .featurize import featurize
from .matmul import Choice, choices, decisions, decisions_path, size_bucket
from .model import ModelConfig, RNNModel


def calibrate(hidden: Sequence[int], emsize: int = 64, batch: int = 128, train_batch: int = 32,
              train: bool = True) -> list[Choice]:
    """Decide every product class that featurization (``batch`` texts of 1-256 bytes) and, with
    ``train``, training steps (``train_batch`` rows, 8-256 steps) of an mLSTM of each size meet, so
    that later processes time nothing. Returns the classes measured now (none when all were known)."""
    before = len(choices())
    generator = torch.Generator().manual_seed(0)
    for nhid in hidden:
        model = RNNModel(ModelConfig(emsize=emsize, nhid=nhid))
        lengths = torch.linspace(1, 256, 2 * batch).long().tolist()
        texts = ["".join(chr(97 + int(c)) for c in torch.randint(0, 26, (n,), generator=generator))
                 for n in lengths]
        featurize(model, texts, batch_size=batch, device="cpu", preprocess="nvidia")
        if not train:
            continue
        model.train()
        for steps in sorted({size_bucket(n) for n in range(8, 257)}):
            tokens = torch.randint(0, 256, (steps + 1, train_batch), generator=generator)
            logits, _ = model(tokens[:-1])
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[1:].flatten()).backward()
            model.zero_grad(set_to_none=True)
    return choices()[before:]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m sentiment_discovery.calibrate",
        description="Decide MKL or oneDNN for every product class an mLSTM meets, once for this machine "
        f"(kept in {decisions_path()}).",
    )
    parser.add_argument("--calibrate", action="store_true", help="measure the classes not yet decided")
    parser.add_argument("--hidden", type=int, nargs="+", default=[4096], help="mLSTM sizes (default 4096)")
    parser.add_argument("--emsize", type=int, default=64)
    parser.add_argument("--batch", type=int, default=128, help="featurization batch size")
    parser.add_argument("--train_batch", type=int, default=32, help="training batch size")
    parser.add_argument("--no_train", action="store_true", help="featurization classes only")
    args = parser.parse_args(argv)
    if not args.calibrate:
        known = decisions()
        print(f"{len(known)} decisions in {decisions_path()}")
        for key, chosen in sorted(known.items()):
            print(f"  {key:60s} {chosen}")
        return
    if any(n < 1 for n in [*args.hidden, args.emsize, args.batch, args.train_batch]):
        parser.error("--hidden, --emsize, --batch and --train_batch must be positive")
    made = calibrate(args.hidden, args.emsize, args.batch, args.train_batch, not args.no_train)
    for c in made:
        ways = ", ".join(f"{'>' if b == c.chosen else ' '}{b} {g:6.1f}" for b, g in c.gflops.items())
        print(f"  {c.kind:6s} {c.name:32s} {c.shape:28s} GFLOP/s {ways}")
    print(f"{len(made)} classes measured; {len(decisions())} decisions in {decisions_path()}")


if __name__ == "__main__":
    main()
