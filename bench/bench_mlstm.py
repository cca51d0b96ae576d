"""Benchmark of the fused mLSTM against the per-step reference mLSTM and torch.nn.LSTM (one process).

Measures the float32 and bfloat16 matrix-multiply peaks, then characters/second of
- training: embedding -> recurrent layer -> decoder -> cross-entropy, backward, Adam step;
- featurization: embedding -> recurrent layer, final state only, under ``torch.inference_mode``;
- featurization of real text (first 256 sentences of binary_sst/test.csv, real bytes only).
Each rate is also given per FLOP (GFLOP/s), against nn.LSTM per FLOP, and as a fraction of the bound
"GEMM peak / FLOPs per character". FLOPs per character: mLSTM 2 * (5H^2 + 5EH), LSTM 2 * (4H^2 + 4EH),
plus 2 * 256H with the decoder; training counts 3x (forward, and backward's two products). One more,
profiled run of the fused variant gives the share of its time spent in matrix products, and so the
rate it would reach if everything between the products took no time (its floor set by the libraries).
``fused-bf16`` is the fused mLSTM with bfloat16 operands (``--bf16``: the model under bfloat16
autocast); ``fused-torch`` is the fused mLSTM with its element-wise step work as PyTorch calls instead
of the C++ kernels (what those kernels buy). The variants of one measurement take turns (each timed
once per round, best of ``--reps`` rounds kept), so a slow spell of a shared machine falls on all of
them and the ratios, measured in one run, hold. After the training runs at each H, every matrix
product of the step is listed with the GFLOP/s that ``sentiment_discovery.matmul`` measured through
MKL (``torch.mm``) and oneDNN when it first met that shape, and the library it chose.

    .venv/bin/python bench/bench_mlstm.py            # the full run recorded in bench/RESULTS.md
    .venv/bin/python bench/bench_mlstm.py --quick    # H=512 only, one repetition
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from sentiment_discovery import matmul, mlstm_kernels
from sentiment_discovery.featurize import featurize
from sentiment_discovery.model import ModelConfig, RNNModel
from sentiment_discovery.preprocess import encode

SST_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "binary_sst" / "test.csv"
EMSIZE = 64
VARIANTS = ("fused", "fused-torch", "fused-bf16", "reference", "nn.LSTM")


PRODUCT_OPS = ("mkldnn::_linear_pointwise", "aten::mm", "aten::addmm")


def product_share(fn: Callable[[], object]) -> float:
    """The fraction of one run of ``fn`` spent in matrix products (torch.profiler, self CPU time)."""
    with torch.profiler.profile() as prof:
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
    products = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in PRODUCT_OPS) / 1e6
    return products / seconds


def best_seconds(fn: Callable[[], object], reps: int) -> float:
    """Best of ``reps`` timed calls after one warm-up call (the machine is shared: the minimum is the
    least disturbed measurement)."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def gemm_peak_gflops(reps: int, n: int = 2048, dtype: torch.dtype = torch.float32) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / best_seconds(lambda: torch.mm(a, b), reps) / 1e9


@contextlib.contextmanager
def precision(variant: str):
    """How a variant runs: bfloat16 autocast for ``fused-bf16`` (what ``--bf16`` does); without the C++
    step kernels for ``fused-torch``."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(
            matmul.autocast(torch.device("cpu"), torch.bfloat16 if variant.endswith("bf16") else None)
        )
        if variant == "fused-torch":
            kernels = mlstm_kernels._step_kernels
            mlstm_kernels._step_kernels = lambda x: None
            stack.callback(setattr, mlstm_kernels, "_step_kernels", kernels)
        yield


def step_kernels(batch: int, hidden: int, reps: int) -> None:
    """The two choices inside the fused step, measured alone: per-step products through ``torch.mm``
    vs oneDNN-packed weights, and torch's tanh vs ``2 * sigmoid(2x) - 1``."""
    print(f"per-step kernels at batch {batch}, H={hidden}:")
    for n_out, n_in in ((hidden, hidden), (4 * hidden, hidden), (hidden, 4 * hidden)):
        a, w = torch.randn(batch, n_in), torch.randn(n_out, n_in)
        flops = 2 * batch * n_in * n_out / 1e9
        packed = torch.ops.mkldnn._reorder_linear_weight(w, batch)
        mm = flops / best_seconds(lambda a=a, w=w: torch.mm(a, w.t()), 10 * reps)
        onednn = flops / best_seconds(
            lambda a=a, p=packed: torch.ops.mkldnn._linear_pointwise(a, p, None, "none", [], ""), 10 * reps
        )
        a16, w16 = a.bfloat16(), w.bfloat16()
        mm16 = flops / best_seconds(lambda a=a16, w=w16: torch.mm(a, w.t()), 3 * reps)
        onednn16 = "n/a (no native bf16)"
        if matmul.native_bf16(torch.device("cpu")):
            p16 = torch.ops.mkldnn._reorder_linear_weight(w16, batch)
            run = lambda a=a16, p=p16: torch.ops.mkldnn._linear_pointwise(a, p, None, "none", [], "")  # noqa: E731
            onednn16 = f"{flops / best_seconds(run, 10 * reps):.0f}"
        print(f"  [{batch}x{n_in}] x [{n_in}x{n_out}]: float32 torch.mm {mm:.0f} GFLOP/s, oneDNN packed "
              f"{onednn:.0f}; bfloat16 torch.mm {mm16:.0f}, oneDNN packed {onednn16}")
    x, out = torch.randn(batch, hidden), torch.empty(batch, hidden)
    tanh = best_seconds(lambda: torch.tanh(x, out=out), 10 * reps)
    via_sigmoid = best_seconds(lambda: torch.mul(x, 2, out=out).sigmoid_().mul_(2).sub_(1), 10 * reps)
    print(f"  tanh of [{batch}x{hidden}]: torch.tanh {tanh * 1e6:.0f} us, "
          f"2*sigmoid(2x)-1 {via_sigmoid * 1e6:.0f} us")


def build_model(variant: str, hidden: int, device: torch.device | str = "cpu") -> RNNModel:
    kind = "LSTM" if variant == "nn.LSTM" else "mLSTM"  # fused-bf16: the fused model, run under autocast
    # nn.LSTM without weight norm: the plain fused PyTorch kernel is the yardstick. The mLSTMs keep
    # weight norm (the model as trained), which only adds work on their side.
    with torch.device(device):  # weights made on the device: no 4096-unit initialisation on the CPU
        model = RNNModel(ModelConfig(model=kind, emsize=EMSIZE, nhid=hidden, weight_norm=kind == "mLSTM"))
    if variant == "reference":
        for layer in model.rnn.layers:
            layer.forward = layer.reference_forward
    return model


def flops_per_char(variant: str, hidden: int, decoder: bool, training: bool) -> float:
    gates = 4 if variant == "nn.LSTM" else 5
    macs = gates * hidden * hidden + gates * EMSIZE * hidden + (256 * hidden if decoder else 0)
    return 2 * macs * (3 if training else 1)


def train_step(model: RNNModel, steps: int, batch: int, variant: str) -> Callable[[], None]:
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, 256, (steps + 1, batch))
    loss_fn = nn.CrossEntropyLoss()

    def step():
        with precision(variant):
            logits, _ = model(tokens[:-1])
            loss = loss_fn(logits.view(-1, logits.shape[-1]).float(), tokens[1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def featurize_step(model: RNNModel, steps: int, batch: int, variant: str) -> Callable[[], None]:
    model.eval()
    tokens = torch.randint(0, 256, (steps, batch))

    def run():
        with torch.inference_mode(), precision(variant):
            model.final_state(tokens)

    return run


def rates(
    make_step, hidden: int, steps: int, batch: int, reps: int, variants: list[str]
) -> tuple[dict[str, float], float | None]:
    """chars/s of each variant, measured in turns (``matmul.best_seconds_in_turns``), and the share of the
    fused variant's time spent in matrix products (one more, profiled run; None without it)."""
    runs = {v: make_step(build_model(v, hidden), steps, batch, v) for v in variants}
    measured = {v: steps * batch / seconds for v, seconds in matmul.best_seconds_in_turns(runs, reps).items()}
    return measured, (product_share(runs["fused"]) if "fused" in runs else None)


def real_text_rate(
    model: RNNModel, n_texts: int, batch: int, reps: int, chunk_length: int | None
) -> tuple[float, int, str]:
    texts = pd.read_csv(SST_TEST)["sentence"].astype(str).tolist()[:n_texts]
    real_bytes = sum(len(encode(t, model.config.preprocess)) for t in texts)
    chunking = {} if chunk_length is None else {"chunk_length": chunk_length}
    how = f"sentiment_discovery.featurize.featurize (sorted, left-padded, {chunking or 'defaults'})"
    run = lambda: featurize(model, texts, batch_size=batch, device="cpu", **chunking)
    return real_bytes / best_seconds(run, reps), real_bytes, how


def report(
    kind: str, hidden: int, batch: int, rates: dict[str, float], peak: float, decoder: bool,
    products: float | None,
) -> None:
    training = kind == "train"
    gflops = {v: r * flops_per_char(v, hidden, decoder, training) / 1e9 for v, r in rates.items()}
    print(f"\n{kind} H={hidden} batch={batch}")
    print(f"  {'variant':10s} {'chars/s':>10s} {'x ref':>7s} {'GFLOP/s':>8s} {'/LSTM':>7s} {'of bound':>9s}")
    for v, r in rates.items():
        x_ref = r / rates["reference"] if "reference" in rates else float("nan")
        per_flop = gflops[v] / gflops["nn.LSTM"] if "nn.LSTM" in gflops else float("nan")
        print(f"  {v:10s} {r:10.0f} {x_ref:7.2f} {gflops[v]:8.1f} {per_flop:7.2f} {gflops[v] / peak:9.2f}")
    for other in ("fused-bf16", "fused-torch"):
        if "fused" in rates and other in rates:
            print(f"  {other} / fused chars/s: {rates[other] / rates['fused']:.2f}")
    if products is not None:
        line = f"  fused: {100 * products:.0f}% of its time in matrix products (profiled run)"
        if "nn.LSTM" in gflops:
            floor = gflops["fused"] / gflops["nn.LSTM"] / products
            line += f"; with everything else free it would run at {floor:.2f}x nn.LSTM per FLOP"
        print(line)


def report_choices(seen: int) -> int:
    """The products calibrated since the first ``seen`` (matmul.choices()); returns the new count."""
    made = matmul.choices()
    if len(made) > seen:
        print("  products (GFLOP/s as matmul measured them on first use; '>' marks the library chosen):")
    for c in made[seen:]:
        ways = ", ".join(f"{'>' if b == c.chosen else ' '}{b} {g:6.1f}" for b, g in c.gflops.items())
        print(f"    {str(c.dtype).removeprefix('torch.'):8s} {c.name:30s} {c.shape:28s} {ways}")
    return len(made)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="H=512 only, one repetition, no real text")
    ap.add_argument("--sizes", type=int, nargs="*", default=[512, 1024], help="H, training and featurizing")
    ap.add_argument("--featurize-sizes", type=int, nargs="*", default=[4096], help="more H, featurizing")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--train-batch", type=int, default=64)
    ap.add_argument("--featurize-batch", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions per measurement (best is kept)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--no-real-text", action="store_true")
    ap.add_argument("--real-texts", type=int, default=256)
    ap.add_argument("--real-hidden", type=int, default=4096)
    ap.add_argument("--real-chunk-length", type=int, default=None, help="featurize's chunk_length")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.featurize_sizes, args.reps, args.no_real_text = [512], [], 1, True
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")), "")
    print(f"torch {torch.__version__}, python {platform.python_version()}, CPU {cpu}, "
          f"threads {torch.get_num_threads()}")
    peak = gemm_peak_gflops(max(args.reps, 3))
    peak16 = gemm_peak_gflops(1, n=1024, dtype=torch.bfloat16)  # smaller: emulated bf16 is slow
    native = "native" if matmul.native_bf16(torch.device("cpu")) else "NOT native (emulated)"
    print(f"fp32 GEMM peak (2048^3 torch.mm): {peak:.1f} GFLOP/s; bf16 (1024^3) {peak16:.1f} GFLOP/s, "
          f"bf16 {native}; torch CPU capability {torch.backends.cpu.get_cpu_capability()}", flush=True)
    step_kernels(args.train_batch, max(args.sizes + args.featurize_sizes), args.reps)

    seen = 0
    for hidden in args.sizes:
        measured, products = rates(train_step, hidden, args.steps, args.train_batch, args.reps, args.variants)
        report("train", hidden, args.train_batch, measured, peak, decoder=True, products=products)
        seen = report_choices(seen)
    fixed_rates = {}
    for hidden in args.sizes + args.featurize_sizes:
        measured, products = rates(
            featurize_step, hidden, args.steps, args.featurize_batch, args.reps, args.variants
        )
        fixed_rates[hidden] = measured
        report("featurize", hidden, args.featurize_batch, measured, peak, decoder=False, products=products)
        seen = report_choices(seen)
    if not args.no_real_text:
        hidden = args.real_hidden
        rate, real_bytes, how = real_text_rate(build_model("fused", hidden), args.real_texts,
                                               args.featurize_batch, max(1, args.reps - 1),
                                               args.real_chunk_length)
        print(f"\nreal text: first {args.real_texts} sentences of {SST_TEST.name}, {real_bytes} real bytes, "
              f"H={hidden}, fused, via {how}")
        line = f"  {rate:.0f} real chars/s"
        if "fused" in fixed_rates.get(hidden, {}):
            line += f" = {rate / fixed_rates[hidden]['fused']:.2f}x the fixed-length featurization rate"
        print(line)


if __name__ == "__main__":
    main()
