"""cuda_graphs without a GPU: the CPU path is untouched, and the reset mask that the kernels apply at every
step while a CUDA graph is being captured gives the numbers of the usual path (GPU tests: test_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from sentiment_discovery import cuda_graphs, mlstm_kernels
from sentiment_discovery.recurrent import mLSTMLayer


def layer_and_inputs(T: int = 20, B: int = 3, E: int = 5, H: int = 16):
    layer = mLSTMLayer(E, H)
    x = torch.randn(T, B, E, requires_grad=True)
    h0, c0 = torch.randn(B, H, requires_grad=True), torch.randn(B, H, requires_grad=True)
    reset = torch.zeros(T, B, dtype=torch.bool)
    reset[1, 0] = reset[3, 1] = True
    reset[T // 2 + 1, :] = True
    return layer, x, h0, c0, reset


def outputs_and_gradients(layer, x, h0, c0, reset) -> list[torch.Tensor]:
    out, (h, c), cells = layer(x, (h0, c0), reset, return_cells=True)
    loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + (h**2).sum() + c.sin().sum()
    grads = torch.autograd.grad(loss + 0.3 * cells.sum(), [x, h0, c0, *layer.parameters()])
    with torch.no_grad():
        inference = layer(x, (h0, c0), reset, return_cells=True)
    return [out, h, c, cells, *grads, inference[0], *inference[1], inference[2]]


def test_enabled_graphs_leave_the_cpu_path_alone(monkeypatch):
    layer, x, h0, c0, reset = layer_and_inputs()
    default = outputs_and_gradients(layer, x, h0, c0, reset)
    monkeypatch.setattr(cuda_graphs, "_enabled", True)
    assert cuda_graphs.sequence(layer, x, h0, c0, layer.weights(), reset) is None
    captured = cuda_graphs.stats["captured"]
    for a, b in zip(outputs_and_gradients(layer, x, h0, c0, reset), default):
        assert torch.equal(a, b)
    assert cuda_graphs.stats["captured"] == captured and not cuda_graphs.fallbacks


@pytest.mark.parametrize("T", [6, 20])  # without and with oneDNN-packed weights
def test_reset_mask_at_every_step_as_while_capturing_gives_the_same_numbers(monkeypatch, T):
    layer, x, h0, c0, reset = layer_and_inputs(T=T)
    default = outputs_and_gradients(layer, x, h0, c0, reset)
    seen = []
    monkeypatch.setattr(mlstm_kernels, "_capturing", lambda like: seen.append(like) or True)
    every_step = outputs_and_gradients(layer, x, h0, c0, reset)
    assert len(seen) == 2  # training and inference forward each asked
    for a, b in zip(every_step, default):
        assert torch.equal(a, b)
