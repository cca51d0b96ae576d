"""finetune_classifier.py: features, training, checkpoints that the other scripts read, resumption, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT, fixture_path, load_script

from sentiment_discovery import matmul
from sentiment_discovery.checkpoint import load_checkpoint, save_checkpoint
from sentiment_discovery.encoder import Encoder
from sentiment_discovery.featurize import featurize
from sentiment_discovery.finetune import (
    FinetuneOptions,
    Finetuner,
    Head,
    LabelledSplit,
    cut_middle,
    length_batches,
    make_optimizers,
    pad_batch,
    pooled_features,
    split_outputs,
)
from sentiment_discovery.model import ModelConfig, RNNModel
from sentiment_discovery.preprocess import encode


@pytest.fixture(autouse=True)
def _pinned_library(monkeypatch):
    # every new product shape would otherwise be timed both ways: most of a tiny model's run time
    monkeypatch.setenv(matmul.BACKEND_ENV, "mm")


def tiny_lm(path, nhid: int = 16, nlayers: int = 1, seed: int = 0) -> str:
    torch.manual_seed(seed)
    save_checkpoint(path, RNNModel(ModelConfig(emsize=8, nhid=nhid, nlayers=nlayers)))
    return str(path)


WORDS = "the a film plot actor scene story music it was very quite and of".split()
MARKERS = {0: "awful", 1: "great", 2: "okay"}


def marker_texts(n: int, n_classes: int = 2, seed: int = 0) -> tuple[list[str], list[int]]:
    """Filler words around one class marker word: a task a tiny model can learn in a few steps."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        label = i % n_classes
        words = list(rng.choice(WORDS, size=int(rng.integers(2, 9))))
        words.insert(int(rng.integers(0, len(words) + 1)), MARKERS[label])
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def write_csv(path, texts, labels) -> str:
    pd.DataFrame({"label": labels, "sentence": texts}).to_csv(path, index=False)
    return str(path)


def marker_data(tmp_path, n_classes: int = 2) -> dict[str, str]:
    return {
        split: write_csv(tmp_path / f"{split}.csv", *marker_texts(n, n_classes, seed))
        for split, n, seed in (("train", 64, 0), ("val", 24, 1), ("test", 24, 2))
    }


def finetune_argv(lm: str, data: dict[str, str], save, *extra: str) -> list[str]:
    return [
        "--load", lm, "--data", data["train"], "--valid", data["val"], "--test", data["test"],
        "--save", str(save), "--batch_size", "8", "--eval_batch_size", "32", "--lr", "3e-3",
        "--head_lr", "3e-2", "--dropout", "0", "--warmup", "0", *extra,
    ]  # fmt: skip


def run_cli(argv: list[str]) -> dict:
    """finetune_classifier.py in this process; returns its results (run_finetune's)."""
    from sentiment_discovery.finetune import run_finetune

    parser = load_script("finetune_classifier").build_parser()
    return run_finetune(parser.parse_args(argv))


# --------------------------------------------------------------------------------------------


def test_pooled_features_match_featurize():
    torch.manual_seed(1)
    model = RNNModel(ModelConfig(emsize=8, nhid=12, nlayers=2))
    texts = pd.read_csv(fixture_path("binary_sst", "val.csv"))["sentence"].tolist()[:21] + ["", "ok"]
    split = LabelledSplit("val", "-", [encode(t) for t in texts], np.zeros(len(texts), dtype=np.int64))
    for pooling, state, all_layers in (("mean,max,last", "cell", True), ("last,mean", "hidden", False)):
        opt = FinetuneOptions(pooling=pooling, state=state, all_layers=all_layers, eval_batch_size=8)
        expected = featurize(model, texts, batch_size=5, pooling=pooling, state=state, all_layers=all_layers)
        np.testing.assert_allclose(split_outputs(model, split, opt, torch.device("cpu")), expected, atol=2e-5)
        # the differentiable path (training: autograd through the fused layer) gives the same features
        idx = np.array([3, 0, 21, 7])
        tokens, lengths = pad_batch([split.tokens[i] for i in idx], torch.device("cpu"))
        assert tokens.shape[0] % 32 == 0 and tokens.shape[0] > int(lengths.max()) - 32
        features, _ = pooled_features(model.eval(), tokens, lengths, opt.spec)
        assert features.requires_grad
        np.testing.assert_allclose(features.detach().numpy(), expected[idx], atol=2e-5)
        features.sum().backward()  # gradients reach the lowest weights through pooled cells
        assert model.encoder.weight.grad.abs().sum() > 0
        model.zero_grad()


def test_length_batches_cover_every_text_once_in_length_buckets():
    lengths = np.random.default_rng(0).integers(3, 200, size=101)
    batches = length_batches(lengths, 8, seed=5)
    assert sorted(np.concatenate(batches).tolist()) == list(range(101))
    assert sum(len(b) < 8 for b in batches) == 1  # one partial batch: few distinct shapes
    steps = {int(-(-lengths[b].max() // 32)) for b in batches}
    assert len(steps) <= 7
    assert [b.tolist() for b in length_batches(lengths, 8, seed=5)] == [b.tolist() for b in batches]
    assert [b.tolist() for b in length_batches(lengths, 8, seed=6)] != [b.tolist() for b in batches]
    assert cut_middle(np.arange(10), 4).tolist() == [0, 1, 8, 9]
    assert cut_middle(np.arange(10), 0).tolist() == list(range(10))


def test_discriminative_rates_and_groups():
    model = RNNModel(ModelConfig(emsize=8, nhid=8, nlayers=2))
    head = Head(8, 2, 0.0)
    groups = model.layer_groups()
    names = [[n for n, _ in g] for g in groups]
    assert any(n.startswith("decoder.") for n in names[0]) and all("layers.0" not in n for n in names[0])
    assert all(n.startswith("rnn.layers.0.") for n in names[1])
    assert names[2] == ["encoder.weight"]
    assert sum(len(g) for g in names) == len(list(model.parameters()))
    opt = FinetuneOptions(lr=1e-3, head_lr=5e-3, lr_decay_per_layer=0.5, weight_decay=0.1)
    groups = [g for o in make_optimizers(model, head, opt) for g in o.param_groups]
    rates = {g["name"]: g["lr"] for g in groups}
    assert rates == {"head": 5e-3, "lm0": 1e-3, "lm1": 5e-4, "lm2": 2.5e-4}
    decayed = {
        id(p) for g in groups if g["weight_decay"] for p in g["params"]
    }
    assert id(head.linear.weight) in decayed and id(head.linear.bias) not in decayed
    assert id(model.encoder.weight) not in decayed


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One fine-tuning run on the marker task: (tmp dir, data, checkpoint path, results)."""
    tmp = tmp_path_factory.mktemp("finetune")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(matmul.BACKEND_ENV, "mm")
        lm = tiny_lm(tmp / "lm.pt")
        data = marker_data(tmp)
        save = tmp / "ft.pt"
        results = run_cli(finetune_argv(lm, data, save, "--epochs", "3", "--aux_lm_weight", "0.3"))
    return tmp, data, save, results


def test_loss_falls_and_accuracy_rises(trained):
    tmp, _, save, results = trained
    history = results["history"]
    assert len(history) == 3
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    assert results["final"]["val"]["accuracy"] >= 0.85
    assert results["final"]["test"]["accuracy"] >= 0.8
    stored = json.loads((tmp / "ft.results.json").read_text())
    assert stored["final"] == results["final"] and len(stored["history"]) == 3
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "chars_per_s"} <= set(
        history[0]
    )
    assert (tmp / "ft.curves.png").stat().st_size > 0
    assert load_checkpoint(save).train_state is None  # the final file is the model, not a run


def test_checkpoint_reads_like_a_transferred_one(trained):
    tmp, data, save, results = trained
    ckpt = load_checkpoint(save)
    assert set(ckpt.classifier) >= {
        "weight",
        "bias",
        "mean",
        "scale",
        "pooling",
        "state",
        "all_layers",
        "neurons",
    }
    assert ckpt.classifier["weight"].shape == (3 * 16,)
    val_texts = pd.read_csv(data["val"])["sentence"].tolist()
    probs = Encoder.load(save).predict_proba(val_texts)
    np.testing.assert_allclose(probs, results["probs"]["val"], atol=1e-5)
    out = subprocess.run(
        [sys.executable, str(ROOT / "classifier.py"), "--load_model", str(save), "--data", data["val"],
         "--save_probs", str(tmp / "clf.npy")],
        capture_output=True, text=True, cwd=tmp, env=_env(),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert f"accuracy {100 * results['final']['val']['accuracy']:.2f}%" in out.stdout
    np.testing.assert_allclose(np.load(tmp / "clf.npy"), results["probs"]["val"], atol=1e-5)
    generate = load_script("generate").main(
        ["--load_model", str(save), "--gen_length", "-1", "--heatmap", "--text", "a great film",
         "--save", str(tmp / "gen.txt")]
    )  # fmt: skip
    assert generate == 0
    assert (tmp / "gen.png").stat().st_size > 0  # the heatmap of the head's strongest unit


def _env() -> dict:
    import os

    return {**os.environ, "PYTHONPATH": str(ROOT), matmul.BACKEND_ENV: "mm"}


class Crash(Exception):
    pass


def test_resume_after_a_kill_gives_identical_weights(tmp_path, monkeypatch):
    lm = tiny_lm(tmp_path / "lm.pt", nlayers=2)
    data = marker_data(tmp_path)
    # dropout and unfreezing on: the RNG state and the step both matter to the resumed run
    flags = (
        "--epochs",
        "2",
        "--dropout",
        "0.3",
        "--unfreeze",
        "3",
        "--save_interval",
        "5",
        "--train_iters",
        "14",
    )
    straight = run_cli(finetune_argv(lm, data, tmp_path / "straight.pt", *flags))
    real_save = Finetuner.save

    def save_then_die(self):
        real_save(self)
        if self.state.step == 5:  # mid-epoch (8 batches per epoch): as kill -9 right after this save
            raise Crash

    monkeypatch.setattr(Finetuner, "save", save_then_die)
    with pytest.raises(Crash):
        run_cli(finetune_argv(lm, data, tmp_path / "resumed.pt", *flags))
    monkeypatch.setattr(Finetuner, "save", real_save)
    assert load_checkpoint(tmp_path / "resumed.pt").train_state["step"] == 5
    resumed = run_cli(finetune_argv(str(tmp_path / "resumed.pt"), data, tmp_path / "resumed.pt", *flags))
    a, b = load_checkpoint(tmp_path / "straight.pt"), load_checkpoint(tmp_path / "resumed.pt")
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key]), key
    assert torch.equal(a.classifier["weight"], b.classifier["weight"])
    assert resumed["final"] == straight["final"]
    drop = lambda h: [{k: v for k, v in r.items() if k not in ("chars_per_s", "train_seconds")} for r in h]
    assert drop(resumed["history"]) == drop(straight["history"])


# A run of finetune_classifier.py that blocks in its sixth update, after its save at update 4, with a
# marker file saying so: the test kills it there with SIGKILL (no handler runs, update 5 is lost).
_BLOCKING_RUN = """
import sys, time
from pathlib import Path
from sentiment_discovery.finetune import Finetuner
step = Finetuner.train_step
def blocking_step(self, idx):
    if self.state.step == 5:
        Path(sys.argv[1]).write_text("blocked")
        time.sleep(600)
    return step(self, idx)
Finetuner.train_step = blocking_step
sys.argv[0] = "finetune_classifier.py"
sys.path.insert(0, ".")
import finetune_classifier
sys.exit(finetune_classifier.main(sys.argv[2:]))
"""


def test_kill_9_mid_run_and_load_continue_exactly(tmp_path):
    """SIGKILL a real finetune_classifier.py process mid-epoch; the same command with --load of its
    checkpoint ends with the same weights, head, curves and final accuracies, bit for bit, as a run
    never interrupted (timings aside); while the killed run was alive, its --save was locked."""
    lm = tiny_lm(tmp_path / "lm.pt", nlayers=2)
    data = marker_data(tmp_path)
    # dropout and unfreezing on: the RNG state and the step both matter to the resumed run
    flags = ("--epochs", "2", "--dropout", "0.3", "--unfreeze", "3", "--save_interval", "2", "--cpu")
    env = {**_env(), "OMP_NUM_THREADS": "1"}
    script = [sys.executable, str(ROOT / "finetune_classifier.py")]

    def run(*argv):
        return subprocess.run([*script, *argv], capture_output=True, text=True, cwd=ROOT, env=env)

    straight = run(*finetune_argv(lm, data, tmp_path / "straight.pt", *flags))
    assert straight.returncode == 0, straight.stderr
    killed = tmp_path / "killed.pt"
    marker = tmp_path / "blocked"
    argv = finetune_argv(lm, data, killed, *flags)
    proc = subprocess.Popen(
        [sys.executable, "-c", _BLOCKING_RUN, str(marker), *argv],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.05)
        second = run(*argv)  # the lock on --save holds while the run lives
        assert second.returncode == 2 and "another run" in second.stderr, second.stderr
        proc.kill()  # SIGKILL
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    state = load_checkpoint(killed).train_state
    assert (state["step"], state["finetune"]["run"]["batch"]) == (4, 4)  # 8 batches per epoch: mid-epoch
    resumed = run(*finetune_argv(str(killed), data, killed, *flags))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step 4/16" in resumed.stdout
    a, b = load_checkpoint(tmp_path / "straight.pt"), load_checkpoint(killed)
    assert a.train_state is None and b.train_state is None  # both ended: the final models
    for key, value in a.model.state_dict().items():
        assert torch.equal(value, b.model.state_dict()[key]), key
    for key in ("weight", "bias", "mean", "scale", "neurons"):
        assert torch.equal(a.classifier[key], b.classifier[key]), key
    results = [json.loads((tmp_path / f"{name}.results.json").read_text()) for name in ("straight", "killed")]
    assert results[0]["final"] == results[1]["final"]
    drop = lambda h: [{k: v for k, v in r.items() if k not in ("chars_per_s", "train_seconds")} for r in h]
    assert drop(results[0]["history"]) == drop(results[1]["history"])
    assert results[0]["best_step"] == results[1]["best_step"]


def test_gradual_unfreezing_leaves_frozen_parameters_unchanged(tmp_path):
    lm = tiny_lm(tmp_path / "lm.pt", nlayers=2)
    data = marker_data(tmp_path)
    before = load_checkpoint(lm).model.state_dict()
    # 4 steps, 2 per stage: the head alone, then the top layer group (top layer + decoder) too
    run_cli(finetune_argv(lm, data, tmp_path / "ft.pt", "--unfreeze", "2", "--train_iters", "4",
                          "--valid", "", "--test", "", "--aux_lm_weight", "0.5"))  # fmt: skip
    after = load_checkpoint(tmp_path / "ft.pt").model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("rnn.layers.1.") for k in changed)
    assert any(k.startswith("decoder.") for k in changed)
    assert not any(k.startswith(("rnn.layers.0.", "encoder.")) for k in changed), changed


def test_multiclass(tmp_path, capsys):
    lm = tiny_lm(tmp_path / "lm.pt")
    data = marker_data(tmp_path, n_classes=3)
    results = run_cli(finetune_argv(lm, data, tmp_path / "ft.pt", "--epochs", "6"))
    assert results["classes"] == [0, 1, 2]
    assert results["final"]["val"]["accuracy"] > 0.7
    assert results["probs"]["val"].shape == (24, 3)
    ckpt = load_checkpoint(tmp_path / "ft.pt")
    assert ckpt.classifier.weight.shape == (3, 48) and ckpt.classifier.classes == ("0", "1", "2")
    # classifier.py reads the K-class head: the most probable class of each text, accuracy on a labelled file
    argv = ["--load_model", str(tmp_path / "ft.pt"), "--save_probs", str(tmp_path / "p.npy")]
    capsys.readouterr()
    code = load_script("classifier").main([*argv, "--text", "it was great", "okay the plot", "awful film"])
    out = capsys.readouterr().out
    assert code == 0
    assert [line.split()[1] for line in out.splitlines() if line.endswith("'")] == ["1", "2", "0"], out
    assert np.load(tmp_path / "p.npy").shape == (3, 3)
    assert load_script("classifier").main([*argv, "--data", data["test"]]) == 0
    accuracy = results["final"]["test"]["accuracy"]
    assert f"accuracy {100 * accuracy:.2f}%" in capsys.readouterr().out


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", "no such file"),
        ("one_class", "every label is 1"),
        ("bad_label", "label 'good' is not a number"),
        ("unseen_class", "label 2 is not one of the training split's classes [0, 1]"),
        ("bad_pooling", "pooling must be one of"),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, case, expected):
    lm = tiny_lm(tmp_path / "lm.pt")
    data = marker_data(tmp_path)
    extra = []
    if case == "missing":
        data["train"] = str(tmp_path / "nope.csv")
    elif case == "one_class":
        data["train"] = write_csv(tmp_path / "one.csv", ["a", "b"], [1, 1])
    elif case == "bad_label":
        data["train"] = write_csv(tmp_path / "bad.csv", ["a", "b"], ["good", 0])
    elif case == "unseen_class":
        data["val"] = write_csv(tmp_path / "v.csv", ["a", "b"], [2, 0])
    else:
        extra = ["--pooling", "mean,median"]
    code = load_script("finetune_classifier").main(finetune_argv(lm, data, tmp_path / "ft.pt", *extra))
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and expected in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "ft.pt").exists()


def test_a_signal_saves_a_resumable_checkpoint(tmp_path, monkeypatch, capsys):
    lm = tiny_lm(tmp_path / "lm.pt")
    data = marker_data(tmp_path)
    real_step = Finetuner.train_step

    def step_then_signal(self, idx):
        result = real_step(self, idx)
        if self.state.step == 2:  # the step about to be counted is the third
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(Finetuner, "train_step", step_then_signal)
    code = load_script("finetune_classifier").main(
        finetune_argv(lm, data, tmp_path / "ft.pt", "--epochs", "2")
    )
    assert code == 128 + signal.SIGTERM
    assert "resume with the same command and --load" in capsys.readouterr().err
    state = load_checkpoint(tmp_path / "ft.pt").train_state
    assert state["step"] == 3 and state["finetune"]["run"]["batch"] == 3
    assert not (tmp_path / ".ft.pt.lock").exists()


def test_a_locked_save_is_refused(tmp_path, capsys):
    from sentiment_discovery.runfiles import SaveLock

    lm = tiny_lm(tmp_path / "lm.pt")
    lock = SaveLock(tmp_path / "ft.pt")
    lock.acquire()
    try:
        code = load_script("finetune_classifier").main(
            finetune_argv(lm, marker_data(tmp_path), tmp_path / "ft.pt")
        )
    finally:
        lock.release()
    err = capsys.readouterr().err
    assert code == 2 and "another run" in err and len(err.strip().splitlines()) == 1
