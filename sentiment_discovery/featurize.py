"""Featurization: one vector per text from the recurrent states of a language model.

Texts are sorted by length and batched with their neighbours, LEFT-padded so that all rows of a
batch end on the same step, and the recurrent layer's reset mask zeroes each row's state just
before its first real byte: the final state of every row is then exactly the state after its own
last byte, whatever the batch. Long batches run in chunks of ``chunk_length`` steps with the state
carried over, and a row enters the computation only at the chunk where its text starts (rows are
sorted longest first, so the rows running in a chunk are a prefix of the batch); memory therefore
depends on the chunk length, not on the length of the longest text.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.nn.utils import parametrize

from .matmul import autocast, reduced_dtype
from .model import ModelConfig, RNNModel
from .preprocess import encode
from .progress import progress_bar

POOLINGS = ("last", "mean", "max")
STATES = ("cell", "hidden")


def parse_pooling(pooling: str) -> tuple[str, ...]:
    """``"mean,max,last"`` -> ``("mean", "max", "last")``: the poolings whose features are concatenated."""
    names = tuple(p.strip() for p in str(pooling).split(","))
    bad = [p for p in names if p not in POOLINGS]
    if bad or not names or len(set(names)) != len(names):
        raise ValueError(
            f"pooling must be one of {', '.join(POOLINGS)} or a comma-separated list of distinct ones "
            f"(e.g. mean,max,last), got {pooling!r}"
        )
    return names


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def num_features(config: ModelConfig, all_layers: bool = False, pooling: str = "last") -> int:
    """Features per text: ``nhid`` per layer used, per pooling (a list: see ``parse_pooling``)."""
    return config.nhid * (config.nlayers if all_layers else 1) * len(parse_pooling(pooling))


def _layers_to_features(per_layer: torch.Tensor, all_layers: bool) -> torch.Tensor:
    """``[L, B, H]`` -> ``[B, F]``: the last layer, or all layers (feature f = layer f // H, unit f % H)."""
    if not all_layers:
        return per_layer[-1]
    L, B, H = per_layer.shape
    return per_layer.permute(1, 0, 2).reshape(B, L * H)


class _BatchRunner:
    """Runs one length-sorted (longest first) batch of token arrays through ``model`` in chunks."""

    def __init__(
        self,
        model: RNNModel,
        tokens: list[np.ndarray],
        device: torch.device,
        poolings: tuple[str, ...],
        state: str,
    ):
        self.model, self.tokens, self.device = model, tokens, device
        self.poolings, self.state = poolings, state
        self.lengths = np.array([len(t) for t in tokens])
        self.total = int(self.lengths[0])
        self.starts = self.total - self.lengths  # left padding of each row (ascending)

    def _chunk_inputs(self, a: int, b: int, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens ``[b-a, rows]`` of steps a..b, the reset mask, and the mask of real (non-padding) steps."""
        steps = b - a
        chunk = np.zeros((steps, rows), dtype=np.int64)
        reset = np.zeros((steps, rows), dtype=bool)
        for j in range(rows):
            start = int(self.starts[j])
            first = max(a, start)
            chunk[first - a :, j] = self.tokens[j][first - start : b - start]
            if a <= start < b:
                reset[start - a, j] = True
        real = np.arange(a, b)[:, None] >= self.starts[None, :rows]
        to = lambda x: torch.from_numpy(x).to(self.device)
        return to(chunk), to(reset), to(real)

    def run(self, chunk_length: int, all_layers: bool) -> torch.Tensor:
        cfg = self.model.config
        B = len(self.tokens)
        h = torch.zeros(cfg.nlayers, B, cfg.nhid, device=self.device)
        c = torch.zeros_like(h)
        total = torch.zeros_like(h) if "mean" in self.poolings else None
        peak = torch.full_like(h, float("-inf")) if "max" in self.poolings else None
        per_step = total is not None or peak is not None
        for a in range(0, self.total, chunk_length):
            b = min(a + chunk_length, self.total)
            rows = int(np.searchsorted(self.starts, b, side="left"))  # rows whose text has started by b
            x, reset, real = self._chunk_inputs(a, b, rows)
            hidden = (h[:, :rows], c[:, :rows])
            if not per_step:
                _, (h_new, c_new) = self.model.rnn(self.model.encoder(x), hidden, reset)
            else:
                hs, cs, (h_new, c_new) = self.model.forward_states(x, hidden, reset)
                seq = torch.stack(cs if self.state == "cell" else hs).float()  # [L, steps, rows, H]
                mask = real[None, :, :, None]
                if total is not None:
                    total[:, :rows] += (seq * mask).sum(dim=1)
                if peak is not None:
                    chunk_peak = seq.masked_fill(~mask, float("-inf")).amax(dim=1)
                    peak[:, :rows] = torch.maximum(peak[:, :rows], chunk_peak)
            h[:, :rows] = h_new.float()
            c[:, :rows] = c_new.float()
        lengths = torch.from_numpy(self.lengths).to(self.device, torch.float32)[None, :, None]
        pooled = {
            "last": lambda: c if self.state == "cell" else h,
            "mean": lambda: total / lengths,
            "max": lambda: peak,
        }
        return torch.cat([_layers_to_features(pooled[p](), all_layers) for p in self.poolings], dim=1)


def featurize(
    model: RNNModel,
    texts: Sequence[str],
    *,
    batch_size: int = 128,
    pooling: str = "last",
    state: str = "cell",
    all_layers: bool = False,
    preprocess: str | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    fp16: bool = False,
    bf16: bool = False,
    chunk_length: int = 32,
) -> np.ndarray:
    """Features ``[len(texts), F]`` (float32) of ``texts``; F = nhid, or nhid * nlayers with ``all_layers``.

    ``pooling``: ``last`` (the state after the last byte of the preprocessed text, the original's
    features), ``mean`` or ``max`` over all bytes of the preprocessed text (its pads included), or a
    comma-separated list of them (``mean,max,last``: their features concatenated in that order);
    ``state``: ``cell`` (c, the original's choice) or ``hidden`` (h). ``preprocess`` defaults to the
    model's own (``model.config.preprocess``). The model is moved to ``device`` (default: GPU when
    available) and put in eval mode. ``progress``: a bar on a terminal, progress lines in a log
    (progress.py). ``bf16``: the matrix products take bfloat16 operands (state and
gate math stay float32); ``fp16``: float16 operands on a GPU, as ``bf16`` on a CPU (matmul.py).
    """
    poolings = parse_pooling(pooling)
    if state not in STATES:
        raise ValueError(f"state must be one of {', '.join(STATES)}, got {state!r}")
    if batch_size < 1 or chunk_length < 1:
        raise ValueError("batch_size and chunk_length must be positive")
    device = default_device() if device is None else torch.device(device)
    dtype = reduced_dtype(device, fp16, bf16)
    preprocess = preprocess or model.config.preprocess
    model.to(device).eval()

    tokens = [encode(text, preprocess) for text in texts]
    out = np.zeros((len(tokens), num_features(model.config, all_layers, pooling)), dtype=np.float32)
    order = sorted(range(len(tokens)), key=lambda i: -len(tokens[i]))
    with (
        torch.inference_mode(),
        parametrize.cached(),  # weight-normalised weights computed once, not once per chunk
        autocast(device, dtype),
        progress_bar(total=len(tokens), unit="text", desc="featurizing", enabled=progress) as bar,
    ):
        for first in range(0, len(order), batch_size):
            idx = order[first : first + batch_size]
            runner = _BatchRunner(model, [tokens[i] for i in idx], device, poolings, state)
            out[idx] = runner.run(chunk_length, all_layers).float().cpu().numpy()
            bar.update(len(idx))
    return out


def byte_states(
    model: RNNModel,
    token_arrays: Sequence[np.ndarray],
    *,
    units: Sequence[int] | None = None,
    state: str = "cell",
    all_layers: bool = False,
    device: str | torch.device | None = None,
    fp16: bool = False,
    bf16: bool = False,
    chunk_length: int = 256,
) -> list[np.ndarray]:
    """Per token array, the state after every byte: ``[n_bytes, n_units]`` float32.

    Row ``t`` is the state after reading bytes ``0 .. t`` from a zero state, i.e. the ``last``-pooled
    feature of that prefix. Columns are feature indices as ``featurize`` numbers them (``all_layers``:
    layer * nhid + unit, else units of the last layer); ``units`` None keeps them all. Each array runs
    alone, in chunks of ``chunk_length`` steps with the state carried over.
    """
    if state not in STATES:
        raise ValueError(f"state must be one of {', '.join(STATES)}, got {state!r}")
    n_features = num_features(model.config, all_layers)
    columns = np.arange(n_features) if units is None else np.asarray(units, dtype=np.int64).reshape(-1)
    if len(columns) and not (0 <= columns.min() and columns.max() < n_features):
        raise ValueError(f"units must be feature indices 0 .. {n_features - 1}, got {columns.tolist()}")
    device = default_device() if device is None else torch.device(device)
    model.to(device).eval()
    pick = torch.from_numpy(columns).to(device)
    out = []
    with torch.inference_mode(), parametrize.cached(), autocast(device, reduced_dtype(device, fp16, bf16)):
        for tokens in token_arrays:
            x = torch.from_numpy(np.asarray(tokens, dtype=np.int64)).to(device).unsqueeze(1)  # [T, 1]
            hidden, pieces = None, []
            for a in range(0, len(x), chunk_length):
                hs, cs, hidden = model.forward_states(x[a : a + chunk_length], hidden)
                per_layer = torch.stack(cs if state == "cell" else hs).float()[:, :, 0]  # [L, steps, H]
                pieces.append(_layers_to_features(per_layer, all_layers).index_select(1, pick).cpu())
            values = torch.cat(pieces) if pieces else torch.zeros(0, len(columns))
            out.append(values.numpy())  # float32
    return out
