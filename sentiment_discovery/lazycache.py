"""The ``--lazy`` corpus cache: each data file encoded once (in worker processes for a large file)
into a cache folder, then memory-mapped instead of held in memory; rebuilt when the file changes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np

from .errors import DataError
from .readers import (
    CorpusOptions,
    EncodedCorpus,
    check_path,
    csv_frames,
    is_json_path,
    is_loose_json,
    is_text_path,
    json_lines,
    read_text_lines,
    record_where,
    sample_starts,
    text_of,
    tight_json_rows,
    warn_invalid_utf8,
)
from .safe_io import short_name

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
    return user_cache / "sentiment-discovery" / "lazy" / short_name(f"{path.name}-{digest}") / variant


def lazy_corpus(
    path: str | Path,
    options: CorpusOptions | None = None,
    progress: bool = False,
    rebuild: bool = False,
    workers: int | None = None,
    **settings,
) -> EncodedCorpus:
    """The corpus of ``path`` memory-mapped from its cache (``lazy_cache_dir``), built when needed.

    The cache holds ``tokens.bin`` (every sample's bytes, concatenated, uint8), ``starts.npy``
    (sample offsets) and ``meta.json`` (the source file's size and mtime, the options). It is
    rebuilt when the source changed, the options differ, it is damaged (unreadable meta.json or
    starts.npy, a tokens.bin of the wrong size), or ``rebuild`` (``--preprocess``) asks; otherwise
    reading costs nothing and the bytes stay on disk until a batch touches them. Building streams
    (``build_lazy_cache``). ``settings``: fields of ``CorpusOptions`` over ``options``.
    """
    options = replace(options or CorpusOptions(), **settings)
    text_key, delim, loose_json, preprocess = (
        options.text_key, options.delim, options.loose_json, options.preprocess
    )  # fmt: skip
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
        rows = tight_json_rows(path)
        texts = [text_of(row, path, record_where(n, False), meta["text_key"]) for n, row in rows]
        del rows
        for i in range(0, len(texts), LAZY_CHUNK_ROWS):
            chunk = texts[i : i + LAZY_CHUNK_ROWS]
            yield ("texts", None, chunk), sum(map(len, chunk))
    else:
        for frame in csv_frames(path, meta["delim"], meta["text_key"], chunksize=LAZY_CHUNK_ROWS):
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
        sample_starts(lengths, out=starts)
        starts.flush()
        del starts, lengths
        (tmp / "lengths.bin").unlink()
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # written last: marks a complete cache
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(tmp, cache)
    finally:
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)

