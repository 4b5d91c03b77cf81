"""How closely two sets of predictions agree: the numbers the parity stage (agpipe.jobs.parity) and
the numerics tests judge the PyTorch model by, against the JAX reference.

Both inputs are (rows, columns): rows are positions (bins, pairs of bins, junctions), columns are
tracks. Values that are not finite on either side are counted and left out of every other number.
Sums run in float64 over chunks of rows, so a 1 bp output of the official model (hundreds of
millions of values) is never copied whole.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

CHUNK_VALUES = 1 << 22  # values per chunk of rows: 32 MiB per float64 copy


@dataclasses.dataclass(frozen=True)
class Agreement:
    values: int  # values compared (finite on both sides)
    nonfinite_ours: int
    nonfinite_reference: int
    pearson: float  # NaN when either side is constant
    max_abs_diff: float
    mean_abs_diff: float
    within: float  # fraction of values with |ours - ref| <= atol + rtol * |ref|
    max_scaled_error: float  # max of |ours - ref| / (rms of ref's column + |ref|): the worst single value
    bias: float  # mean of ours - ref
    bias_relative: float  # bias / mean |ref|
    bias_z: float  # bias in standard errors of block means; NaN with fewer than 2 blocks


def agreement(ours: np.ndarray, reference: np.ndarray, atol: float, rtol: float, block_rows: int = 1) -> Agreement:
    """Compares ours with the reference, element by element.

    The bias test uses means over blocks of `block_rows` rows (all columns): neighbouring positions
    share upstream roundings, so single differences are correlated and their own standard error
    would overstate how sure a bias is (batch means, as tests/test_model_parity.py does).
    """
    if ours.shape != reference.shape or ours.ndim != 2:
        raise ValueError(f"cannot compare shapes {ours.shape} and {reference.shape}: expected the same (rows, columns)")
    rows, columns = ours.shape
    step = max(block_rows, (CHUNK_VALUES // max(columns, 1)) // block_rows * block_rows)
    chunks = [slice(first, min(first + step, rows)) for first in range(0, rows, step)]

    # Pass 1: counts, means, and each column's RMS (the scale of the worst-value test).
    n = nonfinite_ours = nonfinite_reference = 0
    sum_ours = sum_ref = sum_abs_ref = 0.0
    squares = np.zeros(columns)
    counts = np.zeros(columns)
    for part in chunks:
        x, y = ours[part].astype(np.float64), reference[part].astype(np.float64)
        finite_x, finite_y = np.isfinite(x), np.isfinite(y)
        nonfinite_ours += int(x.size - finite_x.sum())
        nonfinite_reference += int(y.size - finite_y.sum())
        both = finite_x & finite_y
        n += int(both.sum())
        sum_ours += float(x[both].sum())
        sum_ref += float(y[both].sum())
        sum_abs_ref += float(np.abs(y[both]).sum())
        squares += np.square(np.where(both, y, 0.0)).sum(axis=0)
        counts += both.sum(axis=0)
    if n == 0:
        nan = math.nan
        return Agreement(0, nonfinite_ours, nonfinite_reference, nan, nan, nan, nan, nan, nan, nan, nan)
    mean_x, mean_y = sum_ours / n, sum_ref / n
    rms = np.sqrt(np.divide(squares, counts, out=np.zeros(columns), where=counts > 0))

    # Pass 2: centred sums for Pearson, the differences, and the block means.
    sxy = sxx = syy = sum_abs = 0.0
    max_abs = max_scaled = 0.0
    within = 0
    block_means: list[np.ndarray] = []
    for part in chunks:
        x, y = ours[part].astype(np.float64), reference[part].astype(np.float64)
        both = np.isfinite(x) & np.isfinite(y)
        d = np.where(both, x - y, 0.0)
        dx, dy = np.where(both, x - mean_x, 0.0), np.where(both, y - mean_y, 0.0)
        sxy += float((dx * dy).sum())
        sxx += float((dx * dx).sum())
        syy += float((dy * dy).sum())
        magnitude = np.abs(d)
        sum_abs += float(magnitude.sum())
        max_abs = max(max_abs, float(magnitude.max(initial=0.0)))
        within += int((both & (magnitude <= atol + rtol * np.abs(np.where(both, y, 0.0)))).sum())
        scale = rms + np.abs(np.where(both, y, 0.0))
        scaled = np.divide(magnitude, scale, out=np.where(magnitude > 0, np.inf, 0.0), where=scale > 0)
        max_scaled = max(max_scaled, float(scaled.max(initial=0.0)))
        blocks = -(-d.shape[0] // block_rows)
        edges = np.arange(0, blocks * block_rows, block_rows)
        sums = np.add.reduceat(d.sum(axis=1), edges)
        sizes = np.add.reduceat(both.sum(axis=1), edges)
        block_means.append(sums[sizes > 0] / sizes[sizes > 0])

    pearson = sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan
    bias = (sum_ours - sum_ref) / n
    mean_abs_ref = sum_abs_ref / n
    bias_relative = bias / mean_abs_ref if mean_abs_ref > 0 else (0.0 if bias == 0 else math.inf)
    return Agreement(
        values=n,
        nonfinite_ours=nonfinite_ours,
        nonfinite_reference=nonfinite_reference,
        pearson=pearson,
        max_abs_diff=max_abs,
        mean_abs_diff=sum_abs / n,
        within=within / n,
        max_scaled_error=max_scaled,
        bias=bias,
        bias_relative=bias_relative,
        bias_z=bias_z(np.concatenate(block_means)),
    )


def bias_z(block_means: np.ndarray) -> float:
    """The mean of block means in standard errors: 0 for no bias; NaN with fewer than 2 blocks."""
    if block_means.size < 2:
        return math.nan
    mean = float(block_means.mean())
    spread = float(block_means.std(ddof=1)) / math.sqrt(block_means.size)
    if spread == 0:
        return 0.0 if mean == 0 else math.copysign(math.inf, mean)
    return mean / spread
