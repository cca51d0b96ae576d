"""The library choice per shape class (matmul.py): buckets, decisions kept on disk and read back
defensively, pinning, and the featurization shape policy (featurize.chunk_plan)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import ROOT

from sentiment_discovery import matmul
from sentiment_discovery.featurize import bucket_length, chunk_plan, featurize
from sentiment_discovery.model import ModelConfig, RNNModel

needs_onednn = pytest.mark.skipif(not matmul._onednn_runs(torch.zeros(1)), reason="no oneDNN in this torch")


def run_python(code: str, env: dict[str, str]) -> str:
    """``code`` in a fresh interpreter (this checkout first on the path); its stdout."""
    env = {**os.environ, **env, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


# --------------------------------------------------------------------------------------------
# Buckets
# --------------------------------------------------------------------------------------------


def test_size_buckets_are_powers_of_two_and_one_and_a_half_times_them():
    sizes = (1, 2, 3, 4, 5, 6, 7, 9, 13, 17, 25, 33, 100, 129, 4097)
    assert [matmul.size_bucket(n) for n in sizes] == [1, 2, 3, 4, 6, 6, 8, 12, 16, 24, 32, 48, 128, 192, 6144]
    buckets = [matmul.size_bucket(n) for n in range(1, 5000)]
    assert all(n <= b <= 1.5 * n for n, b in zip(range(1, 5000), buckets))
    assert all(matmul.size_bucket(b) == b for b in buckets)  # a bucket is its own class
    assert buckets == sorted(buckets)
    assert len(set(buckets)) == 25  # sizes 1 .. 4999 fall in 25 classes


@needs_onednn
def test_sizes_of_one_bucket_share_one_decision(monkeypatch):
    monkeypatch.delenv(matmul.BACKEND_ENV, raising=False)
    w = torch.randn(13, 11)
    before = len(matmul.choices())
    for rows in (33, 40, 48):  # one bucket
        a = torch.randn(rows, 11)
        torch.testing.assert_close(matmul.linear(a, w), a @ w.t())
    assert len(matmul.choices()) == before + 1
    matmul.linear(torch.randn(49, 11), w)  # the next bucket
    assert len(matmul.choices()) == before + 2
    assert len(matmul.decisions()) == 2


def test_bucket_length_rounds_up_to_a_multiple():
    assert [bucket_length(n) for n in (1, 31, 32, 33, 64, 65)] == [32, 32, 32, 64, 64, 96]
    assert [bucket_length(n, 16) for n in (1, 16, 17)] == [16, 16, 32]


@pytest.mark.parametrize("seed", range(5))
def test_chunk_plan_covers_every_step_with_rows_in_multiples_and_every_started_row_in(seed):
    rng = np.random.default_rng(seed)
    batch, chunk_length, multiple = int(rng.integers(1, 60)), int(rng.integers(1, 40)), 8
    lengths = np.sort(rng.integers(1, 200, batch))[::-1]
    total = int(lengths[0])
    starts = total - lengths
    plan = chunk_plan(starts, total, chunk_length, multiple)
    assert plan[0][0] == 0 and plan[-1][1] == total
    assert all(b == next_a for (_, b, _), (next_a, _, _) in zip(plan, plan[1:]))  # contiguous
    for a, b, rows in plan:
        assert 0 < b - a <= chunk_length
        assert rows == batch or rows % multiple == 0
        assert np.all(starts[rows:] >= b)  # every row whose text starts before b runs
        assert rows - multiple < np.searchsorted(starts, b)  # no group runs before its first row starts
    assert [rows for *_, rows in plan] == sorted(rows for *_, rows in plan)


def test_chunk_plan_of_equal_lengths_is_plain_chunks():
    assert chunk_plan(np.zeros(40, dtype=np.int64), 100, 32) == [(0, 32, 40), (32, 64, 40), (64, 96, 40),
                                                                 (96, 100, 40)]


def test_featurization_is_the_same_whatever_rows_join_together():
    model = RNNModel(ModelConfig(emsize=8, nhid=16))
    texts = ["a", "bb cc", "the film is long and dull", "good", "x" * 70, "so so", "great fun!"]
    one_by_one = np.concatenate([featurize(model, [t], batch_size=1, device="cpu") for t in texts])
    batched = featurize(model, texts, batch_size=7, chunk_length=5, device="cpu")
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Decisions on disk
# --------------------------------------------------------------------------------------------

CALIBRATE_ONE = """
    import json, torch
    from sentiment_discovery import matmul
    torch.set_num_threads(1)
    matmul.linear(torch.randn({rows}, 24), torch.randn(40, 24))
    print(json.dumps({{"timed": len(matmul.choices()), "decisions": matmul.decisions()}}))
"""


@needs_onednn
def test_decisions_are_kept_on_disk_and_reused_by_the_next_process(tmp_path):
    env = {matmul.DECISIONS_ENV: str(tmp_path), matmul.BACKEND_ENV: "auto"}
    first = json.loads(run_python(CALIBRATE_ONE.format(rows=100), env))
    assert first["timed"] == 1 and len(first["decisions"]) == 1
    [saved] = tmp_path.glob("decisions-*.json")
    assert json.loads(saved.read_text())["decisions"].keys() == first["decisions"].keys()
    second = json.loads(run_python(CALIBRATE_ONE.format(rows=120), env))  # another shape, same class
    assert second == {"timed": 0, "decisions": first["decisions"]}
    third = json.loads(run_python(CALIBRATE_ONE.format(rows=200), env))  # a new class: timed, added
    assert third["timed"] == 1 and len(third["decisions"]) == 2
    assert not list(tmp_path.glob("*.tmp"))


def _write_raw(content: bytes) -> None:
    path = matmul.decisions_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"\xff\xfe garbage", b"[1, 2, 3]", b'{"decisions": [1]}', b"[" * 100_000,
     b'{"decisions": {}, "pad": "' + b"x" * (matmul._MAX_DECISIONS_BYTES + 10) + b'"}'],
    ids=["broken", "not-utf8", "a-list", "wrong-type", "deep-nesting", "too-large"],
)
@needs_onednn
def test_a_damaged_decisions_file_is_ignored_with_a_note_and_rewritten(monkeypatch, capsys, content):
    monkeypatch.delenv(matmul.BACKEND_ENV, raising=False)
    matmul._said.clear()
    _write_raw(content)
    assert matmul.decisions() == {}
    assert "matmul decisions file" in capsys.readouterr().err
    a, w = torch.randn(21, 5), torch.randn(6, 5)
    torch.testing.assert_close(matmul.linear(a, w), a @ w.t())
    assert len(json.loads(matmul.decisions_path().read_text())["decisions"]) == 1


def test_bad_entries_are_dropped_and_good_ones_kept(monkeypatch):
    entries = {
        "good": {"chosen": "mm", "gflops": {"mm": 1.5, "onednn": 2}},
        "good, odd gflops": {"chosen": "onednn", "gflops": "fast"},
        "evil library": {"chosen": "os.system", "gflops": {}},
        "not an object": "mm",
        "x" * 1000: {"chosen": "mm"},
    }
    _write_raw(json.dumps({"decisions": entries}).encode())
    assert matmul.decisions() == {"good": "mm", "good, odd gflops": "onednn"}


@needs_onednn
def test_two_processes_writing_at_once_leave_a_whole_file(tmp_path):
    writer = """
        from sentiment_discovery import matmul
        path = matmul.decisions_path()
        for i in range(150):
            matmul._write_decisions(path, {{f"{name} {{i}}": {{"chosen": "mm", "gflops": {{}}}}}})
    """
    env = {**os.environ, matmul.DECISIONS_ENV: str(tmp_path), "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(writer.format(name=n))], env=env,
                              stderr=subprocess.PIPE, text=True) for n in ("first", "second")]
    path = tmp_path / matmul.decisions_path().name
    reads = 0
    while any(p.poll() is None for p in procs):
        if path.exists():
            json.loads(path.read_text())  # never half a file
            reads += 1
    assert all(p.wait() == 0 for p in procs), [p.stderr.read() for p in procs]
    entries = json.loads(path.read_text())["decisions"]
    assert "first 149" in entries or "second 149" in entries  # each process's last write leaves its own
    assert all(v == {"chosen": "mm", "gflops": {}} for v in entries.values())
    assert not list(tmp_path.glob("*.tmp"))


# --------------------------------------------------------------------------------------------
# Pinning, and the same numbers whichever library multiplies
# --------------------------------------------------------------------------------------------


@needs_onednn
@pytest.mark.parametrize("backend", ["mm", "onednn"])
def test_a_pin_overrides_the_decisions_on_disk_and_times_nothing(monkeypatch, backend):
    monkeypatch.delenv(matmul.BACKEND_ENV, raising=False)
    a, w = torch.randn(50, 9), torch.randn(10, 9)
    matmul.linear(a, w)  # decided (and saved) for this class
    [key] = matmul.decisions()
    other = "onednn" if backend == "mm" else "mm"
    _write_raw(json.dumps({"decisions": {key: {"chosen": other, "gflops": {}}}}).encode())
    monkeypatch.setenv(matmul.BACKEND_ENV, backend)
    before = len(matmul.choices())
    with torch.profiler.profile() as prof:
        out = matmul.linear(a, w)
    ops = {e.key for e in prof.key_averages()}
    assert ("mkldnn::_linear_pointwise" in ops) == (backend == "onednn")
    assert len(matmul.choices()) == before
    torch.testing.assert_close(out, a @ w.t())


@needs_onednn
def test_featurization_gives_the_same_features_through_either_library(monkeypatch):
    model = RNNModel(ModelConfig(emsize=16, nhid=64))
    texts = ["a short one", "a somewhat longer sentence about a film", "ok", "y" * 90] * 5
    features = {}
    for backend in ("mm", "onednn", "auto"):
        monkeypatch.setenv(matmul.BACKEND_ENV, backend)
        features[backend] = featurize(model, texts, batch_size=8, chunk_length=16, device="cpu")
    np.testing.assert_allclose(features["mm"], features["onednn"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(features["auto"], features["mm"], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Step weights laid out once per row count inside reuse_step_weights (featurize's chunks)


def _mlstm_weights(E: int = 6, H: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((4 * H, E), (4 * H, H), (H, E), (H, H), (4 * H,))
    return [torch.randn(*s, generator=g) * 0.3 for s in shapes]


def _run(weights, x):
    from sentiment_discovery.mlstm_kernels import mlstm_inference

    B, H = x.shape[1], weights[3].shape[0]
    h0 = c0 = torch.zeros(B, H)
    return mlstm_inference(x, h0, c0, *weights)[0]


def test_reused_step_weights_are_laid_out_once_per_batch_size_and_give_the_same_values(monkeypatch):
    from sentiment_discovery import mlstm_kernels

    made = []
    real = mlstm_kernels._lay_out_step_weights
    monkeypatch.setattr(mlstm_kernels, "_lay_out_step_weights", lambda *a: made.append(a[4]) or real(*a))
    w_ih, w_hh, w_mih, w_mhh, bias = _mlstm_weights()
    weights = [w_ih, w_hh, w_mih, w_mhh, bias]
    xs = [torch.randn(12, rows, 6) for rows in (4, 4, 8, 4, 8)]
    with torch.no_grad():
        expected = [_run(weights, x) for x in xs]
        assert made == [4, 4, 8, 4, 8]  # without the context: laid out on every call
        made.clear()
        with mlstm_kernels.reuse_step_weights():
            got = [_run(weights, x) for x in xs]
            assert made == [4, 8]  # once per batch size
            w_hh.mul_(0.5)  # changed in place: laid out again, and the new values used
            changed = _run(weights, xs[0])
            assert made == [4, 8, 4]
        again = _run(weights, xs[0])  # left the context: nothing kept
        assert made == [4, 8, 4, 4]
    for a, b in zip(expected, got):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(changed, again, rtol=0, atol=0)
    assert not torch.equal(changed, expected[0])


def test_reused_step_weights_stay_within_their_byte_budget(monkeypatch):
    from sentiment_discovery import mlstm_kernels

    made = []
    real = mlstm_kernels._lay_out_step_weights
    monkeypatch.setattr(mlstm_kernels, "_lay_out_step_weights", lambda *a: made.append(a[4]) or real(*a))
    weights = _mlstm_weights()
    one = sum(w.numel() * w.element_size() for i, w in enumerate(weights) if i != 2)  # w_mih is not laid out
    monkeypatch.setattr(mlstm_kernels, "REUSE_MAX_BYTES", one)  # room for one batch size's layouts
    with torch.no_grad(), mlstm_kernels.reuse_step_weights():
        for rows in (4, 8, 4, 8):
            _run(weights, torch.randn(12, rows, 6))
    assert made == [4, 8, 8]  # 4 kept; 8 past the budget, laid out each time


def test_calibrate_decides_the_classes_once_and_lists_them(monkeypatch, capsys):
    from sentiment_discovery import calibrate

    monkeypatch.setattr(matmul, "_candidates", lambda t: ("mm", "onednn"))  # both libraries timed
    made = calibrate.calibrate([8], emsize=4, batch=4, train_batch=2, train=False)
    assert made and {c.kind for c in made} <= {"linear", "step"}
    assert calibrate.calibrate([8], emsize=4, batch=4, train_batch=2, train=False) == []  # all known now
    calibrate.main([])
    listed = capsys.readouterr().out
    assert f"{len(matmul.decisions())} decisions in" in listed and made[0].chosen in listed
