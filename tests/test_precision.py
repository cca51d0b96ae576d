"""Matrix products: per-shape library choice, the bfloat16 path (--bf16), reduced-precision checkpoints."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import load_script
from torch.utils._python_dispatch import TorchDispatchMode

from sentiment_discovery import matmul
from sentiment_discovery.checkpoint import load_checkpoint, save_checkpoint
from sentiment_discovery.convert import main as convert_main
from sentiment_discovery.featurize import featurize
from sentiment_discovery.model import ModelConfig, RNNModel
from sentiment_discovery.recurrent import mLSTMLayer

# bfloat16 keeps 8 significant bits (relative rounding 2^-9 = 0.2%); over a dozen steps of products the
# outputs and gradients of a small layer stay within a few rounding steps of float32. Stated bound:
BF16_REL_TOL = 3e-2

SENTENCES = [
    "The film opens slowly, but the last hour is gripping and the ending stays with you.",
    "I loved the music and the two leads, even if the plot makes little sense.",
    "A dull, overlong story with flat dialogue and no reason to care about anyone in it.",
    "The actors do what they can, but the script gives them nothing to work with.",
    "It is a warm, funny and honest picture about a family that never quite fits together.",
    "Beautifully shot, carefully paced, and acted with real feeling by the whole cast.",
    "The jokes fall flat, the action is confusing, and the running time feels endless.",
    "One of the best films of the year: clever, moving and never once boring.",
    "The director clearly loves old westerns, and it shows in every wide and dusty frame.",
    "I wanted to like this movie, but by the end I was checking my watch every few minutes.",
    "A small, quiet story that becomes something rich and surprising in its final act.",
    "The sequel repeats the first film scene for scene, only louder and less charming.",
]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()


def _precision(t: torch.Tensor) -> torch.dtype:
    """bfloat16 for a bfloat16 tensor and for float32 holding only bfloat16 values (how a CPU without
    bfloat16 hardware runs --bf16: matmul.py), else the tensor's dtype."""
    if t.is_mkldnn:  # a weight laid out for oneDNN
        t = t.to_dense()
    if t.dtype == torch.float32 and torch.equal(t, t.to(torch.bfloat16).float()):
        return torch.bfloat16
    return t.dtype


class ProductDtypes(TorchDispatchMode):
    """Records the operand precision of every matrix product that reaches the dispatcher: bfloat16
    where both operands hold bfloat16 values, else their dtypes."""

    PRODUCTS = ("aten.mm", "aten.addmm", "aten.bmm", "aten.linear", "mkldnn._linear_pointwise")

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, tuple[torch.dtype, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name.startswith(self.PRODUCTS):
            # a, weight (and bias, which is added in float32): the first two are the operands
            operands = [a for a in args[:2] if isinstance(a, torch.Tensor)]
            if all(_precision(a) == torch.bfloat16 for a in operands):
                self.seen.append((name, (torch.bfloat16,)))
            else:
                self.seen.append((name, tuple(a.dtype for a in operands)))
        return func(*args, **(kwargs or {}))

    def operand_dtypes(self) -> set[torch.dtype]:
        return {d for _, dtypes in self.seen for d in dtypes}


# --------------------------------------------------------------------------------------------
# Choosing MKL or oneDNN per product shape
# --------------------------------------------------------------------------------------------


def test_a_product_shape_is_timed_once_and_then_always_runs_the_same_way(monkeypatch):
    monkeypatch.delenv(matmul.BACKEND_ENV, raising=False)
    a, w, bias = torch.randn(37, 11), torch.randn(13, 11), torch.randn(13)
    before = len(matmul.choices())
    first = matmul.linear(a, w, bias, name="test product")
    made = matmul.choices()[before:]
    assert [c.name for c in made] == ["test product"]
    assert set(made[0].gflops) == {"mm", "onednn"} and made[0].chosen in made[0].gflops
    assert all(g > 0 for g in made[0].gflops.values())
    again = matmul.linear(a, w, bias)
    assert len(matmul.choices()) == before + 1  # not timed again
    assert torch.equal(first, again)  # the calibrating call returned the chosen library's result
    torch.testing.assert_close(first, a @ w.t() + bias)


@pytest.mark.parametrize("backend", ["mm", "onednn"])
def test_the_library_can_be_pinned(monkeypatch, backend):
    monkeypatch.setenv(matmul.BACKEND_ENV, backend)
    a, w = torch.randn(29, 7), torch.randn(9, 7)
    before = len(matmul.choices())
    with ProductDtypes() as record:
        out = matmul.linear(a, w)
    assert len(matmul.choices()) == before  # nothing timed
    assert [name.startswith("mkldnn") for name, _ in record.seen] == [backend == "onednn"]
    torch.testing.assert_close(out, a @ w.t())
    monkeypatch.setenv(matmul.BACKEND_ENV, "blas")
    with pytest.raises(ValueError, match="choose auto, mm or onednn"):
        matmul.linear(a, w)


def test_weight_gradients_through_strided_operands_are_right():
    # the kernel writes a.T @ b as linear(a.t(), b.t()): both operands are transposed views
    a, b = torch.randn(50, 12), torch.randn(50, 6)
    torch.testing.assert_close(matmul.linear(a.t(), b.t()), a.t() @ b)


# --------------------------------------------------------------------------------------------
# bfloat16 products
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [6, 12])  # below and above the length where weights are laid out once
def test_bf16_fused_layer_matches_float32_and_multiplies_in_bf16(T):
    B, E, H = 3, 5, 16
    layer = mLSTMLayer(E, H, weight_norm=True)
    x = torch.randn(T, B, E, requires_grad=True)
    h0, c0 = torch.randn(B, H, requires_grad=True), torch.randn(B, H, requires_grad=True)
    reset = torch.zeros(T, B, dtype=torch.bool)
    reset[4, 1] = True
    leaves = [x, h0, c0, *layer.parameters()]
    results, records = {}, {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        with ProductDtypes() as record:
            with matmul.autocast(torch.device("cpu"), dtype):
                out, (h, c), cells = layer(x, (h0, c0), reset, return_cells=True)
            w = torch.linspace(-1, 1, out.numel()).view_as(out)
            loss = (out * w).sum() + (h**2).sum() + c.sin().sum() + 0.3 * cells.sum()
            grads = torch.autograd.grad(loss, leaves)
        results[name], records[name] = [out, h, c, cells, *grads], record
    # every product of forward and backward took bfloat16 operands; the float32 run none
    assert records["bf16"].seen and records["bf16"].operand_dtypes() == {torch.bfloat16}
    assert records["fp32"].operand_dtypes() == {torch.float32}
    # ... while what comes out (state, gradients for float32 parameters) is float32
    assert all(t.dtype == torch.float32 for t in results["bf16"])
    errors = [_rel_err(low, full) for low, full in zip(results["bf16"], results["fp32"])]
    assert max(errors) < BF16_REL_TOL
    assert max(errors) > 1e-5  # and it is not float32 after all


def test_emulated_bf16_products_equal_bfloat16_arithmetic(monkeypatch):
    # a CPU without bfloat16 hardware: operands and result rounded, multiplied in float32
    monkeypatch.setattr(matmul, "_native_bf16", lambda device_type: False)
    torch.manual_seed(0)
    a, weight, bias = torch.randn(8, 256), torch.randn(32, 256), torch.randn(32)
    reference = torch.mm(a.bfloat16(), weight.bfloat16().t()).float() + bias  # real bfloat16 kernels
    with ProductDtypes() as record:
        emulated = matmul.linear(a, weight, bias, torch.bfloat16)
        step = matmul.StepWeight(weight, 8, torch.bfloat16)(a) + bias
    assert record.seen and record.operand_dtypes() == {torch.bfloat16}
    assert all(t.dtype == torch.float32 for t in (emulated, step))
    # bfloat16 results: at most one rounding step (2^-8 relative) apart where the float32 sums differ
    # in their last bits; and not float32: far from the full-precision product
    full = a @ weight.t() + bias
    for out in (emulated, step):
        assert torch.allclose(out, reference, rtol=2**-7, atol=1e-2)
        assert (out - full).abs().max() > 1e-3


def test_bf16_model_forward_takes_bf16_operands_everywhere_and_gives_float32_logits():
    model = RNNModel(ModelConfig(emsize=8, nhid=16))
    tokens = torch.randint(0, 256, (10, 2))
    with ProductDtypes() as record, matmul.autocast(torch.device("cpu"), torch.bfloat16):
        logits, _ = model(tokens)
    names = {name.split(".")[1] for name, _ in record.seen}
    assert record.operand_dtypes() == {torch.bfloat16} and len(record.seen) >= 2, names
    assert logits.dtype == torch.float32


def test_bf16_features_agree_with_float32():
    torch.manual_seed(1)
    model = RNNModel(ModelConfig(emsize=16, nhid=32))
    full = featurize(model, SENTENCES, batch_size=4)
    low = featurize(model, SENTENCES, batch_size=4, bf16=True)
    assert low.dtype == np.float32 and not np.array_equal(low, full)
    assert np.abs(low - full).max() / np.abs(full).max() < BF16_REL_TOL


def test_reduced_dtype_of_the_flags(capsys, monkeypatch):
    monkeypatch.setattr(matmul, "_said", set())
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert matmul.reduced_dtype(cpu) is None
    assert matmul.reduced_dtype(cpu, bf16=True) is torch.bfloat16
    assert matmul.reduced_dtype(cuda, fp16=True) is torch.float16
    assert matmul.reduced_dtype(cpu, fp16=True) is torch.bfloat16
    assert matmul.reduced_dtype(cpu, fp16=True) is torch.bfloat16
    assert capsys.readouterr().err.count("--fp16 on a CPU runs as --bf16") == 1  # said once
    with pytest.raises(ValueError, match="choose one"):
        matmul.reduced_dtype(cpu, fp16=True, bf16=True)


def _text_csv(path, repeats: int = 6) -> str:
    pd.DataFrame({"sentence": SENTENCES * repeats}).to_csv(path, index=False)
    return str(path)


def test_bf16_training_lowers_the_loss_on_text(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(matmul, "_said", set())  # notes are printed once per process: start afresh
    main_script = load_script("main")
    args = ["--data", _text_csv(tmp_path / "text.csv"), "--nhid", "32", "--emsize", "16",
            "--batch_size", "4", "--seq_length", "24", "--train_iters", "40", "--lr", "1e-2",
            "--log-interval", "10", "--split", "1", "--num_shards", "4", "--seed", "5", "--cpu", "--bf16",
            "--save", str(tmp_path / "lm.pt")]  # fmt: skip
    assert main_script.main(args) == 0
    out, err = capsys.readouterr()
    assert "bfloat16 matrix products" in out
    if not matmul.native_bf16(torch.device("cpu")):
        assert "no native bfloat16" in err
    rows = [json.loads(line) for line in (tmp_path / "lm.metrics.jsonl").read_text().splitlines()]
    bpc = [r["train_bpc"] for r in rows if r["train_bpc"] is not None]
    assert len(bpc) == 4 and bpc[-1] < bpc[0] - 1.0
    params = load_checkpoint(tmp_path / "lm.pt").model.parameters()
    assert all(p.dtype == torch.float32 for p in params)
    # the optimizer state stays float32 as well
    state = torch.load(tmp_path / "lm.pt", weights_only=True)["train_state"]["optimizer"]["state"]
    assert {t.dtype for s in state.values() for k, t in s.items() if k != "step"} == {torch.float32}


# --------------------------------------------------------------------------------------------
# Checkpoints stored in bfloat16 / float16
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_checkpoint_is_about_half_the_bytes_and_loads_as_float32(tmp_path, suffix, dtype):
    torch.manual_seed(0)
    model = RNNModel(ModelConfig(emsize=16, nhid=64))
    save_checkpoint(tmp_path / f"full{suffix}", model)
    save_checkpoint(tmp_path / f"half{suffix}", model, dtype=dtype)
    full, half = (tmp_path / f"full{suffix}").stat().st_size, (tmp_path / f"half{suffix}").stat().st_size
    assert 0.45 < half / full < 0.56
    loaded = load_checkpoint(tmp_path / f"half{suffix}").model
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    tokens = torch.randint(0, 256, (12, 2))
    with torch.no_grad():
        a, b = model(tokens)[0], loaded(tokens)[0]
    assert 0 < _rel_err(b, a) < 2e-2


def test_convert_and_main_write_reduced_checkpoints(tmp_path, capsys):
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "lm.pt", RNNModel(ModelConfig(emsize=8, nhid=16)))
    src = str(tmp_path / "lm.pt")
    assert convert_main([src, str(tmp_path / "lm16.safetensors"), "--save_dtype", "bf16"]) == 0
    assert "weights stored as bf16" in capsys.readouterr().out
    from safetensors import safe_open

    with safe_open(str(tmp_path / "lm16.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert convert_main([src, str(tmp_path / "x.pt"), "--fp16", "--save_dtype", "bf16"]) == 2
    capsys.readouterr()

    main_script = load_script("main")
    args = ["--data", _text_csv(tmp_path / "text.csv", 2), "--nhid", "16", "--emsize", "8",
            "--batch_size", "2", "--seq_length", "16", "--train_iters", "3", "--split", "1",
            "--num_shards", "2", "--seed", "1", "--cpu", "--save_dtype", "bf16",
            "--save", str(tmp_path / "m.pt")]  # fmt: skip
    assert main_script.main(args) == 0
    stored = torch.load(tmp_path / "m.pt", weights_only=True)
    assert {v.dtype for v in stored["model"].values()} == {torch.bfloat16}
    # the training state is not rounded: optimizer moments stay float32
    moments = stored["train_state"]["optimizer"]["state"].values()
    assert {t.dtype for s in moments for k, t in s.items() if k != "step"} == {torch.float32}


def test_a_bf16_checkpoint_loads_in_every_script(tmp_path, capsys):
    torch.manual_seed(0)
    lm = tmp_path / "lm_bf16.pt"
    save_checkpoint(lm, RNNModel(ModelConfig(emsize=8, nhid=12)), dtype=torch.bfloat16)
    labelled = {}
    for split, n in (("train", 48), ("val", 24), ("test", 24)):
        picks = [i % len(SENTENCES) for i in range(n)]
        rows = [(SENTENCES[i], int(i in (1, 4, 5, 7, 10))) for i in picks]  # the positive ones
        labelled[split] = str(tmp_path / f"{split}.csv")
        pd.DataFrame(rows, columns=["sentence", "label"]).to_csv(labelled[split], index=False)

    # main.py: evaluate it, and train on from it
    main_script = load_script("main")
    data = ["--data", _text_csv(tmp_path / "text.csv", 2), "--split", "1", "--num_shards", "2",
            "--batch_size", "2", "--seq_length", "16", "--cpu", "--load", str(lm)]  # fmt: skip
    assert main_script.main([*data, "--valid", labelled["val"], "--eval_only"]) == 0
    assert "val BPC" in capsys.readouterr().out
    assert main_script.main([*data, "--train_iters", "2", "--save", str(tmp_path / "more.pt")]) == 0

    # transfer.py, then classifier.py on its classifier stored in bfloat16 too
    transfer_script = load_script("transfer")
    out_dir = tmp_path / "transfer"
    assert transfer_script.main(["--load_model", str(lm), "--data", labelled["train"],
                                 "--valid", labelled["val"], "--test", labelled["test"],
                                 "--log2_C", "-1", "1", "--save_results", str(out_dir)]) == 0  # fmt: skip
    clf16 = tmp_path / "clf_bf16.safetensors"
    assert convert_main([str(out_dir / "classifier.pt"), str(clf16), "--save_dtype", "bf16"]) == 0
    classifier_script = load_script("classifier")
    probs = tmp_path / "probs.npy"
    assert classifier_script.main(["--load_model", str(clf16), "--data", labelled["test"], "--save_probs",
                                   str(probs)]) == 0  # fmt: skip
    assert np.load(probs).shape == (24,)

    # generate.py, with the bfloat16 path as well
    generate_script = load_script("generate")
    assert generate_script.main(["--load_model", str(lm), "--gen_length", "20", "--text", "The film",
                                 "--seed", "1", "--cpu", "--bf16",
                                 "--save", str(tmp_path / "gen.txt")]) == 0  # fmt: skip
    assert len((tmp_path / "gen.txt").read_bytes()) > 0
