"""Featurization of texts packed end to end into rows (featurize.pack_rows, row_plan): every text's
features equal those of the text featurized alone, whatever texts share its row and chunks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sentiment_discovery.featurize import _PackedRunner, featurize, pack_rows, row_plan
from sentiment_discovery.model import ModelConfig, RNNModel
from sentiment_discovery.preprocess import encode
from sentiment_discovery.readout import FeatureSpec


def small_model(kind: str = "mLSTM", nlayers: int = 2, nhid: int = 12) -> RNNModel:
    torch.manual_seed(0)
    return RNNModel(ModelConfig(model=kind, emsize=8, nhid=nhid, nlayers=nlayers)).eval()


def texts_of_many_lengths(n: int, seed: int = 0) -> list[str]:
    """``n`` texts from empty (3 bytes once padded) to ~8 chunks of 5 steps, in no order of length."""
    rng = np.random.default_rng(seed)
    lengths = [0, 1, 37, 2, 0, 12, *rng.integers(0, 40, max(0, n - 6))][:n]
    return ["".join(rng.choice(list("abc de,!"), k)) for k in lengths]


def alone(model: RNNModel, texts: list[str], **kw) -> np.ndarray:
    return np.concatenate([featurize(model, [t], batch_size=1, chunk_length=10_000, **kw) for t in texts])


def direct(model: RNNModel, text: str, pooling: str, state: str) -> np.ndarray:
    """Reference: the text's per-step states in one call, pooled with numpy; every layer."""
    tokens = torch.from_numpy(encode(text, model.config.preprocess).astype(np.int64))[:, None]
    with torch.no_grad():
        hs, cs, _ = model.forward_states(tokens)
    steps = np.stack([s[:, 0].numpy() for s in (cs if state == "cell" else hs)])  # [L, T, H]
    pool = {"last": lambda: steps[:, -1], "mean": lambda: steps.mean(1), "max": lambda: steps.max(1),
            "min": lambda: steps.min(1)}  # fmt: skip
    return np.concatenate([pool[p]().reshape(-1) for p in pooling.split(",")])


@pytest.mark.parametrize("pooling", ["last", "mean", "max", "min", "mean,max,last"])
@pytest.mark.parametrize("state", ["cell", "hidden"])
@pytest.mark.parametrize("batch_size", [3, 50])  # more texts than rows (several to a row), and fewer
def test_packed_features_equal_each_text_alone(pooling, state, batch_size):
    model = small_model()
    assert model.cheap_resets
    texts = texts_of_many_lengths(14)
    kw = dict(pooling=pooling, state=state, all_layers=True)
    packed = featurize(model, texts, batch_size=batch_size, chunk_length=5, device="cpu", **kw)
    assert packed.shape == (len(texts), 24 * len(pooling.split(","))) and packed.dtype == np.float32
    np.testing.assert_allclose(packed, alone(model, texts, **kw), atol=1e-5)
    for i in (0, 2, 5):
        np.testing.assert_allclose(packed[i], direct(model, texts[i], pooling, state), atol=1e-5)


def test_last_layer_of_packed_features_is_the_tail_of_all_layers_and_order_is_the_input_order():
    model = small_model()
    texts = texts_of_many_lengths(9, seed=1)
    every = featurize(model, texts, pooling="mean,last", batch_size=2, chunk_length=4, all_layers=True)
    last = featurize(model, texts, pooling="mean,last", batch_size=2, chunk_length=4)
    np.testing.assert_allclose(last, np.concatenate([every[:, 12:24], every[:, 36:]], 1), atol=1e-6)
    reversed_ = featurize(model, texts[::-1], pooling="mean,last", batch_size=2, chunk_length=4)
    np.testing.assert_allclose(reversed_[::-1], last, atol=1e-5)


def test_a_long_text_packed_with_short_ones_equals_it_alone():
    model = small_model(nlayers=1)
    rng = np.random.default_rng(0)
    long_text = "".join(rng.choice(list("abcdefgh "), 3000))
    texts = ["fine", long_text, "ok", "a bit longer than the others", "no"]
    packed = featurize(model, texts, pooling="mean,max,min,last", batch_size=2, chunk_length=64)
    np.testing.assert_allclose(packed, alone(model, texts, pooling="mean,max,min,last"), atol=1e-5)
    assert np.isfinite(packed).all()


@pytest.mark.parametrize("pooling", ["last", "min,mean"])
def test_the_torch_stacks_keep_the_left_padded_batches_and_equal_each_text_alone(pooling):
    model = small_model("LSTM")
    assert not model.cheap_resets
    texts = texts_of_many_lengths(7)
    batched = featurize(model, texts, pooling=pooling, batch_size=3, chunk_length=5, all_layers=True)
    np.testing.assert_allclose(batched, alone(model, texts, pooling=pooling, all_layers=True), atol=1e-5)


def test_token_arrays_of_one_byte_and_up_share_rows_and_chunks_exactly():
    model = small_model()
    rng = np.random.default_rng(3)
    tokens = [rng.integers(0, 256, n).astype(np.uint8) for n in (1, 1, 2, 9, 1, 3, 17, 1, 4, 2, 1)]
    spec = FeatureSpec.parse("min,last,max,mean", "hidden", all_layers=True)
    out = np.zeros((len(tokens), spec.num_features(model.config)), dtype=np.float32)
    with torch.inference_mode():
        _PackedRunner(model, tokens, 2, torch.device("cpu"), spec).run(3, out)
        for i, t in enumerate(tokens):
            hs, _, _ = model.forward_states(torch.from_numpy(t.astype(np.int64))[:, None])
            steps = torch.stack(hs)[:, :, 0]  # [L, T, H]
            pools = [steps.amin(1), steps[:, -1], steps.amax(1), steps.mean(1)]
            np.testing.assert_allclose(out[i], torch.cat([p.reshape(-1) for p in pools]).numpy(), atol=1e-5)


def test_progress_counts_every_real_byte_once():
    model = small_model(nlayers=1)
    tokens = [encode(t, "nvidia") for t in texts_of_many_lengths(20, seed=2)]
    counted = []
    out = np.zeros((len(tokens), 12), dtype=np.float32)
    with torch.inference_mode():
        _PackedRunner(model, tokens, 4, torch.device("cpu"), FeatureSpec()).run(6, out, counted.append)
    assert sum(counted) == sum(len(t) for t in tokens)
    assert all(0 < n <= 6 * 4 for n in counted)


@pytest.mark.parametrize("seed", range(5))
def test_pack_rows_places_every_text_once_and_evens_out_the_rows(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 300, int(rng.integers(1, 200))).tolist()
    rows = int(rng.integers(1, 40))
    packed = pack_rows(lengths, rows)
    assert len(packed) == min(rows, len(lengths)) and all(packed)
    assert sorted(i for row in packed for i in row) == list(range(len(lengths)))
    totals = [sum(lengths[i] for i in row) for row in packed]
    assert totals == sorted(totals, reverse=True)  # the rows still running are a prefix
    assert totals[0] - totals[-1] <= max(lengths)  # rows end within one text of each other
    # the longest row got its last (shortest) text when it was the shortest row
    assert totals[0] - totals[-1] <= min(lengths[i] for i in packed[0])


@pytest.mark.parametrize("seed", range(5))
def test_row_plan_covers_every_step_with_rows_in_multiples_and_every_running_row_in(seed):
    rng = np.random.default_rng(seed)
    rows, chunk_length, multiple = int(rng.integers(1, 60)), int(rng.integers(1, 40)), 8
    row_lengths = np.sort(rng.integers(1, 200, rows))[::-1]
    plan = row_plan(row_lengths, chunk_length, multiple)
    assert plan[0][0] == 0 and plan[-1][1] == row_lengths[0]
    assert all(b == next_a for (_, b, _), (next_a, _, _) in zip(plan, plan[1:]))  # contiguous
    for a, b, n in plan:
        assert 0 < b - a <= chunk_length
        assert n == rows or n % multiple == 0
        assert np.all(row_lengths[n:] <= a)  # every row with bytes left runs
        assert n - multiple < np.count_nonzero(row_lengths > a)  # no group runs after its longest row ends
    assert [n for *_, n in plan] == sorted((n for *_, n in plan), reverse=True)
