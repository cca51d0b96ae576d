"""The --lazy cache: built by streaming (the same bytes as reading in memory), damaged caches rebuilt;
and a fuzz run of the readers: any file gives records or one clear DataError.

FUZZ_EXAMPLES=1000 runs each fuzz test on that many cases (the suite runs 50 of each)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sentiment_discovery import lazycache as data
from sentiment_discovery.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from sentiment_discovery.errors import DataError
from sentiment_discovery.lazycache import lazy_cache_dir, lazy_corpus
from sentiment_discovery.model import ModelConfig, RNNModel
from sentiment_discovery.readers import load_corpus, read_records

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "50"))  # per fuzz test: about 200 in all


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))


TEXTS = [f"review {i}: <b>{'good ' * (i % 4)}</b> caf\u00e9 &amp; {'bad ' * (i % 3)}" for i in range(60)]


def write_corpus(folder: Path, kind: str) -> tuple[Path, bool]:
    """The same texts as csv, loose json or tight json; returns the path and --loose_json."""
    if kind == "csv":
        path = folder / "c.csv"
        path.write_text("label,sentence\n" + "".join(f'{i % 2},"{t}"\n' for i, t in enumerate(TEXTS)))
        return path, False
    rows = [{"sentence": t, "n": i} for i, t in enumerate(TEXTS)]
    if kind == "loose":
        path = folder / "l.json"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path, True
    path = folder / "t.json"
    path.write_text(json.dumps(rows))
    return path, False


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("kind", ["csv", "loose", "tight"])
def test_streamed_cache_holds_the_same_bytes_as_reading_in_memory(tmp_path, monkeypatch, kind, workers):
    monkeypatch.setattr(data, "LAZY_UNIT_BYTES", 300)  # many units of a few lines
    monkeypatch.setattr(data, "LAZY_CHUNK_ROWS", 7)
    path, loose = write_corpus(tmp_path, kind)
    in_memory = load_corpus(path, loose_json=loose)
    lazy = lazy_corpus(path, loose_json=loose, workers=workers)
    assert isinstance(lazy.tokens, np.memmap)
    np.testing.assert_array_equal(lazy.tokens, in_memory.tokens)
    np.testing.assert_array_equal(lazy.starts, in_memory.starts)


def test_loose_json_is_never_read_whole_while_caching(tmp_path, monkeypatch):
    path, _ = write_corpus(tmp_path, "loose")
    monkeypatch.setattr(data, "LAZY_UNIT_BYTES", 500)
    units = list(data._work_units(path, {"loose_json": True, "text_key": "sentence", "delim": ","}))
    assert len(units) > 5 and max(size for _, size in units) < 500 + 200
    assert sum(len(unit[2]) for unit, _ in units) == len(TEXTS)

    read_bytes, read_text = Path.read_bytes, Path.read_text

    def refuse(read):
        def whole(self, *args, **kwargs):
            assert self != path, f"read whole: {self}"
            return read(self, *args, **kwargs)

        return whole

    monkeypatch.setattr(Path, "read_bytes", refuse(read_bytes))
    monkeypatch.setattr(Path, "read_text", refuse(read_text))
    assert lazy_corpus(path, loose_json=True, workers=2).num_samples == len(TEXTS)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_bad_line_deep_in_the_file_is_reported_from_the_workers(tmp_path, monkeypatch, workers):
    monkeypatch.setattr(data, "LAZY_UNIT_BYTES", 200)
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps({"sentence": t}) for t in TEXTS]
    lines[41] = '{"sentence": "cut'
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl: line 42: malformed json"):
        lazy_corpus(path, workers=workers)
    assert not list(lazy_cache_dir(path, "sentence", ",", False, "nvidia").parent.glob("*/tokens.bin"))


def test_damaged_caches_are_rebuilt(tmp_path, capsys):
    path, _ = write_corpus(tmp_path, "csv")
    expected = load_corpus(path).tokens
    cache = lazy_cache_dir(path, "sentence", ",", False, "nvidia")
    lazy_corpus(path)
    for damage, message in (
        (lambda: (cache / "meta.json").write_text('{"version": 1, "sour'), "meta.json is damaged"),
        (lambda: (cache / "tokens.bin").write_bytes(expected[:100].tobytes()), "tokens.bin holds 100 bytes"),
        (lambda: (cache / "starts.npy").write_bytes(b"garbage"), "unreadable"),
    ):
        damage()
        corpus = lazy_corpus(path)
        np.testing.assert_array_equal(corpus.tokens, expected)
        err = capsys.readouterr().err
        assert message in err and "rebuilding the cache" in err


# --------------------------------------------------------------------------------------------
# Fuzz: random files through the readers
# --------------------------------------------------------------------------------------------

FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
JSON_PIECES = [b'{"sentence": "', b'"}', b'{"sentence": null}', b'{"sentence": 5}', b"[", b"]", b"{", b"}",
               b",", b'"', b"\n", b"\r\n", b"\xff", b"\xc3", b"\xef\xbb\xbf", b"\x00", b"sentence", b"label",
               b'{"text": "x"}', b"[[[[[[[[", b"\\u00e9", b"<b>", b"&amp;"]  # fmt: skip
CSV_PIECES = [b"sentence", b"label", b",", b'"', b'""', b"\n", b"\r", b"\t", b"\xff", b"\xe2\x82", b"text",
              b"\xef\xbb\xbf", b"\x00", b"1", b"0"]  # fmt: skip


def pieces(alphabet: list[bytes]):
    """Files made of meaningful fragments, random bytes and huge fields, cut anywhere (truncated lines)."""
    part = st.one_of(st.sampled_from(alphabet), st.binary(max_size=20), st.just(b"x" * 20_000))
    return st.tuples(st.lists(part, max_size=30), st.integers(min_value=0)).map(
        lambda t: b"".join(t[0])[: t[1] % (len(b"".join(t[0])) + 1) or None]
    )


def read_or_data_error(path: Path, **kwargs) -> None:
    """The property: records (every text a str) or one DataError naming the file, nothing else."""
    try:
        records = read_records(path, **kwargs)
    except DataError as e:
        assert str(e).strip() and "\n" not in str(e).strip()
        assert str(path) in str(e) or str(e).startswith("--")
        return
    assert len(records) > 0 and all(isinstance(t, str) for t in records.texts)


@FUZZ
@given(content=pieces(JSON_PIECES), suffix=st.sampled_from([".json", ".jsonl"]), loose=st.booleans())
def test_fuzz_json_readers(tmp_path, content, suffix, loose):
    path = tmp_path / f"f{suffix}"
    path.write_bytes(content)
    read_or_data_error(path, loose_json=loose)
    read_or_data_error(path, loose_json=loose, need_labels=None)


@FUZZ
@given(content=pieces(CSV_PIECES), delim=st.sampled_from([",", "\t", "||"]))
def test_fuzz_csv_reader(tmp_path, content, delim):
    path = tmp_path / "f.csv"
    path.write_bytes(content)
    read_or_data_error(path, delim=delim)
    read_or_data_error(path, delim=delim, need_labels=None, binarize_labels=True)


@FUZZ
@given(content=pieces(JSON_PIECES + CSV_PIECES), suffix=st.sampled_from([".csv", ".jsonl", ".json"]))
def test_fuzz_lazy_cache_agrees_with_the_reader(tmp_path, content, suffix):
    path = tmp_path / f"f{suffix}"
    path.write_bytes(content)
    try:
        expected = load_corpus(path).tokens
    except DataError:
        with pytest.raises(DataError):
            lazy_corpus(path, rebuild=True)
        return
    np.testing.assert_array_equal(lazy_corpus(path, rebuild=True).tokens, expected)


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("ckpt") / "m.pt"
    save_checkpoint(path, RNNModel(ModelConfig(emsize=4, nhid=8)))
    return path.read_bytes()


@FUZZ
@given(cut=st.integers(min_value=0), flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(1, 255))))
def test_fuzz_damaged_checkpoints(tmp_path, checkpoint_bytes, cut, flips):
    """A checkpoint cut short or with changed bytes: it loads, or one CheckpointError names it."""
    content = bytearray(checkpoint_bytes[: cut % (len(checkpoint_bytes) + 1)])
    for at, value in flips:
        if content:
            content[at % len(content)] ^= value
    path = tmp_path / "m.pt"
    path.write_bytes(bytes(content))
    try:
        load_checkpoint(path)
    except CheckpointError as e:
        assert str(e).startswith(f"{path}: ") and "\n" not in str(e)
