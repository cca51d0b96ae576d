"""Pre-training: carried/reset state, checkpoints, exact resume, main.py end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, fixture_path, load_script

from sentiment_discovery.batching import LMSplits, TBPTTBatches, shard_starts
from sentiment_discovery.checkpoint import load_checkpoint, save_checkpoint
from sentiment_discovery.model import ModelConfig, RNNModel
from sentiment_discovery.preprocess import encode
from sentiment_discovery.readers import encode_corpus
from sentiment_discovery.runfiles import MetricsLog
from sentiment_discovery.train import Trainer, TrainOptions, evaluate

main_script = load_script("main")



TEXTS = [f"review {i}: " + "good " * (i % 3) + "bad " * (i % 2) for i in range(16)]


def tiny_model(kind: str = "mLSTM", dropout: float = 0.0) -> RNNModel:
    torch.manual_seed(1)
    return RNNModel(ModelConfig(model=kind, emsize=8, nhid=16, dropout=dropout)).eval()


def batches(seq_length: int, persist_state: int, rows: int = 2, shards: int = 4) -> TBPTTBatches:
    corpus = encode_corpus(TEXTS)
    return TBPTTBatches(corpus, shard_starts(len(TEXTS), shards), rows, seq_length, persist_state)


def all_logits(model: RNNModel, stream: TBPTTBatches) -> torch.Tensor:
    """Logits of a whole pass [steps, rows, 256], state carried across batches."""
    hidden, out = None, []
    with torch.no_grad():
        for batch in stream:
            logits, hidden = model(batch.input, hidden, batch.reset)
            out.append(logits)
    return torch.cat(out)


@pytest.mark.parametrize("persist_state", [1, 0, -1])
def test_state_is_carried_across_batches(persist_state):
    model = tiny_model()
    long = all_logits(model, batches(10_000, persist_state))  # the whole pass as one sequence
    short = all_logits(model, batches(5, persist_state))  # the same pass cut into 5-step batches
    torch.testing.assert_close(short, long, rtol=1e-5, atol=1e-5)
    assert evaluate(model, batches(5, persist_state), torch.device("cpu")) == pytest.approx(
        evaluate(model, batches(10_000, persist_state), torch.device("cpu")), rel=1e-5
    )


@pytest.mark.parametrize("persist_state", [1, 0, -1])
def test_state_is_reset_per_row_exactly_where_persist_state_says(persist_state):
    model = tiny_model()
    stream = batches(7, persist_state)
    logits = all_logits(model, stream)
    resets = torch.cat([b.reset for b in stream])
    # row 0 is the first cut of the stream; where a sample begins its first logits are those of a
    # zero state exactly when the row was reset there
    row_end = stream.row_begin[0] + stream.steps
    sample_starts = [s for s in stream.corpus.starts[:-1].tolist() if s < row_end]
    shard_begins = stream.corpus.starts[shard_starts(len(TEXTS), 4)[:-1]].tolist()  # batches()' shards
    expected_resets = {1: [s for s in shard_begins if s < row_end], 0: sample_starts, -1: []}[persist_state]
    assert torch.nonzero(resets[:, 0]).flatten().tolist() == expected_resets
    assert len(sample_starts) > 3 and (persist_state != 1 or 1 < len(expected_resets) < len(sample_starts))
    first_byte = torch.tensor([[int(encode(TEXTS[0])[0])]])
    with torch.no_grad():
        fresh = model(first_byte)[0][0, 0]
    for step in sample_starts[1:]:
        was_reset = bool(resets[step, 0])
        assert was_reset == (step in expected_resets)
        assert torch.allclose(logits[step, 0], fresh, atol=1e-6) == was_reset
        if was_reset and not resets[step, 1]:  # the other row keeps its state at that step
            assert not torch.allclose(logits[step, 1], fresh, atol=1e-6)


def test_save_then_load_gives_identical_outputs(tmp_path):
    model = tiny_model("mLSTM")
    save_checkpoint(tmp_path / "m.pt", model)
    loaded = load_checkpoint(tmp_path / "m.pt").model.eval()
    stream = batches(9, 1)
    torch.testing.assert_close(all_logits(loaded, stream), all_logits(model, stream), rtol=0, atol=0)


class Interrupt(Exception):
    pass


def run_trainer(tmp_path, name, train_state=None, crash_at=None, log_interval=1) -> tuple[dict, RNNModel]:
    """Train ``tiny_model`` 2 epochs (or resume ``train_state``); ``crash_at``: raise Interrupt right
    after that step's checkpoint, as kill -9 would. Returns (Trainer.run's result, the model)."""
    model = tiny_model(dropout=0.2) if train_state is None else train_state[0]
    stream = batches(12, -1, rows=3, shards=6)  # persist -1: the carried state matters to resume
    splits = LMSplits(stream, batches(50, 1), None)
    options = TrainOptions(
        lr=3e-3, epochs=2, log_interval=log_interval, save=str(tmp_path / name), save_iters=5, progress=False
    )
    trainer = Trainer(model.train(), splits, options, torch.device("cpu"), train_state and train_state[1])
    if crash_at is not None:
        real_save = trainer.save

        def save_then_crash():
            real_save()
            if trainer.step == crash_at:
                raise Interrupt

        trainer.save = save_then_crash
    return trainer.run(), trainer.model


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    run_trainer(tmp_path, "straight.pt")
    with pytest.raises(Interrupt):
        run_trainer(tmp_path, "resumed.pt", crash_at=10)
    checkpoint = load_checkpoint(tmp_path / "resumed.pt")
    assert checkpoint.train_state["step"] == 10
    result, _ = run_trainer(tmp_path, "resumed.pt", train_state=(checkpoint.model, checkpoint.train_state))
    straight = MetricsLog.read(tmp_path / "straight.metrics.jsonl")
    resumed = MetricsLog.read(tmp_path / "resumed.metrics.jsonl")
    assert [r["step"] for r in resumed] == [r["step"] for r in straight]  # no step logged twice
    assert len(straight) > 10
    for a, b in zip(straight, resumed):
        for key in ("train_bpc", "val_bpc", "test_bpc", "lr", "bytes_seen"):
            assert (a[key] is None) == (b[key] is None), (a["step"], key)
            if a[key] is not None:
                assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["step"], key)
    assert result["step"] == straight[-1]["step"]
    assert (tmp_path / "resumed.bpc.png").stat().st_size > 0


def test_training_rate_leaves_out_validation_and_checkpoint_time(tmp_path, monkeypatch):
    real_validate = Trainer.validate

    def slow_validate(trainer):
        time.sleep(1.0)
        return real_validate(trainer)

    monkeypatch.setattr(Trainer, "validate", slow_validate)
    run_trainer(tmp_path, "rate.pt", log_interval=2)  # validation at step 5: inside the interval 5-6
    rate = {row["step"]: row["chars_per_s"] for row in MetricsLog.read(tmp_path / "rate.metrics.jsonl")
            if row["chars_per_s"] is not None}  # fmt: skip
    # with the second counted, 2 tiny steps would take ~1 s instead of milliseconds
    assert rate[6] > 0.1 * rate[4], rate


@pytest.mark.parametrize("scaling", [["--loss_scale", "128"], ["--dynamic_loss_scale"]])
def test_fp16_trains_in_reduced_precision(tmp_path, scaling):
    """--fp16 on CPU autocasts to bfloat16: close to, but not the same as, a float32 run; loss falls."""
    common = ["-data", str(fixture_path("binary_sst", "val.csv")), "--nhid", "16", "--batch_size", "4",
              "--seq_length", "16", "--train_iters", "12", "--lr", "1e-2", "--log-interval", "4",
              "--split", "1", "--seed", "3", "--cpu"]  # fmt: skip
    runs = {}
    for name, extra in (("f32", []), ("amp", ["--fp16", *scaling])):
        assert main_script.main([*common, "--save", str(tmp_path / f"{name}.pt"), *extra]) == 0
        runs[name] = [r["train_bpc"] for r in MetricsLog.read(tmp_path / f"{name}.metrics.jsonl")]
    assert runs["amp"] != runs["f32"]
    assert runs["amp"] == pytest.approx(runs["f32"], rel=0.05)
    assert runs["amp"][-1] < runs["amp"][0]
    scaler = load_checkpoint(tmp_path / "amp.pt").train_state["scaler"]
    assert (scaler is not None) == ("--dynamic_loss_scale" in scaling)


def test_main_reports_bad_input_as_an_error(tmp_path, capsys):
    assert main_script.main(["--data", str(tmp_path / "nope.csv"), "--nhid", "8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nope.csv: no such file" in err
    bad = tmp_path / "bad.json"
    bad.write_text('{"sentence": "a"}\n{oops\n')
    assert main_script.main(["-data", str(bad), "-loose_json", "--nhid", "8"]) == 2
    assert "bad.json: line 2: malformed json" in capsys.readouterr().err
    # flags that would otherwise do nothing are refused
    sst = str(fixture_path("binary_sst", "val.csv"))
    assert main_script.main(["--data", sst, "--nhid", "8", "--dynamic_loss_scale"]) == 2
    assert "add --fp16" in capsys.readouterr().err
    assert main_script.main(["--data", sst, "--nhid", "8", "--eval_only"]) == 2
    assert "--eval_only evaluates the model of --load" in capsys.readouterr().err


def test_main_trains_on_sst_with_falling_loss_then_eval_only(tmp_path, capsys):
    save = tmp_path / "lm.pt"
    cmd = [
        sys.executable, str(ROOT / "main.py"), "-data", str(fixture_path("binary_sst", "train.csv")),
        "--nhid", "32", "--batch_size", "8", "--seq_length", "32", "--train_iters", "50", "--lr", "5e-3",
        "--log-interval", "10", "--save_iters", "25", "--num_shards", "3000", "--eval_batch_size", "64",
        "--eval_seq_length", "128", "--seed", "-1", "--save", str(save), "--cpu",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "seed " in result.stdout
    rows = [json.loads(line) for line in (tmp_path / "lm.metrics.jsonl").read_text().splitlines()]
    train_bpc = [r["train_bpc"] for r in rows if r["train_bpc"] is not None]
    assert len(train_bpc) == 5 and train_bpc[-1] < train_bpc[0] - 1.0
    assert [r["val_bpc"] is not None for r in rows].count(True) == 2
    assert rows[-1]["test_bpc"] is not None
    for name in ("lm.pt", "lm.best.pt", "lm.bpc.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert load_checkpoint(save).train_state["step"] == 50

    # --eval_only on the saved model reports the same test BPC as the end of training
    assert main_script.main([*cmd[2:], "--load_model", str(save), "--eval_only"]) == 0
    assert f"test BPC {rows[-1]['test_bpc']:.4f}" in capsys.readouterr().out


def test_txt_corpus_trains_with_plain_log_lines_and_a_checkpoint_series(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"line {i}: " + "a good film " * (i % 4) for i in range(60)) + "\n")
    save = tmp_path / "lm.pt"
    cmd = [sys.executable, str(ROOT / "main.py"), "--data", str(corpus), "--nhid", "8", "--emsize", "4",
           "--batch_size", "4", "--seq_length", "16", "--train_iters", "7", "--log-interval", "2",
           "--save-iters", "2", "--keep-checkpoints", "2", "--num_shards", "8", "--split", "6,1,1",
           "--seed", "1", "--save", str(save), "--cpu"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    # output to a pipe: no progress bars (no carriage returns), one plain line per --log-interval
    assert "\r" not in result.stdout + result.stderr and "it/s" not in result.stderr
    assert [line.split("|")[2].strip() for line in result.stdout.splitlines() if "| epoch" in line] == [
        "step 2/7", "step 4/7", "step 6/7", "step 7/7"
    ]
    # checkpoints at steps 2, 4, 6 and the final 7: the last two stay, each a resumable snapshot
    assert sorted(p.name for p in tmp_path.glob("lm.step*.pt")) == ["lm.step6.pt", "lm.step7.pt"]
    assert load_checkpoint(tmp_path / "lm.step6.pt").train_state["step"] == 6
    assert load_checkpoint(save).train_state["step"] == 7


def test_prune_snapshots_keeps_the_last_k_up_to_the_current_step(tmp_path):
    from sentiment_discovery.runfiles import prune_snapshots, snapshot_path

    for step in (10, 2, 30, 20, 40):
        snapshot_path(tmp_path / "m.pt", step).write_bytes(b"x")
    (tmp_path / "m.stepx.pt").write_bytes(b"x")  # not a snapshot name: left alone
    deleted = prune_snapshots(tmp_path / "m.pt", 30, keep=2)
    assert sorted(p.name for p in deleted) == ["m.step10.pt", "m.step2.pt"]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["m.step20.pt", "m.step30.pt", "m.step40.pt", "m.stepx.pt"]
