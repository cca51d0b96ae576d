"""The byte-level language model: byte embedding -> recurrent stack -> 256-way decoder."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from .matmul import linear_layer
from .recurrent import RNN_TYPES, State, TorchRNN, make_rnn, mLSTM, mLSTMLayer

__all__ = [
    "ModelConfig",
    "RNNModel",
    "mLSTM",
    "mLSTMLayer",
    "TorchRNN",
    "RNN_TYPES",
    "MAX_UNITS",
    "MAX_LAYERS",
]

# Bounds on a model's size, from a file or from flags, checked before anything is built. The released
# models have 4096 units; 64k x 64k recurrent matrices would already be 16 GB each.
MAX_UNITS = 1 << 16
MAX_LAYERS = 64


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


class Decoder(nn.Linear):
    """``nn.Linear`` whose products (forward and backward) go through ``matmul``: the faster library on
    CPU, and the operand dtype of an active autocast (``--bf16``) with float32 logits."""

    def forward(self, input: Tensor) -> Tensor:
        return linear_layer(input, self.weight, self.bias)


class RNNModel(nn.Module):
    """Container of encoder (byte embedding), recurrent stack and decoder, as in word_language_model."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.model not in RNN_TYPES:
            raise ValueError(f"unknown model {config.model!r}; choose one of {', '.join(RNN_TYPES)}")
        if config.tied and config.nhid != config.emsize:
            raise ValueError(
                f"--tied needs --nhid == --emsize (got nhid={config.nhid}, emsize={config.emsize})"
            )
        self.config = config
        self.encoder = nn.Embedding(config.ntoken, config.emsize)
        self.rnn = make_rnn(
            config.model, config.emsize, config.nhid, config.nlayers, config.dropout, config.weight_norm
        )
        self.decoder = Decoder(config.nhid, config.ntoken)
        self.drop = nn.Dropout(config.dropout)
        if config.tied:
            self.decoder.weight = self.encoder.weight

    def forward(
        self, tokens: Tensor, hidden: State | None = None, reset: Tensor | None = None
    ) -> tuple[Tensor, State]:
        """``tokens [T, B]`` (long) -> logits ``[T, B, ntoken]`` and the final state."""
        emb = self.drop(self.encoder(tokens))
        out, hidden = self.rnn(emb, hidden, reset)
        return self.decoder(self.drop(out)), hidden

    def forward_states(self, tokens: Tensor, hidden: State | None = None, reset: Tensor | None = None):
        """Per-layer per-step (hidden, cell) sequences and the final state, for featurization."""
        return self.rnn.forward_states(self.encoder(tokens), hidden, reset)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


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
    trained at that batch size: a ValueError naming the flags otherwise, before anything is allocated.
    ``loaded``: the architecture is a checkpoint's (already checked), only the batch is the flags'."""
    if not loaded:
        for flag, value, high in (
            ("--nhid", config.nhid, MAX_UNITS),
            ("--emsize", config.emsize, MAX_UNITS),
            ("--nlayers", config.nlayers, MAX_LAYERS),
        ):
            if value > high:
                raise ValueError(f"{flag} {value} is above the limit of {high} (the same as for checkpoints)")
    memory = machine_memory() if memory is None else memory  # (device_memory(device) for a GPU)
    needed = training_memory(config, batch_size, seq_length)
    if memory is not None and needed > memory:
        what = "the model of --load" if loaded else f"--nhid {config.nhid} x --nlayers {config.nlayers}"
        raise ValueError(
            f"{what} with --batch_size {batch_size} x --seq_length {seq_length} needs at least "
            f"{needed / 2**30:,.1f} GiB to train; this machine has {memory / 2**30:,.1f} GiB: "
            "use smaller values"
        )
