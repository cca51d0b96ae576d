"""Long jobs in a log: plain progress lines when stderr is not a terminal (progress.py), in every script
that runs one; main.py's cost estimate (estimate.py); the outputs git ignores."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

import pytest
from conftest import ROOT, fixture_path
from test_transfer import sst_slices, tiny_lm

from sentiment_discovery import progress
from sentiment_discovery.estimate import DAY, RunCost, cost_lines, smaller_nhid
from sentiment_discovery.model import ModelConfig

# a line as ProgressLines writes it: "<desc>: done/total unit (pct%) | rate unit/s | ..."
LINE = r"{desc}: \d[\d,.]*\w?/\d[\d,.]*\w? {unit} \(\d+%\) \| ([\d,.]+\w? {unit}/s|[\d.]+ s/{unit}) \| "


def script_env(tmp_path, interval: float = 0) -> dict:
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
        progress.INTERVAL_ENV: str(interval),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
    }


def run_logged(tmp_path, name: str, args: list[str], env: dict) -> tuple[str, str]:
    """Run a script with stdout and stderr going to files, as on a cluster; returns both."""
    out_path, err_path = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    with out_path.open("w") as out, err_path.open("w") as err:
        code = subprocess.run(
            [sys.executable, *args], stdout=out, stderr=err, cwd=tmp_path, env=env, timeout=300
        ).returncode
    stdout, stderr = out_path.read_text(), err_path.read_text()
    assert code == 0, stdout[-2000:] + stderr[-2000:]
    assert "\r" not in stderr  # no bar redrawn in the log
    return stdout, stderr


# ---------------------------------------------------------------------------------------------
# the helper
# ---------------------------------------------------------------------------------------------


def test_lines_in_a_log_and_none_when_disabled(monkeypatch, capsys):
    monkeypatch.setenv(progress.INTERVAL_ENV, "0.05")
    bar = progress.progress_bar(total=4, desc="featurizing", unit="text")  # pytest's stderr: no terminal
    assert isinstance(bar, progress.ProgressLines)
    with bar:
        bar.update(1)
        time.sleep(0.06)
        bar.update(2)  # an interval passed: one line
        bar.update(1)  # not yet another
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    assert re.match(LINE.format(desc="featurizing", unit="texts?") + r".* left \| .* elapsed$", lines[0])
    assert lines[0].startswith("featurizing: 3/4 text (75%)")
    assert lines[1].startswith("featurizing: 4/4 text (100%)") and "done in" in lines[1]

    quiet = progress.progress_bar(range(3), desc="x", enabled=False)
    assert list(quiet) == [0, 1, 2] and capsys.readouterr().err == ""


def test_a_short_job_writes_nothing_and_iteration_counts(monkeypatch, capsys):
    monkeypatch.setenv(progress.INTERVAL_ENV, "60")
    assert list(progress.progress_bar(range(5), desc="encoding")) == list(range(5))
    assert capsys.readouterr().err == ""


def test_a_long_unit_of_work_still_gets_a_line(monkeypatch, capsys):
    """At least a line every six intervals (a minute by default) while one unit runs on."""
    monkeypatch.setenv(progress.INTERVAL_ENV, "0.02")
    bar = progress.progress_bar(total=2, desc="train", unit="batch", initial=1)
    time.sleep(0.5)  # > 6 x 0.02 s without an update
    bar.set_postfix(bpc="1.234")
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) >= 2 and lines[0].startswith("train: 1/2 batch (50%)")
    assert lines[-1].endswith("bpc=1.234") and "done in" in lines[-1]


def test_a_bad_interval_is_one_clear_error(monkeypatch):
    monkeypatch.setenv(progress.INTERVAL_ENV, "soon")
    with pytest.raises(ValueError, match=r"PROGRESS_INTERVAL: 'soon' is not a number of seconds"):
        progress.progress_bar(total=1)


# ---------------------------------------------------------------------------------------------
# the scripts, with stderr to a file
# ---------------------------------------------------------------------------------------------


def test_training_evaluation_and_cache_build_write_progress_lines_and_the_cost(tmp_path):
    corpus = tmp_path / "corpus.csv"
    shutil.copy(fixture_path("binary_sst", "train.csv"), corpus)
    args = [str(ROOT / "main.py"), "--data", str(corpus), "--lazy", "--nhid", "8", "--emsize", "4",
            "--batch_size", "4", "--seq_length", "16", "--train_iters", "6", "--num_shards", "40",
            "--split", "38,1,1", "--eval_seq_length", "64", "--seed", "1", "--save", "lm.pt",
            "--cpu"]  # fmt: skip
    stdout, stderr = run_logged(tmp_path, "main", args, script_env(tmp_path))
    assert re.search(LINE.format(desc="caching corpus.csv", unit="B"), stderr), stderr[-2000:]
    train = [line for line in stderr.splitlines() if line.startswith("train: ")]
    assert train and re.match(LINE.format(desc="train", unit="batch"), train[0])
    assert train[-1].startswith("train: 6/6 batch (100%)") and "done in" in train[-1]
    for split in ("val", "test"):
        assert re.search(LINE.format(desc=f"{split} BPC", unit="batch"), stderr), split
    # the cost, measured on the first batches, before the run ends
    cost = [line for line in stdout.splitlines() if line.startswith("cost on this machine (cpu): ")]
    expected = r"per batch -> .* per epoch \([\d,]+ batches\), .* for the 6 batches this run trains"
    assert len(cost) == 1 and re.search(expected, cost[0])
    assert stdout.index(cost[0]) < stdout.index("end of training")


def test_featurization_in_transfer_and_classifier_writes_progress_lines(tmp_path):
    paths = sst_slices(tmp_path, (("train", 60), ("val", 30), ("test", 30)))
    lm = tiny_lm(tmp_path / "lm.pt")
    env = script_env(tmp_path)
    transfer = [str(ROOT / "transfer.py"), "--load_model", lm, "--data", paths["train"],
                "--valid", paths["val"], "--test", paths["test"], "--log2_C", "0", "0",
                "--batch_size", "16"]  # fmt: skip
    _, stderr = run_logged(tmp_path, "transfer", transfer, env)
    featurizing = [line for line in stderr.splitlines() if line.startswith("featurizing: ")]
    # counted in bytes (a long text shows progress too): one finished line per split
    finished = [line for line in featurizing if re.match(r"featurizing: (\S+)/\1 B \(100%\).*done in", line)]
    assert len(finished) == 3, featurizing
    clf = str(tmp_path / "lm_transfer" / "classifier.pt")
    classify = [str(ROOT / "classifier.py"), "--load_model", clf, "--data", paths["test"],
                "--batch_size", "8"]  # fmt: skip
    _, stderr = run_logged(tmp_path, "classifier", classify, env)
    assert re.search(LINE.format(desc="featurizing", unit="B"), stderr), stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# the cost estimate
# ---------------------------------------------------------------------------------------------


def test_the_cost_is_said_once_after_the_first_timed_steps():
    config = ModelConfig(nhid=16, emsize=8)
    cost = RunCost(config, steps_per_epoch=100, run_steps=300, device="cpu")
    said = [cost.add_step(seconds) for seconds in (5.0, 0.2, 0.2, 0.2, 0.2)]
    assert said[:3] == [[], [], []] and said[4] == []  # the first step is not timed; said once
    assert said[3] == [
        "cost on this machine (cpu): 0.2 s per batch -> 20 s per epoch (100 batches), 1.0 min for the "
        "300 batches this run trains (training alone; validations add to it)"
    ]
    slow = RunCost(config, 100, 300, "cpu")
    assert slow.add_step(20.0) == [] and slow.add_step(20.0)[0].startswith("cost on this machine (cpu): 20 s")
    very_slow = RunCost(config, 100, 300, "cpu")  # a first step of minutes is estimate enough
    first = very_slow.add_step(90.0)
    assert first[0].startswith("cost on this machine (cpu): 1.5 min per batch") and "first step" in first[-1]
    assert very_slow.add_step(90.0) == []  # said once
    short = RunCost(config, 100, 2, "cpu")
    assert short.add_step(1.0) == [] and short.add_step(1.0) == []  # over before it was measured


def test_a_cpu_run_past_a_day_gets_a_smaller_nhid_that_fits():
    config = ModelConfig()  # the original's 4096-unit mLSTM
    lines = cost_lines(100.0, 2000, 2000, config, "cpu")  # 100 s a batch: 2.3 days
    assert "2.3 days for the 2,000 batches this run trains" in lines[0]
    nhid, seconds = smaller_nhid(config, 100.0 * 2000)
    assert nhid == 2048 and seconds <= DAY and f"--nhid {nhid} would take about" in lines[1]
    assert smaller_nhid(config, 100 * DAY)[0] < 1024  # far over: a much smaller model
    assert len(cost_lines(100.0, 2000, 2000, config, "cuda")) == 1  # a GPU: no suggestion
    assert len(cost_lines(1.0, 2000, 2000, config, "cpu")) == 1  # within a day


# ---------------------------------------------------------------------------------------------
# default outputs stay out of git
# ---------------------------------------------------------------------------------------------


def test_what_the_scripts_write_by_default_is_ignored_by_git():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    outputs = ["lang_model.pt", "lang_model.best.pt", "lang_model.step2000.pt", "lang_model.metrics.jsonl",
               "lang_model.bpc.png", "lang_model.metrics.20240101-120000.jsonl", ".lang_model.pt.lock",
               ".lang_model.pt.x1y2.tmp", "lang_model_transfer/classifier.pt", "clf_results.npy",
               "lang_model_transfer/results.json", "generated.txt", "generated.png", "generated.json",
               "distributed_logs/lm/1.log", "data/imdb/unsup.json",
               "data/openai/mlstm_openai.safetensors"]  # fmt: skip
    shipped = ["sentiment_discovery/pretrained/mlstm1024_imdb_sst.bpc.png", "tests/fixtures/x.npy"]
    result = subprocess.run(
        ["git", "check-ignore", "--no-index", *outputs, *shipped], cwd=ROOT, capture_output=True, text=True
    )
    assert sorted(result.stdout.split()) == sorted(outputs)  # and none of the shipped files
