"""The bodies of transfer.py (``run_transfer``) and classifier.py (``run_classifier``), with what only
they use: the labelled splits read with the data flags, the feature cache, the results files
(predictions, extreme samples, results.json). The regression itself is regression.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .encoder import Encoder
from .errors import CheckpointError, DataError, UsageError
from .featurize import featurize
from .formats import DEFAULT_MODEL, first_existing_model, resolve_model_path
from .readers import ReadOptions, Records, is_json_path, read_records
from .readout import FeatureSpec, top_neurons
from .regression import (
    CV_FOLDS,
    Regression,
    accuracy,
    c_sweep,
    fit_l1_regression,
    make_classifier,
    standardizer,
)
from .safe_io import atomic_write, save_npy, write_text

SPLITS = ("train", "val", "test")
N_EXTREME = 10  # texts shown at each end of the top neuron's range


# --------------------------------------------------------------------------------------------
# Results files
# --------------------------------------------------------------------------------------------


def write_predictions(
    path: str | Path,
    records: Records,
    probs: np.ndarray,
    top_probs: np.ndarray,
    neurons: np.ndarray,
    features: np.ndarray,
    text_key: str,
    label_key: str,
) -> None:
    """One row per text: the text, its true label (``label_key``, when the file has labels), the
    ``predicted`` label, ``prob`` (P(positive), all features), ``prob_top<N>`` (P(positive) from the top
    N neurons alone) and ``neuron <k>`` (each top neuron's value). json when ``path`` ends in .json
    (.jsonl: one object per line), csv otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = {text_key: records.texts}
    if records.labels is not None:
        columns[label_key] = records.labels
    columns["predicted"] = (probs > 0.5).astype(int)
    columns["prob"] = probs
    columns[f"prob_top{len(neurons)}"] = top_probs
    for k in neurons:
        columns[f"neuron {int(k)}"] = features[:, int(k)]
    frame = pd.DataFrame(columns)
    lines = path.suffix.lower() == ".jsonl"
    if is_json_path(path):
        atomic_write(path, lambda tmp: frame.to_json(tmp, orient="records", lines=lines, force_ascii=False))
    else:
        atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


def extreme_samples(values: np.ndarray, records: Records, n: int = N_EXTREME) -> dict:
    """The texts with the most positive and most negative values of one neuron."""
    order = np.argsort(values, kind="stable")

    def rows(indices):
        out = []
        for i in indices:
            row = {"value": float(values[i]), "text": records.texts[i]}
            if records.labels is not None:
                row["label"] = int(records.labels[i])
            out.append(row)
        return out

    return {"most_positive": rows(order[::-1][:n]), "most_negative": rows(order[:n])}


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
    """Features saved as ``features_<split>.npy`` with the key they were computed under beside them
    (``features_<split>.json``): model file digest, data file digest, pooling, state, layers,
    preprocessing and reading options. A cached file is reused only when its key matches."""

    def __init__(self, folder: Path, base_key: dict):
        self.folder, self.base_key = folder, base_key

    def _paths(self, split: str) -> tuple[Path, Path]:
        return self.folder / f"features_{split}.npy", self.folder / f"features_{split}.json"

    def key(self, data_path: str) -> dict:
        return {
            **self.base_key,
            "data": str(Path(data_path).resolve()),
            "data_sha256": file_digest(data_path),
        }

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
        save_npy(npy, features)
        write_text(meta, json.dumps(self.key(data_path), indent=1))


# --------------------------------------------------------------------------------------------
# transfer.py
# --------------------------------------------------------------------------------------------


def default_results_dir(load_model: str) -> Path:
    """``<model stem>_transfer/`` beside the model: lang_model.pt -> lang_model_transfer/ (an alias such
    as default or openai -> default_transfer/, openai_transfer/ in the working directory)."""
    path = Path(load_model)
    return path.with_name(path.stem + "_transfer")


def _check_architecture(ckpt: Checkpoint, args: argparse.Namespace) -> None:
    """--model/--emsize/--nhid/--nlayers are only a check: the checkpoint records its architecture."""
    config = ckpt.config
    for flag in ("model", "emsize", "nhid", "nlayers"):
        given = getattr(args, flag, None)
        if given is not None and given != getattr(config, flag):
            raise DataError(
                f"{args.load_model}: --{flag} {given} does not match the checkpoint's "
                f"{flag} = {getattr(config, flag)}"
            )


def _read_labelled(
    args: argparse.Namespace, path: str, need_labels: bool | None, multiclass: bool = False
) -> Records:
    """``path`` read with the data flags; ``need_labels=None``: labels when the file has them."""
    return read_records(path, ReadOptions.from_args(args), need_labels=need_labels, multiclass=multiclass)


def _read_split(args: argparse.Namespace, split: str, path: str, need_labels: bool) -> Records:
    try:
        return _read_labelled(args, path, need_labels)
    except DataError as e:
        hint = ""
        if not Path(path).exists() and Path(path).parts[:2] == ("data", "binary_sst"):
            hint = " (Binary SST ships in data/binary_sst/ of the repository: run from its root)"
        elif split == "test" and need_labels:
            hint = " (an unlabelled test set? pass --no_test_eval)"
        raise DataError(f"{split} split: {e}{hint}") from None


def _check_both_classes(split: str, records: Records) -> None:
    classes = np.unique(records.labels)
    if len(classes) < 2:
        raise DataError(
            f"{split} split: {records.path}: every label is {int(classes[0])}; fitting (train) and "
            "choosing C (val) need texts of both classes, 0 and 1"
        )


def _report(name: str, reg: Regression, acc: dict[str, float], n_features: int) -> str:
    accs = ", ".join(f"{split} {100 * a:.2f}%" for split, a in acc.items())
    note = "" if reg.converged else " (did not converge: raise --epochs)"
    if reg.nonzero == 0:
        note += " (all weights zero: the features carry no usable signal at these C; widen --log2_C)"
    return f"{name}: {accs}; C = {reg.C:g}; {reg.nonzero}/{n_features} non-zero weights{note}"


def given_path(value: str | None) -> str | None:
    """A file flag's value, or None for an absent one (``''`` or ``none``)."""
    return None if value is None or value.strip().lower() in ("", "none") else value


def _choose_model(given: str, *outputs: str) -> str:
    """``--load_model``, else the first existing output of an earlier script, else the shipped model
    (said, so that a user knows whose model answered)."""
    chosen = given or first_existing_model(*outputs)
    if chosen == "default":
        print(f"model: the shipped default model ({DEFAULT_MODEL.name}); pass --load_model for your own")
    return chosen


def run_transfer(args: argparse.Namespace) -> dict:
    """Run transfer.py with its parsed options; returns the results dict also written to results.json."""
    from .plots import plot_neuron_histograms, plot_weights

    if args.neurons < 1:
        raise UsageError(f"--neurons {args.neurons}: the second regression needs at least one neuron")
    if args.write_results and not given_path(args.test):
        raise UsageError("--write_results writes the test texts' predictions, and there is no --test file")
    Cs = c_sweep(*args.log2_C)
    args.load_model = _choose_model(args.load_model, "lang_model.pt")
    ckpt = load_checkpoint(args.load_model)
    _check_architecture(ckpt, args)
    model = ckpt.model
    # Unset features settings follow a transferred model's own classifier (the original's otherwise).
    recorded = ckpt.classifier.spec if ckpt.classifier is not None else FeatureSpec()
    args.pooling = FeatureSpec.parse(args.pooling or recorded.pooling).pooling
    args.state = args.state or recorded.state
    out_dir = Path(args.save_results) if args.save_results else default_results_dir(args.load_model)
    out_dir.mkdir(parents=True, exist_ok=True)

    paths = {"train": args.data, "val": given_path(args.valid), "test": given_path(args.test)}
    paths = {split: path for split, path in paths.items() if path is not None}
    if "val" not in paths:
        print(f"no validation split: C chosen by {CV_FOLDS}-fold cross-validation on the training split")
    records = {
        split: _read_split(args, split, path, need_labels=not (split == "test" and args.no_test_eval))
        for split, path in paths.items()
    }
    for split in ("train", "val"):  # before featurizing: fitting, and choosing C, need both classes
        if split in records:
            _check_both_classes(split, records[split])

    cache = FeatureCache(
        out_dir,
        {
            "model_sha256": file_digest(resolve_model_path(args.load_model)),
            "pooling": args.pooling,
            "state": args.state,
            "all_layers": args.all_layers,
            "preprocess": model.config.preprocess,
            "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
            "text_key": args.text_key,
            "delim": args.delim,
            "loose_json": args.loose_json,
        },
    )
    features = {}
    for split, recs in records.items():
        cached = cache.load(split, recs.path, len(recs)) if args.use_cached else None
        if cached is not None:
            print(f"{split}: using cached features from {out_dir}")
            features[split] = cached
            continue
        print(f"{split}: featurizing {len(recs)} texts from {recs.path}")
        features[split] = featurize(
            model,
            recs.texts,
            batch_size=args.batch_size,
            pooling=args.pooling,
            state=args.state,
            all_layers=args.all_layers,
            progress=True,
            fp16=args.fp16,
            bf16=args.bf16,
        )
        cache.save(split, recs.path, features[split])

    mean, scale = standardizer(features["train"])
    std = {split: (f - mean) / scale for split, f in features.items()}
    labels = {split: r.labels for split, r in records.items() if r.labels is not None}
    n_features = features["train"].shape[1]

    def fit_on(columns: np.ndarray | None) -> Regression:
        pick = (lambda x: x) if columns is None else (lambda x: x[:, columns])
        val_x = pick(std["val"]) if "val" in std else None
        return fit_l1_regression(
            pick(std["train"]), labels["train"], val_x, labels.get("val"), Cs, args.epochs, args.seed
        )

    def accuracies(probs: dict[str, np.ndarray]) -> dict[str, float]:
        return {split: accuracy(probs[split], y) for split, y in labels.items()}

    full = fit_on(None)
    neurons = top_neurons(full.weight, args.neurons)
    classifier = make_classifier(full, mean, scale, neurons, args.pooling, args.state, args.all_layers)
    # Probabilities come from the stored classifier, exactly as classifier.py computes them.
    probs = {split: classifier.probs(f) for split, f in features.items()}
    full_acc = accuracies(probs)
    print(_report("all features", full, full_acc, n_features))

    results = {
        "load_model": str(args.load_model),
        "pooling": args.pooling,
        "state": args.state,
        "all_layers": args.all_layers,
        "standardized": True,
        "C_sweep": Cs,
        "C_chosen_by": "validation" if "val" in records else f"{CV_FOLDS}-fold cross-validation on train",
        "all_features": {
            "accuracy": full_acc,
            "C": full.C,
            "nonzero_weights": full.nonzero,
            "n_features": n_features,
            "val_accuracy_by_C": full.val_accuracy_by_C,
        },
        "neurons": {"indices": neurons.tolist(), "weights": full.weight[neurons].tolist()},
    }
    # --neurons >= 1 and top_neurons keeps at least one feature: there is always a top set
    top = fit_on(neurons)
    top_probs = {split: top.probs(x[:, neurons]) for split, x in std.items()}
    top_acc = accuracies(top_probs)
    print(_report(f"top {len(neurons)} neuron(s) {neurons.tolist()}", top, top_acc, len(neurons)))
    results["neurons"].update(
        {"accuracy": top_acc, "C": top.C, "refit_weights": top.weight.tolist(), "refit_bias": top.bias}
    )
    if args.drop_neurons:
        rest = np.setdiff1d(np.arange(n_features), neurons)
        dropped = fit_on(rest)
        dropped_acc = accuracies({split: dropped.probs(x[:, rest]) for split, x in std.items()})
        print(_report(f"without the top {len(neurons)} neuron(s)", dropped, dropped_acc, len(rest)))
        results["drop_neurons"] = {
            "accuracy": dropped_acc,
            "C": dropped.C,
            "nonzero_weights": dropped.nonzero,
        }

    for split, p in probs.items():
        save_npy(out_dir / f"probs_{split}.npy", p.astype(np.float32))
    for split, y in labels.items():  # beside features_<split>.npy: the saved features stand on their own
        save_npy(out_dir / f"labels_{split}.npy", y)
    shown = next(split for split in ("test", "val", "train") if split in records)
    top_values = features[shown][:, neurons[0]]
    results["extreme_samples_split"] = shown
    write_text(
        out_dir / "extreme_samples.json",
        json.dumps(extreme_samples(top_values, records[shown]), indent=1, ensure_ascii=False),
    )
    hist_split = next(split for split in ("test", "val", "train") if split in labels)
    results["histogram_split"] = hist_split
    plot_neuron_histograms(
        features[hist_split], labels[hist_split], neurons, out_dir / "logit_vis", f" ({hist_split})"
    )
    plot_weights(full.weight, neurons, out_dir / "weights.png")
    write_text(out_dir / "results.json", json.dumps(_jsonable(results), indent=1))
    save_checkpoint(out_dir / "classifier.pt", model, classifier=classifier)
    if args.write_results and "test" in records:
        write_predictions(
            args.write_results,
            records["test"],
            probs["test"],
            top_probs["test"],
            neurons,
            features["test"],
            args.text_key,
            args.label_key,
        )
        print(f"wrote test predictions to {args.write_results}")
    print(f"results in {out_dir}/ (classifier: {out_dir / 'classifier.pt'})")
    return results


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


# --------------------------------------------------------------------------------------------
# classifier.py
# --------------------------------------------------------------------------------------------


def _report_classes(
    records: Records, probs: np.ndarray, classes: tuple[str, ...], encoder: Encoder, kept: str
) -> None:
    """classifier.py's lines for a classifier of more than two classes: counts, accuracy, per-text class."""
    predicted = probs.argmax(axis=1)
    counts = ", ".join(f"{int((predicted == k).sum())} {name}" for k, name in enumerate(classes))
    print(
        f"{len(probs)} texts from {records.path}; pooling {encoder.pooling}, state {encoder.state}, {kept} "
        f"classifier weights; {counts}"
    )
    if records.labels is not None:
        names = np.array([str(int(v)) for v in records.labels])
        print(f"accuracy {100 * float(np.mean(names == np.array(classes)[predicted])):.2f}%")
    if records.path == "--text":
        for text, row, k in zip(records.texts, probs, predicted):
            print(f"{row[k]:.4f}  {classes[k]}  {text[:80]!r}")


def run_classifier(args: argparse.Namespace) -> np.ndarray:
    """Run classifier.py with its parsed options; returns the probabilities also saved to --save_probs."""
    args.load_model = _choose_model(args.load_model, "lang_model_transfer/classifier.pt")
    encoder = Encoder.load(args.load_model, batch_size=args.batch_size, fp16=args.fp16, bf16=args.bf16)
    if encoder.classifier is None:
        raise CheckpointError(
            f"{args.load_model}: holds a language model but no sentiment classifier: run transfer.py on it "
            "first and pass the classifier.pt it writes (e.g. lang_model_transfer/classifier.pt)"
        )
    if args.all_layers and not encoder.all_layers:
        raise CheckpointError(
            f"{args.load_model}: --all_layers given, but this classifier uses the last layer only"
        )
    readout = encoder.classifier
    if readout.classes is not None and args.write_results:
        raise UsageError(
            f"--write_results: {args.load_model} holds a {len(readout.classes)}-class classifier; the "
            "per-text results file is written for binary ones (the probabilities go to --save_probs)"
        )
    if args.text:
        records = Records("--text", list(args.text))
    else:
        records = _read_labelled(args, args.data, need_labels=None, multiclass=readout.classes is not None)
    features = encoder.transform(records.texts, progress=True)
    probs = readout.probs(features, args.neurons)

    save_probs = Path(args.save_probs)
    if not os.path.dirname(args.save_probs):  # a bare file name goes beside the model, as the original's
        save_probs = Path(args.load_model).parent / save_probs
    save_probs.parent.mkdir(parents=True, exist_ok=True)
    if save_probs.suffix != ".npy":  # np.save adds it: say the name of the file it writes
        save_probs = save_probs.with_name(save_probs.name + ".npy")
    save_npy(save_probs, probs.astype(np.float32))
    kept = "all" if args.neurons < 0 else f"top {args.neurons}"
    if readout.classes is not None:
        _report_classes(records, probs, readout.classes, encoder, kept)
        print(f"probabilities saved to {save_probs} ([texts, classes], classes {', '.join(readout.classes)})")
        return probs
    print(
        f"{len(probs)} texts from {records.path}; pooling {encoder.pooling}, state {encoder.state}, "
        f"{kept} classifier weights; {int((probs > 0.5).sum())} positive, {int((probs <= 0.5).sum())} "
        "negative"
    )
    if records.labels is not None:
        print(f"accuracy {100 * accuracy(probs, records.labels):.2f}%")
    if args.text:
        for text, p in zip(records.texts, probs):
            print(f"{p:.4f}  {'positive' if p > 0.5 else 'negative'}  {text[:80]!r}")
    print(f"probabilities saved to {save_probs}")
    if args.write_results:
        # top N: --neurons, else the neurons transfer.py kept; their probability masks the other weights
        n_top = args.neurons if args.neurons >= 0 else len(readout.neurons)
        neurons = top_neurons(readout.weight, n_top)
        write_predictions(
            args.write_results,
            records,
            probs if args.neurons < 0 else readout.probs(features),
            probs if args.neurons >= 0 else readout.probs(features, len(neurons)),
            neurons,
            features,
            args.text_key,
            args.label_key,
        )
        print(f"predictions written to {args.write_results}")
    return probs
