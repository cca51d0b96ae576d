"""Distributed training (multiproc.py, DDP over gloo on CPU) and the --lazy memory-mapped corpus."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, fixture_path, keep_checkpoint_at_step, load_script

from sentiment_discovery.batching import TBPTTBatches, shard_starts
from sentiment_discovery.checkpoint import load_checkpoint
from sentiment_discovery.lazycache import lazy_corpus
from sentiment_discovery.readers import load_corpus
from sentiment_discovery.runfiles import MetricsLog

main_script, multiproc = load_script("main"), load_script("multiproc")


@pytest.fixture(autouse=True)
def _lazy_cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # inherited by the subprocesses


@pytest.fixture
def sst_slice(tmp_path):
    """A copy of the Binary SST train fixture (200 sentences) that a test may change."""
    path = tmp_path / "slice.csv"
    path.write_text(fixture_path("binary_sst", "train.csv").read_text())
    return path


def batch_tensors(stream: TBPTTBatches) -> list[tuple[torch.Tensor, ...]]:
    return [(b.input, b.target, b.reset) for b in stream]


def test_ranks_hold_disjoint_blocks_of_the_rows_of_one_big_batch(sst_slice):
    corpus = load_corpus(sst_slice)
    bounds = shard_starts(corpus.num_samples, 5)
    whole = TBPTTBatches(corpus, bounds, batch_size=6, seq_length=32)
    ranks = [TBPTTBatches(corpus, bounds, 3, 32, world_size=2, rank=r) for r in (0, 1)]
    assert [r.rows for r in ranks] == [3, 3] and [r.row_range for r in ranks] == [(0, 3), (3, 6)]
    assert len(ranks[0]) == len(ranks[1]) == len(whole)  # every process takes the same number of steps
    for index, expected in enumerate(batch_tensors(whole)):
        parts = [r.batch(index) for r in ranks]
        for field, want in zip(("input", "target", "reset"), expected):
            assert torch.equal(torch.cat([getattr(p, field) for p in parts], dim=1), want), (index, field)
        local_targets = sum(p.num_targets for p in parts)
        assert ranks[0].targets_in_batch(index) == local_targets == whole.batch(index).num_targets


def test_two_process_run_equals_one_process_on_the_union_of_rows(sst_slice, tmp_path, capsys):
    """2 ranks x 2 rows (DDP, gloo, --lazy) == 1 process x 4 rows: same weights, carried state and BPC.

    Plain SGD with a large rate, so a wrong gradient scale or normalisation would show (Adam hides scale).
    """
    common = ["--data", str(sst_slice), "--nhid", "16", "--emsize", "8", "--seq_length", "16",
              "--train_iters", "6", "--log-interval", "3", "--save_iters", "0", "--num_shards", "20",
              "--split", "18,1,1", "--optim", "SGD", "--lr", "1.0", "--seed", "3", "--cpu"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "multiproc", "--nproc", "2", str(ROOT / "main.py"), *common,
           "--batch_size", "2", "--save", "ddp.pt", "--lazy"]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "parameters identical on all 2 processes" in result.stdout
    for name in ("ddp.pt", "ddp.best.pt", "ddp.metrics.jsonl", "ddp.bpc.png"):  # written by rank 0
        assert (tmp_path / name).stat().st_size > 0, name
    rank1_log = tmp_path / "distributed_logs" / "ddp" / "1.log"
    # rank 1 does not log training, but its log shows it ran: what it held, and that it finished
    # (between the launcher's header and footer lines, which start "multiproc:")
    rank1_lines = rank1_log.read_text().splitlines()
    assert rank1_lines[0].startswith("multiproc: rank 1 of 2: ") and rank1_lines[-1].startswith("multiproc: ")
    assert [line for line in rank1_lines if not line.startswith("multiproc: ")] == [
        "rank 1 of 2 on cpu: training rows 2-3 of each batch; rank 0 logs the run",
        "rank 1 of 2: finished, 6 updates",
    ]
    assert list((tmp_path / "cache" / "sentiment-discovery" / "lazy").glob("slice.csv-*/*/tokens.bin"))

    assert main_script.main([*common, "--batch_size", "4", "--save", str(tmp_path / "one.pt")]) == 0
    capsys.readouterr()
    ddp, one = load_checkpoint(tmp_path / "ddp.pt"), load_checkpoint(tmp_path / "one.pt")
    one_weights = one.model.state_dict()
    for key, value in ddp.model.state_dict().items():
        torch.testing.assert_close(value, one_weights[key], rtol=1e-5, atol=1e-6, msg=key)
    assert ddp.train_state["rows"] == one.train_state["rows"] == 4
    for gathered, single in zip(ddp.train_state["hidden"], one.train_state["hidden"]):
        torch.testing.assert_close(gathered, single, rtol=1e-5, atol=1e-6)  # every row's carried state
    ddp_rows = MetricsLog.read(tmp_path / "ddp.metrics.jsonl")
    one_rows = MetricsLog.read(tmp_path / "one.metrics.jsonl")
    assert [r["bytes_seen"] for r in ddp_rows] == [r["bytes_seen"] for r in one_rows]
    for key in ("train_bpc", "val_bpc", "test_bpc", "lr"):
        got, want = [r[key] for r in ddp_rows], [r[key] for r in one_rows]
        assert [g is None for g in got] == [w is None for w in want], key
        got, want = [g for g in got if g is not None], [w for w in want if w is not None]
        assert got == pytest.approx(want, rel=1e-5), key
    trained = [r["train_bpc"] for r in one_rows if r["train_bpc"] is not None]
    assert trained[-1] < trained[0]  # the steps were real updates


def test_torchrun_environment_resumes_a_one_process_run_on_two_processes(sst_slice, tmp_path, monkeypatch):
    """Workers given torchrun's environment (RANK, WORLD_SIZE, ...; no flags) set up DDP themselves,
    and the checkpoint's carried state is split between the ranks: the run ends as the straight one.
    (The workers are started here as torchrun would start them, without its elastic agent.)"""
    common = ["--data", str(sst_slice), "--nhid", "16", "--emsize", "8", "--seq_length", "16",
              "--train_iters", "6", "--log-interval", "3", "--save_iters", "3", "--num_shards", "20",
              "--split", "18,1,1", "--optim", "SGD", "--lr", "1.0", "--seed", "3", "--cpu",
              "--persist_state", "-1"]  # fmt: skip  (-1: the state carried into the resumed steps matters)
    keep_checkpoint_at_step(monkeypatch, 3, tmp_path / "one.pt", tmp_path / "resumed.pt")
    assert main_script.main([*common, "--batch_size", "4", "--save", str(tmp_path / "one.pt")]) == 0
    assert load_checkpoint(tmp_path / "resumed.pt").train_state["step"] == 3

    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(multiproc.free_port())}  # fmt: skip
    cmd = [sys.executable, str(ROOT / "main.py"), *common, "--batch_size", "2", "--save", "resumed.pt",
           "--load", "resumed.pt"]  # fmt: skip
    logs = [tmp_path / f"rank{r}.log" for r in (0, 1)]
    workers = []
    for r, log in enumerate(logs):
        with log.open("w") as out:
            rank_env = {**env, "RANK": str(r), "LOCAL_RANK": str(r)}
            worker = subprocess.Popen(cmd, cwd=tmp_path, env=rank_env, stdout=out, stderr=subprocess.STDOUT)
            workers.append(worker)
    codes = [w.wait(timeout=120) for w in workers]
    outputs = [log.read_text() for log in logs]
    assert codes == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "resuming at step 3/6" in outputs[0] and "2 processes" in outputs[0]
    resumed, straight = load_checkpoint(tmp_path / "resumed.pt"), load_checkpoint(tmp_path / "one.pt")
    assert resumed.train_state["step"] == straight.train_state["step"] == 6
    straight_weights = straight.model.state_dict()
    for key, value in resumed.model.state_dict().items():
        torch.testing.assert_close(value, straight_weights[key], rtol=1e-5, atol=1e-6, msg=key)


def test_multiproc_stops_the_others_when_a_worker_fails(tmp_path, monkeypatch):
    script = tmp_path / "worker.py"
    script.write_text(
        "import sys, time\n"
        "rank = int(sys.argv[sys.argv.index('--rank') + 1])\n"
        "if rank == 1:\n"
        "    print('rank 1 failing', flush=True)\n"
        "    sys.exit(3)\n"
        "time.sleep(30)\n"
        "open('rank0_finished', 'w').close()\n"
    )
    monkeypatch.chdir(tmp_path)
    assert multiproc.main(["--nproc", "2", str(script), "--save", "runs/job.pt"]) == 3
    assert "rank 1 failing" in (tmp_path / "distributed_logs" / "job" / "1.log").read_text()
    assert not (tmp_path / "rank0_finished").exists()  # rank 0 was stopped, not waited for


def test_multiproc_takes_torchruns_flag_name_and_reports_bad_counts(capsys):
    script = ["main.py", "--nproc", "9"]  # the script's own flags are left alone
    for flags in (["--nproc", "3"], ["--nproc_per_node", "3"], ["--nproc=3"], ["--nproc_per_node=3"]):
        assert multiproc.parse_nproc([*flags, *script]) == (3, script)
    assert multiproc.parse_nproc(script) == (None, script)
    assert multiproc.main(["--nproc_per_node", "zero", "main.py"]) == 2
    assert "--nproc_per_node zero: expected a number of processes" in capsys.readouterr().err
    assert multiproc.main(["--help"]) == 0
    assert "--nproc_per_node" in capsys.readouterr().out


def test_lazy_corpus_is_memory_mapped_and_gives_the_same_batches(sst_slice):
    in_memory = load_corpus(sst_slice)
    lazy = lazy_corpus(sst_slice)
    assert isinstance(lazy.tokens, np.memmap) and isinstance(lazy.starts, np.memmap)
    np.testing.assert_array_equal(lazy.tokens, in_memory.tokens)
    np.testing.assert_array_equal(lazy.starts, in_memory.starts)
    bounds = shard_starts(in_memory.num_samples, 7)
    for persist_state in (1, 0, -1):
        want = batch_tensors(TBPTTBatches(in_memory, bounds, 3, 50, persist_state))
        got = batch_tensors(TBPTTBatches(lazy, bounds, 3, 50, persist_state))
        assert len(got) == len(want)
        for g, w in zip(got, want):
            for a, b in zip(g, w):
                assert torch.equal(a, b)


def test_lazy_cache_is_reused_rebuilt_on_request_and_when_the_file_changes(sst_slice):
    def cache_id() -> tuple[int, str]:
        (meta,) = (sst_slice.parent / "cache").glob("sentiment-discovery/lazy/slice.csv-*/*/meta.json")
        return meta.stat().st_ino, meta.read_text()

    first = lazy_corpus(sst_slice)
    built = cache_id()
    lazy_corpus(sst_slice)
    assert cache_id() == built  # reused, not re-encoded
    lazy_corpus(sst_slice, rebuild=True)
    assert cache_id()[0] != built[0]  # --preprocess: rebuilt
    sst_slice.write_text(sst_slice.read_text() + "1,one more sentence .\n")
    changed = lazy_corpus(sst_slice)
    assert changed.num_samples == first.num_samples + 1
    assert json.loads(cache_id()[1])["source_size"] == sst_slice.stat().st_size
    np.testing.assert_array_equal(changed.tokens, load_corpus(sst_slice).tokens)


def test_preprocess_without_lazy_is_an_error(sst_slice, capsys):
    assert main_script.main(["--data", str(sst_slice), "--nhid", "8", "--preprocess"]) == 2
    assert "--preprocess rebuilds the --lazy cache" in capsys.readouterr().err
