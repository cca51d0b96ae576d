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
from sklearn.metrics import f1_score, matthews_corrcoef
from sklearn.model_selection import StratifiedKFold

from .errors import DataError, UsageError
from .readout import FeatureSpec, Readout, top_neurons

CV_FOLDS = 3  # folds of the training split that choose C when there is no validation split


@dataclass
class Regression:
    """A fitted L1 logistic regression on (optionally a subset of) standardised features: two classes
    (``weight [k]``, ``bias`` a float, P(class 1) by sigmoid) or K > 2 (``weight [K, k]``, ``bias [K]``,
    one regression per class against the rest, probabilities by softmax of the K scores)."""

    weight: np.ndarray  # [k], or [K, k]
    bias: float | np.ndarray
    C: float
    val_accuracy_by_C: dict[float, float]  # validation accuracy, or cross-validated accuracy on train
    converged: bool

    @property
    def nonzero(self) -> int:
        return int(np.count_nonzero(self.weight))

    def probs(self, x: np.ndarray) -> np.ndarray:
        """P(class 1) ``[n]`` for two classes, ``[n, K]`` over K > 2 classes."""
        z = x.astype(np.float64) @ self.weight.T + self.bias
        return _sigmoid(z) if self.weight.ndim == 1 else _softmax(z)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _softmax(z: np.ndarray) -> np.ndarray:
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def predicted(probs: np.ndarray) -> np.ndarray:
    """Class numbers from probabilities: P(class 1) > 0.5 for two classes, the most probable of K."""
    return probs.argmax(axis=1) if probs.ndim == 2 else (probs > 0.5).astype(np.int64)


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(predicted(probs) == labels))


def classification_scores(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy, macro-averaged F1 and Matthews correlation (scikit-learn's) of the predicted classes."""
    guess = predicted(probs)
    return {
        "accuracy": float(np.mean(guess == labels)),
        "macro_f1": float(f1_score(labels, guess, average="macro", zero_division=0)),
        "mcc": float(matthews_corrcoef(labels, guess)),
    }


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


def _fit(
    x: np.ndarray, y: np.ndarray, C: float, max_iter: int, seed: int, n_classes: int
) -> tuple[np.ndarray, np.ndarray, bool]:
    """``(coef, intercept, converged)``: ``[1, F]``, ``[1]`` for labels 0/1; for K > 2 classes one L1
    regression per class against the rest (liblinear's one-vs-rest, which scikit-learn's liblinear no
    longer does by itself), ``[K, F]``, ``[K]``."""
    targets = [y] if n_classes == 2 else [(y == k).astype(np.int64) for k in range(n_classes)]
    coefs, intercepts, converged = [], [], True
    for target in targets:
        model = LogisticRegression(
            C=C, l1_ratio=1.0, solver="liblinear", max_iter=max_iter, random_state=seed
        )
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model.fit(x, target)
        converged &= not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        coefs.append(model.coef_[0])
        intercepts.append(model.intercept_[0])
    return np.array(coefs, dtype=np.float64), np.array(intercepts, dtype=np.float64), converged


def _score(coef: np.ndarray, intercept: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    z = x @ coef.T + intercept
    guess = (z[:, 0] > 0).astype(np.int64) if coef.shape[0] == 1 else z.argmax(axis=1)
    return float(np.mean(guess == y))


def cross_validated_accuracy(
    x: np.ndarray, y: np.ndarray, C: float, max_iter: int, seed: int, n_classes: int = 2
) -> float:
    """Mean held-out accuracy over ``CV_FOLDS`` stratified folds of (x, y) (fewer if a class is rarer)."""
    folds = min(CV_FOLDS, int(np.bincount(y, minlength=n_classes).min()))
    if folds < 2:
        raise DataError("cross-validation needs at least 2 texts of each class in the training split")
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = [
        _score(*_fit(x[fit], y[fit], C, max_iter, seed, n_classes)[:2], x[held], y[held])
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
    n_classes: int = 2,
) -> Regression:
    """Fit one L1 regression per C on train and keep the best on validation among the models that use
    any feature at all (an all-zero model only predicts the validation split's majority class, which
    can outscore weak features without meaning anything); of tied C, the first (strongest penalty,
    sparsest). Re-fitting at the chosen C would give the same (deterministic) model.

    Without a validation split (``val_x`` None) each C is scored by cross-validation on train.
    ``n_classes`` > 2: labels 0 .. K-1, one regression per class against the rest (``_fit``).
    """
    if len(np.unique(train_y)) < 2:
        raise DataError("the training labels are all one class: a classifier needs at least two")
    best, best_rank, scores = None, None, {}
    for C in Cs:
        coef, intercept, converged = _fit(train_x, train_y, C, max_iter, seed, n_classes)
        if val_x is None:
            scores[C] = cross_validated_accuracy(train_x, train_y, C, max_iter, seed, n_classes)
        else:
            scores[C] = _score(coef, intercept, val_x, val_y)
        rank = (bool(np.any(coef)), scores[C])
        if best is None or rank > best_rank:
            best, best_rank = (C, coef, intercept, converged), rank
    C, coef, intercept, converged = best
    if n_classes == 2:
        return Regression(coef[0], float(intercept[0]), C, scores, converged)
    return Regression(coef, intercept, C, scores, converged)


def make_classifier(
    regression: Regression,
    mean: np.ndarray | None,
    scale: np.ndarray | None,
    neurons: np.ndarray,
    pooling: str,
    state: str,
    all_layers: bool,
    classes: tuple[str, ...] | None = None,
) -> Readout:
    """The readout of a regression fitted on features standardised by ``mean``/``scale``; ``classes``:
    the names of K > 2 classes (label k: ``classes[k]``)."""
    f32 = lambda a: None if a is None else torch.as_tensor(np.asarray(a), dtype=torch.float32)
    return Readout(
        weight=f32(regression.weight),
        bias=torch.as_tensor(np.asarray(regression.bias), dtype=torch.float32),
        spec=FeatureSpec.parse(pooling, state, all_layers),
        neurons=torch.as_tensor(neurons, dtype=torch.long),
        mean=f32(mean),
        scale=f32(scale),
        C=float(regression.C),
        classes=classes if regression.weight.ndim == 2 else None,
    )


@dataclass
class TransferFit:
    """transfer.py's regressions: on all (standardised) features, on the top ``neurons`` alone, and with
    ``drop_neurons`` on all but them; each one's probabilities and scores per split, by name
    (``all_neurons``, ``neurons``, ``dropped_neurons``: the original's result names)."""

    Cs: list[float]
    regressions: dict[str, Regression]
    neurons: np.ndarray  # feature indices, strongest first
    columns: dict[str, np.ndarray | None]  # the features each regression reads (None: all)
    probs: dict[str, dict[str, np.ndarray]]  # name -> split -> probabilities
    scores: dict[str, dict[str, dict[str, float]]]  # name -> labelled split -> classification_scores
    classifier: Readout  # the full regression as classifier.py reads it (standardisation included)
    per_class: dict[str, list[int]] | None = None  # K > 2 classes: each class's own top features

    @property
    def full(self) -> Regression:
        return self.regressions["all_neurons"]


def fit_transfer(
    features: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    spec: FeatureSpec,
    classes: tuple[str, ...],
    *,
    Cs: list[float] | None = None,
    epochs: int = 100,
    seed: int = 42,
    n_neurons: int = 1,
    drop_neurons: bool = False,
) -> TransferFit:
    """Standardise ``features`` (split -> [n, F]) by the training split, fit on ``labels`` (class numbers
    of the labelled splits; C of ``Cs``, default ``c_sweep()``, by validation, else cross-validation),
    pick the top ``n_neurons`` features of the full regression (K > 2 classes: by their largest |weight|
    over the classes) and refit on them (and with ``drop_neurons`` on the rest)."""
    Cs = list(Cs) if Cs is not None else c_sweep()
    mean, scale = standardizer(features["train"])
    std = {split: (f - mean) / scale for split, f in features.items()}
    binary = len(classes) == 2

    def fit_on(columns: np.ndarray | None) -> Regression:
        pick = (lambda x: x) if columns is None else (lambda x: x[:, columns])
        val_x = pick(std["val"]) if "val" in std else None
        return fit_l1_regression(
            pick(std["train"]), labels["train"], val_x, labels.get("val"), Cs, epochs, seed,
            n_classes=len(classes),
        )  # fmt: skip

    full = fit_on(None)
    neurons = top_neurons(full.weight if binary else np.abs(full.weight).max(axis=0), n_neurons)
    classifier = make_classifier(
        full, mean, scale, neurons, spec.pooling, spec.state, spec.all_layers, None if binary else classes
    )
    # the full regression's probabilities come from the stored classifier, exactly as classifier.py's
    regressions = {"all_neurons": full, "neurons": fit_on(neurons)}
    columns = {"all_neurons": None, "neurons": neurons}
    probs = {"all_neurons": {split: classifier.probs(f) for split, f in features.items()}}
    if drop_neurons:
        rest = np.setdiff1d(np.arange(features["train"].shape[1]), neurons)
        regressions["dropped_neurons"], columns["dropped_neurons"] = fit_on(rest), rest
    for name, reg in regressions.items():
        if name not in probs:
            probs[name] = {split: reg.probs(x[:, columns[name]]) for split, x in std.items()}
    scores = {
        name: {split: classification_scores(p[split], y) for split, y in labels.items()}
        for name, p in probs.items()
    }
    per_class = None
    if not binary:
        per_class = {name: top_neurons(full.weight[k], n_neurons).tolist() for k, name in enumerate(classes)}
    return TransferFit(Cs, regressions, neurons, columns, probs, scores, classifier, per_class)
