"""Unsupervised sentiment discovery: byte-level recurrent language models and the sentiment neuron."""

from .model import ModelConfig, RNNModel, mLSTM

__all__ = ["ModelConfig", "RNNModel", "mLSTM", "Encoder"]


def __getattr__(name: str):
    # Encoder pulls in scikit-learn; import it only when asked for.
    if name == "Encoder":
        from .encoder import Encoder

        return Encoder
    raise AttributeError(name)
