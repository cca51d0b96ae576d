"""The files transfer.py writes in its results folder (and classifier.py's ``--write_results``): checked
before featurizing (``check_transfer_outputs``), then written after the regressions
(``write_transfer_results``): results.json, the original's score and probability files, the labels
and weights as .npy, the top neuron's extreme samples, the plots, and classifier.pt.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from .checkpoint import check_replaceable, save_checkpoint
from .feature_cache import SPLIT_PREFIX
from .model import RNNModel
from .plots import BINARY_CLASSES, plot_neuron_histograms, plot_weights
from .readers import SPLITS, LabelledSplits, Records, SplitFiles
from .regression import CV_FOLDS, Regression, TransferFit, predicted
from .safe_io import check_output, check_output_folder, refuse_symlink, save_npy, write_table, write_text

N_EXTREME = 10  # texts shown at each end of the top neuron's range

# what run_transfer writes in its folder under fixed names (besides logit_vis/); the regressions'
# <name>_score.txt and <name>_probs_<split>.npy are named by REGRESSION_NAMES
TRANSFER_OUTPUTS = (
    "results.json", "extreme_samples.json", "weight_vis.png", "classifier.pt",
    "neurons.npy", "neuron_bias.npy",
    *(f"{SPLIT_PREFIX[split]}{kind}" for split in SPLITS for kind in ("Xt.npy", "Xt.key.json", "Y.npy")),
)  # fmt: skip
REGRESSION_NAMES = ("all_neurons", "neurons", "dropped_neurons")  # regression.TransferFit's names


def check_transfer_outputs(out_dir: Path, write_results: str | None) -> None:
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


def predictions_frame(
    records: Records,
    probs: np.ndarray,
    top_probs: np.ndarray,
    neurons: np.ndarray,
    features: np.ndarray,
    text_key: str,
    label_key: str,
    classes: tuple[str, ...] = ("0", "1"),
) -> pd.DataFrame:
    """The per-text results (``--write_results``), one row per text: the text, its true label
    (``label_key``, when the file has labels), the ``predicted`` label, ``prob`` (P(positive), all
    features), ``prob_top<N>`` (P(positive) from the top N neurons alone) and ``neuron <k>`` (each top
    neuron's value). Labels other than 0/1 are written by class name; more than two classes get
    ``prob <class>`` per class and ``predicted_top<N>`` instead."""
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
    return pd.DataFrame(columns)


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


def score_list(accuracy_by_split: dict[str, float]) -> str:
    """The original's ``<name>_score.txt``: the [train, val, test] accuracies in percent as a json list
    (null for a split that is absent or unlabelled, where the original repeated another split's score).
    Beside it go ``<name>_probs_<split>.npy`` for every split (the original's ``<name>_probs.pkl`` held
    the three in one pickle; this project writes none)."""
    percent = [round(100 * accuracy_by_split[s], 6) if s in accuracy_by_split else None for s in SPLITS]
    return json.dumps(percent) + "\n"


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def report_line(name: str, reg: Regression, metrics: dict[str, dict[str, float]], n_features: int) -> str:
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


def write_transfer_results(
    out_dir: Path,
    model: RNNModel,
    splits: LabelledSplits,
    features: dict[str, np.ndarray],
    fit: TransferFit,
    names: list[str],
    *,
    load_model: str,
    files: SplitFiles,
    write_results: str | None = None,
) -> dict:
    """Print the regressions' lines, then write every result of one transfer (``names``: the top neurons'
    descriptions); returns the results dict written to results.json."""
    records, classes, labels = splits.records, splits.classes, splits.labels
    binary, full, neurons, spec = len(classes) == 2, fit.full, fit.neurons, fit.classifier.spec
    n_features, n_top = features["train"].shape[1], len(neurons)
    titles = {
        "all_neurons": ("all features", n_features),
        "neurons": (f"top {n_top} neuron(s) [{'; '.join(names)}]", n_top),
        "dropped_neurons": (f"without the top {n_top} neuron(s)", n_features - n_top),
    }
    for name, reg in fit.regressions.items():
        print(report_line(titles[name][0], reg, fit.scores[name], titles[name][1]))
    metrics = {name: by_metric(scores) for name, scores in fit.scores.items()}
    # what the files hold, computed first, then written
    shown = next(split for split in ("test", "val", "train") if split in records)
    hist_split = next(split for split in ("test", "val", "train") if split in labels)
    weight = full.weight[neurons[0]] if binary else None
    extremes = {
        "neuron": names[0],
        **extreme_samples(features[shown][:, neurons[0]], records[shown], weight, classes),
    }
    predictions = None
    if write_results and "test" in records:
        predictions = predictions_frame(
            records["test"], fit.probs["all_neurons"]["test"], fit.probs["neurons"]["test"], neurons,
            features["test"], files.read.text_key, files.read.label_key, classes,
        )  # fmt: skip
    top = fit.regressions["neurons"]
    results = {
        "load_model": str(load_model),
        "pooling": spec.pooling,
        "state": spec.state,
        "all_layers": spec.all_layers,
        "standardized": True,
        "C_sweep": fit.Cs,
        "C_chosen_by": "validation" if "val" in records else f"{CV_FOLDS}-fold cross-validation on train",
        "split": (
            {"proportions": files.split, "seed": files.seed, "carved": splits.carved}
            if splits.carved
            else None
        ),
        "records": {split: len(r) for split, r in records.items()},
        "all_features": {
            **metrics["all_neurons"],
            "C": full.C,
            "nonzero_weights": full.nonzero,
            "n_features": n_features,
            "val_accuracy_by_C": full.val_accuracy_by_C,
        },
        "classes": list(classes),
        "neurons": {
            "indices": neurons.tolist(),
            "names": names,
            "weights": full.weight[..., neurons].tolist(),
            **({"per_class": fit.per_class} if fit.per_class is not None else {}),
            **metrics["neurons"],
            "C": top.C,
            "refit_weights": top.weight.tolist(),
            "refit_bias": np.asarray(top.bias).tolist(),
        },
        "extreme_samples_split": shown,
        "histogram_split": hist_split,
    }
    if "dropped_neurons" in fit.regressions:
        dropped = fit.regressions["dropped_neurons"]
        results["drop_neurons"] = {
            **metrics["dropped_neurons"],
            "C": dropped.C,
            "nonzero_weights": dropped.nonzero,
        }
    score_lists = {name: score_list(metrics[name]["accuracy"]) for name in fit.probs}

    for name, split_probs in fit.probs.items():  # the original's <name>_score.txt, <name>_probs_<split>
        write_text(out_dir / f"{name}_score.txt", score_lists[name])
        for split, p in split_probs.items():
            save_npy(out_dir / f"{name}_probs_{split}.npy", p.astype(np.float32))
    for split, y in labels.items():  # beside trXt.npy...: the saved features stand on their own
        save_npy(out_dir / f"{SPLIT_PREFIX[split]}Y.npy", y)
    # the full regression's weights and bias as the original's neurons.pkl / neuron_bias.pkl held them
    save_npy(out_dir / "neurons.npy", full.weight.reshape(-1, n_features).astype(np.float32))
    save_npy(out_dir / "neuron_bias.npy", np.asarray(full.bias, dtype=np.float32).reshape(-1))
    write_text(out_dir / "extreme_samples.json", json.dumps(extremes, indent=1, ensure_ascii=False))
    write_text(out_dir / "results.json", json.dumps(_jsonable(results), indent=1))
    if predictions is not None:
        write_table(predictions, write_results)
        print(f"wrote test predictions to {write_results}")
    plot_neuron_histograms(
        features[hist_split], labels[hist_split], neurons, names, out_dir / "logit_vis", f" ({hist_split})",
        classes=BINARY_CLASSES if classes == ("0", "1") else classes,
    )  # fmt: skip
    plot_weights(full.weight, neurons, out_dir / "weight_vis.png")
    # two classes named otherwise than 0/1: the readout is P(class 1); the names go beside it
    extra = {"class_names": list(classes)} if binary and classes != ("0", "1") else None
    save_checkpoint(out_dir / "classifier.pt", model, classifier=fit.classifier, extra=extra)
    return results
