"""Featurization: one vector per text from the recurrent states of a language model.

For the mLSTM, texts are PACKED end to end into ``batch_size`` rows, longest text first, each to the
row with the fewest bytes so far (``pack_rows``), so the rows end within about one short text of each
other. Texts a..i of 9, 7, 6, 5, 4, 3, 3, 2 and 1 bytes in 3 rows (capitals: each text's first byte,
where the reset mask zeroes the row's state; ``.``: padding)::

    step   0 1 2 3 4 5 6 7 8 9 10 11 12 13
    row 0  B b b b b b b E e e e  G  g  g      rows longest first: the rows with
    row 1  A a a a a a a a a F f  f  I  .      bytes left are a prefix
    row 2  C c c c c c D d d d d  H  h  .

At a reset the mLSTM's fused loop only multiplies the state by a keep mask, so several texts in a row
cost nothing more than one. The rows run in chunks of ``chunk_length`` steps with the state carried
over, and every position of a chunk belongs to one text (its segment) or to padding: a text's ``last``
feature is the state at its last byte, its mean/max/min pool its own positions alone (scatter
reductions by segment, ``readout.Pooler.add_to_slots``), a text crossing into the next chunk carrying
its running pools along. Every product then runs all ``batch_size`` rows but for the last steps, where
rows leave in groups of ``ROW_MULTIPLE`` as the longest row of each group ends (``row_plan``): few
row-steps are padding, and the products meet a handful of shape classes however the lengths fall
(matmul.py). Memory depends on the chunk length and the row count, not on the length of any text: a
very long text occupies a row of its own while the others share the rest.

Why: batches of length-sorted texts (below) start with few rows running, and at H=4096 a step of few
rows costs nearly as much as a full one (each step reads the whole weight matrices): real text ran at
0.69 of the rate of fixed-length text of the same size (bench/RESULTS.md, issue 20).

PyTorch's fused stacks (LSTM, GRU, RNNs: ``RNNModel.cheap_resets`` is False) split their call at every
step where a row resets, which packing would make most steps. For them texts are sorted by length and
batched with their neighbours, LEFT-padded so that all rows of a batch end on the same step, and the
reset mask zeroes each row's state just before its first real byte: the final state of every row is
then exactly the state after its own last byte. Rows join the computation in groups of
``ROW_MULTIPLE`` at the chunk where their group's first text starts (``chunk_plan``).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.nn.utils import parametrize

from .errors import UsageError
from .matmul import autocast, reduced_dtype
from .mlstm_kernels import reuse_step_weights
from .model import RNNModel
from .preprocess import encode
from .progress import progress_bar
from .readout import FeatureSpec, Pooler

ROW_MULTIPLE = 16  # rows leave (packed rows) or join (left-padded batches) the computation in groups of this


def bucket_length(n: int, multiple: int = 32) -> int:
    """``n`` rounded up to a multiple of ``multiple``: pad a batch's length (or row count) to it so that
    only a few distinct product shapes occur (e.g. a fine-tuning loop over sentences of any length)."""
    return -(-n // multiple) * multiple


def chunk_plan(
    starts: np.ndarray, total: int, chunk_length: int, row_multiple: int = ROW_MULTIPLE
) -> list[tuple[int, int, int]]:
    """``(first step, end step, rows)`` of each chunk of a left-padded batch of ``total`` steps whose
    row ``j`` starts at step ``starts[j]`` (ascending: longest text first).

    Rows join in groups of ``row_multiple``, each group at its first row's start (its other rows run
    on padding until their own start, where the reset mask zeroes their state), and a chunk ends where
    the next group joins or after ``chunk_length`` steps. So every chunk runs a multiple of
    ``row_multiple`` rows (or the whole batch), and rows run on padding only for the spread of starts
    within their group, not for up to a whole chunk.
    """
    rows_in_batch = len(starts)
    joins = sorted({int(starts[g]) for g in range(0, rows_in_batch, row_multiple)} - {0}) + [total]
    plan, a = [], 0
    for join in joins:
        while a < join:
            b = min(a + chunk_length, join)
            started = int(np.searchsorted(starts, b, side="left"))  # rows whose text starts before b
            plan.append((a, b, min(rows_in_batch, bucket_length(started, row_multiple))))
            a = b
    return plan


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class _BatchRunner:
    """Runs one length-sorted (longest first) batch of token arrays through ``model`` in chunks."""

    def __init__(
        self,
        model: RNNModel,
        tokens: list[np.ndarray],
        device: torch.device,
        spec: FeatureSpec,
    ):
        self.model, self.tokens, self.device, self.spec = model, tokens, device, spec
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
            if start >= b:  # joined with its group, its text starts in a later chunk: padding here
                continue
            first = max(a, start)
            chunk[first - a :, j] = self.tokens[j][first - start : b - start]
            if a <= start < b:
                reset[start - a, j] = True
        real = np.arange(a, b)[:, None] >= self.starts[None, :rows]
        to = lambda x: torch.from_numpy(x).to(self.device)
        return to(chunk), to(reset), to(real)

    def run(self, chunk_length: int, on_chunk: Callable[[int], object] | None = None) -> torch.Tensor:
        """The pooled features of the batch; ``on_chunk(n)`` after each chunk of steps with the number of
        real (non-padding) bytes it read, for progress within long texts."""
        B = len(self.tokens)
        h, c = self.model.zero_state(B, self.device)
        pooler = Pooler(self.spec, *h.shape, self.device)
        for a, b, rows in chunk_plan(self.starts, self.total, chunk_length):
            x, reset, real = self._chunk_inputs(a, b, rows)
            hidden = (h[:, :rows], c[:, :rows])
            if not pooler.per_step:
                h_new, c_new = self.model.final_state(x, hidden, reset)
            else:
                hs, cs, (h_new, c_new) = self.model.forward_states(x, hidden, reset)
                steps = torch.stack(cs if self.spec.state == "cell" else hs).float()  # [L, steps, rows, H]
                pooler.add(steps, real, rows)
            h[:, :rows] = h_new.float()
            c[:, :rows] = c_new.float()
            if on_chunk is not None:
                on_chunk(int(real.sum()))
        lengths = torch.from_numpy(self.lengths).to(self.device)
        return pooler.features(c if self.spec.state == "cell" else h, lengths)


def pack_rows(lengths: Sequence[int], rows: int) -> list[list[int]]:
    """Indices of ``lengths`` (texts) per row, for texts packed end to end into at most ``rows`` rows:
    longest text first, each to the row with the fewest bytes so far, so the rows end within about one
    short text of each other. Rows come longest first (the rows still running are a prefix)."""
    rows = min(rows, len(lengths))
    heap = [(0, r) for r in range(rows)]  # (bytes so far, row)
    packed: list[list[int]] = [[] for _ in range(rows)]
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        size, r = heapq.heappop(heap)
        packed[r].append(i)
        heapq.heappush(heap, (size + lengths[i], r))
    totals = [sum(lengths[i] for i in row) for row in packed]
    return [packed[r] for r in sorted(range(rows), key=lambda r: -totals[r])]


def row_plan(
    row_lengths: np.ndarray, chunk_length: int, row_multiple: int = ROW_MULTIPLE
) -> list[tuple[int, int, int]]:
    """``(first step, end step, rows)`` of each chunk of packed rows of ``row_lengths`` steps (descending).

    Rows leave in groups of ``row_multiple``, each group when its longest row ends, and a chunk ends
    where a group leaves or after ``chunk_length`` steps: every chunk runs a multiple of
    ``row_multiple`` rows (or all of them), rows that ended run on padding only until their group's end.
    """
    total_rows = len(row_lengths)
    leaves = sorted({int(row_lengths[g]) for g in range(0, total_rows, row_multiple)})
    plan, a = [], 0
    for leave in leaves:
        while a < leave:
            b = min(a + chunk_length, leave)
            running = int(np.count_nonzero(row_lengths > a))
            plan.append((a, b, min(total_rows, bucket_length(running, row_multiple))))
            a = b
    return plan


class _PackedRunner:
    """Runs texts packed end to end into rows (``pack_rows``) through ``model`` in chunks of steps, the
    reset mask zeroing the state at each text's first byte, and pools each text over its own steps."""

    def __init__(
        self,
        model: RNNModel,
        tokens: list[np.ndarray],
        batch_size: int,
        device: torch.device,
        spec: FeatureSpec,
    ):
        self.model, self.device, self.spec = model, device, spec
        lengths = [len(t) for t in tokens]
        # a text of no bytes (no preprocessing makes one) has no steps: it keeps zero features
        texts = [i for i in range(len(tokens)) if lengths[i]]
        rows = [[texts[j] for j in row] for row in pack_rows([lengths[i] for i in texts], batch_size)]
        order = [i for row in rows for i in row]  # the texts in the order of the packed rows
        self.flat = np.concatenate([tokens[i] for i in order]) if order else np.zeros(0, np.uint8)
        self.row_length = np.array([sum(lengths[i] for i in row) for row in rows], dtype=np.int64)
        self.row_start = np.cumsum(self.row_length) - self.row_length  # in ``flat``
        # the segments of ``flat`` (texts, in that order): text index, start, bytes, row, first step in row
        self.text = np.array(order, dtype=np.int64)
        self.length = np.array([lengths[i] for i in order], dtype=np.int64)
        self.start = np.cumsum(self.length) - self.length
        self.row = np.repeat(np.arange(len(rows)), [len(row) for row in rows])
        self.first_step = self.start - self.row_start[self.row]

    def _chunk_inputs(self, a: int, b: int, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Tokens ``[b-a, rows]`` of steps a..b, the reset mask, and the segment of each position (-1:
        padding after a row's end)."""
        step = np.arange(a, b)[:, None]
        at = self.row_start[None, :rows] + step  # positions in ``flat``
        real = step < self.row_length[None, :rows]
        at = np.where(real, at, 0)
        segment = np.where(real, np.searchsorted(self.start, at, side="right") - 1, -1)
        tokens = np.where(real, self.flat[at], 0).astype(np.int64)
        reset = real & (at == self.start[segment])
        return tokens, reset, segment

    def run(
        self, chunk_length: int, out: np.ndarray, on_chunk: Callable[[int], object] | None = None
    ) -> None:
        """Writes each text's features into its row of ``out``; ``on_chunk(n)`` after each chunk of steps
        with the number of real bytes it read."""
        if not len(self.text):
            return
        spec, device = self.spec, self.device
        h, c = self.model.zero_state(len(self.row_length), device)
        L = h.shape[0] if spec.all_layers else 1
        to = lambda x: torch.from_numpy(x).to(device)
        carried, carried_pools = np.zeros(0, np.int64), {}  # segments open at the end of the last chunk
        for a, b, rows in row_plan(self.row_length, chunk_length):
            tokens, reset, segment = self._chunk_inputs(a, b, rows)
            hs, cs, (h_new, c_new) = self.model.forward_states(to(tokens), (h[:, :rows], c[:, :rows]),
                                                               to(reset))
            h[:, :rows] = h_new.float()
            c[:, :rows] = c_new.float()
            # the states [steps * rows, H] of the layers read, and those at some positions [L, n, H]
            per_layer = [s.flatten(0, 1) for s in (cs if spec.state == "cell" else hs)[-L:]]
            states = lambda at, seqs=per_layer: torch.stack([s.index_select(0, to(at)) for s in seqs]).float()
            # positions (step * rows + row) of real bytes, and the segments of this chunk numbered 0..k-1
            real = np.flatnonzero(segment.reshape(-1) >= 0)
            here, slot = np.unique(segment.reshape(-1)[real], return_inverse=True)
            pooler = Pooler(spec, L, len(here), h.shape[-1], device)
            if pooler.per_step:
                pooler.add_to_slots(states(real), to(slot.reshape(-1)))
                if len(carried):  # segments that began in an earlier chunk: what they pooled there
                    pooler.add_to_slots(carried_pools, to(np.searchsorted(here, carried)))
            end_step = self.first_step[here] + self.length[here]
            ends = np.flatnonzero(end_step <= b)
            last = states((end_step[ends] - 1 - a) * rows + self.row[here[ends]])
            features = pooler.features(last, to(self.length[here[ends]]), to(ends))
            out[self.text[here[ends]]] = features.float().cpu().numpy()
            opens = to(np.flatnonzero(end_step > b))
            carried = here[end_step > b]
            carried_pools = {p: v.index_select(1, opens) for p, v in pooler.pools.items()}
            if on_chunk is not None:
                on_chunk(len(real))


def featurize(
    model: RNNModel,
    texts: Sequence[str],
    *,
    batch_size: int = 128,
    pooling: str = "last",
    state: str = "cell",
    all_layers: bool = False,
    spec: FeatureSpec | None = None,
    preprocess: str | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    fp16: bool = False,
    bf16: bool = False,
    chunk_length: int = 32,
) -> np.ndarray:
    """Features ``[len(texts), F]`` (float32) of ``texts``; F = nhid, or nhid * nlayers with ``all_layers``,
    per pooling (readout.py numbers them).

    ``spec`` (a ``readout.FeatureSpec``), or the flags' spellings: ``pooling`` ``last`` (the state after
    the last byte of the preprocessed text, the original's features), or a pooling over all bytes of the
    preprocessed text (its pads included; ``readout.POOLINGS``), or a comma-separated list of them
    (``mean,max,last``: their features concatenated in that order); ``state``: ``cell`` (c, the
    original's choice) or ``hidden`` (h); ``all_layers``. ``preprocess`` defaults to the
    model's own (``model.config.preprocess``). The model is moved to ``device`` (default: GPU when
    available) and put in eval mode. ``progress``: a bar on a terminal, progress lines in a log
    (progress.py). ``bf16``: the matrix products take bfloat16 operands (state and gate math stay
    float32); ``fp16``: float16 operands on a GPU, as ``bf16`` on a CPU (matmul.py). ``batch_size``: the
    rows the texts are packed into (mLSTM), or the texts per left-padded batch (the torch stacks).
    """
    spec = spec or FeatureSpec.parse(pooling, state, all_layers)
    if batch_size < 1 or chunk_length < 1:
        raise UsageError("batch_size and chunk_length must be positive")
    device = default_device() if device is None else torch.device(device)
    dtype = reduced_dtype(device, fp16, bf16)
    preprocess = preprocess or model.config.preprocess
    model.to(device).eval()

    tokens = [encode(text, preprocess) for text in texts]
    out = np.zeros((len(tokens), spec.num_features(model.config)), dtype=np.float32)
    with (
        torch.inference_mode(),
        parametrize.cached(),  # weight-normalised weights computed once, not once per chunk
        reuse_step_weights(),  # ...and laid out once per row count, not once per chunk
        autocast(device, dtype),
        # counted in bytes, so that one long text shows progress too
        progress_bar(
            total=sum(len(t) for t in tokens), unit="B", unit_scale=True, desc="featurizing", enabled=progress
        ) as bar,
    ):
        if model.cheap_resets:  # texts packed end to end into batch_size rows
            _PackedRunner(model, tokens, batch_size, device, spec).run(chunk_length, out, bar.update)
            return out
        order = sorted(range(len(tokens)), key=lambda i: -len(tokens[i]))  # left-padded batches
        for first in range(0, len(order), batch_size):
            idx = order[first : first + batch_size]
            runner = _BatchRunner(model, [tokens[i] for i in idx], device, spec)
            out[idx] = runner.run(chunk_length, bar.update).float().cpu().numpy()
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
    spec = FeatureSpec.parse("last", state, all_layers)
    n_features = spec.num_features(model.config)
    columns = np.arange(n_features) if units is None else np.asarray(units, dtype=np.int64).reshape(-1)
    if len(columns) and not (0 <= columns.min() and columns.max() < n_features):
        raise UsageError(f"units must be feature indices 0 .. {n_features - 1}, got {columns.tolist()}")
    device = default_device() if device is None else torch.device(device)
    model.to(device).eval()
    pick = torch.from_numpy(columns).to(device)
    out = []
    with (
        torch.inference_mode(),
        parametrize.cached(),
        reuse_step_weights(),
        autocast(device, reduced_dtype(device, fp16, bf16)),
    ):
        for tokens in token_arrays:
            x = torch.from_numpy(np.asarray(tokens, dtype=np.int64)).to(device).unsqueeze(1)  # [T, 1]
            hidden, pieces = None, []
            for a in range(0, len(x), chunk_length):
                hs, cs, hidden = model.forward_states(x[a : a + chunk_length], hidden)
                per_layer = torch.stack(cs if state == "cell" else hs).float()[:, :, 0]  # [L, steps, H]
                pieces.append(spec.layers_to_features(per_layer).index_select(1, pick).cpu())
            values = torch.cat(pieces) if pieces else torch.zeros(0, len(columns))
            out.append(values.numpy())  # float32
    return out
