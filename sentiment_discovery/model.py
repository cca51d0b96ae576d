"""The byte-level language model: byte embedding -> recurrent stack -> 256-way decoder."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import Tensor, nn

from .matmul import linear_layer
from .recurrent import RNN_TYPES, State, TorchRNN, make_rnn, mLSTM, mLSTMLayer

__all__ = ["ModelConfig", "RNNModel", "mLSTM", "mLSTMLayer", "TorchRNN", "RNN_TYPES"]


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
