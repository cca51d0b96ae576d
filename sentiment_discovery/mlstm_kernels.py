"""Fused mLSTM recurrence: one layer over a whole sequence, forward and hand-written backward.

The math is that of ``recurrent.mlstm_step`` (docs/formats.md), gate order i, f, g, o. Each step does two
dependent products: ``hm = h @ w_mhh.T``, then, with ``m = hm * (x_t @ w_mih.T)``, the gates'
pre-activations ``z = [x_t, m] @ [w_ih, w_hh].T + bias``: the input's share of the gates rides along
in the step's product (K = E + H instead of H) rather than being a separate product over all T steps,
whose [T, B, 4H] output costs more in memory traffic than its FLOPs (bench/RESULTS.md). What is done
once per sequence instead of once per step:

- the m-side input projection of all T steps, ``x @ w_mih.T``, in one product;
- the weights are cast and laid out for the per-step products once (``matmul.StepWeight``: on CPU,
  oneDNN's blocked layout for a fixed batch where that measures faster than ``torch.mm``);
- in training, the weight gradients are three large products over all T*B rows after the backward
  recurrence (``[w_ih, w_hh]`` in one, against the saved ``[x_t, m]`` rows), which itself only does
  the two per-step products it must (``dz @ w_hh`` and ``dhm @ w_mhh``).

Every product goes through ``matmul`` (the faster of MKL and oneDNN on CPU, per shape). Between the
products, the element-wise work of a float32 CPU step (gates, cell update, and their derivatives) is
one pass of the C++ kernels in ``csrc/mlstm_cpu.cpp`` (``native``); elsewhere (GPU, float64, no
compiler) it is the same math as PyTorch calls. Under a reduced-precision autocast (``--bf16``;
``--fp16`` on a GPU) the products take bfloat16/float16 operands and give float32; the gates, cell
state and all sums stay float32.

Inference (no gradient needed) runs the same loop without saving anything for backward.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from . import matmul, native
from .matmul import StepWeight

State = tuple[Tensor, Tensor]


# Laying a weight out for oneDNN costs about one small-batch product; below this many steps, skip it.
_MIN_STEPS_TO_PACK = 8


def _keep_mask(reset: Tensor | None, like: Tensor) -> tuple[Tensor | None, frozenset[int]]:
    """``[T, B, 1]`` float mask (0 where a row resets) and the steps where any row resets."""
    if reset is None:
        return None, frozenset()
    steps = frozenset(torch.nonzero(reset.any(dim=1)).flatten().tolist())
    if not steps:
        return None, steps
    return (~reset).to(like.dtype).unsqueeze(2), steps


# Step weights laid out for a batch size, kept for reuse inside ``reuse_step_weights`` (per thread).
_reuse = threading.local()
# What the kept layouts may hold at most (bytes of the weights they were made from): H=1024's layouts for
# every row count of a featurize call fit; at H=4096 the first ones do and the rest are laid out per call.
REUSE_MAX_BYTES = 512 << 20


@contextlib.contextmanager
def reuse_step_weights() -> Iterator[None]:
    """Within it, inference reuses the step weights laid out for a batch size (``StepWeight``: the
    joined ``[w_ih, w_hh]``, oneDNN's blocked layout) across calls on the same weights, instead of laying
    them out again for every call. ``featurize`` runs many chunks of a few row counts: laying out per
    chunk cost it several percent (bench/RESULTS.md, issue 20). Kept layouts are bounded by
    ``REUSE_MAX_BYTES`` and dropped on leaving; weights changed in place are laid out again."""
    outer = getattr(_reuse, "kept", None)
    if outer is None:
        _reuse.kept, _reuse.nbytes = {}, 0
    try:
        yield
    finally:
        if outer is None:
            _reuse.kept, _reuse.nbytes = None, 0


def _step_weights(
    w_ih: Tensor, w_hh: Tensor, w_mhh: Tensor, bias: Tensor, batch: int, dtype: torch.dtype | None, pack: bool
) -> tuple[StepWeight, Callable[[Tensor], Tensor]]:
    """The two per-step products laid out for ``batch`` rows: ``h @ w_mhh.T`` and the gates' ``[x, m] @
    [w_ih, w_hh].T + bias``; reused from ``reuse_step_weights`` where it holds them."""
    kept = getattr(_reuse, "kept", None)
    if kept is None or torch.is_grad_enabled():
        return _lay_out_step_weights(w_ih, w_hh, w_mhh, bias, batch, dtype, pack)
    weights = (w_ih, w_hh, w_mhh, bias)
    key = (*(id(w) for w in weights), batch, dtype, pack)
    entry = kept.get(key)
    # the entry holds the tensors themselves, so their ids cannot be reused by others while it is kept
    if entry is not None and all(a is b and _version(a) == v for a, b, v in zip(entry[0], weights, entry[1])):
        return entry[2]
    made = _lay_out_step_weights(w_ih, w_hh, w_mhh, bias, batch, dtype, pack)
    nbytes = sum(w.numel() * w.element_size() for w in weights if w is not None)
    if _reuse.nbytes + nbytes <= REUSE_MAX_BYTES:
        kept[key] = (weights, tuple(_version(w) for w in weights), made)
        _reuse.nbytes += nbytes
    return made


def _version(t: Tensor | None) -> int:
    """In-place changes so far; inference tensors (made under inference_mode, as featurize's weight-normed
    weights are) keep no count, and cannot be changed outside inference_mode."""
    return -1 if t is None or t.is_inference() else t._version


def _lay_out_step_weights(
    w_ih: Tensor, w_hh: Tensor, w_mhh: Tensor, bias: Tensor, batch: int, dtype: torch.dtype | None, pack: bool
) -> tuple[StepWeight, Callable[[Tensor], Tensor]]:
    B, E = batch, w_ih.shape[1]
    times_w_mhh = StepWeight(w_mhh, B, dtype, pack, "step: h @ w_mhh.T")
    if pack:
        w_gates = torch.cat([w_ih, w_hh], 1)
        gates_of = StepWeight(w_gates, B, dtype, True, "step: [x, m] @ [w_ih, w_hh].T", bias)
    else:  # a few steps (sampling: one): joining the weights would cost more than the steps themselves
        x_share = StepWeight(w_ih, B, dtype, False, bias=bias)
        m_share = StepWeight(w_hh, B, dtype, False)
        gates_of = lambda rows: x_share(rows[:, :E]).add_(m_share(rows[:, E:]))
    return times_w_mhh, gates_of


def _prepare(
    x: Tensor, w_ih: Tensor, w_hh: Tensor, w_mih: Tensor, w_mhh: Tensor, bias: Tensor,
    dtype: torch.dtype | None, steps_kept: int,
) -> tuple[Tensor, Tensor, StepWeight, Callable[[Tensor], Tensor]]:
    """Once per sequence: ``xm`` [steps_kept, B, E + H], rows ``[x_t, m_t]`` (x written here, m by the
    loop; training keeps every step's, inference one), ``mx = x @ w_mih.T`` [T, B, H] (float32), and
    the two per-step products laid out for the batch."""
    T, B, E = x.shape
    H = w_mhh.shape[0]
    mx = matmul.linear(x.reshape(T * B, E), w_mih, None, dtype, "input projection: x @ w_mih").view(T, B, H)
    xm = x.new_empty(steps_kept, B, E + H)
    if steps_kept == T:
        xm[..., :E] = x
    times_w_mhh, gates_of = _step_weights(w_ih, w_hh, w_mhh, bias, B, dtype, T >= _MIN_STEPS_TO_PACK)
    return xm, mx, times_w_mhh, gates_of


def _activate_(z: Tensor, H: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """In place on pre-activations ``z`` [B, 4H]: sigmoid of the i, f, o gates and ``sigmoid(2g)``.

    ``tanh(g) = 2 * sigmoid(2g) - 1`` is left to the caller: one sigmoid over all four gates beats a
    separate tanh, which on CPU is ~15x slower than torch's sigmoid (bench/RESULTS.md).
    """
    g = z[:, 2 * H : 3 * H]
    g.mul_(2)
    z.sigmoid_()
    return z[:, :H], z[:, H : 2 * H], g, z[:, 3 * H :]


def _step_kernels(x: Tensor):
    """The C++ step kernels where they apply (float32 on CPU, compiled), else None."""
    return native.ops() if x.dtype == torch.float32 and x.device.type == "cpu" else None


def _tanh_into(x: Tensor, out: Tensor) -> Tensor:
    """``out = tanh(x)``, computed as ``2 * sigmoid(2x) - 1`` (see ``_activate_``); the two differ by
    float32 rounding (~1e-7 absolute)."""
    return torch.mul(x, 2, out=out).sigmoid_().mul_(2).sub_(1)


def mlstm_inference(
    x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, w_mih: Tensor, w_mhh: Tensor, bias: Tensor,
    reset: Tensor | None = None, return_cells: bool = False, dtype: torch.dtype | None = None,
) -> tuple[Tensor, State, Tensor | None]:
    """No-autograd forward; call under ``torch.no_grad()``. Returns (out, (h, c), cells or None).

    ``dtype``: operand dtype of the matrix products (None: that of ``x``)."""
    T, B, E = x.shape
    H = w_mhh.shape[0]
    keep, reset_steps = _keep_mask(reset, x)
    xm, mx, times_w_mhh, gates_of = _prepare(x, w_ih, w_hh, w_mih, w_mhh, bias, dtype, steps_kept=1)
    xm = xm[0]  # [x_t, m_t] of the current step
    out = x.new_empty(T, B, H)
    cells = x.new_empty(T, B, H) if return_cells else None
    kernels = _step_kernels(x)
    h = h0
    c = c0.contiguous() if return_cells else c0.clone()  # without return_cells, c is updated in place
    for t in range(T):
        if t in reset_steps:
            h = h * keep[t]
            c = c * keep[t] if return_cells else c.mul_(keep[t])
        xm[:, :E] = x[t]
        torch.mul(times_w_mhh(h), mx[t], out=xm[:, E:])
        z = gates_of(xm)
        if kernels is not None:
            c_out = cells[t] if return_cells else c
            kernels.mlstm_forward_step(z, c, c_out, None, out[t])
            h, c = out[t], c_out
            continue
        i, f, g2, o = _activate_(z, H)  # g2 = sigmoid(2g)
        # c' = f * c + i * tanh(g) = f * c + 2 * i * g2 - i
        c = torch.mul(f, c, out=cells[t]) if return_cells else c.mul_(f)
        c.addcmul_(i, g2, value=2).sub_(i)
        h = _tanh_into(c, out[t]).mul_(o)
    return out, (h, c), cells


class _MLSTMFunction(torch.autograd.Function):
    """(x, h0, c0, weights..., reset, dtype) -> (out [T, B, H], cells [T, B, H]) with a hand-written
    backward; ``dtype`` is the operand dtype of the products (None: float32)."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, w_mih, w_mhh, bias, reset, dtype):
        ctx.set_materialize_grads(False)
        T, B, E = x.shape
        H = w_mhh.shape[0]
        keep, reset_steps = _keep_mask(reset, x)
        xm, mx, times_w_mhh, gates_of = _prepare(x, w_ih, w_hh, w_mih, w_mhh, bias, dtype, steps_kept=T)
        out = x.new_empty(T, B, H)
        cells = x.new_empty(T, B, H)
        tanh_cells = x.new_empty(T, B, H)
        hms = []  # h @ w_mhh.T per step
        gates = []  # activated gates per step: i, f, tanh(g), o
        kernels = _step_kernels(x)
        h, c = h0, c0.contiguous()
        for t in range(T):
            if t in reset_steps:
                h, c = h * keep[t], c * keep[t]
            hm = times_w_mhh(h)
            hms.append(hm)
            torch.mul(hm, mx[t], out=xm[t, :, E:])
            z = gates_of(xm[t])
            gates.append(z)
            if kernels is not None:  # activates the gates in z, as the lines below do
                kernels.mlstm_forward_step(z, c, cells[t], tanh_cells[t], out[t])
                h, c = out[t], cells[t]
                continue
            i, f, g, o = _activate_(z, H)
            g.mul_(2).sub_(1)  # tanh(g), kept for backward
            c = torch.mul(f, c, out=cells[t]).addcmul_(i, g)
            h = torch.mul(_tanh_into(c, tanh_cells[t]), o, out=out[t])
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, w_mih, w_mhh, out, cells)
        ctx.intermediates = (gates, xm, mx, hms, tanh_cells, keep, reset_steps)
        ctx.dtype = dtype
        return out, cells

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, d_cells):
        x, h0, c0, w_ih, w_hh, w_mih, w_mhh, out, cells = ctx.saved_tensors
        gates, xm, mx, hms, tanh_cells, keep, reset_steps = ctx.intermediates
        T, B, E = x.shape
        H = w_mhh.shape[0]
        kernels = _step_kernels(x)
        dz = x.new_empty(T, B, 4 * H)
        dmx = x.new_empty(T, B, H)
        dhm = x.new_empty(T, B, H)
        dtype = ctx.dtype
        pack = T >= _MIN_STEPS_TO_PACK
        w_hh_t = StepWeight(w_hh.t(), B, dtype, pack, "backward step: dz @ w_hh")
        w_mhh_t = StepWeight(w_mhh.t(), B, dtype, pack, "backward step: dhm @ w_mhh")
        dh = x.new_zeros(B, H)
        dc = x.new_zeros(B, H)
        c0 = c0.contiguous()
        if kernels is not None:
            # the kernel reads rows: a gradient autograd hands over expanded (out.sum()) is copied once
            d_out = d_out.contiguous() if d_out is not None else None
            d_cells = d_cells.contiguous() if d_cells is not None else None
        else:
            dtanh = torch.rsub(tanh_cells * tanh_cells, 1)  # 1 - tanh(c)^2, all steps at once
            ones = x.new_ones(B, H)
            d_act = x.new_empty(B, 4 * H)  # local derivatives of the activations at one step
        for t in range(T - 1, -1, -1):
            g_t = gates[t]
            c_prev = cells[t - 1] if t > 0 else c0
            if t in reset_steps:
                c_prev = c_prev * keep[t]
            dz_t = dz[t]
            if kernels is not None:
                # dz[t] from dh (+ d_out[t]) and dc (+ d_cells[t]); dc becomes dc * f in place
                d_out_t = None if d_out is None else d_out[t]
                d_cells_t = None if d_cells is None else d_cells[t]
                kernels.mlstm_backward_step(g_t, dh, d_out_t, d_cells_t, dc, c_prev, tanh_cells[t], dz_t)
            else:
                if d_out is not None:
                    dh = dh + d_out[t]
                dc = torch.addcmul(dc, dh * g_t[:, 3 * H :], dtanh[t])  # dh -> dc through h = o * tanh(c)
                if d_cells is not None:
                    dc.add_(d_cells[t])
                # s(1 - s) for the sigmoid gates, 1 - tanh^2 for g.
                torch.addcmul(g_t, g_t, g_t, value=-1, out=d_act)
                g_tanh = g_t[:, 2 * H : 3 * H]
                torch.addcmul(ones, g_tanh, g_tanh, value=-1, out=d_act[:, 2 * H : 3 * H])
                torch.mul(dc, g_tanh, out=dz_t[:, :H])
                torch.mul(dc, c_prev, out=dz_t[:, H : 2 * H])
                torch.mul(dc, g_t[:, :H], out=dz_t[:, 2 * H : 3 * H])
                torch.mul(dh, tanh_cells[t], out=dz_t[:, 3 * H :])
                dz_t.mul_(d_act)
                dc = dc * g_t[:, H : 2 * H]
            dm = w_hh_t(dz_t)
            torch.mul(dm, hms[t], out=dmx[t])
            torch.mul(dm, mx[t], out=dhm[t])
            dh = w_mhh_t(dhm[t])
            if t in reset_steps:
                dh.mul_(keep[t])
                dc.mul_(keep[t])
        # Weight gradients: one product over all T*B rows each, written as linear(a.t(), b.t()) = a.T @ b;
        # reduced-precision operands are cast once here (matmul.linear leaves them as they are).
        low = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))
        dz2 = low(dz.view(T * B, 4 * H))
        dmx2 = low(dmx.view(T * B, H))
        need = ctx.needs_input_grad
        dx = dw_ih = dw_hh = dw_mih = dw_mhh = dbias = None
        if need[0]:
            dx = matmul.linear(dz2, w_ih.t(), None, dtype, "input gradient: dz @ w_ih")
            dx.add_(matmul.linear(dmx2, w_mih.t(), None, dtype, "input gradient: dmx @ w_mih"))
            dx = dx.view(T, B, E)
        if need[3] or need[4]:  # [w_ih, w_hh] in one product against the [x_t, m_t] rows
            dw_gates = matmul.linear(dz2.t(), low(xm.view(T * B, E + H)).t(), None, dtype,
                                     "weight gradient: [w_ih, w_hh]")
            dw_ih, dw_hh = dw_gates[:, :E], dw_gates[:, E:]
        if need[5]:
            x2 = low(x.reshape(T * B, E))
            dw_mih = matmul.linear(dmx2.t(), x2.t(), None, dtype, "weight gradient: w_mih")
        if need[6]:
            h_prev = torch.cat([h0.unsqueeze(0), out[:-1]])
            if keep is not None:
                h_prev.mul_(keep)
            dhm2, h_prev2 = low(dhm.view(T * B, H)), low(h_prev.view(T * B, H))
            dw_mhh = matmul.linear(dhm2.t(), h_prev2.t(), None, dtype, "weight gradient: w_mhh")
        if need[7]:
            dbias = dz.view(T * B, 4 * H).sum(0)
        return dx, dh, dc, dw_ih, dw_hh, dw_mih, dw_mhh, dbias, None, None


def mlstm_sequence(
    x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, w_mih: Tensor, w_mhh: Tensor, bias: Tensor,
    reset: Tensor | None = None, return_cells: bool = False,
) -> tuple[Tensor, State, Tensor | None]:
    """One mLSTM layer over ``x [T, B, E]``: (out [T, B, H], (h, c), cells [T, B, H] or None).

    Differentiable (custom backward) when grad mode is on and anything requires grad; otherwise the
    lean inference loop. Under ``torch.autocast`` the products take the autocast's dtype as operands.
    """
    tensors = (x, h0, c0, w_ih, w_hh, w_mih, w_mhh, bias)
    dtype = matmul.operand_dtype(x.device.type)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        out, cells = _MLSTMFunction.apply(*tensors, reset, dtype)
        return out, (out[-1], cells[-1]), (cells if return_cells else None)
    with torch.no_grad():
        return mlstm_inference(*tensors, reset, return_cells, dtype)
