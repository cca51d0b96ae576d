"""The shipped default model: it loads from the package and still reads sentiment as its card says.

A regression test of the shipped file: Binary SST test accuracy with its own features and
classifier must stay within half a point of the number recorded with it (and in its model card).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import ROOT

from sentiment_discovery.checkpoint import load_checkpoint
from sentiment_discovery.encoder import Encoder
from sentiment_discovery.formats import DEFAULT_MODEL
from sentiment_discovery.readers import read_records

CARD = DEFAULT_MODEL.parent / "README.md"


@pytest.fixture(scope="module")
def shipped():
    return load_checkpoint(DEFAULT_MODEL)


def test_the_shipped_model_is_a_transferred_mlstm_stored_in_half_the_bytes(shipped):
    assert shipped.config.model == "mLSTM" and shipped.config.nhid == 1024
    assert shipped.classifier is not None and shipped.classifier["pooling"] == "mean,max,last"
    n_params = sum(p.numel() for p in shipped.model.parameters())
    assert DEFAULT_MODEL.stat().st_size < 2.2 * n_params < 25e6  # float16 weights, under 25 MB
    assert all(p.dtype == torch.float32 for p in shipped.model.parameters())  # loading upcasts


def check_sst_test_accuracy(ckpt) -> None:
    """A shipped checkpoint reads the shipped Binary SST test split within half a point of the accuracy
    it records, and the model card states that number."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the larger featurizations of the suite
    try:
        test = read_records(ROOT / "data" / "binary_sst" / "test.csv", need_labels=True)
        probs = Encoder(ckpt.model, ckpt.classifier, device="cpu").predict_proba(test.texts)
    finally:
        torch.set_num_threads(threads)
    accuracy = float(np.mean((probs > 0.5) == (test.labels == 1)))
    recorded = ckpt.extra["sst_accuracy"]["test"]
    assert accuracy >= recorded - 0.005, (accuracy, recorded)
    assert f"{100 * recorded:.1f}%" in CARD.read_text()  # the card states the recorded number


def test_shipped_model_keeps_its_binary_sst_test_accuracy(shipped):
    check_sst_test_accuracy(shipped)


def test_encoder_with_no_path_is_the_shipped_model_and_reads_obvious_sentiment():
    encoder = Encoder(device="cpu")
    negative, positive = encoder.predict_proba(
        ["A dull, boring, badly acted waste of time.", "A wonderful, moving and beautifully acted film."]
    )
    assert negative < 0.5 < positive


def test_shipped_model_stored_in_bfloat16_gives_the_same_features(shipped, tmp_path):
    """A trained model's features from a bfloat16-stored copy agree with the float32 ones to 2e-2
    relative (issue 10), and the bfloat16 product path keeps them as close."""
    from sentiment_discovery.checkpoint import save_checkpoint
    from sentiment_discovery.featurize import featurize

    texts = read_records(ROOT / "data" / "binary_sst" / "test.csv", need_labels=True).texts[:40]
    save_checkpoint(tmp_path / "bf16.safetensors", shipped.model, dtype=torch.bfloat16)
    stored_bf16 = load_checkpoint(tmp_path / "bf16.safetensors").model
    full = featurize(shipped.model, texts, device="cpu", pooling="mean,max,last")
    for features in (
        featurize(stored_bf16, texts, device="cpu", pooling="mean,max,last"),
        featurize(shipped.model, texts, device="cpu", pooling="mean,max,last", bf16=True),
    ):
        rel = np.abs(features - full).max() / np.abs(full).max()
        assert 0 < rel < 2e-2, rel
