"""Which way of forcing the sentiment neuron steers generation more?

For each overwrite mode of generate.py (``cell``: c on generated steps; ``hidden``: h on every step, the
original's), generate from the same warm-up with the neuron forced to +1 and to -1 sentiment over the
same seeds, and score the generated part with the transferred classifier. The mode whose mean
P(positive) differs more between +1 and -1 steers more.

    python bench/steer_polarity.py lang_model_transfer/classifier.pt --seeds 20
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sentiment_discovery.checkpoint import load_checkpoint  # noqa: E402
from sentiment_discovery.encoder import Encoder  # noqa: E402
from sentiment_discovery.generation import OVERWRITE_MODES, generate, select_neuron  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("load_model", help="a transferred checkpoint (classifier.pt)")
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--text", default="I watched this movie last night.")
    p.add_argument("--gen_length", type=int, default=200)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--json", default="", help="also write the per-seed probabilities here")
    args = p.parse_args()

    ckpt = load_checkpoint(args.load_model)
    model, classifier = ckpt.model.eval(), ckpt.classifier
    neuron = select_neuron(model, classifier)
    polarity = neuron.polarity()
    encoder = Encoder(model, classifier, device="cpu")
    print(f"{neuron.describe()}; warm-up {args.text!r}, {args.gen_length} bytes, {args.seeds} seeds")
    runs = {"free": [None]} | {mode: [1.0, -1.0] for mode in OVERWRITE_MODES}
    probs: dict[str, list[float]] = {}
    for mode, sentiments in runs.items():
        for sentiment in sentiments:
            start = time.perf_counter()
            texts = [
                generate(
                    model,
                    args.text,
                    gen_length=args.gen_length,
                    temperature=args.temperature,
                    seed=seed,
                    neuron=neuron,
                    overwrite=None if sentiment is None else sentiment * polarity,
                    overwrite_mode=mode if sentiment is not None else "cell",
                ).generated_text
                for seed in range(args.seeds)
            ]
            key = mode if sentiment is None else f"{mode} {sentiment:+g}"
            probs[key] = encoder.predict_proba(texts).tolist()
            print(
                f"{key:10s} mean P(positive) of the generated part {np.mean(probs[key]):.4f} "
                f"(sd {np.std(probs[key]):.4f}; {time.perf_counter() - start:.0f} s); e.g. {texts[0][:70]!r}"
            )
    for mode in OVERWRITE_MODES:
        gap = np.mean(probs[f"{mode} +1"]) - np.mean(probs[f"{mode} -1"])
        wins = int(np.sum(np.array(probs[f"{mode} +1"]) > np.array(probs[f"{mode} -1"])))
        print(f"{mode}: P(+1) - P(-1) = {gap:+.4f}; +1 above -1 for {wins}/{args.seeds} seeds")
    if args.json:
        Path(args.json).write_text(json.dumps({"neuron": neuron.feature, "probs": probs}, indent=1))


if __name__ == "__main__":
    main()
