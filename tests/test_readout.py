"""The readout (feature spec + classifier) and the model interface the featurizer and fine-tuning use."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from sentiment_discovery.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from sentiment_discovery.cli import run_script
from sentiment_discovery.errors import DataError, UsageError
from sentiment_discovery.featurize import featurize
from sentiment_discovery.model import ModelConfig, RNNModel
from sentiment_discovery.readout import POOLINGS, FeatureSpec, Readout

CONFIG = ModelConfig(emsize=4, nhid=6, nlayers=2)


def test_locate_inverts_the_feature_numbering():
    spec = FeatureSpec.parse("mean,max,last", "hidden", all_layers=True)
    assert spec.num_features(CONFIG) == 3 * 2 * 6
    assert spec.locate(0, CONFIG) == ("mean", 0, 0)
    assert spec.locate(6 + 5, CONFIG) == ("mean", 1, 5)
    assert spec.locate(2 * 12 + 7, CONFIG) == ("last", 1, 1)
    last_layer = FeatureSpec.parse("max,last")
    assert last_layer.locate(6 + 2, CONFIG) == ("last", 1, 2)  # the last layer's unit 2
    with pytest.raises(UsageError, match="out of range"):
        last_layer.locate(12, CONFIG)


def test_stored_form_round_trips_and_is_checked(tmp_path):
    torch.manual_seed(0)
    model = RNNModel(CONFIG)
    spec = FeatureSpec.parse("mean,last", "cell")
    readout = Readout(
        torch.randn(12), torch.tensor(0.5), spec, mean=torch.zeros(12), scale=torch.ones(12), C=0.25
    )
    again = Readout.from_dict(readout.to_dict(), CONFIG)
    assert again.spec == spec and again.C == 0.25
    assert again["neurons"].tolist() == torch.argsort(readout.weight.abs(), descending=True).tolist()
    save_checkpoint(tmp_path / "clf.safetensors", model, classifier=readout)
    loaded = load_checkpoint(tmp_path / "clf.safetensors").classifier
    torch.testing.assert_close(loaded.weight, readout.weight)
    assert loaded.spec == spec
    with pytest.raises(CheckpointError, match="classifier weight has 12 values, expected 6"):
        Readout.from_dict({**readout.to_dict(), "pooling": "last"}, CONFIG)


def test_multi_class_probs_are_a_softmax():
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    readout = Readout.from_dict({"weight": weight, "bias": torch.zeros(3), "classes": ["a", "b", "c"]})
    x = np.array([[2.0, 0.0], [0.0, 3.0]])
    probs = readout.probs(x)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    assert probs.argmax(axis=1).tolist() == [0, 1]


@pytest.mark.parametrize("kind", ["mLSTM", "LSTM", "GRU"])
def test_pooling_of_per_step_states_is_differentiable_and_matches_featurize(kind):
    torch.manual_seed(0)
    model = RNNModel(ModelConfig(model=kind, emsize=4, nhid=6, nlayers=2)).eval()
    assert model.has_cell == (kind in ("mLSTM", "LSTM"))
    texts = ["good film", "a dull one, long"]
    spec = FeatureSpec.parse(",".join(POOLINGS), "hidden", all_layers=True)
    expected = featurize(model, texts, spec=spec, device="cpu")
    from sentiment_discovery.preprocess import encode

    tokens = [torch.from_numpy(encode(t, "nvidia").astype(np.int64)) for t in texts]
    T = max(len(t) for t in tokens)
    x = torch.zeros(T, len(texts), dtype=torch.long)  # right-padded, as a fine-tuning batch may be
    real = torch.zeros(T, len(texts), dtype=torch.bool)
    for j, t in enumerate(tokens):
        x[: len(t), j], real[: len(t), j] = t, True
    logits, state, steps = model(x, model.zero_state(len(texts)), return_states=True)
    assert logits.shape == (T, len(texts), 256) and len(steps.hidden) == 2
    features = spec.pool(torch.stack(steps.hidden), real)
    np.testing.assert_allclose(features.detach().numpy(), expected, rtol=1e-4, atol=1e-5)
    features.sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_min_pooling_is_the_smallest_value_of_each_unit():
    torch.manual_seed(0)
    model = RNNModel(ModelConfig(emsize=4, nhid=6)).eval()
    text = "not bad at all"
    from sentiment_discovery.featurize import byte_states
    from sentiment_discovery.preprocess import encode

    (per_byte,) = byte_states(model, [encode(text, "nvidia")], device="cpu")
    short = featurize(model, [text, "ok"], pooling="min,max", device="cpu", chunk_length=4)
    np.testing.assert_allclose(short[0], np.concatenate([per_byte.min(0), per_byte.max(0)]), rtol=1e-5)


def test_run_script_keeps_the_traceback_of_a_bug(capsys):
    parser = argparse.ArgumentParser()

    def bad_input(args):
        raise DataError("data.csv line 3: no text")

    def bug(args):
        raise ValueError("operands could not be broadcast")  # numpy's, not the user's

    assert run_script(parser, bad_input, []) == 2
    assert capsys.readouterr().err == "error: data.csv line 3: no text\n"
    with pytest.raises(ValueError, match="broadcast"):
        run_script(parser, bug, [])
