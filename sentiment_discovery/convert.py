"""Convert any loadable checkpoint (native, NVIDIA 2018, OpenAI shard directory) to the native format.

    python3 -m sentiment_discovery.convert SRC DST [--safetensors] [--save_dtype fp32|fp16|bf16]

The result holds the model, its classifier (if any) and ``extra`` (e.g. OpenAI's default neuron);
a training state is not carried over (a converted file starts new runs, it does not resume one).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .checkpoint import SAVE_DTYPES, CheckpointError, load_checkpoint, save_checkpoint


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m sentiment_discovery.convert",
        description="Write a checkpoint (project format, NVIDIA 2018 .pt, or a directory of OpenAI .npy "
        "shards; detected) in the project's own format.",
    )
    parser.add_argument("src", help="checkpoint file or OpenAI shard directory")
    parser.add_argument("dst", help="output file (.pt, or .safetensors)")
    parser.add_argument(
        "--safetensors", action="store_true", help="write safetensors (the default for a .safetensors DST)"
    )
    parser.add_argument(
        "--save_dtype",
        choices=sorted(SAVE_DTYPES),
        default="fp32",
        help="store the weights in this dtype: fp16/bf16 take about half the bytes (loaded as float32)",
    )
    parser.add_argument("--fp16", action="store_true", help="the same as --save_dtype fp16")
    args = parser.parse_args(argv)
    if args.fp16:
        if args.save_dtype not in ("fp32", "fp16"):
            print(f"error: --fp16 and --save_dtype {args.save_dtype}: choose one", file=sys.stderr)
            return 2
        args.save_dtype = "fp16"
    try:
        ckpt = load_checkpoint(args.src)
        save_checkpoint(
            args.dst,
            ckpt.model,
            ckpt.classifier,
            extra=ckpt.extra,
            dtype=SAVE_DTYPES[args.save_dtype],
            safetensors_file=args.safetensors or None,
        )
    except (CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = ckpt.config
    print(
        f"wrote {args.dst}: {config.model} {config.nlayers}x{config.nhid} (emsize {config.emsize}, "
        f"preprocess {config.preprocess}) from {ckpt.source_format}"
        + (", with classifier" if ckpt.classifier is not None else "")
        + ("" if args.save_dtype == "fp32" else f", weights stored as {args.save_dtype}")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
