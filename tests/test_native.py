"""The fused mLSTM's C++ step kernels (csrc/mlstm_cpu.cpp): built here, and the same numbers as the
PyTorch element-wise path they replace."""

from __future__ import annotations

import shutil

import pytest
import torch

from sentiment_discovery import mlstm_kernels, native
from sentiment_discovery.mlstm_kernels import mlstm_sequence

needs_compiler = pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler on this machine")


def _sequence_results(kernels_on: bool, monkeypatch, reset, return_cells: bool, grad: bool):
    """out, h, c, cells and every gradient of one float32 layer run, with or without the C++ kernels."""
    with monkeypatch.context() as patch:
        if not kernels_on:
            patch.setattr(mlstm_kernels, "_step_kernels", lambda x: None)
        torch.manual_seed(0)
        T, B, E, H = 11, 4, 6, 24
        x = torch.randn(T, B, E, requires_grad=grad)
        h0 = torch.randn(B, H, requires_grad=grad)
        c0 = torch.randn(B, H, requires_grad=grad)
        weights = [torch.randn(4 * H, E) * 0.4, torch.randn(4 * H, H) * 0.4, torch.randn(H, E) * 0.4,
                   torch.randn(H, H) * 0.4, torch.randn(4 * H) * 0.4]
        for w in weights:
            w.requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            out, (h, c), cells = mlstm_sequence(x, h0, c0, *weights, reset=reset, return_cells=return_cells)
        results = [out, h, c] + ([cells] if return_cells else [])
        if grad:
            # out.sum() hands the backward an expanded (stride 0) gradient; c and cells add d_cells
            loss = out.sum() + (h * h).sum() + c.sin().sum() + (0.3 * cells).sum()
            results += torch.autograd.grad(loss, [x, h0, c0, *weights])
        return [r.detach() for r in results]


@needs_compiler
def test_kernels_build_and_load():
    assert native.ops() is not None, "a C++ compiler is here, so the step kernels must build"
    assert hasattr(native.ops(), "mlstm_forward_step") and hasattr(native.ops(), "mlstm_backward_step")


@needs_compiler
@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("with_reset", [False, True])
def test_kernels_give_the_pytorch_path_numbers(monkeypatch, grad, with_reset):
    reset = None
    if with_reset:
        reset = torch.zeros(11, 4, dtype=torch.bool)
        reset[0, 1] = reset[4, :] = reset[7, 2] = True
    with_kernels = _sequence_results(True, monkeypatch, reset, return_cells=grad, grad=grad)
    without = _sequence_results(False, monkeypatch, reset, return_cells=grad, grad=grad)
    assert len(with_kernels) == len(without) == (12 if grad else 3)
    for a, b in zip(with_kernels, without):  # float32 rounding, accumulated over 11 steps
        assert ((a - b).abs().max() / b.abs().max()).item() < 1e-5


@needs_compiler
def test_forward_kernel_saturates_and_keeps_nan_like_torch():
    ops = native.ops()
    B, H = 3, 8
    z = torch.zeros(B, 4 * H)
    z[0] = 1e4  # every gate saturated at 1
    z[1] = -1e4  # at 0 (tanh(g) at -1)
    z[2, 0] = float("nan")  # one NaN pre-activation of the i gate, column 0
    c_prev = torch.full((B, H), 0.5)
    c_out, tanh_c, h_out = torch.empty(B, H), torch.empty(B, H), torch.empty(B, H)
    ops.mlstm_forward_step(z, c_prev, c_out, tanh_c, h_out)
    torch.testing.assert_close(c_out[0], torch.full((H,), 1.5))  # f * c + i * tanh(g) = 0.5 + 1
    torch.testing.assert_close(h_out[0], torch.full((H,), 1.5).tanh())
    torch.testing.assert_close(c_out[1], torch.zeros(H))
    assert c_out[2, 0].isnan() and h_out[2, 0].isnan()
    assert not c_out[2, 1:].isnan().any()


@needs_compiler
def test_kernels_refuse_wrong_shapes_and_dtypes():
    ops = native.ops()
    B, H = 2, 4
    c = torch.zeros(B, H)
    with pytest.raises(RuntimeError, match="c_prev"):
        ops.mlstm_forward_step(torch.zeros(B, 4 * H), torch.zeros(B, H + 1), c, None, torch.empty(B, H))
    with pytest.raises(RuntimeError, match="float32"):
        ops.mlstm_forward_step(torch.zeros(B, 4 * H, dtype=torch.float64), c, c, None, c)


def test_build_without_compiler_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    with pytest.raises(RuntimeError, match="no C.. compiler"):
        native.build(cache=tmp_path)


@needs_compiler
def test_failed_compilation_reports_the_compiler_error(monkeypatch, tmp_path):
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(native, "SOURCE", broken)
    with pytest.raises(RuntimeError, match="compiling broken.cpp failed"):
        native.build(cache=tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.so*")), "no half-written library is left behind"
