"""A quick look at a region: the selected tracks stacked, one panel each, on a shared genome axis.

Rendered with matplotlib's Agg backend (no display needed) at a fixed size: 10 inches wide at
150 dpi (1500 px), 1 inch per track. A region with more bins than the figure has pixels is shown at
the maximum per display bin, so peaks survive, as genome browsers do when zoomed out.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa

from agpipe.io.export import atomic_files
from agpipe.io.results import Region, Run, Selection

WIDTH_INCHES = 10.0
PANEL_INCHES = 1.0
TITLE_INCHES = 0.8  # the figure title and the x axis labels
DPI = 150
MAX_TRACKS = 40  # beyond this, panels are too thin to read: narrow --tracks
MAX_POINTS = 2000  # display bins across a panel, about one per 0.75 px


def plot_region(run: Run, selection: Selection, region: Region, path: Path) -> tuple[int, int]:
    """Writes a PNG of the selected tracks over the region; returns its (width, height) in pixels."""
    if len(selection.columns) > MAX_TRACKS:
        raise ValueError(f"{len(selection.columns)} tracks match: a plot shows at most {MAX_TRACKS}, narrow --tracks")
    import matplotlib

    matplotlib.use("Agg")  # before pyplot: no display, no GUI toolkit
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    table = run.read_region(selection, region)
    resolution = selection.output.resolution
    edges, grid = _on_grid(table, selection.columns, region, resolution)
    display_bin = resolution
    if len(edges) - 1 > MAX_POINTS:
        factor = math.ceil((len(edges) - 1) / MAX_POINTS)
        edges, grid = _max_per_display_bin(edges, grid, factor)
        display_bin = resolution * factor

    n = len(selection.columns)
    size = (WIDTH_INCHES, PANEL_INCHES * n + TITLE_INCHES)
    figure, axes = plt.subplots(n, 1, figsize=size, dpi=DPI, sharex=True, squeeze=False, layout="constrained")
    for ax, column, values in zip(axes[:, 0], selection.columns, grid):
        ax.stairs(values, edges, fill=True, baseline=0.0, color="#1f5fa8")  # each bin flat over its span; NaN: a gap
        for lo, hi in _nan_runs(values):  # shaded, so a missing value does not read as zero
            ax.axvspan(edges[lo], edges[hi], color="0.9", linewidth=0)
        ax.set_title(column, loc="left", fontsize=8, pad=2)
        ax.tick_params(labelsize=7)
        if not np.any(values < 0):  # predictions in data space: show them from zero
            ax.set_ylim(bottom=0.0)
        ax.spines[["top", "right"]].set_visible(False)
    bottom = axes[-1, 0]
    bottom.set_xlim(region.start, region.end)
    bottom.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{int(x):,}"))
    bottom.set_xlabel(f"position on {region.chrom} (bp)", fontsize=8)
    shown = f"{resolution} bp bins" if display_bin == resolution else f"max per {display_bin:,} bp of {resolution} bp bins"
    gaps = "   (grey: not predicted or not finite)" if np.isnan(grid).any() else ""
    figure.suptitle(f"{region}   {selection.output.head}, {shown}{gaps}", fontsize=10)

    with atomic_files([path]) as (temp,):
        figure.savefig(temp, format="png", dpi=DPI)  # no bbox_inches="tight": the size stays as stated
    plt.close(figure)
    return round(size[0] * DPI), round(size[1] * DPI)


def _on_grid(table: pa.Table, columns: list[str], region: Region, resolution: int) -> tuple[np.ndarray, np.ndarray]:
    """Bin edges covering the region and (tracks, bins) values on them, NaN where no bin was
    predicted (windows skipped as all N) or the value is not finite, so these show as gaps."""
    first = region.start // resolution * resolution
    edges = np.arange(first, region.end + resolution, resolution)
    edges = np.minimum(edges[: np.searchsorted(edges, region.end, side="left") + 1], region.end)
    grid = np.full((len(columns), len(edges) - 1), np.nan)
    rows = (table["start"].to_numpy() - first) // resolution
    for i, column in enumerate(columns):
        grid[i, rows] = table[column].to_numpy(zero_copy_only=False)
    grid[~np.isfinite(grid)] = np.nan
    return edges, grid


def _max_per_display_bin(edges: np.ndarray, grid: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    bins = grid.shape[1]
    padded = np.pad(grid, ((0, 0), (0, -bins % factor)), constant_values=np.nan)
    maxima = np.fmax.reduce(padded.reshape(grid.shape[0], -1, factor), axis=2)  # fmax skips NaN
    return np.append(edges[:-1:factor], edges[-1]), maxima


def _nan_runs(values: np.ndarray) -> np.ndarray:
    """(start, stop) index pairs of the runs of NaN in values."""
    missing = np.concatenate([[0], np.isnan(values).astype(np.int8), [0]])
    return np.flatnonzero(np.diff(missing)).reshape(-1, 2)
