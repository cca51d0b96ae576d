"""The byte-level language model: byte embedding -> recurrent stack -> 256-way decoder.

``RNNModel`` is the one interface the rest of the package uses (featurization, generation, training,
fine-tuning): ``zero_state``, ``has_cell``, ``forward`` (logits; with ``return_states`` also the
per-step states), ``forward_states`` (the per-step states alone) and ``final_state`` (the state after
the last step alone). Its submodules keep the names of the original's state dict (``encoder``,
``rnn``, ``decoder``: docs/formats.md), which only this file reaches into.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .errors import UsageError
from .matmul import linear_layer
from .preprocess import PREPROCESSORS
from .recurrent import RNN_TYPES, State, TorchRNN, check_rnn_type, make_rnn, mLSTM, mLSTMLayer

__all__ = ["ModelConfig", "RNNModel", "Steps", "mLSTM", "mLSTMLayer", "TorchRNN", "RNN_TYPES"]
__all__ += ["MAX_UNITS", "MAX_LAYERS"]

# Bounds on a model's size, from a file or from flags, checked before anything is built. The released
# models have 4096 units; 64k x 64k recurrent matrices would already be 16 GB each.
MAX_UNITS = 1 << 16
MAX_LAYERS = 64

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


# main.py's model flags that other scripts accept only as a check of the checkpoint (ModelConfig.check_given)
ARCHITECTURE_FLAGS = ("model", "emsize", "nhid", "nlayers", "tied")


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model; stored in every checkpoint."""

    model: str = "mLSTM"
    emsize: int = 64
    nhid: int = 4096
    nlayers: int = 1
    dropout: float = 0.0
    tied: bool = False
    weight_norm: bool = True
    ntoken: int = 256
    preprocess: str = "nvidia"  # text preprocessing the model was trained with (preprocess.py)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)

    @classmethod
    def from_args(cls, args) -> ModelConfig:
        """From main.py's model flags (``--no_weight_norm``, ``--preprocess_variant``)."""
        return cls(
            model=args.model,
            emsize=args.emsize,
            nhid=args.nhid,
            nlayers=args.nlayers,
            dropout=args.dropout,
            tied=args.tied,
            weight_norm=not args.no_weight_norm,
            preprocess=args.preprocess_variant,
        )

    @classmethod
    def checked(cls, stored) -> ModelConfig:
        """The config of a stored dict (a file's), its values within type and limits: a ``UsageError``
        naming the value otherwise. Nothing is allocated."""
        if not isinstance(stored, dict):
            raise UsageError(f"config is {type(stored).__name__}, expected the model's settings dict")
        for key, types in _CONFIG_TYPES.items():
            value = stored.get(key)
            if key in stored and (
                not isinstance(value, types) or (bool not in types and isinstance(value, bool))
            ):
                expected = " or ".join(t.__name__ for t in types)
                raise UsageError(f"config {key} = {value!r} is not a {expected}")
        cfg = cls.from_dict(stored)
        for key, low, high in (("emsize", 1, MAX_UNITS), ("nhid", 1, MAX_UNITS), ("nlayers", 1, MAX_LAYERS),
                               ("ntoken", 256, 256)):  # fmt: skip
            value = getattr(cfg, key)
            if not low <= value <= high:
                raise UsageError(f"config {key} = {value} is outside {low} .. {high}")
        if not (math.isfinite(cfg.dropout) and 0 <= cfg.dropout < 1):
            raise UsageError(f"config dropout = {cfg.dropout} is outside [0, 1)")
        if cfg.preprocess not in PREPROCESSORS:
            raise UsageError(f"config preprocess = {cfg.preprocess!r} is not one of {sorted(PREPROCESSORS)}")
        try:
            check_rnn_type(cfg.model)
        except UsageError:
            raise UsageError(f"config model = {cfg.model!r} is not one of {', '.join(RNN_TYPES)}") from None
        if cfg.tied and cfg.nhid != cfg.emsize:
            raise UsageError(f"config tied needs nhid == emsize (nhid {cfg.nhid}, emsize {cfg.emsize})")
        return cfg

    def check_given(self, args, source: str) -> None:
        """The original's model-shape flags on the inference scripts (``ARCHITECTURE_FLAGS`` of ``args``,
        None when not given) equal this config's: the checkpoint decides the architecture, so a flag
        can only confirm it; a ``UsageError`` naming both values otherwise."""
        for name in ARCHITECTURE_FLAGS:
            given, stored = getattr(args, name, None), getattr(self, name)
            if given is not None and given != stored:
                flag = f"--{name} given" if isinstance(given, bool) else f"--{name} {given}"
                raise UsageError(
                    f"{source}: {flag} does not match the checkpoint's {name} {stored} (the checkpoint "
                    "decides the architecture: drop the flag, or load another model)"
                )

    def check(self) -> None:
        """The settings fit together: the recurrent type is known, tied sizes are equal."""
        check_rnn_type(self.model)
        if self.tied and self.nhid != self.emsize:
            raise UsageError(f"--tied needs --nhid == --emsize (got nhid={self.nhid}, emsize={self.emsize})")


class Steps(NamedTuple):
    """Per-step states of every layer: ``hidden[l]`` and ``cell[l]`` are ``[T, B, H]`` (for a model
    without cell, ``cell`` is ``hidden``)."""

    hidden: list[Tensor]
    cell: list[Tensor]


class Decoder(nn.Linear):
    """``nn.Linear`` whose products (forward and backward) go through ``matmul``: the faster library on
    CPU, and the operand dtype of an active autocast (``--bf16``) with float32 logits."""

    def forward(self, input: Tensor) -> Tensor:
        return linear_layer(input, self.weight, self.bias)


class RNNModel(nn.Module):
    """Container of encoder (byte embedding), recurrent stack and decoder, as in word_language_model.

    States are ``(h, c)``, each ``[nlayers, B, nhid]``; ``reset`` an optional ``[T, B]`` bool mask that
    zeroes a row's state before it reads that step's byte (recurrent.py).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.check()
        self.config = config
        self.encoder = nn.Embedding(config.ntoken, config.emsize)
        self.rnn = make_rnn(
            config.model, config.emsize, config.nhid, config.nlayers, config.dropout, config.weight_norm
        )
        self.decoder = Decoder(config.nhid, config.ntoken)
        self.drop = nn.Dropout(config.dropout)
        if config.tied:
            self.decoder.weight = self.encoder.weight

    @property
    def has_cell(self) -> bool:
        """Whether the state has a cell c of its own (mLSTM, LSTM); GRU and plain RNNs have h alone,
        their state tuple repeating it."""
        return self.rnn.has_cell

    @property
    def cheap_resets(self) -> bool:
        """Whether a ``reset`` mask costs nothing per step (the mLSTM: featurization then packs several
        texts into each row); PyTorch's fused stacks split the sequence at every step where a row resets."""
        return self.rnn.cheap_resets

    def zero_state(self, batch_size: int, device=None, dtype=None) -> State:
        return self.rnn.zero_state(batch_size, device, dtype)

    def forward(
        self,
        tokens: Tensor,
        hidden: State | None = None,
        reset: Tensor | None = None,
        return_states: bool = False,
    ) -> tuple[Tensor, State] | tuple[Tensor, State, Steps]:
        """``tokens [T, B]`` (long) -> logits ``[T, B, ntoken]`` and the final state (and, with
        ``return_states``, the per-step ``Steps``, differentiable)."""
        emb = self.drop(self.encoder(tokens))
        if not return_states:
            out, hidden = self.rnn(emb, hidden, reset)
            return self.decoder(self.drop(out)), hidden
        hs, cs, hidden = self.rnn.forward_states(emb, hidden, reset)
        return self.decoder(self.drop(hs[-1])), hidden, Steps(hs, cs)

    def forward_states(
        self, tokens: Tensor, hidden: State | None = None, reset: Tensor | None = None
    ) -> tuple[list[Tensor], list[Tensor], State]:
        """Per-layer per-step hidden and cell sequences and the final state, without the decoder."""
        return self.rnn.forward_states(self.drop(self.encoder(tokens)), hidden, reset)

    def final_state(self, tokens: Tensor, hidden: State | None = None, reset: Tensor | None = None) -> State:
        """The state after the last step, without the decoder and without keeping per-step states."""
        return self.rnn(self.drop(self.encoder(tokens)), hidden, reset)[1]

    def layer_groups(self) -> list[list[tuple[str, nn.Parameter]]]:
        """The named parameters by depth, top-down: [decoder and top recurrent layer], [the layer below],
        ..., [byte embedding] (fine-tuning's discriminative rates and gradual unfreezing go by these).
        A tied decoder's weight is the embedding's and belongs to the embedding's group."""
        owner = {}  # parameter id -> depth; named_parameters lists a shared (tied) parameter once
        n = len(self.rnn.layers)
        for depth, module in [(0, self.decoder)] + [(n - 1 - i, m) for i, m in enumerate(self.rnn.layers)]:
            owner.update({id(p): depth for p in module.parameters()})
        owner.update({id(p): n for p in self.encoder.parameters()})
        groups: list[list[tuple[str, nn.Parameter]]] = [[] for _ in range(n + 1)]
        for name, p in self.named_parameters():
            groups[owner.get(id(p), 0)].append((name, p))  # anything else trains with the top group
        return groups

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @classmethod
    def from_state(cls, config, tensors, file_keys: dict[str, str] | None = None) -> RNNModel:
        """The model of a stored config dict and state dict (a file's): the config within its limits and
        every tensor of exactly the shape the config implies, key by key (named by the file's own keys
        where ``file_keys`` maps ours to them), before anything is allocated; a ``UsageError`` else."""
        config = ModelConfig.checked(config)
        if not isinstance(tensors, dict):
            raise UsageError(f"the model weights are {type(tensors).__name__}, expected a dict")
        not_tensors = [f"{k} ({type(v).__name__})" for k, v in tensors.items() if not isinstance(v, Tensor)]
        if not_tensors:
            raise UsageError(f"model weights that are not tensors: {', '.join(not_tensors[:5])}")
        file_keys = file_keys or {}
        own = cls.state_shapes(config)
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
            raise UsageError(f"weights do not fit the {config.model} architecture ({' | '.join(parts)})")
        model = cls(config)
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()})
        return model

    @staticmethod
    def state_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
        """State-dict shapes of the model of ``config``, built on the meta device (no memory)."""
        with torch.device("meta"):
            return {k: tuple(v.shape) for k, v in RNNModel(config).state_dict().items()}


def machine_memory() -> int | None:
    """Bytes of RAM of this machine (``/proc/meminfo`` MemTotal, else ``os.sysconf``); None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def device_memory(device: torch.device | str) -> int | None:
    """Bytes of memory training on ``device`` can use: a GPU's own, else the machine's RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return machine_memory()


def training_memory(config: ModelConfig, batch_size: int, seq_length: int) -> int:
    """A lower estimate of the bytes training ``config`` takes: float32 parameters with their gradients and
    two optimizer moments, and per step and row of a batch the activations backpropagation keeps (the
    gates, states and inputs of every layer, the logits and their gradients)."""
    with torch.device("meta"):
        parameters = RNNModel(config).num_parameters()
    per_step = config.nlayers * 10 * config.nhid + config.emsize + 3 * config.ntoken
    return 4 * (4 * parameters + batch_size * max(seq_length, 1) * per_step)


def check_size_flags(
    config: ModelConfig, batch_size: int, seq_length: int, memory: int | None = None, *, loaded: bool = False
) -> None:
    """The size flags (``--nhid``, ``--emsize``, ``--nlayers``; ``--batch_size`` x ``--seq_length``) within
    the limits a checkpoint has, and a model that fits in ``memory`` (default: this machine's RAM) when
    trained at that batch size: a UsageError naming the flags otherwise, before anything is allocated.
    ``loaded``: the architecture is a checkpoint's (already checked), only the batch is the flags'."""
    if not loaded:
        for flag, value, high in (
            ("--nhid", config.nhid, MAX_UNITS),
            ("--emsize", config.emsize, MAX_UNITS),
            ("--nlayers", config.nlayers, MAX_LAYERS),
        ):
            if value > high:
                raise UsageError(f"{flag} {value} is above the limit of {high} (the same as for checkpoints)")
    memory = machine_memory() if memory is None else memory  # (device_memory(device) for a GPU)
    needed = training_memory(config, batch_size, seq_length)
    if memory is not None and needed > memory:
        what = "the model of --load" if loaded else f"--nhid {config.nhid} x --nlayers {config.nlayers}"
        raise UsageError(
            f"{what} with --batch_size {batch_size} x --seq_length {seq_length} needs at least "
            f"{needed / 2**30:,.1f} GiB to train; this machine has {memory / 2**30:,.1f} GiB: "
            "use smaller values"
        )
