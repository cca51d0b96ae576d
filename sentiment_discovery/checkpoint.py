"""Checkpoints: one file that rebuilds the model, written atomically, loaded without unpickling code.

Native layout (a plain dict; every value is a tensor, number, string, list, dict or None, so
``torch.load(weights_only=True)`` reads it)::

    {"format": "sentiment-discovery", "version": 1,
     "config": ModelConfig as a dict (architecture + preprocessing),
     "model": RNNModel.state_dict(),
     "classifier": None | Readout.to_dict() (readout.py: weight, bias, neurons, pooling, state, scaling ...),
     "train_state": None | dict (optimizer, scaler, schedule, data position, RNG ...),
     "extra": dict (e.g. ``default_neuron`` of an imported release)}

The same content may be a ``.safetensors`` file (weights only, no ``train_state``): tensors
``model.<key>`` and ``classifier.<key>``, the rest as JSON in the safetensors metadata.
``load_checkpoint`` also reads the released formats (docs/formats.md); the format is detected, not
flagged.

Loading flows one way: formats.py reads the file (ours or a release) into a ``RawCheckpoint``
(config, tensors, the rest as stored; a training state checked there); ``build_checkpoint`` builds
the model (``RNNModel.from_state``: the config against limits and the tensors' shapes against the
config, before anything is allocated) and checks the classifier against it (``Readout.from_dict``).
A crafted file therefore never sizes an allocation, and every malformed file is one
``CheckpointError`` line naming it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from .errors import CheckpointError, UsageError
from .formats import (
    FORMAT_NAME,
    FORMAT_VERSION,
    RawCheckpoint,
    check_train_state,
    is_own_checkpoint,
    read_checkpoint_file,
)
from .model import ModelConfig, RNNModel
from .readout import Readout
from .safe_io import atomic_write, refuse_symlink, temp_affixes

__all__ = ["Checkpoint", "CheckpointError", "load_checkpoint", "save_checkpoint"]

# --save_dtype: how a checkpoint stores the model's floating weights (loading makes them float32 again)
SAVE_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}



@dataclass
class Checkpoint:
    model: RNNModel
    classifier: Readout | None = None
    train_state: dict | None = None
    source_format: str = FORMAT_NAME
    extra: dict = field(default_factory=dict)
    source: str = ""  # the file (or OpenAI shard folder) it was read from, aliases resolved

    @property
    def config(self) -> ModelConfig:
        return self.model.config


def stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Temporary files of writes of ``path`` (its name may be a glob) that exist: a killed write's."""
    path = Path(path)
    prefix, suffix = temp_affixes(path)
    return list(path.parent.glob(f"{prefix}*{suffix}"))


def check_replaceable(path: str | os.PathLike, flag: str) -> None:
    """An output checkpoint ``path`` (given by ``flag``) is a new path or a checkpoint of this suite
    (by content): never a data file or anything else a run would destroy; a ``UsageError`` otherwise."""
    path = Path(path)
    refuse_symlink(path)
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a directory, expected a checkpoint file path")
    if path.exists() and not is_own_checkpoint(path):
        raise UsageError(
            f"{flag} {path}: exists and is not a checkpoint of this suite; refusing to overwrite it "
            "(choose a new path, or remove the file)"
        )


def copy_checkpoint(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """``target`` becomes a copy of the written checkpoint ``source``: a hard link where the file
    system allows one (checkpoints are only ever replaced by rename, so the link keeps its bytes),
    else an atomic copy."""
    refuse_symlink(target)
    Path(target).unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))


def checkpoint_dict(
    model: RNNModel,
    classifier: Readout | dict | None = None,
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
        "classifier": classifier.to_dict() if isinstance(classifier, Readout) else classifier,
        "train_state": train_state,
        "extra": dict(extra or {}),
    }


def save_checkpoint(
    path: str | os.PathLike,
    model: RNNModel,
    classifier: Readout | dict | None = None,
    train_state: dict | None = None,
    extra: dict | None = None,
    *,
    dtype: torch.dtype | None = None,
    safetensors_file: bool | None = None,
) -> None:
    """Write a native checkpoint, its weights in ``dtype`` if given (float16/bfloat16: about half the
    bytes); as safetensors when ``safetensors_file`` (default: for a ``.safetensors`` path), which holds
    no ``train_state``. A classifier given as its stored dict is checked first (``Readout.from_dict``)."""
    if safetensors_file is None:
        safetensors_file = Path(path).suffix == ".safetensors"
    if safetensors_file and train_state is not None:
        raise UsageError(f"{path}: a safetensors checkpoint holds weights only; save training state as .pt")
    ckpt = checkpoint_dict(model, Readout.of(classifier, model.config), train_state, extra, dtype)
    if safetensors_file:
        _save_safetensors(path, ckpt)
    else:
        atomic_write(path, lambda tmp: torch.save(ckpt, tmp))


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
    atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=metadata))


def build_checkpoint(raw: RawCheckpoint) -> Checkpoint:
    """Build the model of ``raw`` (its config and the tensors' shapes checked first: allocation bounded
    by the file's tensors), then check its classifier against that model."""
    try:
        model = RNNModel.from_state(raw.config, raw.tensors, raw.file_keys)
    except UsageError as e:
        raise CheckpointError(f"{raw.source}: {e}") from None
    not_finite = [
        raw.file_keys.get(k, k)
        for k, t in raw.tensors.items()
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    if not_finite:
        names = ", ".join(not_finite[:5])
        raise CheckpointError(f"{raw.source}: weights hold NaN or infinite values: {names}")
    train_state = check_train_state(raw.train_state, raw.source, model)  # shapes against the model
    stored = raw.classifier
    classifier = None if stored is None else Readout.from_dict(stored, model.config, raw.source)
    extra = raw.extra if isinstance(raw.extra, dict) else {}
    neuron, units = extra.get("default_neuron"), model.config.nhid * model.config.nlayers
    if neuron is not None and not (isinstance(neuron, int) and 0 <= neuron < units):
        raise CheckpointError(f"{raw.source}: extra default_neuron = {neuron!r} is not a unit of the model")
    return Checkpoint(model, classifier, train_state, raw.source_format, extra, raw.source)


def load_checkpoint(path: str | os.PathLike | None) -> Checkpoint:
    """Load any supported checkpoint, its format detected: a native ``.pt`` or ``.safetensors`` file,
    an NVIDIA 2018 state dict, or a directory of OpenAI ``.npy`` shards (formats.py); or an alias of
    ``formats.MODEL_ALIASES`` (``default``, ``finetuned``, ``openai``); None is the shipped default model."""
    return build_checkpoint(read_checkpoint_file(path))
