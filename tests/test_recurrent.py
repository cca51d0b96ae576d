"""Recurrent stacks: the fused mLSTM against the per-step reference, numpy and gradcheck; PyTorch wrappers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sentiment_discovery.mlstm_kernels import mlstm_sequence
from sentiment_discovery.recurrent import TorchRNN, make_rnn, mLSTM, mLSTMLayer


def _reset_mask(T: int, B: int) -> torch.Tensor:
    reset = torch.zeros(T, B, dtype=torch.bool)
    reset[0, 0] = True
    reset[3, 1] = True
    reset[5, :] = True
    return reset


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _loss(out: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    # Weights differ per position so every gradient path (outputs, final h and c) is exercised.
    w = torch.linspace(-1.0, 1.0, out.numel(), dtype=out.dtype).view_as(out)
    return (out * w).sum() + (h**2).sum() + c.sin().sum()


@pytest.mark.parametrize("weight_norm", [False, True])
@pytest.mark.parametrize("with_reset", [False, True])
@pytest.mark.parametrize("T", [6, 12])  # below and above the length where weights are packed for oneDNN
def test_fused_layer_matches_reference_forward_and_gradients(weight_norm, with_reset, T):
    B, E, H = 3, 5, 16
    layer = mLSTMLayer(E, H, weight_norm)
    x = torch.randn(T, B, E, requires_grad=True)
    h0 = torch.randn(B, H, requires_grad=True)
    c0 = torch.randn(B, H, requires_grad=True)
    reset = _reset_mask(T, B) if with_reset else None
    leaves = [x, h0, c0, *layer.parameters()]
    results = []
    for run in (layer.forward, layer.reference_forward):
        out, (h, c), cells = run(x, (h0, c0), reset, return_cells=True)
        loss = _loss(out, h, c) + (cells * 0.3).sum()
        results.append([out, h, c, cells, *torch.autograd.grad(loss, leaves)])
    for fused, ref in zip(*results):
        assert _rel_err(fused, ref) < 1e-5


def test_fused_stack_two_layers_with_state_and_resets_matches_reference():
    T, B, E, H = 9, 4, 6, 12
    stack = mLSTM(E, H, num_layers=2)
    x = torch.randn(T, B, E, requires_grad=True)
    hidden = (torch.randn(2, B, H, requires_grad=True), torch.randn(2, B, H, requires_grad=True))
    reset = _reset_mask(T, B)
    leaves = [x, *hidden, *stack.parameters()]

    out, (h, c) = stack(x, hidden, reset)
    fused = [out, h, c, *torch.autograd.grad(_loss(out, h, c), leaves)]

    y, hs, cs = x, [], []
    for i, layer in enumerate(stack.layers):
        y, (hi, ci), _ = layer.reference_forward(y, (hidden[0][i], hidden[1][i]), reset)
        hs.append(hi)
        cs.append(ci)
    h_ref, c_ref = torch.stack(hs), torch.stack(cs)
    ref = [y, h_ref, c_ref, *torch.autograd.grad(_loss(y, h_ref, c_ref), leaves)]
    for a, b in zip(fused, ref):
        assert _rel_err(a, b) < 1e-5


def test_gradcheck_float64_with_resets():
    T, B, E, H = 5, 2, 3, 4
    reset = torch.zeros(T, B, dtype=torch.bool)
    reset[2, 1] = True
    args = [torch.randn(T, B, E), torch.randn(B, H), torch.randn(B, H), torch.randn(4 * H, E),
            torch.randn(4 * H, H) * 0.5, torch.randn(H, E), torch.randn(H, H) * 0.5, torch.randn(4 * H)]
    args = [a.double().requires_grad_() for a in args]

    def run(*tensors):
        out, (h, c), cells = mlstm_sequence(*tensors, reset=reset, return_cells=True)
        return out, c, cells

    assert torch.autograd.gradcheck(run, args, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradcheck_float64_weight_norm_layer():
    layer = mLSTMLayer(2, 2, weight_norm=True).double()
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    params = list(layer.parameters())
    names = [n for n, _ in layer.named_parameters()]

    def run(x, *values):
        out, (h, c), _ = torch.func.functional_call(layer, dict(zip(names, values)), (x,))
        return out, c

    assert torch.autograd.gradcheck(run, [x, *[p.detach().clone().requires_grad_() for p in params]])


def _numpy_mlstm(x, h, c, wx, wh, wmx, wmh, b, reset):
    """formats.md, written out in numpy: m = (Wmx x)*(Wmh h); z = Wx x + Wh m + b; gates i, f, g, o."""
    sig = lambda v: 1.0 / (1.0 + np.exp(-v))
    H = h.shape[1]
    outs, cells = [], []
    for t in range(x.shape[0]):
        keep = (~reset[t]).astype(np.float64)[:, None]
        h, c = h * keep, c * keep
        m = (x[t] @ wmx.T) * (h @ wmh.T)
        z = x[t] @ wx.T + m @ wh.T + b
        i, f, g, o = z[:, :H], z[:, H : 2 * H], z[:, 2 * H : 3 * H], z[:, 3 * H :]
        c = sig(f) * c + sig(i) * np.tanh(g)
        h = sig(o) * np.tanh(c)
        outs.append(h)
        cells.append(c)
    return np.stack(outs), np.stack(cells)


def _normalised(g: np.ndarray, v: np.ndarray) -> np.ndarray:
    return g.reshape(-1, 1) * v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("weight_norm", [False, True])
def test_mlstm_against_numpy_formula(weight_norm):
    T, B, E, H = 3, 2, 3, 2
    layer = mLSTMLayer(E, H, weight_norm)
    x = torch.randn(T, B, E)
    h0, c0 = torch.randn(B, H), torch.randn(B, H)
    reset = np.zeros((T, B), dtype=bool)
    reset[1, 0] = True
    names = ("w_ih", "w_hh", "w_mih", "w_mhh")
    if weight_norm:
        pz = layer.parametrizations
        mats = [_normalised(getattr(pz, n).original0.detach().numpy().astype(np.float64),
                            getattr(pz, n).original1.detach().numpy().astype(np.float64)) for n in names]
    else:
        mats = [getattr(layer, n).detach().numpy().astype(np.float64) for n in names]
    bias = layer.bias.detach().numpy().astype(np.float64)
    want_h, want_c = _numpy_mlstm(x.numpy().astype(np.float64), h0.numpy().astype(np.float64),
                                  c0.numpy().astype(np.float64), *mats, bias, reset)
    reset_t = torch.from_numpy(reset)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            out, (h, c), cells = layer(x, (h0, c0), reset_t, return_cells=True)
        np.testing.assert_allclose(out.detach().numpy(), want_h, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(cells.detach().numpy(), want_c, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(c.detach().numpy(), want_c[-1], rtol=1e-5, atol=1e-6)
    out, _, _ = layer.reference_forward(x, (h0, c0), reset_t)
    np.testing.assert_allclose(out.detach().numpy(), want_h, rtol=1e-5, atol=1e-6)


def test_inference_path_matches_training_path_and_leaves_inputs_alone():
    T, B, E, H = 6, 3, 4, 8
    stack = mLSTM(E, H, num_layers=2)
    x = torch.randn(T, B, E)
    hidden = (torch.randn(2, B, H), torch.randn(2, B, H))
    before = [t.clone() for t in hidden]
    reset = _reset_mask(T, B)
    out, (h, c) = stack(x, hidden, reset)  # parameters require grad: autograd Function path
    assert out.requires_grad
    with torch.inference_mode():
        out_i, (h_i, c_i) = stack(x, hidden, reset)
    for a, b in [(out_i, out), (h_i, h), (c_i, c)]:
        assert _rel_err(a, b.detach()) < 1e-6
    for a, b in zip(hidden, before):
        assert torch.equal(a, b)


def _manual_torch_rnn(kind, layer, x, h, c, reset):
    """Per-step loop written from PyTorch's documented LSTM/GRU/RNN equations, resets applied per row."""
    w_ih, w_hh, b_ih, b_hh = layer.weight_ih_l0, layer.weight_hh_l0, layer.bias_ih_l0, layer.bias_hh_l0
    outs, cells = [], []
    for t in range(x.shape[0]):
        keep = (~reset[t]).float().unsqueeze(1)
        h, c = h * keep, c * keep
        gi, gh = x[t] @ w_ih.t() + b_ih, h @ w_hh.t() + b_hh
        if kind == "LSTM":
            i, f, g, o = (gi + gh).chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        elif kind == "GRU":
            (ir, iz, i_n), (hr, hz, hn) = gi.chunk(3, dim=1), gh.chunk(3, dim=1)
            r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
            h = (1 - z) * torch.tanh(i_n + r * hn) + z * h
            c = h
        else:
            h = torch.tanh(gi + gh) if kind == "RNNTanh" else torch.relu(gi + gh)
            c = h
        outs.append(h)
        cells.append(c)
    return torch.stack(outs), torch.stack(cells), h, c


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNNTanh", "RNNReLU"])
def test_torch_wrappers_with_resets_match_manual_loop(kind):
    T, B, E, H = 8, 3, 4, 6
    stack = TorchRNN(kind, E, H, num_layers=1, weight_norm=True)
    x = torch.randn(T, B, E)
    h0 = torch.randn(1, B, H)
    c0 = torch.randn(1, B, H) if kind == "LSTM" else h0
    reset = _reset_mask(T, B)
    with torch.no_grad():
        out, (h, c) = stack(x, (h0, c0), reset)
        hs, cs, (h2, c2) = stack.forward_states(x, (h0, c0), reset)
        want_out, want_cells, want_h, want_c = _manual_torch_rnn(
            kind, stack.layers[0], x, h0[0], c0[0], reset
        )
    for got, want in [(out, want_out), (h[0], want_h), (c[0], want_c), (hs[0], want_out), (cs[0], want_cells),
                      (h2[0], want_h), (c2[0], want_c)]:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["mLSTM", "LSTM", "GRU"])
def test_forward_states_consistent_with_forward(kind):
    T, B, E, H = 7, 2, 4, 8
    stack = make_rnn(kind, E, H, num_layers=2)
    x = torch.randn(T, B, E)
    reset = _reset_mask(T, B)
    with torch.no_grad():
        out, (h, c) = stack(x, None, reset)
        hs, cs, (h2, c2) = stack.forward_states(x, None, reset)
    assert len(hs) == len(cs) == 2
    torch.testing.assert_close(hs[-1], out)
    torch.testing.assert_close(h2, h)
    torch.testing.assert_close(c2, c)
    for layer in range(2):
        torch.testing.assert_close(hs[layer][-1], h[layer])
        torch.testing.assert_close(cs[layer][-1], c[layer])
    if kind == "mLSTM":
        y = x
        for layer, (h_seq, c_seq) in zip(stack.layers, zip(hs, cs)):
            y, _, cells = layer.reference_forward(y, None, reset, return_cells=True)
            torch.testing.assert_close(h_seq, y.detach(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(c_seq, cells.detach(), rtol=1e-5, atol=1e-6)
