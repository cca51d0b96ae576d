"""Recurrent stacks sharing one interface.

Every stack here is called as ``stack(x[T, B, E], hidden=None, reset=None) -> (out[T, B, H], (h, c))``
with ``h``/``c`` of shape ``[num_layers, B, H]`` (for GRU and plain RNNs ``c`` is ``h``), and
``reset`` an optional ``[T, B]`` bool mask: True zeroes that row's state before it consumes the
input of that step. ``forward_states`` additionally returns the per-step hidden and cell states of
every layer, which featurization pools and fine-tuning trains through: differentiable on every
stack (the fused mLSTM layer's backward takes the gradients of its per-step cells).

The recurrent types are ``RNN_TYPES``, checked in one place (``check_rnn_type``); ``CELL_TYPES`` are
those whose state has a cell c apart from the hidden state h.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm as _weight_norm

from . import matmul
from .errors import UsageError
from .mlstm_kernels import State, mlstm_sequence

RNN_TYPES = ("mLSTM", "LSTM", "GRU", "RNNTanh", "RNNReLU")
CELL_TYPES = ("mLSTM", "LSTM")  # a cell state c apart from h; the others' state tuple repeats h


def check_rnn_type(kind: str) -> str:
    """``kind`` if it names a recurrent type of ``RNN_TYPES``; else a ``UsageError`` listing them."""
    if kind not in RNN_TYPES:
        raise UsageError(f"unknown model {kind!r}; choose one of {', '.join(RNN_TYPES)}")
    return kind

# --------------------------------------------------------------------------------------------
# mLSTM
# --------------------------------------------------------------------------------------------


class mLSTMLayer(nn.Module):
    """One multiplicative-LSTM layer (docs/formats.md), gate order i, f, g, o.

    Parameters use the NVIDIA release's names (one summed bias instead of two):
    ``w_ih [4H, E]``, ``w_hh [4H, H]``, ``w_mih [H, E]``, ``w_mhh [H, H]``, ``bias [4H]``.
    With ``weight_norm`` the four matrices are parametrized by PyTorch's weight norm over each
    output row.
    """

    def __init__(self, input_size: int, hidden_size: int, weight_norm: bool = True):
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        H, E = hidden_size, input_size
        self.w_ih = nn.Parameter(torch.empty(4 * H, E))
        self.w_hh = nn.Parameter(torch.empty(4 * H, H))
        self.w_mih = nn.Parameter(torch.empty(H, E))
        self.w_mhh = nn.Parameter(torch.empty(H, H))
        self.bias = nn.Parameter(torch.empty(4 * H))
        bound = 1.0 / math.sqrt(H)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)
        self.weight_norm = weight_norm
        if weight_norm:
            for name in ("w_ih", "w_hh", "w_mih", "w_mhh"):
                _weight_norm(self, name, dim=0)

    def weights(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The effective (weight-normalised) matrices, computed once per call."""
        return self.w_ih, self.w_hh, self.w_mih, self.w_mhh, self.bias

    def zero_state(self, batch: int, like: Tensor) -> State:
        z = like.new_zeros(batch, self.hidden_size)
        return z, z.clone()

    def forward(
        self, x: Tensor, state: State | None = None, reset: Tensor | None = None, return_cells: bool = False
    ) -> tuple[Tensor, State, Tensor | None]:
        """Fused sequence forward (mlstm_kernels): (out [T, B, H], (h, c), per-step cells or None)."""
        h, c = state if state is not None else self.zero_state(x.shape[1], x)
        return mlstm_sequence(x, h, c, *self.weights(), reset=reset, return_cells=return_cells)

    def reference_forward(
        self, x: Tensor, state: State | None = None, reset: Tensor | None = None, return_cells: bool = False
    ) -> tuple[Tensor, State, Tensor | None]:
        """Plain per-step implementation of docs/formats.md, differentiable through autograd."""
        T, B, _ = x.shape
        h, c = state if state is not None else self.zero_state(B, x)
        w_ih, w_hh, w_mih, w_mhh, bias = self.weights()
        outs, cells = [], []
        for t in range(T):
            if reset is not None:
                keep = (~reset[t]).to(x.dtype).unsqueeze(1)
                h, c = h * keep, c * keep
            h, c = mlstm_step(x[t], h, c, w_ih, w_hh, w_mih, w_mhh, bias)
            outs.append(h)
            if return_cells:
                cells.append(c)
        out = torch.stack(outs)
        return out, (h, c), (torch.stack(cells) if return_cells else None)


def mlstm_step(
    x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, w_mih: Tensor, w_mhh: Tensor, bias: Tensor
) -> State:
    """One mLSTM step on ``x [B, E]``, ``h``/``c`` ``[B, H]``: the math of docs/formats.md."""
    m = (x @ w_mih.t()) * (h @ w_mhh.t())
    z = x @ w_ih.t() + m @ w_hh.t() + bias
    i, f, g, o = z.chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return h, c


class _LayerStack(nn.Module):
    """The layer loop shared by the stacks: state per layer, dropout between layers, per-layer states."""

    layers: nn.ModuleList
    num_layers: int
    hidden_size: int
    dropout: float
    has_cell: bool  # whether the state's second tensor is a cell c of its own (else it repeats h)
    cheap_resets: bool  # whether a reset mask costs nothing per step (else it splits the computation)

    def zero_state(self, batch_size: int, device=None, dtype: torch.dtype | None = None) -> State:
        """The zero state ``(h, c)``, each ``[num_layers, batch_size, hidden_size]``."""
        h = torch.zeros(self.num_layers, batch_size, self.hidden_size, device=device, dtype=dtype)
        return h, h.clone()

    def _run_layer(
        self, i: int, x: Tensor, state: State | None, reset: Tensor | None, keep_states: bool
    ) -> tuple[Tensor, State, Tensor | None]:
        raise NotImplementedError

    def _run(self, x, hidden, reset, keep_states):
        hs, cs, finals_h, finals_c = [], [], [], []
        for i in range(self.num_layers):
            layer_state = None if hidden is None else (hidden[0][i], hidden[1][i])
            x, (h, c), cells = self._run_layer(i, x, layer_state, reset, keep_states)
            finals_h.append(h)
            finals_c.append(c)
            if keep_states:
                hs.append(x)
                cs.append(cells)
            if self.dropout and self.training and i < self.num_layers - 1:
                x = nn.functional.dropout(x, self.dropout, True)
        return x, (torch.stack(finals_h), torch.stack(finals_c)), hs, cs

    def forward(self, input: Tensor, hidden: State | None = None, reset: Tensor | None = None):
        out, state, _, _ = self._run(input, hidden, reset, keep_states=False)
        return out, state

    def forward_states(self, input: Tensor, hidden: State | None = None, reset: Tensor | None = None):
        """(per-layer hidden sequences, per-layer cell sequences, final (h, c)), each sequence
        ``[T, B, H]``; differentiable (for a stack without cell, the cell sequences are the hidden)."""
        _, state, hs, cs = self._run(input, hidden, reset, keep_states=True)
        return hs, cs, state


class mLSTM(_LayerStack):
    """Multi-layer mLSTM with the interface of ``torch.nn.LSTM`` plus a per-row reset mask."""

    has_cell = True
    cheap_resets = True  # the fused loop multiplies the state by a keep mask at a reset step, nothing more

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        dropout: float = 0.0,
        weight_norm: bool = True,
    ):
        super().__init__()
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.dropout = dropout
        self.layers = nn.ModuleList(
            mLSTMLayer(input_size if i == 0 else hidden_size, hidden_size, weight_norm)
            for i in range(num_layers)
        )

    def _run_layer(self, i, x, state, reset, keep_states):
        return self.layers[i](x, state, reset, return_cells=keep_states)


# --------------------------------------------------------------------------------------------
# PyTorch's own fused RNNs (LSTM, GRU, RNN_TANH, RNN_RELU)
# --------------------------------------------------------------------------------------------


class TorchRNN(_LayerStack):
    """A stack of single-layer ``nn.LSTM``/``nn.GRU``/``nn.RNN`` (PyTorch's fused kernels).

    One module per layer so that per-layer states are reachable for featurization. Resets split the
    sequence at the steps where any row resets; between those steps the fused kernel runs whole.
    """

    cheap_resets = False  # every step where some row resets splits the fused call

    def __init__(
        self, kind: str, input_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0,
        weight_norm: bool = True,
    ):
        super().__init__()
        self.kind = check_rnn_type(kind)
        self.input_size, self.hidden_size = input_size, hidden_size
        self.num_layers, self.dropout = num_layers, dropout
        self.has_cell = kind in CELL_TYPES
        self.layers = nn.ModuleList()
        for i in range(num_layers):
            layer = _TORCH_LAYERS[kind](input_size if i == 0 else hidden_size, hidden_size)
            if weight_norm:
                for name in ("weight_ih_l0", "weight_hh_l0"):
                    _weight_norm(layer, name, dim=0)
            self.layers.append(layer)
        self.weight_norm = weight_norm

    def _call(self, layer: nn.Module, x: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.weight_norm:
            # nn.RNNBase caches its weight tensors; refresh them from the parametrization.
            layer._init_flat_weights()
        on_cpu = x.device.type == "cpu"
        if on_cpu and matmul.operand_dtype("cpu") is not None and not matmul.native_bf16(x.device):
            # oneDNN's LSTM refuses bfloat16 without hardware support: these layers stay float32 there.
            matmul.say_once(f"nn.{type(layer).__name__} layers run in float32: no native bfloat16 here")
            with torch.autocast("cpu", enabled=False):
                return self._call(layer, x, h, c)
        if self.has_cell:
            out, (h, c) = layer(x, (h.unsqueeze(0), c.unsqueeze(0)))
            return out, h[0], c[0]
        out, h = layer(x, h.unsqueeze(0))
        return out, h[0], h[0]

    def _segments(self, T: int, reset: Tensor | None) -> list[int]:
        if reset is None:
            return [0, T]
        steps = torch.nonzero(reset[1:].any(dim=1)).flatten().add(1).tolist()
        return [0, *steps, T]

    def _layer(self, layer, x, h, c, reset, keep_states):
        T = x.shape[0]
        outs, cells = [], []
        bounds = self._segments(T, reset)
        for a, b in zip(bounds[:-1], bounds[1:]):
            if reset is not None:
                keep = (~reset[a]).to(x.dtype).unsqueeze(1)
                h, c = h * keep, c * keep
            if keep_states and self.has_cell:
                # nn.LSTM does not expose per-step cell states: step it one byte at a time.
                for t in range(a, b):
                    out, h, c = self._call(layer, x[t : t + 1], h, c)
                    outs.append(out)
                    cells.append(c.unsqueeze(0))
            else:
                out, h, c = self._call(layer, x[a:b], h, c)
                outs.append(out)
                if keep_states:
                    cells.append(out)
        out = torch.cat(outs)
        return out, h, c, (torch.cat(cells) if keep_states else None)

    def _run_layer(self, i, x, state, reset, keep_states):
        if state is None:
            h = x.new_zeros(x.shape[1], self.hidden_size)
            state = (h, h)
        out, h, c, cells = self._layer(self.layers[i], x, *state, reset, keep_states)
        return out, (h, c), cells


_TORCH_LAYERS = {  # one single-layer module per layer: (input size, hidden size) -> module
    "LSTM": nn.LSTM,
    "GRU": nn.GRU,
    "RNNTanh": lambda n_in, n_out: nn.RNN(n_in, n_out, nonlinearity="tanh"),
    "RNNReLU": lambda n_in, n_out: nn.RNN(n_in, n_out, nonlinearity="relu"),
}


def make_rnn(
    kind: str,
    input_size: int,
    hidden_size: int,
    num_layers: int = 1,
    dropout: float = 0.0,
    weight_norm: bool = True,
) -> nn.Module:
    if check_rnn_type(kind) == "mLSTM":
        return mLSTM(input_size, hidden_size, num_layers, dropout, weight_norm)
    return TorchRNN(kind, input_size, hidden_size, num_layers, dropout, weight_norm)
