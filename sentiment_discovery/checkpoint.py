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
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import safetensors
import safetensors.torch
import torch

from . import formats
from .featurize import STATES, num_features, parse_pooling
from .formats import CheckpointError, RawCheckpoint
from .model import MAX_LAYERS, MAX_UNITS, ModelConfig, RNNModel
from .preprocess import PREPROCESSORS
from .recurrent import RNN_TYPES
from .safe_io import atomic_write, refuse_symlink, temp_affixes

__all__ = ["Checkpoint", "CheckpointError", "load_checkpoint", "save_checkpoint"]

FORMAT_NAME = "sentiment-discovery"
# --save_dtype: how a checkpoint stores the model's floating weights (loading makes them float32 again)
SAVE_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
FORMAT_VERSION = 1

# The model that ships with the package (pretrained/README.md: how it was made, what it scores).
DEFAULT_MODEL = Path(__file__).resolve().parent / "pretrained" / "mlstm1024_imdb_sst.safetensors"
# where `python data/download.py openai` writes OpenAI's converted weights, under its --root (data/)
OPENAI_MODEL = Path("openai", "mlstm_openai.safetensors")


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


def stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Temporary files of writes of ``path`` (its name may be a glob) that exist: a killed write's."""
    path = Path(path)
    prefix, suffix = temp_affixes(path)
    return list(path.parent.glob(f"{prefix}*{suffix}"))


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


def atomic_save(obj, path: str | os.PathLike) -> None:
    """torch.save to a temporary file beside ``path``, then rename: never a half-written file."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


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
    atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=metadata))


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
    check_torch_file_sizes(path)
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
    for key in ("weight", "bias", "mean", "scale"):
        value = classifier.get(key)
        if value is not None and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{source}: classifier {key} holds NaN or infinite values")
    scale = classifier.get("scale")
    if scale is not None and not bool((scale > 0).all()):
        raise CheckpointError(f"{source}: classifier scale has values <= 0 (standardizing divides by them)")
    return classifier


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


def _check_optimizer(optimizer, config: ModelConfig, source: str) -> None:
    """An optimizer state dict of the model of ``config``: its groups name each parameter once, and every
    per-parameter tensor (Adam's moments ...) has the shape of its parameter."""
    bad = f"{source}: train_state optimizer"
    if not (isinstance(optimizer, dict) and {"state", "param_groups"} <= set(optimizer)):
        raise CheckpointError(f"{bad} is not an optimizer state dict")
    groups, per_param = optimizer["param_groups"], optimizer["state"]
    if not (isinstance(groups, list) and groups and all(isinstance(g, dict) for g in groups)):
        raise CheckpointError(f"{bad} param_groups is not a list of groups")
    if not isinstance(per_param, dict):
        raise CheckpointError(f"{bad} state is not a dict")
    with torch.device("meta"):
        shapes = [tuple(p.shape) for p in RNNModel(config).parameters()]
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


def check_train_state(state, source: str, config: ModelConfig | None = None) -> dict | None:
    """A stored training state holds every part a resume needs, of the right kinds and, given the model's
    ``config``, the right shapes: a resume never fails halfway with a traceback."""
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
    if config is not None:
        _check_optimizer(state["optimizer"], config, source)
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
    if state.get("scaler") is not None and not isinstance(state["scaler"], dict):
        raise CheckpointError(f"{source}: train_state scaler is not a GradScaler state dict")
    hidden = state["hidden"]
    if hidden is not None and not (
        isinstance(hidden, (list, tuple))
        and len(hidden) == 2
        and all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in hidden)
    ):
        raise CheckpointError(f"{source}: train_state hidden is not a (hidden, cell) pair of tensors")
    if hidden is not None and config is not None:
        want = (config.nlayers, state["rows"], config.nhid)
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


def build_checkpoint(raw: RawCheckpoint) -> Checkpoint:
    """Check everything ``raw`` holds, then build its model (allocation bounded by the file's tensors)."""
    config = check_config(raw.config, raw.source)
    for part in ("tensors", "classifier", "train_state"):
        check_views(getattr(raw, part), raw.source, "" if part == "tensors" else part)
    check_tensors(config, raw.tensors, raw.source, raw.file_keys)
    not_finite = [
        raw.file_keys.get(k, k)
        for k, t in raw.tensors.items()
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    if not_finite:
        raise CheckpointError(
            f"{raw.source}: weights hold NaN or infinite values: {', '.join(not_finite[:5])}"
        )
    classifier = check_classifier(raw.classifier, config, raw.source)
    train_state = check_train_state(raw.train_state, raw.source, config)
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
