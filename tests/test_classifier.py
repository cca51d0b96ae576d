"""classifier.py and the Encoder API reproduce transfer.py's classifier; bad input gets clear errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import load_script
from test_transfer import sst_slices, tiny_lm

from sentiment_discovery.checkpoint import CheckpointError
from sentiment_discovery.encoder import Encoder


@pytest.fixture(scope="module")
def transferred(tmp_path_factory):
    """A 2-layer model transferred with mean hidden-state pooling over both layers."""
    folder = tmp_path_factory.mktemp("clf")
    paths = sst_slices(folder, (("train", 160), ("val", 80), ("test", 80)))
    lm = tiny_lm(folder / "lm.pt", nhid=12, nlayers=2)
    args = [
        "--load_model",
        lm,
        "--data",
        paths["train"],
        "--valid",
        paths["val"],
        "--test",
        paths["test"],
        "--pooling",
        "mean",
        "--state",
        "hidden",
        "--all_layers",
        "--log2_C",
        "-1",
        "3",
    ]
    assert load_script("transfer").main(args) == 0
    return {"folder": folder, "lm": lm, "clf": str(folder / "lm_transfer" / "classifier.pt"), **paths}


def run_classifier(args, capsys) -> tuple[int, str, str]:
    code = load_script("classifier").main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_classifier_reproduces_transfer_probabilities(transferred, tmp_path, capsys):
    probs_path = tmp_path / "probs.npy"
    code, out, _ = run_classifier(
        [
            "--load_model",
            transferred["clf"],
            "--data",
            transferred["test"],
            "--save_probs",
            str(probs_path),
            "--write_results",
            str(tmp_path / "pred.json"),
        ],
        capsys,
    )
    assert code == 0
    expected = np.load(transferred["folder"] / "lm_transfer" / "all_neurons_probs_test.npy")
    probs = np.load(probs_path)
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert len(np.unique(probs.round(4))) > 1  # a real classifier, not a constant
    results = json.loads((transferred["folder"] / "lm_transfer" / "results.json").read_text())
    assert f"accuracy {100 * results['all_features']['accuracy']['test']:.2f}%" in out
    written = json.loads((tmp_path / "pred.json").read_text())
    assert len(written) == 80 and {"sentence", "label", "predicted", "prob"} <= set(written[0])
    assert [r["predicted"] for r in written] == (probs > 0.5).astype(int).tolist()
    assert [r["label"] for r in written] == pd.read_csv(transferred["test"])["label"].tolist()


def test_text_flags_agree_with_csv_and_encoder(transferred, tmp_path, capsys):
    texts = pd.read_csv(transferred["test"])["sentence"].tolist()[:3]
    expected = np.load(transferred["folder"] / "lm_transfer" / "all_neurons_probs_test.npy")[:3]
    probs_path = tmp_path / "p.npy"
    # Original one-dash spelling, and --text repeated.
    code, out, _ = run_classifier(
        [
            "-load_model",
            transferred["clf"],
            "-text",
            texts[0],
            texts[1],
            "--text",
            texts[2],
            "--save_probs",
            str(probs_path),
        ],
        capsys,
    )
    assert code == 0 and "accuracy" not in out
    np.testing.assert_allclose(np.load(probs_path), expected, atol=1e-5)

    encoder = Encoder.load(transferred["clf"])
    assert (encoder.pooling, encoder.state, encoder.all_layers) == ("mean", "hidden", True)
    assert encoder.transform(texts).shape == (3, 24)
    np.testing.assert_allclose(encoder.predict_proba(texts), expected, atol=1e-5)


def test_neurons_flag_masks_to_the_top_weights(transferred, tmp_path, capsys):
    encoder = Encoder.load(transferred["clf"])
    clf = encoder.classifier
    texts = pd.read_csv(transferred["test"])["sentence"].tolist()[:5]
    feats = encoder.transform(texts).astype(np.float64)
    top = int(np.argmax(np.abs(clf["weight"].numpy())))
    z = (feats[:, top] - clf["mean"][top].item()) / clf["scale"][top].item() * clf["weight"][top].item()
    expected = 1 / (1 + np.exp(-(z + clf["bias"].item())))
    probs_path = tmp_path / "p.npy"
    code, _, _ = run_classifier(
        [
            "--load_model",
            transferred["clf"],
            "--neurons",
            "1",
            "--save_probs",
            str(probs_path),
            "--text",
            *texts,
        ],
        capsys,
    )
    assert code == 0
    np.testing.assert_allclose(np.load(probs_path), expected, atol=1e-5)


def test_unlabelled_data_and_empty_texts_are_classified(transferred, tmp_path, capsys):
    data = tmp_path / "texts.csv"
    pd.DataFrame({"id": [1, 2, 3], "sentence": ["", "great fun", "   "]}).to_csv(data, index=False)
    code, out, _ = run_classifier(
        ["--load_model", transferred["clf"], "--data", str(data), "--save_probs", str(tmp_path / "p.npy")],
        capsys,
    )
    assert code == 0 and "3 texts" in out and "accuracy" not in out
    probs = np.load(tmp_path / "p.npy")
    assert probs.shape == (3,) and probs[0] == pytest.approx(probs[2])


def test_bad_inputs_get_clear_errors(transferred, tmp_path, capsys):
    def fails(args, *expected):
        code, _, err = run_classifier([*args, "--save_probs", str(tmp_path / "p.npy")], capsys)
        assert code == 2 and err.startswith("error: ") and "Traceback" not in err
        for text in expected:
            assert text in err, err

    fails(["--load_model", transferred["lm"], "--text", "hi"], "no sentiment classifier", "transfer.py")
    bad_labels = tmp_path / "bad.csv"
    pd.DataFrame({"label": [0, 2], "sentence": ["a", "b"]}).to_csv(bad_labels, index=False)
    fails(["--load_model", transferred["clf"], "--data", str(bad_labels)], "bad.csv", "0 or 1")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    fails(["--load_model", transferred["clf"], "--data", str(empty)], "empty.csv", "empty")
    fails(["--load_model", str(tmp_path / "nope.pt"), "--text", "hi"], "nope.pt")

    with pytest.raises(CheckpointError, match="no sentiment classifier"):
        Encoder.load(transferred["lm"]).predict_proba(["hi"])
    bare = Encoder.load(transferred["lm"])
    assert (bare.pooling, bare.state) == ("last", "cell") and bare.transform("hi").shape == (1, 12)


@pytest.fixture(scope="module")
def synthetic_transfer(tmp_path_factory):
    """A tiny model transferred on small labelled files made here, keeping 2 neurons."""
    from test_transfer import synthetic_splits

    folder = tmp_path_factory.mktemp("synthetic")
    paths = synthetic_splits(folder)
    lm = tiny_lm(folder / "lm.pt", nhid=10)
    args = ["--load_model", lm, "--data", paths["train"], "--valid", paths["val"], "--test", paths["test"],
            "--neurons", "2", "--log2_C", "0", "4"]  # fmt: skip
    assert load_script("transfer").main(args) == 0
    return {"folder": folder, "clf": folder / "lm_transfer" / "classifier.pt", **paths}


def test_write_results_keeps_the_true_label_and_top_neuron_values(synthetic_transfer, tmp_path, capsys):
    clf = str(synthetic_transfer["clf"])
    code, out, _ = run_classifier(
        ["--load_model", clf, "--data", synthetic_transfer["test"], "--save_probs", str(tmp_path / "p.npy"),
         "--write-results", str(tmp_path / "pred.csv")],
        capsys,
    )  # fmt: skip
    assert code == 0
    encoder = Encoder.load(clf)
    neurons = encoder.neurons.tolist()
    assert len(neurons) == 2
    written = pd.read_csv(tmp_path / "pred.csv")
    assert list(written.columns) == ["sentence", "label", "predicted", "prob", "prob_top2"] + [
        f"neuron {k}" for k in neurons
    ]
    test = pd.read_csv(synthetic_transfer["test"])
    assert written["label"].tolist() == test["label"].tolist()
    features = encoder.transform(test["sentence"].tolist())
    np.testing.assert_allclose(written["prob"], np.load(tmp_path / "p.npy"), atol=1e-6)
    top2 = encoder.predict_proba(test["sentence"].tolist(), neurons=2)
    np.testing.assert_allclose(written["prob_top2"], top2, atol=1e-6)
    for k in neurons:
        np.testing.assert_allclose(written[f"neuron {k}"], features[:, k], rtol=1e-5, atol=1e-6)

    # unlabelled texts: no label column; --neurons 1 picks the top neuron alone
    code, _, _ = run_classifier(
        ["--load_model", clf, "--text", "good fun", "awful", "--neurons", "1",
         "--save_probs", str(tmp_path / "p.npy"), "--write_results", str(tmp_path / "pred.json")],
        capsys,
    )  # fmt: skip
    records = json.loads((tmp_path / "pred.json").read_text())
    assert code == 0 and [sorted(r) for r in records] == [
        sorted(["sentence", "predicted", "prob", "prob_top1", f"neuron {neurons[0]}"])
    ] * 2


def test_save_probs_without_a_folder_goes_beside_the_model(synthetic_transfer, tmp_path, capsys, monkeypatch):
    # the original wrote its probabilities beside the model it loaded
    monkeypatch.chdir(tmp_path)
    clf = str(synthetic_transfer["clf"])
    code, out, _ = run_classifier(["--load_model", clf, "--text", "good", "--save_probs", "mine.npy"], capsys)
    beside = synthetic_transfer["clf"].parent / "mine.npy"
    assert code == 0 and beside.exists() and not (tmp_path / "mine.npy").exists()
    assert str(beside) in out
    code, _, _ = run_classifier(["--load_model", clf, "--text", "good", "--save_probs", "./here.npy"], capsys)
    assert code == 0 and (tmp_path / "here.npy").exists()  # a path with a folder is taken as it is
