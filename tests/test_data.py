"""Corpus -> shards -> splits -> truncated-BPTT batches, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import fixture_path

from sentiment_discovery.batching import (
    PAD_TARGET,
    TBPTTBatches,
    lm_splits,
    parse_split,
    shard_starts,
    split_shards,
)
from sentiment_discovery.errors import DataError
from sentiment_discovery.preprocess import encode
from sentiment_discovery.readers import encode_corpus, load_corpus, read_records

TEXTS = [f"sample number {i} " + "xy" * (i % 5) for i in range(12)]


def test_parse_split_follows_the_original():
    assert parse_split("100,1,1") == pytest.approx((100 / 102, 1 / 102, 1 / 102))
    assert parse_split("0.9") == pytest.approx((0.9, 0.1, 0.0))  # remainder appended
    assert parse_split("8/1/1") == pytest.approx((0.8, 0.1, 0.1))
    assert parse_split("100,1,1", has_valid=True) == pytest.approx((100 / 101, 0.0, 1 / 101))
    with pytest.raises(DataError, match="--split"):
        parse_split("a,b")


def test_shards_are_contiguous_near_equal_runs_covering_every_sample():
    bounds = shard_starts(10, 3)
    assert bounds[0] == 0 and bounds[-1] == 10 and len(bounds) == 4
    sizes = np.diff(bounds)
    assert sizes.min() >= 3 and sizes.max() <= 4
    assert list(shard_starts(2, 5)) == [0, 1, 2]  # fewer samples than shards: one shard each


def test_split_shards_partitions_contiguously():
    train, val, test = split_shards(102, parse_split("100,1,1"))
    assert (train, val, test) == (range(0, 100), range(100, 101), range(101, 102))
    train, val, test = split_shards(5, parse_split("100,1,1"))
    assert (len(train), len(val), len(test)) == (3, 1, 1)  # a positive part keeps at least one shard
    assert split_shards(4, parse_split("1,0,0"))[1] == range(4, 4)
    with pytest.raises(DataError, match="cannot be split"):
        split_shards(2, parse_split("100,1,1"))


def row_streams(batches: TBPTTBatches):
    """Per row: the input bytes, target bytes and reset flags of the whole pass, padding dropped."""
    inputs = torch.cat([b.input for b in batches]).T
    targets = torch.cat([b.target for b in batches]).T
    resets = torch.cat([b.reset for b in batches]).T
    rows = []
    for x, y, r in zip(inputs, targets, resets):
        real = y != PAD_TARGET
        rows.append((x[real].tolist(), y[real].tolist(), r[real].tolist(), r[~real].tolist()))
    return rows


@pytest.mark.parametrize("persist_state", [1, 0, -1])
def test_rows_are_equal_contiguous_cuts_with_resets_where_persist_state_says(persist_state):
    corpus = encode_corpus(TEXTS)
    num_shards, rows = 6, 5
    bounds = shard_starts(len(TEXTS), num_shards)  # 2 samples per shard
    batches = TBPTTBatches(corpus, bounds, batch_size=rows, seq_length=7, persist_state=persist_state)
    assert batches.rows == rows
    stream = corpus.tokens.tolist()
    row_bytes = len(stream) // rows
    sample_starts = corpus.starts[:-1].tolist()
    shard_begins = corpus.starts[bounds[:-1]].tolist()
    got = row_streams(batches)
    for row in range(rows):
        begin = row * row_bytes
        x, y, reset, reset_on_padding = got[row]
        assert x == stream[begin : begin + row_bytes - 1] and y == stream[begin + 1 : begin + row_bytes]
        starts = {1: shard_begins, 0: sample_starts, -1: []}[persist_state]
        expected = [s - begin for s in starts if begin <= s < begin + row_bytes - 1]
        assert [i for i, flag in enumerate(reset) if flag] == expected
        assert not reset_on_padding  # no padding at all: every row is as long as the others
    assert sum(len(r[1]) for r in got) == batches.num_targets == rows * (row_bytes - 1)


def test_every_batch_has_all_rows_active_even_with_unequal_samples():
    """The epoch-tail bug: shards of unequal bytes dealt to rows left the last batches nearly empty."""
    texts = ["short"] * 30 + ["a much longer review " * 40] * 3  # the long samples all in the last shards
    corpus = encode_corpus(texts)
    batches = TBPTTBatches(corpus, shard_starts(len(texts), 11), batch_size=4, seq_length=16)
    assert batches.rows == 4
    for index, batch in enumerate(batches):
        assert batch.num_targets == batch.input.numel() == batches.targets_in_batch(index)
        assert (batch.target != PAD_TARGET).all()
    full = [b.input.shape[0] for b in batches]
    assert all(n == 16 for n in full[:-1]) and 0 < full[-1] <= 16  # at most one short batch


def test_last_batch_is_short_and_negative_seq_length_sets_the_number_of_batches():
    corpus = encode_corpus(TEXTS)
    bounds = shard_starts(len(TEXTS), 4)
    batches = TBPTTBatches(corpus, bounds, batch_size=4, seq_length=10)
    lengths = [b.input.shape[0] for b in batches]
    assert all(n == 10 for n in lengths[:-1]) and 0 < lengths[-1] <= 10
    assert sum(lengths) == batches.steps
    assert len(TBPTTBatches(corpus, bounds, batch_size=4, seq_length=-3)) == 3


def test_a_corpus_smaller_than_one_batch_still_gives_a_batch(tmp_path):
    path = tmp_path / "tiny.csv"
    path.write_text("sentence\nab\ncd\nef\n")
    splits = lm_splits(str(path), split="1", batch_size=128, seq_length=256, num_shards=102)
    assert splits.val is None and splits.test is None
    total = len(splits.train.corpus.tokens)
    assert splits.train.rows == total // 2 and len(splits.train) == 1  # every row predicts a byte
    batch = splits.train.batch(0)
    assert batch.input.shape == batch.target.shape == batch.reset.shape
    assert batch.input.dtype == torch.long and batch.reset.dtype == torch.bool
    assert batch.num_targets == splits.train.num_targets > 0


def test_valid_and_test_files_replace_their_split_parts():
    sst = fixture_path("binary_sst")
    splits = lm_splits(
        str(sst / "train.csv"), str(sst / "val.csv"), split="100,1,1", num_shards=50, val_shards=7,
        batch_size=4, eval_batch_size=5, seq_length=16, eval_seq_length=-2,
    )
    assert splits.val.corpus.path.endswith("val.csv") and splits.val.rows == 5 and len(splits.val) == 2
    assert splits.test is not None and splits.test.corpus is splits.train.corpus  # 1 of 50 shards
    # train (49 shards, 4 rows) and test (1 shard, 5 rows) cover the file: a row's last byte predicts
    # nothing, and fewer bytes than rows are dropped at the end of each split
    total = len(splits.train.corpus.tokens)
    assert splits.train.rows == 4 and splits.test.rows == 5
    assert total - 9 - 4 - 5 < splits.train.num_targets + splits.test.num_targets <= total - 9


def test_imdb_reviews_lose_their_html_and_keep_labels_and_ratings():
    """IMDB's layout (label,sentence,rating; <br /> line breaks): labels read, ratings agree, tags cleaned."""
    path = fixture_path("imdb", "train.csv")
    records = read_records(path, need_labels=True)
    assert len(records) == 200 and set(records.labels.tolist()) == {0, 1}
    ratings = read_records(path, label_key="rating", need_labels=True, binarize_labels=True).labels
    np.testing.assert_array_equal(ratings, records.labels)  # 7-10 positive, 1-4 negative
    assert sum("<br />" in t for t in records.texts) > 50
    corpus = load_corpus(path)
    assert corpus.num_samples == 200 and b"<br" not in corpus.tokens.tobytes()
    # each sample starts "\n " and ends " ", as the original's preprocessing
    assert all(corpus.tokens[s : s + 2].tobytes() == b"\n " for s in corpus.starts[:-1])
    assert all(corpus.tokens[e - 1] == ord(" ") for e in corpus.starts[1:])


def test_bad_inputs_name_the_file_line_and_key(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_corpus(tmp_path / "missing.csv")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(DataError, match="empty"):
        load_corpus(empty)
    no_key = tmp_path / "nokey.json"
    no_key.write_text('{"text": "a"}\n{"text": "b"}\n')
    with pytest.raises(DataError, match="line 1: missing text key 'sentence'"):
        load_corpus(no_key, loose_json=True)
    broken = tmp_path / "broken.json"
    broken.write_text('{"sentence": "a"}\n{"sentence": "b"\n{"sentence": "c"}\n')
    with pytest.raises(DataError, match="broken.json: line 2: malformed json"):
        load_corpus(broken, loose_json=True)
    tabbed = tmp_path / "tabbed.csv"
    tabbed.write_text("label\tsentence\n1\tgood\n0\tbad\n")
    with pytest.raises(DataError, match="delim"):
        load_corpus(tabbed)
    assert load_corpus(tabbed, delim="\t").num_samples == 2


def test_invalid_utf8_in_the_corpus_is_encoded_not_a_crash(tmp_path):
    path = tmp_path / "bytes.csv"
    path.write_bytes(b"sentence\ngood \xff\xfe movie\nfine\n")
    corpus = load_corpus(path)
    assert corpus.num_samples == 2 and len(corpus.tokens) > len("good  movie")


@pytest.mark.parametrize("lazy", [False, True])
def test_plain_text_corpus_is_one_sample_per_line(tmp_path, monkeypatch, lazy):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    lines = "first line, with a comma\r\n\n   \nsecond \"quoted\" line\nthird caf\u00e9\n"
    corpus.write_bytes(lines.encode())
    expected = ["first line, with a comma", 'second "quoted" line', "third caf\u00e9"]
    splits = lm_splits(str(corpus), split="1", num_shards=3, batch_size=3, seq_length=8, lazy=lazy)
    got = splits.train.corpus
    assert got.num_samples == 3
    assert bytes(got.tokens).decode() == "".join(encode(t, "nvidia").tobytes().decode() for t in expected)
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    with pytest.raises(DataError, match="blank.txt: no text"):
        lm_splits(str(blank), split="1", lazy=lazy)
