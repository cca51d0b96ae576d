"""Runs that survive: a run's own best model and metrics, --save checked and locked, stale temp files,
SIGINT/SIGTERM (subprocesses), and resumed losses equal to an uninterrupted run's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, load_script
from test_train import Interrupt, batches, run_trainer

from sentiment_discovery.batching import LMSplits
from sentiment_discovery.checkpoint import load_checkpoint
from sentiment_discovery.runfiles import MetricsLog
from sentiment_discovery.train import StopRequest, Trainer, TrainOptions

main_script = load_script("main")

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def corpus_csv(tmp_path, n: int = 40):
    path = tmp_path / "corpus.csv"
    path.write_text(
        "sentence\n" + "".join(f"text number {i} is {'good' * (i % 3)} or bad\n" for i in range(n))
    )
    return path


def main_args(tmp_path, save, *extra: str) -> list[str]:
    return ["--data", str(corpus_csv(tmp_path)), "--nhid", "8", "--emsize", "4", "--batch_size", "2",
            "--seq_length", "8", "--num_shards", "8", "--split", "6,1,1", "--log_interval", "1",
            "--seed", "1", "--cpu", "--save", str(save), *extra]  # fmt: skip


# --------------------------------------------------------------------------------------------
# A run's own best model and metrics
# --------------------------------------------------------------------------------------------


def test_new_run_into_the_same_save_moves_the_old_best_and_metrics_aside(tmp_path):
    save = tmp_path / "lm.pt"
    assert main_script.main(main_args(tmp_path, save, "--train_iters", "6", "--save_iters", "3")) == 0
    first_best = (tmp_path / "lm.best.pt").read_bytes()
    first_metrics = (tmp_path / "lm.metrics.jsonl").read_text()
    assert len(first_metrics.splitlines()) > 6
    # a new run from the finished checkpoint, into the same --save, with a learning rate that wrecks it
    again = main_args(
        tmp_path, save, "--train_iters", "2", "--save_iters", "0", "--load", str(save), "--lr", "50"
    )
    assert main_script.main(again) == 0
    moved_best = [p for p in tmp_path.glob("lm.best.*.pt")]
    moved_metrics = [p for p in tmp_path.glob("lm.metrics.*.jsonl")]
    assert len(moved_best) == 1 and moved_best[0].read_bytes() == first_best
    assert len(moved_metrics) == 1 and moved_metrics[0].read_text() == first_metrics
    new_rows = MetricsLog.read(tmp_path / "lm.metrics.jsonl")
    assert [r["step"] for r in new_rows if r["train_bpc"] is not None] == [1, 2]
    # a third run moves the second run's files aside too, overwriting nothing
    assert main_script.main(again) == 0
    assert len(list(tmp_path.glob("lm.best.*.pt"))) == 2
    assert len(list(tmp_path.glob("lm.metrics.*.jsonl"))) == 2
    assert moved_best[0].read_bytes() == first_best


@pytest.mark.parametrize(
    "save, message",
    [
        ("out.safetensors", "holds weights only"),
        ("adir", "is a directory"),
        ("afile/lm.pt", "is not a directory"),
    ],
)
def test_save_is_checked_before_training(tmp_path, capsys, save, message):
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("x")
    args = main_args(tmp_path, tmp_path / save, "--train_iters", "2")
    assert main_script.main(args) == 2
    err = capsys.readouterr()
    assert message in err.err and len(err.err.strip().splitlines()) == 1
    assert "model:" not in err.out  # refused before building the model or reading data


def test_a_second_run_on_the_same_save_is_refused(tmp_path):
    save = tmp_path / "lm.pt"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from sentiment_discovery.train import SaveLock; "
         f"lock = SaveLock({str(save)!r}); lock.acquire(); print('locked', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=ENV,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        cmd = [sys.executable, str(ROOT / "main.py"), *main_args(tmp_path, save, "--train_iters", "2")]
        second = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=120)
        assert second.returncode == 2
        assert f"another run (pid {holder.pid}) is writing to it" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
        assert not save.exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    # the lock went with its process: now the run goes ahead, and removes the lock file at its end
    assert main_script.main(main_args(tmp_path, save, "--train_iters", "2")) == 0
    assert not (tmp_path / ".lm.pt.lock").exists()


def test_stale_temp_files_of_a_killed_save_are_removed(tmp_path, capsys):
    save = tmp_path / "lm.pt"
    stale = [tmp_path / ".lm.pt.abc123.tmp", tmp_path / ".lm.best.pt.xyz.tmp"]
    for path in stale:
        path.write_bytes(b"\0" * 100)
    unrelated = tmp_path / ".other.pt.abc.tmp"
    unrelated.write_bytes(b"keep")
    assert main_script.main(main_args(tmp_path, save, "--train_iters", "2")) == 0
    assert not any(p.exists() for p in stale)
    assert unrelated.exists()
    assert "left by an interrupted checkpoint write" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# Signals
# --------------------------------------------------------------------------------------------


def start_training(tmp_path, save, *extra: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        str(ROOT / "main.py"),
        *main_args(tmp_path, save, "--train_iters", "1000000", *extra),
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def wait_for(process: subprocess.Popen, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        if text in line:
            return
    process.kill()
    raise AssertionError(f"never printed {text!r}: {process.stderr.read()[-2000:]}")


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_a_resumable_checkpoint_and_exits(tmp_path, signum, code):
    save = tmp_path / "lm.pt"
    run = start_training(tmp_path, save, "--save_iters", "0")
    wait_for(run, "| step 3/")
    run.send_signal(signum)
    _, err = run.communicate(timeout=120)
    assert run.returncode == code, err[-2000:]
    assert "Traceback" not in err
    assert f"resume with the same command and --load {save}" in err
    state = load_checkpoint(save).train_state
    assert 3 <= state["step"] < state["total_steps"] == 1_000_000
    # the checkpoint resumes where it stopped
    resumed = start_training(tmp_path, save, "--save_iters", "0", "--load", str(save))
    wait_for(resumed, f"resuming at step {state['step']}/")
    wait_for(resumed, f"| step {state['step'] + 1}/")
    resumed.send_signal(signal.SIGINT)
    resumed.communicate(timeout=120)
    assert resumed.returncode == 130
    assert load_checkpoint(save).train_state["step"] > state["step"]


def test_a_second_signal_aborts_at_once():
    script = (
        "import os, signal, time\n"
        "from sentiment_discovery.train import StopRequest\n"
        "stop = StopRequest(); stop.install()\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "print('asked', stop.signum == signal.SIGINT, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(30)\n"
        "print('still running', flush=True)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert result.returncode == 130
    assert result.stdout.strip() == "asked True"
    assert "again: aborting now" in result.stderr  # and it never reached "still running"


def test_stop_request_restores_the_previous_handlers():
    before = signal.getsignal(signal.SIGINT)
    stop = StopRequest()
    stop.install()
    assert signal.getsignal(signal.SIGINT) is stop
    stop.uninstall()
    assert signal.getsignal(signal.SIGINT) is before


# --------------------------------------------------------------------------------------------
# Resume: the same parameters and the same reported losses as an uninterrupted run
# --------------------------------------------------------------------------------------------


def test_resume_mid_log_interval_reports_the_same_losses(tmp_path):
    _, straight = run_trainer(tmp_path, "straight.pt", log_interval=4)
    with pytest.raises(Interrupt):  # steps 9, 10 are half of the log interval 9..12
        run_trainer(tmp_path, "resumed.pt", crash_at=10, log_interval=4)
    checkpoint = load_checkpoint(tmp_path / "resumed.pt")
    state = (checkpoint.model, checkpoint.train_state)
    _, resumed = run_trainer(tmp_path, "resumed.pt", train_state=state, log_interval=4)
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    rows = {name: MetricsLog.read(tmp_path / f"{name}.metrics.jsonl") for name in ("straight", "resumed")}
    assert [r["step"] for r in rows["resumed"]] == [r["step"] for r in rows["straight"]]
    train = {name: [r["train_bpc"] for r in rs if r["train_bpc"] is not None] for name, rs in rows.items()}
    assert len(train["straight"]) == 5
    assert train["resumed"] == pytest.approx(train["straight"], rel=1e-6)


def test_a_resume_into_another_save_brings_its_history(tmp_path):
    with pytest.raises(Interrupt):
        run_trainer(tmp_path, "a.pt", crash_at=10, log_interval=4)
    checkpoint = load_checkpoint(tmp_path / "a.pt")
    (tmp_path / "b.metrics.jsonl").write_text('{"step": 99}\n')  # another run's
    model, state = checkpoint.model, checkpoint.train_state
    save, load = str(tmp_path / "b.pt"), str(tmp_path / "a.pt")
    options = TrainOptions(epochs=2, log_interval=4, save=save, save_iters=5, progress=False, load=load)
    splits = LMSplits(batches(12, -1, rows=3, shards=6), batches(50, 1), None)
    Trainer(model.train(), splits, options, torch.device("cpu"), state).run()
    steps = [r["step"] for r in MetricsLog.read(tmp_path / "b.metrics.jsonl")]
    assert steps[0] == 4 and 99 not in steps
    assert [p.read_text() for p in tmp_path.glob("b.metrics.*.jsonl")] == ['{"step": 99}\n']
