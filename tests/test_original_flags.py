"""The original suite's flags on classifier.py, generate.py and transfer.py (issue 22): model-shape flags
checked against the checkpoint, --split carving validation/test from --data, the evaluation keys,
--preprocess forcing featurization."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT, load_script
from test_transfer import synthetic_splits, tiny_lm

from sentiment_discovery.checkpoint import save_checkpoint
from sentiment_discovery.model import ModelConfig, RNNModel
from sentiment_discovery.readers import Records, parse_split, split_records

H = 12


def run_script(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / args[0]), *args[1:]]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def two_layer_lm(path) -> str:
    torch.manual_seed(0)
    save_checkpoint(path, RNNModel(ModelConfig(emsize=8, nhid=H, nlayers=2)))
    return str(path)


def with_classifier(path, all_layers: bool = False) -> str:
    torch.manual_seed(0)
    model = RNNModel(ModelConfig(emsize=8, nhid=H, nlayers=2))
    n = 2 * H if all_layers else H
    weight = torch.zeros(n)
    weight[3] = 1.0
    classifier = {"weight": weight, "bias": torch.tensor(0.0), "neurons": torch.tensor([3]),
                  "pooling": "last", "state": "cell", "all_layers": all_layers}  # fmt: skip
    save_checkpoint(path, model, classifier=classifier)
    return str(path)


def fails(capsys, main, args, *expected) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, err
    return err


# ---------------------------------------------------------------------------------------------
# model-shape flags: checked against the checkpoint
# ---------------------------------------------------------------------------------------------


def test_generate_takes_the_original_model_flags(tmp_path):
    lm = two_layer_lm(tmp_path / "lm.pt")
    run = run_script(
        "generate.py", "--load_model", lm, "--model", "mLSTM", "--emsize", "8", "--nhid", str(H),
        "--nlayers", "2", "--dropout", "0.1", "--all_layers", "--neuron", str(H + 5), "--heatmap",
        "--gen_length", "10", "--seed", "1", "--cpu", cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    # --all_layers: --neuron numbers every layer's units, H + 5 is unit 5 of layer 1
    assert "feature 17 (layer 1, unit 5, cell state)" in run.stdout
    assert len((tmp_path / "generated.txt").read_bytes()) == 10


def test_generate_refuses_model_flags_the_checkpoint_contradicts(tmp_path, capsys):
    lm = two_layer_lm(tmp_path / "lm.pt")
    main = load_script("generate").main
    common = ["--load_model", lm, "--gen_length", "5", "--cpu", "--save", str(tmp_path / "g.txt")]
    fails(capsys, main, [*common, "--nhid", "4096"], "lm.pt", "--nhid 4096", "nhid 12")
    fails(capsys, main, [*common, "--model", "LSTM"], "--model LSTM", "model mLSTM")
    fails(capsys, main, [*common, "--nlayers", "1"], "--nlayers 1", "nlayers 2")
    fails(capsys, main, [*common, "--tied"], "--tied given", "tied False")
    # without --all_layers the units are the last layer's: H + 5 is out of range
    fails(capsys, main, [*common, "--neuron", str(H + 5), "--heatmap"], "--neuron 17", "out of range")
    clf = with_classifier(tmp_path / "clf.pt")
    fails(capsys, main, ["--load_model", clf, "--all_layers", "--gen_length", "5", "--cpu"], "--all_layers")
    assert main([*common, "--emsize", "8", "--nhid", str(H)]) == 0  # equal values are accepted


def test_classifier_takes_the_original_model_flags(tmp_path, capsys):
    clf = with_classifier(tmp_path / "clf.pt")
    run = run_script(
        "classifier.py", "--load_model", clf, "--model", "mLSTM", "--emsize", "8", "--nhid", str(H),
        "--nlayers", "2", "--text", "a fine film", cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert np.load(tmp_path / "clf_results.npy").shape == (1,)
    main = load_script("classifier").main
    common = ["--load_model", clf, "--text", "a fine film"]
    fails(capsys, main, [*common, "--nhid", "4096"], "clf.pt", "--nhid 4096", "nhid 12")
    fails(capsys, main, [*common, "--emsize", "64"], "--emsize 64", "emsize 8")


# ---------------------------------------------------------------------------------------------
# transfer.py: --split, --eval_text_key/--eval_label_key, --preprocess
# ---------------------------------------------------------------------------------------------


def test_split_records_cuts_a_shuffled_file_into_disjoint_parts():
    records = Records("f.csv", [f"text {i}" for i in range(50)], np.arange(50) % 2)
    train, val, test = split_records(records, parse_split("0.8,0.1,0.1"), seed=3)
    assert (len(train), len(val), len(test)) == (40, 5, 5)
    seen = train.texts + val.texts + test.texts
    assert sorted(seen) == sorted(records.texts) and train.texts != records.texts[:40]  # shuffled
    for part in (train, val, test):  # each label stays with its text
        assert [int(t.split()[1]) % 2 for t in part.texts] == part.labels.tolist()
    again = split_records(records, parse_split("0.8,0.1,0.1"), seed=3)
    assert [p.texts for p in again] == [train.texts, val.texts, test.texts]
    assert split_records(records, parse_split("0.8,0.1,0.1"), seed=4)[1].texts != val.texts
    # a tiny part still gets a record; a zero part none
    parts = split_records(Records("f", list("abcdefghij")), parse_split("100,1,1"), seed=0)
    assert [len(p) for p in parts] == [8, 1, 1]
    assert [len(p) for p in split_records(Records("f", list("abc")), parse_split("1."), seed=0)] == [3, 0, 0]


def test_transfer_split_carves_validation_and_test_from_data(tmp_path, capsys):
    paths = synthetic_splits(tmp_path, (("train", 60), ("test", 20)))
    lm = tiny_lm(tmp_path / "lm.pt", nhid=8)
    transfer = load_script("transfer").main
    base = ["--load_model", lm, "--data", paths["train"], "--log2_C", "0", "1", "--model", "mLSTM",
            "--emsize", "8", "--nhid", "8", "--nlayers", "1"]  # fmt: skip
    assert transfer([*base, "--valid", "none", "--test", "none", "--split", "0.7,0.2,0.1"]) == 0
    out = capsys.readouterr().out
    assert "cut into train 42, val 12, test 6 records" in out and "cross-validation" not in out
    results = json.loads((tmp_path / "lm_transfer" / "results.json").read_text())
    assert results["records"] == {"train": 42, "val": 12, "test": 6}
    assert results["C_chosen_by"] == "validation" and results["split"]["carved"] == ["train", "val", "test"]
    # a given --test file zeroes the test part (as the original): only validation is carved
    assert transfer([*base, "--valid", "none", "--test", paths["test"], "--split", "0.7,0.2,0.1"]) == 0
    results = json.loads((tmp_path / "lm_transfer" / "results.json").read_text())
    assert results["records"] == {"train": 47, "val": 13, "test": 20}  # 0.7 : 0.2 of 60
    # the default --split 1. keeps all of --data for training
    assert transfer([*base, "--valid", "none", "--test", paths["test"]]) == 0
    results = json.loads((tmp_path / "lm_transfer" / "results.json").read_text())
    assert results["records"] == {"train": 60, "test": 20} and results["split"] is None
    fails(capsys, transfer, [*base, "--nhid", "16"], "--nhid 16", "nhid 8")


def test_transfer_eval_keys_and_preprocess(tmp_path, capsys):
    paths = synthetic_splits(tmp_path)
    for split in ("val", "test"):  # the evaluation files name their columns otherwise
        frame = pd.read_csv(paths[split]).rename(columns={"sentence": "review", "label": "stars"})
        frame.to_csv(paths[split], index=False)
    lm = tiny_lm(tmp_path / "lm.pt", nhid=8)
    transfer = load_script("transfer").main
    args = ["--load_model", lm, "--data", paths["train"], "--valid", paths["val"], "--test", paths["test"],
            "--log2_C", "0", "0"]  # fmt: skip
    fails(capsys, transfer, args, "val split", "val.csv", "'sentence'")
    args += ["--eval_text_key", "review", "--eval_label_key", "stars"]
    assert transfer(args) == 0
    results = json.loads((tmp_path / "lm_transfer" / "results.json").read_text())
    assert results["records"] == {"train": 60, "val": 30, "test": 20}
    capsys.readouterr()
    assert transfer([*args, "--use_cached"]) == 0
    assert capsys.readouterr().out.count("using cached features") == 3
    assert transfer([*args, "--use_cached", "--preprocess"]) == 0  # --preprocess: featurize again
    out = capsys.readouterr().out
    assert "using cached" not in out and out.count("featurizing") >= 3


@pytest.mark.parametrize("script", ["classifier.py", "generate.py", "transfer.py"])
def test_help_lists_the_original_model_flags(script):
    parser = load_script(script.removesuffix(".py")).build_parser()
    flags = {opt for action in parser._actions for opt in action.option_strings}
    assert {"--model", "--emsize", "--nhid", "--nlayers"} <= flags
    if script == "generate.py":
        assert {"--dropout", "--all_layers", "--tied"} <= flags
    if script == "transfer.py":
        assert {"--split", "--eval_text_key", "--eval_label_key", "--preprocess"} <= flags


# ---------------------------------------------------------------------------------------------
# transfer.py's outputs under the original's names; features named by unit; polarity-aware extremes
# ---------------------------------------------------------------------------------------------


def test_features_are_named_by_unit_layer_pooling_and_state():
    from sentiment_discovery.readout import FeatureSpec

    big = ModelConfig(nhid=4096)
    spec = FeatureSpec.parse("mean,max,last")
    assert spec.describe(398, big) == "unit 398, mean cell (feature 398)"
    assert spec.describe(4096 + 398, big) == "unit 398, max cell (feature 4494)"
    layers = FeatureSpec.parse("last", "hidden", all_layers=True)
    two = ModelConfig(nhid=H, nlayers=2)
    assert layers.describe(H + 5, two) == "unit 5 of layer 1, last hidden (feature 17)"


def test_transfer_writes_the_original_names_for_every_split(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from sentiment_discovery import plots

    titles = []

    def keep_title(fig, path, **kwargs):  # the histogram titles, as drawn
        titles.append((path.name, fig.axes[0].get_title()))
        plt.close(fig)

    monkeypatch.setattr(plots, "save_figure", keep_title)
    paths = synthetic_splits(tmp_path)
    lm = tiny_lm(tmp_path / "lm.pt", nhid=8)
    out = tmp_path / "lm_transfer"
    args = ["--load_model", lm, "--data", paths["train"], "--valid", paths["val"], "--test", paths["test"],
            "--pooling", "mean,max,last", "--neurons", "2", "--drop_neurons",
            "--log2_C", "0", "2"]  # fmt: skip
    assert load_script("transfer").main(args) == 0
    results = json.loads((out / "results.json").read_text())
    sizes = {"tr": 60, "va": 30, "te": 20}
    for prefix, split in (("tr", "train"), ("va", "val"), ("te", "test")):
        assert np.load(out / f"{prefix}Xt.npy").shape == (sizes[prefix], 3 * 8)  # mean, max, last blocks
        assert np.load(out / f"{prefix}Y.npy").tolist() == pd.read_csv(paths[split])["label"].tolist()
    regressions = {"all_neurons": "all_features", "neurons": "neurons", "dropped_neurons": "drop_neurons"}
    for name, key in regressions.items():
        score = json.loads((out / f"{name}_score.txt").read_text())
        assert score == pytest.approx([100 * results[key]["accuracy"][s] for s in ("train", "val", "test")])
        for split, prefix in (("train", "tr"), ("val", "va"), ("test", "te")):
            probs = np.load(out / f"{name}_probs_{split}.npy")
            labels = np.load(out / f"{prefix}Y.npy")
            assert np.mean((probs > 0.5) == labels) == pytest.approx(results[key]["accuracy"][split])
    assert np.load(out / "neurons.npy").shape == (1, 24) and np.load(out / "neuron_bias.npy").shape == (1,)
    assert not list(out.glob("*.pkl"))
    # the top neurons are named by what they are, in results.json and on the histograms
    spec_names = results["neurons"]["names"]
    assert len(spec_names) == 2
    for k, name in zip(results["neurons"]["indices"], spec_names):
        pooling = ("mean", "max", "last")[k // 8]
        assert name == f"unit {k % 8}, {pooling} cell (feature {k})"
    drawn = dict(titles)
    for rank, (k, name) in enumerate(zip(results["neurons"]["indices"], spec_names)):
        assert drawn[f"{rank}_{k}.png"].startswith(f"{name} by class")


def test_extreme_samples_follow_the_polarity_of_the_weight():
    from sentiment_discovery.transfer_results import extreme_samples

    records = Records("f", ["low", "mid", "high"], np.array([1, 0, 0]))
    values = np.array([-2.0, 0.0, 3.0])
    positive = extreme_samples(values, records, weight=0.7, n=1)
    assert positive["most_positive"][0]["text"] == "high" and positive["most_negative"][0]["text"] == "low"
    negative = extreme_samples(values, records, weight=-0.7, n=1)  # low values read as positive
    assert negative["polarity"] == -1
    assert negative["most_positive"][0] == {"value": -2.0, "text": "low", "label": 1}
    assert negative["most_negative"][0]["text"] == "high"


# ---------------------------------------------------------------------------------------------
# labels other than 0/1: several classes, names, accuracy + macro F1 + MCC, --binarize_labels
# ---------------------------------------------------------------------------------------------


def test_class_names_sort_numbers_by_value_and_names_as_text():
    from sentiment_discovery.errors import DataError
    from sentiment_discovery.readers import class_names, class_numbers

    values = np.array([10, 2, 2.0, 1], dtype=object)
    assert class_names(values) == ("1", "2", "10")  # 10 after 2: by value, not as text
    assert class_numbers(values, ("1", "2", "10"), "f.csv").tolist() == [2, 1, 1, 0]
    names = class_names(np.array(["pos", "neg", "neu", "neg"], dtype=object))
    assert names == ("neg", "neu", "pos")
    with pytest.raises(DataError, match=r"f.csv: record 2: label 'bad' is not one of .*neg, neu, pos"):
        class_numbers(np.array(["pos", "bad"], dtype=object), names, "f.csv")


def word_soup_classes(
    folder, names=("neg", "neu", "pos"), sizes=(("train", 60), ("val", 30), ("test", 30))
) -> dict[str, str]:
    """Texts of three word lists (bad / plain / good words), labelled by ``names`` in turn."""
    rng = np.random.default_rng(0)
    words = [["bad", "awful", "dull"], ["okay", "plain", "average"], ["good", "great", "fun"]]
    paths = {}
    for split, n in sizes:
        classes = np.arange(n) % len(names)
        texts = [" ".join(rng.choice(words[k], size=3)) for k in classes]
        paths[split] = str(folder / f"{split}.csv")
        frame = pd.DataFrame({"sentence": texts, "label": [names[k] for k in classes]})
        frame.to_csv(paths[split], index=False)
    return paths


def test_transfer_fits_several_named_classes_and_classifier_reads_them(tmp_path, capsys):
    from sklearn.metrics import f1_score, matthews_corrcoef

    from sentiment_discovery.checkpoint import load_checkpoint

    paths = word_soup_classes(tmp_path)
    lm = tiny_lm(tmp_path / "lm.pt", nhid=8)
    out = tmp_path / "lm_transfer"
    args = ["--load_model", lm, "--data", paths["train"], "--valid", paths["val"], "--test", paths["test"],
            "--neurons", "2", "--log2_C", "-2", "2",
            "--write_results", str(tmp_path / "pred.csv")]  # fmt: skip
    assert load_script("transfer").main(args) == 0
    assert "3 classes, in sorted order: neg -> 0, neu -> 1, pos -> 2" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["classes"] == ["neg", "neu", "pos"]
    readout = load_checkpoint(out / "classifier.pt").classifier
    assert readout.classes == ("neg", "neu", "pos") and tuple(readout.weight.shape) == (3, 8)
    assert set(results["neurons"]["per_class"]) == {"neg", "neu", "pos"}
    for split, prefix in (("train", "tr"), ("val", "va"), ("test", "te")):
        probs = np.load(out / f"all_neurons_probs_{split}.npy")
        y = np.load(out / f"{prefix}Y.npy")
        assert probs.shape == (len(y), 3)
        guess = probs.argmax(axis=1)
        assert results["all_features"]["accuracy"][split] == pytest.approx(np.mean(guess == y))
        scores = results["all_features"]
        assert scores["macro_f1"][split] == pytest.approx(f1_score(y, guess, average="macro"))
        assert scores["mcc"][split] == pytest.approx(matthews_corrcoef(y, guess))
    assert results["all_features"]["accuracy"]["test"] > 0.5  # three word lists: well above chance (1/3)
    written = pd.read_csv(tmp_path / "pred.csv")
    assert written["label"].tolist() == pd.read_csv(paths["test"])["label"].tolist()
    assert set(written["predicted"]) <= {"neg", "neu", "pos"} and "prob neu" in written.columns
    # classifier.py reads the same names and scores the test split as transfer.py did
    classify = ["--load_model", str(out / "classifier.pt"), "--data", paths["test"]]
    assert load_script("classifier").main(classify) == 0
    accuracy = 100 * results["all_features"]["accuracy"]["test"]
    assert f"accuracy {accuracy:.2f}%" in capsys.readouterr().out


def test_two_named_classes_are_read_back_by_classifier_py(tmp_path, capsys):
    paths = word_soup_classes(tmp_path, names=("neg", "pos"))
    lm = tiny_lm(tmp_path / "lm.pt", nhid=8)
    out = tmp_path / "lm_transfer"
    args = ["--load_model", lm, "--data", paths["train"], "--valid", paths["val"], "--test", paths["test"],
            "--log2_C", "-2", "2"]  # fmt: skip
    assert load_script("transfer").main(args) == 0
    capsys.readouterr()
    results = json.loads((out / "results.json").read_text())
    # classifier.py compares neg/pos by name (P is P(pos)) and scores the test split as transfer.py did
    classify = ["--load_model", str(out / "classifier.pt"), "--data", paths["test"]]
    assert load_script("classifier").main(classify) == 0
    accuracy = 100 * results["all_features"]["accuracy"]["test"]
    assert f"accuracy {accuracy:.2f}%" in capsys.readouterr().out


def test_sst_folded_with_text_length_into_four_classes(tmp_path):
    from conftest import fixture_path

    frame = pd.read_csv(fixture_path("binary_sst", "train.csv")).head(160)
    long = frame["sentence"].str.len() > frame["sentence"].str.len().median()
    frame["label"] = frame["label"] * 2 + long.astype(int)  # 0..3: sentiment x length
    parts = {"train": frame.iloc[:100], "val": frame.iloc[100:130], "test": frame.iloc[130:]}
    paths = {}
    for split, part in parts.items():
        paths[split] = str(tmp_path / f"{split}.csv")
        part.to_csv(paths[split], index=False)
    lm = tiny_lm(tmp_path / "lm.pt", nhid=8)
    args = ["--load_model", lm, "--data", paths["train"], "--valid", paths["val"], "--test", paths["test"],
            "--log2_C", "0", "1"]  # fmt: skip
    assert load_script("transfer").main(args) == 0
    out = tmp_path / "lm_transfer"
    results = json.loads((out / "results.json").read_text())
    assert results["classes"] == ["0", "1", "2", "3"]
    assert np.load(out / "teY.npy").tolist() == parts["test"]["label"].tolist()
    assert np.load(out / "neurons.npy").shape == (4, 8) and np.load(out / "neuron_bias.npy").shape == (4,)
    assert json.loads((out / "neurons_score.txt").read_text())[2] == pytest.approx(
        100 * results["neurons"]["accuracy"]["test"]
    )


def test_two_classes_named_otherwise_and_binarize_labels(tmp_path, capsys):
    from sentiment_discovery.checkpoint import load_checkpoint

    paths = word_soup_classes(tmp_path, names=("10", "2"), sizes=(("train", 40), ("val", 20)))
    lm = tiny_lm(tmp_path / "lm.pt", nhid=8)
    args = ["--load_model", lm, "--data", paths["train"], "--valid", paths["val"], "--test", "none",
            "--log2_C", "0", "0"]  # fmt: skip
    assert load_script("transfer").main(args) == 0
    assert "2 classes, in sorted order: 2 -> 0, 10 -> 1 (P(positive) is P(10))" in capsys.readouterr().out
    ckpt = load_checkpoint(tmp_path / "lm_transfer" / "classifier.pt")
    assert ckpt.classifier.classes is None and ckpt.extra["class_names"] == ["2", "10"]
    labels = pd.read_csv(paths["train"])["label"]
    assert np.load(tmp_path / "lm_transfer" / "trY.npy").tolist() == (labels == 10).astype(int).tolist()

    # --binarize_labels (the later suite's): ratings rescaled to [0, 1] over the file, > 0.5 positive
    ratings = {}
    for split, n in (("train", 40), ("val", 20)):
        frame = pd.read_csv(paths[split])
        frame["label"] = np.arange(n) % 5 + 1  # 1..5: 4 and 5 are positive
        ratings[split] = str(tmp_path / f"r_{split}.csv")
        frame.to_csv(ratings[split], index=False)
    args = ["--load_model", lm, "--data", ratings["train"], "--valid", ratings["val"], "--test", "none",
            "--log2_C", "0", "0", "--binarize_labels", "--save_results", str(tmp_path / "bin")]  # fmt: skip
    assert load_script("transfer").main(args) == 0
    results = json.loads((tmp_path / "bin" / "results.json").read_text())
    assert results["classes"] == ["0", "1"]
    expected = (np.arange(40) % 5 + 1 >= 4).astype(int)
    assert np.load(tmp_path / "bin" / "trY.npy").tolist() == expected.tolist()
    # without it, five ratings are five classes; a rating the training split lacks is refused in one line
    frame = pd.read_csv(ratings["val"])
    frame.loc[3, "label"] = 7
    frame.to_csv(ratings["val"], index=False)
    fails(capsys, load_script("transfer").main, args[:-3], "r_val.csv", "record 4", "label '7'")
