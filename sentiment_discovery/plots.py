"""Transfer figures (PNG, headless): regression weights with the top neuron(s), and each top neuron's
values split by class (the two figures of the original README)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .safe_io import save_figure  # noqa: E402


def plot_weights(weight: np.ndarray, neurons: np.ndarray, path: str | Path) -> None:
    """Regression weight of every feature; the top neuron(s) highlighted and labelled."""
    weight = np.asarray(weight).reshape(-1)
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.plot(np.arange(len(weight)), weight, lw=0.6, color="tab:blue")
    for rank, n in enumerate(np.asarray(neurons).reshape(-1)[:10]):
        ax.scatter([n], [weight[n]], color="tab:red", zorder=3, s=20)
        ax.annotate(
            str(int(n)),
            (n, weight[n]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
            color="tab:red" if rank == 0 else "black",
        )
    ax.axhline(0, color="gray", lw=0.5)
    ax.set_xlabel("feature (neuron)")
    ax.set_ylabel("regression weight")
    ax.set_title(f"L1 logistic regression weights ({np.count_nonzero(weight)} non-zero of {len(weight)})")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


BINARY_CLASSES = ("negative", "positive")
CLASS_COLOURS = ("tab:red", "tab:green", "tab:blue", "tab:orange", "tab:purple", "tab:brown", "tab:gray")


def plot_neuron_histogram(
    values: np.ndarray,
    labels: np.ndarray,
    name: str,
    path: str | Path,
    title_suffix: str = "",
    classes: tuple[str, ...] = BINARY_CLASSES,
) -> None:
    """Histogram of one feature's values (``name``: what it is, ``FeatureSpec.describe``), the texts of
    each class (label k: ``classes[k]``) in their own colour."""
    values, labels = np.asarray(values), np.asarray(labels)
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.histogram_bin_edges(values, bins=40)
    for k, cls in enumerate(classes):
        colour = CLASS_COLOURS[k] if len(classes) <= len(CLASS_COLOURS) else None
        ax.hist(values[labels == k], bins=bins, alpha=0.6, color=colour, label=cls)
    ax.set_xlabel("value")
    ax.set_ylabel("texts")
    ax.set_title(f"{name} by class{title_suffix}", fontsize=10)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def plot_neuron_histograms(
    features: np.ndarray,
    labels: np.ndarray,
    neurons: np.ndarray,
    names: list[str],
    folder: str | Path,
    title_suffix: str = "",
    classes: tuple[str, ...] = BINARY_CLASSES,
) -> list[Path]:
    """One histogram by class per top neuron (``names[i]`` its title): ``<folder>/<rank>_<neuron>.png``
    (rank 0 = strongest), as the original's ``logit_vis/``; earlier histograms in ``folder`` are removed
    first. Returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*_*.png"):
        old.unlink()
    paths = []
    for rank, (neuron, name) in enumerate(zip(np.asarray(neurons).reshape(-1), names)):
        path = folder / f"{rank}_{int(neuron)}.png"
        plot_neuron_histogram(features[:, neuron], labels, name, path, title_suffix, classes)
        paths.append(path)
    return paths
