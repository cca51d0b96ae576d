"""Python API: ``Encoder.load(path).transform(texts)`` / ``.predict_proba(texts)``."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from .checkpoint import CheckpointError, load_checkpoint
from .featurize import featurize
from .model import RNNModel
from .transfer import classifier_probs, classifier_settings


class Encoder:
    """A language model (and, after transfer, its sentiment classifier) as a text featurizer.

    Features use the pooling/state/layers stored with the classifier, or the original's
    (last cell state of the last layer) for a bare language model.
    """

    def __init__(
        self,
        model: RNNModel | str | os.PathLike | None = None,
        classifier: dict | None = None,
        *,
        batch_size: int = 128,
        device: str | torch.device | None = None,
        fp16: bool = False,
        default_neuron: int | None = None,
    ):
        if not isinstance(model, RNNModel):  # a path, an alias, or None: the shipped default model
            ckpt = load_checkpoint(model)
            model, classifier = ckpt.model, classifier if classifier is not None else ckpt.classifier
            if default_neuron is None:
                default_neuron = ckpt.extra.get("default_neuron")
        self.model, self.classifier = model, classifier
        self.default_neuron = default_neuron
        self.batch_size, self.device, self.fp16 = batch_size, device, fp16
        self.pooling, self.state, self.all_layers = classifier_settings(classifier)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, **kwargs) -> Encoder:
        """A checkpoint file: a language model, or a transferred one (``classifier.pt``)."""
        ckpt = load_checkpoint(path)
        kwargs.setdefault("default_neuron", ckpt.extra.get("default_neuron"))
        return cls(ckpt.model, ckpt.classifier, **kwargs)

    @property
    def neurons(self) -> np.ndarray | None:
        """Feature indices of the sentiment neuron(s), strongest first: the classifier's, else the unit a
        released model documents (OpenAI's 2388), else None."""
        if self.classifier is None or self.classifier.get("neurons") is None:
            return None if self.default_neuron is None else np.array([self.default_neuron])
        return np.asarray(self.classifier["neurons"]).reshape(-1)

    def transform(self, texts: Sequence[str] | str, progress: bool = False) -> np.ndarray:
        """Features ``[n_texts, n_features]`` float32."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        return featurize(
            self.model,
            texts,
            batch_size=self.batch_size,
            pooling=self.pooling,
            state=self.state,
            all_layers=self.all_layers,
            device=self.device,
            progress=progress,
            fp16=self.fp16,
        )

    def predict_proba(
        self, texts: Sequence[str] | str, neurons: int = -1, progress: bool = False
    ) -> np.ndarray:
        """Probability of positive sentiment ``[n_texts]``; ``neurons`` >= 0 keeps only that many
        largest-|weight| classifier weights (-1: all)."""
        if self.classifier is None:
            raise CheckpointError(
                "this checkpoint holds no sentiment classifier (a bare language model): run transfer.py "
                "on it first and load the classifier.pt it writes"
            )
        return classifier_probs(self.transform(texts, progress), self.classifier, neurons)
