"""Sentiment transfer's regression: L1 logistic regression on language-model features, C chosen on
validation (or by cross-validation), and the ``Readout`` it makes.

Features are standardised with the training split's mean and standard deviation before the
regression, and the scaling is stored with the classifier: the L1 penalty then treats every unit
alike, whatever its range, so that the largest |weight| names the most useful unit (the sentiment
neuron) rather than the unit with the smallest range.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from .errors import DataError, UsageError
from .readout import FeatureSpec, Readout

CV_FOLDS = 3  # folds of the training split that choose C when there is no validation split


@dataclass
class Regression:
    """A fitted L1 logistic regression on (optionally a subset of) standardised features."""

    weight: np.ndarray  # [k]
    bias: float
    C: float
    val_accuracy_by_C: dict[float, float]  # validation accuracy, or cross-validated accuracy on train
    converged: bool

    @property
    def nonzero(self) -> int:
        return int(np.count_nonzero(self.weight))

    def probs(self, x: np.ndarray) -> np.ndarray:
        return _sigmoid(x.astype(np.float64) @ self.weight + self.bias)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean((probs > 0.5).astype(np.int64) == labels))


def standardizer(train_features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and scale of the training features; constant features keep scale 1."""
    mean = train_features.mean(axis=0, dtype=np.float64)
    std = train_features.std(axis=0, dtype=np.float64)
    scale = np.where(std > 1e-8, std, 1.0)
    return mean.astype(np.float32), scale.astype(np.float32)


LOG2_C_LIMIT = 50  # C = 2^50 is no penalty at all already; 2^1024 is not even a float


def c_sweep(log2_min: int = -8, log2_max: int = 0) -> list[float]:
    """C = 2^log2_min ... 2^log2_max (OpenAI's sweep is 2^-8 ... 2^0)."""
    if log2_min > log2_max:
        raise UsageError(f"empty C sweep: 2^{log2_min} .. 2^{log2_max}")
    if max(abs(log2_min), abs(log2_max)) > LOG2_C_LIMIT:
        raise UsageError(
            f"--log2_C {log2_min} {log2_max}: exponents must lie in -{LOG2_C_LIMIT} .. {LOG2_C_LIMIT}"
        )
    return [2.0**e for e in range(log2_min, log2_max + 1)]


def _fit(x: np.ndarray, y: np.ndarray, C: float, max_iter: int, seed: int) -> tuple[LogisticRegression, bool]:
    model = LogisticRegression(C=C, l1_ratio=1.0, solver="liblinear", max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(x, y)
    return model, not any(issubclass(w.category, ConvergenceWarning) for w in caught)


def cross_validated_accuracy(x: np.ndarray, y: np.ndarray, C: float, max_iter: int, seed: int) -> float:
    """Mean held-out accuracy over ``CV_FOLDS`` stratified folds of (x, y) (fewer if a class is rarer)."""
    folds = min(CV_FOLDS, int(np.bincount(y).min()))
    if folds < 2:
        raise DataError("cross-validation needs at least 2 texts of each class in the training split")
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = [
        _fit(x[fit], y[fit], C, max_iter, seed)[0].score(x[held], y[held])
        for fit, held in splitter.split(x, y)
    ]
    return float(np.mean(scores))


def fit_l1_regression(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray | None,
    val_y: np.ndarray | None,
    Cs: list[float],
    max_iter: int = 100,
    seed: int = 42,
) -> Regression:
    """Fit one L1 regression per C on train and keep the best on validation among the models that use
    any feature at all (an all-zero model only predicts the validation split's majority class, which
    can outscore weak features without meaning anything); of tied C, the first (strongest penalty,
    sparsest). Re-fitting at the chosen C would give the same (deterministic) model.

    Without a validation split (``val_x`` None) each C is scored by cross-validation on train.
    """
    if len(np.unique(train_y)) < 2:
        raise DataError("the training labels are all one class: a classifier needs both 0 and 1")
    best, best_rank, scores = None, None, {}
    for C in Cs:
        model, converged = _fit(train_x, train_y, C, max_iter, seed)
        if val_x is None:
            scores[C] = cross_validated_accuracy(train_x, train_y, C, max_iter, seed)
        else:
            scores[C] = float(model.score(val_x, val_y))
        rank = (bool(np.any(model.coef_)), scores[C])
        if best is None or rank > best_rank:
            best, best_rank = (C, model, converged), rank
    C, model, converged = best
    return Regression(model.coef_[0].astype(np.float64), float(model.intercept_[0]), C, scores, converged)


def make_classifier(
    regression: Regression,
    mean: np.ndarray | None,
    scale: np.ndarray | None,
    neurons: np.ndarray,
    pooling: str,
    state: str,
    all_layers: bool,
) -> Readout:
    """The readout of a regression fitted on features standardised by ``mean``/``scale``."""
    f32 = lambda a: None if a is None else torch.as_tensor(np.asarray(a), dtype=torch.float32)
    return Readout(
        weight=f32(regression.weight),
        bias=torch.tensor(regression.bias, dtype=torch.float32),
        spec=FeatureSpec.parse(pooling, state, all_layers),
        neurons=torch.as_tensor(neurons, dtype=torch.long),
        mean=f32(mean),
        scale=f32(scale),
        C=float(regression.C),
    )
