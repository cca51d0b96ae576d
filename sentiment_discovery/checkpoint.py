"""Checkpoints: one file that rebuilds the model, written atomically, loaded without unpickling code.

Native layout (a plain dict; every value is a tensor, number, string, list, dict or None, so
``torch.load(weights_only=True)`` reads it)::

    {"format": "sentiment-discovery", "version": 1,
     "config": ModelConfig as a dict (architecture + preprocessing),
     "model": RNNModel.state_dict(),
     "classifier": None | dict (transfer.py: weight, bias, neurons, pooling, state, scaling ...),
     "train_state": None | dict (optimizer, scaler, schedule, data position, RNG ...),
     "extra": dict (e.g. ``default_neuron`` of an imported release)}

The same content may be a ``.safetensors`` file (weights only, no ``train_state``): tensors
``model.<key>`` and ``classifier.<key>``, the rest as JSON in the safetensors metadata.
``load_checkpoint`` also reads the released formats (formats.py); the format is detected, not flagged.

Loading flows one way: a reader (``read_native`` here, formats.py for the released formats) returns
a ``RawCheckpoint`` (config, tensors, the rest as stored); ``build_checkpoint`` checks the config
against limits and against the shapes of the tensors in the file, then the classifier and the
training state, and only then allocates the model. A crafted file therefore never sizes an
allocation, and every malformed file is one ``CheckpointError`` line naming it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from . import formats
from .featurize import STATES, num_features, parse_pooling
from .formats import CheckpointError, RawCheckpoint
from .model import ModelConfig, RNNModel
from .preprocess import PREPROCESSORS
from .recurrent import RNN_TYPES

__all__ = ["Checkpoint", "CheckpointError", "load_checkpoint", "save_checkpoint"]

FORMAT_NAME = "sentiment-discovery"
# --save_dtype: how a checkpoint stores the model's floating weights (loading makes them float32 again)
SAVE_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
FORMAT_VERSION = 1

# The model that ships with the package (pretrained/README.md: how it was made, what it scores).
DEFAULT_MODEL = Path(__file__).resolve().parent / "pretrained" / "mlstm1024_imdb_sst.safetensors"
# where `python data/download.py openai` writes OpenAI's converted weights, under its --root (data/)
OPENAI_MODEL = Path("openai", "mlstm_openai.safetensors")
# Bounds on a config read from a file, checked before anything is built from it. The released models
# have 4096 units; 64k x 64k recurrent matrices would already be 16 GB each.
MAX_UNITS = 1 << 16
MAX_LAYERS = 64
MAX_CLASSES = 1 << 12  # classes of a stored softmax head


@dataclass
class Checkpoint:
    model: RNNModel
    classifier: dict | None = None
    train_state: dict | None = None
    source_format: str = FORMAT_NAME
    extra: dict = field(default_factory=dict)

    @property
    def config(self) -> ModelConfig:
        return self.model.config


def _temp_affixes(path: Path) -> tuple[str, str]:
    """Prefix and suffix of the temporary files that writes of ``path`` use (``.<name>.*.tmp``)."""
    return f".{path.name}.", ".tmp"


def stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Temporary files of writes of ``path`` (its name may be a glob) that exist: a killed write's."""
    path = Path(path)
    prefix, suffix = _temp_affixes(path)
    return list(path.parent.glob(f"{prefix}*{suffix}"))


def _atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """``write`` a temporary file beside ``path``, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = _temp_affixes(path)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it owner-only; a checkpoint is an ordinary file
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def copy_checkpoint(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """``target`` becomes a copy of the written checkpoint ``source``: a hard link where the file
    system allows one (checkpoints are only ever replaced by rename, so the link keeps its bytes),
    else an atomic copy."""
    Path(target).unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        _atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))


def atomic_save(obj, path: str | os.PathLike) -> None:
    """torch.save to a temporary file beside ``path``, then rename: never a half-written file."""
    _atomic_write(path, lambda tmp: torch.save(obj, tmp))


def checkpoint_dict(
    model: RNNModel,
    classifier: dict | None = None,
    train_state: dict | None = None,
    extra: dict | None = None,
    dtype: torch.dtype | None = None,
) -> dict:
    """The native dict; ``dtype`` (float16, bfloat16) stores the model's floating tensors in it, about
    half the bytes (loading makes them float32). Classifier and training state stay as they are."""
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if dtype is not None:
        weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "model": weights,
        "classifier": classifier,
        "train_state": train_state,
        "extra": dict(extra or {}),
    }


def save_checkpoint(
    path: str | os.PathLike,
    model: RNNModel,
    classifier: dict | None = None,
    train_state: dict | None = None,
    extra: dict | None = None,
    *,
    dtype: torch.dtype | None = None,
    safetensors_file: bool | None = None,
) -> None:
    """Write a native checkpoint, its weights in ``dtype`` if given (float16/bfloat16: about half the
    bytes); as safetensors when ``safetensors_file`` (default: for a ``.safetensors`` path), which holds
    no ``train_state``."""
    ckpt = checkpoint_dict(model, classifier, train_state, extra, dtype)
    if safetensors_file is None:
        safetensors_file = Path(path).suffix == ".safetensors"
    if not safetensors_file:
        atomic_save(ckpt, path)
    elif train_state is not None:
        raise ValueError(f"{path}: a safetensors checkpoint holds weights only; save training state as .pt")
    else:
        _save_safetensors(path, ckpt)


def _save_safetensors(path: str | os.PathLike, ckpt: dict) -> None:
    tensors = {f"model.{k}": v.clone() for k, v in ckpt["model"].items()}  # clone: tied weights share memory
    classifier = ckpt["classifier"]
    if classifier is not None:
        for key, value in classifier.items():
            if isinstance(value, torch.Tensor):
                tensors[f"classifier.{key}"] = value.detach().cpu().clone()
        classifier = {k: v for k, v in classifier.items() if not isinstance(v, torch.Tensor)}
    metadata = {
        "format": FORMAT_NAME,
        "version": str(FORMAT_VERSION),
        "config": json.dumps(ckpt["config"]),
        "classifier": json.dumps(classifier),
        "extra": json.dumps(ckpt["extra"]),
    }
    _atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=metadata))


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


def safe_torch_load(path: str | os.PathLike, map_location="cpu"):
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
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
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
        obj.get("train_state"),
        obj.get("extra") or {},
    )


def read_checkpoint_file(path: str | os.PathLike | None) -> RawCheckpoint:
    """Detect the format of ``path`` (or of the file an alias stands for) and read it (nothing is
    checked or built yet)."""
    if path is not None and not str(path):
        raise CheckpointError("an empty checkpoint path was given")
    path = resolve_model_path(path)
    if path.is_dir():
        return formats.read_openai(path)
    obj = read_safetensors(path) if path.is_file() and is_safetensors_file(path) else safe_torch_load(path)
    raw = read_native(obj, str(path))
    if raw is not None:
        return raw
    nvidia = formats.nvidia_flat_state(obj)
    if nvidia is None:
        raise CheckpointError(
            f"{path}: not a checkpoint this suite knows (a sentiment-discovery checkpoint, an NVIDIA 2018 "
            "state dict with encoder/decoder keys, or a directory of OpenAI .npy shards)"
        )
    return formats.nvidia_weights(nvidia, str(path))


# --------------------------------------------------------------------------------------------
# Checks: everything read from a file, before the model is built
# --------------------------------------------------------------------------------------------

_CONFIG_TYPES = {  # ModelConfig field -> accepted types (bool is an int to Python: refused for numbers)
    "model": (str,),
    "emsize": (int,),
    "nhid": (int,),
    "nlayers": (int,),
    "dropout": (int, float),
    "tied": (bool,),
    "weight_norm": (bool,),
    "ntoken": (int,),
    "preprocess": (str,),
}


def check_config(config, source: str) -> ModelConfig:
    """The ModelConfig of a stored config dict, its values within type and limits (nothing allocated)."""
    if not isinstance(config, dict):
        raise CheckpointError(
            f"{source}: config is {type(config).__name__}, expected the model's settings dict"
        )
    for key, types in _CONFIG_TYPES.items():
        value = config.get(key)
        if key in config and (
            not isinstance(value, types) or (bool not in types and isinstance(value, bool))
        ):
            expected = " or ".join(t.__name__ for t in types)
            raise CheckpointError(f"{source}: config {key} = {value!r} is not a {expected}")
    cfg = ModelConfig.from_dict(config)
    limits = [
        ("emsize", 1, MAX_UNITS),
        ("nhid", 1, MAX_UNITS),
        ("nlayers", 1, MAX_LAYERS),
        ("ntoken", 256, 256),
    ]
    for key, low, high in limits:
        value = getattr(cfg, key)
        if not low <= value <= high:
            raise CheckpointError(f"{source}: config {key} = {value} is outside {low} .. {high}")
    if not (math.isfinite(cfg.dropout) and 0 <= cfg.dropout < 1):
        raise CheckpointError(f"{source}: config dropout = {cfg.dropout} is outside [0, 1)")
    if cfg.model not in RNN_TYPES:
        raise CheckpointError(f"{source}: config model = {cfg.model!r} is not one of {', '.join(RNN_TYPES)}")
    if cfg.preprocess not in PREPROCESSORS:
        raise CheckpointError(
            f"{source}: config preprocess = {cfg.preprocess!r} is not one of {sorted(PREPROCESSORS)}"
        )
    if cfg.tied and cfg.nhid != cfg.emsize:
        raise CheckpointError(
            f"{source}: config tied needs nhid == emsize (nhid {cfg.nhid}, emsize {cfg.emsize})"
        )
    return cfg


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """State-dict shapes of the model of ``config``, built on the meta device (no memory)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in RNNModel(config).state_dict().items()}


def check_tensors(config: ModelConfig, tensors, source: str, file_keys: dict[str, str] | None = None) -> None:
    """The stored weights are tensors of exactly the shapes ``config`` implies, key by key (reported by
    the file's own key names where ``file_keys`` maps ours to them)."""
    if not isinstance(tensors, dict):
        raise CheckpointError(f"{source}: the model weights are {type(tensors).__name__}, expected a dict")
    not_tensors = [f"{k} ({type(v).__name__})" for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(f"{source}: model weights that are not tensors: {', '.join(not_tensors[:5])}")
    file_keys = file_keys or {}
    own = expected_shapes(config)
    missing = [k for k in own if k not in tensors]
    unexpected = [str(k) for k in tensors if k not in own]
    wrong = [
        f"{file_keys.get(k, k)}: file {tuple(tensors[k].shape)} vs model {own[k]}"
        for k in own
        if k in tensors and tuple(tensors[k].shape) != own[k]
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append("missing keys: " + ", ".join(missing))
        if unexpected:
            parts.append("unexpected keys: " + ", ".join(unexpected))
        if wrong:
            parts.append("wrong shapes: " + "; ".join(wrong))
        raise CheckpointError(
            f"{source}: weights do not fit the {config.model} architecture ({' | '.join(parts)})"
        )


def _numbers(value, name: str, source: str, size: int | None = None) -> torch.Tensor:
    """A stored numeric array (tensor or list) as a float tensor of ``size`` values."""
    try:
        tensor = value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise CheckpointError(
            f"{source}: classifier {name} is {type(value).__name__}, expected numbers"
        ) from None
    if not (tensor.dtype.is_floating_point or tensor.dtype in (torch.int64, torch.int32)):
        raise CheckpointError(f"{source}: classifier {name} holds {tensor.dtype}, expected numbers")
    if size is not None and tensor.numel() != size:
        raise CheckpointError(f"{source}: classifier {name} has {tensor.numel()} values, expected {size}")
    return tensor


def check_classifier(classifier, config: ModelConfig, source: str) -> dict | None:
    """A stored classifier dict checked against the model (features per layer, neuron indices, settings);
    ``neurons`` filled in (largest |weight| first) where it is absent."""
    if classifier is None:
        return None
    if not isinstance(classifier, dict):
        raise CheckpointError(f"{source}: classifier is {type(classifier).__name__}, expected a dict")
    if "weight" not in classifier or "bias" not in classifier:
        absent = [k for k in ("weight", "bias") if k not in classifier]
        raise CheckpointError(f"{source}: classifier lacks {' and '.join(absent)}")
    classifier = dict(classifier)
    pooling, state = classifier.get("pooling"), classifier.get("state")
    pooling = pooling if pooling is not None else "last"
    try:
        parse_pooling(pooling)
    except ValueError as e:
        raise CheckpointError(f"{source}: classifier {e}") from None
    if state is not None and state not in STATES:
        raise CheckpointError(f"{source}: classifier state = {state!r} is not one of {', '.join(STATES)}")
    all_layers = classifier.get("all_layers")
    if all_layers is not None and not isinstance(all_layers, bool):
        raise CheckpointError(f"{source}: classifier all_layers = {all_layers!r} is not a bool")
    features = num_features(config, bool(all_layers), pooling)
    classes = classifier.get("classes")
    if classes is not None and not (isinstance(classes, list) and 2 <= len(classes) <= MAX_CLASSES):
        raise CheckpointError(f"{source}: classifier classes must be a list of 2 .. {MAX_CLASSES} names")
    if classes is not None and len(classes) > 2:  # a K-way softmax head (finetune.py): weight [K, F]
        k = len(classes)
        weight = _numbers(classifier["weight"], "weight", source, k * features).float().reshape(k, features)
        classifier["weight"] = weight
        classifier["bias"] = _numbers(classifier["bias"], "bias", source, k).float().reshape(k)
        weight = weight.abs().amax(dim=0)  # neurons: the features any class leans on most
    else:
        weight = _numbers(classifier["weight"], "weight", source, features).float().reshape(-1)
        classifier["weight"] = weight
        classifier["bias"] = _numbers(classifier["bias"], "bias", source, 1).float().reshape(())
    for key in ("mean", "scale"):
        if classifier.get(key) is not None:
            classifier[key] = _numbers(classifier[key], key, source, features).float().reshape(-1)
    neurons = classifier.get("neurons")
    if neurons is None:
        neurons = torch.argsort(weight.abs(), descending=True, stable=True)
    neurons = _numbers(neurons, "neurons", source)
    if neurons.dtype.is_floating_point or neurons.dim() > 1:
        raise CheckpointError(f"{source}: classifier neurons must be a list of feature indices")
    neurons = neurons.long().reshape(-1)
    if neurons.numel() and not 0 <= int(neurons.min()) <= int(neurons.max()) < features:
        raise CheckpointError(f"{source}: classifier neurons has indices outside 0 .. {features - 1}")
    classifier["neurons"] = neurons
    return classifier


TRAIN_STATE_COUNTS = ("step", "total_steps", "epoch", "batch", "rows", "batches_per_epoch", "bytes_seen")
TRAIN_STATE_KEYS = (*TRAIN_STATE_COUNTS, "best_val_bpc", "optimizer", "scheduler", "hidden", "rng")


def check_train_state(state, source: str) -> dict | None:
    """A stored training state holds every part a resume needs, of the right kinds."""
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
    if not isinstance(state["best_val_bpc"], (int, float)):
        raise CheckpointError(
            f"{source}: train_state best_val_bpc = {state['best_val_bpc']!r} is not a number"
        )
    optimizer = state["optimizer"]
    if not (isinstance(optimizer, dict) and {"state", "param_groups"} <= set(optimizer)):
        raise CheckpointError(f"{source}: train_state optimizer is not an optimizer state dict")
    if not isinstance(state["scheduler"], dict):
        raise CheckpointError(f"{source}: train_state scheduler is not a scheduler state dict")
    hidden = state["hidden"]
    if hidden is not None and not (
        isinstance(hidden, (list, tuple))
        and len(hidden) == 2
        and all(isinstance(t, torch.Tensor) for t in hidden)
    ):
        raise CheckpointError(f"{source}: train_state hidden is not a (hidden, cell) pair of tensors")
    if not (isinstance(state["rng"], dict) and isinstance(state["rng"].get("torch"), torch.Tensor)):
        raise CheckpointError(f"{source}: train_state rng lacks the torch generator state")
    return state


def build_checkpoint(raw: RawCheckpoint) -> Checkpoint:
    """Check everything ``raw`` holds, then build its model (allocation bounded by the file's tensors)."""
    config = check_config(raw.config, raw.source)
    check_tensors(config, raw.tensors, raw.source, raw.file_keys)
    classifier = check_classifier(raw.classifier, config, raw.source)
    train_state = check_train_state(raw.train_state, raw.source)
    extra = raw.extra if isinstance(raw.extra, dict) else {}
    neuron = extra.get("default_neuron")
    if neuron is not None and not (isinstance(neuron, int) and 0 <= neuron < config.nhid * config.nlayers):
        raise CheckpointError(f"{raw.source}: extra default_neuron = {neuron!r} is not a unit of the model")
    model = RNNModel(config)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in raw.tensors.items()})
    return Checkpoint(model, classifier, train_state, raw.source_format, extra)


# Names a user may give instead of a path: the file each stands for, and how to get it. Downloads go
# relative to the working directory, as the scripts' data defaults (the repository root).
MODEL_ALIASES = {
    "default": (DEFAULT_MODEL, "pip install . (the shipped model is package data)"),
    "openai": (Path("data") / OPENAI_MODEL, "python data/download.py openai"),
}


def first_existing_model(*candidates: str) -> str:
    """The first of the scripts' conventional outputs that exists (a user's own model wins), else
    ``default``, the shipped model."""
    return next((path for path in candidates if Path(path).exists()), "default")


def resolve_model_path(path: str | os.PathLike | None) -> Path:
    """``path`` itself, or for an alias (``default``, ``openai``) with no file of that name, the file it
    stands for. None is ``default``, the shipped model."""
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


def load_checkpoint(path: str | os.PathLike | None) -> Checkpoint:
    """Load any supported checkpoint, its format detected: a native ``.pt`` or ``.safetensors`` file,
    an NVIDIA 2018 state dict, or a directory of OpenAI ``.npy`` shards (formats.py); or an alias of
    ``MODEL_ALIASES`` (``default``, ``openai``); None is the shipped default model."""
    return build_checkpoint(read_checkpoint_file(path))
