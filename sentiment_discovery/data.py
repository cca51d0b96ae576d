"""Reading labelled/unlabelled text corpora (csv, tight json, loose json, plain text) with clear errors."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch


class DataError(Exception):
    """Bad input data: the message names the file and, where it applies, the line and key."""


@dataclass
class Records:
    """Texts of a corpus file and, when asked for, their 0/1 labels."""

    path: str
    texts: list[str]
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.texts)


def _read_json_records(path: Path, loose: bool) -> list[dict]:
    raw = path.read_bytes().decode("utf-8", errors="replace")
    if loose:
        rows = []
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {lineno}: malformed json ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}: line {lineno}: expected a json object, got {type(obj).__name__}")
            rows.append(obj)
        return rows
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as e:
        hint = " (one object per line? pass --loose_json)" if raw.lstrip().startswith("{") else ""
        raise DataError(f"{path}: line {e.lineno}: malformed json ({e.msg}){hint}") from None
    if isinstance(obj, dict):
        obj = [obj]
    if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
        raise DataError(f"{path}: expected a json list of objects")
    return obj


def _read_csv_frame(path: Path, delim: str) -> pd.DataFrame:
    try:
        return pd.read_csv(
            path, sep=delim, dtype=str, keep_default_na=False, encoding="utf-8", encoding_errors="replace",
            quoting=csv.QUOTE_MINIMAL, engine="python" if len(delim) > 1 else "c",
        )
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty") from None
    except pd.errors.ParserError as e:
        raise DataError(f"{path}: could not parse as csv with delimiter {delim!r}: {e}") from None


def is_json_path(path: str | Path, loose_json: bool = False) -> bool:
    return loose_json or Path(path).suffix.lower() in (".json", ".jsonl")


def is_text_path(path: str | Path) -> bool:
    """A plain-text corpus (``.txt``): one sample per line, as char-RNN corpora are."""
    return Path(path).suffix.lower() == ".txt"


def read_text_lines(path: str | Path) -> Iterator[str]:
    """The samples of a plain UTF-8 text file: one per line (line ending removed), blank lines skipped.

    Undecodable bytes become U+FFFD, as in the csv and json readers. Lines are read one at a time.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with path.open(encoding="utf-8", errors="replace", newline="") as f:
        for line in f:
            line = line.rstrip("\r\n")
            if line.strip():
                yield line


def corpus_texts(path: str | Path, text_key: str, delim: str, loose_json: bool) -> list[str]:
    """The texts of a language-model corpus: a ``.txt`` file's lines, else the ``text_key`` of each record."""
    if is_text_path(path):
        texts = list(read_text_lines(path))
        if not texts:
            raise DataError(f"{path}: no text (every line is blank)")
        return texts
    return read_records(path, text_key=text_key, delim=delim, loose_json=loose_json).texts


def read_records(
    path: str | Path,
    text_key: str = "sentence",
    label_key: str = "label",
    delim: str = ",",
    loose_json: bool = False,
    need_labels: bool | None = False,
    binarize_labels: bool = False,
) -> Records:
    """Read ``path`` (csv, or json when it ends in .json/.jsonl or ``loose_json``) into Records.

    ``need_labels=None`` reads labels when the file has them (the column, or the key in the first
    record) and then requires them everywhere.
    With ``need_labels`` the ``label_key`` column must exist and hold 0/1 (or numeric values with
    ``binarize_labels``: rescaled to [0, 1] and thresholded at > 0.5, as the original suite did).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a csv or json file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")

    if is_json_path(path, loose_json):
        rows = _read_json_records(path, loose_json or path.suffix.lower() == ".jsonl")
        if not rows:
            raise DataError(f"{path}: no records")
        for n, row in enumerate(rows, 1):
            if text_key not in row:
                where = f"line {n}" if loose_json else f"record {n}"
                raise DataError(f"{path}: {where}: missing text key {text_key!r} (keys: {sorted(row)})")
        texts = ["" if row[text_key] is None else str(row[text_key]) for row in rows]
        raw_labels = None
        if need_labels is None:
            need_labels = label_key in rows[0]
        if need_labels:
            for n, row in enumerate(rows, 1):
                if label_key not in row:
                    raise DataError(f"{path}: record {n}: missing label key {label_key!r}")
            raw_labels = [row[label_key] for row in rows]
    else:
        frame = _read_csv_frame(path, delim)
        if len(frame.columns) == 1 and text_key not in frame.columns:
            other = [d for d in (",", "\t", ";", "|") if d != delim and d in frame.columns[0]]
            hint = f"; the header contains {other[0]!r}: pass --delim {other[0]!r}?" if other else ""
            raise DataError(
                f"{path}: line 1: header has a single column {frame.columns[0]!r} when split on "
                f"delimiter {delim!r}{hint}"
            )
        if text_key not in frame.columns:
            columns = list(frame.columns)
            raise DataError(f"{path}: line 1: missing text column {text_key!r} (columns: {columns})")
        if frame.empty:
            raise DataError(f"{path}: no records (only a header)")
        texts = frame[text_key].tolist()
        raw_labels = None
        if need_labels is None:
            need_labels = label_key in frame.columns
        if need_labels:
            if label_key not in frame.columns:
                columns = list(frame.columns)
                raise DataError(f"{path}: line 1: missing label column {label_key!r} (columns: {columns})")
            raw_labels = frame[label_key].tolist()

    labels = None if raw_labels is None else _labels(path, raw_labels, binarize_labels)
    return Records(str(path), texts, labels)


def _labels(path: Path, raw: list, binarize: bool) -> np.ndarray:
    try:
        values = np.array([float(v) for v in raw], dtype=np.float64)
    except (TypeError, ValueError):
        bad = next(v for v in raw if not _is_number(v))
        line = raw.index(bad) + 1
        raise DataError(f"{path}: record {line}: label {bad!r} is not a number") from None
    if binarize:
        lo, hi = values.min(), values.max()
        scaled = (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)
        return (scaled > 0.5).astype(np.int64)
    seen = sorted(set(values.tolist()))
    if not set(seen) <= {0.0, 1.0}:
        shown = ", ".join(f"{v:g}" for v in seen[:10]) + (" ..." if len(seen) > 10 else "")
        raise DataError(
            f"{path}: labels must be 0 or 1, saw {shown} "
            "(pass --binarize_labels to rescale ratings such as 1-5)"
        )
    return values.astype(np.int64)


def _is_number(v) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------------------------
# Language-model corpus: samples -> shards -> splits -> truncated-BPTT batches
# --------------------------------------------------------------------------------------------

PAD_TARGET = -100  # target of a padded step; the default ignore_index of torch's cross_entropy


@dataclass
class EncodedCorpus:
    """Every sample of a corpus, preprocessed and byte-encoded, concatenated in file order.

    ``tokens`` (uint8) may be a numpy memmap; ``starts[i]`` is the byte offset of sample ``i`` and
    ``starts[-1] == len(tokens)``.
    """

    path: str
    tokens: np.ndarray
    starts: np.ndarray

    @property
    def num_samples(self) -> int:
        return len(self.starts) - 1


def _encoded_texts(texts: list[str], path: str, preprocess: str, progress: bool) -> Iterator[np.ndarray]:
    """Each text preprocessed and byte-encoded (the per-text cleaning is the cost), in order."""
    from tqdm import tqdm

    from .preprocess import encode

    bar = tqdm(texts, desc=f"encoding {Path(path).name}", unit="text", disable=not progress, leave=False)
    return (encode(t, preprocess) for t in bar)


def _sample_starts(lengths: np.ndarray) -> np.ndarray:
    starts = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    return starts


def encode_corpus(
    texts: list[str], path: str = "<texts>", preprocess: str = "nvidia", progress: bool = False
) -> EncodedCorpus:
    """Preprocess and byte-encode every text, then concatenate (the whole corpus in memory)."""
    pieces = list(_encoded_texts(texts, path, preprocess, progress))
    starts = _sample_starts(np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces)))
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint8)
    return EncodedCorpus(str(path), tokens, starts)


def load_corpus(
    path: str | Path,
    text_key: str = "sentence",
    delim: str = ",",
    loose_json: bool = False,
    preprocess: str = "nvidia",
    progress: bool = False,
) -> EncodedCorpus:
    return encode_corpus(corpus_texts(path, text_key, delim, loose_json), str(path), preprocess, progress)


LAZY_CACHE_VERSION = 1


def lazy_cache_dir(path: str | Path, text_key: str, delim: str, loose_json: bool, preprocess: str) -> Path:
    """Folder of the ``--lazy`` cache of ``path`` read with these options.

    ``$XDG_CACHE_HOME`` (default ``~/.cache``) ``/sentiment-discovery/lazy/<file>-<hash of its absolute
    path>/<preprocessing>-<hash of the options>/``: never beside the data, which may be shared or read-only.
    """
    path = Path(path).resolve()
    options = json.dumps([text_key, delim, loose_json]).encode()
    variant = f"{preprocess}-{hashlib.sha1(options).hexdigest()[:10]}"
    user_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    return user_cache / "sentiment-discovery" / "lazy" / f"{path.name}-{digest}" / variant


def lazy_corpus(
    path: str | Path,
    text_key: str = "sentence",
    delim: str = ",",
    loose_json: bool = False,
    preprocess: str = "nvidia",
    progress: bool = False,
    rebuild: bool = False,
) -> EncodedCorpus:
    """The corpus of ``path`` memory-mapped from its cache (``lazy_cache_dir``), built when needed.

    The cache holds ``tokens.bin`` (every sample's bytes, concatenated, uint8), ``starts.npy``
    (sample offsets) and ``meta.json`` (the source file's size and mtime, the options). It is
    rebuilt when the source changed, the options differ, or ``rebuild`` (``--preprocess``) asks;
    otherwise reading costs nothing and the bytes stay on disk until a batch touches them.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    cache = lazy_cache_dir(path, text_key, delim, loose_json, preprocess)
    source = path.stat()
    meta = {
        "version": LAZY_CACHE_VERSION,
        "source": str(path.resolve()),
        "source_size": source.st_size,
        "source_mtime_ns": source.st_mtime_ns,
        "text_key": text_key,
        "delim": delim,
        "loose_json": loose_json,
        "preprocess": preprocess,
    }
    meta_path = cache / "meta.json"
    if rebuild or not meta_path.exists() or json.loads(meta_path.read_text()) != meta:
        _build_lazy_cache(path, cache, meta, progress)
    starts = np.load(cache / "starts.npy", mmap_mode="r")
    tokens = np.memmap(cache / "tokens.bin", dtype=np.uint8, mode="r", shape=(int(starts[-1]),))
    return EncodedCorpus(str(path), tokens, starts)


def _build_lazy_cache(path: Path, cache: Path, meta: dict, progress: bool) -> None:
    """Encode ``path`` into a temporary folder beside ``cache`` (bytes streamed to disk), then swap it in."""
    texts = corpus_texts(path, meta["text_key"], meta["delim"], meta["loose_json"])
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", dir=cache.parent))
    try:
        lengths = np.zeros(len(texts), dtype=np.int64)
        with (tmp / "tokens.bin").open("wb") as out:
            for i, piece in enumerate(_encoded_texts(texts, str(path), meta["preprocess"], progress)):
                out.write(piece.tobytes())
                lengths[i] = len(piece)
        np.save(tmp / "starts.npy", _sample_starts(lengths))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # written last: marks a complete cache
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(tmp, cache)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def parse_split(spec: str, has_valid: bool = False, has_test: bool = False) -> tuple[float, float, float]:
    """``--split`` ("100,1,1", "0.9/0.1", "1.") -> normalised (train, val, test) proportions.

    As in the original: proportions summing below 1 get the remainder appended; a separately
    given ``--valid``/``--test`` file zeroes that part of the split.
    """
    try:
        parts = [float(s) for s in spec.replace("/", ",").split(",") if s.strip()]
    except ValueError:
        raise DataError(f"--split {spec!r}: expected comma-separated numbers such as 100,1,1") from None
    if not parts or any(p < 0 for p in parts) or len(parts) > 3:
        raise DataError(f"--split {spec!r}: expected one to three non-negative proportions")
    if sum(parts) < 1.0:
        parts.append(1.0 - sum(parts))
    parts = (parts + [0.0, 0.0])[:3]
    if has_valid:
        parts[1] = 0.0
    if has_test:
        parts[2] = 0.0
    total = sum(parts)
    if parts[0] <= 0 or total <= 0:
        raise DataError(f"--split {spec!r}: the training part must be positive")
    return parts[0] / total, parts[1] / total, parts[2] / total


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


def lm_splits(
    data: str,
    valid: str | None = None,
    test: str | None = None,
    *,
    split: str = "100,1,1",
    num_shards: int = 102,
    val_shards: int = 0,
    test_shards: int = 0,
    batch_size: int = 128,
    eval_batch_size: int = 0,
    seq_length: int = 256,
    eval_seq_length: int = 0,
    persist_state: int = 1,
    text_key: str = "sentence",
    eval_text_key: str | None = None,
    delim: str = ",",
    loose_json: bool = False,
    preprocess: str = "nvidia",
    progress: bool = False,
    lazy: bool = False,
    rebuild_cache: bool = False,
    world_size: int = 1,
    rank: int = 0,
) -> LMSplits:
    """Read ``data`` (and the optional ``valid``/``test`` files) into train/val/test batch streams.

    The training file is cut into ``num_shards`` shards partitioned by ``split``; a separate
    evaluation file replaces its part and is cut into ``val_shards``/``test_shards`` shards
    (0: ``num_shards``). Evaluation uses ``eval_batch_size``/``eval_seq_length`` (0: as training).
    ``lazy`` memory-maps each file from its cache (``lazy_corpus``; ``rebuild_cache`` rebuilds it).
    ``world_size``/``rank``: the rows of process ``rank`` (see TBPTTBatches; batch sizes are per process).
    """
    eval_batch = eval_batch_size or batch_size
    eval_seq = eval_seq_length or seq_length
    eval_key = eval_text_key or text_key

    def read(path: str, key: str) -> EncodedCorpus:
        if lazy:
            return lazy_corpus(path, key, delim, loose_json, preprocess, progress, rebuild_cache)
        return load_corpus(path, key, delim, loose_json, preprocess, progress)

    corpus = read(data, text_key)
    proportions = parse_split(split, has_valid=bool(valid), has_test=bool(test))
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
    val = from_file(valid, val_shards, "val") if valid else from_split(parts[1], eval_batch, eval_seq, "val")
    tst = from_file(test, test_shards, "test") if test else from_split(parts[2], eval_batch, eval_seq, "test")
    return LMSplits(train, val, tst)
