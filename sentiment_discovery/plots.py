"""Figures (headless): the transfer figures (regression weights with the top neuron(s), each top
neuron's values split by class: the two figures of the original README) and neuron heatmaps (PNG and
self-contained HTML)."""

from __future__ import annotations

import html
import warnings
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .safe_io import save_figure, write_text  # noqa: E402


def plot_weights(weight: np.ndarray, neurons: np.ndarray, path: str | Path) -> None:
    """Regression weight of every feature; the top neuron(s) highlighted and labelled."""
    weight = np.asarray(weight)
    fig, ax = plt.subplots(figsize=(10, 4))
    if weight.ndim == 2:  # K classes: a line per class; the top neurons marked at their largest |weight|
        for row in weight:
            ax.plot(np.arange(weight.shape[1]), row, lw=0.6)
        weight = weight[np.abs(weight).argmax(axis=0), np.arange(weight.shape[1])]
    else:
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


# --------------------------------------------------------------------------------------------
# Neuron heatmaps (generate.py --heatmap, --heatmap_html): one character per cell, its colour the
# neuron's value after it, on a diverging scale centred on 0
# --------------------------------------------------------------------------------------------

NEWLINE_SYMBOL = "\u21b5"  # drawn at the end of a line that a newline byte breaks
COLORMAP = "RdYlGn"  # red (negative) - yellow (0) - green (positive), like the original figures
DPI = 128
CELL_W_PX, CELL_H_PX = 13, 22
MARGIN_PX, HEADER_PX = 16, 30
COLORBAR_PX = 46  # below the text: the bar, its tick labels and its caption
COLORBAR_W_PX = 320
FONT_PT = 9
DARK_BACKGROUND = 0.4  # relative luminance below which a character is drawn white instead of black


def char_cells(tokens: np.ndarray | bytes) -> list[tuple[int, str]]:
    """One ``(index of its last byte, character)`` per displayed character.

    Valid UTF-8 sequences are one character; a byte that does not start one is shown as U+FFFD,
    so any byte string can be drawn.
    """
    data = bytes(int(t) for t in tokens)
    cells = []
    i = 0
    while i < len(data):
        lead = data[i]
        length = 1 if lead < 0x80 else 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4
        try:
            char = data[i : i + length].decode("utf-8")
        except UnicodeDecodeError:
            char, length = "\ufffd", 1
        cells.append((i + length - 1, char))
        i += length
    return cells


def layout_lines(chars: list[str], width: int) -> list[list[int]]:
    """``chars`` in rows of ``width`` (the original's fixed grid), indices per row; a newline ends its row.

    A word (a run of characters other than space and newline) that would run past the end of a row
    starts the next row instead, unless it is longer than a row: then it is split where rows end.
    """
    rows: list[list[int]] = [[]]
    i = 0
    while i < len(chars):
        if chars[i] == "\n":
            rows[-1].append(i)
            rows.append([])
            i += 1
            continue
        end = i + 1
        if chars[i] != " ":
            while end < len(chars) and chars[end] not in (" ", "\n"):
                end += 1
        if chars[i] != " " and len(rows[-1]) + (end - i) > width >= end - i and rows[-1]:
            rows.append([])  # the whole word fits on a fresh row: do not split it
        for k in range(i, end):
            if len(rows[-1]) == width:
                rows.append([])
            rows[-1].append(k)
        i = end
    if not rows[-1] and len(rows) > 1:
        rows.pop()  # nothing after a final newline
    return rows


@dataclass
class HeatmapLayout:
    lines: list[list[int]]  # indices into ``cells`` per line
    cells: list[tuple[int, str]]  # (token index, character)
    width: int  # characters per line

    @property
    def size_px(self) -> tuple[int, int]:
        """(width, height) of the PNG in pixels: title, text rows, colour bar."""
        return (
            2 * MARGIN_PX + self.width * CELL_W_PX,
            HEADER_PX + len(self.lines) * CELL_H_PX + COLORBAR_PX + MARGIN_PX,
        )

    def cell_origin_px(self, row: int, col: int) -> tuple[int, int]:
        """Top-left pixel (x, y) of a character cell."""
        return MARGIN_PX + col * CELL_W_PX, HEADER_PX + row * CELL_H_PX


def heatmap_range(values: np.ndarray, value_range: float | None = None) -> float:
    """The half-width R of the colour scale -R .. 0 .. +R: ``value_range``, else the largest |value| shown."""
    if value_range is not None:
        if not (np.isfinite(value_range) and value_range > 0):
            raise ValueError(f"--heatmap_range must be a positive number, got {value_range}")
        return float(value_range)
    peak = float(np.abs(values).max()) if len(values) else 0.0
    return peak if np.isfinite(peak) and peak > 0 else 1.0


def heatmap_colours(values: np.ndarray, value_range: float) -> tuple[np.ndarray, np.ndarray]:
    """RGB background ``[n, 3]`` (0..1) of each value on -R..R, and a text colour that contrasts with it
    (black on light, white on dark backgrounds)."""
    import matplotlib

    background = matplotlib.colormaps[COLORMAP]((np.clip(values / value_range, -1, 1) + 1) / 2)[:, :3]
    linear = np.where(background <= 0.04045, background / 12.92, ((background + 0.055) / 1.055) ** 2.4)
    luminance = linear @ np.array([0.2126, 0.7152, 0.0722])
    text = np.where(luminance[:, None] < DARK_BACKGROUND, 1.0, 0.0).repeat(3, axis=1)
    return background, text


def _shown_values(tokens, values, negate: bool) -> tuple[list[tuple[int, str]], np.ndarray]:
    cells = char_cells(tokens)
    shown = -np.asarray(values, dtype=np.float64) if negate else np.asarray(values, dtype=np.float64)
    return cells, np.array([shown[i] for i, _ in cells])


def plot_heatmap(
    tokens: np.ndarray,
    values: np.ndarray,
    path: str | Path,
    *,
    negate: bool = False,
    width: int = 64,
    title: str = "",
    generated_from: int | None = None,
    value_range: float | None = None,
    caption: str = "value",
) -> HeatmapLayout:
    """Draw ``tokens`` in lines, each character on the colour of its value, with a colour bar below.

    The scale is diverging and centred on 0: -R (red) .. 0 (yellow) .. +R (green), R the largest
    |value| shown unless ``value_range`` is given (values beyond it take the end colours). ``negate``
    flips the sign, for a neuron whose positive direction is negative sentiment. ``generated_from``:
    index of the first generated byte, marked by a bar before its character.
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.collections import PatchCollection
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    cells, shown = _shown_values(tokens, values, negate)
    R = heatmap_range(shown, value_range)
    layout = HeatmapLayout(layout_lines([ch for _, ch in cells], width), cells, width)
    w_px, h_px = layout.size_px
    if title:  # a short text must not clip its title (about 0.6 em per character)
        w_px = max(w_px, int(2 * MARGIN_PX + 0.6 * len(title) * FONT_PT * DPI / 72))
    # the colour bar and its caption (about 0.6 em per character) must fit too
    w_px = max(
        w_px, int(2 * MARGIN_PX + COLORBAR_W_PX + 42 + 0.6 * max(len(caption), 40) * (FONT_PT - 1) * DPI / 72)
    )
    background, ink = heatmap_colours(shown, R)
    ends = [token_index for token_index, _ in cells]
    first_generated = None if generated_from is None else int(np.searchsorted(ends, generated_from))

    fig = plt.figure(figsize=(w_px / DPI, h_px / DPI), dpi=DPI)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, w_px)
    ax.set_ylim(h_px, 0)  # pixel coordinates, y downwards
    ax.axis("off")
    rects = []
    for row, line in enumerate(layout.lines):
        for col, cell in enumerate(line):
            ch = cells[cell][1]
            x, y = layout.cell_origin_px(row, col)
            rects.append(Rectangle((x, y), CELL_W_PX, CELL_H_PX))
            if cell == first_generated:
                ax.add_patch(
                    Rectangle(
                        (x - 1, y), 2, CELL_H_PX, facecolor="black", linewidth=0, antialiased=False, zorder=2
                    )
                )
            label = NEWLINE_SYMBOL if ch == "\n" else ch if ch.isprintable() else "\ufffd"
            if not label.isspace():
                ax.text(
                    x + CELL_W_PX / 2,
                    y + CELL_H_PX / 2,
                    label,
                    ha="center",
                    va="center",
                    fontsize=FONT_PT,
                    family="monospace",
                    color=tuple(ink[cell]),
                )
    order = [cell for line in layout.lines for cell in line]
    ax.add_collection(
        PatchCollection(rects, facecolors=background[order], edgecolors="none", antialiased=False, zorder=0)
    )
    if title:
        ax.text(MARGIN_PX, HEADER_PX / 2, title, ha="left", va="center", fontsize=FONT_PT)
    # the colour bar, under the text: its own axes placed in figure fractions from pixel positions
    bar_top = HEADER_PX + len(layout.lines) * CELL_H_PX + 10
    bar_left = MARGIN_PX + 12  # room for the first tick label
    cax = fig.add_axes((bar_left / w_px, 1 - (bar_top + 10) / h_px, COLORBAR_W_PX / w_px, 10 / h_px))
    bar = fig.colorbar(
        ScalarMappable(Normalize(-R, R), plt.get_cmap(COLORMAP)), cax=cax, orientation="horizontal"
    )
    bar.set_ticks(
        [-R, -R / 2, 0, R / 2, R], labels=[f"{t:+.3g}" if t else "0" for t in (-R, -R / 2, 0, R / 2, R)]
    )
    bar.ax.tick_params(labelsize=FONT_PT - 2, length=2, pad=1)
    bar.outline.set_linewidth(0.5)
    why = "--heatmap_range" if value_range is not None else "the largest |value| shown"
    ax.text(bar_left + COLORBAR_W_PX + 30, bar_top + 5, caption, va="center", fontsize=FONT_PT - 1)
    ax.text(
        bar_left + COLORBAR_W_PX + 30,
        bar_top + 20,
        f"scale ±{R:.3g} ({why})",
        va="center",
        fontsize=FONT_PT - 1,
    )
    with warnings.catch_warnings():
        # Generated bytes can be any character; the font draws a box for those it lacks.
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        save_figure(fig, path, dpi=DPI)  # never through a planted link, never half a file
    plt.close(fig)
    return layout


def write_heatmap_html(
    tokens: np.ndarray,
    values: np.ndarray,
    path: str | Path,
    *,
    negate: bool = False,
    title: str = "",
    generated_from: int | None = None,
    value_range: float | None = None,
    caption: str = "value",
) -> None:
    """The heatmap of ``plot_heatmap`` as one self-contained HTML file (no scripts, no external files):
    each character's value shows on hover; generated characters are underlined."""
    cells, shown = _shown_values(tokens, values, negate)
    R = heatmap_range(shown, value_range)
    background, ink = heatmap_colours(shown, R)
    css = lambda rgb: "#" + "".join(f"{round(255 * c):02x}" for c in rgb)
    spans = []
    for k, (index, ch) in enumerate(cells):
        label = NEWLINE_SYMBOL + "\n" if ch == "\n" else ch if ch.isprintable() or ch == " " else "\ufffd"
        text = html.escape(label)
        generated = ' class="g"' if generated_from is not None and index >= generated_from else ""
        spans.append(
            f'<span{generated} style="background:{css(background[k])};color:{css(ink[k])}" '
            f'title="{html.escape(repr(ch))}: {shown[k]:+.4f}">{text}</span>'
        )
    stops = ", ".join(css(c) for c in heatmap_colours(np.linspace(-R, R, 11), R)[0])
    document = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title or "neuron heatmap")}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
.text {{ font-family: monospace; font-size: 15px; line-height: 1.9; white-space: pre-wrap; max-width: 70em; }}
.text span {{ padding: 2px 0; }}
.text span.g {{ text-decoration: underline; }}
.legend {{ display: flex; gap: .6em; align-items: center; font-size: 13px; margin-top: 1em; }}
.bar {{ width: 320px; height: 12px; border: 1px solid #999; background: linear-gradient(to right, {stops}); }}
</style></head><body>
<p>{html.escape(title)}</p>
<div class="text">{"".join(spans)}</div>
<div class="legend"><span>{-R:+.3g}</span><span class="bar"></span><span>{R:+.3g}</span>
<span>{html.escape(caption)}; centred on 0; hover a character for its value</span></div>
</body></html>
"""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_text(path, document)
