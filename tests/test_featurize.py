"""Featurization: a text's features do not depend on its batch, padding or chunking."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sentiment_discovery.featurize import featurize
from sentiment_discovery.model import ModelConfig, RNNModel
from sentiment_discovery.preprocess import encode

TEXTS = [
    "A stirring, funny and moving film.",
    "",
    "Bad.",
    "The plot is thin, the acting dull.",
    "Smart.",
]


def small_model(kind: str = "mLSTM", nlayers: int = 2, nhid: int = 16) -> RNNModel:
    torch.manual_seed(0)
    return RNNModel(ModelConfig(model=kind, emsize=8, nhid=nhid, nlayers=nlayers)).eval()


def direct_features(model: RNNModel, text: str, pooling: str, state: str) -> np.ndarray:
    """Reference: one text alone, no padding, no reset, no chunking; all layers concatenated."""
    tokens = torch.from_numpy(encode(text, model.config.preprocess).astype(np.int64))[:, None]
    with torch.no_grad():
        hs, cs, _ = model.forward_states(tokens)
    per_layer = []
    for seq in cs if state == "cell" else hs:  # [T, 1, H]
        seq = seq[:, 0]
        per_layer.append({"last": seq[-1], "mean": seq.mean(0), "max": seq.amax(0)}[pooling])
    return torch.cat(per_layer).numpy()


CASES = [("mLSTM", pooling, state) for pooling in ("last", "mean", "max") for state in ("cell", "hidden")]
CASES += [("LSTM", "last", "cell"), ("LSTM", "mean", "cell"), ("LSTM", "max", "hidden")]


@pytest.mark.parametrize("kind,pooling,state", CASES)
def test_batched_features_equal_the_text_alone(kind, pooling, state):
    model = small_model(kind)
    # Small batches and chunks: rows of different lengths share batches, and shorter rows join the
    # computation in a later chunk than the longest one.
    batched = featurize(
        model, TEXTS, batch_size=4, chunk_length=16, pooling=pooling, state=state, all_layers=True
    )
    assert batched.shape == (len(TEXTS), 2 * 16) and batched.dtype == np.float32
    for i, text in enumerate(TEXTS):
        np.testing.assert_allclose(batched[i], direct_features(model, text, pooling, state), atol=1e-5)
    for i in (0, 2):
        alone = featurize(
            model, [TEXTS[i]], chunk_length=10_000, pooling=pooling, state=state, all_layers=True
        )
        np.testing.assert_allclose(batched[i], alone[0], atol=1e-5, err_msg=f"text {i}")


def test_last_layer_is_the_tail_of_all_layers():
    model = small_model()
    every = featurize(model, TEXTS[:3], all_layers=True)
    last = featurize(model, TEXTS[:3])
    np.testing.assert_array_equal(last, every[:, 16:])


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_long_text_chunked_equals_unchunked(pooling):
    model = small_model("GRU", nlayers=1)  # fused kernels keep this fast; chunking is model-agnostic
    rng = np.random.default_rng(0)
    long_text = " ".join("".join(rng.choice(list("abcdefgh"), 6)) for _ in range(1500))  # ~10 KB
    texts = [long_text, TEXTS[0]]
    chunked = featurize(model, texts, chunk_length=256, pooling=pooling, state="hidden")
    whole = featurize(model, texts, chunk_length=100_000, pooling=pooling, state="hidden")
    np.testing.assert_allclose(chunked, whole, atol=1e-5)
    assert np.isfinite(chunked).all()


def test_empty_text_is_its_padding():
    model = small_model(nlayers=1)
    feats = featurize(model, ["", "   ", "x"], pooling="mean")
    assert np.isfinite(feats).all()
    np.testing.assert_allclose(feats[0], feats[1], atol=1e-6)  # both preprocess to "\n  "
    assert not np.allclose(feats[0], feats[2])


def test_no_texts_gives_an_empty_matrix():
    assert featurize(small_model(nlayers=1), []).shape == (0, 16)


def test_reduced_precision_stays_close():
    model = small_model(nlayers=1)
    full = featurize(model, TEXTS)
    low = featurize(model, TEXTS, fp16=True)
    assert low.dtype == np.float32
    np.testing.assert_allclose(low, full, atol=0.05)


def test_bad_pooling_and_state_are_refused():
    model = small_model(nlayers=1)
    with pytest.raises(ValueError, match="pooling"):
        featurize(model, TEXTS, pooling="median")
    with pytest.raises(ValueError, match="state"):
        featurize(model, TEXTS, state="output")


@pytest.mark.parametrize("state", ["cell", "hidden"])
def test_cell_transform_values_equal_the_featurizer_at_each_prefix(state):
    from sentiment_discovery.encoder import Encoder

    model = small_model(nlayers=2, nhid=12)
    classifier = {"weight": torch.zeros(24), "bias": torch.tensor(0.0), "neurons": torch.tensor([3]),
                  "pooling": "last", "state": state, "all_layers": True}  # fmt: skip
    encoder = Encoder(model, classifier, device="cpu")
    text = "The plot is thin, the acting dull but the music is lovely."
    (full,) = encoder.cell_transform(text)
    assert full.bytes == encode(text, "nvidia").tobytes() and full.values.shape == (len(full.bytes), 24)
    assert full.bytes[full.text_slice] == text.encode()
    # the value after byte t is the feature of the text cut after t: featurize(prefix ending before a
    # space) ends on its pad space, i.e. on that space of the full text
    cuts = [i for i, ch in enumerate(text) if ch == " "] + [len(text)]
    features = encoder.transform([text[:k] for k in cuts])
    np.testing.assert_allclose(full.values[[k + 2 for k in cuts]], features, atol=1e-5)
    np.testing.assert_allclose(full.values[-1], encoder.transform(text)[0], atol=1e-5)

    # chosen units, several texts (one empty), and the reference at every byte
    units = [20, 3]
    chosen = encoder.cell_transform(["", text, "Bad."], units=units)
    assert [c.bytes for c in chosen] == [encode(t, "nvidia").tobytes() for t in ("", text, "Bad.")]
    assert chosen[0].bytes[chosen[0].text_slice] == b""
    np.testing.assert_allclose(chosen[1].values, full.values[:, units], atol=1e-6)
    assert chosen[1].units.tolist() == units
    tokens = torch.from_numpy(encode("Bad.", "nvidia").astype(np.int64))[:, None]
    with torch.no_grad():
        hs, cs, _ = model.forward_states(tokens)
    seq = (cs if state == "cell" else hs)
    expected = torch.stack([seq[1][:, 0, 8], seq[0][:, 0, 3]], dim=1).numpy()  # features 20 = layer 1 unit 8
    np.testing.assert_allclose(chosen[2].values, expected, atol=1e-5)


def test_concatenated_poolings_are_the_single_poolings_side_by_side():
    torch.manual_seed(0)
    model = RNNModel(ModelConfig(emsize=8, nhid=12, nlayers=2))
    texts = ["good film", "a terrible, boring mess of a movie", "ok"]
    single = {p: featurize(model, texts, pooling=p, state="hidden", batch_size=2, chunk_length=5)
              for p in ("mean", "max", "last")}  # fmt: skip
    both = featurize(model, texts, pooling="mean,max,last", state="hidden", batch_size=2, chunk_length=5)
    assert both.shape == (3, 36)
    np.testing.assert_allclose(both, np.concatenate([single["mean"], single["max"], single["last"]], 1),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    with pytest.raises(ValueError, match="comma-separated"):
        featurize(model, texts, pooling="mean,mean")


def test_cell_transform_maps_a_feature_of_concatenated_poolings_to_its_unit_and_chunks_exactly():
    from sentiment_discovery.encoder import Encoder
    from sentiment_discovery.featurize import byte_states

    model = small_model(nlayers=1, nhid=12)
    classifier = {"weight": torch.zeros(24), "bias": torch.tensor(0.0), "neurons": torch.tensor([17]),
                  "pooling": "mean,last", "state": "cell", "all_layers": False}  # fmt: skip
    encoder = Encoder(model, classifier, device="cpu")
    text = "A stirring, funny and moving film, and far too long for one chunk of a few bytes."
    (block2,) = encoder.cell_transform(text, units=[17])  # the "last" block's unit 5
    (unit5,) = encoder.cell_transform(text, units=[5])
    assert block2.units.tolist() == [17]
    np.testing.assert_array_equal(block2.values, unit5.values)
    np.testing.assert_allclose(block2.values[-1, 0], encoder.transform(text)[0, 17], atol=1e-5)
    with pytest.raises(ValueError, match="0 .. 23"):
        encoder.cell_transform(text, units=[24])
    tokens = [encode(text, "nvidia")]
    (chunked,) = byte_states(model, tokens, chunk_length=7, device="cpu")
    (whole,) = byte_states(model, tokens, device="cpu")
    np.testing.assert_allclose(chunked, whole, atol=1e-6)
