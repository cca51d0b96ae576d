"""The readout: which features a text gets (``FeatureSpec``) and the linear classifier on them (``Readout``).

Features (docs/formats.md, "Features"): the states of a recurrent stack after every byte of a text,
pooled over the bytes (``POOLINGS``), one block per pooling, concatenated in the order given. A
block holds the ``H`` units of the last layer, or with ``all_layers`` the ``L * H`` units of every
layer (feature ``f`` of a block is unit ``f % H`` of layer ``f // H``). ``FeatureSpec.locate`` turns a
feature index back into (pooling, layer, unit); pooling itself is torch operations (``pool``,
``Pooler``), differentiable, for featurization and for end-to-end fine-tuning alike.

A ``Readout`` is what transfer.py fits and every checkpoint stores under ``"classifier"``: weights
on the standardised features, bias, the standardisation (mean, scale), the neurons (feature
indices, largest |weight| first), the regression's C, and the spec. Its stored form is a plain
dict (``to_dict``/``from_dict``), unchanged since the first checkpoint::

    {"weight": [F] float32, "bias": [] float32, "neurons": [k] int64,
     "pooling": "mean,max,last", "state": "cell" | "hidden", "all_layers": bool,
     "mean": [F] | None, "scale": [F] | None, "C": float | None}

plus ``"classes"`` (a list of names) for a classifier of more than two classes, whose ``weight`` is
``[K, F]`` and ``bias`` ``[K]``. A ``Readout`` also reads as that dict (``readout["neurons"]``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor

from .errors import CheckpointError, UsageError
from .model import ModelConfig

POOLINGS = ("last", "mean", "max", "min")  # min: the later NVIDIA suite's --concat-min
STATES = ("cell", "hidden")


def parse_pooling(pooling: str) -> tuple[str, ...]:
    """``"mean,max,last"`` -> ``("mean", "max", "last")``: the poolings whose features are concatenated."""
    names = tuple(p.strip() for p in str(pooling).split(","))
    bad = [p for p in names if p not in POOLINGS]
    if bad or not names or len(set(names)) != len(names):
        raise UsageError(
            f"pooling must be one of {', '.join(POOLINGS)} or a comma-separated list of distinct ones "
            f"(e.g. mean,max,last), got {pooling!r}"
        )
    return names


def check_state(state: str) -> str:
    if state not in STATES:
        raise UsageError(f"state must be one of {', '.join(STATES)}, got {state!r}")
    return state


@dataclass(frozen=True)
class FeatureSpec:
    """Which features a text gets: poolings (blocks, in order), state (cell c or hidden h), layers."""

    poolings: tuple[str, ...] = ("last",)
    state: str = "cell"
    all_layers: bool = False

    @classmethod
    def parse(
        cls, pooling: str | None = None, state: str | None = None, all_layers: bool = False
    ) -> FeatureSpec:
        """From the flags' spellings (``"mean,max"``); None: the original's (last cell state)."""
        return cls(parse_pooling(pooling or "last"), check_state(state or "cell"), bool(all_layers))

    @property
    def pooling(self) -> str:
        """The poolings as stored and as the ``--pooling`` flag spells them."""
        return ",".join(self.poolings)

    def block_size(self, config: ModelConfig) -> int:
        """Features of one pooling: ``nhid`` of the last layer, or of every layer."""
        return config.nhid * (config.nlayers if self.all_layers else 1)

    def num_features(self, config: ModelConfig) -> int:
        return self.block_size(config) * len(self.poolings)

    def locate(self, feature: int, config: ModelConfig) -> tuple[str, int, int]:
        """(pooling, layer, unit) of a feature index; ``UsageError`` when the model has no such feature."""
        n = self.num_features(config)
        if not 0 <= feature < n:
            where = "all-layers " if self.all_layers else ""
            raise UsageError(
                f"feature {feature} is out of range: the {where}features of this model are 0 .. {n - 1}"
            )
        block = self.block_size(config)
        in_block = feature % block
        H, L = config.nhid, config.nlayers
        layer, unit = (in_block // H, in_block % H) if self.all_layers else (L - 1, in_block)
        return self.poolings[feature // block], layer, unit

    def describe(self, feature: int, config: ModelConfig) -> str:
        """What a user reads for a feature index: its unit, layer, pooling and state, then the index
        (``unit 398, mean cell (feature 398)``; a feature of the max block of mean,max,last:
        ``unit 398, max cell (feature 4494)``)."""
        pooling, layer, unit = self.locate(feature, config)
        where = f" of layer {layer}" if config.nlayers > 1 else ""
        return f"unit {unit}{where}, {pooling} {self.state} (feature {feature})"

    def layers_to_features(self, per_layer: Tensor) -> Tensor:
        """``[L, B, H]`` -> ``[B, block]``: the last layer, or every layer (layer-major)."""
        if not self.all_layers:
            return per_layer[-1]
        L, B, H = per_layer.shape
        return per_layer.permute(1, 0, 2).reshape(B, L * H)

    def pool(self, steps: Tensor, real: Tensor) -> Tensor:
        """Features ``[B, F]`` of per-step states ``steps [L, T, B, H]`` (of ``self.state``) with ``real``
        ``[T, B]`` True at the bytes of each text (False at padding, left or right). Differentiable."""
        pooler = Pooler(self, steps.shape[0], steps.shape[2], steps.shape[3], steps.device)
        pooler.add(steps, real)
        T = steps.shape[1]
        last_step = T - 1 - real.flip(0).to(torch.int64).argmax(dim=0)  # [B]: each row's last real step
        index = last_step.view(1, 1, -1, 1).expand(steps.shape[0], 1, *steps.shape[2:])
        return pooler.features(steps.gather(1, index)[:, 0], real.sum(dim=0))


# A running pool: the start value of each unit and the reduction (a name torch.sum/amax/amin and
# Tensor.scatter_reduce share) that folds further states into it.
_POOLS = {"mean": (0.0, "sum"), "max": (float("-inf"), "amax"), "min": (float("inf"), "amin")}


class Pooler:
    """Running pools over chunks of steps, one per slot (featurization carries them across chunks): the
    sum for ``mean``, the running ``max``/``min``, as ``pools[name]`` ``[L, slots, H]``."""

    def __init__(self, spec: FeatureSpec, layers: int, batch: int, hidden: int, device) -> None:
        self.spec = spec
        shape = (layers, batch, hidden)
        self.pools = {p: torch.full(shape, _POOLS[p][0], device=device) for p in spec.poolings if p in _POOLS}

    @property
    def per_step(self) -> bool:
        """Whether any pooling reads every step (else the final state is all it needs)."""
        return bool(self.pools)

    def add(self, steps: Tensor, real: Tensor, rows: int | None = None) -> None:
        """Pool ``steps [L, T, rows, H]`` with ``real [T, rows]`` into the first ``rows`` slots (no in-place
        update: autograd may run through it)."""
        rows = steps.shape[2] if rows is None else rows
        padding = ~real[None, :, :, None]
        for p, old in self.pools.items():
            start, how = _POOLS[p]
            chunk = getattr(torch, how)(steps.masked_fill(padding, start), dim=1)
            new = getattr(torch, how)(torch.stack([old[:, :rows], chunk]), dim=0)
            # slots after ``rows`` have not started yet
            self.pools[p] = new if rows == old.shape[1] else torch.cat([new, old[:, rows:]], dim=1)

    def add_to_slots(self, values: Tensor | dict[str, Tensor], slots: Tensor) -> None:
        """Pool ``values [L, n, H]`` (states, or per pooling its own pools, e.g. another ``Pooler``'s)
        into ``slots [n]``: each value into its own slot, any number into one."""
        for p, old in self.pools.items():
            new = values[p] if isinstance(values, dict) else values
            index = slots.view(1, -1, 1).expand_as(new)
            self.pools[p] = old.scatter_reduce(1, index, new, _POOLS[p][1])

    def features(self, last: Tensor, lengths: Tensor, slots: Tensor | None = None) -> Tensor:
        """``[n, F]`` from the state after each slot's last byte ``[L, n, H]`` and its byte count ``[n]``,
        of the slots ``slots`` (default: all)."""
        pools = self.pools if slots is None else {p: v.index_select(1, slots) for p, v in self.pools.items()}
        pooled = {
            "last": lambda: last,
            "mean": lambda: pools["mean"] / lengths.to(pools["mean"].dtype)[None, :, None],
            "max": lambda: pools["max"],
            "min": lambda: pools["min"],
        }
        return torch.cat([self.spec.layers_to_features(pooled[p]()) for p in self.spec.poolings], dim=1)


def top_neurons(weight: np.ndarray | Tensor, n: int) -> np.ndarray:
    """Indices of the ``n`` largest |weight| features, largest first (ties: lower index first).

    Only features with a non-zero weight count (a zero-weight feature is no sentiment neuron); an
    all-zero regression, which transfer reports as such, keeps the first feature so there is one.
    """
    w = np.abs(np.asarray(weight, dtype=np.float64).reshape(-1))
    n = len(w) if n < 0 else n
    n = min(n, max(1, int(np.count_nonzero(w))))
    return np.argsort(-w, kind="stable")[:n].astype(np.int64)


def _numpy(value: Tensor) -> np.ndarray:
    return value.detach().cpu().double().numpy()


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


@dataclass(frozen=True, eq=False)
class Readout(Mapping):
    """A linear classifier on standardised features: P = sigmoid(((x - mean) / scale) . weight + bias)
    (softmax over ``classes`` when ``weight`` is ``[K, F]``)."""

    weight: Tensor  # [F] float32, or [K, F] with classes
    bias: Tensor  # [] float32, or [K]
    spec: FeatureSpec = field(default_factory=FeatureSpec)
    neurons: Tensor | None = None  # int64 feature indices, strongest first; None: every feature by |weight|
    mean: Tensor | None = None  # [F] standardisation (None: none)
    scale: Tensor | None = None
    C: float | None = None  # the regression's inverse L1 strength (None: unknown, e.g. NVIDIA's files)
    classes: tuple[str, ...] | None = None  # names of K > 2 classes; None: binary (P(positive))

    def __post_init__(self) -> None:
        if self.neurons is None:
            strength = self.weight.abs() if self.weight.dim() == 1 else self.weight.abs().amax(dim=0)
            object.__setattr__(self, "neurons", torch.argsort(strength, descending=True, stable=True))

    @property
    def num_features(self) -> int:
        return self.weight.shape[-1]

    # ---- the stored form ----------------------------------------------------------------------

    def to_dict(self) -> dict:
        stored = {
            "weight": self.weight,
            "bias": self.bias,
            "neurons": self.neurons,
            "pooling": self.spec.pooling,
            "state": self.spec.state,
            "all_layers": self.spec.all_layers,
            "mean": self.mean,
            "scale": self.scale,
            "C": self.C,
        }
        if self.classes is not None:
            stored["classes"] = list(self.classes)
        return stored

    def __getitem__(self, key: str):
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())

    @classmethod
    def from_dict(cls, stored, config: ModelConfig | None = None, source: str = "classifier") -> Readout:
        """The readout of a stored dict, checked (against the model of ``config`` where given): every
        fault is one ``CheckpointError`` naming ``source``."""
        if not isinstance(stored, Mapping):
            raise CheckpointError(f"{source}: classifier is {type(stored).__name__}, expected a dict")
        if "weight" not in stored or "bias" not in stored:
            absent = [k for k in ("weight", "bias") if k not in stored]
            raise CheckpointError(f"{source}: classifier lacks {' and '.join(absent)}")
        try:
            spec = FeatureSpec.parse(stored.get("pooling"), stored.get("state"), False)
        except UsageError as e:
            raise CheckpointError(f"{source}: classifier {e}") from None
        all_layers = stored.get("all_layers")
        if all_layers is not None and not isinstance(all_layers, bool):
            raise CheckpointError(f"{source}: classifier all_layers = {all_layers!r} is not a bool")
        spec = replace(spec, all_layers=bool(all_layers))
        classes = stored.get("classes")
        if classes is not None and not (
            isinstance(classes, (list, tuple))
            and len(classes) > 2
            and all(isinstance(c, str) for c in classes)
        ):
            raise CheckpointError(f"{source}: classifier classes must be a list of more than two names")
        n_classes = 1 if classes is None else len(classes)
        weight = _numbers(stored["weight"], "weight", source)
        features = spec.num_features(config) if config is not None else weight.numel() // n_classes
        weight = _sized(weight, "weight", source, n_classes * features).float()
        weight = weight.reshape(-1) if classes is None else weight.reshape(n_classes, features)
        bias = _sized(_numbers(stored["bias"], "bias", source), "bias", source, n_classes).float()
        bias = bias.reshape(()) if classes is None else bias.reshape(n_classes)
        scaling = {}
        for key in ("mean", "scale"):
            value = stored.get(key)
            scaling[key] = (
                None
                if value is None
                else _sized(_numbers(value, key, source), key, source, features).float().reshape(-1)
            )
        for key, value in (("weight", weight), ("bias", bias), *scaling.items()):
            if value is not None and not bool(torch.isfinite(value).all()):
                raise CheckpointError(f"{source}: classifier {key} holds NaN or infinite values")
        if scaling["scale"] is not None and not bool((scaling["scale"] > 0).all()):
            raise CheckpointError(
                f"{source}: classifier scale has values <= 0 (standardizing divides by them)"
            )
        neurons = stored.get("neurons")
        if neurons is not None:
            neurons = _numbers(neurons, "neurons", source)
            if neurons.dtype.is_floating_point or neurons.dim() > 1:
                raise CheckpointError(f"{source}: classifier neurons must be a list of feature indices")
            neurons = neurons.long().reshape(-1)
            if neurons.numel() and not 0 <= int(neurons.min()) <= int(neurons.max()) < features:
                raise CheckpointError(f"{source}: classifier neurons has indices outside 0 .. {features - 1}")
        C = stored.get("C")
        if C is not None and not (isinstance(C, (int, float)) and not isinstance(C, bool)):
            raise CheckpointError(f"{source}: classifier C = {C!r} is not a number")
        return cls(
            weight,
            bias,
            spec,
            neurons,
            scaling["mean"],
            scaling["scale"],
            None if C is None else float(C),
            None if classes is None else tuple(classes),
        )

    @classmethod
    def of(cls, classifier: Readout | Mapping | None, config: ModelConfig | None = None) -> Readout | None:
        """A readout as it is, or one from its stored dict (checked), or None."""
        if classifier is None or isinstance(classifier, Readout):
            return classifier
        return cls.from_dict(classifier, config)

    # ---- use ------------------------------------------------------------------------------------

    def check_features(self, config: ModelConfig, source: str) -> None:
        """The weights fit the features this spec gives on the model of ``config``."""
        expected = self.spec.num_features(config)
        if self.num_features != expected:
            raise CheckpointError(
                f"{source}: classifier weight has {self.num_features} values per class, expected {expected}"
            )

    def probs(self, features: np.ndarray, neurons: int = -1) -> np.ndarray:
        """P(positive) ``[n]`` float64 (``[n, K]`` over the classes of a multi-class readout).

        ``neurons`` >= 0 keeps only that many largest-|weight| weights (masking, no refit), as the
        original classifier.py did; -1 keeps all.
        """
        weight = _numpy(self.weight)
        if features.shape[1] != weight.shape[-1]:
            raise UsageError(
                f"features have {features.shape[1]} columns but the classifier has {weight.shape[-1]} weights"
            )
        if neurons >= 0:
            keep = np.asarray(self.neurons[:neurons] if self.classes else top_neurons(weight, neurons))
            masked = np.zeros_like(weight)
            masked[..., keep] = weight[..., keep]
            weight = masked
        x = features.astype(np.float64)
        if self.mean is not None:
            x = x - _numpy(self.mean)
        if self.scale is not None:
            x = x / _numpy(self.scale)
        z = x @ weight.T + _numpy(self.bias)
        if self.classes is None:
            return _sigmoid(z)
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)


def classifier_probs(features: np.ndarray, classifier: Readout | Mapping, neurons: int = -1) -> np.ndarray:
    """``Readout.probs`` of a readout or of its stored dict."""
    return Readout.of(classifier).probs(features, neurons)


def _numbers(value, name: str, source: str) -> Tensor:
    """A stored numeric array (tensor or list) as a tensor of numbers."""
    try:
        tensor = value.detach() if isinstance(value, Tensor) else torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise CheckpointError(
            f"{source}: classifier {name} is {type(value).__name__}, expected numbers"
        ) from None
    if not (tensor.dtype.is_floating_point or tensor.dtype in (torch.int64, torch.int32)):
        raise CheckpointError(f"{source}: classifier {name} holds {tensor.dtype}, expected numbers")
    return tensor


def _sized(tensor: Tensor, name: str, source: str, size: int) -> Tensor:
    if tensor.numel() != size:
        raise CheckpointError(f"{source}: classifier {name} has {tensor.numel()} values, expected {size}")
    return tensor
