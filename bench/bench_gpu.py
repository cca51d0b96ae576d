"""GPU benchmark: the fused mLSTM against cuDNN's nn.LSTM per FLOP, and against NVIDIA's 2018 figure.

For each hidden size (default 4096, then 1024) and precision (float32; float16 and bfloat16 under
torch.autocast, as the package runs --fp16/--bf16 (matmul.autocast; the kernels take float16/bfloat16
operands from it), float16 with a GradScaler), characters/second of
- training: embedding -> recurrent layer -> decoder -> cross-entropy (train.batch_loss), backward,
  Adam step; batch 128 x 256 steps;
- featurization: embedding -> recurrent layer under inference_mode and parametrize.cached (as
  featurize.py), batch 128 x 256 steps;
for two variants: ``fused`` (the default fused layer) and ``nn.LSTM`` (cuDNN, no weight norm).
FLOPs per character: mLSTM 2 * (5H^2 + 5EH), LSTM 2 * (4H^2 + 4EH), + 2 * 256H with the decoder;
training counts 3x. Training is also given per GPU against NVIDIA's 76,000 chars/s on 8 V100s
(9,500 per GPU, 4096-unit mLSTM, fp16). Timing: CUDA events, one warm-up call, best of ``--reps``.
PyTorch's defaults are kept: float32 matmuls in full float32, cuDNN (nn.LSTM) allowed TF32.

    PYTHONPATH=. python bench/bench_gpu.py --json gpu.json --markdown gpu.md
    PYTHONPATH=. python bench/bench_gpu.py --device cpu --sizes 32 --batch 4 --steps 16   # smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
from pathlib import Path

import torch
from bench_mlstm import build_model, flops_per_char  # this folder: python bench/bench_gpu.py
from torch.nn.utils import parametrize

from sentiment_discovery.batching import Batch
from sentiment_discovery.matmul import autocast
from sentiment_discovery.train import batch_loss

V100_CHARS_PER_S = 76_000 / 8  # NVIDIA's README: 8 V100s, fp16, mLSTM 4096
PRECISIONS = {"float32": None, "float16": torch.float16, "bfloat16": torch.bfloat16}
VARIANTS = ("fused", "nn.LSTM")
TARGETS = (  # issue 14, on one H100/H200
    "H=4096 float16/bfloat16 training: fused >= 38,000 chars/s (4x a V100) and >= 0.7x nn.LSTM per FLOP",
    "featurization: fused >= 0.8x nn.LSTM per FLOP",
)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn, reps: int, device: torch.device) -> float:
    """One warm-up call, then the best of ``reps`` timed calls (CUDA events on a GPU)."""
    fn()
    synchronize(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return min(times)


def inputs(steps: int, batch: int, device: torch.device) -> Batch:
    tokens = torch.randint(0, 256, (steps + 1, batch), device=device)
    reset = torch.zeros(steps, batch, dtype=torch.bool, device=device)
    reset[0] = True  # every row starts a text at the first step, as at a shard start
    return Batch(tokens[:-1], tokens[1:], reset)


def train_rate(model, dtype, steps, batch, reps, device) -> float:
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    data = inputs(steps, batch, device)

    def step():
        with autocast(device, dtype):
            loss, _ = batch_loss(model, data, None)
            loss = loss / data.input.numel()
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

    return steps * batch / best_seconds(step, reps, device)


def featurize_rate(model, dtype, steps, batch, reps, device) -> float:
    model.eval()
    data = inputs(steps, batch, device)

    def run():
        with torch.inference_mode(), parametrize.cached(), autocast(device, dtype):
            model.final_state(data.input, None, data.reset)

    return steps * batch / best_seconds(run, reps, device)


def kernel_rates(hidden: int, batch: int, device: torch.device, reps: int) -> list[dict]:
    """The per-step product ``[batch, H] x [H, 4H]`` alone, in each operand precision (TFLOP/s): about
    what the recurrence's products could reach (float32 with TF32 shown too: PyTorch leaves it off)."""
    a = torch.randn(batch, hidden, device=device)
    w = torch.randn(4 * hidden, hidden, device=device)
    flops = 2 * batch * hidden * 4 * hidden
    cases = [("float32", torch.float32, "highest")]
    if device.type == "cuda":
        cases += [("float32 as TF32", torch.float32, "high"), ("float16", torch.float16, "highest"),
                  ("bfloat16", torch.bfloat16, "highest")]  # fmt: skip
    rows = []
    for name, dtype, matmul_precision in cases:
        a_low, w_t = a.to(dtype), w.to(dtype).t()
        old = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(matmul_precision)
        try:
            ten = lambda a_low=a_low, w_t=w_t: [torch.mm(a_low, w_t) for _ in range(10)]
            seconds = best_seconds(ten, reps, device) / 10
            rows.append({"H": hidden, "batch": batch, "product": name, "tflops": flops / seconds / 1e12})
        finally:
            torch.set_float32_matmul_precision(old)
    return rows


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def environment(device: torch.device) -> dict:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())  # fmt: skip
    return env


def add_ratios(rows: list[dict]) -> None:
    """Per-FLOP ratio to nn.LSTM and the V100 ratio, where both sides were measured."""
    index = {(r["H"], r["precision"], r["mode"], r["variant"]): r for r in rows if r.get("chars_per_s")}
    for r in rows:
        if not r.get("chars_per_s"):
            continue
        lstm = index.get((r["H"], r["precision"], r["mode"], "nn.LSTM"))
        if lstm is not None and r["variant"] != "nn.LSTM":
            r["per_flop_vs_lstm"] = r["tflops"] / lstm["tflops"]
        if r["mode"] == "train":
            r["x_v100"] = r["chars_per_s"] / V100_CHARS_PER_S


def check_targets(rows: list[dict]) -> list[str]:
    """Each target against the measured rows of the fused layer; 'not measured' if absent."""
    def best(H, precision, mode):
        got = [r for r in rows if (r["H"], r["precision"], r["mode"]) == (H, precision, mode)
               and r["variant"] == "fused" and r.get("chars_per_s")]  # fmt: skip
        return max(got, key=lambda r: r["chars_per_s"]) if got else None

    lines = []
    for precision in ("float16", "bfloat16"):
        r = best(4096, precision, "train")
        if r is None:
            lines.append(f"H=4096 {precision} training: not measured")
            continue
        speed_ok = r["chars_per_s"] >= 4 * V100_CHARS_PER_S
        flop = r.get("per_flop_vs_lstm")
        flop_ok = flop is not None and flop >= 0.7
        lines.append(
            f"H=4096 {precision} training ({r['variant']}): {r['chars_per_s']:,.0f} chars/s = "
            f"{r['x_v100']:.1f}x a V100 [{'met' if speed_ok else 'NOT met'}: >= 4x]; "
            + (f"{flop:.2f}x nn.LSTM per FLOP" if flop is not None else "nn.LSTM not measured")
            + f" [{'met' if flop_ok else 'NOT met'}: >= 0.7x]"
        )
    for H in sorted({r["H"] for r in rows}, reverse=True):
        for precision in PRECISIONS:
            r = best(H, precision, "featurize")
            if r is not None and r.get("per_flop_vs_lstm") is not None:
                ok = r["per_flop_vs_lstm"] >= 0.8
                lines.append(
                    f"H={H} {precision} featurization ({r['variant']}): {r['per_flop_vs_lstm']:.2f}x "
                    f"nn.LSTM per FLOP [{'met' if ok else 'NOT met'}: >= 0.8x]"
                )
    return lines


def markdown(result: dict) -> str:
    env, args = result["env"], result["args"]
    lines = [
        f"GPU benchmark: {env.get('gpu', env['device'])}, torch {env['torch']}, CUDA {env.get('cuda')}; "
        f"batch {args['batch']} x {args['steps']} steps, best of {args['reps']} after a warm-up.",
        "",
        "| H | precision | mode | variant | chars/s | TFLOP/s | /nn.LSTM per FLOP | x V100 | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def fmt(value, spec):
        return "" if value is None else format(value, spec)

    for r in result["rows"]:
        cells = [
            r["H"], r["precision"], r["mode"], r["variant"], fmt(r.get("chars_per_s"), ",.0f"),
            fmt(r.get("tflops"), ".2f"), fmt(r.get("per_flop_vs_lstm"), ".2f"),
            fmt(r.get("x_v100"), ".1f"), r.get("note", ""),
        ]  # fmt: skip
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if result["kernels"]:
        lines += ["", "Per-step product [batch, H] x [H, 4H] alone:", "", "| H | product | TFLOP/s |",
                  "|---|---|---|"]  # fmt: skip
        lines += [f"| {k['H']} | {k['product']} | {k['tflops']:.1f} |" for k in result["kernels"]]
    lines += ["", "Targets (issue 14):", *[f"- {t}" for t in result["targets"]]]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 1024])
    ap.add_argument("--precisions", nargs="+", default=["float16", "bfloat16", "float32"], choices=PRECISIONS)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--modes", nargs="+", default=["train", "featurize"], choices=("train", "featurize"))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--reps", type=int, default=2, help="timed repetitions after one warm-up (best kept)")
    ap.add_argument("--time-budget", type=float, default=240, help="seconds; later measurements are skipped")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", default="bench_gpu.json")
    ap.add_argument("--markdown", default="bench_gpu.md")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py: no CUDA GPU visible (torch.cuda.is_available() is False); "
                         "--device cpu runs a smoke test")  # fmt: skip
    torch.manual_seed(0)
    began = time.perf_counter()
    result = {"env": environment(device), "args": vars(args), "rows": [], "kernels": [], "targets": []}
    print(json.dumps(result["env"]))

    def save() -> None:  # after every measurement: a run cut short still leaves its numbers
        add_ratios(result["rows"])
        result["targets"] = check_targets(result["rows"])
        result["elapsed_s"] = round(time.perf_counter() - began, 1)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        Path(args.markdown).write_text(markdown(result))

    for hidden in args.sizes:
        try:
            result["kernels"] += kernel_rates(hidden, args.batch, device, args.reps)
        except Exception as e:  # a failed side measurement must not stop the benchmark
            print(f"kernel rates H={hidden}: {type(e).__name__}: {e}")
        for precision in args.precisions:
            for mode in args.modes:
                for variant in args.variants:
                    row = {"H": hidden, "precision": precision, "mode": mode, "variant": variant}
                    result["rows"].append(row)
                    if time.perf_counter() - began > args.time_budget:
                        row["note"] = "skipped: time budget"
                        continue
                    model = None
                    try:
                        model = build_model(variant, hidden, device)
                        rate = (train_rate if mode == "train" else featurize_rate)(
                            model, PRECISIONS[precision], args.steps, args.batch, args.reps, device
                        )
                        row["chars_per_s"] = rate
                        training = mode == "train"  # the decoder is timed in training only
                        row["tflops"] = rate * flops_per_char(variant, hidden, training, training) / 1e12
                    except Exception as e:  # out of memory, a kernel error ...: report, go on
                        row["note"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    finally:
                        del model
                        release()
                    print(
                        f"H={hidden} {precision:8s} {mode:9s} {variant:7s} "
                        f"{row.get('chars_per_s', 0):12,.0f} chars/s {row.get('note', '')}",
                        flush=True,
                    )
                    save()
    save()
    print()
    print(markdown(result))


if __name__ == "__main__":
    main()
