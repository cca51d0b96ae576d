"""Python API: ``Encoder.load(path)`` and its ``.transform``, ``.predict_proba``, ``.cell_transform``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .checkpoint import load_checkpoint
from .errors import CheckpointError, UsageError
from .featurize import byte_states, featurize
from .model import RNNModel
from .preprocess import encode, text_slice
from .readout import FeatureSpec, Readout


def _texts(texts) -> list[str]:
    """``texts`` (one string or a sequence of them) as a list; a TypeError naming what else was given."""
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a str or a sequence of str, got {type(texts).__name__}")
    wrong = next(((i, t) for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if wrong is not None:
        raise TypeError(f"texts must be str: item {wrong[0]} is {type(wrong[1]).__name__} ({wrong[1]!r:.40})")
    return list(texts)


@dataclass
class ByteValues:
    """One text's per-byte neuron values (``Encoder.cell_transform``)."""

    bytes: bytes  # the preprocessed text as the model read it, padding included
    values: np.ndarray  # float32 [len(bytes), len(units)]: the state after each byte
    units: np.ndarray  # the feature index of each column

    @property
    def text_slice(self) -> slice:
        """The bytes of the text itself: without the preprocessing's leading ``"\\n "`` and trailing pad."""
        return text_slice(self.bytes)


def _binary_class_names(stored) -> tuple[str, str] | None:
    """The two class names a checkpoint's extra records, if it records two strings."""
    if isinstance(stored, (list, tuple)) and len(stored) == 2 and all(isinstance(n, str) for n in stored):
        return (stored[0], stored[1])
    return None


class Encoder:
    """A language model (and, after transfer, its sentiment classifier) as a text featurizer.

    ``model`` None is the shipped fine-tuned classifier (the alias ``finetuned``; ``"default"`` names the
    shipped language model with its transferred classifier). Features use the pooling/state/layers
    stored with the classifier, or the original's (last cell state of the last layer) for a bare
    language model. ``bf16=True`` featurizes with
    bfloat16 matrix products (``fp16``: float16 on a GPU, bfloat16 on a CPU).
    """

    def __init__(
        self,
        model: RNNModel | str | os.PathLike | None = None,
        classifier: Readout | dict | None = None,
        *,
        batch_size: int = 128,
        device: str | torch.device | None = None,
        fp16: bool = False,
        bf16: bool = False,
        default_neuron: int | None = None,
        class_names: tuple[str, str] | None = None,
    ):
        if not isinstance(model, RNNModel):  # a path, an alias, or None: the shipped classifier
            ckpt = load_checkpoint("finetuned" if model is None else model)
            model, classifier = ckpt.model, classifier if classifier is not None else ckpt.classifier
            if default_neuron is None:
                default_neuron = ckpt.extra.get("default_neuron")
            if class_names is None and classifier is not None:
                class_names = _binary_class_names(ckpt.extra.get("class_names"))
        # a binary classifier's two labels when not 0/1 (transfer.py keeps them in the checkpoint's extra)
        self.class_names = class_names
        self.model, self.classifier = model, Readout.of(classifier, model.config)
        self.default_neuron = default_neuron
        self.batch_size, self.device, self.fp16, self.bf16 = batch_size, device, fp16, bf16
        self.spec = self.classifier.spec if self.classifier is not None else FeatureSpec()

    @property
    def pooling(self) -> str:
        return self.spec.pooling

    @property
    def state(self) -> str:
        return self.spec.state

    @property
    def all_layers(self) -> bool:
        return self.spec.all_layers

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, **kwargs) -> Encoder:
        """A checkpoint file: a language model, or a transferred or fine-tuned one with its classifier (None:
        the shipped fine-tuned classifier)."""
        return cls(path, **kwargs)

    @property
    def neurons(self) -> np.ndarray | None:
        """Feature indices of the sentiment neuron(s), strongest first: the classifier's, else the unit a
        released model documents (OpenAI's 2388), else None."""
        if self.classifier is None:
            return None if self.default_neuron is None else np.array([self.default_neuron])
        return self.classifier.neurons.numpy()

    def transform(self, texts: Sequence[str] | str, progress: bool = False) -> np.ndarray:
        """Features ``[n_texts, n_features]`` float32."""
        texts = _texts(texts)
        return featurize(
            self.model,
            texts,
            batch_size=self.batch_size,
            spec=self.spec,
            device=self.device,
            progress=progress,
            fp16=self.fp16,
            bf16=self.bf16,
        )

    def cell_transform(
        self, texts: Sequence[str] | str, units: Sequence[int] | None = None
    ) -> list[ByteValues]:
        """Per text, the value of every unit (or of ``units``, feature indices as in ``transform``) after
        each byte of the preprocessed text, in the state the features use (the cell state unless the
        classifier reads the hidden one). With ``last`` pooling, the last byte's values are the text's
        features and byte ``t``'s those of the text cut after byte ``t``; a feature of another pooling
        (or of a block of concatenated poolings, ``mean,max,last``) gives the per-byte values of its unit.
        """
        texts = _texts(texts)
        tokens = [encode(text, self.model.config.preprocess) for text in texts]
        block = self.spec.block_size(self.model.config)  # features of one pooling
        n_features = self.spec.num_features(self.model.config)
        chosen = np.arange(block) if units is None else np.asarray(units, dtype=np.int64).reshape(-1)
        if len(chosen) and not (0 <= chosen.min() and chosen.max() < n_features):
            raise UsageError(f"units must be feature indices 0 .. {n_features - 1}, got {chosen.tolist()}")
        values = byte_states(
            self.model,
            tokens,
            units=chosen % block,
            state=self.state,
            all_layers=self.all_layers,
            device=self.device,
            fp16=self.fp16,
            bf16=self.bf16,
        )
        return [ByteValues(t.tobytes(), v, chosen) for t, v in zip(tokens, values)]

    def predict_proba(
        self, texts: Sequence[str] | str, neurons: int = -1, progress: bool = False
    ) -> np.ndarray:
        """Probability of positive sentiment ``[n_texts]``; ``neurons`` >= 0 keeps only that many
        largest-|weight| classifier weights (-1: all)."""
        if not isinstance(neurons, int) or isinstance(neurons, bool) or neurons < -1:
            raise ValueError(f"neurons must be -1 (all) or a count >= 0, got {neurons!r}")
        if self.classifier is None:
            raise CheckpointError(
                "this checkpoint holds no sentiment classifier (a bare language model): run transfer.py "
                "on it first and load the classifier.pt it writes"
            )
        return self.classifier.probs(self.transform(texts, progress), neurons)
