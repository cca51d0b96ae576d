"""transfer.py: regression sweep, neuron selection, results files, classifier.pt, feature cache."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import fixture_path, load_script

from sentiment_discovery.checkpoint import load_checkpoint, save_checkpoint
from sentiment_discovery.model import ModelConfig, RNNModel
from sentiment_discovery.readout import classifier_probs, top_neurons
from sentiment_discovery.regression import Regression, fit_l1_regression, make_classifier, standardizer


def sst_slices(folder, sizes=(("train", 200), ("val", 100), ("test", 100))) -> dict[str, str]:
    paths = {}
    for split, n in sizes:
        frame = pd.read_csv(fixture_path("binary_sst", f"{split}.csv")).head(n)
        paths[split] = str(folder / f"{split}.csv")
        frame.to_csv(paths[split], index=False)
    return paths


def tiny_lm(path, nhid: int = 16, nlayers: int = 1) -> str:
    torch.manual_seed(0)
    save_checkpoint(path, RNNModel(ModelConfig(emsize=8, nhid=nhid, nlayers=nlayers)))
    return str(path)


def test_top_neurons_are_the_largest_absolute_weights():
    weight = np.array([0.1, -3.0, 2.0, 0.0, -0.5])
    assert top_neurons(weight, 1).tolist() == [1]
    assert top_neurons(weight, 3).tolist() == [1, 2, 4]
    # a zero-weight feature is no neuron; an all-zero regression still names one feature
    assert top_neurons(torch.tensor(weight), -1).tolist() == [1, 2, 4, 0]
    assert top_neurons(weight, 99).tolist() == [1, 2, 4, 0]
    assert top_neurons(np.zeros(4), 2).tolist() == [0]


def test_standardizer_keeps_constant_features_finite():
    x = np.array([[1.0, 5.0], [3.0, 5.0]], dtype=np.float32)
    mean, scale = standardizer(x)
    np.testing.assert_allclose(mean, [2.0, 5.0])
    np.testing.assert_allclose(scale, [1.0, 1.0])  # std of column 0 is 1; column 1 constant -> 1


def test_classifier_probability_and_neuron_masking():
    reg = Regression(np.array([0.5, -2.0, 0.0]), 0.25, 1.0, {}, True)
    mean, scale = np.array([1.0, 0.0, 0.0]), np.array([2.0, 1.0, 1.0])
    clf = make_classifier(reg, mean, scale, top_neurons(reg.weight, 1), "mean", "hidden", False)
    x = np.array([[3.0, 1.0, 7.0], [1.0, -1.0, 0.0]], dtype=np.float32)
    z = ((x - mean) / scale) @ reg.weight + 0.25
    np.testing.assert_allclose(classifier_probs(x, clf), 1 / (1 + np.exp(-z)), rtol=1e-6)
    z_top = -2.0 * x[:, 1] + 0.25  # only the largest-|weight| feature (index 1) kept
    np.testing.assert_allclose(classifier_probs(x, clf, neurons=1), 1 / (1 + np.exp(-z_top)), rtol=1e-6)
    assert clf["neurons"].tolist() == [1] and clf["neurons"].dtype == torch.long


def test_sweep_finds_an_informative_feature():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6))
    y = (x[:, 4] + 0.3 * rng.normal(size=300) > 0).astype(np.int64)
    reg = fit_l1_regression(x[:200], y[:200], x[200:], y[200:], [2.0**e for e in range(-8, 1)])
    assert top_neurons(reg.weight, 1).tolist() == [4]
    assert reg.val_accuracy_by_C[reg.C] == max(reg.val_accuracy_by_C.values()) > 0.85


def test_transfer_end_to_end(tmp_path, capsys):
    paths = sst_slices(tmp_path)
    lm = tiny_lm(tmp_path / "lm.pt")
    transfer = load_script("transfer")
    args = [
        "--load_model",
        lm,
        "--data",
        paths["train"],
        "--valid",
        paths["val"],
        "--test",
        paths["test"],
        "--neurons",
        "2",
        "--drop_neurons",
        "--log2_C",
        "-2",
        "4",
        "--write_results",
        str(tmp_path / "pred.csv"),
    ]
    assert transfer.main(args) == 0
    out_dir = tmp_path / "lm_transfer"
    for name in (
        "results.json",
        "classifier.pt",
        "all_neurons_probs_test.npy",
        "trXt.npy",
        "teXt.npy",
        "extreme_samples.json",
        "weight_vis.png",
        "teY.npy",
    ):
        assert (out_dir / name).stat().st_size > 0, name

    results = json.loads((out_dir / "results.json").read_text())
    ckpt = load_checkpoint(out_dir / "classifier.pt")
    clf = ckpt.classifier
    assert clf["pooling"] == "last" and clf["state"] == "cell" and clf["all_layers"] is False
    assert clf["weight"].shape == (16,) and clf["mean"].shape == (16,) and clf["bias"].dim() == 0
    neurons = clf["neurons"].tolist()
    assert neurons == results["neurons"]["indices"] == top_neurons(clf["weight"], 2).tolist()
    assert set(results["neurons"]["accuracy"]) == {"train", "val", "test"}
    assert "drop_neurons" in results

    # Saved probabilities are the classifier's on the saved features; accuracy follows from them.
    test_labels = pd.read_csv(paths["test"])["label"].to_numpy()
    probs = np.load(out_dir / "all_neurons_probs_test.npy")
    np.testing.assert_allclose(
        probs, classifier_probs(np.load(out_dir / "teXt.npy"), clf), atol=1e-6
    )
    assert results["all_features"]["accuracy"]["test"] == pytest.approx(np.mean((probs > 0.5) == test_labels))
    written = pd.read_csv(tmp_path / "pred.csv")
    assert list(written.columns)[:5] == ["sentence", "label", "predicted", "prob", "prob_top2"]
    assert len(written) == 100 and written["label"].tolist() == test_labels.tolist()
    np.testing.assert_allclose(written["prob"], probs, atol=1e-6)
    assert len(list((out_dir / "logit_vis").glob("*.png"))) == 2

    extremes = json.loads((out_dir / "extreme_samples.json").read_text())
    top_values = np.load(out_dir / "teXt.npy")[:, neurons[0]]
    # polarity-aware: the most positive texts are the top neuron's highest values only if its weight is
    polarity = 1 if float(clf["weight"][neurons[0]]) >= 0 else -1
    assert extremes["polarity"] == polarity
    ends = (top_values.max(), top_values.min())[:: polarity]
    assert extremes["most_positive"][0]["value"] == pytest.approx(ends[0])
    assert extremes["most_negative"][0]["value"] == pytest.approx(ends[1])

    # The cache is reused only under the same settings.
    capsys.readouterr()
    assert transfer.main([*args, "--use_cached"]) == 0
    assert capsys.readouterr().out.count("using cached features") == 3
    assert transfer.main([*args, "--use_cached", "--pooling", "max", "--log2_C", "0", "0"]) == 0
    assert "using cached" not in capsys.readouterr().out
    assert load_checkpoint(out_dir / "classifier.pt").classifier["pooling"] == "max"


def test_transfer_bad_inputs(tmp_path, capsys):
    paths = sst_slices(tmp_path, (("train", 40), ("val", 20), ("test", 20)))
    lm = tiny_lm(tmp_path / "lm.pt", nhid=8)
    transfer = load_script("transfer")
    common = ["--load_model", lm, "--valid", paths["val"], "--log2_C", "0", "0"]
    base = [*common, "--test", paths["test"]]

    def fails(args, *expected):
        assert transfer.main(args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err
        for text in expected:
            assert text in err, err

    ratings = tmp_path / "ratings.csv"
    pd.DataFrame({"label": [1, 5, 3], "sentence": ["a", "b", "c"]}).to_csv(ratings, index=False)
    # ratings are classes now (1, 3, 5): the validation file's 0 is not one of them
    fails([*base, "--data", str(ratings)], "val.csv", "not one of the training split's classes (1, 3, 5)")
    unlabelled = tmp_path / "unlabelled.csv"
    pd.DataFrame({"sentence": ["a", "b"]}).to_csv(unlabelled, index=False)
    fails([*base, "--data", str(unlabelled)], "unlabelled.csv", "'label'")
    fails([*common, "--data", paths["train"], "--test", str(unlabelled)], "test split", "--no_test_eval")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    fails([*base, "--data", str(empty)], "empty.csv", "empty")
    fails([*base, "--data", paths["train"], "--nhid", "4096"], "nhid")
    fails(["--load_model", str(tmp_path / "missing.pt"), "--data", paths["train"]], "missing.pt")
    with pytest.raises(SystemExit) as exit_info:  # argparse checks the value: usage and one error line
        transfer.main([*base, "--data", paths["train"], "--neurons", "0"])
    assert exit_info.value.code == 2 and "--neurons: 0 must be at least 1" in capsys.readouterr().err
    fails([*common, "--data", paths["train"], "--test", "", "--write_results", "p.csv"], "no --test")

    # Empty texts and an unlabelled test set are handled.
    with_empty = tmp_path / "with_empty.csv"
    frame = pd.read_csv(paths["train"])
    frame.loc[:4, "sentence"] = ""
    frame.to_csv(with_empty, index=False)
    out = str(tmp_path / "out")
    args = [
        *common,
        "--data",
        str(with_empty),
        "--test",
        str(unlabelled),
        "--no_test_eval",
        "--save_results",
        out,
    ]
    assert transfer.main(args) == 0
    assert np.load(tmp_path / "out" / "all_neurons_probs_test.npy").shape == (2,)


def test_regression_never_prefers_an_all_zero_model():
    # An all-zero model predicts one class everywhere; on a validation split that is 80% that class it
    # outscores a weak feature, but it is no classifier of anything: a model using a feature wins.
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 100)
    x = (y + rng.normal(0, 2.0, 200))[:, None]
    val_y = np.array([0] * 80 + [1] * 20)
    val_x = rng.normal(0, 1, (100, 1))
    reg = fit_l1_regression(x, y, val_x, val_y, [1e-6, 1.0])
    assert reg.C == 1.0 and reg.nonzero == 1
    assert reg.val_accuracy_by_C[1e-6] == 0.8 > reg.val_accuracy_by_C[1.0]


def synthetic_splits(folder, sizes=(("train", 60), ("val", 30), ("test", 20)), seed=0) -> dict[str, str]:
    """Small labelled csv files made here (no external data): positive and negative word soups."""
    rng = np.random.default_rng(seed)
    words = {1: ["good", "great", "fine", "lovely", "fun"], 0: ["bad", "awful", "dull", "poor", "sad"]}
    paths = {}
    for split, n in sizes:
        labels = np.arange(n) % 2
        texts = [" ".join(rng.choice(words[int(y)], size=int(rng.integers(2, 6)))) for y in labels]
        paths[split] = str(folder / f"{split}.csv")
        pd.DataFrame({"label": labels, "sentence": texts}).to_csv(paths[split], index=False)
    return paths


def test_write_results_keeps_the_truth_and_every_top_neuron(tmp_path):
    paths = synthetic_splits(tmp_path)
    lm = tiny_lm(tmp_path / "lm.pt", nhid=12)
    out_dir = tmp_path / "res"
    args = [
        "--load_model", lm, "--data", paths["train"], "--valid", paths["val"], "--test", paths["test"],
        "--neurons", "3", "--log2_C", "0", "4", "--save-results", str(out_dir),
        "--write-results", str(tmp_path / "pred.csv"),
    ]  # fmt: skip
    assert load_script("transfer").main(args) == 0
    results = json.loads((out_dir / "results.json").read_text())
    neurons = results["neurons"]["indices"]
    assert len(neurons) == 3
    written = pd.read_csv(tmp_path / "pred.csv")
    columns = ["sentence", "label", "predicted", "prob", "prob_top3"] + [f"neuron {k}" for k in neurons]
    assert list(written.columns) == columns
    test = pd.read_csv(paths["test"])
    assert written["label"].tolist() == test["label"].tolist()  # the file's labels, not predictions
    assert written["sentence"].tolist() == test["sentence"].tolist()
    probs = np.load(out_dir / "all_neurons_probs_test.npy")
    np.testing.assert_allclose(written["prob"], probs, atol=1e-6)
    assert written["predicted"].tolist() == (probs > 0.5).astype(int).tolist()
    features = np.load(out_dir / "teXt.npy")
    for k in neurons:
        np.testing.assert_allclose(written[f"neuron {k}"], features[:, k], rtol=1e-6)
    # P(positive) of the top neurons is the second regression's: its accuracy is the one reported
    accuracy = np.mean((written["prob_top3"] > 0.5) == test["label"])
    assert accuracy == pytest.approx(results["neurons"]["accuracy"]["test"])

    # one histogram per top neuron, and the labels beside the features
    assert sorted(p.name for p in (out_dir / "logit_vis").iterdir()) == sorted(
        f"{i}_{k}.png" for i, k in enumerate(neurons)
    )
    assert (out_dir / "weight_vis.png").stat().st_size > 0
    for split, prefix in (("train", "tr"), ("val", "va"), ("test", "te")):  # the original's names
        labels = np.load(out_dir / f"{prefix}Y.npy")
        assert labels.tolist() == pd.read_csv(paths[split])["label"].tolist()
        assert len(labels) == len(np.load(out_dir / f"{prefix}Xt.npy"))

    # json by extension; --neurons 1 leaves one histogram
    args[args.index("3")] = "1"
    args[-1] = str(tmp_path / "pred.json")
    assert load_script("transfer").main(args) == 0
    records = json.loads((tmp_path / "pred.json").read_text())
    assert len(records) == 20 and set(records[0]) >= {"sentence", "label", "predicted", "prob", "prob_top1"}
    assert len(list((out_dir / "logit_vis").iterdir())) == 1


@pytest.mark.parametrize("valid", ["none", ""])
def test_no_validation_split_chooses_C_by_cross_validation(tmp_path, capsys, valid):
    paths = synthetic_splits(tmp_path)
    lm = tiny_lm(tmp_path / "lm.pt", nhid=8)
    args = ["--load_model", lm, "--data", paths["train"], "--valid", valid, "--test", paths["test"],
            "--log2_C", "-1", "2"]  # fmt: skip
    assert load_script("transfer").main(args) == 0
    assert "cross-validation" in capsys.readouterr().out
    results = json.loads((tmp_path / "lm_transfer" / "results.json").read_text())
    assert results["C_chosen_by"] == "3-fold cross-validation on train"
    assert set(results["all_features"]["accuracy"]) == {"train", "test"}
    assert not (tmp_path / "lm_transfer" / "vaXt.npy").exists()


def test_cross_validation_finds_an_informative_feature():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(240, 5))
    y = (x[:, 2] + 0.3 * rng.normal(size=240) > 0).astype(np.int64)
    reg = fit_l1_regression(x, y, None, None, [2.0**e for e in range(-8, 1)])
    assert top_neurons(reg.weight, 1).tolist() == [2]
    # the scores are held-out accuracies: the all-but-zero penalty scores near chance, the best well above
    assert reg.val_accuracy_by_C[reg.C] == max(reg.val_accuracy_by_C.values()) > 0.85
    assert reg.val_accuracy_by_C[2.0**-8] < 0.7
