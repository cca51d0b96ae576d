"""Matrix products of the model: which library multiplies, and in which operand precision.

Library. On CPU a float32 product can run through MKL (``torch.mm``) or oneDNN
(``torch.ops.mkldnn._linear_pointwise``, with a weight laid out once for the per-step products);
which is faster depends on the processor and the shape (bench/RESULTS.md: on an AVX2-only EPYC, MKL
was as fast or faster for the large all-rows products while oneDNN's packed weights won the small
per-step ones; on an AVX-512 EPYC, oneDNN won both, by up to 3x). The choice is made per shape
class: each size rounded up to a bucket (``size_bucket``: powers of two and 1.5 times them), so real
text, whose row counts and lengths change with every batch, meets a few classes, not a new shape
per batch. The first time a class occurs on a machine its first product is timed both ways and the
faster library runs every product of the class from then on, in this process and in later ones:
decisions are kept in a small JSON file per machine beside the compiled kernels
(``~/.cache/sentiment_discovery/matmul``, keyed like them by the CPU's flags and the libraries'
versions; ``$SENTIMENT_DISCOVERY_MATMUL_CACHE`` moves it, ``python -m sentiment_discovery.calibrate
--calibrate`` fills it ahead of time). Within a process equal inputs give bit-identical results; a
process that measured a class itself may choose differently from one that read another's decision,
so ``SENTIMENT_DISCOVERY_MATMUL=mm`` (or ``onednn``) pins the library, e.g. for bit-identical reruns.
``choices()`` lists what this process measured. Other devices and dtypes use ``torch.mm``.

Precision. With ``dtype`` (bfloat16 for ``--bf16``, float16 for ``--fp16`` on a GPU) the operands
are cast to it and the product comes back as float32: the libraries accumulate in float32 and round
their output to ``dtype``, then it is widened; everything around the products (bias, sums, gates,
cell state) stays float32. ``operand_dtype`` reads that dtype from an active ``torch.autocast``, so
``--bf16`` is just the autocast context for the whole model.

A CPU without bfloat16 hardware (no AVX-512-BF16 or AMX) multiplies bfloat16 tensors 5-100x slower
than float32 (an AVX2 EPYC: 0.9-22 GFLOP/s against 80-125). There the same arithmetic is emulated with
the float32 libraries: operands rounded to bfloat16 and widened (a product of two bfloat16 values is
exact in float32), multiplied with float32 accumulation (as the bf16 kernels do), the result rounded
to bfloat16 and widened. Same numbers as a bfloat16 machine up to the order of accumulation; slower
than float32 by the rounding passes (bench/RESULTS.md), and said once in the log.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

BACKEND_ENV = "SENTIMENT_DISCOVERY_MATMUL"
BACKENDS = ("mm", "onednn")
CACHE_ENV = "SENTIMENT_DISCOVERY_CACHE"  # root of the per-machine cache (kernels, decisions)
DECISIONS_ENV = "SENTIMENT_DISCOVERY_MATMUL_CACHE"  # folder of the decisions file alone (tests)
# The decisions file is read whatever it holds: bounded in bytes and entries, parsed as JSON only.
_MAX_DECISIONS_BYTES = 1 << 20
_MAX_DECISIONS = 4096
_MAX_KEY_CHARS = 200

# Calibration rounds (each candidate timed once per round, best kept): 5 below this many FLOPs, 2 above.
_SMALL_PRODUCT_FLOPS = 2e9
_ROUNDS_SMALL, _ROUNDS_LARGE = 5, 2


@dataclass
class Choice:
    """One product class calibrated in this process: GFLOP/s measured per library and the one chosen."""

    kind: str  # "linear" (a @ w.T, all rows at once) or "step" (a weight reused at every step)
    name: str  # what the product computes, as its first caller named it
    shape: str  # "M x K @ K x N", and how the operands lie in memory (N: as written, T: transposed)
    dtype: torch.dtype
    gflops: dict[str, float]
    chosen: str


_choices: dict[str, Choice] = {}
_said: set[str] = set()


def say_once(message: str) -> None:
    """Print ``message`` to stderr the first time it comes up in this process."""
    if message not in _said:
        _said.add(message)
        print(f"note: {message}", file=sys.stderr)


def choices() -> list[Choice]:
    """The product classes calibrated (timed) in this process so far, in order."""
    return list(_choices.values())


# --------------------------------------------------------------------------------------------
# Decisions: per shape class, kept on disk per machine
# --------------------------------------------------------------------------------------------


def size_bucket(n: int) -> int:
    """``n`` rounded up to the next of 1, 2, 3, 4, 6, 8, 12, 16, 24, ... (powers of two and 1.5 times
    them): the sizes of one bucket differ by at most 1.5x, and a library's speed with them."""
    if n <= 2:
        return max(n, 1)
    power = 1 << (n - 1).bit_length()  # smallest power of two >= n
    return power * 3 // 4 if n <= power * 3 // 4 else power


def _cpuinfo_line(*prefixes: str) -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(prefixes):
                return line
    except OSError:
        pass
    return platform.processor()


def cpu_flags() -> str:
    """The CPU's feature flags as /proc/cpuinfo gives them: part of every cache key."""
    return _cpuinfo_line("flags", "Features")


def cache_root() -> Path:
    """``~/.cache/sentiment_discovery`` (``$SENTIMENT_DISCOVERY_CACHE`` moves it)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "sentiment_discovery")


@functools.cache
def _machine_key() -> str:
    # torch's build summary names its MKL and oneDNN versions; the flags say what the CPU can run.
    text = "\0".join([torch.__version__, torch.__config__.show(), cpu_flags(), _cpuinfo_line("model name")])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def decisions_path() -> Path:
    """The file of this machine's decisions."""
    folder = os.environ.get(DECISIONS_ENV) or cache_root() / "matmul"
    return Path(folder) / f"decisions-{_machine_key()}.json"


def _read_decisions(path: Path) -> dict[str, dict]:
    """The decisions in ``path``, checked entry by entry; a missing file is empty, a damaged one is
    ignored with a note (and replaced at the next write)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(_MAX_DECISIONS_BYTES + 1)
    except FileNotFoundError:
        return {}
    except OSError as error:
        say_once(f"ignoring the matmul decisions file {path}: {error}")
        return {}
    try:
        if len(raw) > _MAX_DECISIONS_BYTES:
            raise ValueError(f"larger than {_MAX_DECISIONS_BYTES} bytes")
        data = json.loads(raw.decode("utf-8"))
        entries = data.get("decisions") if isinstance(data, dict) else None
        if not isinstance(entries, dict):
            raise ValueError("no 'decisions' object")
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        say_once(f"ignoring the damaged matmul decisions file {path} ({str(error)[:100]}); "
                 "it will be rewritten")
        return {}
    decisions = {}
    for key, entry in list(entries.items())[:_MAX_DECISIONS]:
        if len(key) > _MAX_KEY_CHARS or not isinstance(entry, dict) or entry.get("chosen") not in BACKENDS:
            continue
        gflops = entry.get("gflops")
        if not (isinstance(gflops, dict) and all(
            b in BACKENDS and isinstance(g, (int, float)) and math.isfinite(g) for b, g in gflops.items()
        )):
            gflops = {}
        decisions[key] = {"chosen": entry["chosen"], "gflops": gflops}
    return decisions


def _write_decisions(path: Path, new: dict[str, dict]) -> None:
    """Add ``new`` to the file: read it again (another process may have added some), write the union
    to a file of our own, rename it over the old one (readers see the old file or the new, never half
    of one). Two processes writing at once can drop each other's newest entries, to be measured again."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        merged = {**_read_decisions(path), **new}
        if len(merged) > _MAX_DECISIONS:  # keep the newest (ours are last)
            merged = dict(list(merged.items())[-_MAX_DECISIONS:])
        text = json.dumps({"format": "sentiment_discovery matmul decisions", "version": 1,
                           "torch": torch.__version__, "decisions": merged}, indent=0, sort_keys=False)
        fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    except OSError as error:  # a read-only home: decisions then live as long as the process
        say_once(f"could not save matmul decisions to {path}: {error}")


class _Decisions:
    """The decisions of one file: read once, then kept in memory with this process's own."""

    def __init__(self, path: Path):
        self.path = path
        self.chosen = {key: entry["chosen"] for key, entry in _read_decisions(path).items()}

    def record(self, key: str, chosen: str, gflops: dict[str, float]) -> None:
        self.chosen[key] = chosen
        rounded = {b: round(g, 2) for b, g in gflops.items()}
        _write_decisions(self.path, {key: {"chosen": chosen, "gflops": rounded}})


_loaded: _Decisions | None = None


def _decisions() -> _Decisions:
    """This machine's decisions (read again when the file's place changes, as tests move it)."""
    global _loaded
    path = decisions_path()
    if _loaded is None or _loaded.path != path:
        _loaded = _Decisions(path)
    return _loaded


def decisions() -> dict[str, str]:
    """Shape class -> library, as this process will run it (read from disk or measured here)."""
    return dict(_decisions().chosen)


# --------------------------------------------------------------------------------------------
# Precision
# --------------------------------------------------------------------------------------------


@functools.cache
def _native_bf16(device_type: str) -> bool:
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device_type == "cpu" and torch.backends.mkldnn.is_available() and bool(
        torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 products run in hardware here (CPU: oneDNN's bf16 kernels, AVX-512-BF16/AMX)."""
    return _native_bf16(device.type)


def emulates_bf16(dtype: torch.dtype | None, device: torch.device) -> bool:
    """Whether products in ``dtype`` on ``device`` are bfloat16 emulated in float32 (a CPU without
    bfloat16 hardware; see the module's docstring)."""
    return dtype is torch.bfloat16 and device.type == "cpu" and not _native_bf16("cpu")


def round_bf16(t: Tensor) -> Tensor:
    """``t`` rounded to the nearest bfloat16 values, as float32."""
    return t.to(torch.bfloat16).float()


def reduced_dtype(device: torch.device, fp16: bool = False, bf16: bool = False) -> torch.dtype | None:
    """The operand dtype of ``--fp16``/``--bf16`` on ``device`` (None: float32).

    ``--fp16`` means float16 on a GPU; a CPU has no fast float16 products, so there it runs as
    ``--bf16`` (and says so once). A CPU without native bfloat16 emulates bfloat16 products with the
    float32 libraries (said once too).
    """
    if fp16 and bf16:
        raise ValueError("--fp16 and --bf16 both given: choose one")
    if not (fp16 or bf16):
        return None
    if fp16 and device.type == "cuda":
        return torch.float16
    if fp16:
        say_once("--fp16 on a CPU runs as --bf16 (bfloat16 products; float16 needs a GPU)")
    if device.type == "cpu" and not native_bf16(device):
        say_once(
            "this CPU has no native bfloat16 (AVX-512-BF16 or AMX): bfloat16 products are emulated (operands "
            "and results rounded to bfloat16, multiplied in float32): same results, slower than float32"
        )
    return torch.bfloat16


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The context of a reduced-precision run: autocast to ``dtype`` on ``device``; none for float32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def operand_dtype(device_type: str) -> torch.dtype | None:
    """The dtype of an active ``torch.autocast`` on ``device_type``, else None (float32 operands)."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _low(t: Tensor, dtype: torch.dtype | None) -> Tensor:
    return t if dtype is None else t.to(dtype)


# --------------------------------------------------------------------------------------------
# Choosing the library
# --------------------------------------------------------------------------------------------


def _onednn_runs(t: Tensor) -> bool:
    """oneDNN is a candidate: CPU float32, or CPU bfloat16 with native support (it refuses otherwise)."""
    if t.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return False
    return t.dtype == torch.float32 or (t.dtype == torch.bfloat16 and native_bf16(t.device))


def _candidates(t: Tensor) -> tuple[str, ...]:
    if not _onednn_runs(t):
        return ("mm",)
    forced = os.environ.get(BACKEND_ENV, "auto")
    if forced in BACKENDS:
        return (forced,)
    if forced != "auto":
        raise ValueError(f"{BACKEND_ENV}={forced!r}: choose auto, mm or onednn")
    return BACKENDS


def best_seconds_in_turns(runs: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Best time of each run: one untimed call each (a library's first call of a shape includes its
    setup, e.g. oneDNN's JIT), then ``rounds`` rounds in which every run is timed once, in turn, so that
    a slow spell of a shared machine falls on all of them. Results are dropped as they come: at full
    scale a product's output is gigabytes."""
    for run in runs.values():
        run()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def _calibrate(
    key: str, kind: str, name: str, shape: str, flops: float, runs: dict[str, Callable[[], Tensor]],
    dtype: torch.dtype,
) -> tuple[str, Tensor]:
    """Time every candidate (``best_seconds_in_turns``), remember the fastest for the class ``key``
    (here and on disk); returns it and its result (one more call of it)."""
    best = best_seconds_in_turns(runs, _ROUNDS_SMALL if flops < _SMALL_PRODUCT_FLOPS else _ROUNDS_LARGE)
    chosen = min(best, key=best.__getitem__)
    gflops = {backend: flops / max(seconds, 1e-9) / 1e9 for backend, seconds in best.items()}
    _choices[key] = Choice(kind, name, shape, dtype, gflops, chosen)
    _decisions().record(key, chosen, gflops)
    return chosen, runs[chosen]()


def _class_key(kind: str, dtype: torch.dtype, sizes: Sequence[int], layout: str, bias: bool) -> str:
    """The shape class of a product: sizes rounded up to buckets, plus what else sets its speed."""
    buckets = "x".join(str(size_bucket(n)) for n in sizes)
    return (f"{kind} {str(dtype).removeprefix('torch.')} {buckets} {layout}"
            f"{' bias' if bias else ''} threads={torch.get_num_threads()}")


# --------------------------------------------------------------------------------------------
# Products
# --------------------------------------------------------------------------------------------


def _linear_by(backend: str, a: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``a @ weight.T (+ bias)`` through one library; a reduced-precision result is widened and the
    bias added in float32."""
    reduced = a.dtype in (torch.bfloat16, torch.float16)
    if backend == "onednn":
        out = torch.ops.mkldnn._linear_pointwise(a, weight, None if reduced else bias, "none", [], "")
    elif bias is not None and not reduced:
        out = torch.addmm(bias, a, weight.t())
    else:
        out = torch.mm(a, weight.t())
    if reduced:
        out = out.float()
        if bias is not None:
            out.add_(bias)
    return out


def linear(
    a: Tensor, weight: Tensor, bias: Tensor | None = None, dtype: torch.dtype | None = None, name: str = ""
) -> Tensor:
    """``a [M, K] @ weight[N, K].T (+ bias)``, float32 (float64 stays float64), operands cast to ``dtype``.

    Strided operands (``dz.t()``) are fine: the weight gradients are written ``linear(dz.t(), x.t())``.
    """
    if emulates_bf16(dtype, a.device):
        with torch.autocast("cpu", enabled=False):  # else autocast would hand torch.mm bfloat16 tensors
            out = round_bf16(linear(round_bf16(a), round_bf16(weight), None, None, name))
        return out if bias is None else out.add_(bias)
    a, weight = _low(a, dtype), _low(weight, dtype)
    names = _candidates(a)
    if len(names) == 1:
        return _linear_by(names[0], a, weight, bias)
    (M, K), N = a.shape, weight.shape[0]
    layout = ("N" if a.is_contiguous() else "T") + ("T" if weight.is_contiguous() else "N")
    key = _class_key("linear", a.dtype, (M, K, N), layout, bias is not None)
    chosen = _decisions().chosen.get(key)
    if chosen is not None:
        return _linear_by(chosen, a, weight, bias)
    runs = {b: (lambda b=b: _linear_by(b, a, weight, bias)) for b in names}
    return _calibrate(key, "linear", name, f"{M}x{K} @ {K}x{N} ({layout})", 2.0 * M * K * N, runs, a.dtype)[1]


class StepWeight:
    """``a [B, K] -> a @ weight.T (+ bias)`` (float32) for a weight ``[N, K]`` reused at every step of a
    sequence. A bias is added in float32 (by the library, for float32 operands).

    The weight is cast to ``dtype`` once, and (with ``lay_out``, where it is chosen) laid out once in
    oneDNN's blocked format for this batch size (``torch.ops.mkldnn._reorder_linear_weight``, as
    inductor does for frozen linears). The choice between that and ``torch.mm`` is made per shape
    class (timed once per machine on a stand-in row block), before any real product, so every step
    of a run uses one library.
    """

    def __init__(
        self,
        weight: Tensor,
        batch: int,
        dtype: torch.dtype | None = None,
        lay_out: bool = True,
        name: str = "",
        bias: Tensor | None = None,
    ):
        self.bias = bias
        self.emulated = emulates_bf16(dtype, weight.device)
        if self.emulated:
            weight, dtype = round_bf16(weight), None
        self.dtype = dtype
        weight = _low(weight, dtype)
        names = _candidates(weight) if lay_out else ("mm",)
        self.backend = names[0]
        if len(names) > 1:
            with torch.autocast("cpu", enabled=False) if self.emulated else contextlib.nullcontext():
                self.backend = self._choose(weight, batch, name)
        # what _linear_by multiplies by: oneDNN's blocked layout, or the [N, K] weight itself
        if self.backend == "onednn":
            weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), batch)
        self.weight = weight

    @staticmethod
    def _choose(weight: Tensor, batch: int, name: str) -> str:
        N, K = weight.shape
        layout = "N" + ("T" if weight.is_contiguous() else "N")
        key = _class_key("step", weight.dtype, (batch, K, N), layout, False)
        chosen = _decisions().chosen.get(key)
        if chosen is None:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), batch)
            a = weight.new_full((batch, K), 0.5)
            runs = {
                "mm": lambda: _linear_by("mm", a, weight, None),
                "onednn": lambda: _linear_by("onednn", a, packed, None),
            }
            shape = f"{batch}x{K} @ {K}x{N} ({layout})"
            chosen = _calibrate(key, "step", name, shape, 2.0 * batch * K * N, runs, weight.dtype)[0]
        return chosen

    def __call__(self, a: Tensor) -> Tensor:
        if not self.emulated:
            return _linear_by(self.backend, _low(a, self.dtype), self.weight, self.bias)
        with torch.autocast("cpu", enabled=False):
            out = round_bf16(_linear_by(self.backend, round_bf16(a), self.weight, None))
        return out if self.bias is None else out.add_(self.bias)


class _Linear(torch.autograd.Function):
    """``x [..., K] @ weight.T + bias`` through ``linear``, forward and backward (the decoder)."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        ctx.save_for_backward(x, weight)
        ctx.dtype, ctx.has_bias = dtype, bias is not None
        out = linear(x.reshape(-1, x.shape[-1]), weight, bias, dtype, "decoder")
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out):
        x, weight = ctx.saved_tensors
        dy = _low(d_out.reshape(-1, d_out.shape[-1]), ctx.dtype)  # cast once for both products
        need = ctx.needs_input_grad
        dx = dw = db = None
        if need[0]:
            dx = linear(dy, weight.t(), None, ctx.dtype, "decoder: input gradient").view_as(x)
        if need[1]:
            dw = linear(dy.t(), x.reshape(-1, x.shape[-1]).t(), None, ctx.dtype, "decoder: weight gradient")
        if need[2] and ctx.has_bias:
            db = d_out.reshape(-1, d_out.shape[-1]).sum(0)
        return dx, dw, db, None


def linear_layer(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear`` with its products (forward and backward) through ``linear``, in the autocast's
    operand dtype if one is active; the result is float32."""
    return _Linear.apply(x, weight, bias, operand_dtype(x.device.type))
