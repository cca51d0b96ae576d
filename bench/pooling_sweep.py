"""Which features read sentiment best: SST accuracy per pooling and state, a model beside its twin.

    python bench/pooling_sweep.py runs/gpu1/mlstm1024.pt --twin --out runs/gpu1/sweep.json

Featurizes ``--data``/{train,val,test}.csv (default Binary SST) once per (model, state) with all three
poolings, then fits the project's L1 logistic regression (C chosen on val) on each pooling alone and on
their concatenations. ``--twin`` adds each model's randomly initialised twin (same architecture, seed 1).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import numpy as np
import torch

from sentiment_discovery.checkpoint import load_checkpoint
from sentiment_discovery.featurize import featurize
from sentiment_discovery.model import RNNModel
from sentiment_discovery.readers import read_records
from sentiment_discovery.readout import top_neurons
from sentiment_discovery.regression import c_sweep, fit_l1_regression, standardizer

POOLINGS = ("mean", "max", "last")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("models", nargs="+")
    p.add_argument("--data", default="data/binary_sst")
    p.add_argument("--states", default="cell,hidden")
    p.add_argument("--out", required=True)
    p.add_argument("--twin", action="store_true", help="also each model's random twin (seed 1)")
    p.add_argument("--device", default=None, help="default: GPU when available")
    args = p.parse_args()
    splits = {s: read_records(f"{args.data}/{s}.csv", need_labels=True) for s in ("train", "val", "test")}
    results = []
    models = [(path, False) for path in args.models] + [(path, True) for path in args.models if args.twin]
    for (path, twin), state in itertools.product(models, args.states.split(",")):
        model = load_checkpoint(path).model
        if twin:
            torch.manual_seed(1)
            model = RNNModel(model.config)
        t0 = time.time()
        feats = {s: featurize(model, r.texts, pooling=",".join(POOLINGS), state=state, device=args.device)
                 for s, r in splits.items()}  # fmt: skip
        H = model.config.nhid
        elapsed = time.time() - t0
        blocks = {p: slice(i * H, (i + 1) * H) for i, p in enumerate(POOLINGS)}
        combos = [(p,) for p in POOLINGS] + [("mean", "max"), ("mean", "last"), POOLINGS]
        for combo in combos:
            cols = np.concatenate([np.arange(3 * H)[blocks[p]] for p in combo])
            x = {s: f[:, cols] for s, f in feats.items()}
            mean, scale = standardizer(x["train"])
            x = {s: (f - mean) / scale for s, f in x.items()}
            y = {s: r.labels for s, r in splits.items()}
            reg = fit_l1_regression(x["train"], y["train"], x["val"], y["val"], c_sweep(-8, 0), 100, 1)
            acc = {s: float(((reg.probs(x[s]) > 0.5) == (y[s] > 0.5)).mean()) for s in x}
            top = top_neurons(reg.weight, 1)
            x1 = {s: f[:, top] for s, f in x.items()}
            one = fit_l1_regression(x1["train"], y["train"], x1["val"], y["val"], c_sweep(-8, 0), 100, 1)
            acc1 = {s: float(((one.probs(x1[s]) > 0.5) == (y[s] > 0.5)).mean()) for s in x}
            name = path + (" (random twin)" if twin else "")
            row = {"model": name, "state": state, "pooling": ",".join(combo), "acc": acc, "acc_1neuron": acc1,
                   "C": reg.C, "nonzero": reg.nonzero, "featurize_s": round(elapsed, 1)}  # fmt: skip
            print(json.dumps(row), flush=True)
            results.append(row)
    json.dump(results, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
