"""The GPU path: fused mLSTM on CUDA, mixed precision and loss scaling, the scripts on CUDA, checkpoints
between devices, torchrun with nccl. Run with ``pytest -m gpu``; skipped without a GPU.

Tiny models and data made in tmp_path; the tiny models use the ``openai`` preprocessing, which needs no
unidecode. Tolerances are relative to the largest absolute value of the float32 reference (``rel_err``).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT, keep_checkpoint_at_step, load_script

from sentiment_discovery.batching import LMSplits, TBPTTBatches, shard_starts
from sentiment_discovery.checkpoint import load_checkpoint, save_checkpoint
from sentiment_discovery.featurize import featurize
from sentiment_discovery.model import ModelConfig, RNNModel
from sentiment_discovery.readers import encode_corpus
from sentiment_discovery.recurrent import mLSTMLayer
from sentiment_discovery.runfiles import MetricsLog
from sentiment_discovery.train import Trainer, TrainOptions

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible to torch)"),
]

CUDA = torch.device("cuda")
FLOAT32_TOL = 1e-5  # as the CPU tests of the fused layer
# autocast against the float32 reference: float16 keeps 11 significant bits, bfloat16 8
REDUCED_TOL = {torch.float16: 2e-2, torch.bfloat16: 8e-2}
WORDS = "good great fine fun bad dull awful boring film movie plot acting story the a is was and".split()


@pytest.fixture(autouse=True)
def _true_float32():
    """float32 products in float32, not TF32, for the 1e-5 comparisons."""
    precision, cudnn_tf32 = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.set_float32_matmul_precision(precision)
    torch.backends.cudnn.allow_tf32 = cudnn_tf32


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.float(), ref.float().to(a.device)
    return ((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) + " ." for _ in range(n)]


def labelled_csv(path, n: int, seed: int) -> str:
    texts = sentences(n, seed)
    labels = [int(sum(w in ("good", "great", "fine", "fun") for w in t.split()) > 1) for t in texts]
    pd.DataFrame({"label": labels, "sentence": texts}).to_csv(path, index=False)
    return str(path)


def tiny_lm(path=None, nhid: int = 16) -> RNNModel:
    torch.manual_seed(0)
    model = RNNModel(ModelConfig(emsize=8, nhid=nhid, preprocess="openai"))
    if path is not None:
        save_checkpoint(path, model)
    return model


def layer_inputs(T: int, B: int, E: int, H: int, device, with_reset: bool):
    torch.manual_seed(1)
    layer = mLSTMLayer(E, H).to(device)
    x = torch.randn(T, B, E, device=device, requires_grad=True)
    h0 = (0.5 * torch.randn(B, H, device=device)).requires_grad_()
    c0 = (0.5 * torch.randn(B, H, device=device)).requires_grad_()
    reset = None
    if with_reset:
        reset = torch.zeros(T, B, dtype=torch.bool, device=device)
        reset[0, 0] = reset[3, 1] = True
        reset[T // 2, :] = True
    return layer, x, h0, c0, reset


def run_layer(forward, layer, x, h0, c0, reset):
    """Outputs and the gradients of a loss that reaches every output, as a list of tensors."""
    out, (h, c), cells = forward(x, (h0, c0), reset, return_cells=True)
    weights = torch.linspace(-1.0, 1.0, out.numel(), device=out.device).view_as(out)
    loss = (out.float() * weights).sum() + (h.float() ** 2).sum() + c.float().sin().sum() + 0.3 * cells.sum()
    grads = torch.autograd.grad(loss, [x, h0, c0, *layer.parameters()])
    return [out, h, c, cells, *grads]


# ---------------------------------------------------------------------------------------------
# the fused layer on CUDA
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_reset", [False, True])
def test_fused_layer_on_cuda_matches_the_reference_in_float32(with_reset):
    layer, *inputs = layer_inputs(20, 4, 8, 32, CUDA, with_reset)
    fused = run_layer(layer.forward, layer, *inputs)
    reference = run_layer(layer.reference_forward, layer, *inputs)
    assert all(t.is_cuda for t in fused)
    for i, (a, b) in enumerate(zip(fused, reference)):
        assert rel_err(a, b) < FLOAT32_TOL, i
    # and the same as on the CPU
    x, h0, c0, reset = inputs
    on_cpu = [t.detach().cpu().requires_grad_() for t in (x, h0, c0)]
    layer = layer.to("cpu")
    on_cpu = run_layer(layer.forward, layer, *on_cpu, None if reset is None else reset.cpu())
    for i, (a, b) in enumerate(zip(fused, on_cpu)):
        assert rel_err(a, b) < FLOAT32_TOL, i


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_layer_on_cuda_in_reduced_precision(dtype):
    """Under autocast, as --fp16/--bf16 run (float16/bfloat16 operands, float32 parameters and state):
    the fused layer and the reference both near the float32 reference."""
    layer, x, h0, c0, reset = layer_inputs(20, 4, 8, 32, CUDA, with_reset=True)
    float32 = run_layer(layer.reference_forward, layer, x, h0, c0, reset)
    with torch.autocast("cuda", dtype=dtype):
        results = {name: run_layer(getattr(layer, name), layer, x, h0, c0, reset)
                   for name in ("forward", "reference_forward")}  # fmt: skip
    assert results["forward"][0].dtype == torch.float32
    for name, got in results.items():
        for i, (a, b) in enumerate(zip(got, float32)):
            assert torch.isfinite(a).all(), (name, i)
            assert rel_err(a, b) < REDUCED_TOL[dtype], (name, i, rel_err(a, b))
    assert rel_err(results["forward"][0], float32[0]) > 0  # the products did run in reduced precision


# ---------------------------------------------------------------------------------------------
# training on CUDA: --fp16 with loss scaling, --bf16, overflow
# ---------------------------------------------------------------------------------------------


def train_args(tmp_path, name: str, *extra: str, iters: int = 30) -> list[str]:
    data = tmp_path / "corpus.csv"
    if not data.exists():
        pd.DataFrame({"sentence": sentences(300)}).to_csv(data, index=False)
    return ["--data", str(data), "--nhid", "32", "--emsize", "16", "--batch_size", "8", "--seq_length", "32",
            "--train_iters", str(iters), "--lr", "5e-3", "--log-interval", "10", "--save_iters", "0",
            "--split", "1", "--num_shards", "16", "--preprocess_variant", "openai", "--seed", "1",
            "--save", str(tmp_path / f"{name}.pt"), *extra]  # fmt: skip


def train_bpc(tmp_path, name: str) -> list[float]:
    return [r["train_bpc"] for r in MetricsLog.read(tmp_path / f"{name}.metrics.jsonl") if r["train_bpc"]]


@pytest.mark.parametrize("precision", [["--fp16", "--dynamic_loss_scale"], ["--bf16"]])
def test_mixed_precision_training_on_cuda_lowers_the_loss(tmp_path, capsys, precision):
    """--bf16 is a main.py flag (issue 10): where it is missing, argparse exits and this test fails."""
    main = load_script("main")
    assert main.main(train_args(tmp_path, "amp", *precision)) == 0
    assert "on cuda" in capsys.readouterr().out
    bpc = train_bpc(tmp_path, "amp")
    assert len(bpc) == 3 and all(np.isfinite(bpc)) and bpc[-1] < bpc[0] - 0.5, bpc
    scaler = load_checkpoint(tmp_path / "amp.pt").train_state["scaler"]
    if "--dynamic_loss_scale" in precision:
        assert scaler is not None and scaler["scale"] > 0
    # float32 on the same data for comparison: reduced precision follows it
    assert main.main(train_args(tmp_path, "f32")) == 0
    assert bpc == pytest.approx(train_bpc(tmp_path, "f32"), rel=0.1)


def test_fp16_step_that_overflows_is_skipped_and_the_scale_lowered(tmp_path):
    texts = sentences(40)
    corpus = encode_corpus(texts, preprocess="openai")
    stream = TBPTTBatches(corpus, shard_starts(len(texts), 4), 4, 16)
    options = TrainOptions(fp16=True, dynamic_loss_scale=True, progress=False, save=str(tmp_path / "m.pt"))
    trainer = Trainer(tiny_lm(), LMSplits(stream, None, None), options, CUDA)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    # Scaled by 2^40 the logits' gradient exceeds float16's range (65504) as a float16 operand: inf.
    trainer.scaler = torch.amp.GradScaler("cuda", init_scale=2.0**40)
    loss = trainer.train_step(stream.batch(0))
    assert np.isfinite(loss)
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))  # update skipped
    assert trainer.scaler.get_scale() == 2.0**39
    assert not trainer.optimizer.state  # Adam never stepped
    trainer.scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
    trainer.train_step(stream.batch(1))
    assert not all(torch.equal(a, p) for a, p in zip(before, trainer.model.parameters()))
    assert trainer.scaler.get_scale() == 2.0**10


# ---------------------------------------------------------------------------------------------
# transfer.py, Encoder, generate.py on CUDA
# ---------------------------------------------------------------------------------------------


def test_transfer_on_cuda_gives_the_cpu_features(tmp_path, monkeypatch):
    lm = tmp_path / "lm.pt"
    model = tiny_lm(lm)
    paths = {split: labelled_csv(tmp_path / f"{split}.csv", n, seed)
             for split, n, seed in (("train", 120, 1), ("val", 60, 2), ("test", 60, 3))}  # fmt: skip
    import sentiment_discovery.feature_cache as transfer_module  # where transfer.py featurizes

    devices = []

    def spy(model, texts, **kwargs):
        features = featurize(model, texts, **kwargs)
        devices.append(next(model.parameters()).device.type)
        return features

    monkeypatch.setattr(transfer_module, "featurize", spy)
    transfer = load_script("transfer")
    for name, extra in (("f32", []), ("fp16", ["--fp16"])):
        args = ["--load_model", str(lm), "--data", paths["train"], "--valid", paths["val"], "--test",
                paths["test"], "--log2_C", "-2", "2", "--save_results", str(tmp_path / name),
                *extra]  # fmt: skip
        assert transfer.main(args) == 0
    assert devices == ["cuda"] * 6
    results = json.loads((tmp_path / "f32" / "results.json").read_text())
    assert set(results["all_features"]["accuracy"]) == {"train", "val", "test"}
    texts = pd.read_csv(paths["test"])["sentence"].tolist()
    on_cpu = featurize(model, texts, device="cpu")
    np.testing.assert_allclose(np.load(tmp_path / "f32" / "teXt.npy"), on_cpu, atol=1e-5)
    np.testing.assert_allclose(np.load(tmp_path / "fp16" / "teXt.npy"), on_cpu, atol=2e-2)


@pytest.mark.parametrize("precision", [{"fp16": True}, {"bf16": True}])
def test_encoder_on_cuda_in_reduced_precision_close_to_float32(precision):
    """``Encoder(..., bf16=True)`` is issue 10's interface: where it is missing this test fails."""
    from sentiment_discovery import Encoder

    model = tiny_lm(nhid=32)
    texts = sentences(50, seed=5)
    exact = Encoder(model, device="cpu").transform(texts)
    reduced = Encoder(model, device="cuda", **precision).transform(texts)
    assert reduced.dtype == np.float32 and reduced.shape == exact.shape
    assert np.abs(reduced - exact).max() < (2e-2 if "fp16" in precision else 8e-2)
    assert not np.array_equal(reduced, exact)


def test_generate_on_cuda(tmp_path):
    lm = tmp_path / "lm.pt"
    tiny_lm(lm, nhid=24)
    generate = load_script("generate")
    text = "the film was good and the plot was fun"
    values = {}
    for device in ("cuda", "cpu"):
        out = tmp_path / device / "analysed.txt"
        args = ["--load_model", str(lm), "--gen_length", "-1", "--text", text, "--neuron", "3", "--heatmap",
                "--save", str(out), *(["--cpu"] if device == "cpu" else [])]  # fmt: skip
        assert generate.main(args) == 0
        record = json.loads(out.with_suffix(".json").read_text())
        values[device] = np.array([v["value"] for v in record["values"]])
    assert len(values["cuda"]) == len(text) + 3  # "\n " + text + " "
    np.testing.assert_allclose(values["cuda"], values["cpu"], atol=1e-5)
    sampled = tmp_path / "sampled.txt"
    args = ["--load_model", str(lm), "--gen_length", "80", "--text", "the film", "--seed", "2", "--fp16",
            "--save", str(sampled)]  # fmt: skip
    assert generate.main(args) == 0
    assert len(sampled.read_bytes()) > len("\n the film")


# ---------------------------------------------------------------------------------------------
# checkpoints between GPU and CPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_checkpoint_saved_on_cuda_loads_on_cpu_and_back(tmp_path, suffix):
    model = tiny_lm().to(CUDA).eval()
    tokens = torch.randint(0, 256, (30, 3))
    with torch.no_grad():
        on_cuda = model(tokens.to(CUDA))[0]
    save_checkpoint(tmp_path / f"m{suffix}", model)
    loaded = load_checkpoint(tmp_path / f"m{suffix}").model.eval()
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    with torch.no_grad():
        assert rel_err(loaded(tokens)[0], on_cuda.cpu()) < FLOAT32_TOL
        back = loaded.to(CUDA)
        assert rel_err(back(tokens.to(CUDA))[0], on_cuda) < 1e-6
    save_checkpoint(tmp_path / f"again{suffix}", back)
    again = load_checkpoint(tmp_path / f"again{suffix}").model.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(again[key], value.cpu()), key


def test_training_checkpoint_from_cuda_resumes_on_cpu(tmp_path, monkeypatch, capsys):
    main = load_script("main")
    keep_checkpoint_at_step(monkeypatch, 3, tmp_path / "gpu.pt", tmp_path / "resumed.pt")
    args = train_args(tmp_path, "gpu", "--fp16", "--dynamic_loss_scale", "--save_iters", "3", iters=6)
    assert main.main(args) == 0
    state = load_checkpoint(tmp_path / "resumed.pt").train_state
    assert state["step"] == 3 and "cuda" in state["rng"] and state["scaler"] is not None
    capsys.readouterr()
    resume = [*train_args(tmp_path, "resumed", "--fp16", "--dynamic_loss_scale", iters=6), "--load",
              str(tmp_path / "resumed.pt"), "--cpu"]  # fmt: skip
    assert main.main(resume) == 0
    out = capsys.readouterr().out
    assert "resuming at step 3/6" in out and "on cpu" in out
    assert load_checkpoint(tmp_path / "resumed.pt").train_state["step"] == 6


# ---------------------------------------------------------------------------------------------
# torchrun and nccl
# ---------------------------------------------------------------------------------------------

NCCL_SCRIPT = """
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from sentiment_discovery import distributed
from sentiment_discovery.model import ModelConfig, RNNModel

torch.cuda.set_device(0)
dist.init_process_group("nccl", device_id=torch.device("cuda", 0))
assert dist.get_backend() == "nccl" and distributed.get_world_size() == 1
assert distributed.all_sum(1.5, 2.0) == [1.5, 2.0]
assert distributed.all_gather({"a": 1}) == [{"a": 1}]
assert distributed.broadcast(7) == 7
torch.manual_seed(0)
model = RNNModel(ModelConfig(emsize=8, nhid=16, preprocess="openai")).cuda()
distributed.check_replicas_identical(model)
tokens = torch.randint(0, 256, (20, 3), device="cuda")
grads = []
for net in (DistributedDataParallel(model, device_ids=[0]), model):
    model.zero_grad(set_to_none=True)
    logits, _ = net(tokens[:-1])
    torch.nn.functional.cross_entropy(logits.reshape(-1, 256), tokens[1:].reshape(-1)).backward()
    grads.append([p.grad.clone() for p in model.parameters()])
for a, b in zip(*grads):
    torch.testing.assert_close(a, b)
dist.destroy_process_group()
print("nccl ok")
"""


def torchrun(tmp_path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=100)


def test_torchrun_one_process_trains_and_saves(tmp_path):
    args = train_args(tmp_path, "run", "--distributed_backend", "nccl", iters=10)
    result = torchrun(tmp_path, str(ROOT / "main.py"), *args)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "on cuda" in result.stdout
    assert load_checkpoint(tmp_path / "run.pt").train_state["step"] == 10


def test_torchrun_nccl_collectives_and_ddp_gradients(tmp_path):
    script = tmp_path / "nccl_check.py"
    script.write_text(NCCL_SCRIPT)
    result = torchrun(tmp_path, str(script))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "nccl ok" in result.stdout
