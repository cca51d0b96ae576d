"""transfer.py's features, computed once per model, data file and feature settings: saved under the
original's names (``trXt.npy``, ``vaXt.npy``, ``teXt.npy``) with the key they were computed under beside
them (``trXt.key.json``), and reused with ``--use_cached`` when that key matches.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from .featurize import featurize
from .model import RNNModel
from .readers import Records
from .readout import FeatureSpec
from .safe_io import save_npy, write_text

# The original's file names: trXt.npy (features), trY.npy (labels), and va/te for validation and test.
SPLIT_PREFIX = {"train": "tr", "val": "va", "test": "te"}


def file_digest(path: str | Path) -> str:
    """sha256 of a file, or of the sorted files of a directory (an OpenAI shard folder)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for file in files:
        h.update(file.relative_to(path).as_posix().encode() if path.is_dir() else b"")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


class FeatureCache:
    """Features of each split in ``folder`` with their key: model file digest, data file digest, pooling,
    state, layers, preprocessing and reading options (``base_key``). A cached file is reused only when
    its key matches."""

    def __init__(self, folder: Path, base_key: dict):
        self.folder, self.base_key = folder, base_key
        self._keys: dict[str, dict] = {}  # per data file: its digest is read once per run

    def _paths(self, split: str) -> tuple[Path, Path]:
        name = f"{SPLIT_PREFIX[split]}Xt"
        return self.folder / f"{name}.npy", self.folder / f"{name}.key.json"

    def key(self, data_path: str) -> dict:
        if data_path not in self._keys:
            self._keys[data_path] = {
                **self.base_key,
                "data": str(Path(data_path).resolve()),
                "data_sha256": file_digest(data_path),
            }
        return self._keys[data_path]

    def load(self, split: str, data_path: str, n_texts: int) -> np.ndarray | None:
        npy, meta = self._paths(split)
        if not (npy.exists() and meta.exists()):
            return None
        try:
            if json.loads(meta.read_text()) != self.key(data_path):
                return None
            features = np.load(npy)
        except (OSError, ValueError):
            return None
        return features if features.shape[0] == n_texts else None

    def save(self, split: str, data_path: str, features: np.ndarray) -> None:
        npy, meta = self._paths(split)
        key = self.key(data_path)
        save_npy(npy, features)
        write_text(meta, json.dumps(key, indent=1))


def cached_features(
    model: RNNModel,
    records: dict[str, Records],
    spec: FeatureSpec,
    folder: Path,
    key: dict,
    model_file: str | Path,
    *,
    use_cached: bool = False,
    carved: tuple[str, ...] | list[str] = (),
    batch_size: int = 128,
    fp16: bool = False,
    bf16: bool = False,
) -> dict[str, np.ndarray]:
    """Each split's features ``[n, F]``: from ``folder`` when ``use_cached`` and the key they were saved
    under matches (``key``: how they were computed, with the digest of ``model_file`` added; see
    ``FeatureCache``), else featurized (with a progress bar) and saved there."""
    cache = FeatureCache(folder, {"model_sha256": file_digest(model_file), **key})
    features = {}
    for split, recs in records.items():
        cached = cache.load(split, recs.path, len(recs)) if use_cached else None
        if cached is not None:
            print(f"{split}: using cached features from {folder}")
            features[split] = cached
            continue
        part = " (its --split part)" if split in carved else ""
        print(f"{split}: featurizing {len(recs)} texts from {recs.path}{part}")
        features[split] = featurize(
            model, recs.texts, batch_size=batch_size, spec=spec, progress=True, fp16=fp16, bf16=bf16
        )
        cache.save(split, recs.path, features[split])
    return features
