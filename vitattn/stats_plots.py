"""Plots of a dataset-statistics report, drawn with matplotlib (Agg), at fixed sizes.

``attention_distance.png``: block on x, mean attention distance on y (input pixels; patches on the right
axis), one point per head, as in Dosovitskiy et al. 2021, Fig. 7. ``entropy.png`` and ``prefix_mass.png``:
block × head tables. ``class_maps.png``: the mean fused query map per predicted class. Every title names
the model and the image count.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitattn.outputs import atomic_write

if TYPE_CHECKING:
    from vitattn.stats_report import DatasetStats

DPI = 100
DISTANCE_SIZE = (8.0, 5.0)  # inches: 800 × 500 pixels
TABLE_PANEL = (6.0, 5.0)  # inches per block × head table
CLASS_TILE = 2.2  # inches per class map
CLASS_COLUMNS = 6


def _title(stats: DatasetStats, what: str) -> str:
    from vitattn.job import short_spec

    weights = " (RANDOM WEIGHTS)" if stats.settings.get("weights") == "random" else ""
    n = stats.images
    return f"{what}\n{short_spec(str(stats.settings.get('model', '')))}{weights} · {n} image{'s' * (n != 1)}"


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    finally:
        plt.close(fig)


def _figure(size: tuple[float, float]) -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.figure(figsize=size, dpi=DPI, layout="constrained")


def distance_plot(stats: DatasetStats, path: Path) -> None:
    """Mean attention distance per block, one point per head (pixels left, patches right)."""
    import numpy as np

    s = stats.state
    px, _ = s.moments("distance_px")  # (L, H)
    patches, _ = s.moments("distance_patches")  # (L, H)
    fig = _figure(DISTANCE_SIZE)
    ax = fig.add_subplot()
    blocks = np.asarray(s.blocks)
    cmap = _cmap("viridis")
    for h in range(s.heads):
        colour = cmap(h / max(1, s.heads - 1))
        ax.scatter(blocks, px[:, h], s=28, color=colour, label=f"head {h}", edgecolors="black", linewidths=0.4)
    ax.set_xlabel("block (network depth)")
    ax.set_ylabel("mean attention distance (input pixels)")
    ax.set_xticks(blocks)
    top = float(np.nanmax(px)) if np.isfinite(px).any() else 1.0
    ax.set_ylim(0.0, top * 1.15 or 1.0)  # from 0, as in the ViT paper's figure
    ax.grid(alpha=0.3)
    ph, pw = stats.settings.get("patch_size", [1, 1])
    if ph == pw and ph > 0:
        sec = ax.secondary_yaxis("right", functions=(lambda v: v / ph, lambda v: v * ph))
        sec.set_ylabel("mean attention distance (patches)")
    else:
        ax.text(0.99, 0.01, f"in patches: up to {np.nanmax(patches):.2f}", transform=ax.transAxes, ha="right")
    if s.heads <= 16:
        ax.legend(fontsize=7, ncols=2 if s.heads > 8 else 1, loc="best", title="head", title_fontsize=7)
    ax.set_title(_title(stats, "Mean attention distance per head"), fontsize=10)
    _save(fig, path)


def _table(ax: Any, fig: Any, values: Any, blocks: tuple[int, ...], label: str, vmax: float = 1.0) -> None:
    im = ax.imshow(values, cmap="magma", vmin=0.0, vmax=vmax, aspect="auto")
    ax.set_xlabel("head")
    ax.set_ylabel("block")
    ax.set_yticks(range(len(blocks)), [str(b) for b in blocks])
    heads = values.shape[1]
    step = max(1, math.ceil(heads / 16))
    ax.set_xticks(range(0, heads, step))
    if values.size <= 16 * 24:
        for (i, j), v in _cells(values):
            colour = "white" if v < 0.6 * vmax else "black"
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8, color=colour)
    bar = fig.colorbar(im, ax=ax, shrink=0.9)
    bar.set_label(label)


def _cells(values: Any) -> Any:
    import numpy as np

    return np.ndenumerate(values)


def entropy_plot(stats: DatasetStats, path: Path) -> None:
    """Block × head table of the query's normalised attention entropy over the patches."""
    mean, _ = stats.state.moments("entropy")
    fig = _figure(TABLE_PANEL)
    ax = fig.add_subplot()
    _table(ax, fig, mean, stats.state.blocks, "entropy / log(patches) (0: one patch, 1: uniform)")
    q = stats.settings.get("query", "cls")
    ax.set_title(_title(stats, f"Entropy of the {q} query's attention over the patches"), fontsize=10)
    _save(fig, path)


def prefix_plot(stats: DatasetStats, path: Path) -> None:
    """Block × head tables: attention of patch queries to all prefix tokens, and to each kind of them."""
    s = stats.state
    names = [n for n in s.names if n.startswith("prefix_mass")]
    if not names:  # no prefix tokens: one table of zeros says so
        import numpy as np

        panels = [("no prefix tokens", np.zeros((len(s.blocks), s.heads)))]
    else:
        groups = [n for n in names if n != "prefix_mass"]
        chosen = ["prefix_mass"] + (groups if len(groups) > 1 else [])
        titles = {"prefix_mass": "all prefix tokens", "prefix_mass_cls": "class token",
                  "prefix_mass_dist": "distillation token", "prefix_mass_reg": "register tokens"}
        panels = [(titles.get(n, n), s.moments(n)[0]) for n in chosen]
    fig = _figure((TABLE_PANEL[0] * len(panels), TABLE_PANEL[1]))
    for k, (label, values) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        _table(ax, fig, values, s.blocks, "attention mass (fraction of 1)")
        ax.set_title(f"to {label}", fontsize=9)
    fig.suptitle(_title(stats, "Attention of patch queries to prefix tokens (mean over patch queries)"), fontsize=10)
    _save(fig, path)


def class_maps_plot(stats: DatasetStats, path: Path) -> None:
    """The mean fused query map over all images, then per most frequent predicted class."""
    entries = stats.class_maps()
    cols = min(CLASS_COLUMNS, len(entries))
    rows = math.ceil(len(entries) / cols)
    fig = _figure((CLASS_TILE * cols + 0.6, CLASS_TILE * rows + 0.9))
    block = stats.settings.get("class_maps_block")
    for k, e in enumerate(entries):
        ax = fig.add_subplot(rows, cols, k + 1)
        im = ax.imshow(e["map"], cmap="inferno")
        label = str(e["label"])
        ax.set_title(f"{label[:22]}\n{e['images']} image{'s' * (e['images'] != 1)}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        bar = fig.colorbar(im, ax=ax, shrink=0.8)
        bar.ax.tick_params(labelsize=6)
    q = stats.settings.get("query", "cls")
    fig.suptitle(
        _title(stats, f"Mean {q} attention over the patch grid (block {block}, head mean) per predicted class"),
        fontsize=10,
    )
    _save(fig, path)


def _cmap(name: str) -> Any:
    import matplotlib

    return matplotlib.colormaps[name]


def draw_plots(stats: DatasetStats, out: Path) -> dict[str, Path]:
    """Draw the four plots into ``out``; returns plot name -> path."""
    plots = {
        "attention_distance": (distance_plot, "attention_distance.png"),
        "entropy": (entropy_plot, "entropy.png"),
        "prefix_mass": (prefix_plot, "prefix_mass.png"),
        "class_maps": (class_maps_plot, "class_maps.png"),
    }
    files = {}
    for name, (draw, file) in plots.items():
        draw(stats, out / file)
        files[name] = out / file
    return files
