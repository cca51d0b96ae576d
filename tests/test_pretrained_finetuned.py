"""The shipped fine-tuned classifier: it loads from the package and still reads sentiment as its card says.

A regression test of the shipped file, as tests/test_pretrained.py is for the transferred model: Binary
SST test accuracy with its own features and classifier must stay within half a point of the number
recorded with it (and in the model card).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import load_script
from test_pretrained import check_sst_test_accuracy

from sentiment_discovery.checkpoint import load_checkpoint
from sentiment_discovery.encoder import Encoder
from sentiment_discovery.formats import (
    DEFAULT_CLASSIFIER,
    DEFAULT_MODEL,
    first_existing_model,
    resolve_model_path,
)

FINETUNED = DEFAULT_MODEL.parent / "mlstm1024_imdb_sst_finetuned.safetensors"
SENTENCES = ["A dull, boring, badly acted waste of time.", "A wonderful, moving and beautifully acted film."]
CARD = DEFAULT_MODEL.parent / "README.md"


@pytest.fixture(scope="module")
def finetuned():
    return load_checkpoint(FINETUNED)


def test_the_finetuned_model_is_an_mlstm_with_a_classifier_stored_in_half_the_bytes(finetuned):
    assert finetuned.config.model == "mLSTM" and finetuned.config.nhid == 1024
    classifier = finetuned.classifier
    assert classifier is not None
    assert classifier["pooling"] == "mean,max,last" and classifier["state"] == "cell"
    assert classifier["weight"].shape == (3 * 1024,)
    n_params = sum(p.numel() for p in finetuned.model.parameters())
    assert FINETUNED.stat().st_size < 2.2 * n_params < 25e6  # float16 weights, under 25 MB
    assert all(p.dtype == torch.float32 for p in finetuned.model.parameters())  # loading upcasts


def test_finetuned_model_differs_from_the_transferred_one(finetuned):
    """Fine-tuning moved the language model itself, not only the head."""
    shipped = load_checkpoint(DEFAULT_MODEL).model.state_dict()
    tuned = finetuned.model.state_dict()
    assert shipped.keys() == tuned.keys()
    assert any(not torch.equal(shipped[k], tuned[k]) for k in shipped)


def test_finetuned_model_keeps_its_binary_sst_test_accuracy(finetuned):
    check_sst_test_accuracy(finetuned)


def test_finetuned_encoder_reads_obvious_sentiment(finetuned):
    encoder = Encoder(finetuned.model, finetuned.classifier, device="cpu")
    negative, positive = encoder.predict_proba(SENTENCES)
    assert negative < 0.5 < positive


# --------------------------------------------------------------------------------------------
# The fine-tuned file is the default classifier; the language model stays the others' default
# --------------------------------------------------------------------------------------------


def test_encoder_without_a_model_is_the_finetuned_classifier(finetuned):
    assert resolve_model_path("finetuned") == DEFAULT_CLASSIFIER == FINETUNED
    encoder = Encoder()
    tuned = finetuned.model.state_dict()
    assert all(torch.equal(v, tuned[k]) for k, v in encoder.model.state_dict().items())
    assert torch.equal(encoder.classifier.weight, finetuned.classifier.weight)
    # "default" still names the language model with its transferred classifier
    transferred = Encoder("default")
    assert transferred.classifier.C is not None and finetuned.classifier.C is None
    assert not torch.equal(transferred.classifier.weight, encoder.classifier.weight)


def test_classifier_script_defaults_to_the_finetuned_file_unless_the_user_has_a_classifier(
    finetuned, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)  # no lang_model_transfer/classifier.pt here
    argv = ["--text", *SENTENCES, "--save_probs", str(tmp_path / "p.npy")]
    assert load_script("classifier").main(argv) == 0
    assert f"the shipped finetuned model ({FINETUNED.name})" in capsys.readouterr().out
    expected = Encoder(finetuned.model, finetuned.classifier).predict_proba(SENTENCES)
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), expected, rtol=1e-5)
    # a user's own transfer output wins, as for every script (its model is the shipped LM here)
    (tmp_path / "lang_model_transfer").mkdir()
    (tmp_path / "lang_model_transfer" / "classifier.pt").write_bytes(DEFAULT_MODEL.read_bytes())
    assert load_script("classifier").main(argv) == 0
    assert "shipped" not in capsys.readouterr().out
    transferred = Encoder(DEFAULT_MODEL).predict_proba(SENTENCES)
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), transferred, rtol=1e-5)
    assert np.abs(transferred - expected).max() > 1e-3


def test_transfer_and_generate_keep_the_language_model_as_their_default(tmp_path, monkeypatch):
    from sentiment_discovery.transfer import _choose_model

    monkeypatch.chdir(tmp_path)
    assert _choose_model("", "lang_model.pt") == "default"  # transfer.py's choice
    # generate.py's choice: the fine-tuned LM reads SST val at 1.872 BPC against the shipped LM's 1.753
    assert first_existing_model("lang_model_transfer/classifier.pt", "lang_model.pt") == "default"
    assert resolve_model_path("default") == DEFAULT_MODEL
