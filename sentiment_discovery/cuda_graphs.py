"""Opt-in CUDA graphs for the fused mLSTM layer (``SENTIMENT_DISCOVERY_CUDA_GRAPHS=1``, or ``set_enabled``).

On a GPU the per-step loop of mlstm_kernels launches about 15 small kernels per step forward and 25
backward, each costing microseconds of host time: at small hidden sizes the GPU waits on Python.
Here a layer's whole sequence is captured once per shape and replayed as one CUDA graph:

- inference (no gradient): ``torch.cuda.CUDAGraph`` over ``mlstm_inference`` with static input buffers;
- training: ``torch.cuda.make_graphed_callables`` over the fused autograd Function (forward and
  backward graphs).

Inside a graph the reset mask is applied at every step (mlstm_kernels reads nothing back while
capturing), which gives the same numbers. Outputs and gradients are copies: the graph's own buffers are
overwritten by its next replay. A training graph is not replayed while the autograd graph of its last
replay still awaits its backward (that would overwrite what the backward needs); the eager path runs
instead. Each layer keeps at most ``MAX_GRAPHS_PER_LAYER`` shapes (each graph holds its own memory);
other shapes, sequences shorter than ``MIN_STEPS`` and any failure run the default eager path. A
failure is warned about once and recorded in ``fallbacks``. Nothing here runs for CPU tensors.
"""

from __future__ import annotations

import os
import warnings
import weakref

import torch
from torch import Tensor, nn

from . import matmul
from .mlstm_kernels import State, _MLSTMFunction, mlstm_inference

ENV_VAR = "SENTIMENT_DISCOVERY_CUDA_GRAPHS"
MIN_STEPS = 16  # shorter sequences (generation's single steps) gain little and would each need a graph
MAX_GRAPHS_PER_LAYER = 4

_enabled = os.environ.get(ENV_VAR, "0") not in ("", "0")
fallbacks: list[str] = []  # one line per failure, for the benchmark's report
stats = {"captured": 0, "replayed": 0}
_graphs: weakref.WeakKeyDictionary[nn.Module, dict[tuple, object]] = weakref.WeakKeyDictionary()


def enabled() -> bool:
    return _enabled


def set_enabled(on: bool) -> None:
    global _enabled
    _enabled = on


def _fail(what: str, error: BaseException) -> None:
    line = f"{what}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    if line not in fallbacks:
        warnings.warn(f"CUDA graph not used, running eagerly ({line})", stacklevel=3)
    fallbacks.append(line)


class _CloneGrads(torch.autograd.Function):
    """Identity forward; backward hands on copies of the gradients (a graph's are its static buffers)."""

    @staticmethod
    def forward(ctx, *tensors):
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        return tuple(None if g is None else g.clone() for g in grads)


class _Replay:
    """The token of one training replay: ``done`` once gradients have flowed back through it."""

    done = False


class _CopyOutputs(torch.autograd.Function):
    """Copies of a training graph's outputs; marks the replay's backward as started."""

    @staticmethod
    def forward(ctx, replay, out, cells):
        ctx.replay = replay  # freed with the autograd graph: a dropped graph frees the layer's graph too
        return out.clone(), cells.clone()

    @staticmethod
    def backward(ctx, d_out, d_cells):
        ctx.replay.done = True
        return None, d_out, d_cells


class _TrainingGraph:
    def __init__(self, inputs: tuple[Tensor, ...], reset: Tensor | None, dtype: torch.dtype | None):
        self.with_reset = with_reset = reset is not None
        samples = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
        if with_reset:
            samples.append(reset.clone())

        def forward(*args):
            return _MLSTMFunction.apply(*args[:8], args[8] if with_reset else None, dtype)

        # make_graphed_callables refuses an autocast that caches casts; the kernel casts by ``dtype`` anyway
        autocast = torch.is_autocast_enabled("cuda")
        with torch.autocast("cuda", torch.get_autocast_dtype("cuda"), enabled=autocast, cache_enabled=False):
            self.graphed = torch.cuda.make_graphed_callables(forward, tuple(samples), allow_unused_input=True)
        self.last_replay = None

    def __call__(self, inputs, reset, return_cells):
        pending = self.last_replay() if self.last_replay is not None else None
        if pending is not None and not pending.done:
            return None
        differentiable = iter(_CloneGrads.apply(*(t for t in inputs if t.requires_grad)))
        args = [next(differentiable) if t.requires_grad else t for t in inputs]
        out, cells = self.graphed(*args, *((reset,) if self.with_reset else ()))
        replay = _Replay()
        out, cells = _CopyOutputs.apply(replay, out, cells)
        self.last_replay = weakref.ref(replay)
        return out, (out[-1], cells[-1]), (cells if return_cells else None)


class _InferenceGraph:
    def __init__(
        self, inputs: tuple[Tensor, ...], reset: Tensor | None, return_cells: bool, dtype: torch.dtype | None
    ):
        self.static = [t.detach().clone() for t in inputs]
        self.dtype = dtype
        self.static_reset = None if reset is None else reset.clone()
        self.return_cells = return_cells
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._run()  # warm-up outside the capture: cuBLAS handles and workspaces are made here
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = self._run()

    def _run(self):
        with torch.no_grad():
            return mlstm_inference(*self.static, self.static_reset, self.return_cells, self.dtype)

    def __call__(self, inputs, reset, return_cells):
        for static, t in zip(self.static, inputs):
            static.copy_(t)
        if reset is not None:
            self.static_reset.copy_(reset)
        self.graph.replay()
        out, (_, c), cells = self.outputs
        out = out.clone()
        return out, (out[-1], c.clone()), (cells.clone() if cells is not None else None)


def sequence(
    layer: nn.Module, x: Tensor, h0: Tensor, c0: Tensor, weights: tuple[Tensor, ...],
    reset: Tensor | None = None, return_cells: bool = False,
) -> tuple[Tensor, State, Tensor | None] | None:
    """``mlstm_sequence(x, h0, c0, *weights, reset, return_cells)`` of ``layer`` replayed as a CUDA graph,
    or None where the eager path must run (off, CPU, short sequence, too many shapes, busy, failure)."""
    if not (_enabled and x.is_cuda and x.shape[0] >= MIN_STEPS):
        return None
    inputs = (x, h0, c0, *weights)
    training = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    dtype = matmul.operand_dtype("cuda")  # the products' operand dtype, as mlstm_sequence takes it
    key = (
        training,
        return_cells and not training,
        reset is None,
        torch.is_inference_mode_enabled(),
        dtype,
        tuple((tuple(t.shape), t.dtype, t.device, t.requires_grad) for t in inputs),
    )
    layer_graphs = _graphs.setdefault(layer, {})
    if key not in layer_graphs:
        if len(layer_graphs) >= MAX_GRAPHS_PER_LAYER:
            return None
        kind = "training" if training else "inference"
        try:
            layer_graphs[key] = (
                _TrainingGraph(inputs, reset, dtype)
                if training
                else _InferenceGraph(inputs, reset, return_cells, dtype)
            )
            stats["captured"] += 1
        except Exception as e:  # any failure means: run eagerly
            layer_graphs[key] = None
            _fail(f"capture of a {kind} graph, x {tuple(x.shape)}", e)
    graph = layer_graphs[key]
    if graph is None:
        return None
    try:
        result = graph(inputs, reset, return_cells)
    except Exception as e:
        layer_graphs[key] = None
        _fail(f"replay, x {tuple(x.shape)}", e)
        return None
    if result is not None:
        stats["replayed"] += 1
    return result
