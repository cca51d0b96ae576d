"""Checkpoints: one file that rebuilds the model, written atomically, loaded without unpickling code.

Native layout (a plain dict; every value is a tensor, number, string, list, dict or None, so
``torch.load(weights_only=True)`` reads it)::

    {"format": "sentiment-discovery", "version": 1,
     "config": ModelConfig as a dict (architecture + preprocessing),
     "model": RNNModel.state_dict(),
     "classifier": None | dict (transfer.py: weight, bias, neurons, pooling, state, scaling ...),
     "train_state": None | dict (optimizer, scaler, schedule, data position, RNG ...)}
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .model import ModelConfig, RNNModel

FORMAT_NAME = "sentiment-discovery"
FORMAT_VERSION = 1


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


def atomic_save(obj, path: str | os.PathLike) -> None:
    """torch.save to a temporary file beside ``path``, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def checkpoint_dict(
    model: RNNModel, classifier: dict | None = None, train_state: dict | None = None
) -> dict:
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "classifier": classifier,
        "train_state": train_state,
    }


def save_checkpoint(
    path: str | os.PathLike, model: RNNModel, classifier: dict | None = None, train_state: dict | None = None
) -> None:
    atomic_save(checkpoint_dict(model, classifier, train_state), path)


def safe_torch_load(path: str | os.PathLike, map_location="cpu"):
    """``torch.load`` with ``weights_only=True``; a file that needs arbitrary unpickling is refused."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # UnpicklingError and friends; the payload never ran
        raise CheckpointError(
            f"{path}: refused to load: it is not a plain weights file (weights_only=True rejected it: "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}). Files that need full unpickling "
            "can run code and are never loaded."
        ) from None


def model_from_state(config: ModelConfig, state_dict: dict, source: str) -> RNNModel:
    """Build the model of ``config`` and load ``state_dict``, reporting mismatches by key."""
    model = RNNModel(config)
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
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
        raise CheckpointError(f"{source}: weights do not fit the {config.model} architecture ({' | '.join(parts)})")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()})
    return model


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Load a native checkpoint (the format is detected; see formats.py for the released ones)."""
    path = Path(path)
    obj = safe_torch_load(path)
    if not (isinstance(obj, dict) and obj.get("format") == FORMAT_NAME):
        raise CheckpointError(f"{path}: not a sentiment-discovery checkpoint")
    config = ModelConfig.from_dict(obj["config"])
    model = model_from_state(config, obj["model"], str(path))
    return Checkpoint(model, obj.get("classifier"), obj.get("train_state"), FORMAT_NAME)
