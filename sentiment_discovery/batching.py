"""Truncated-BPTT batching of a language-model corpus: samples -> shards -> train/val/test splits ->
rows -> batches of steps (``lm_splits``, options in ``LMDataOptions``).

How a split's byte stream becomes ``rows`` rows and batches of ``T`` steps, as word_language_model's
``batchify`` does; here a stream ``a b c ... x`` (24 bytes) with 4 rows and T = 2::

    stream:  a b c d e f | g h i j k l | m n o p q r | s t u v w x      cut into 4 equal rows
    rows:    row 0        row 1         row 2         row 3

             batch 0   batch 1   batch 2                  step t of a row reads byte t
    row 0:   a b       c d       e                        and predicts byte t + 1, so a
    row 1:   g h       i j       k                        row of 6 bytes has 5 steps; the
    row 2:   m n       o p       q                        last batch is the shorter one
    row 3:   s t       u v       w

A row starts from a zero state and the state is carried from one batch to the next; the reset mask
zeroes it where a shard (or, ``persist_state`` 0, a sample) begins inside a row.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from .errors import DataError
from .lazycache import lazy_corpus
from .readers import CorpusOptions, EncodedCorpus, load_corpus, parse_split

PAD_TARGET = -100  # target of a padded step; the default ignore_index of torch's cross_entropy


def shard_starts(num_samples: int, num_shards: int) -> np.ndarray:
    """Sample index where each of ``num_shards`` contiguous, near-equal shards begins, plus the end.

    A corpus with fewer samples than shards gets one shard per sample.
    """
    if num_shards < 1:
        raise DataError(f"the number of shards must be at least 1 (got {num_shards})")
    shards = min(num_shards, num_samples)
    return (np.arange(shards + 1, dtype=np.int64) * num_samples) // max(shards, 1)


def split_shards(num_shards: int, proportions: tuple[float, float, float]) -> tuple[range, range, range]:
    """Contiguous shard ranges for (train, val, test). A positive val/test part gets at least one shard."""
    _, p_val, p_test = proportions
    n_val = max(1, round(p_val * num_shards)) if p_val > 0 else 0
    n_test = max(1, round(p_test * num_shards)) if p_test > 0 else 0
    n_train = num_shards - n_val - n_test
    if n_train < 1:
        raise DataError(
            f"{num_shards} shard(s) cannot be split into train/val/test parts {proportions}: "
            "use more samples, more --num_shards, or give --valid/--test files"
        )
    return range(0, n_train), range(n_train, n_train + n_val), range(n_train + n_val, num_shards)


@dataclass
class Batch:
    """One truncated-BPTT batch: ``input``/``target`` ``[T, B]`` long, ``reset`` ``[T, B]`` bool.

    ``target`` may be PAD_TARGET (a step that predicts nothing: the loss skips it); ``reset`` marks
    the steps where the row's state is zeroed before that input byte is consumed.
    """

    input: torch.Tensor
    target: torch.Tensor
    reset: torch.Tensor

    @property
    def num_targets(self) -> int:
        return int((self.target != PAD_TARGET).sum())

    def to(self, device) -> Batch:
        return Batch(self.input.to(device), self.target.to(device), self.reset.to(device))


class TBPTTBatches:
    """The batches of one split, in order.

    The split's bytes (its shards, consecutive in the corpus) are one stream, cut into
    ``batch_size`` equal contiguous rows, as word_language_model's ``batchify`` does (the last
    ``< rows`` bytes are dropped). Step ``t`` of a row reads byte ``t`` and predicts byte ``t + 1``;
    batch ``b`` holds steps ``b*T .. b*T + T - 1`` of every row, so every batch has all rows active
    and only the last may be shorter than ``T``. (Dealing whole shards to rows instead left rows of
    unequal length: the tail of each epoch then trained on a few rows at full step size.)

    A row starts from a zero state; inside it, ``persist_state`` 1 resets the state where a shard
    begins, 0 where any sample begins, -1 never. ``seq_length`` < 0 picks ``T`` so that the split
    has ``-seq_length`` batches.

    Distributed (as the original): ``batch_size`` is per process, so the stream is cut into
    ``batch_size * world_size`` rows in all (``total_rows``) and process ``rank`` keeps the
    contiguous block ``row_range`` of them (``rows`` of its own). Every process has the same number
    of batches; together they hold exactly the rows of one process with ``batch_size * world_size``
    rows.
    """

    def __init__(
        self,
        corpus: EncodedCorpus,
        shard_bounds: np.ndarray,
        batch_size: int,
        seq_length: int,
        persist_state: int = 1,
        name: str = "train",
        world_size: int = 1,
        rank: int = 0,
    ):
        if batch_size < 1:
            raise DataError(f"{name}: batch size must be at least 1 (got {batch_size})")
        if seq_length == 0:
            raise DataError(f"{name}: sequence length must not be 0")
        if persist_state not in (-1, 0, 1):
            raise DataError(f"--persist_state must be -1, 0 or 1 (got {persist_state})")
        self.corpus, self.name, self.persist_state = corpus, name, persist_state
        begin, end = int(corpus.starts[shard_bounds[0]]), int(corpus.starts[shard_bounds[-1]])
        # Every row needs two bytes (one prediction); a tiny split gets fewer rows.
        self.total_rows = min(batch_size * world_size, (end - begin) // 2)
        if self.total_rows < 1:
            raise DataError(f"{corpus.path}: the {name} split holds fewer than two bytes of text")
        row_bytes = (end - begin) // self.total_rows
        self.row_range = (rank * self.total_rows // world_size, (rank + 1) * self.total_rows // world_size)
        self.rows = self.row_range[1] - self.row_range[0]
        self.row_begin = begin + row_bytes * np.arange(*self.row_range, dtype=np.int64)
        self.steps = row_bytes - 1  # predictions of every row
        self.seq_length = seq_length if seq_length > 0 else -(-self.steps // -seq_length)
        self.num_batches = -(-self.steps // self.seq_length)
        if persist_state == 0:
            boundaries = corpus.starts[:-1]
        elif persist_state == 1:
            boundaries = corpus.starts[shard_bounds[:-1]]
        else:
            boundaries = np.zeros(0, dtype=np.int64)
        self.boundaries = np.asarray(boundaries, dtype=np.int64)

    def __len__(self) -> int:
        return self.num_batches

    @property
    def num_targets(self) -> int:
        """Predicted bytes in one pass over the split (all processes' rows)."""
        return self.steps * self.total_rows

    def targets_in_batch(self, index: int) -> int:
        """Predicted bytes in batch ``index`` of all processes' rows (``Batch.num_targets`` summed)."""
        return min(self.seq_length, self.steps - index * self.seq_length) * self.total_rows

    def batch(self, index: int) -> Batch:
        first = index * self.seq_length
        steps = min(self.seq_length, self.steps - first)
        pos = self.row_begin[:, None] + first + np.arange(steps, dtype=np.int64)[None, :]  # [B, T]
        inputs = self.corpus.tokens[pos].astype(np.int64)
        targets = self.corpus.tokens[pos + 1].astype(np.int64)
        if len(self.boundaries):
            at = np.searchsorted(self.boundaries, pos).clip(max=len(self.boundaries) - 1)
            reset = self.boundaries[at] == pos
        else:
            reset = np.zeros(pos.shape, dtype=bool)
        as_steps = lambda a: torch.from_numpy(np.ascontiguousarray(a.T))  # [B, T] -> [T, B]
        return Batch(as_steps(inputs), as_steps(targets), as_steps(reset))

    def __iter__(self):
        return (self.batch(i) for i in range(self.num_batches))


@dataclass
class LMSplits:
    train: TBPTTBatches
    val: TBPTTBatches | None
    test: TBPTTBatches | None


@dataclass(frozen=True)
class LMDataOptions:
    """The language-model data of a run (main.py's data flags)."""

    data: str = "./data/imdb/unsup.json"
    valid: str | None = None
    test: str | None = None
    split: str = "100,1,1"
    num_shards: int = 102
    val_shards: int = 0  # 0: num_shards
    test_shards: int = 0
    batch_size: int = 128
    eval_batch_size: int = 0  # 0: batch_size
    seq_length: int = 256
    eval_seq_length: int = 0  # 0: seq_length
    persist_state: int = 1
    text_key: str = "sentence"
    eval_text_key: str | None = None  # None: text_key
    delim: str = ","
    loose_json: bool = False
    preprocess: str = "nvidia"
    lazy: bool = False
    rebuild_cache: bool = False

    @classmethod
    def from_args(cls, args, **settings) -> LMDataOptions:
        """From main.py's flags; ``settings`` give what no flag does (``preprocess``, ``rebuild_cache``)."""
        given = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        return cls(**{**given, **settings})

    def corpus(self, text_key: str) -> CorpusOptions:
        return CorpusOptions(text_key, self.delim, self.loose_json, self.preprocess)


def lm_splits(
    options: LMDataOptions | str,
    valid: str | None = None,
    test: str | None = None,
    *,
    progress: bool = False,
    world_size: int = 1,
    rank: int = 0,
    **settings,
) -> LMSplits:
    """Read the data of ``options`` (or the file ``options`` with ``valid``/``test`` and ``settings``,
    fields of ``LMDataOptions``) into train/val/test batch streams.

    The training file is cut into ``num_shards`` shards partitioned by ``split``; a separate
    evaluation file replaces its part and is cut into ``val_shards``/``test_shards`` shards
    (0: ``num_shards``). Evaluation uses ``eval_batch_size``/``eval_seq_length`` (0: as training).
    ``lazy`` memory-maps each file from its cache (``lazy_corpus``; ``rebuild_cache`` rebuilds it).
    ``world_size``/``rank``: the rows of process ``rank`` (see TBPTTBatches; batch sizes are per process).
    """
    if not isinstance(options, LMDataOptions):
        options = LMDataOptions(data=options, valid=valid, test=test, **settings)
    o = options
    data, valid, test, num_shards, persist_state = o.data, o.valid, o.test, o.num_shards, o.persist_state
    batch_size, seq_length = o.batch_size, o.seq_length
    eval_batch = o.eval_batch_size or batch_size
    eval_seq = o.eval_seq_length or seq_length
    eval_key = o.eval_text_key or o.text_key

    def read(path: str, key: str) -> EncodedCorpus:
        corpus_options = o.corpus(key)
        if o.lazy:
            return lazy_corpus(path, corpus_options, progress, o.rebuild_cache)
        return load_corpus(path, corpus_options, progress)

    corpus = read(data, o.text_key)
    proportions = parse_split(o.split, has_valid=bool(valid), has_test=bool(test))
    bounds = shard_starts(corpus.num_samples, num_shards)
    parts = split_shards(len(bounds) - 1, proportions)

    def from_split(shards: range, rows: int, seq: int, name: str) -> TBPTTBatches | None:
        if not len(shards):
            return None
        split_bounds = bounds[shards.start : shards.stop + 1]
        return TBPTTBatches(corpus, split_bounds, rows, seq, persist_state, name, world_size, rank)

    def from_file(path: str, shards: int, name: str) -> TBPTTBatches:
        eval_corpus = read(path, eval_key)
        eval_bounds = shard_starts(eval_corpus.num_samples, shards or num_shards)
        return TBPTTBatches(
            eval_corpus, eval_bounds, eval_batch, eval_seq, persist_state, name, world_size, rank
        )

    train = from_split(parts[0], batch_size, seq_length, "train")
    if train.total_rows < world_size:
        raise DataError(
            f"{data}: the train split has {train.total_rows} shard(s), fewer than the {world_size} "
            "processes: use more --num_shards"
        )
    val = (
        from_file(valid, o.val_shards, "val") if valid else from_split(parts[1], eval_batch, eval_seq, "val")
    )
    tst = (
        from_file(test, o.test_shards, "test") if test else from_split(parts[2], eval_batch, eval_seq, "test")
    )
    return LMSplits(train, val, tst)

