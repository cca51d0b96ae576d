"""Fused mLSTM recurrence: one layer over a whole sequence, forward and hand-written backward.

The math is that of ``recurrent.mlstm_step`` (formats.md), gate order i, f, g, o. What is done once
per sequence instead of once per step:

- the input projections of all T steps, ``x @ [w_ih; w_mih].T + [bias; 0]``, in one matrix product;
- the recurrent weights are laid out for the per-step products once (on CPU float32: oneDNN's
  blocked layout for a fixed batch, ``torch.ops.mkldnn._reorder_linear_weight``, which runs the
  small-batch products about 1.45x faster than ``torch.mm`` on the machine of bench/RESULTS.md);
- in training, the weight gradients are four large products over all T*B rows after the backward
  recurrence, which itself only does the two per-step products it must (``dz @ w_hh`` and
  ``dhm @ w_mhh``) and in-place elementwise work on preallocated [T, B, *] buffers.

Inference (no gradient needed) runs the same loop without saving anything for backward.
Everything falls back to ``torch.mm`` for other devices and dtypes (CUDA, float64 for gradcheck).
"""

from __future__ import annotations

import torch
from torch import Tensor

State = tuple[Tensor, Tensor]


def _use_onednn(like: Tensor) -> bool:
    return (
        like.device.type == "cpu"
        and like.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


# Laying a weight out for oneDNN costs about one small-batch product; below this many steps, skip it.
_MIN_STEPS_TO_PACK = 8


class _RowsTimesWeightT:
    """``a [B, K] -> a @ weight.T`` for a weight ``[N, K]`` reused at every step of a sequence.

    On CPU float32 (with ``pack``) the weight is laid out once in oneDNN's blocked format for this
    batch size (``torch.ops.mkldnn._reorder_linear_weight``, as inductor does for frozen linears):
    small-batch products then run ~1.45x faster than ``torch.mm`` (bench/RESULTS.md).
    """

    def __init__(self, weight: Tensor, batch: int, pack: bool = True):
        self.onednn = pack and _use_onednn(weight)
        if self.onednn:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), batch)
        else:
            self.weight_t = weight.t()

    def __call__(self, a: Tensor) -> Tensor:
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise(a, self.packed, None, "none", [], "")
        return torch.mm(a, self.weight_t)


def _capturing(like: Tensor) -> bool:
    """True while a CUDA graph is being captured (cuda_graphs.py): nothing may be read back then."""
    return like.is_cuda and torch.cuda.is_current_stream_capturing()


def _keep_mask(reset: Tensor | None, like: Tensor) -> tuple[Tensor | None, frozenset[int]]:
    """``[T, B, 1]`` float mask (0 where a row resets) and the steps where any row resets."""
    if reset is None:
        return None, frozenset()
    if _capturing(like):  # the reset steps of later replays are unknown: apply the mask at every step
        return (~reset).to(like.dtype).unsqueeze(2), frozenset(range(reset.shape[0]))
    steps = frozenset(torch.nonzero(reset.any(dim=1)).flatten().tolist())
    if not steps:
        return None, steps
    return (~reset).to(like.dtype).unsqueeze(2), steps


def _prepare(
    x: Tensor, w_ih: Tensor, w_hh: Tensor, w_mih: Tensor, w_mhh: Tensor, bias: Tensor
) -> tuple[Tensor, Tensor, _RowsTimesWeightT, _RowsTimesWeightT]:
    """Once per sequence: the input projections of all T steps in one product, ``z_x`` [T, B, 4H] and
    ``m_x`` [T, B, H], and the two recurrent products laid out for the batch."""
    T, B, E = x.shape
    H = w_mhh.shape[0]
    proj = torch.addmm(
        torch.cat([bias, bias.new_zeros(H)]), x.reshape(T * B, E), torch.cat([w_ih, w_mih]).t()
    ).view(T, B, 5 * H)
    pack = T >= _MIN_STEPS_TO_PACK
    times_w_mhh, times_w_hh = _RowsTimesWeightT(w_mhh, B, pack), _RowsTimesWeightT(w_hh, B, pack)
    return proj[..., : 4 * H], proj[..., 4 * H :], times_w_mhh, times_w_hh


def _activate_(z: Tensor, H: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """In place on pre-activations ``z`` [B, 4H]: sigmoid of the i, f, o gates and ``sigmoid(2g)``.

    ``tanh(g) = 2 * sigmoid(2g) - 1`` is left to the caller: one sigmoid over all four gates beats a
    separate tanh, which on CPU is ~15x slower than torch's sigmoid (bench/RESULTS.md).
    """
    g = z[:, 2 * H : 3 * H]
    g.mul_(2)
    z.sigmoid_()
    return z[:, :H], z[:, H : 2 * H], g, z[:, 3 * H :]


def _tanh_into(x: Tensor, out: Tensor) -> Tensor:
    """``out = tanh(x)``, computed as ``2 * sigmoid(2x) - 1`` (see ``_activate_``); the two differ by
    float32 rounding (~1e-7 absolute)."""
    return torch.mul(x, 2, out=out).sigmoid_().mul_(2).sub_(1)


def mlstm_inference(
    x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, w_mih: Tensor, w_mhh: Tensor, bias: Tensor,
    reset: Tensor | None = None, return_cells: bool = False,
) -> tuple[Tensor, State, Tensor | None]:
    """No-autograd forward; call under ``torch.no_grad()``. Returns (out, (h, c), cells or None)."""
    T, B, _ = x.shape
    H = w_mhh.shape[0]
    keep, reset_steps = _keep_mask(reset, x)
    # zx becomes the gates, step by step
    zx, mx, times_w_mhh, times_w_hh = _prepare(x, w_ih, w_hh, w_mih, w_mhh, bias)
    out = x.new_empty(T, B, H)
    cells = x.new_empty(T, B, H) if return_cells else None
    h = h0
    c = c0 if return_cells else c0.clone()  # without return_cells, c is updated in place
    for t in range(T):
        if t in reset_steps:
            h = h * keep[t]
            c = c * keep[t] if return_cells else c.mul_(keep[t])
        m = times_w_mhh(h).mul_(mx[t])
        z = zx[t]
        i, f, g2, o = _activate_(z.add_(times_w_hh(m)), H)  # g2 = sigmoid(2g)
        # c' = f * c + i * tanh(g) = f * c + 2 * i * g2 - i
        c = torch.mul(f, c, out=cells[t]) if return_cells else c.mul_(f)
        c.addcmul_(i, g2, value=2).sub_(i)
        h = _tanh_into(c, out[t]).mul_(o)
    return out, (h, c), cells


class _MLSTMFunction(torch.autograd.Function):
    """(x, h0, c0, weights..., reset) -> (out [T, B, H], cells [T, B, H]) with a hand-written backward."""

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, w_mih, w_mhh, bias, reset):
        ctx.set_materialize_grads(False)
        T, B, _ = x.shape
        H = w_mhh.shape[0]
        keep, reset_steps = _keep_mask(reset, x)
        # gates: activated in place, per step
        gates, mx, times_w_mhh, times_w_hh = _prepare(x, w_ih, w_hh, w_mih, w_mhh, bias)
        out = x.new_empty(T, B, H)
        cells = x.new_empty(T, B, H)
        tanh_cells = x.new_empty(T, B, H)
        ms = x.new_empty(T, B, H)
        hms = []  # h @ w_mhh.T per step
        h, c = h0, c0
        for t in range(T):
            if t in reset_steps:
                h, c = h * keep[t], c * keep[t]
            hm = times_w_mhh(h)
            hms.append(hm)
            m = torch.mul(hm, mx[t], out=ms[t])
            z = gates[t]
            i, f, g, o = _activate_(z.add_(times_w_hh(m)), H)
            g.mul_(2).sub_(1)  # tanh(g), kept for backward
            c = torch.mul(f, c, out=cells[t]).addcmul_(i, g)
            h = torch.mul(_tanh_into(c, tanh_cells[t]), o, out=out[t])
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, w_mih, w_mhh, out, cells)
        ctx.intermediates = (gates, mx, ms, hms, tanh_cells, keep, reset_steps)
        return out, cells

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, d_cells):
        x, h0, c0, w_ih, w_hh, w_mih, w_mhh, out, cells = ctx.saved_tensors
        gates, mx, ms, hms, tanh_cells, keep, reset_steps = ctx.intermediates
        T, B, E = x.shape
        H = w_mhh.shape[0]
        # dh -> dc through h = o * tanh(c).
        o_dtanh = torch.rsub(tanh_cells * tanh_cells, 1).mul_(gates[..., 3 * H :])
        dz = x.new_empty(T, B, 4 * H)
        dmx = x.new_empty(T, B, H)
        dhm = x.new_empty(T, B, H)
        pack = T >= _MIN_STEPS_TO_PACK
        w_hh_t = _RowsTimesWeightT(w_hh.t(), B, pack)
        w_mhh_t = _RowsTimesWeightT(w_mhh.t(), B, pack)
        dh = x.new_zeros(B, H)
        dc = x.new_zeros(B, H)
        ones = x.new_ones(B, H)
        d_act = x.new_empty(B, 4 * H)  # local derivatives of the activations at one step
        for t in range(T - 1, -1, -1):
            if d_out is not None:
                dh = dh + d_out[t]
            dc = torch.addcmul(dc, dh, o_dtanh[t])
            if d_cells is not None:
                dc.add_(d_cells[t])
            g_t = gates[t]
            # s(1 - s) for the sigmoid gates, 1 - tanh^2 for g.
            torch.addcmul(g_t, g_t, g_t, value=-1, out=d_act)
            g_tanh = g_t[:, 2 * H : 3 * H]
            torch.addcmul(ones, g_tanh, g_tanh, value=-1, out=d_act[:, 2 * H : 3 * H])
            c_prev = cells[t - 1] if t > 0 else c0
            if t in reset_steps:
                c_prev = c_prev * keep[t]
            dz_t = dz[t]
            torch.mul(dc, g_tanh, out=dz_t[:, :H])
            torch.mul(dc, c_prev, out=dz_t[:, H : 2 * H])
            torch.mul(dc, g_t[:, :H], out=dz_t[:, 2 * H : 3 * H])
            torch.mul(dh, tanh_cells[t], out=dz_t[:, 3 * H :])
            dz_t.mul_(d_act)
            dm = w_hh_t(dz_t)
            torch.mul(dm, hms[t], out=dmx[t])
            torch.mul(dm, mx[t], out=dhm[t])
            dh = w_mhh_t(dhm[t])
            dc = dc * g_t[:, H : 2 * H]
            if t in reset_steps:
                dh.mul_(keep[t])
                dc.mul_(keep[t])
        # Weight gradients: one product over all T*B rows each.
        x2 = x.reshape(T * B, E)
        dz2 = dz.view(T * B, 4 * H)
        dmx2 = dmx.view(T * B, H)
        need = ctx.needs_input_grad
        dx = dw_ih = dw_hh = dw_mih = dw_mhh = dbias = None
        if need[0]:
            dx = torch.addmm(torch.mm(dz2, w_ih), dmx2, w_mih).view(T, B, E)
        if need[3]:
            dw_ih = torch.mm(dz2.t(), x2)
        if need[4]:
            dw_hh = torch.mm(dz2.t(), ms.view(T * B, H))
        if need[5]:
            dw_mih = torch.mm(dmx2.t(), x2)
        if need[6]:
            h_prev = torch.cat([h0.unsqueeze(0), out[:-1]])
            if keep is not None:
                h_prev.mul_(keep)
            dw_mhh = torch.mm(dhm.view(T * B, H).t(), h_prev.view(T * B, H))
        if need[7]:
            dbias = dz2.sum(0)
        return dx, dh, dc, dw_ih, dw_hh, dw_mih, dw_mhh, dbias, None


def mlstm_sequence(
    x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor, w_mih: Tensor, w_mhh: Tensor, bias: Tensor,
    reset: Tensor | None = None, return_cells: bool = False,
) -> tuple[Tensor, State, Tensor | None]:
    """One mLSTM layer over ``x [T, B, E]``: (out [T, B, H], (h, c), cells [T, B, H] or None).

    Differentiable (custom backward) when grad mode is on and anything requires grad; otherwise the
    lean inference loop.
    """
    tensors = (x, h0, c0, w_ih, w_hh, w_mih, w_mhh, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        out, cells = _MLSTMFunction.apply(*tensors, reset)
        return out, (out[-1], cells[-1]), (cells if return_cells else None)
    with torch.no_grad():
        return mlstm_inference(*tensors, reset, return_cells)
