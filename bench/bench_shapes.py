"""Real text at the fixed-length rate, from the first call (issue 20): four ratios, each measured as
fresh processes run back to back, in turns.

Featurization (``featurize``, batch 128, ``last`` pooling) of the first ``--texts`` Binary SST test
sentences, first pass of a fresh process, real bytes per second:
  1. library choice: automatic (matmul's per-class decisions) against the better of the two pinned
     libraries (``SENTIMENT_DISCOVERY_MATMUL=mm`` / ``onednn``) on the same text;
  2. real text against fixed-length text of the same total size (every text as long as the mean,
     cut from the same sentences), both automatic;
at H=1024 (the shipped model) and H=4096 (random weights of that shape).
Training (embedding -> fused mLSTM -> decoder, byte-LM cross-entropy over the real bytes only, Adam;
H=1024, batches of 32 sentences): batches of unequal length (each padded to its longest sentence)
against the same batches padded to a multiple of 32 (``featurize.bucket_length``), real bytes per
second over all batches of a fresh process.

The processes share one decisions folder (``--decisions``; by default a fresh one under /tmp that one
warm-up process per measurement fills first, as ``python -m sentiment_discovery.calibrate --calibrate``
or any earlier run would); ``--cold`` adds a variant with no decisions at all (a fresh empty folder).
Robust to a shared machine: each round runs every variant once, in turn (A B C D A B C D ...), so a
slow spell falls on all of them; per variant the best (shortest) and median rate are printed, both per
wall second and per CPU-second of the process, and the ratios are those of the best wall rates. The
load average is printed at the start and end of each section.

    python bench/bench_shapes.py                     # 512 sentences at both sizes, 3 rounds
    python bench/bench_shapes.py --texts-4096 64     # fewer sentences at H=4096
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SST_TEST = ROOT.parent / "shared" / "data" / "binary_sst" / "test.csv"
if not SST_TEST.exists():
    SST_TEST = Path("/work/shared/data/binary_sst/test.csv")


# --------------------------------------------------------------------------------------------
# One measurement, in a fresh process (python bench/bench_shapes.py --child '{...}')
# --------------------------------------------------------------------------------------------


def _model(hidden: int):
    import torch

    from sentiment_discovery.checkpoint import load_checkpoint
    from sentiment_discovery.model import ModelConfig, RNNModel

    torch.manual_seed(0)
    if hidden == 1024:
        return load_checkpoint(None).model  # the shipped model
    return RNNModel(ModelConfig(emsize=64, nhid=hidden))


def child_featurize(hidden: int, texts: int, fixed: bool) -> dict:
    from sentiment_discovery.featurize import featurize
    from sentiment_discovery.preprocess import encode

    model = _model(hidden)
    sentences = pd.read_csv(SST_TEST)["sentence"].astype(str).tolist()[:texts]
    real = sum(len(encode(t, model.config.preprocess)) for t in sentences)
    if fixed:  # same total size, every text of the mean length, cut from the same sentences
        joined = " ".join(sentences)
        length = round(real / len(sentences))
        sentences = [joined[i * length : (i + 1) * length] for i in range(len(sentences))]
        real = sum(len(encode(t, model.config.preprocess)) for t in sentences)
    start, cpu = time.perf_counter(), time.process_time()
    featurize(model, sentences, batch_size=128, device="cpu")
    return {"bytes": real, "seconds": time.perf_counter() - start, "cpu": time.process_time() - cpu}


def child_train(hidden: int, batches: int, batch: int, padded: bool) -> dict:
    import numpy as np
    import torch

    from sentiment_discovery.featurize import bucket_length
    from sentiment_discovery.preprocess import encode

    model = _model(hidden).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-5)
    sentences = pd.read_csv(SST_TEST)["sentence"].astype(str).tolist()[: batches * batch]
    tokens = [encode(t, model.config.preprocess) for t in sentences]
    real, start, cpu = 0, time.perf_counter(), time.process_time()
    for first in range(0, len(tokens), batch):
        rows = tokens[first : first + batch]
        steps = max(len(r) for r in rows) + 1  # + 1: a byte of padding to predict past the last
        steps = bucket_length(steps, 32) if padded else steps
        x = np.zeros((steps, len(rows)), dtype=np.int64)
        target = np.full((steps, len(rows)), -100, dtype=np.int64)  # -100: not a real byte, no loss
        for j, r in enumerate(rows):
            x[1 : len(r) + 1, j] = r  # step 0 reads byte 0 (a start byte), predicts the first real byte
            target[: len(r), j] = r
        logits, _ = model(torch.from_numpy(x))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.from_numpy(target).flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        real += sum(len(r) for r in rows)
    return {"bytes": real, "seconds": time.perf_counter() - start, "cpu": time.process_time() - cpu}


def child(spec: dict) -> dict:
    import torch

    from sentiment_discovery import matmul

    if spec["kind"] == "featurize":
        out = child_featurize(spec["hidden"], spec["texts"], spec["fixed"])
    else:
        out = child_train(spec["hidden"], spec["batches"], spec["batch"], spec["padded"])
    out["timed"] = len(matmul.choices())  # product classes this process had to time
    out["threads"] = torch.get_num_threads()
    return out


# --------------------------------------------------------------------------------------------
# The runs
# --------------------------------------------------------------------------------------------


def run_child(spec: dict, decisions: str, library: str = "auto") -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SENTIMENT_DISCOVERY_MATMUL": library,
           "SENTIMENT_DISCOVERY_MATMUL_CACHE": decisions}
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"child {spec} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def measure(
    name: str, variants: dict[str, tuple[dict, str | None]], decisions: str, rounds: int
) -> dict[str, float]:
    """Bytes/s of each variant: one fresh process per variant per round, the variants in turns
    (A B C A B C ...) so that a slow spell of a shared machine falls on all of them. Prints each
    variant's best (shortest time) and median rate; returns the best. A variant whose library is None
    runs automatic with a fresh, empty decisions folder (a first pass with nothing decided yet)."""
    rates: dict[str, list[float]] = {v: [] for v in variants}
    cpu_rates: dict[str, list[float]] = {v: [] for v in variants}
    print(f"  {name}: load average at start {load()}", flush=True)
    for r in range(rounds):
        line = []
        for v, (spec, library) in variants.items():
            if library is None:
                with tempfile.TemporaryDirectory() as empty:
                    out = run_child(spec, empty)
            else:
                out = run_child(spec, decisions, library)
            rates[v].append(out["bytes"] / out["seconds"])
            cpu_rates[v].append(out["bytes"] / out["cpu"])
            line.append(f"{v} {rates[v][-1]:.0f} ({out['timed']} timed)")
        print(f"    round {r + 1}: " + ", ".join(line), flush=True)
    print(f"  {name}: load average at end {load()}", flush=True)
    for v, got in rates.items():
        cpu = cpu_rates[v]
        print(f"    {v:8s} best {max(got):8.0f}  median {statistics.median(got):8.0f} bytes/s; per CPU-s "
              f"(all threads) best {max(cpu):8.0f}  median {statistics.median(cpu):8.0f}", flush=True)
    return {v: max(got) for v, got in rates.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--texts", type=int, default=512, help="SST sentences featurized at H=1024")
    ap.add_argument("--texts-4096", type=int, default=512, help="SST sentences featurized at H=4096")
    ap.add_argument("--train-batches", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--decisions", default=None, help="decisions folder (default: a fresh one in /tmp)")
    ap.add_argument("--cold", action="store_true",
                    help="also a variant with no decisions at all (a fresh empty folder each round)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["1024", "4096", "train"])
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    decisions = args.decisions or tempfile.mkdtemp(prefix="bench_shapes_decisions_")
    print(f"decisions folder: {decisions}; load average at start {load()}", flush=True)
    ratios = {}
    for hidden, texts in ((1024, args.texts), (4096, args.texts_4096)):
        if str(hidden) in args.skip:
            continue
        real = {"kind": "featurize", "hidden": hidden, "texts": texts, "fixed": False}
        fixed = {**real, "fixed": True}
        warm = run_child(real, decisions)  # warm-up: fills the decisions of this machine
        print(f"  H={hidden} warm-up process: {warm['timed']} classes timed", flush=True)
        run_child(fixed, decisions)
        variants = {"auto": (real, "auto"), "mm": (real, "mm"), "onednn": (real, "onednn"),
                    "fixed": (fixed, "auto")}
        if args.cold:
            variants["cold"] = (real, None)
        rates = measure(f"featurize H={hidden}, {texts} texts", variants, decisions, args.rounds)
        ratios[f"featurize H={hidden}: real text, auto / best pinned"] = rates["auto"] / max(
            rates["mm"], rates["onednn"])
        ratios[f"featurize H={hidden}: real text / fixed-length text"] = rates["auto"] / rates["fixed"]
        if args.cold:
            ratios[f"featurize H={hidden}: no decisions yet / best pinned"] = rates["cold"] / max(
                rates["mm"], rates["onednn"])
    if "train" not in args.skip:
        unequal = {"kind": "train", "hidden": 1024, "batches": args.train_batches, "batch": 32,
                   "padded": False}
        padded = {**unequal, "padded": True}
        for spec in (unequal, padded):  # warm-up
            print(f"  train warm-up process: {run_child(spec, decisions)['timed']} classes timed", flush=True)
        rates = measure(f"train H=1024, {args.train_batches} batches of 32", {
            "unequal": (unequal, "auto"), "padded": (padded, "auto")}, decisions, args.rounds)
        ratios["train H=1024: unequal lengths / padded to 32, per real byte"] = (
            rates["unequal"] / rates["padded"])
    print(f"\nratios of the best rates (load average at end {load()}):")
    for name, ratio in ratios.items():
        print(f"  {name:62s} {ratio:.3f}")


if __name__ == "__main__":
    main()
