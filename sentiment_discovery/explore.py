"""The neuron explorer: a local web app to see what the units of a byte-level language model do.

    python explore.py [--load_model M] [--data CSV] [--port 8000]     # then open http://127.0.0.1:8000

Three views, served from 127.0.0.1 with every asset from the package (``web/``), nothing fetched:

- **Try text**: each character of a text coloured by a unit's value after it, the classifier's
  P(positive) and the traces of the units with the largest |classifier weight|.
- **Units**: a unit's classifier weight, its accuracy alone on the labelled corpus, its feature's
  histogram by class, the corpus texts that excite it most and least; units ranked by a chosen measure.
- **Steer**: generation from a prompt with one unit forced (``generation.generate``'s overwrite).

The server is the standard library's ``ThreadingHTTPServer`` with JSON endpoints: the app needs a
handful of routes and one streamed response, so a web framework would be a dependency for nothing.
The model is not thread-safe: every model call holds ``Explorer.lock``, so several tabs are served
one model call at a time.

Typing is fast because the model reads a text once: the per-byte states of recent texts are kept
(``StateCache``, bounded in bytes), and a new text runs the model only from the end of the longest
prefix it shares with one of them; a keystroke at the end of a text costs two bytes of model time.

Corpus statistics (each feature over the corpus texts, each unit's per-byte range) are computed once
per model and corpus, in one featurization, and cached beside the model (``<model>.explore/``; where
that folder cannot be written, ``$SENTIMENT_DISCOVERY_CACHE`` or ``~/.cache/sentiment_discovery``,
``/explore/``), keyed by the digests of the model and data files and the features.

Features are the checkpoint's readout's (``readout.FeatureSpec``: poolings, state, layers; without a
classifier the original's last cell state); a readout of K classes gives each class's probability.
"""

from __future__ import annotations

import argparse
import codecs
import hashlib
import json
import math
import os
import sys
import threading
import time
import traceback
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import torch
from torch.nn.utils import parametrize

from . import cli
from .checkpoint import Checkpoint, load_checkpoint
from .errors import DataError, UsageError
from .feature_cache import file_digest
from .featurize import featurize
from .formats import resolve_model_path
from .generation import Neuron, generate, warmup_tokens
from .matmul import CACHE_ENV, cache_root
from .model import RNNModel
from .plots import char_cells
from .preprocess import encode_bytes, text_slice
from .readers import ReadOptions, read_records
from .readout import FeatureSpec, Readout
from .safe_io import atomic_write

DEFAULT_DATA = "data/binary_sst/val.csv"
WEB_DIR = Path(__file__).resolve().parent / "web"
STATIC_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".png": "image/png"}
MAX_TEXT_CHARS = 2000  # a text longer than this is refused: the model reads about 200 bytes/s on 2 cores
MAX_TEXT_BYTES = 4096  # after preprocessing (transliteration can lengthen a text)
MAX_BODY_BYTES = 1 << 20  # a request body larger than this is refused before it is read
MAX_STEER_BYTES = 1000
BATCH_STATE_BYTES = 64 << 20  # per-byte states of one batch of a unit page's texts, at most
N_TRACES = 8  # units traced in Try text: the largest |classifier weight|
N_EXTREME = 10  # texts shown per unit page, each side
HISTOGRAM_BINS = 30
RANGE_PERCENTILE = 99.0  # a unit's colour range: this percentile of each corpus text's largest |value|
STATS_VERSION = 2
RANKINGS = {
    "weight": "|classifier weight| (the largest over the classes)",
    "separation": "accuracy alone (best threshold) on the labelled corpus",
    "auc": "|AUC - 0.5| of the feature against the labels",
    "spread": "standard deviation of the feature over the corpus",
}


class ExploreError(Exception):
    """A request that cannot be answered: its message goes to the page, with an HTTP status."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------------------------
# Features: where a classifier feature lives in the recurrent state
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Feature:
    index: int  # feature index, as transfer.py and generate.py --neuron number them
    pooling: str  # one of readout.POOLINGS
    layer: int
    unit: int
    weight: float | None  # weight towards "positive" (Explorer.sentiment_weights); None: no such weight

    def to_json(self) -> dict:
        return {
            "feature": self.index,
            "pooling": self.pooling,
            "layer": self.layer,
            "unit": self.unit,
            "weight": self.weight,
        }


# --------------------------------------------------------------------------------------------
# Per-byte states: one text with prefix reuse, or many texts batched
# --------------------------------------------------------------------------------------------


@dataclass
class TextStates:
    tokens: bytes
    hidden: np.ndarray  # float32 [T, L, H]: h after each byte
    cell: np.ndarray  # float32 [T, L, H]: c after each byte (GRU/RNN: h again)

    @property
    def nbytes(self) -> int:
        return self.hidden.nbytes + self.cell.nbytes


class StateCache:
    """Per-byte states of recently read texts, least recently used dropped beyond ``max_bytes``."""

    def __init__(self, max_bytes: int = 256 << 20):
        self.max_bytes, self.used = max_bytes, 0
        self.entries: OrderedDict[bytes, TextStates] = OrderedDict()

    def longest_prefix(self, tokens: bytes) -> tuple[TextStates | None, int]:
        """The entry sharing the longest prefix with ``tokens`` and that prefix's length."""
        best, best_n = None, 0
        for entry in self.entries.values():
            n = _common_prefix(entry.tokens, tokens)
            if n > best_n:
                best, best_n = entry, n
        if best is not None:
            self.entries.move_to_end(best.tokens)
        return best, best_n

    def put(self, states: TextStates) -> None:
        if states.nbytes > self.max_bytes or states.tokens in self.entries:
            return
        self.entries[states.tokens] = states
        self.used += states.nbytes
        while self.used > self.max_bytes:
            _, old = self.entries.popitem(last=False)
            self.used -= old.nbytes


def _common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    x, y = np.frombuffer(a, np.uint8, n), np.frombuffer(b, np.uint8, n)
    return int(np.argmax(x != y))


def _to_numpy(per_layer: list[torch.Tensor]) -> np.ndarray:
    """``L`` tensors ``[T, B, H]`` -> float32 ``[B, T, L, H]``."""
    return torch.stack(per_layer, dim=2).float().permute(1, 0, 2, 3).cpu().numpy()


def run_states(
    model: RNNModel, tokens: bytes, start: TextStates | None = None, chunk_length: int = 256
) -> TextStates:
    """States after every byte of ``tokens``, reusing ``start``'s where it is a prefix of them."""
    n = 0 if start is None else _common_prefix(start.tokens, tokens)
    if n and n == len(tokens):  # a prefix of a text read before: its states, copied (the cache counts bytes)
        return TextStates(tokens, start.hidden[:n].copy(), start.cell[:n].copy())
    hiddens = [start.hidden[:n]] if n else []
    cells = [start.cell[:n]] if n else []
    state = None
    if n:
        to = lambda a: torch.from_numpy(np.ascontiguousarray(a[n - 1])).unsqueeze(1)  # [L, 1, H]
        state = (to(start.hidden), to(start.cell))
    x = torch.frombuffer(bytearray(tokens[n:]), dtype=torch.uint8).long().unsqueeze(1)
    with torch.inference_mode():
        for a in range(0, len(x), chunk_length):
            hs, cs, state = model.forward_states(x[a : a + chunk_length], state)
            hiddens.append(_to_numpy(hs)[0])
            cells.append(_to_numpy(cs)[0])
    L, H = model.config.nlayers, model.config.nhid
    join = lambda parts: np.concatenate(parts) if parts else np.zeros((0, L, H), np.float32)
    return TextStates(tokens, join(hiddens), join(cells))


def run_states_batch(model: RNNModel, texts: list[bytes], chunk_length: int = 256) -> list[TextStates]:
    """``run_states`` of several texts from a zero state, in one right-padded batch: a row's states
    before its padding are those of its text alone."""
    longest = max(len(t) for t in texts)
    x = torch.zeros(longest, len(texts), dtype=torch.long)
    for j, tokens in enumerate(texts):
        x[: len(tokens), j] = torch.frombuffer(bytearray(tokens), dtype=torch.uint8)
    hiddens, cells, state = [], [], None
    with torch.inference_mode():
        for a in range(0, longest, chunk_length):
            hs, cs, state = model.forward_states(x[a : a + chunk_length], state)
            hiddens.append(_to_numpy(hs))
            cells.append(_to_numpy(cs))
    hidden, cell = np.concatenate(hiddens, axis=1), np.concatenate(cells, axis=1)  # [B, T, L, H]
    return [TextStates(t, hidden[j, : len(t)].copy(), cell[j, : len(t)].copy()) for j, t in enumerate(texts)]


def pooled_features(states: TextStates, spec: FeatureSpec) -> np.ndarray:
    """The features ``[F]`` of one text from its per-byte states, pooled by ``spec`` as ``featurize`` does."""
    seq = states.cell if spec.state == "cell" else states.hidden  # [T, L, H]
    steps = torch.from_numpy(seq).permute(1, 0, 2).unsqueeze(2)  # [L, T, 1, H]
    return spec.pool(steps, torch.ones(len(seq), 1, dtype=torch.bool))[0].numpy()


def plain_weights(model: RNNModel) -> RNNModel:
    """The same model without weight norm, its effective matrices folded in once (inference only): a
    keystroke would otherwise pay for recomputing them. ``model`` itself is left folded."""
    if not model.config.weight_norm:
        return model.eval()
    for module in model.modules():
        if parametrize.is_parametrized(module):
            for name in list(module.parametrizations.keys()):
                parametrize.remove_parametrizations(module, name, leave_parametrized=True)
    config = replace(model.config, weight_norm=False)
    return RNNModel.from_state(config.to_dict(), dict(model.state_dict())).eval()


# --------------------------------------------------------------------------------------------
# Corpus statistics
# --------------------------------------------------------------------------------------------


@dataclass
class CorpusStats:
    features: np.ndarray  # float32 [N, F]: the classifier's features of each corpus text
    unit_range: np.ndarray  # float32 [L * H]: colour range of each unit's per-byte values (> 0)

    def save(self, path: Path, key: dict) -> None:
        """Atomically (safe_io); an ``OutputError`` (an ``OSError``) where ``path`` cannot be written."""

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, features=self.features, unit_range=self.unit_range, key=np.array(json.dumps(key)))

        atomic_write(path, write)

    @classmethod
    def load(cls, path: Path, key: dict, n_texts: int, n_features: int, n_units: int) -> CorpusStats | None:
        """The cached statistics when ``path`` holds those of ``key``, else None (recomputed)."""
        try:
            with np.load(path, allow_pickle=False) as f:
                if json.loads(str(f["key"])) != key:
                    return None
                stats = cls(f["features"], f["unit_range"])
        except (OSError, ValueError, KeyError):
            return None
        if stats.features.shape != (n_texts, n_features) or stats.unit_range.shape != (n_units,):
            return None
        return stats


def corpus_spec(spec: FeatureSpec) -> FeatureSpec:
    """``spec``'s poolings plus max and min, over every layer: one featurization then gives both the
    classifier's features and each unit's largest |value| in each text."""
    extra = tuple(p for p in ("max", "min") if p not in spec.poolings)
    return FeatureSpec(spec.poolings + extra, spec.state, all_layers=True)


def compute_corpus_stats(
    model: RNNModel, spec: FeatureSpec, texts: list[str], progress: bool = True, batch_size: int = 64
) -> CorpusStats:
    """Each text's features (``featurize`` with ``spec``) and each unit's colour range: the
    ``RANGE_PERCENTILE`` percentile over the texts of the unit's largest |value| in the text."""
    wide = corpus_spec(spec)
    cfg = model.config
    units = cfg.nlayers * cfg.nhid
    out = featurize(model, texts, spec=wide, device="cpu", batch_size=batch_size, progress=progress)

    def block(pooling: str) -> np.ndarray:
        first = wide.poolings.index(pooling) * units
        return out[:, first : first + units]

    layers = slice(0, units) if spec.all_layers else slice(units - cfg.nhid, units)
    features = np.concatenate([block(p)[:, layers] for p in spec.poolings], axis=1)
    peaks = np.maximum(np.abs(block("max")), np.abs(block("min")))
    unit_range = np.percentile(peaks, RANGE_PERCENTILE, axis=0).astype(np.float32)
    return CorpusStats(np.ascontiguousarray(features), np.maximum(unit_range, 1e-6))


def default_cache_dir() -> Path:
    return cache_root() / "explore"


def stats_dirs(model_path: Path, cache_dir: str | os.PathLike | None) -> list[Path]:
    """Where the statistics are cached: ``cache_dir`` when given; else beside the model
    (``<model>.explore/``), then the user's cache where the model's folder is not writable."""
    if cache_dir is not None:
        return [Path(cache_dir)]
    return [model_path.parent / f"{model_path.name}.explore", default_cache_dir()]


def stats_key(model_path: Path, data_path: str, n_texts: int, spec: FeatureSpec) -> dict:
    return {
        "version": STATS_VERSION,
        "model_sha256": file_digest(model_path),
        "data_sha256": file_digest(data_path),
        "texts": n_texts,
        "pooling": spec.pooling,
        "state": spec.state,
        "all_layers": spec.all_layers,
        "range_percentile": RANGE_PERCENTILE,
    }


# --------------------------------------------------------------------------------------------
# Per-feature measures over the corpus
# --------------------------------------------------------------------------------------------


def threshold_accuracy(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per feature, the best accuracy of one threshold (either direction) on these texts ``[F]``."""
    order = np.argsort(features, axis=0, kind="stable")
    y = labels[order].astype(np.int64)  # [N, F] labels in each feature's order
    n = len(labels)
    below_neg = np.vstack([np.zeros((1, y.shape[1]), np.int64), np.cumsum(1 - y, axis=0)])  # [N+1, F]
    above_pos = int(labels.sum()) - np.vstack([np.zeros((1, y.shape[1]), np.int64), np.cumsum(y, axis=0)])
    up = (below_neg + above_pos) / n  # predict positive above the threshold
    return np.maximum(up, 1 - up).max(axis=0)


def auc(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per feature, P(a positive text's value > a negative text's) (Mann-Whitney, ties ignored) ``[F]``."""
    ranks = np.argsort(np.argsort(features, axis=0, kind="stable"), axis=0) + 1
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    return (ranks[labels == 1].sum(axis=0) - n_pos * (n_pos + 1) / 2) / max(1, n_pos * n_neg)


# --------------------------------------------------------------------------------------------
# The explorer: every answer the web app asks for
# --------------------------------------------------------------------------------------------


def positive_class(readout: Readout | None) -> int | None:
    """The index of the class named "positive" of a multi-class readout (None: binary, or none such)."""
    if readout is None or readout.weight.dim() == 1:
        return None
    names = [str(c).lower() for c in readout.classes]
    return names.index("positive") if "positive" in names else None


def sentiment_weights(readout: Readout | None, positive: int | None) -> np.ndarray | None:
    """Each feature's weight towards "positive" ``[F]``: a binary readout's weights; with classes, the
    positive class's weights less the mean of the others' (two classes: the weights of the logit of
    positive against negative). None without readout or positive class."""
    if readout is None:
        return None
    weight = readout.weight.double().numpy()
    if weight.ndim == 1:  # binary: P(positive) = sigmoid(x . weight + bias)
        return weight
    if positive is None:
        return None
    others = np.delete(weight, positive, axis=0)
    return weight[positive] - others.mean(axis=0)


class Explorer:
    """A loaded model (and readout), its corpus and statistics, and the answers of the endpoints."""

    def __init__(
        self,
        ckpt: Checkpoint,
        model_name: str,
        texts: list[str],
        labels: np.ndarray | None,
        stats: CorpusStats,
        cache_bytes: int = 256 << 20,
    ):
        self.model = plain_weights(ckpt.model.to("cpu"))
        self.readout: Readout | None = ckpt.classifier
        self.spec = self.readout.spec if self.readout is not None else FeatureSpec()
        self.model_name = model_name
        self.default_neuron = ckpt.extra.get("default_neuron")
        self.texts, self.labels, self.stats = texts, labels, stats
        self.cache = StateCache(cache_bytes)
        self.lock = threading.Lock()  # one model call at a time: the model is not thread-safe
        self.n_features = self.spec.num_features(self.model.config)
        multi = self.readout is not None and self.readout.weight.dim() == 2
        self.classes = [str(c) for c in self.readout.classes] if multi else None  # K > 2 (None: binary)
        names = ckpt.extra.get("class_names")  # a binary readout's two labels, when not 0/1 (transfer.py)
        named = isinstance(names, list) and len(names) == 2 and all(isinstance(n, str) for n in names)
        self.binary_names = names if named else ["negative", "positive"]  # P(second) is the readout's P
        self.positive = positive_class(self.readout)
        self.weights = sentiment_weights(self.readout, self.positive)
        self.labelled = (
            labels is not None and set(np.unique(labels).tolist()) == {0, 1}  # binary labels of both classes
        )
        self.measures = {"spread": stats.features.std(axis=0)}
        if self.readout is not None:
            per_class = self.readout.weight.double().numpy().reshape(-1, self.n_features)
            self.measures["weight"] = np.abs(per_class).max(axis=0)
        if self.labelled:
            self.accuracy = threshold_accuracy(stats.features, labels)
            self.auc = auc(stats.features, labels)
            self.measures["separation"] = self.accuracy
            self.measures["auc"] = np.abs(self.auc - 0.5)
        else:
            self.accuracy = self.auc = None
        self.top_features = self.ranked(self.default_ranking())

    # ---- helpers

    def default_ranking(self) -> str:
        return "weight" if self.readout is not None else "separation" if self.labelled else "spread"

    def ranked(self, ranking: str) -> np.ndarray:
        if ranking not in self.measures:
            why = {
                "weight": "this model has no classifier (load a checkpoint written by transfer.py)",
                "separation": "the corpus has no labels of both classes",
                "auc": "the corpus has no labels of both classes",
            }.get(ranking, f"choose one of {', '.join(self.measures)}")
            raise ExploreError(f"cannot rank units by {ranking!r}: {why}")
        return np.argsort(-self.measures[ranking], kind="stable")

    def feature(self, index) -> Feature:
        """The feature ``index`` (a number, or its text from a URL), located by the readout's spec."""
        if isinstance(index, str):
            try:
                index = int(index)
            except ValueError:
                raise ExploreError(f"unit {index!r} is not a number") from None
        if index is None:
            raise ExploreError(f"give a unit: a feature number 0 .. {self.n_features - 1}")
        if isinstance(index, bool) or not isinstance(index, int):
            raise ExploreError(
                f"unit {index!r} is not a feature number (a whole number 0 .. {self.n_features - 1})"
            )
        try:
            pooling, layer, unit = self.spec.locate(index, self.model.config)
        except UsageError as e:
            raise ExploreError(str(e)) from None
        weight = None if self.weights is None else float(self.weights[index])
        return Feature(index, pooling, layer, unit, weight)

    def default_feature(self) -> int:
        if self.readout is not None and len(self.readout.neurons):
            return int(self.readout.neurons[0])
        if self.default_neuron is not None and self.default_neuron < self.n_features:
            return int(self.default_neuron)
        return int(self.top_features[0])

    def polarity(self, feature: Feature) -> int:
        """+1 or -1: turns a value into sentiment (the sign of its weight towards positive; +1 without)."""
        return -1 if feature.weight is not None and feature.weight < 0 else 1

    def unit_range(self, feature: Feature) -> float:
        return float(self.stats.unit_range[feature.layer * self.model.config.nhid + feature.unit])

    def text_states(self, text: str) -> TextStates:
        """Per-byte states of ``text`` preprocessed; the model runs from the cache's longest shared prefix."""
        if not isinstance(text, str):
            raise ExploreError("text must be a string")
        text = valid_unicode(text)
        if not text.strip():
            raise ExploreError("the text is empty: type a sentence to see the unit's values")
        if len(text) > MAX_TEXT_CHARS:
            raise ExploreError(
                f"the text has {len(text)} characters; the explorer reads at most {MAX_TEXT_CHARS} "
                "(about 10 s of model time on 2 CPU cores): shorten it",
                413,
            )
        tokens = encode_bytes(text, self.model.config.preprocess)
        if len(tokens) > MAX_TEXT_BYTES:
            raise ExploreError(
                f"the text is {len(tokens)} bytes after preprocessing; the explorer reads at most "
                f"{MAX_TEXT_BYTES}: shorten it",
                413,
            )
        return self.token_states(tokens)

    def token_states(self, tokens: bytes) -> TextStates:
        with self.lock:
            start, n = self.cache.longest_prefix(tokens)
            if start is not None and n == len(tokens) == len(start.tokens):
                return start
            states = run_states(self.model, tokens, start)
            self.cache.put(states)
        return states

    def many_token_states(self, texts: list[bytes]) -> list[TextStates]:
        """Per-byte states of several texts: those in the state cache from it, the others read in
        batches of similar length (at most ``BATCH_STATE_BYTES`` of states each) and cached."""
        cfg = self.model.config
        per_byte = 2 * cfg.nlayers * cfg.nhid * 4  # hidden and cell, float32
        with self.lock:
            found = {t: self.cache.entries[t] for t in texts if t in self.cache.entries}
            missing = sorted({t for t in texts if t not in found}, key=len, reverse=True)
            while missing:
                rows = max(1, BATCH_STATE_BYTES // (per_byte * max(1, len(missing[0]))))
                for states in run_states_batch(self.model, missing[:rows]):
                    found[states.tokens] = states
                    self.cache.put(states)
                missing = missing[rows:]
        return [found[t] for t in texts]

    def coloured(self, states: TextStates, feature: Feature) -> list[list]:
        """``[[character, value x polarity], ...]`` of the text itself (no preprocessing pads)."""
        seq = states.cell if self.spec.state == "cell" else states.hidden
        values = seq[:, feature.layer, feature.unit] * self.polarity(feature)
        shown = text_slice(states.tokens)
        return _chars_with_values(states.tokens[shown], values[shown])

    def prediction(self, states: TextStates) -> dict:
        """``p_positive`` (None where the readout has no positive class) and each class's probability."""
        if self.readout is None:
            return {"p_positive": None, "probabilities": None}
        probs = self.readout.probs(pooled_features(states, self.spec)[None])[0]
        if probs.ndim == 0:  # binary
            p = float(probs)
            return {
                "p_positive": p,
                "probabilities": [[self.binary_names[0], 1 - p], [self.binary_names[1], p]],
            }
        p = None if self.positive is None else float(probs[self.positive])
        return {
            "p_positive": p,
            "probabilities": [[c, float(q)] for c, q in zip(self.classes, probs)],
        }

    # ---- endpoints

    def info(self) -> dict:
        cfg = self.model.config
        return {
            "model": self.model_name,
            "architecture": f"{cfg.model}, {cfg.nlayers} layer(s) of {cfg.nhid} units, "
            f"preprocessing {cfg.preprocess}",
            "classifier": self.readout is not None,
            "classes": self.classes,
            "binary_names": None if self.readout is None or self.classes else self.binary_names,
            "pooling": self.spec.pooling,
            "state": self.spec.state,
            "n_features": self.n_features,
            "corpus": {"texts": len(self.texts), "labelled": self.labelled},
            "rankings": {k: RANKINGS[k] for k in RANKINGS if k in self.measures},
            "default_ranking": self.default_ranking(),
            "default_feature": self.default_feature(),
            "top": [self.unit_row(int(f)) for f in self.top_features[:N_TRACES]],
            "max_text_chars": MAX_TEXT_CHARS,
            "max_steer_bytes": MAX_STEER_BYTES,
        }

    def unit_row(self, index: int) -> dict:
        feature = self.feature(index)
        row = feature.to_json()
        row["accuracy"] = None if self.accuracy is None else float(self.accuracy[index])
        row["auc"] = None if self.auc is None else float(self.auc[index])
        row["spread"] = float(self.measures["spread"][index])
        row["range"] = self.unit_range(feature)
        if self.classes is not None:
            weights = self.readout.weight[:, index].tolist()
            row["class_weights"] = [[c, w] for c, w in zip(self.classes, weights)]
        return row

    def analyse_text(self, text: str, feature_index) -> dict:
        started = time.perf_counter()
        feature = self.feature(self.default_feature() if feature_index is None else feature_index)
        states = self.text_states(text)
        traces = []
        seen = set()
        seq = states.cell if self.spec.state == "cell" else states.hidden
        shown = text_slice(states.tokens)
        for f in self.top_features[:N_TRACES]:
            other = self.feature(int(f))
            if (other.layer, other.unit) in seen:
                continue
            seen.add((other.layer, other.unit))
            values = seq[shown, other.layer, other.unit] * self.polarity(other)
            traces.append(
                {**other.to_json(), "range": self.unit_range(other), "values": values.round(4).tolist()}
            )
        return {
            "unit": self.unit_row(feature.index),
            "polarity": self.polarity(feature),
            "range": self.unit_range(feature),
            "chars": self.coloured(states, feature),
            **self.prediction(states),
            "traces": traces,
            "ms": round(1000 * (time.perf_counter() - started), 1),
        }

    def unit_page(self, feature_index) -> dict:
        feature = self.feature(feature_index)
        column = self.stats.features[:, feature.index]
        edges = np.histogram_bin_edges(column, bins=HISTOGRAM_BINS)
        histogram = {"edges": edges.tolist()}
        if self.labelled:
            histogram["negative"] = np.histogram(column[self.labels == 0], edges)[0].tolist()
            histogram["positive"] = np.histogram(column[self.labels == 1], edges)[0].tolist()
        else:
            histogram["all"] = np.histogram(column, edges)[0].tolist()
        order = np.argsort(column, kind="stable")
        most, least = order[::-1][:N_EXTREME], order[:N_EXTREME]
        chosen = [int(i) for i in np.concatenate([most, least])]
        tokens = [encode_bytes(self.texts[i], self.model.config.preprocess)[:MAX_TEXT_BYTES] for i in chosen]
        states = self.many_token_states(tokens)
        polarity = self.polarity(feature)

        def rows(indices) -> list[dict]:
            out = []
            for i in indices:
                row = {
                    "index": int(i),
                    "value": float(column[i]),
                    "chars": self.coloured(states[chosen.index(int(i))], feature),
                }
                if self.labels is not None:
                    row["label"] = int(self.labels[i])
                out.append(row)
            return out

        return {
            "unit": self.unit_row(feature.index),
            "polarity": polarity,
            "range": self.unit_range(feature),
            "histogram": histogram,
            "most": rows(most),
            "least": rows(least),
        }

    def rank_units(self, ranking: str | None, query: str = "", limit: int = 50) -> dict:
        ranking = ranking or self.default_ranking()
        order = self.ranked(ranking)
        query = (query or "").strip()
        if query:
            try:
                number = int(query)
            except ValueError:
                raise ExploreError(f"search for a unit or feature number, got {query!r}") from None
            # the feature itself, and every feature reading that unit (other poolings and layers)
            keep = (order == number) | (order % self.model.config.nhid == number)
            order = order[keep]
        return {
            "ranking": ranking,
            "described": RANKINGS[ranking],
            "units": [self.unit_row(int(f)) for f in order[: max(1, min(int(limit), 500))]],
        }

    def steer(self, request: dict, emit: Callable[[dict], None]) -> None:
        """Generate from ``prompt`` with the unit forced; ``emit`` receives the characters as they come."""
        prompt = request.get("prompt", "")
        if not isinstance(prompt, str) or len(prompt) > MAX_TEXT_CHARS:
            raise ExploreError(f"the prompt must be a text of at most {MAX_TEXT_CHARS} characters", 413)
        length = _number(request, "length", 200, int, 1, MAX_STEER_BYTES)
        temperature = _number(request, "temperature", 1.0, float, 0.0, 10.0)
        seed = _number(request, "seed", 0, int, 0, 2**31 - 2)
        feature = self.feature(request.get("feature", self.default_feature()))
        mode = request.get("mode", "hidden")
        if mode not in ("hidden", "cell"):
            raise ExploreError(f"mode must be hidden or cell, got {mode!r}")
        force = request.get("value")
        if force is not None:
            force = _number(request, "value", 0.0, float, -100.0, 100.0)
        polarity = self.polarity(feature)
        neuron = self._neuron(feature)
        prompt = valid_unicode(prompt)
        prefix = warmup_tokens(prompt, self.model.config.preprocess)
        shown_from = text_slice(prefix.tobytes()).start
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = {"chars": []}

        def on_byte(index: int, byte: int, value: float | None) -> None:
            if index < shown_from:
                return
            for char in decoder.decode(bytes([byte])):
                pending["chars"].append([char, round(float(value) * polarity, 4), index >= len(prefix)])
            if len(pending["chars"]) >= 16:
                emit({"chars": pending["chars"]})
                pending["chars"] = []

        emit(
            {
                "unit": self.unit_row(feature.index),
                "range": self.unit_range(feature),
                "polarity": polarity,
                "written": None if force is None else force * polarity,
                "seed": seed,
            }
        )
        prompt_bytes = len(prefix) - shown_from  # gen_length counts these, not the "\n " before them
        with self.lock:
            result = generate(
                self.model,
                prompt,
                gen_length=prompt_bytes + length,
                temperature=temperature,
                seed=seed,
                neuron=neuron,
                overwrite=None if force is None else force * polarity,
                overwrite_mode=mode,
                device="cpu",
                on_byte=on_byte,
            )
        if pending["chars"]:
            emit({"chars": pending["chars"]})
        states = (
            self.text_states(result.text)
            if result.text.strip() and len(result.text) <= MAX_TEXT_CHARS
            else None
        )
        emit(
            {
                "done": True,
                "text": result.text,
                "generated_bytes": len(result.tokens) - result.n_warmup,
                **(
                    self.prediction(states)
                    if states is not None
                    else {"p_positive": None, "probabilities": None}
                ),
            }
        )

    def _neuron(self, feature: Feature) -> Neuron:
        return Neuron(feature.index, feature.layer, feature.unit, self.spec.state, feature.weight)


def valid_unicode(text: str) -> str:
    """``text`` with each lone surrogate (JSON can spell one, "\\ud800"; no UTF-8 byte sequence is one)
    replaced by U+FFFD, as an invalid byte of a file is."""
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def _number(request: dict, key: str, default, kind: type, low, high):
    value = request.get(key, default)
    try:
        value = kind(value)
    except (TypeError, ValueError):
        raise ExploreError(f"{key} must be a number, got {value!r}") from None
    if not (math.isfinite(value) and low <= value <= high):
        raise ExploreError(f"{key} must be within {low} .. {high}, got {value}")
    return value


def _chars_with_values(tokens: bytes, values: np.ndarray) -> list[list]:
    """``[[character, value after its last byte], ...]`` (an invalid UTF-8 byte shows as U+FFFD)."""
    return [[char, round(float(values[i]), 4)] for i, char in char_cells(tokens)]


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    """Static files of ``web/`` and the JSON endpoints of ``Explorer`` (``server.explorer``)."""

    server_version = "sentiment-discovery-explore"
    protocol_version = "HTTP/1.1"
    verbose = False

    @property
    def explorer(self) -> Explorer:
        return self.server.explorer

    def log_message(self, format, *args):  # noqa: A002 (BaseHTTPRequestHandler's name)
        if self.verbose:
            super().log_message(format, *args)

    def do_GET(self):
        self._answer(self._get)

    def do_POST(self):
        self._answer(self._post)

    def _answer(self, route: Callable[[str, dict], None]) -> None:
        try:
            self._check_host()
            url = urllib.parse.urlsplit(self.path)
            try:
                query = dict(urllib.parse.parse_qsl(url.query, errors="strict"))
            except UnicodeDecodeError:
                raise ExploreError("the query is not valid UTF-8") from None
            route(url.path, query)
        except ExploreError as e:
            self._json({"error": str(e)}, e.status)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the tab went away
        except Exception as e:  # a bug: one line to the page, the traceback to the console only
            traceback.print_exc()
            self._json({"error": f"internal error ({type(e).__name__}): see the server's console"}, 500)

    def _check_host(self) -> None:
        # Only pages served from this address may call the API (a rebound DNS name reaching 127.0.0.1 cannot).
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].strip("[]")
        if host not in ("127.0.0.1", "localhost", "::1"):
            raise ExploreError(f"Host {host!r} refused: open the app as http://127.0.0.1:<port>/", 403)

    def _get(self, path: str, query: dict) -> None:
        if path in ("/", "/index.html"):
            return self._static("index.html")
        if path.startswith("/static/"):
            return self._static(path.removeprefix("/static/"))
        if path == "/api/info":
            return self._json(self.explorer.info())
        if path == "/api/unit":
            return self._json(self.explorer.unit_page(query.get("feature")))
        if path == "/api/units":
            return self._json(
                self.explorer.rank_units(
                    query.get("rank"), query.get("q", ""), _int(query.get("limit", "50"))
                )
            )
        raise ExploreError(f"no page {path}", 404)

    def _post(self, path: str, query: dict) -> None:
        body = self._body()
        if path == "/api/text":
            return self._json(self.explorer.analyse_text(body.get("text", ""), body.get("feature")))
        if path == "/api/steer":
            return self._stream(lambda emit: self.explorer.steer(body, emit))
        raise ExploreError(f"no endpoint {path}", 404)

    def _body(self) -> dict:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise ExploreError("a request body needs a Content-Length", 411) from None
        if length > MAX_BODY_BYTES:
            self.close_connection = True  # the body is not read
            raise ExploreError(f"the request is {length} bytes; at most {MAX_BODY_BYTES} are read", 413)
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ExploreError(
                f"the request is not valid UTF-8 (byte {e.start}: {raw[e.start : e.start + 1]!r})"
            ) from None
        except json.JSONDecodeError as e:
            raise ExploreError(f"the request is not JSON ({e.msg} at character {e.pos})") from None
        if not isinstance(body, dict):
            raise ExploreError("the request must be a JSON object")
        return body

    def _static(self, name: str) -> None:
        files = {p.name: p for p in WEB_DIR.iterdir() if p.is_file()}  # no path from the URL is opened
        if name not in files or files[name].suffix not in STATIC_TYPES:
            raise ExploreError(f"no file {name}", 404)
        data = files[name].read_bytes()
        self._send(200, STATIC_TYPES[files[name].suffix] + "; charset=utf-8", data)

    def _json(self, obj: dict, status: int = 200) -> None:
        self._send(status, "application/json", json.dumps(obj, ensure_ascii=False).encode("utf-8"))

    def _send(self, status: int, content_type: str, data: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, produce: Callable[[Callable[[dict], None]], None]) -> None:
        """Newline-delimited JSON, written as it is produced (the connection closes at its end); an error
        after the first line is sent as a last ``{"error": ...}`` line."""
        started = False

        def emit(obj: dict) -> None:
            nonlocal started
            if not started:
                self.send_response(200)
                self.send_header("Content-Type", "application/x-ndjson")
                self.send_header("Cache-Control", "no-store")
                self.send_header("Connection", "close")
                self.end_headers()
                started = True
            self.wfile.write(json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n")
            self.wfile.flush()

        self.close_connection = True
        try:
            produce(emit)
        except ExploreError as e:
            if not started:
                raise
            emit({"error": str(e)})


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ExploreError(f"limit must be a number, got {text!r}") from None


class ExploreServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, explorer: Explorer, port: int = 8000, host: str = "127.0.0.1"):
        super().__init__((host, port), Handler)
        self.explorer = explorer


# --------------------------------------------------------------------------------------------
# explore.py
# --------------------------------------------------------------------------------------------


def load_explorer(
    load_model: str | None,
    data: str,
    max_texts: int = 1000,
    read: ReadOptions | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Explorer:
    """The model, the first ``max_texts`` texts of ``data`` and their statistics, computed once and
    cached (``stats_dirs``: beside the model unless ``cache_dir``)."""
    model_path = resolve_model_path(load_model)
    ckpt = load_checkpoint(load_model)
    ckpt.model = plain_weights(ckpt.model.to("cpu"))
    spec = ckpt.classifier.spec if ckpt.classifier is not None else FeatureSpec()
    records = read_records(data, read, need_labels=None)
    texts = records.texts[:max_texts]
    labels = None if records.labels is None else records.labels[:max_texts]
    key = stats_key(model_path, data, len(texts), spec)
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24] + ".npz"
    shapes = (len(texts), spec.num_features(ckpt.config), ckpt.config.nhid * ckpt.config.nlayers)
    folders = stats_dirs(model_path, cache_dir)
    for folder in folders:
        stats = CorpusStats.load(folder / name, key, *shapes)
        if stats is not None:
            log(f"corpus statistics of {len(texts)} texts of {data}: from the cache {folder / name}")
            return Explorer(ckpt, str(load_model or "default"), texts, labels, stats)
    log(f"corpus statistics of {len(texts)} texts of {data}: computed once, then cached")
    started = time.perf_counter()
    stats = compute_corpus_stats(ckpt.model, spec, texts, progress)
    log(f"corpus statistics done in {time.perf_counter() - started:.1f} s")
    for folder in folders:
        try:
            stats.save(folder / name, key)
        except OSError as e:
            log(f"note: cannot cache the statistics in {folder} ({e})")
            continue
        log(f"corpus statistics cached in {folder / name}")
        break
    else:
        log("note: the statistics will be computed again next time")
    return Explorer(ckpt, str(load_model or "default"), texts, labels, stats)


def build_parser() -> argparse.ArgumentParser:
    p = cli.script_parser(
        "Serve the neuron explorer on http://127.0.0.1:PORT (no network use).",
        "max_texts",
    )
    cli.add_load_model_flag(p, "language model or transferred checkpoint", "the shipped model")
    p.add_argument(
        "--data",
        default=DEFAULT_DATA,
        help=f"labelled csv/json whose texts the unit pages show (default {DEFAULT_DATA})",
    )
    cli.add_read_flags(p)
    p.add_argument(
        "--max_texts",
        type=cli.int_at_least(1),
        default=1000,
        help="use the first N texts of --data (default 1000)",
    )
    p.add_argument(
        "--port",
        type=cli.int_at_least(0),
        default=8000,
        help="port on 127.0.0.1 (default 8000; 0: any free port)",
    )
    p.add_argument(
        "--cache_dir",
        default=None,
        help=f"where the corpus statistics are cached (default: beside the model, <model>.explore/; where "
        f"that is not writable ${CACHE_ENV} or ~/.cache/sentiment_discovery, /explore)",
    )
    p.add_argument("--verbose", action="store_true", help="log every request")
    return p


def run_explore(args: argparse.Namespace) -> None:
    """explore.py's body: load, then serve until Ctrl-C."""
    if args.data == DEFAULT_DATA and not Path(DEFAULT_DATA).exists():
        raise DataError(
            f"{DEFAULT_DATA}: not found (Binary SST ships in data/binary_sst/ of the repository: run from "
            "its root, or give --data)"
        )
    explorer = load_explorer(
        args.load_model, args.data, args.max_texts, ReadOptions.from_args(args), args.cache_dir
    )
    try:
        server = ExploreServer(explorer, args.port)
    except OSError as e:
        raise UsageError(f"--port {args.port}: cannot listen on 127.0.0.1 ({e.strerror})") from None
    Handler.verbose = args.verbose
    print(f"neuron explorer on http://127.0.0.1:{server.server_address[1]}/  (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def main(argv: list[str] | None = None) -> int:
    return cli.run_script(build_parser(), run_explore, argv)


if __name__ == "__main__":
    sys.exit(main())
