"""Reading labelled/unlabelled text corpora (csv, tight json, loose json, plain text) with clear errors."""

from __future__ import annotations

import codecs
import contextlib
import csv
import functools
import hashlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np
import pandas as pd
import torch

from .downloads import download_hint


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


# Invalid UTF-8 is replaced by U+FFFD (as errors="replace" does) and counted, so that the reader can say so.
_INVALID_UTF8 = {"bytes": 0}  # running count of this process (decodes happen one at a time)


def _replace_and_count(error: UnicodeDecodeError) -> tuple[str, int]:
    _INVALID_UTF8["bytes"] += error.end - error.start
    return "\ufffd", error.end


codecs.register_error("sentiment-discovery-replace", _replace_and_count)


def decode_utf8(data: bytes) -> tuple[str, int]:
    """``data`` as text (a leading BOM dropped) and the number of invalid bytes replaced by U+FFFD."""
    before = _INVALID_UTF8["bytes"]
    text = data.decode("utf-8-sig", "sentiment-discovery-replace")
    return text, _INVALID_UTF8["bytes"] - before


@contextlib.contextmanager
def open_text(path: Path) -> Iterator[TextIO]:
    """``path`` as UTF-8 text: BOM dropped, newlines as they are, invalid bytes replaced by U+FFFD and,
    once the file has been read through, counted in a warning."""
    before = _INVALID_UTF8["bytes"]
    with open(path, encoding="utf-8-sig", errors="sentiment-discovery-replace", newline="") as f:
        yield f
    warn_invalid_utf8(path, _INVALID_UTF8["bytes"] - before)


def warn_invalid_utf8(path: str | Path, count: int) -> None:
    if count:
        print(f"warning: {path}: {count} invalid UTF-8 byte(s) replaced by U+FFFD", file=sys.stderr)


def check_path(path: str | Path) -> Path:
    """``path`` as a Path of an existing, non-empty file (an empty string is not read as '.')."""
    if not str(path):
        raise DataError("an empty file path was given")
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file{download_hint(path)}")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a csv or json file")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    return path


def _json_value(path: Path, text: str, lineno: int | None = None):
    """``text`` parsed; ``lineno``: the line it is (loose json), else the whole file (tight json)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        tight_hint = lineno is None and text.lstrip()[:1] == "{"
        hint = " (one object per line? pass --loose_json)" if tight_hint else ""
        raise DataError(f"{path}: line {lineno or e.lineno}: malformed json ({e.msg}){hint}") from None
    except RecursionError:
        raise DataError(f"{path}: line {lineno or 1}: json nested too deeply") from None


def json_lines(path: Path, first_line: int, lines: list[bytes]) -> tuple[list[tuple[int, dict]], int]:
    """Loose json: the objects of ``lines`` (line ``first_line`` on; blank lines skipped) with their
    line numbers, and the number of invalid UTF-8 bytes replaced."""
    rows, invalid = [], 0
    for lineno, raw in enumerate(lines, first_line):
        text, bad = decode_utf8(raw)
        invalid += bad
        if not text.strip():
            continue
        obj = _json_value(path, text, lineno)
        if not isinstance(obj, dict):
            raise DataError(f"{path}: line {lineno}: expected a json object, got {type(obj).__name__}")
        rows.append((lineno, obj))
    return rows, invalid


def _tight_json_rows(path: Path) -> list[tuple[int, dict]]:
    """Tight json (one value: a list of objects, or one object), with record numbers."""
    text, invalid = decode_utf8(path.read_bytes())
    warn_invalid_utf8(path, invalid)
    obj = _json_value(path, text)
    if isinstance(obj, dict):
        obj = [obj]
    if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
        raise DataError(f"{path}: expected a json list of objects")
    return list(enumerate(obj, 1))


def _where(n: int, loose: bool) -> str:
    return f"line {n}" if loose else f"record {n}"


def text_of(row: dict, path: Path, where: str, text_key: str) -> str:
    """The text of a json record (None: empty; other values as str)."""
    if text_key not in row:
        raise DataError(f"{path}: {where}: missing text key {text_key!r} (keys: {sorted(map(str, row))})")
    value = row[text_key]
    return "" if value is None else str(value)


def _csv_frames(
    path: Path, delim: str, text_key: str, chunksize: int | None = None
) -> Iterator[pd.DataFrame]:
    """The csv as one frame, or frames of ``chunksize`` rows; the header checked against ``text_key``."""
    try:
        with open_text(path) as f:
            # pandas reads a delimiter of several characters as a regex: escaped, it is the text given
            frames = pd.read_csv(
                f, sep=re.escape(delim) if len(delim) > 1 else delim, dtype=str, keep_default_na=False,
                quoting=csv.QUOTE_MINIMAL, engine="python" if len(delim) > 1 else "c", chunksize=chunksize,
            )  # fmt: skip
            for n, frame in enumerate([frames] if chunksize is None else frames):
                if n == 0:
                    _check_csv_header(path, frame, delim, text_key)
                yield frame
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty") from None
    except (pd.errors.ParserError, csv.Error) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path}: could not parse as csv with delimiter {delim!r}: {first}") from None


def _check_csv_header(path: Path, frame: pd.DataFrame, delim: str, text_key: str) -> None:
    if len(frame.columns) == 1 and text_key not in frame.columns:
        other = [d for d in (",", "\t", ";", "|") if d != delim and d in str(frame.columns[0])]
        hint = f"; the header contains {other[0]!r}: pass --delim {other[0]!r}?" if other else ""
        raise DataError(
            f"{path}: line 1: header has a single column {frame.columns[0]!r} when split on "
            f"delimiter {delim!r}{hint}"
        )
    if text_key not in frame.columns:
        raise DataError(f"{path}: line 1: missing text column {text_key!r} (columns: {list(frame.columns)})")


def is_json_path(path: str | Path, loose_json: bool = False) -> bool:
    return loose_json or Path(path).suffix.lower() in (".json", ".jsonl")


def is_loose_json(path: str | Path, loose_json: bool = False) -> bool:
    """One object per line: ``--loose_json``, or a ``.jsonl`` file."""
    return loose_json or Path(path).suffix.lower() == ".jsonl"


def is_text_path(path: str | Path) -> bool:
    """A plain-text corpus (``.txt``): one sample per line, as char-RNN corpora are."""
    return Path(path).suffix.lower() == ".txt"


def read_text_lines(path: str | Path) -> Iterator[str]:
    """The samples of a plain UTF-8 text file: one per line (line ending removed), blank lines skipped.

    Undecodable bytes become U+FFFD (counted in a warning), as in the csv and json readers. Lines are
    read one at a time.
    """
    path = check_path(path)
    with open_text(path) as f:
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
    A UTF-8 BOM is dropped; invalid UTF-8 is replaced by U+FFFD, with a warning that counts it.
    """
    path = check_path(path)
    if is_json_path(path, loose_json):
        loose = is_loose_json(path, loose_json)
        if loose:
            rows, invalid = json_lines(path, 1, path.read_bytes().split(b"\n"))
            warn_invalid_utf8(path, invalid)
        else:
            rows = _tight_json_rows(path)
        if not rows:
            raise DataError(f"{path}: no records")
        texts = [text_of(row, path, _where(n, loose), text_key) for n, row in rows]
        raw_labels = None
        if need_labels is None:
            need_labels = label_key in rows[0][1]
        if need_labels:
            for n, row in rows:
                if label_key not in row:
                    raise DataError(f"{path}: {_where(n, loose)}: missing label key {label_key!r}")
            raw_labels = [row[label_key] for _, row in rows]
    else:
        (frame,) = _csv_frames(path, delim, text_key)  # read through: open_text has warned
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
    from .preprocess import encode
    from .progress import progress_bar

    bar = progress_bar(texts, desc=f"encoding {Path(path).name}", unit="text", enabled=progress, leave=False)
    return (encode(t, preprocess) for t in bar)


def _sample_starts(lengths: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Offsets of the samples in the concatenated bytes, ``[0, l0, l0 + l1, ...]`` (into ``out``: a
    memmap keeps a large corpus's out of memory)."""
    starts = np.zeros(len(lengths) + 1, dtype=np.int64) if out is None else out
    starts[0] = 0
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
    workers: int | None = None,
) -> EncodedCorpus:
    """The corpus of ``path`` memory-mapped from its cache (``lazy_cache_dir``), built when needed.

    The cache holds ``tokens.bin`` (every sample's bytes, concatenated, uint8), ``starts.npy``
    (sample offsets) and ``meta.json`` (the source file's size and mtime, the options). It is
    rebuilt when the source changed, the options differ, it is damaged (unreadable meta.json or
    starts.npy, a tokens.bin of the wrong size), or ``rebuild`` (``--preprocess``) asks; otherwise
    reading costs nothing and the bytes stay on disk until a batch touches them. Building streams
    (``build_lazy_cache``).
    """
    path = check_path(path)
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
    if not rebuild:
        corpus, damage = _open_lazy_cache(path, cache, meta)
        if corpus is not None:
            return corpus
        if damage:
            print(f"{cache}: {damage}; rebuilding the cache", file=sys.stderr)
    build_lazy_cache(path, cache, meta, progress, workers)
    corpus, damage = _open_lazy_cache(path, cache, meta)
    if corpus is None:
        raise DataError(f"{cache}: the cache just built is unreadable ({damage})")
    return corpus


def _open_lazy_cache(path: Path, cache: Path, meta: dict) -> tuple[EncodedCorpus | None, str]:
    """The cached corpus, or None and what is damaged ('' when there is no cache or it is out of date)."""
    try:
        stored = json.loads((cache / "meta.json").read_text())
    except FileNotFoundError:
        return None, ""
    except (OSError, ValueError):
        return None, "meta.json is damaged"
    if stored != meta:
        return None, ""
    try:
        starts = np.load(cache / "starts.npy", mmap_mode="r", allow_pickle=False)
        if not (starts.dtype == np.int64 and starts.ndim == 1 and len(starts) >= 2 and starts[0] == 0):
            return None, "starts.npy is damaged"
        size = (cache / "tokens.bin").stat().st_size
        if size != int(starts[-1]):
            return None, f"tokens.bin holds {size} bytes where starts.npy says {int(starts[-1])}"
        tokens = np.memmap(cache / "tokens.bin", dtype=np.uint8, mode="r", shape=(size,))
    except (OSError, ValueError) as e:
        return None, f"unreadable ({e})"
    return EncodedCorpus(str(path), tokens, starts), ""


LAZY_UNIT_BYTES = 1 << 20  # source bytes per unit of work (one task of a worker)
LAZY_CHUNK_ROWS = 2000  # csv rows per unit (pandas reads the file in chunks of this many)
LAZY_POOL_MIN_BYTES = 8 << 20  # smaller files are encoded in this process: a pool would cost more


def _work_units(path: Path, meta: dict) -> Iterator[tuple[tuple, int]]:
    """``path`` cut into units of work as it is read, each with its size in source bytes:
    ``("lines", first line, [raw line, ...])`` for loose json, ``("texts", None, [text, ...])`` for
    .txt (line by line), csv (read by pandas in chunks) and tight json (read whole: one json value)."""
    json_file = is_json_path(path, meta["loose_json"])
    if is_text_path(path):
        lines, size = [], 0
        for line in read_text_lines(path):
            lines.append(line)
            size += len(line)
            if size >= LAZY_UNIT_BYTES:
                yield ("texts", None, lines), size
                lines, size = [], 0
        if lines:
            yield ("texts", None, lines), size
    elif json_file and is_loose_json(path, meta["loose_json"]):
        with open(path, "rb") as f:
            lines, size, first = [], 0, 1
            for n, line in enumerate(f, 1):
                lines.append(line)
                size += len(line)
                if size >= LAZY_UNIT_BYTES:
                    yield ("lines", first, lines), size
                    lines, size, first = [], 0, n + 1
            if lines:
                yield ("lines", first, lines), size
    elif json_file:
        rows = _tight_json_rows(path)
        texts = [text_of(row, path, _where(n, False), meta["text_key"]) for n, row in rows]
        del rows
        for i in range(0, len(texts), LAZY_CHUNK_ROWS):
            chunk = texts[i : i + LAZY_CHUNK_ROWS]
            yield ("texts", None, chunk), sum(map(len, chunk))
    else:
        for frame in _csv_frames(path, meta["delim"], meta["text_key"], chunksize=LAZY_CHUNK_ROWS):
            texts = frame[meta["text_key"]].tolist()
            yield ("texts", None, texts), sum(map(len, texts))


def _encode_unit(unit: tuple, path: Path, text_key: str, preprocess: str) -> tuple[bytes, np.ndarray, int]:
    """One unit's samples encoded: their bytes concatenated, their lengths, the invalid UTF-8 bytes."""
    from .preprocess import encode_bytes

    kind, first_line, payload = unit
    invalid = 0
    if kind == "lines":
        rows, invalid = json_lines(path, first_line, payload)
        texts = [text_of(row, path, f"line {n}", text_key) for n, row in rows]
    else:
        texts = payload
    pieces = [encode_bytes(t, preprocess) for t in texts]
    return b"".join(pieces), np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces)), invalid


def _map_ordered(function: Callable, items: Iterable, workers: int) -> Iterator:
    """``function(item)`` of each item, in order, on ``workers`` processes (1: in this one), never more
    than a few items ahead of the consumer (``Pool.imap`` would read all of ``items`` at once)."""
    if workers <= 1:
        yield from map(function, items)
        return
    # fork: the workers start at once and share this process's pages; they never touch torch
    context = multiprocessing.get_context(
        "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    )
    # the workers ignore Ctrl-C: this process handles it (and ends the pool), without a traceback per worker
    with context.Pool(workers, initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN)) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.apply_async(function, (item,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def build_lazy_cache(path: Path, cache: Path, meta: dict, progress: bool, workers: int | None = None) -> None:
    """Encode ``path`` into a temporary folder beside ``cache``, then swap it in.

    Memory stays bounded whatever the size of the file (tight json aside: one value, read whole):
    it is read a unit at a time (``_work_units``), encoded on ``workers`` processes (default: every
    core for files of LAZY_POOL_MIN_BYTES or more), and the bytes and sample lengths go to disk as
    they come; the sample offsets are then summed from the lengths file, memmap to memmap.
    """
    from .progress import progress_bar

    if workers is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = cores if meta["source_size"] >= LAZY_POOL_MIN_BYTES else 1
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache.name}.", dir=cache.parent))
    sizes: deque = deque()  # source bytes of the units handed out, for the progress bar

    def units() -> Iterator[tuple]:
        for unit, size in _work_units(path, meta):
            sizes.append(size)
            yield unit

    encode = functools.partial(
        _encode_unit, path=path, text_key=meta["text_key"], preprocess=meta["preprocess"]
    )
    bar = progress_bar(total=meta["source_size"], desc=f"caching {path.name}", unit="B", unit_scale=True,
                       enabled=progress, leave=False)  # fmt: skip
    try:
        samples, invalid = 0, 0
        with (tmp / "tokens.bin").open("wb") as tokens, (tmp / "lengths.bin").open("wb") as lengths:
            for data, unit_lengths, unit_invalid in _map_ordered(encode, units(), workers):
                tokens.write(data)
                lengths.write(unit_lengths.tobytes())
                samples += len(unit_lengths)
                invalid += unit_invalid
                bar.update(sizes.popleft())
        warn_invalid_utf8(path, invalid)
        if samples == 0:
            what = "no text (every line is blank)" if is_text_path(path) else "no records"
            raise DataError(f"{path}: {what}")
        lengths = np.memmap(tmp / "lengths.bin", dtype=np.int64, mode="r", shape=(samples,))
        starts = np.lib.format.open_memmap(
            tmp / "starts.npy", mode="w+", dtype=np.int64, shape=(samples + 1,)
        )
        _sample_starts(lengths, out=starts)
        starts.flush()
        del starts, lengths
        (tmp / "lengths.bin").unlink()
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # written last: marks a complete cache
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(tmp, cache)
    finally:
        bar.close()
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
