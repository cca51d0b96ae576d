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


def plot_neuron_histogram(
    values: np.ndarray, labels: np.ndarray, neuron: int, path: str | Path, title_suffix: str = ""
) -> None:
    """Histogram of one neuron's values, negative and positive texts in separate colours."""
    values, labels = np.asarray(values), np.asarray(labels)
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.histogram_bin_edges(values, bins=40)
    ax.hist(values[labels == 0], bins=bins, alpha=0.6, color="tab:red", label="negative")
    ax.hist(values[labels == 1], bins=bins, alpha=0.6, color="tab:green", label="positive")
    ax.set_xlabel(f"value of neuron {neuron}")
    ax.set_ylabel("texts")
    ax.set_title(f"neuron {neuron} by class{title_suffix}")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)


def plot_neuron_histograms(
    features: np.ndarray, labels: np.ndarray, neurons: np.ndarray, folder: str | Path, title_suffix: str = ""
) -> list[Path]:
    """One histogram by class per top neuron: ``<folder>/<rank>_<neuron>.png`` (rank 0 = strongest), as the
    original's ``logit_vis/``; earlier histograms in ``folder`` are removed first. Returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("*_*.png"):
        old.unlink()
    paths = []
    for rank, neuron in enumerate(np.asarray(neurons).reshape(-1)):
        path = folder / f"{rank}_{int(neuron)}.png"
        plot_neuron_histogram(features[:, neuron], labels, int(neuron), path, title_suffix)
        paths.append(path)
    return paths
