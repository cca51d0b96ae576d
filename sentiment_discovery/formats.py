"""Read the released weights (docs/formats.md): OpenAI's ``.npy`` shards and NVIDIA's 2018 checkpoints.

Also our own files (``read_native``, ``read_safetensors``; written by checkpoint.py), the aliases of
the shipped and OpenAI models, and ``read_checkpoint_file``, which detects the format of a path.

Each reader returns a ``RawCheckpoint``: a config dict, the tensors under the project's state-dict
keys, and the rest (for NVIDIA files after transfer, the stored form of a ``Readout``), so that the
model built from it computes the original math. Loading flows one way: ``checkpoint.load_checkpoint``
calls ``read_checkpoint_file`` here, then builds the model (its config and tensor shapes checked
first, model.py) and checks the classifier against it (readout.py).

Weight norm: a file that stores gain and direction separately (OpenAI always; NVIDIA ``_g``/``_v``)
loads into a ``weight_norm=True`` model with gain -> ``original0`` ``[out, 1]`` and direction ->
``original1``; PyTorch's ``g * v / ||v||`` per output row is exactly OpenAI's normalisation over
axis 0 of the transposed ``[n_in, n_out]`` layout, so fine-tuning keeps the trained parametrization.
An NVIDIA file with folded weights loads into a ``weight_norm=False`` model.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import safetensors
import torch
from torch import Tensor

from .errors import CheckpointError
from .model import MAX_UNITS, ModelConfig, RNNModel

OPENAI_FORMAT = "openai-shards"
NVIDIA_FORMAT = "nvidia-2018"
OPENAI_SHARD_COUNT = 15
OPENAI_HIDDEN = 4096
OPENAI_EMBED = 64
OPENAI_SENTIMENT_NEURON = 2388  # reported by OpenAI for its 4096-unit release
OPENAI_TO_OUR_GATES = (0, 1, 3, 2)  # OpenAI i, f, o, u -> ours i, f, g (= u), o
NVIDIA_PAD_VOCAB = 257  # August 2018 on: id 0 is padding, byte b is id b + 1
NPY_HEADER_MAX = 4096  # bytes; numpy writes ~128: a larger header is not a plain array file


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


def npy_header(path: Path) -> tuple[tuple[int, ...], str, int]:
    """Shape, dtype and data offset of a ``.npy`` file, from its header alone (bounded in size)."""
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            read = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, fortran_order, dtype = read(f, max_header_size=NPY_HEADER_MAX)
        except (ValueError, OSError) as e:
            raise CheckpointError(f"{path}: not a plain .npy array ({e})") from None
        if fortran_order:
            raise CheckpointError(f"{path}: a Fortran-ordered array; OpenAI's shards are C-ordered")
        return tuple(shape), dtype.str, f.tell()


_SHARD_NAMES = (
    "embedding",
    "Wx",
    *["Wh block"] * 4,
    "Wmx",
    "Wmh",
    "b",
    "gx",
    "gh",
    "gmx",
    "gmh",
    "output W",
    "output b",
)


def check_openai_headers(files: Sequence[Path]) -> None:
    """The 15 shard headers against OpenAI's layout (E and H from ``6.npy``, Wmx ``[E, H]``) and each
    file's size, before a byte of data is read: a header cannot make us allocate what the file lacks."""
    headers = [npy_header(f) for f in files]
    wmx = headers[6][0]
    if len(wmx) != 2 or not all(1 <= n <= MAX_UNITS for n in wmx):
        raise CheckpointError(f"{files[6]}: Wmx shape {wmx}, expected [E, H] with E, H in 1 .. {MAX_UNITS}")
    E, H = wmx
    expected = openai_shard_shapes(H, E)
    block_columns = 0
    for index, (f, (shape, dtype, offset), want) in enumerate(zip(files, headers, expected)):
        if 2 <= index <= 5:  # column blocks of Wh [H, 4H]
            fits = len(shape) == 2 and shape[0] == H and 1 <= shape[1] <= 4 * H
            block_columns += shape[1] if fits else 0
            want = f"({H}, <= {4 * H})"
        else:
            fits = shape == want
        if not fits or dtype != "<f4":
            raise CheckpointError(
                f"{f.parent}: shards do not fit an mLSTM with E={E}, H={H}: "
                f"{f.name} ({_SHARD_NAMES[index]}): "
                f"{shape} vs expected {want} ({dtype}; float32 <f4 needed)"
            )
        size, needed = f.stat().st_size, offset + 4 * int(np.prod(shape))
        if size != needed:
            raise CheckpointError(f"{f}: {size:,} bytes where its header announces {needed:,}")
    if block_columns != 4 * H:
        raise CheckpointError(
            f"{files[2].parent}: 2.npy ... 5.npy hold {block_columns} columns of Wh, expected {4 * H}"
        )


def read_openai_shards(directory: str | Path) -> list[np.ndarray]:
    """The 15 arrays ``0.npy`` ... ``14.npy`` (``allow_pickle=False``: plain numbers only), each header
    checked against the layout and its file's size first."""
    directory = Path(directory)
    files = [directory / f"{i}.npy" for i in range(OPENAI_SHARD_COUNT)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{directory}: OpenAI shard directory lacks {', '.join(missing)}")
    check_openai_headers(files)
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


# --------------------------------------------------------------------------------------------
# Our own files, and which reader a path needs
# --------------------------------------------------------------------------------------------

FORMAT_NAME = "sentiment-discovery"
FORMAT_VERSION = 1
# The models that ship with the package (pretrained/README.md: how they were made, what they score): the
# language model with its transferred classifier (``default``: the LM of main.py, transfer.py and
# generate.py), and that model fine-tuned with its classifier on Binary SST (``finetuned``: the classifier
# of classifier.py and Encoder().predict_proba, the better one).
DEFAULT_MODEL = Path(__file__).resolve().parent / "pretrained" / "mlstm1024_imdb_sst.safetensors"
DEFAULT_CLASSIFIER = DEFAULT_MODEL.with_name("mlstm1024_imdb_sst_finetuned.safetensors")
# where `python data/download.py openai` writes OpenAI's converted weights, under its --root (data/)
OPENAI_MODEL = Path("openai", "mlstm_openai.safetensors")


# Names a user may give instead of a path: the file each stands for, and how to get it. Downloads go
# relative to the working directory, as the scripts' data defaults (the repository root).
MODEL_ALIASES = {
    "default": (DEFAULT_MODEL, "pip install . (the shipped model is package data)"),
    "finetuned": (DEFAULT_CLASSIFIER, "pip install . (the shipped model is package data)"),
    "openai": (Path("data") / OPENAI_MODEL, "python data/download.py openai"),
}


def first_existing_model(*candidates: str, fallback: str = "default") -> str:
    """The first of the scripts' conventional outputs that exists (a user's own model wins), else
    ``fallback``, a shipped model's alias."""
    return next((path for path in candidates if Path(path).exists()), fallback)


def resolve_model_path(path: str | os.PathLike | None) -> Path:
    """``path`` itself, or for an alias (``default``, ``finetuned``, ``openai``) with no file of that name,
    the file it stands for. None is ``default``, the shipped model."""
    path = Path("default" if path is None else path)
    if path.exists() or str(path) not in MODEL_ALIASES:
        return path
    file, command = MODEL_ALIASES[str(path)]
    if not file.exists():
        raise CheckpointError(
            f"{path}: no {file} in {Path.cwd()}: run `{command}` in the repository root, then run this "
            "command from there (or give the checkpoint's path)"
        )
    return file


def is_safetensors_file(path: Path) -> bool:
    """Detected by content: an 8-byte header length, then the JSON header."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def read_safetensors(path: Path) -> dict:
    """A native checkpoint written as safetensors, back as the native dict."""
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if metadata.get("format") != FORMAT_NAME:
            raise CheckpointError(f"{path}: a safetensors file, but not a sentiment-discovery checkpoint")
        classifier = json.loads(metadata["classifier"])
        if isinstance(classifier, dict):
            for key, value in tensors.items():
                if key.startswith("classifier."):
                    classifier[key.removeprefix("classifier.")] = value
        return {
            "format": FORMAT_NAME,
            "version": int(metadata["version"]),
            "config": json.loads(metadata["config"]),
            "model": {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")},
            "classifier": classifier,
            "train_state": None,
            "extra": json.loads(metadata["extra"]),
        }
    except (safetensors.SafetensorError, KeyError, ValueError) as e:  # JSONDecodeError is a ValueError
        reason = f"{type(e).__name__}: {e}"
        raise CheckpointError(f"{path}: unreadable safetensors checkpoint ({reason})") from None


# Bytes per element of the storage classes a torch file names (persistent ids); an unknown one counts
# as the widest, so that a file can only claim more, never less, than it holds.
_STORAGE_BYTES = {
    "UntypedStorage": 1, "ByteStorage": 1, "CharStorage": 1, "BoolStorage": 1, "QUInt8Storage": 1,
    "QInt8Storage": 1, "ShortStorage": 2, "HalfStorage": 2, "BFloat16Storage": 2, "IntStorage": 4,
    "FloatStorage": 4, "QInt32Storage": 4, "LongStorage": 8, "DoubleStorage": 8,
    "ComplexFloatStorage": 8, "ComplexDoubleStorage": 16,
}  # fmt: skip
MAX_ZIP_ENTRIES = 100_000  # a checkpoint has a handful per tensor


class _Stub:
    """Stands for every class a pickle names while ``_claimed_storage_bytes`` reads it (a subclass per
    name): creating, calling, building or filling one does nothing, so no code of the file runs."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Stub()

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


class _StorageScan(pickle.Unpickler):
    """Reads a torch pickle without running anything; adds up the bytes its storages claim."""

    def __init__(self, file):
        super().__init__(file)
        self.claimed: dict[str, int] = {}

    def find_class(self, module, name):
        return type(str(name), (_Stub,), {})

    def persistent_load(self, pid):
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] in ("storage", b"storage"):
            storage_type, key, numel = pid[1], str(pid[2]), pid[4]
            if not isinstance(numel, int) or numel < 0:
                raise CheckpointError(f"a storage of {numel!r} elements")
            width = _STORAGE_BYTES.get(getattr(storage_type, "__name__", ""), 16)
            self.claimed[key] = max(self.claimed.get(key, 0), numel * width)
        return _Stub()


def _claimed_storage_bytes(pickled) -> int:
    """The bytes the storages of one torch pickle (a file object at its start) claim, all together."""
    scan = _StorageScan(pickled)
    scan.load()
    return sum(scan.claimed.values())


def check_torch_file_sizes(path: Path) -> None:
    """Every size a torch file declares fits in the file, before torch allocates anything from them.

    A zip checkpoint's entries must be stored, not compressed (torch.save never compresses; a small
    compressed entry can unpack to gigabytes), and lie within the file; in either format, the storages
    the pickle declares may not add up to more bytes than the file holds. (Tensor views on those
    storages are checked in ``check_tensors``.)"""
    size = path.stat().st_size
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                entries = archive.infolist()
                if len(entries) > MAX_ZIP_ENTRIES:
                    raise CheckpointError(f"{path}: a zip of {len(entries):,} entries is not a checkpoint")
                packed = [e.filename for e in entries if e.compress_type != zipfile.ZIP_STORED]
                if packed:
                    raise CheckpointError(
                        f"{path}: compressed entries ({', '.join(packed[:3])}): torch.save writes none, and "
                        "their unpacked size is not bounded by the file's; refused"
                    )
                outside = [
                    e.filename
                    for e in entries
                    if e.file_size != e.compress_size or e.header_offset + e.file_size > size
                ]
                if outside or sum(e.file_size for e in entries) > size:
                    raise CheckpointError(f"{path}: zip entries claim more bytes than the file holds")
                pickles = [
                    e.filename
                    for e in entries
                    if e.filename.endswith("/data.pkl") or e.filename == "data.pkl"
                ]
                if len(pickles) != 1:
                    raise CheckpointError(
                        f"{path}: a zip without exactly one data.pkl is not a torch checkpoint"
                    )
                with archive.open(pickles[0]) as f:
                    claimed = _claimed_storage_bytes(f)
        else:  # the legacy format: magic number, protocol, system info, then the object's pickle
            with open(path, "rb") as f:
                for _ in range(3):
                    _StorageScan(f).load()
                claimed = _claimed_storage_bytes(f)
    except CheckpointError as e:
        message = str(e)
        raise CheckpointError(message if message.startswith(str(path)) else f"{path}: {message}") from None
    except Exception as e:  # not readable without running it: torch.load must not try either
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{path}: cannot read it as a checkpoint ({type(e).__name__}: {first})"
        ) from None
    if claimed > size:
        raise CheckpointError(
            f"{path}: its tensors claim {claimed:,} bytes but the file holds {size:,} (crafted or corrupt)"
        )


def safe_torch_load(path: str | os.PathLike, map_location="cpu", mmap: bool = False):
    """``torch.load`` with ``weights_only=True``; a file that needs arbitrary unpickling is refused.

    The one class allowed beyond plain data is ``argparse.Namespace`` (NVIDIA's ``{'sd', 'args'}``
    files): it only holds attribute values, themselves still restricted to plain data.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a regular file")
    with open(path, "rb") as f:
        head = f.read(4)
    # a zip archive (torch.save), or a pickle's PROTO opcode (the legacy torch format)
    if not (head.startswith((b"PK\x03\x04", b"PK\x05\x06")) or head[:1] == b"\x80"):
        raise CheckpointError(
            f"{path}: not a checkpoint (neither a torch file, a safetensors file nor an OpenAI shard folder)"
        )
    check_torch_file_sizes(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:  # weights_only stopped it; whatever it holds never ran
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        code = next((line for line in lines if "global" in line.lower()), None)
        if code is None:  # an opcode the restricted unpickler does not know: corrupt, not code
            reason = next((line for line in lines if "Unsupported" in line), lines[0])
            raise CheckpointError(
                f"{path}: cannot read it as a checkpoint (corrupt pickle: {reason})"
            ) from None
        raise CheckpointError(
            f"{path}: refused to load: it is not a plain weights file (weights_only=True rejected it: "
            f"{code}). Files that need full unpickling can run code and are never loaded."
        ) from None
    except Exception as e:  # truncated, corrupt, or not a torch file at all
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: cannot read it as a checkpoint ({first})") from None


def is_own_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a checkpoint of this suite (written by ``save_checkpoint``), told by its
    content, not its name, and without reading its tensors (a torch file is memory-mapped)."""
    path = Path(path)
    try:
        if not path.is_file():
            return False
        if is_safetensors_file(path):
            with safetensors.safe_open(str(path), framework="pt", device="cpu") as f:
                return (f.metadata() or {}).get("format") == FORMAT_NAME
        obj = safe_torch_load(path, mmap=True)  # torch.save writes zip files: mmap needs one
    except (CheckpointError, OSError, safetensors.SafetensorError):
        return False
    return isinstance(obj, dict) and obj.get("format") == FORMAT_NAME


def read_native(obj, source: str) -> RawCheckpoint | None:
    """The parts of a native checkpoint dict (``torch.load``-ed or from safetensors); None when ``obj``
    is not one."""
    if not (isinstance(obj, dict) and obj.get("format") == FORMAT_NAME):
        return None
    if "model" not in obj:
        raise CheckpointError(f"{source}: a {FORMAT_NAME} checkpoint without its 'model' weights")
    return RawCheckpoint(
        source,
        FORMAT_NAME,
        obj.get("config"),
        obj["model"],
        obj.get("classifier"),
        check_train_state(obj.get("train_state"), source),
        obj.get("extra") or {},
    )


def read_checkpoint_file(path: str | os.PathLike | None) -> RawCheckpoint:
    """Detect the format of ``path`` (or of the file an alias stands for) and read it: its parts are as
    stored (nothing is built yet), and every tensor in them owns its elements (``check_views``)."""
    if path is not None and not str(path):
        raise CheckpointError("an empty checkpoint path was given")
    raw = _read_checkpoint_file(resolve_model_path(path))
    for part in ("tensors", "classifier", "train_state"):
        check_views(getattr(raw, part), raw.source, "" if part == "tensors" else part)
    return raw


def _read_checkpoint_file(path: Path) -> RawCheckpoint:
    if path.is_dir():
        return read_openai(path)
    obj = read_safetensors(path) if path.is_file() and is_safetensors_file(path) else safe_torch_load(path)
    raw = read_native(obj, str(path))
    if raw is not None:
        return raw
    nvidia = nvidia_flat_state(obj)
    if nvidia is None:
        raise CheckpointError(
            f"{path}: not a checkpoint this suite knows (a sentiment-discovery checkpoint, an NVIDIA 2018 "
            "state dict with encoder/decoder keys, or a directory of OpenAI .npy shards)"
        )
    return nvidia_weights(nvidia, str(path))


TRAIN_STATE_COUNTS = ("step", "total_steps", "epoch", "batch", "rows", "batches_per_epoch", "bytes_seen")
TRAIN_STATE_KEYS = (*TRAIN_STATE_COUNTS, "best_val_bpc", "optimizer", "scheduler", "hidden", "rng")


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_rng(rng, source: str, name: str) -> None:
    """A generator state as ``torch.get_rng_state`` gives it (``torch.set_rng_state`` takes no other)."""
    reference = torch.get_rng_state()
    generator = rng.get("torch") if isinstance(rng, dict) else None
    if not (
        isinstance(generator, torch.Tensor)
        and generator.dtype == reference.dtype
        and tuple(generator.shape) == tuple(reference.shape)
    ):
        raise CheckpointError(
            f"{source}: train_state {name} lacks the torch generator state (a uint8 tensor of "
            f"{reference.numel()} bytes)"
        )


def _check_optimizer(optimizer, model: RNNModel, source: str) -> None:
    """An optimizer state dict of ``model``: its groups name each parameter once, and every per-parameter
    tensor (Adam's moments ...) has the shape of its parameter."""
    bad = f"{source}: train_state optimizer"
    if not (isinstance(optimizer, dict) and {"state", "param_groups"} <= set(optimizer)):
        raise CheckpointError(f"{bad} is not an optimizer state dict")
    groups, per_param = optimizer["param_groups"], optimizer["state"]
    if not (isinstance(groups, list) and groups and all(isinstance(g, dict) for g in groups)):
        raise CheckpointError(f"{bad} param_groups is not a list of groups")
    if not isinstance(per_param, dict):
        raise CheckpointError(f"{bad} state is not a dict")
    shapes = [tuple(p.shape) for p in model.parameters()]
    ids = [i for g in groups for i in (g.get("params") if isinstance(g.get("params"), list) else [None])]
    if not all(type(i) is int for i in ids) or sorted(ids) != list(range(len(shapes))):
        raise CheckpointError(f"{bad} does not list the model's {len(shapes)} parameters once each")
    if not all(_finite(g.get("lr")) and g["lr"] >= 0 for g in groups):
        raise CheckpointError(f"{bad} has a group without a finite learning rate 'lr'")
    for key, values in per_param.items():
        if key not in range(len(shapes)) or not isinstance(values, dict):
            raise CheckpointError(f"{bad} state has an entry {key!r} that is no parameter's")
        for name, value in values.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) != shapes[key]:
                raise CheckpointError(
                    f"{bad} state {key}.{name} has shape {tuple(value.shape)}, its parameter {shapes[key]}"
                )


def check_train_state(state, source: str, model: RNNModel | None = None) -> dict | None:
    """A stored training state holds every part a resume needs, of the right kinds and, given the
    ``model`` built from the same file, the right shapes: a resume never fails halfway with a traceback."""
    if state is None:
        return None
    if not isinstance(state, dict):
        raise CheckpointError(f"{source}: train_state is {type(state).__name__}, expected a dict")
    missing = [k for k in TRAIN_STATE_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{source}: train_state lacks {', '.join(missing)}: it cannot resume a run")
    for key in TRAIN_STATE_COUNTS:
        if not isinstance(state[key], int) or isinstance(state[key], bool) or state[key] < 0:
            raise CheckpointError(f"{source}: train_state {key} = {state[key]!r} is not a count")
    best = state["best_val_bpc"]
    if not (_finite(best) or best == math.inf):
        raise CheckpointError(f"{source}: train_state best_val_bpc = {best!r} is not a number")
    if model is not None:
        _check_optimizer(state["optimizer"], model, source)
    elif not (isinstance(state["optimizer"], dict) and {"state", "param_groups"} <= set(state["optimizer"])):
        raise CheckpointError(f"{source}: train_state optimizer is not an optimizer state dict")
    scheduler = state["scheduler"]
    if not (
        isinstance(scheduler, dict)
        and isinstance(scheduler.get("lr_lambdas"), list)
        and isinstance(scheduler.get("base_lrs"), list)
        and all(_finite(lr) for lr in scheduler["base_lrs"])
        and isinstance(scheduler.get("last_epoch"), int)
    ):
        raise CheckpointError(
            f"{source}: train_state scheduler is not the linear decay's state dict (lr_lambdas, base_lrs, "
            "last_epoch)"
        )
    for key in ("finished", "val_pending"):  # absent in checkpoints of earlier versions
        if key in state and not isinstance(state[key], bool):
            raise CheckpointError(f"{source}: train_state {key} = {state[key]!r} is not a bool")
    if state.get("scaler") is not None and not isinstance(state["scaler"], dict):
        raise CheckpointError(f"{source}: train_state scaler is not a GradScaler state dict")
    hidden = state["hidden"]
    if hidden is not None and not (
        isinstance(hidden, (list, tuple))
        and len(hidden) == 2
        and all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in hidden)
    ):
        raise CheckpointError(f"{source}: train_state hidden is not a (hidden, cell) pair of tensors")
    if hidden is not None and model is not None:
        want = (model.config.nlayers, state["rows"], model.config.nhid)
        if any(tuple(t.shape) != want for t in hidden):
            shapes = ", ".join(str(tuple(t.shape)) for t in hidden)
            raise CheckpointError(f"{source}: train_state hidden has shapes {shapes}, expected {want} each")
    _check_rng(state["rng"], source, "rng")
    rank_rng = state.get("rank_rng")
    if rank_rng is not None:
        if not isinstance(rank_rng, list):
            raise CheckpointError(f"{source}: train_state rank_rng is not a list of generator states")
        for i, rng in enumerate(rank_rng):
            _check_rng(rng, source, f"rank_rng[{i}]")
    interval = state.get("interval")
    if interval is not None and not (
        isinstance(interval, dict) and all(_finite(interval.get(k, 0)) for k in ("nats", "bytes", "steps"))
    ):
        raise CheckpointError(f"{source}: train_state interval is not a dict of finite numbers")
    return state


def _dense(t: torch.Tensor) -> bool:
    """``t`` owns its elements: no stride repeats one (stride 0) or overlaps another, and they all lie
    in its storage. Only then does its shape say how many bytes it stands for."""
    dims = sorted((stride, size) for stride, size in zip(t.stride(), t.shape) if size > 1)
    span = 1
    for stride, size in dims:
        if stride < span:
            return False
        span = stride * size
    last = t.storage_offset() + sum((size - 1) * stride for stride, size in dims)
    return t.numel() == 0 or (last + 1) * t.element_size() <= t.untyped_storage().nbytes()


def check_views(obj, source: str, where: str = "") -> None:
    """Every tensor anywhere in ``obj`` (weights, classifier, training state) owns its elements: a file
    whose tiny storage a stride-0 view spreads over a huge shape is refused before anything copies it."""
    if isinstance(obj, torch.Tensor):
        if not _dense(obj):
            raise CheckpointError(
                f"{source}: tensor {where or '?'} of shape {tuple(obj.shape)} repeats or overlaps its "
                f"elements (strides {obj.stride()}): not a saved tensor, a crafted file"
            )
    elif isinstance(obj, dict):
        for key, value in obj.items():
            check_views(value, source, f"{where}.{key}" if where else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            check_views(value, source, f"{where}[{i}]")
