"""Reading labelled/unlabelled text corpora (csv, tight json, loose json) with clear errors."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd


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


def read_records(
    path: str | Path,
    text_key: str = "sentence",
    label_key: str = "label",
    delim: str = ",",
    loose_json: bool = False,
    need_labels: bool = False,
    binarize_labels: bool = False,
) -> Records:
    """Read ``path`` (csv, or json when it ends in .json/.jsonl or ``loose_json``) into Records.

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
            raise DataError(f"{path}: line 1: missing text column {text_key!r} (columns: {list(frame.columns)})")
        if frame.empty:
            raise DataError(f"{path}: no records (only a header)")
        texts = frame[text_key].tolist()
        raw_labels = None
        if need_labels:
            if label_key not in frame.columns:
                raise DataError(f"{path}: line 1: missing label column {label_key!r} (columns: {list(frame.columns)})")
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
            f"{path}: labels must be 0 or 1, saw {shown} (pass --binarize_labels to rescale ratings such as 1-5)"
        )
    return values.astype(np.int64)


def _is_number(v) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False
