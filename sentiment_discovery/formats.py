"""Read the released weights (docs/formats.md): OpenAI's ``.npy`` shards and NVIDIA's 2018 checkpoints.

Each reader returns a ``RawCheckpoint``: a config dict, the tensors under the project's state-dict
keys, and the rest (for NVIDIA files after transfer, the project's classifier dict), so that the
model built from it computes the original math. Loading flows one way: ``checkpoint.load_checkpoint``
detects the format, calls a reader here, checks what it returned and only then builds the model.

Weight norm: a file that stores gain and direction separately (OpenAI always; NVIDIA ``_g``/``_v``)
loads into a ``weight_norm=True`` model with gain -> ``original0`` ``[out, 1]`` and direction ->
``original1``; PyTorch's ``g * v / ||v||`` per output row is exactly OpenAI's normalisation over
axis 0 of the transposed ``[n_in, n_out]`` layout, so fine-tuning keeps the trained parametrization.
An NVIDIA file with folded weights loads into a ``weight_norm=False`` model.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import CheckpointError
from .model import ModelConfig

OPENAI_FORMAT = "openai-shards"
NVIDIA_FORMAT = "nvidia-2018"
OPENAI_SHARD_COUNT = 15
OPENAI_HIDDEN = 4096
OPENAI_EMBED = 64
OPENAI_SENTIMENT_NEURON = 2388  # reported by OpenAI for its 4096-unit release
OPENAI_TO_OUR_GATES = (0, 1, 3, 2)  # OpenAI i, f, o, u -> ours i, f, g (= u), o
NVIDIA_PAD_VOCAB = 257  # August 2018 on: id 0 is padding, byte b is id b + 1


@dataclass
class RawCheckpoint:
    """What a reader found in a file, not yet checked: ``config`` (a ModelConfig as a dict, as stored),
    ``tensors`` (the state dict under the project's keys), and the rest as stored."""

    source: str  # the file, for messages
    source_format: str
    config: object
    tensors: object
    classifier: object = None
    train_state: object = None
    extra: object = field(default_factory=dict)
    file_keys: dict[str, str] = field(default_factory=dict)  # our key -> the file's, for messages


def _param_keys(prefix: str, name: str, weight_norm: bool) -> tuple[str, ...]:
    """State-dict key(s) of a parameter: (gain, direction) under PyTorch's weight-norm parametrization."""
    if weight_norm:
        return f"{prefix}parametrizations.{name}.original0", f"{prefix}parametrizations.{name}.original1"
    return (prefix + name,)


# --------------------------------------------------------------------------------------------
# OpenAI
# --------------------------------------------------------------------------------------------


def openai_shard_shapes(H: int = OPENAI_HIDDEN, E: int = OPENAI_EMBED) -> list[tuple[int, ...]]:
    """The shape of each file ``0.npy`` ... ``14.npy`` of OpenAI's layout (docs/formats.md). Files 2-5 are
    column blocks of Wh ``[H, 4H]``, listed here as ``(H, 4H)``: the most columns one block may hold."""
    return [
        (256, E),  # embedding
        (E, 4 * H),  # Wx
        *[(H, 4 * H)] * 4,  # Wh, column blocks
        (E, H),  # Wmx
        (H, H),  # Wmh
        (4 * H,),  # b
        (4 * H,),  # gx
        (4 * H,),  # gh
        (H,),  # gmx
        (H,),  # gmh
        (H, 256),  # output W
        (256,),  # output b
    ]


def openai_shard_dir(path: str | Path) -> Path | None:
    """``path`` itself or its ``model/`` subfolder when it holds OpenAI's ``0.npy``; else None."""
    path = Path(path)
    for candidate in (path, path / "model"):
        if (candidate / "0.npy").is_file():
            return candidate
    return None


def read_openai_shards(directory: str | Path) -> list[np.ndarray]:
    """The 15 arrays ``0.npy`` ... ``14.npy`` (``allow_pickle=False``: plain numbers only)."""
    directory = Path(directory)
    files = [directory / f"{i}.npy" for i in range(OPENAI_SHARD_COUNT)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{directory}: OpenAI shard directory lacks {', '.join(missing)}")
    shards = []
    for f in files:
        try:
            shards.append(np.load(f, allow_pickle=False))
        except (ValueError, OSError) as e:
            raise CheckpointError(f"{f}: not a plain .npy array ({e})") from None
    return shards


def openai_weights(shards: Sequence[np.ndarray], source: str) -> RawCheckpoint:
    """The one-layer mLSTM of OpenAI's 15 arrays (any H and E; sizes read from the shards)."""
    if len(shards) != OPENAI_SHARD_COUNT:
        raise CheckpointError(f"{source}: expected {OPENAI_SHARD_COUNT} OpenAI shards, got {len(shards)}")
    if np.ndim(shards[6]) != 2:
        raise CheckpointError(f"{source}: 6.npy (Wmx) must be a matrix [E, H], got {np.shape(shards[6])}")
    E, H = np.shape(shards[6])
    wh_blocks = shards[2:6]
    bad_blocks = [
        f"{i}.npy {np.shape(a)}" for i, a in enumerate(wh_blocks, 2) if np.ndim(a) != 2 or len(a) != H
    ]
    if bad_blocks:
        raise CheckpointError(f"{source}: Wh column blocks must have {H} rows: {', '.join(bad_blocks)}")
    arrays = [shards[0], shards[1], np.concatenate(wh_blocks, axis=1), *shards[6:]]
    shapes = openai_shard_shapes(H, E)
    shapes = [*shapes[:2], (H, 4 * H), *shapes[6:]]  # files 2-5 merged into Wh
    files = ["0", "1", "2-5", *map(str, range(6, OPENAI_SHARD_COUNT))]
    names = ["embedding", "Wx", "Wh", "Wmx", "Wmh", "b", "gx", "gh", "gmx", "gmh", "output W", "output b"]
    layout = list(zip(files, names, shapes))  # (file, name, shape) of each merged array, docs/formats.md
    wrong = [
        f"{file}.npy ({name}): {tuple(np.shape(a))} vs expected {shape}"
        for (file, name, shape), a in zip(layout, arrays)
        if tuple(np.shape(a)) != shape
    ]
    if wrong:
        raise CheckpointError(f"{source}: shards do not fit an mLSTM with E={E}, H={H}: {'; '.join(wrong)}")
    tensors = (torch.from_numpy(np.asarray(a, np.float32)) for a in arrays)
    emb, wx, wh, wmx, wmh, b, gx, gh, gmx, gmh, w_out, b_out = tensors

    def gates(t: Tensor) -> Tensor:  # reorder the four H blocks along the last axis
        blocks = t.reshape(*t.shape[:-1], 4, H)
        return blocks[..., list(OPENAI_TO_OUR_GATES), :].reshape(t.shape)

    layer = "rnn.layers.0."
    state = {
        "encoder.weight": emb,
        layer + "bias": gates(b),
        "decoder.weight": w_out.t(),
        "decoder.bias": b_out,
    }
    for name, gain, direction in (
        ("w_ih", gates(gx), gates(wx)),
        ("w_hh", gates(gh), gates(wh)),
        ("w_mih", gmx, wmx),
        ("w_mhh", gmh, wmh),
    ):
        g_key, v_key = _param_keys(layer, name, weight_norm=True)
        state[g_key] = gain.unsqueeze(1)
        state[v_key] = direction.t()  # TF [n_in, n_out] -> PyTorch [n_out, n_in]
    config = ModelConfig(
        model="mLSTM",
        emsize=E,
        nhid=H,
        nlayers=1,
        dropout=0.0,
        tied=False,
        weight_norm=True,
        ntoken=256,
        preprocess="openai",
    )
    extra = {"default_neuron": OPENAI_SENTIMENT_NEURON} if H == OPENAI_HIDDEN else {}
    return RawCheckpoint(str(source), OPENAI_FORMAT, config.to_dict(), state, extra=extra)


def read_openai(path: str | Path) -> RawCheckpoint:
    """The OpenAI shard directory ``path`` (or its ``model/`` subfolder)."""
    directory = openai_shard_dir(path)
    if directory is None:
        raise CheckpointError(f"{path}: a directory without OpenAI .npy shards (no 0.npy in it or in model/)")
    return openai_weights(read_openai_shards(directory), str(directory))


# --------------------------------------------------------------------------------------------
# NVIDIA 2018
# --------------------------------------------------------------------------------------------

_NVIDIA_RNN_KEY = re.compile(r"encoder\.rnn\.rnns\.(\d+)\.(\w+?)(_g|_v)?")
_MLSTM_NAMES = {"w_ih": "w_ih", "w_hh": "w_hh", "w_mih": "w_mih", "w_mhh": "w_mhh"}
_LSTM_NAMES = {"w_ih": "weight_ih_l0", "w_hh": "weight_hh_l0"}


def _flatten(obj: dict, prefix: str, out: dict) -> None:
    for key, value in obj.items():
        if isinstance(value, dict):
            _flatten(value, f"{prefix}{key}.", out)
        else:
            out[prefix + str(key)] = value


def nvidia_flat_state(obj) -> dict | None:
    """The NVIDIA state dict as flat dotted keys (``encoder.rnn.rnns.0.w_ih`` ...), or None if ``obj`` is
    not one. Accepts the nested and the flat form, a ``module.`` prefix, the ``{'sd', 'args'}`` wrapper."""
    if isinstance(obj, dict) and isinstance(obj.get("sd"), dict):
        obj = obj["sd"]
    if not isinstance(obj, dict):
        return None
    flat: dict = {}
    _flatten(obj, "", flat)
    flat = {k.removeprefix("module."): v for k, v in flat.items()}
    return flat if isinstance(flat.get("encoder.encoder.weight"), Tensor) else None


def _fold(g: Tensor, v: Tensor, g_key: str) -> Tensor:
    """``g * v / ||v||`` per output row (the released files' unfolded weight norm)."""
    if v.dim() < 1 or g.numel() != v.shape[0]:
        raise CheckpointError(f"{g_key}: {g.numel()} gains for a direction of shape {tuple(v.shape)}")
    g = g.float().reshape(-1, *([1] * (v.dim() - 1)))
    v = v.float()
    return g * v / v.reshape(len(v), -1).norm(dim=1).reshape(g.shape)


def nvidia_weights(flat: dict, source: str) -> RawCheckpoint:
    """The model (and classifier) of a flat NVIDIA state dict from ``nvidia_flat_state``."""
    layers: dict[int, dict[str, dict[str, Tensor]]] = {}  # layer -> name -> {"": w} or {"_g": g, "_v": v}
    for key, value in flat.items():
        match = _NVIDIA_RNN_KEY.fullmatch(key)
        if key.startswith("encoder.rnn."):
            if not (match and isinstance(value, Tensor)):
                raise CheckpointError(f"{source}: unknown recurrent key {key} ({type(value).__name__})")
            layers.setdefault(int(match[1]), {}).setdefault(match[2], {})[match[3] or ""] = value
    if sorted(layers) != list(range(len(layers))) or not layers:
        found = sorted(layers)
        raise CheckpointError(f"{source}: recurrent layers must be encoder.rnn.rnns.0, 1, ... (got {found})")
    kind = "mLSTM" if "w_mih" in layers[0] else "LSTM"
    names = _MLSTM_NAMES if kind == "mLSTM" else _LSTM_NAMES
    weight_norm = all(set(layer.get(n, {})) == {"_g", "_v"} for layer in layers.values() for n in names)

    state: dict[str, Tensor] = {}
    file_keys: dict[str, str] = {}  # our key -> the file's key, for error messages
    for i, layer in layers.items():
        src = f"encoder.rnn.rnns.{i}."
        prefix = f"rnn.layers.{i}."
        unknown = set(layer) - set(names) - {"b_ih", "b_hh"}
        if unknown:
            unknown_keys = ", ".join(src + n for n in sorted(unknown))
            raise CheckpointError(f"{source}: {kind} layer {i} has unknown keys {unknown_keys}")
        stored = {}
        for name, parts in layer.items():
            if set(parts) == {""}:
                stored[name] = parts[""]
            elif set(parts) == {"_g", "_v"} and name in names and weight_norm:
                g_key, v_key = _param_keys(prefix, names[name], weight_norm=True)
                state[g_key], state[v_key] = parts["_g"].reshape(-1, 1), parts["_v"]
                file_keys[g_key], file_keys[v_key] = src + name + "_g", src + name + "_v"
            elif set(parts) == {"_g", "_v"}:
                stored[name] = _fold(parts["_g"], parts["_v"], f"{source}: {src}{name}_g")
            else:
                raise CheckpointError(f"{source}: {src}{name} has parts {sorted(parts)}; need _g with _v")
        missing = [src + n for n in (*names, "b_ih", "b_hh") if n not in stored and n not in layer]
        if missing:
            raise CheckpointError(f"{source}: missing keys " + ", ".join(missing))
        for name, ours in names.items():
            if name in stored:
                state[prefix + ours] = stored[name]
                file_keys[prefix + ours] = src + name
        if kind == "mLSTM":  # our layer keeps one bias: the two released ones always add up
            if stored["b_ih"].shape != stored["b_hh"].shape:
                shapes = f"{tuple(stored['b_ih'].shape)} and {tuple(stored['b_hh'].shape)}"
                raise CheckpointError(f"{source}: {src}b_ih and {src}b_hh differ in shape: {shapes}")
            state[prefix + "bias"] = stored["b_ih"].float() + stored["b_hh"].float()
            file_keys[prefix + "bias"] = f"{src}b_ih + {src}b_hh"
        else:
            state[prefix + "bias_ih_l0"], state[prefix + "bias_hh_l0"] = stored["b_ih"], stored["b_hh"]

    embedding = flat["encoder.encoder.weight"]
    decoder_w, decoder_b = flat.get("decoder.weight"), flat.get("decoder.bias")
    if not (isinstance(decoder_w, Tensor) and isinstance(decoder_b, Tensor)):
        raise CheckpointError(f"{source}: missing keys decoder.weight / decoder.bias")
    vocab = embedding.shape[0] if embedding.dim() == 2 else 0
    fits = decoder_w.dim() == 2 and decoder_w.shape[0] == vocab and tuple(decoder_b.shape) == (vocab,)
    if vocab not in (256, NVIDIA_PAD_VOCAB) or not fits:
        raise CheckpointError(
            f"{source}: vocabulary rows must be 256 or 257 and agree: encoder.encoder.weight "
            f"{tuple(embedding.shape)}, decoder.weight {tuple(decoder_w.shape)}, "
            f"decoder.bias {tuple(decoder_b.shape)}"
        )
    if vocab == NVIDIA_PAD_VOCAB:  # drop the padding id: byte b is then id b, and a pad can never be sampled
        embedding, decoder_w, decoder_b = embedding[1:], decoder_w[1:], decoder_b[1:]
    state.update({"encoder.weight": embedding, "decoder.weight": decoder_w, "decoder.bias": decoder_b})
    file_keys["encoder.weight"] = "encoder.encoder.weight"

    E = embedding.shape[1]
    H = decoder_w.shape[1]
    config = ModelConfig(
        model=kind,
        emsize=E,
        nhid=H,
        nlayers=len(layers),
        dropout=0.0,
        tied=False,
        weight_norm=weight_norm,
        ntoken=256,
        preprocess="nvidia",
    )
    classifier = _nvidia_classifier(flat, H, len(layers), source)
    return RawCheckpoint(source, NVIDIA_FORMAT, config.to_dict(), state, classifier, file_keys=file_keys)


def _nvidia_classifier(flat: dict, H: int, nlayers: int, source: str) -> dict | None:
    """NVIDIA's ``classifier`` (a Linear on the last cell state, maybe on ``neurons`` only) as the stored
    form of a ``Readout`` (readout.py checks it)."""
    weight, bias, neurons = (flat.get(f"classifier.{k}") for k in ("weight", "bias", "neurons"))
    if weight is None:
        return None
    if not (isinstance(weight, Tensor) and isinstance(bias, Tensor) and bias.numel() == 1):
        raise CheckpointError(f"{source}: classifier.weight and classifier.bias (one number) must be tensors")
    weight = weight.float().reshape(-1)
    neurons = None if neurons is None else torch.as_tensor(neurons).long().reshape(-1)
    features = weight.numel() if weight.numel() in (H, nlayers * H) else H
    if (
        neurons is not None
        and neurons.numel()
        and not 0 <= int(neurons.min()) <= int(neurons.max()) < features
    ):
        raise CheckpointError(f"{source}: classifier.neurons has indices outside 0 ... {features - 1}")
    if weight.numel() == features:
        full = weight
    elif neurons is not None and neurons.numel() == weight.numel():
        full = torch.zeros(H).index_copy_(0, neurons, weight)  # a regression fitted on those units only
    else:
        raise CheckpointError(
            f"{source}: classifier.weight has {weight.numel()} values for H={H} "
            f"(classifier.neurons: {None if neurons is None else neurons.numel()})"
        )
    order = torch.argsort(full.abs(), descending=True, stable=True)
    if neurons is not None:
        order = neurons[torch.argsort(full[neurons].abs(), descending=True, stable=True)]
    return {
        "weight": full,
        "bias": bias.float().reshape(()),
        "neurons": order,
        "pooling": "last",
        "state": "cell",
        "all_layers": full.numel() > H,
        "mean": None,
        "scale": None,
        "C": None,  # not stored in the released files
    }
