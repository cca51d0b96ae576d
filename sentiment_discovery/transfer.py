"""The bodies of transfer.py (``run_transfer``) and classifier.py (``run_classifier``), with what only
they use: the labelled splits read with the data flags, the feature cache, the results files
(predictions, extreme samples, results.json). The regression itself is regression.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from .checkpoint import check_replaceable, load_checkpoint, save_checkpoint
from .encoder import Encoder
from .errors import CheckpointError, DataError, UsageError
from .featurize import featurize
from .formats import first_existing_model, resolve_model_path
from .readers import (
    ReadOptions,
    Records,
    class_names,
    class_numbers,
    is_json_path,
    label_name,
    parse_split,
    read_records,
    split_records,
)
from .readout import FeatureSpec, top_neurons
from .regression import (
    CV_FOLDS,
    Regression,
    accuracy,
    c_sweep,
    classification_scores,
    fit_l1_regression,
    make_classifier,
    predicted,
    standardizer,
)
from .safe_io import atomic_write, check_output, check_output_folder, refuse_symlink, save_npy, write_text

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
    classes: tuple[str, ...] = ("0", "1"),
) -> None:
    """One row per text: the text, its true label (``label_key``, when the file has labels), the
    ``predicted`` label, ``prob`` (P(positive), all features), ``prob_top<N>`` (P(positive) from the top
    N neurons alone) and ``neuron <k>`` (each top neuron's value). Labels other than 0/1 are written by
    class name; more than two classes get ``prob <class>`` per class and ``predicted_top<N>`` instead.
    json when ``path`` ends in .json (.jsonl: one object per line), csv otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    named = classes != ("0", "1")
    name_of = (lambda k: np.asarray(classes, dtype=object)[k]) if named else (lambda k: k)
    columns = {text_key: records.texts}
    if records.labels is not None:
        columns[label_key] = name_of(records.labels)
    columns["predicted"] = name_of(predicted(probs))
    if probs.ndim == 2:
        for k, name in enumerate(classes):
            columns[f"prob {name}"] = probs[:, k]
        columns[f"predicted_top{len(neurons)}"] = name_of(predicted(top_probs))
    else:
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


def extreme_samples(
    values: np.ndarray,
    records: Records,
    weight: float | None,
    classes: tuple[str, ...] = ("0", "1"),
    n: int = N_EXTREME,
) -> dict:
    """The texts at both ends of one neuron's values, by sentiment: "most_positive" are the texts the
    neuron calls most positive, its highest values when its classifier ``weight`` is positive, its
    lowest when negative (the neuron's polarity); "value" is the neuron's raw value. ``weight`` None
    (more than two classes, no single polarity): "highest" and "lowest" values instead. Labels are
    shown by class name (``classes``)."""
    order = np.argsort(values, kind="stable")
    if weight is not None and weight < 0:
        order = order[::-1]

    def rows(indices):
        out = []
        for i in indices:
            row = {"value": float(values[i]), "text": records.texts[i]}
            if records.labels is not None:
                k = int(records.labels[i])
                row["label"] = k if classes == ("0", "1") else classes[k]
            out.append(row)
        return out

    if weight is None:
        return {"highest": rows(order[::-1][:n]), "lowest": rows(order[:n])}
    polarity = 1 if weight >= 0 else -1
    return {"polarity": polarity, "most_positive": rows(order[::-1][:n]), "most_negative": rows(order[:n])}


def by_metric(metrics: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """{split: {metric: value}} -> {metric: {split: value}}, as results.json lists them."""
    names = ("accuracy", "macro_f1", "mcc")
    return {name: {split: m[name] for split, m in metrics.items()} for name in names}


def write_scores(
    folder: Path, name: str, accuracy_by_split: dict[str, float], probs_by_split: dict[str, np.ndarray]
) -> None:
    """One regression's results under the original's names: ``<name>_score.txt``, the [train, val, test]
    accuracies in percent as a json list (null for a split that is absent or unlabelled, where the
    original repeated another split's score), and ``<name>_probs_<split>.npy`` for every split (the
    original's ``<name>_probs.pkl`` held the three in one pickle; this project writes none)."""
    percent = [round(100 * accuracy_by_split[s], 6) if s in accuracy_by_split else None for s in SPLITS]
    write_text(folder / f"{name}_score.txt", json.dumps(percent) + "\n")
    for split, p in probs_by_split.items():
        save_npy(folder / f"{name}_probs_{split}.npy", p.astype(np.float32))


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


# The original's file names: trXt.npy (features), trY.npy (labels), and va/te for validation and test.
SPLIT_PREFIX = {"train": "tr", "val": "va", "test": "te"}


class FeatureCache:
    """Features saved under the original's names, ``trXt.npy``/``vaXt.npy``/``teXt.npy``, with the key
    they were computed under beside them (``trXt.key.json``): model file digest, data file digest,
    pooling, state, layers, preprocessing and reading options. A cached file is reused only when its key
    matches."""

    def __init__(self, folder: Path, base_key: dict):
        self.folder, self.base_key = folder, base_key

    def _paths(self, split: str) -> tuple[Path, Path]:
        name = f"{SPLIT_PREFIX[split]}Xt"
        return self.folder / f"{name}.npy", self.folder / f"{name}.key.json"

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


def _read_split(args: argparse.Namespace, split: str, path: str, need_labels: bool) -> Records:
    """One split's file; --valid and --test with --eval_text_key/--eval_label_key where given."""
    options = ReadOptions.from_args(args)
    if split != "train":
        options = replace(
            options,
            text_key=args.eval_text_key or options.text_key,
            label_key=args.eval_label_key or options.label_key,
        )
    try:
        return read_records(path, options, need_labels=need_labels, label_values=True)
    except DataError as e:
        hint = ""
        if not Path(path).exists() and Path(path).parts[:2] == ("data", "binary_sst"):
            hint = " (Binary SST ships in data/binary_sst/ of the repository: run from its root)"
        elif split == "test" and need_labels:
            hint = " (an unlabelled test set? pass --no_test_eval)"
        raise DataError(f"{split} split: {e}{hint}") from None


def _number_classes(records: dict[str, Records]) -> tuple[str, ...]:
    """Every labelled split's label values -> class numbers 0 .. K-1, the classes being the training
    split's values in sorted order (numbers by value, else names); returns their names. Fitting needs two
    classes in train, choosing C two in val."""
    names = class_names(records["train"].labels)
    if len(names) < 2:  # said before the other splits' labels are checked against the classes
        raise DataError(
            f"train split: {records['train'].path}: every label is {names[0]}; fitting (train) and "
            "choosing C (val) need texts of at least two classes"
        )
    for split, recs in records.items():
        if recs.labels is not None:
            records[split] = replace(recs, labels=class_numbers(recs.labels, names, recs.path))
    for split in ("train", "val"):
        if split in records and len(np.unique(records[split].labels)) < 2:
            only = names[int(records[split].labels[0])]
            raise DataError(
                f"{split} split: {records[split].path}: every label is {only}; fitting (train) and "
                "choosing C (val) need texts of at least two classes"
            )
    return names


def _report(name: str, reg: Regression, metrics: dict[str, dict[str, float]], n_features: int) -> str:
    accs = ", ".join(
        f"{split} {100 * m['accuracy']:.2f}% (F1 {m['macro_f1']:.3f}, MCC {m['mcc']:.3f})"
        for split, m in metrics.items()
    )
    note = "" if reg.converged else " (did not converge: raise --epochs)"
    n_weights = reg.weight.size  # K x features for K > 2 classes
    if reg.nonzero == 0:
        note += " (all weights zero: the features carry no usable signal at these C; widen --log2_C)"
    per = f" ({n_features} per class)" if reg.weight.ndim == 2 else ""
    return f"{name}: {accs}; C = {reg.C:g}; {reg.nonzero}/{n_weights} non-zero weights{per}{note}"


def _read_splits(args: argparse.Namespace) -> tuple[dict[str, Records], list[str]]:
    """The splits' records, in SPLITS order: each given file, and the parts of --data that --split carves
    for the splits without one (as the original: a given --valid/--test file zeroes its part); with the
    names of the carved splits."""
    paths = {"train": args.data, "val": given_path(args.valid), "test": given_path(args.test)}
    proportions = parse_split(args.split, paths["val"] is not None, paths["test"] is not None)
    records = {
        split: _read_split(args, split, path, need_labels=not (split == "test" and args.no_test_eval))
        for split, path in paths.items()
        if path is not None
    }
    carved = []
    if proportions[0] < 1:
        parts = split_records(records["train"], proportions, args.seed)
        carved = [split for split, part in zip(SPLITS, parts) if len(part)]
        records.update((split, part) for split, part in zip(SPLITS, parts) if len(part))
        sizes = ", ".join(f"{split} {len(records[split])}" for split in carved)
        print(f"--split {args.split}: {args.data} shuffled (seed {args.seed}) and cut into {sizes} records")
    return {split: records[split] for split in SPLITS if split in records}, carved


def given_path(value: str | None) -> str | None:
    """A file flag's value, or None for an absent one (``''`` or ``none``)."""
    return None if value is None or value.strip().lower() in ("", "none") else value


def _choose_model(given: str, *outputs: str, fallback: str = "default") -> str:
    """``--load_model``, else the first existing output of an earlier script, else the shipped model of
    the alias ``fallback`` (said, so that a user knows whose model answered)."""
    chosen = given or first_existing_model(*outputs, fallback=fallback)
    if not given and chosen == fallback:
        print(
            f"model: the shipped {fallback} model ({resolve_model_path(fallback).name}); pass --load_model "
            "for your own"
        )
    return chosen


# what run_transfer writes in its folder under fixed names (besides logit_vis/); the regressions'
# <name>_score.txt and <name>_probs_<split>.npy are named by REGRESSION_NAMES
TRANSFER_OUTPUTS = (
    "results.json", "extreme_samples.json", "weight_vis.png", "classifier.pt",
    "neurons.npy", "neuron_bias.npy",
    *(f"{SPLIT_PREFIX[split]}{kind}" for split in SPLITS for kind in ("Xt.npy", "Xt.key.json", "Y.npy")),
)  # fmt: skip
REGRESSION_NAMES = ("all_neurons", "neurons", "dropped_neurons")  # the keys of run_transfer's scores


def _check_transfer_outputs(out_dir: Path, write_results: str) -> None:
    """Before featurizing: the results folder can be written, nothing in it is a planted symlink, and
    its classifier.pt is new or a checkpoint of this suite (by content)."""
    check_output_folder(out_dir, "--save_results")
    names = [*TRANSFER_OUTPUTS, *(f"{name}_score.txt" for name in REGRESSION_NAMES),
             *(f"{name}_probs_{split}.npy" for name in REGRESSION_NAMES for split in SPLITS)]  # fmt: skip
    for name in names:
        refuse_symlink(out_dir / name)
    check_replaceable(out_dir / "classifier.pt", "--save_results")
    if write_results:
        check_output(write_results, "--write_results")


def run_transfer(args: argparse.Namespace) -> dict:
    """Run transfer.py with its parsed options; returns the results dict also written to results.json."""
    from .plots import BINARY_CLASSES, plot_neuron_histograms, plot_weights

    if args.neurons < 1:
        raise UsageError(f"--neurons {args.neurons}: the second regression needs at least one neuron")
    if args.write_results and not given_path(args.test):
        raise UsageError("--write_results writes the test texts' predictions, and there is no --test file")
    Cs = c_sweep(*args.log2_C)
    args.load_model = _choose_model(args.load_model, "lang_model.pt")
    ckpt = load_checkpoint(args.load_model)
    ckpt.config.check_given(args, args.load_model)
    model = ckpt.model
    # Unset features settings follow a transferred model's own classifier (the original's otherwise).
    recorded = ckpt.classifier.spec if ckpt.classifier is not None else FeatureSpec()
    args.pooling = FeatureSpec.parse(args.pooling or recorded.pooling).pooling
    args.state = args.state or recorded.state
    out_dir = Path(args.save_results) if args.save_results else default_results_dir(args.load_model)
    _check_transfer_outputs(out_dir, args.write_results)

    records, carved = _read_splits(args)
    if "val" not in records:
        print(f"no validation split: C chosen by {CV_FOLDS}-fold cross-validation on the training split")
    classes = _number_classes(records)  # before featurizing: a bad label is found in seconds
    binary = len(classes) == 2
    if classes not in (("0", "1"),):
        mapping = ", ".join(f"{name} -> {k}" for k, name in enumerate(classes))
        note = f" (P(positive) is P({classes[1]}))" if binary else ""
        print(f"{len(classes)} classes, in sorted order: {mapping}{note}")

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
            "eval_text_key": args.eval_text_key,
            # carved parts depend on the proportions and the shuffle's seed
            "split": [args.split, args.seed] if carved else None,
            "delim": args.delim,
            "loose_json": args.loose_json,
        },
    )
    features = {}
    for split, recs in records.items():
        cached = cache.load(split, recs.path, len(recs)) if args.use_cached and not args.preprocess else None
        if cached is not None:
            print(f"{split}: using cached features from {out_dir}")
            features[split] = cached
            continue
        part = " (its --split part)" if split in carved else ""
        print(f"{split}: featurizing {len(recs)} texts from {recs.path}{part}")
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
            pick(std["train"]), labels["train"], val_x, labels.get("val"), Cs, args.epochs, args.seed,
            n_classes=len(classes),
        )  # fmt: skip

    def accuracies(probs: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
        """accuracy, macro F1 and MCC of each labelled split"""
        return {split: classification_scores(probs[split], y) for split, y in labels.items()}

    full = fit_on(None)
    # K > 2 classes: a feature's strength is its largest |weight| over the classes (Readout's order);
    # each class's own top features are listed in results.json
    strength = full.weight if binary else np.abs(full.weight).max(axis=0)
    neurons = top_neurons(strength, args.neurons)
    spec = FeatureSpec.parse(args.pooling, args.state, args.all_layers)
    names = [spec.describe(int(k), model.config) for k in neurons]
    classifier = make_classifier(
        full, mean, scale, neurons, args.pooling, args.state, args.all_layers, None if binary else classes
    )
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
        "split": {"proportions": args.split, "seed": args.seed, "carved": carved} if carved else None,
        "records": {split: len(r) for split, r in records.items()},
        "all_features": {
            **by_metric(full_acc),
            "C": full.C,
            "nonzero_weights": full.nonzero,
            "n_features": n_features,
            "val_accuracy_by_C": full.val_accuracy_by_C,
        },
        "classes": list(classes),
        "neurons": {
            "indices": neurons.tolist(), "names": names, "weights": full.weight[..., neurons].tolist()
        },
    }
    if not binary:
        results["neurons"]["per_class"] = {
            name: top_neurons(full.weight[k], args.neurons).tolist() for k, name in enumerate(classes)
        }
    # --neurons >= 1 and top_neurons keeps at least one feature: there is always a top set
    top = fit_on(neurons)
    top_probs = {split: top.probs(x[:, neurons]) for split, x in std.items()}
    top_acc = accuracies(top_probs)
    print(_report(f"top {len(neurons)} neuron(s) [{'; '.join(names)}]", top, top_acc, len(neurons)))
    results["neurons"].update(
        {**by_metric(top_acc), "C": top.C, "refit_weights": top.weight.tolist(),
         "refit_bias": np.asarray(top.bias).tolist()}  # fmt: skip
    )
    scores = {"all_neurons": (full_acc, probs), "neurons": (top_acc, top_probs)}
    if args.drop_neurons:
        rest = np.setdiff1d(np.arange(n_features), neurons)
        dropped = fit_on(rest)
        dropped_probs = {split: dropped.probs(x[:, rest]) for split, x in std.items()}
        dropped_acc = accuracies(dropped_probs)
        scores["dropped_neurons"] = (dropped_acc, dropped_probs)
        print(_report(f"without the top {len(neurons)} neuron(s)", dropped, dropped_acc, len(rest)))
        results["drop_neurons"] = {
            **by_metric(dropped_acc),
            "C": dropped.C,
            "nonzero_weights": dropped.nonzero,
        }

    for name, (metrics, split_probs) in scores.items():
        write_scores(out_dir, name, by_metric(metrics)["accuracy"], split_probs)
    for split, y in labels.items():  # beside trXt.npy...: the saved features stand on their own
        save_npy(out_dir / f"{SPLIT_PREFIX[split]}Y.npy", y)
    # the full regression's weights and bias as the original's neurons.pkl / neuron_bias.pkl held them
    save_npy(out_dir / "neurons.npy", full.weight.reshape(-1, n_features).astype(np.float32))
    save_npy(out_dir / "neuron_bias.npy", np.asarray(full.bias, dtype=np.float32).reshape(-1))
    shown = next(split for split in ("test", "val", "train") if split in records)
    top_values = features[shown][:, neurons[0]]
    results["extreme_samples_split"] = shown
    weight = full.weight[neurons[0]] if binary else None
    extremes = {"neuron": names[0], **extreme_samples(top_values, records[shown], weight, classes)}
    write_text(out_dir / "extreme_samples.json", json.dumps(extremes, indent=1, ensure_ascii=False))
    hist_split = next(split for split in ("test", "val", "train") if split in labels)
    results["histogram_split"] = hist_split
    plot_neuron_histograms(
        features[hist_split], labels[hist_split], neurons, names, out_dir / "logit_vis", f" ({hist_split})",
        classes=BINARY_CLASSES if classes == ("0", "1") else classes,
    )  # fmt: skip
    plot_weights(full.weight, neurons, out_dir / "weight_vis.png")
    write_text(out_dir / "results.json", json.dumps(_jsonable(results), indent=1))
    # two classes named otherwise than 0/1: the readout is P(class 1); the names go beside it
    extra = {"class_names": list(classes)} if binary and classes != ("0", "1") else None
    save_checkpoint(out_dir / "classifier.pt", model, classifier=classifier, extra=extra)
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
            classes,
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
        names = np.array([label_name(v) for v in records.labels])
        print(f"accuracy {100 * float(np.mean(names == np.array(classes)[predicted])):.2f}%")
    if records.path == "--text":
        for text, row, k in zip(records.texts, probs, predicted):
            print(f"{row[k]:.4f}  {classes[k]}  {text[:80]!r}")


def run_classifier(args: argparse.Namespace) -> np.ndarray:
    """Run classifier.py with its parsed options; returns the probabilities also saved to --save_probs."""
    # the shipped classifier is the fine-tuned one (pretrained/README.md: it reads SST best)
    args.load_model = _choose_model(
        args.load_model, "lang_model_transfer/classifier.pt", fallback="finetuned"
    )
    encoder = Encoder.load(args.load_model, batch_size=args.batch_size, fp16=args.fp16, bf16=args.bf16)
    if encoder.classifier is None:
        raise CheckpointError(
            f"{args.load_model}: holds a language model but no sentiment classifier: run transfer.py on it "
            "first and pass the classifier.pt it writes (e.g. lang_model_transfer/classifier.pt)"
        )
    encoder.model.config.check_given(args, args.load_model)
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
    save_probs = Path(args.save_probs)
    if not os.path.dirname(args.save_probs):  # a bare file name goes beside the model, as the original's
        save_probs = Path(args.load_model).parent / save_probs
    if save_probs.suffix != ".npy":  # np.save adds it: say the name of the file it writes
        save_probs = save_probs.with_name(save_probs.name + ".npy")
    check_output(save_probs, "--save_probs")  # before featurizing, not after it
    if args.write_results:
        check_output(args.write_results, "--write_results")
    if args.text:
        records = Records("--text", list(args.text))
    else:
        # a K-class classifier's labels are read as the file holds them (numbers or names) and compared
        # by class name
        # likewise a binary classifier whose two classes transfer.py named (neg/pos): P is P(second name)
        named = readout.classes or encoder.class_names
        options = ReadOptions.from_args(args)
        records = read_records(args.data, options, need_labels=None, label_values=named is not None)
        if readout.classes is None and named is not None and records.labels is not None:
            records = replace(records, labels=class_numbers(records.labels, tuple(named), records.path))
    features = encoder.transform(records.texts, progress=True)
    probs = readout.probs(features, args.neurons)
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
