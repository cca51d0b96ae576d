"""Released weights (formats.md): OpenAI .npy shards and NVIDIA 2018 checkpoints, safety, converter."""

from __future__ import annotations

import argparse
import html
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT, fixture_path, load_script

from sentiment_discovery.checkpoint import CheckpointError, build_checkpoint, load_checkpoint, save_checkpoint
from sentiment_discovery.convert import main as convert_main
from sentiment_discovery.encoder import Encoder
from sentiment_discovery.featurize import featurize
from sentiment_discovery.formats import NVIDIA_FORMAT, OPENAI_FORMAT, openai_weights
from sentiment_discovery.generation import select_neuron
from sentiment_discovery.model import ModelConfig, RNNModel

TEXTS = ["I loved it &amp; the music!", "Terrible.\nWould not  watch again ", "café? non", "x"]

# --------------------------------------------------------------------------------------------
# OpenAI: an independent NumPy implementation of the release's math (formats.md)
# --------------------------------------------------------------------------------------------


def random_openai_shards(rng: np.random.Generator, H: int, E: int) -> list[np.ndarray]:
    """The 15 arrays of the release's structure (shards 2-5: column blocks of Wh), random values;
    distinct random gains so that swapping gx/gh or gmx/gmh, or a gate order, changes the result."""

    def normal(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    def gain(n):
        return rng.uniform(0.5, 2.0, n).astype(np.float32)

    return [
        normal(256, E),
        normal(E, 4 * H),
        *(normal(H, H) for _ in range(4)),
        normal(E, H),
        normal(H, H),
        0.5 * normal(4 * H),
        gain(4 * H),
        gain(4 * H),
        gain(H),
        gain(H),
        normal(H, 256),
        normal(256),
    ]


def openai_reference_cells(shards: list[np.ndarray], texts: list[str], dtype=np.float64) -> np.ndarray:
    """Final cell states as OpenAI computed them: TF layout [n_in, n_out], weight norm over axis 0,
    gates i, f, o, u, texts LEFT-padded in one batch with a mask that freezes c and h on pads."""
    arrays = [a.astype(dtype, copy=False) for a in shards]
    emb, wx, wh, wmx, wmh, b, gx, gh, gmx, gmh = [
        arrays[0],
        arrays[1],
        np.concatenate(arrays[2:6], axis=1),
        *arrays[6:13],
    ]

    def norm(w, g):
        return g * w / np.linalg.norm(w, axis=0, keepdims=True)

    wx, wh, wmx, wmh = norm(wx, gx), norm(wh, gh), norm(wmx, gmx), norm(wmh, gmh)
    encoded = [("\n " + html.unescape(t).replace("\n", " ").strip() + " ").encode("utf-8") for t in texts]
    T = max(len(x) for x in encoded)
    tokens = np.zeros((len(texts), T), dtype=np.int64)
    mask = np.zeros((len(texts), T))
    for row, x in enumerate(encoded):
        tokens[row, T - len(x) :] = list(x)
        mask[row, T - len(x) :] = 1.0
    H = wmh.shape[0]
    h = np.zeros((len(texts), H))
    c = np.zeros((len(texts), H))

    def sigmoid(z):
        return 1.0 / (1.0 + np.exp(-z))

    for t in range(T):
        x = emb[tokens[:, t]]
        m = (x @ wmx) * (h @ wmh)
        z = x @ wx + m @ wh + b
        i, f, o, u = np.split(z, 4, axis=1)
        c_new = sigmoid(f) * c + sigmoid(i) * np.tanh(u)
        h_new = sigmoid(o) * np.tanh(c_new)
        keep = mask[:, t : t + 1]
        c = keep * c_new + (1 - keep) * c
        h = keep * h_new + (1 - keep) * h
    return c


def assert_relative_close(ours: np.ndarray, reference: np.ndarray, rel: float = 1e-5) -> None:
    scale = np.abs(reference).max()
    assert np.abs(ours - reference).max() <= rel * scale, np.abs(ours - reference).max() / scale


def save_shards(directory: Path, shards: list[np.ndarray]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(shards):
        np.save(directory / f"{i}.npy", a)


def test_openai_random_shards_match_numpy_reference(tmp_path):
    shards = random_openai_shards(np.random.default_rng(1), H=16, E=8)
    save_shards(tmp_path / "model", shards)  # the release's layout: <dir>/model/0.npy ...
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.source_format == OPENAI_FORMAT
    cfg = ckpt.config
    assert (cfg.model, cfg.nhid, cfg.emsize, cfg.nlayers, cfg.preprocess) == ("mLSTM", 16, 8, 1, "openai")
    assert "default_neuron" not in ckpt.extra  # 2388 is the 4096-unit release's unit only
    reference = openai_reference_cells(shards, TEXTS)
    assert_relative_close(featurize(ckpt.model, TEXTS, batch_size=len(TEXTS), device="cpu"), reference)
    # the Python API: OpenAI's Model().transform equivalent
    assert_relative_close(Encoder.load(tmp_path, device="cpu").transform(TEXTS), reference)
    # featurize takes the model's own preprocessing: OpenAI's, not the NVIDIA default
    nvidia = featurize(ckpt.model, TEXTS, batch_size=len(TEXTS), device="cpu", preprocess="nvidia")
    assert np.abs(nvidia - reference).max() > 1e-3

    # the scripts take the directory too (transfer.py identifies the model by its files' digest)
    sst = tmp_path / "sst.csv"
    pd.read_csv(fixture_path("binary_sst", "val.csv")).head(40).to_csv(sst, index=False)
    transfer = ["--load_model", str(tmp_path), "--data", str(sst), "--valid", str(sst), "--test", str(sst)]
    out = tmp_path / "out"
    assert load_script("transfer").main([*transfer, "--log2_C", "0", "0", "--save_results", str(out)]) == 0
    assert load_checkpoint(out / "classifier.pt").config.preprocess == "openai"

    # the output layer too: W [H, 256] used as h @ W + b
    tokens = torch.tensor(list(b"\n hi"), dtype=torch.long)[:, None]
    with torch.no_grad():
        logits, (h, _) = ckpt.model(tokens)
    np.testing.assert_allclose(
        logits[-1, 0].numpy(), h[-1, 0].numpy() @ shards[13] + shards[14], rtol=1e-5, atol=1e-5
    )


def test_openai_released_shards_at_4096():
    """The real small shards (embedding, Wmx, biases, gains, output bias) with random stand-ins of the right
    shapes for the ones too large to keep (Wx, Wh, Wmh, output W)."""
    partial = {
        i: np.load(fixture_path("openai_shards_partial", f"{i}.npy"))
        for i in (0, 6, 8, 9, 10, 11, 12, 14)
    }
    rng = np.random.default_rng(2)
    H, E = 4096, 64

    def normal(*shape):  # uniform: quicker to draw at this size, and as good for the test
        return rng.random(shape, dtype=np.float32) - 0.5

    large = {1: normal(E, 4 * H), **{i: normal(H, H) for i in (2, 3, 4, 5, 7)}, 13: normal(H, 256)}
    shards = [partial[i] if i in partial else large[i] for i in range(15)]
    ckpt = build_checkpoint(openai_weights(shards, "openai release"))
    assert (ckpt.config.nhid, ckpt.config.emsize, ckpt.config.preprocess) == (H, E, "openai")
    assert ckpt.extra["default_neuron"] == 2388
    # generate.py's default neuron for this release (no classifier) is that unit of the last layer
    neuron = select_neuron(ckpt.model, ckpt.classifier, None, ckpt.extra.get("default_neuron"))
    assert (neuron.layer, neuron.unit) == (0, 2388)
    texts = ["ok!", "no"]  # short: each step reads 335 MB of weights
    reference = openai_reference_cells(shards, texts, dtype=np.float32)  # float64 at this size takes long
    assert_relative_close(featurize(ckpt.model, texts, device="cpu"), reference)


def test_openai_bad_shards_reported_by_file(tmp_path):
    shards = random_openai_shards(np.random.default_rng(3), H=8, E=4)
    shards[7] = shards[7][:, :5]
    save_shards(tmp_path, shards)
    with pytest.raises(CheckpointError, match=r"7\.npy \(Wmh\): \(8, 5\) vs expected \(8, 8\)"):
        load_checkpoint(tmp_path)
    (tmp_path / "13.npy").unlink()
    with pytest.raises(CheckpointError, match=r"lacks 13\.npy"):
        load_checkpoint(tmp_path)


# --------------------------------------------------------------------------------------------
# NVIDIA 2018: checkpoints written from a native model with the documented keys
# --------------------------------------------------------------------------------------------

H, E = 16, 8


def native_model(kind="mLSTM", weight_norm=True, nlayers=2, fp16=False) -> tuple[RNNModel, dict]:
    """A random native model and the two biases per layer that NVIDIA's file keeps apart."""
    model = RNNModel(ModelConfig(model=kind, emsize=E, nhid=H, nlayers=nlayers, weight_norm=weight_norm))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
            if fp16:  # values that float16 holds exactly, so the reference is the same model
                p.copy_(p.half().float())
        biases = {}
        for i, layer in enumerate(model.rnn.layers):
            b_ih, b_hh = torch.randn(2, 4 * H) * 0.5
            if fp16:
                b_ih, b_hh = b_ih.half().float(), b_hh.half().float()
            if kind == "mLSTM":
                layer.bias.copy_(b_ih + b_hh)
            else:
                layer.bias_ih_l0.copy_(b_ih)
                layer.bias_hh_l0.copy_(b_hh)
            biases[i] = b_ih, b_hh
    return model, biases


def nvidia_state(
    model: RNNModel, biases: dict, gain_2d: bool = False, fp16: bool = False, mixed: bool = False
) -> dict:
    """The nested NVIDIA dict of ``model``: weights as ``_g``/``_v`` when the model uses weight norm
    (direction scaled per row by powers of 2, which weight norm ignores), folded otherwise.
    ``mixed``: w_ih folded although the others are not, and the biases as ``_g``/``_v`` too."""
    names = ("w_ih", "w_hh", "w_mih", "w_mhh") if model.config.model == "mLSTM" else ("w_ih", "w_hh")
    torch_names = {"w_ih": "weight_ih_l0", "w_hh": "weight_hh_l0"}
    rnn = {}
    for i, layer in enumerate(model.rnn.layers):
        for name in names:
            ours = name if model.config.model == "mLSTM" else torch_names[name]
            if model.config.weight_norm and not (mixed and name == "w_ih"):
                g = layer.parametrizations[ours].original0.detach()
                v = layer.parametrizations[ours].original1.detach()
                v = v * 2.0 ** torch.randint(-2, 3, (v.shape[0], 1)).float()
                rnn[f"rnns.{i}.{name}_g"] = g if gain_2d else g.reshape(-1)
                rnn[f"rnns.{i}.{name}_v"] = v
            else:
                rnn[f"rnns.{i}.{name}"] = getattr(layer, ours).detach().clone()
        for name, bias in zip(("b_ih", "b_hh"), biases[i]):
            if mixed:  # per element: g * v / |v|
                rnn[f"rnns.{i}.{name}_g"], rnn[f"rnns.{i}.{name}_v"] = (
                    bias.abs(),
                    bias * torch.rand(4 * H).add(0.5),
                )
            else:
                rnn[f"rnns.{i}.{name}"] = bias
    state = {
        "encoder": {"encoder": {"weight": model.encoder.weight.detach().clone()}, "rnn": rnn},
        "decoder": {
            "weight": model.decoder.weight.detach().clone(),
            "bias": model.decoder.bias.detach().clone(),
        },
    }
    if fp16:
        state = torch.utils._pytree.tree_map(lambda t: t.half(), state)
    return state


def with_pad_id(state: dict) -> dict:
    """The 257-id convention: id 0 is padding (a huge decoder bias: sampled if it were kept)."""
    enc, dec = state["encoder"]["encoder"], state["decoder"]
    enc["weight"] = torch.cat([torch.randn(1, E), enc["weight"]])
    dec["weight"] = torch.cat([torch.randn(1, H), dec["weight"]])
    dec["bias"] = torch.cat([torch.tensor([100.0]), dec["bias"]])
    return state


def flat(state: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in state.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def save_as_cuda(obj, path: Path) -> None:
    """Record every storage as living on 'cuda:0', as a GPU-saved checkpoint does."""
    real_tag = torch.serialization.location_tag
    torch.serialization.location_tag = lambda storage: "cuda:0"
    try:
        torch.save(obj, path)
    finally:
        torch.serialization.location_tag = real_tag


CASES = {
    "folded": dict(weight_norm=False),
    "g_v gain [out]": dict(weight_norm=True),
    "g_v gain [out, 1]": dict(weight_norm=True, gain_2d=True),
    "fp16 g_v": dict(weight_norm=True, fp16=True),
    "fp16 folded": dict(weight_norm=False, fp16=True),
    "mixed: some folded, biases as g_v": dict(weight_norm=True, mixed=True, loads_weight_norm=False),
    "257 ids, sd/args wrapper, legacy file": dict(weight_norm=True, pad=True, wrapper=True, legacy=True),
    "flat keys, saved on GPU": dict(weight_norm=False, flat=True, cuda=True),
    "LSTM": dict(kind="LSTM", weight_norm=True),
}


@pytest.mark.parametrize("case", CASES)
def test_nvidia_checkpoint_matches_native_model(tmp_path, case):
    opt = CASES[case]
    model, biases = native_model(opt.get("kind", "mLSTM"), opt["weight_norm"], fp16=opt.get("fp16", False))
    state = nvidia_state(
        model, biases, opt.get("gain_2d", False), opt.get("fp16", False), opt.get("mixed", False)
    )
    if opt.get("pad"):
        state = with_pad_id(state)
    if opt.get("flat"):
        state = flat(state)
    if opt.get("wrapper"):
        state = {"sd": state, "args": argparse.Namespace(model="mLSTM", nhid=H, lr=5e-4, data=["a.json"])}
    path = tmp_path / "mlstm.pt"
    if opt.get("cuda"):
        save_as_cuda(state, path)
    else:
        torch.save(state, path, _use_new_zipfile_serialization=not opt.get("legacy"))

    ckpt = load_checkpoint(path)
    assert ckpt.source_format == NVIDIA_FORMAT
    weight_norm = opt.get("loads_weight_norm", opt["weight_norm"])  # g_v stored for all matrices
    assert ckpt.config.to_dict() == {**model.config.to_dict(), "dropout": 0.0, "weight_norm": weight_norm}
    assert all(p.dtype == torch.float32 for p in ckpt.model.parameters())
    tokens = torch.randint(0, 256, (12, 3))
    reset = torch.zeros(12, 3, dtype=torch.bool)
    reset[5, 1] = True
    model.eval()
    with torch.no_grad():
        want_logits, (want_h, want_c) = model(tokens, reset=reset)
        logits, (h, c) = ckpt.model(tokens, reset=reset)
    assert logits.shape[-1] == 256  # no padding id left to sample
    for got, want in ((logits, want_logits), (h, want_h), (c, want_c)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_nvidia_classifier_becomes_classifier_dict(tmp_path):
    model, biases = native_model(weight_norm=False)
    state = nvidia_state(model, biases)
    weight = torch.randn(1, H)
    state["classifier"] = {"weight": weight, "bias": torch.tensor([0.3]), "neurons": None}
    torch.save(state, tmp_path / "ama_sst.pt")
    ckpt = load_checkpoint(tmp_path / "ama_sst.pt")
    clf = ckpt.classifier
    torch.testing.assert_close(clf["weight"], weight[0])
    assert clf["bias"].shape == () and float(clf["bias"]) == pytest.approx(0.3)
    assert clf["neurons"].tolist() == np.argsort(-np.abs(weight[0].numpy()), kind="stable").tolist()
    assert (clf["pooling"], clf["state"], clf["all_layers"], clf["mean"], clf["scale"]) == (
        "last",
        "cell",
        False,
        None,
        None,
    )

    # Encoder API: P(positive) = sigmoid(last cell . weight + bias) of the native model
    probs = Encoder.load(tmp_path / "ama_sst.pt", device="cpu").predict_proba(TEXTS)
    cells = featurize(model, TEXTS, device="cpu").astype(np.float64)
    np.testing.assert_allclose(
        probs, 1 / (1 + np.exp(-(cells @ weight[0].double().numpy() + 0.3))), rtol=1e-5
    )

    # a regression fitted on a few neurons only: weight [1, k] over classifier.neurons
    state["classifier"] = {
        "weight": torch.tensor([[0.5, -2.0]]),
        "bias": torch.tensor([0.0]),
        "neurons": [3, 7],
    }
    torch.save(state, tmp_path / "two.pt")
    clf = load_checkpoint(tmp_path / "two.pt").classifier
    assert clf["neurons"].tolist() == [7, 3]
    expected = torch.zeros(H)
    expected[3], expected[7] = 0.5, -2.0
    torch.testing.assert_close(clf["weight"], expected)


def test_nvidia_wrong_shape_reported_by_file_key(tmp_path):
    model, biases = native_model(weight_norm=False)
    state = nvidia_state(model, biases)
    state["encoder"]["rnn"]["rnns.1.w_mhh"] = torch.randn(H, H - 1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(
        CheckpointError, match=r"encoder\.rnn\.rnns\.1\.w_mhh: file \(16, 15\) vs model \(16, 16\)"
    ):
        load_checkpoint(tmp_path / "bad.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint this suite knows"):
        load_checkpoint(tmp_path / "other.pt")


class Payload:
    """Pickles as a call of os.system: unpickling it would create ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, ("touch " + shlex.quote(str(self.marker)),)


def test_pickled_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "payload_ran"
    path = tmp_path / "evil.pt"
    model, biases = native_model(weight_norm=False)
    state = nvidia_state(model, biases)
    state["classifier"] = {"weight": torch.zeros(1, H), "bias": torch.zeros(1), "neurons": Payload(marker)}
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="refused to load") as excinfo:
        Encoder.load(path)
    assert not marker.exists()
    assert "GLOBAL" in str(excinfo.value)  # names what was refused
    # a truncated checkpoint is reported as unreadable, not as code
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(CheckpointError, match="cannot read it as a checkpoint"):
        load_checkpoint(truncated)
    # the payload is live: the call it pickles (what unpickling would run) creates the marker
    call, call_args = Payload(marker).__reduce__()
    call(*call_args)
    assert marker.exists()


# --------------------------------------------------------------------------------------------
# Converter
# --------------------------------------------------------------------------------------------


def outputs(model: RNNModel, tokens: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(tokens)[0]


@pytest.mark.parametrize(
    "dst,flags",
    [("m.pt", []), ("m.safetensors", []), ("m.bin", ["--safetensors", "--fp16"]), ("m16.pt", ["--fp16"])],
)
def test_convert_nvidia_round_trip(tmp_path, capsys, dst, flags):
    model, biases = native_model(weight_norm=True)
    state = nvidia_state(model, biases)
    state["classifier"] = {"weight": torch.randn(1, H), "bias": torch.tensor([0.1]), "neurons": None}
    torch.save(state, tmp_path / "src.pt")
    source = load_checkpoint(tmp_path / "src.pt")
    assert convert_main([str(tmp_path / "src.pt"), str(tmp_path / dst), *flags]) == 0
    assert "wrote" in capsys.readouterr().out
    ckpt = load_checkpoint(tmp_path / dst)
    assert ckpt.config == source.config
    assert all(p.dtype == torch.float32 for p in ckpt.model.parameters())  # fp16 files are upcast
    tokens = torch.randint(0, 256, (10, 2))
    tol = dict(rtol=2e-2, atol=2e-2) if "--fp16" in flags else dict(rtol=0, atol=0)
    torch.testing.assert_close(outputs(ckpt.model, tokens), outputs(source.model, tokens), **tol)
    for key in ("weight", "bias", "neurons"):
        torch.testing.assert_close(ckpt.classifier[key], source.classifier[key])
    assert {k: v for k, v in ckpt.classifier.items() if not isinstance(v, torch.Tensor)} == {
        k: v for k, v in source.classifier.items() if not isinstance(v, torch.Tensor)
    }


def test_convert_openai_keeps_preprocessing_and_extra(tmp_path):
    shards = random_openai_shards(np.random.default_rng(4), H=8, E=4)
    save_shards(tmp_path / "shards", shards)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sentiment_discovery.convert",
            str(tmp_path / "shards"),
            str(tmp_path / "o.safetensors"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    ckpt = load_checkpoint(tmp_path / "o.safetensors")
    assert ckpt.config.preprocess == "openai" and ckpt.classifier is None
    assert_relative_close(featurize(ckpt.model, TEXTS, device="cpu"), openai_reference_cells(shards, TEXTS))

    native, _ = native_model()
    save_checkpoint(tmp_path / "n.pt", native, extra={"default_neuron": 5})
    assert convert_main([str(tmp_path / "n.pt"), str(tmp_path / "n.safetensors")]) == 0
    assert load_checkpoint(tmp_path / "n.safetensors").extra == {"default_neuron": 5}


def test_convert_errors_are_one_line(tmp_path, capsys):
    assert convert_main([str(tmp_path / "missing.pt"), str(tmp_path / "out.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing.pt" in err and "Traceback" not in err
    assert not (tmp_path / "out.pt").exists()
