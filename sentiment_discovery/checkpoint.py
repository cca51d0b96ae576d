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
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from .model import ModelConfig, RNNModel

FORMAT_NAME = "sentiment-discovery"
FORMAT_VERSION = 1

# The model that ships with the package (pretrained/README.md: how it was made, what it scores).
DEFAULT_MODEL = Path(__file__).resolve().parent / "pretrained" / "mlstm1024_imdb_sst.safetensors"
MODEL_ALIASES = {"default": DEFAULT_MODEL}


def first_existing_model(*candidates: str) -> str:
    """The first of the scripts' conventional outputs that exists (a user's own model wins), else
    ``default``, the shipped model."""
    return next((path for path in candidates if Path(path).exists()), "default")


def resolve_model_path(path: str | os.PathLike | None) -> Path:
    """A checkpoint path, or an alias of a known model (``default``: the shipped one); None: the default."""
    if path is None or str(path) in MODEL_ALIASES:
        return MODEL_ALIASES[str(path) if path is not None else "default"]
    return Path(path)


class CheckpointError(Exception):
    """A checkpoint that cannot be read or does not fit its architecture."""


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


def _atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """``write`` a temporary file beside ``path``, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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


def atomic_save(obj, path: str | os.PathLike) -> None:
    """torch.save to a temporary file beside ``path``, then rename: never a half-written file."""
    _atomic_write(path, lambda tmp: torch.save(obj, tmp))


def checkpoint_dict(
    model: RNNModel,
    classifier: dict | None = None,
    train_state: dict | None = None,
    extra: dict | None = None,
    half: bool = False,
) -> dict:
    """The native dict; ``half`` stores the model's floating tensors as float16 (loading upcasts)."""
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if half:
        weights = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
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
    half: bool = False,
    safetensors_file: bool | None = None,
) -> None:
    """Write a native checkpoint; as safetensors when ``safetensors_file`` (default: for a
    ``.safetensors`` path), which holds no ``train_state``."""
    ckpt = checkpoint_dict(model, classifier, train_state, extra, half)
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
        if classifier is not None:
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
    except (safetensors.SafetensorError, KeyError, json.JSONDecodeError) as e:
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
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only rejected a class or call; the payload never ran
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        reason = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0])
        raise CheckpointError(
            f"{path}: refused to load: it is not a plain weights file (weights_only=True rejected it: "
            f"{reason}). Files that need full unpickling can run code and are never loaded."
        ) from None
    except Exception as e:  # truncated, corrupt, or not a torch file at all
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: cannot read it as a checkpoint ({first})") from None


def model_from_state(
    config: ModelConfig, state_dict: dict, source: str, file_keys: dict[str, str] | None = None
) -> RNNModel:
    """Build the model of ``config`` and load ``state_dict``, reporting mismatches by key
    (by the file's own key names where ``file_keys`` maps our keys to them)."""
    file_keys = file_keys or {}
    model = RNNModel(config)
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [
        f"{file_keys.get(k, k)}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
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
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()})
    return model


def load_checkpoint(path: str | os.PathLike | None) -> Checkpoint:
    """Load any supported checkpoint, its format detected: a native ``.pt`` or ``.safetensors`` file,
    an NVIDIA 2018 state dict, or a directory of OpenAI ``.npy`` shards (formats.py). ``path`` may be
    an alias (``default``) or None (the shipped default model)."""
    from . import formats  # formats builds on this module

    path = resolve_model_path(path)
    if path.is_dir():
        return formats.load_openai_shards(path)
    if path.is_file() and is_safetensors_file(path):
        obj = read_safetensors(path)
    else:
        obj = safe_torch_load(path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT_NAME:
        config = ModelConfig.from_dict(obj["config"])
        model = model_from_state(config, obj["model"], str(path))
        extra = obj.get("extra") or {}
        return Checkpoint(model, obj.get("classifier"), obj.get("train_state"), FORMAT_NAME, extra)
    nvidia = formats.nvidia_flat_state(obj)
    if nvidia is None:
        raise CheckpointError(
            f"{path}: not a checkpoint this suite knows (a sentiment-discovery checkpoint, an NVIDIA 2018 "
            "state dict with encoder/decoder keys, or a directory of OpenAI .npy shards)"
        )
    return formats.nvidia_checkpoint(nvidia, str(path))
