"""Readers: labelled and unlabelled text corpora (csv, tight json, loose json, plain text) read with
clear errors (``read_records``), and a corpus read into byte-encoded samples (``load_corpus``).

The reading options are objects (``ReadOptions``, ``CorpusOptions``); the ``--lazy`` cache of a
corpus is lazycache.py, the batches of truncated BPTT batching.py.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TextIO

import numpy as np
import pandas as pd

from .downloads import download_hint
from .errors import DataError
from .safe_io import JSON_SUFFIXES


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


def tight_json_rows(path: Path) -> list[tuple[int, dict]]:
    """Tight json (one value: a list of objects, or one object), with record numbers."""
    text, invalid = decode_utf8(path.read_bytes())
    warn_invalid_utf8(path, invalid)
    obj = _json_value(path, text)
    if isinstance(obj, dict):
        obj = [obj]
    if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
        raise DataError(f"{path}: expected a json list of objects")
    return list(enumerate(obj, 1))


def record_where(n: int, loose: bool) -> str:
    return f"line {n}" if loose else f"record {n}"


def text_of(row: dict, path: Path, where: str, text_key: str) -> str:
    """The text of a json record (None: empty; other values as str)."""
    if text_key not in row:
        raise DataError(f"{path}: {where}: missing text key {text_key!r} (keys: {sorted(map(str, row))})")
    value = row[text_key]
    return "" if value is None else str(value)


def check_delimiter(delim: str) -> None:
    """``--delim``: one or more characters, taken literally (a DataError naming the flag otherwise)."""
    if not delim:
        raise DataError("--delim is empty: give the character between csv columns (',' or a tab)")
    if delim in ("\\t", "\\n", "\\r", "\\"):
        raise DataError(
            f"--delim {delim!r} would be taken literally, backslash included; for a tab pass a real tab "
            "character (--delim $'\\t' in bash)"
        )
    if any(c in delim for c in '\n\r"'):
        raise DataError(f"--delim {delim!r} holds a line break or a quote: not a column separator")


def csv_frames(path: Path, delim: str, text_key: str, chunksize: int | None = None) -> Iterator[pd.DataFrame]:
    """The csv as one frame, or frames of ``chunksize`` rows; the header checked against ``text_key``."""
    check_delimiter(delim)
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
    return loose_json or Path(path).suffix.lower() in JSON_SUFFIXES


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


@dataclass(frozen=True)
class CorpusOptions:
    """How a corpus file becomes byte-encoded samples: text column/key, csv delimiter, loose json (one
    object per line), text preprocessing (preprocess.py)."""

    text_key: str = "sentence"
    delim: str = ","
    loose_json: bool = False
    preprocess: str = "nvidia"


@dataclass(frozen=True)
class ReadOptions:
    """How a labelled file is read (transfer.py, classifier.py: their data flags)."""

    text_key: str = "sentence"
    label_key: str = "label"
    delim: str = ","
    loose_json: bool = False
    binarize_labels: bool = False

    @classmethod
    def from_args(cls, args) -> ReadOptions:
        return cls(*(getattr(args, name) for name in cls.__dataclass_fields__))


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


def split_records(records: Records, proportions: tuple[float, ...], seed: int) -> list[Records]:
    """``records`` cut into parts of the given ``proportions`` (``parse_split``'s), after a shuffle seeded
    by ``seed`` (the original shuffled before cutting, so that a file sorted by label still gives mixed
    parts); a part of proportion 0 is empty, any other holds at least one record."""
    n = len(records)
    wanted = [p > 0 for p in proportions]
    if n < sum(wanted):
        raise DataError(f"{records.path}: {n} record(s) cannot be split into {sum(wanted)} non-empty parts")
    ends = np.rint(np.cumsum(proportions) * n).astype(np.int64)
    counts = np.diff(ends, prepend=0)
    counts[-1] += n - ends[-1]
    for i in np.flatnonzero(wanted):  # a wanted part rounded to nothing takes a record from the largest
        if counts[i] == 0:
            counts[np.argmax(counts)] -= 1
            counts[i] = 1
    starts = np.cumsum(counts) - counts
    order = np.random.default_rng(seed).permutation(n)
    parts = []
    for start, count in zip(starts, counts):
        picked = order[start : start + count]
        labels = None if records.labels is None else records.labels[picked]
        parts.append(Records(records.path, [records.texts[i] for i in picked], labels))
    return parts


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
    options: ReadOptions | None = None,
    *,
    need_labels: bool | None = False,
    multiclass: bool = False,
    label_values: bool = False,
    **settings,
) -> Records:
    """Read ``path`` (csv, or json when it ends in .json/.jsonl or ``loose_json``) into Records.

    ``need_labels=None`` reads labels when the file has them (the column, or the key in the first
    record) and then requires them everywhere.
    With ``need_labels`` the ``label_key`` column must exist and hold 0/1 (or numeric values with
    ``binarize_labels``: rescaled to [0, 1] and thresholded at > 0.5, as the original suite did).
    ``multiclass``: labels may be any integers (class numbers, for fine-tuning with two or more classes).
    ``label_values``: labels as the file holds them (numbers or strings, an object array) for the caller
    to number (``class_names``/``class_numbers``); ``binarize_labels`` still maps numbers to 0/1.
    A UTF-8 BOM is dropped; invalid UTF-8 is replaced by U+FFFD, with a warning that counts it.
    ``settings``: fields of ``ReadOptions`` that replace those of ``options``.
    """
    options = replace(options or ReadOptions(), **settings)
    text_key, label_key, delim = options.text_key, options.label_key, options.delim
    loose_json = options.loose_json
    path = check_path(path)
    if is_json_path(path, loose_json):
        loose = is_loose_json(path, loose_json)
        if loose:
            rows, invalid = json_lines(path, 1, path.read_bytes().split(b"\n"))
            warn_invalid_utf8(path, invalid)
        else:
            rows = tight_json_rows(path)
        if not rows:
            raise DataError(f"{path}: no records")
        texts = [text_of(row, path, record_where(n, loose), text_key) for n, row in rows]
        raw_labels = None
        if need_labels is None:
            need_labels = label_key in rows[0][1]
        if need_labels:
            for n, row in rows:
                if label_key not in row:
                    raise DataError(f"{path}: {record_where(n, loose)}: missing label key {label_key!r}")
            raw_labels = [row[label_key] for _, row in rows]
    else:
        (frame,) = csv_frames(path, delim, text_key)  # read through: open_text has warned
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

    if raw_labels is None:
        labels = None
    elif label_values and not options.binarize_labels:
        labels = np.empty(len(raw_labels), dtype=object)
        labels[:] = raw_labels
    else:
        labels = _labels(path, raw_labels, options.binarize_labels, multiclass)
    return Records(str(path), texts, labels)


def _labels(path: Path, raw: list, binarize: bool, multiclass: bool = False) -> np.ndarray:
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
    if multiclass:
        bad = next((v for v in raw if not (float(v).is_integer() and abs(float(v)) < 2**31)), None)
        if bad is not None:
            raise DataError(f"{path}: record {raw.index(bad) + 1}: label {bad!r} is not a class number")
        return values.astype(np.int64)
    if not set(seen) <= {0.0, 1.0}:
        shown = ", ".join(f"{v:g}" for v in seen[:10]) + (" ..." if len(seen) > 10 else "")
        raise DataError(
            f"{path}: labels must be 0 or 1, saw {shown} "
            "(pass --binarize_labels to rescale ratings such as 1-5)"
        )
    return values.astype(np.int64)


def label_name(value) -> str:
    """A label value's class name: a number as it reads (1.0 -> "1"), anything else as text."""
    if _is_number(value) and not isinstance(value, str):
        return f"{float(value):g}"
    return str(value).strip()


def class_names(values: np.ndarray) -> tuple[str, ...]:
    """The classes of a split's label values, in sorted order: numbers by value, else names as text."""
    names = {label_name(v) for v in values}
    if all(_is_number(n) for n in names):
        return tuple(sorted(names, key=float))
    return tuple(sorted(names))


def class_numbers(values: np.ndarray, names: tuple[str, ...], path: str) -> np.ndarray:
    """Label values -> class numbers (the index of each value's name in ``names``); a value outside
    ``names`` is a ``DataError`` naming the file and record."""
    index = {name: k for k, name in enumerate(names)}
    out = np.empty(len(values), dtype=np.int64)
    for i, value in enumerate(values):
        name = label_name(value)
        if name not in index:
            raise DataError(
                f"{path}: record {i + 1}: label {name!r} is not one of the training split's classes "
                f"({', '.join(names)})"
            )
        out[i] = index[name]
    return out


def _is_number(v) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False


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


def sample_starts(lengths: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
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
    starts = sample_starts(np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces)))
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint8)
    return EncodedCorpus(str(path), tokens, starts)


def load_corpus(
    path: str | Path, options: CorpusOptions | None = None, progress: bool = False, **settings
) -> EncodedCorpus:
    """The corpus of ``path``, in memory (``settings``: fields of ``CorpusOptions`` over ``options``)."""
    options = replace(options or CorpusOptions(), **settings)
    texts = corpus_texts(path, options.text_key, options.delim, options.loose_json)
    return encode_corpus(texts, str(path), options.preprocess, progress)


# --------------------------------------------------------------------------------------------
# transfer.py's labelled splits
# --------------------------------------------------------------------------------------------

SPLITS = ("train", "val", "test")


def given_path(value: str | None) -> str | None:
    """A file flag's value, or None for an absent one (``''`` or ``none``)."""
    return None if value is None or value.strip().lower() in ("", "none") else value


@dataclass(frozen=True)
class SplitFiles:
    """The labelled splits' files and how they are read: ``--data``, ``--valid``, ``--test`` (None: absent),
    ``--split`` cutting the training file for the splits without a file (``seed``: its shuffle), the
    reading flags (``--eval_text_key``/``--eval_label_key`` for --valid and --test), ``--no_test_eval``."""

    train: str
    val: str | None = None
    test: str | None = None
    read: ReadOptions = field(default_factory=ReadOptions)
    eval_read: ReadOptions = field(default_factory=ReadOptions)
    split: str = "1."
    seed: int = 1234
    test_labels: bool = True

    @classmethod
    def from_args(cls, args) -> SplitFiles:
        read = ReadOptions.from_args(args)
        eval_read = replace(
            read,
            text_key=args.eval_text_key or read.text_key,
            label_key=args.eval_label_key or read.label_key,
        )
        return cls(
            args.data, given_path(args.valid), given_path(args.test), read, eval_read, args.split, args.seed,
            not args.no_test_eval,
        )  # fmt: skip


@dataclass
class LabelledSplits:
    """Records per split in SPLITS order, their labels numbered 0 .. K-1 by ``classes`` (the training
    split's label values in sorted order: by number, else by name); ``carved``: the splits --split cut."""

    records: dict[str, Records]
    classes: tuple[str, ...]
    carved: list[str]

    @property
    def labels(self) -> dict[str, np.ndarray]:
        return {split: r.labels for split, r in self.records.items() if r.labels is not None}


def _read_split(files: SplitFiles, split: str, path: str) -> Records:
    need_labels = split != "test" or files.test_labels
    try:
        return read_records(
            path,
            files.read if split == "train" else files.eval_read,
            need_labels=need_labels,
            label_values=True,
        )
    except DataError as e:
        hint = ""
        if not Path(path).exists() and Path(path).parts[:2] == ("data", "binary_sst"):
            hint = " (Binary SST ships in data/binary_sst/ of the repository: run from its root)"
        elif split == "test" and need_labels:
            hint = " (an unlabelled test set? pass --no_test_eval)"
        raise DataError(f"{split} split: {e}{hint}") from None


def _two_classes(split: str, recs: Records, only: str) -> DataError:
    return DataError(
        f"{split} split: {recs.path}: every label is {only}; fitting (train) and choosing C (val) need texts "
        "of at least two classes"
    )


def read_labelled_splits(files: SplitFiles) -> LabelledSplits:
    """Each given file, and the parts of the training file that --split carves for the splits without one
    (as the original: a given --valid/--test file zeroes its part); then every labelled split's label
    values numbered by the training split's classes. Fitting needs two classes in train, choosing C two
    in val: said before anything is featurized."""
    paths = {"train": files.train, "val": files.val, "test": files.test}
    proportions = parse_split(files.split, files.val is not None, files.test is not None)
    records = {split: _read_split(files, split, path) for split, path in paths.items() if path is not None}
    carved = []
    if proportions[0] < 1:
        parts = split_records(records["train"], proportions, files.seed)
        carved = [split for split, part in zip(SPLITS, parts) if len(part)]
        records.update((split, part) for split, part in zip(SPLITS, parts) if len(part))
    records = {split: records[split] for split in SPLITS if split in records}
    names = class_names(records["train"].labels)
    if len(names) < 2:  # said before the other splits' labels are checked against the classes
        raise _two_classes("train", records["train"], names[0])
    for split, recs in records.items():
        if recs.labels is not None:
            records[split] = replace(recs, labels=class_numbers(recs.labels, names, recs.path))
    for split in ("train", "val"):
        if split in records and len(np.unique(records[split].labels)) < 2:
            raise _two_classes(split, records[split], names[int(records[split].labels[0])])
    return LabelledSplits(records, names, carved)
