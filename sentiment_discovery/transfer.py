"""The bodies of transfer.py (``run_transfer``) and classifier.py (``run_classifier``). What they call
lives apart: the labelled splits in readers.py, the feature cache in feature_cache.py, the regressions
in regression.py, the results files in transfer_results.py.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from .checkpoint import load_checkpoint
from .encoder import Encoder
from .errors import CheckpointError, UsageError
from .feature_cache import cached_features
from .formats import first_existing_model, resolve_model_path
from .readers import (
    ReadOptions,
    Records,
    SplitFiles,
    class_numbers,
    given_path,
    label_name,
    read_labelled_splits,
    read_records,
)
from .readout import FeatureSpec, top_neurons
from .regression import CV_FOLDS, accuracy, c_sweep, fit_transfer
from .safe_io import check_output, save_npy, write_table
from .transfer_results import check_transfer_outputs, predictions_frame, write_transfer_results


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


def default_results_dir(load_model: str) -> Path:
    """``<model stem>_transfer/`` beside the model: lang_model.pt -> lang_model_transfer/ (an alias such
    as default or openai -> default_transfer/, openai_transfer/ in the working directory)."""
    path = Path(load_model)
    return path.with_name(path.stem + "_transfer")


def run_transfer(args: argparse.Namespace) -> dict:
    """Run transfer.py with its parsed options; returns the results dict also written to results.json.

    Phases, each in its own module: the model (checkpoint.py), the labelled splits (readers.py), their
    features (feature_cache.py), the regressions (regression.py), the results files (transfer_results.py).
    """
    if args.neurons < 1:
        raise UsageError(f"--neurons {args.neurons}: the second regression needs at least one neuron")
    if args.write_results and not given_path(args.test):
        raise UsageError("--write_results writes the test texts' predictions, and there is no --test file")
    args.load_model = _choose_model(args.load_model, "lang_model.pt")
    out_dir = Path(args.save_results) if args.save_results else default_results_dir(args.load_model)
    Cs = c_sweep(*args.log2_C)
    ckpt = load_checkpoint(args.load_model)
    model = ckpt.model
    model.config.check_given(args, args.load_model)
    # Unset features settings follow a transferred model's own classifier (the original's otherwise).
    recorded = ckpt.classifier.spec if ckpt.classifier is not None else FeatureSpec()
    spec = FeatureSpec.parse(args.pooling or recorded.pooling, args.state or recorded.state, args.all_layers)
    check_transfer_outputs(out_dir, args.write_results)

    files = SplitFiles.from_args(args)
    splits = read_labelled_splits(files)
    if splits.carved:
        sizes = ", ".join(f"{split} {len(splits.records[split])}" for split in splits.carved)
        print(f"--split {args.split}: {args.data} shuffled (seed {args.seed}) and cut into {sizes} records")
    if "val" not in splits.records:
        print(f"no validation split: C chosen by {CV_FOLDS}-fold cross-validation on the training split")
    classes = splits.classes
    if classes not in (("0", "1"),):
        mapping = ", ".join(f"{name} -> {k}" for k, name in enumerate(classes))
        note = f" (P(positive) is P({classes[1]}))" if len(classes) == 2 else ""
        print(f"{len(classes)} classes, in sorted order: {mapping}{note}")

    cache_key = {
        "pooling": spec.pooling,
        "state": spec.state,
        "all_layers": spec.all_layers,
        "preprocess": model.config.preprocess,
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "text_key": args.text_key,
        "eval_text_key": args.eval_text_key,
        # carved parts depend on the proportions and the shuffle's seed
        "split": [args.split, args.seed] if splits.carved else None,
        "delim": args.delim,
        "loose_json": args.loose_json,
    }
    features = cached_features(
        model, splits.records, spec, out_dir, cache_key, ckpt.source,
        use_cached=args.use_cached and not args.preprocess, carved=splits.carved,
        batch_size=args.batch_size, fp16=args.fp16, bf16=args.bf16,
    )  # fmt: skip
    fit = fit_transfer(
        features, splits.labels, spec, classes,
        Cs=Cs, epochs=args.epochs, seed=args.seed, n_neurons=args.neurons, drop_neurons=args.drop_neurons,
    )  # fmt: skip
    names = [spec.describe(int(k), model.config) for k in fit.neurons]
    results = write_transfer_results(
        out_dir, model, splits, features, fit, names,
        load_model=args.load_model, files=files, write_results=args.write_results,
    )  # fmt: skip
    print(f"results in {out_dir}/ (classifier: {out_dir / 'classifier.pt'})")
    return results


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
        frame = predictions_frame(
            records,
            probs if args.neurons < 0 else readout.probs(features),
            probs if args.neurons >= 0 else readout.probs(features, len(neurons)),
            neurons,
            features,
            args.text_key,
            args.label_key,
        )
        write_table(frame, args.write_results)
        print(f"predictions written to {args.write_results}")
    return probs
