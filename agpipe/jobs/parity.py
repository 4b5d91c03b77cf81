"""The parity check's logic: which windows to check, what the run wrote for them, how it compares
with the JAX reference's predictions, and the verdict. No Ray here: agpipe.jobs.parity_stage runs
the reference and feeds these functions; agpipe.jobs.parity_report writes what they find.

A comparison is one sampled window x one output. "Ours" is what the run WROTE: the part file read
back from OUT, so a fault anywhere between the model and the file shows. The reference's
predictions come cropped by the workers' own kept_outputs, so both sides cover the same rows.
Rows are matched by their keys (bin, pair of bins, junction), never by position in the file.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from agpipe.io.parquet import CONTACT_MAPS, CONTACT_MAP_KEYS, JUNCTION_KEYS, JUNCTIONS, PREDICTION_KEYS, WindowRecord, kept_rows, part_path, validate_part
from agpipe.jobs.plan import Window
from agpipe.jobs.windows import WindowPrediction
from agpipe.model.agreement import Agreement, agreement
from agpipe.model.config import Output

THRESHOLDS_FILE = Path(__file__).resolve().parents[2] / "configs" / "parity.yaml"
DEFAULT_SAMPLE = 4  # windows checked by default: enough to catch a broken fast path, cheap on a CPU
VERDICTS = ("pass", "diverged", "nonfinite")
CHECKS = ("finite", "layout", "pearson", "within", "worst", "bias")
POINTS_PER_COMPARISON = 2000  # (reference, ours) pairs kept per comparison for the plots
# Junction keys pack (donor, acceptor, strand) relative to the window start; windows are <= 2^20 bp.
POSITION_BITS = 21


class ParityError(ValueError):
    """The parity check cannot run (one-line message saying what to do)."""


@dataclasses.dataclass(frozen=True)
class ParitySettings:
    sample: float  # a count of windows (>= 1) or a fraction of the done windows (< 1)
    seed: int
    reference_checkpoint: Path | None  # an official Orbax checkpoint; None: the run's weights
    reference_precision: str  # float32, bfloat16, or auto (the run's)


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """One profile of configs/parity.yaml."""

    profile: str
    min_pearson: float
    atol: float
    rtol: float
    min_within: float
    max_scaled_error: float
    max_bias_z: float
    max_bias_relative: float
    bias_block_bp: int


@dataclasses.dataclass(frozen=True)
class Comparison:
    """One window x one output: how what the run wrote agrees with the reference."""

    window: Window
    output: Output
    agreement: Agreement
    checks: dict[str, bool]  # CHECKS -> passed
    unmatched_rows: int  # rows on one side only: a layout failure, except for junctions (site selection may differ)
    part_intact: bool  # the part file still has the size and sha256 the run recorded
    points: np.ndarray  # (n, 2) sampled (reference, ours) values, for the plots
    tolerance_used: np.ndarray  # |ours - ref| / (atol + rtol * |ref|) of the sampled values

    @property
    def passed(self) -> bool:
        return all(self.checks.values())


# ---------------------------------------------------------------- which windows


def parse_sample(value: str | float) -> float:
    """--parity-sample: a count of windows (4), a fraction of them (0.01), or 0 for no check."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (number == 0 or 0 < number < 1 or (number >= 1 and number.is_integer())):
        raise ValueError(f"parity sample {value!r}: give a count of windows (4), a fraction of them (0.01), or 0 for no check")
    return number


def sample_count(sample: float, eligible: int) -> int:
    """How many of `eligible` windows a sample takes: a fraction rounds up (at least one window)."""
    wanted = math.ceil(sample * eligible) if 0 < sample < 1 else int(sample)
    return min(wanted, eligible)


def sample_windows(records: Sequence[WindowRecord], sample: float, seed: int) -> list[WindowRecord]:
    """The windows to check, by window_id. Only `done` windows have predictions to check (skipped
    all-N, failed and pending ones have none). The seeded sample goes round-robin over the contigs
    in a shuffled order, each contig's windows in a shuffled order, so a small sample spreads over
    contigs instead of landing on the largest; every window whose output held NaN/Inf joins it."""
    done = sorted((r for r in records if r.status == "done"), key=lambda r: r.window_id)
    rng = np.random.default_rng(seed)
    by_contig: dict[str, list[WindowRecord]] = {}
    for r in done:
        by_contig.setdefault(r.chrom, []).append(r)
    queues = [[windows[i] for i in rng.permutation(len(windows))] for windows in by_contig.values()]
    queues = [queues[i] for i in rng.permutation(len(queues))]
    picked: list[WindowRecord] = []
    wanted = sample_count(sample, len(done))
    for turn in range(max((len(q) for q in queues), default=0)):
        picked += [q[turn] for q in queues if turn < len(q)][: wanted - len(picked)]
    chosen = {r.window_id: r for r in picked}
    chosen.update((r.window_id, r) for r in done if r.nonfinite_count > 0)
    return [chosen[i] for i in sorted(chosen)]


# ---------------------------------------------------------------- thresholds


def load_thresholds(run_precision: str, reference_precision: str, path: Path = THRESHOLDS_FILE) -> Thresholds:
    """The profile for the precisions compared: f32_vs_f32, bf16_vs_bf16, or bf16_vs_f32 for one of each."""
    short = {"float32": "f32", "bfloat16": "bf16"}
    first, second = sorted((short[run_precision], short[reference_precision]))  # "bf16" sorts first
    profile = f"{first}_vs_{second}"
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
        values = document["profiles"][profile]
        return Thresholds(
            profile=profile,
            bias_block_bp=int(document["bias_block_bp"]),
            **{f.name: float(values[f.name]) for f in dataclasses.fields(Thresholds) if f.name not in ("profile", "bias_block_bp")},
        )
    except OSError as e:
        raise ParityError(f"cannot read the parity thresholds {path}: {e.strerror or e}") from None
    except (yaml.YAMLError, KeyError, TypeError, ValueError) as e:
        raise ParityError(f"parity thresholds {path}: profile {profile} is incomplete or malformed ({type(e).__name__}: {e})") from None


def checks(result: Agreement, layout: bool, thresholds: Thresholds) -> dict[str, bool]:
    """Each check of a comparison, passed or not (see configs/parity.yaml). A check without values
    to judge (a constant output for Pearson, fewer than two blocks for the bias) passes."""
    t = thresholds
    real_bias = abs(result.bias_z) > t.max_bias_z and abs(result.bias_relative) > t.max_bias_relative
    return {
        "finite": result.nonfinite_ours == 0 and result.nonfinite_reference == 0,
        "layout": layout,
        "pearson": math.isnan(result.pearson) or result.pearson >= t.min_pearson,
        "within": result.values == 0 or result.within >= t.min_within,
        "worst": result.values == 0 or result.max_scaled_error <= t.max_scaled_error,
        "bias": math.isnan(result.bias_z) or not real_bias,
    }


# ---------------------------------------------------------------- comparing one window


@dataclasses.dataclass(frozen=True)
class Rows:
    """One side of a comparison: a key per row (its place in the window) and the values."""

    keys: np.ndarray  # (rows,) int64
    values: np.ndarray  # (rows, columns)


def read_written(out: Path, window: Window, output: Output) -> Rows:
    """What the run wrote for one window and output, read back from its part file."""
    table = pq.read_table(out / part_path(output, window.chrom, window.window_id))
    keys = {JUNCTIONS: JUNCTION_KEYS, CONTACT_MAPS: CONTACT_MAP_KEYS}.get(output, PREDICTION_KEYS)
    columns = table.column_names[len(keys) :]
    values = np.zeros((table.num_rows, len(columns)), np.float32)
    for k, column in enumerate(columns):  # float16 files read back as float32
        values[:, k] = table[column].to_numpy(zero_copy_only=False)
    if output == JUNCTIONS:
        strand = (table["strand"].to_numpy(zero_copy_only=False) == "-").astype(np.int64)
        donor, acceptor = (table[c].to_numpy() - window.start for c in ("donor", "acceptor"))
        return Rows(junction_keys(donor, acceptor, strand), values)
    if output == CONTACT_MAPS:
        size = CONTACT_MAPS.resolution
        i, j = ((table[c].to_numpy() - window.start) // size for c in ("bin_start_i", "bin_start_j"))
        return Rows(pair_keys(i, j, window), values)
    return Rows((table["start"].to_numpy() - window.start) // output.resolution, values)


def reference_rows(reference: WindowPrediction, output: Output) -> Rows:
    """The reference's rows for one output, keyed as read_written keys the run's."""
    window = reference.window
    if output == JUNCTIONS:
        keys, values = [], []
        for strand, pairs in enumerate(reference.junction_pairs):
            donors = reference.junction_positions[2 * strand][pairs.donor]
            acceptors = reference.junction_positions[2 * strand + 1][pairs.acceptor]
            keys.append(junction_keys(donors, acceptors, np.full(len(donors), strand)))
            values.append(pairs.counts)
        return Rows(np.concatenate(keys), np.concatenate(values))
    rows = kept_rows(window, output.resolution)
    if output == CONTACT_MAPS:
        i, j = np.triu_indices(len(rows))  # the upper triangle is what is written
        return Rows(pair_keys(rows.start + i, rows.start + j, window), reference.contact_maps[i, j])
    return Rows(np.arange(rows.start, rows.stop), reference.values(output))


def junction_keys(donor: np.ndarray, acceptor: np.ndarray, strand: np.ndarray) -> np.ndarray:
    """(donor, acceptor, strand) as one int64, positions relative to the window start."""
    return ((donor.astype(np.int64) << POSITION_BITS) | acceptor.astype(np.int64)) << 1 | strand.astype(np.int64)


def pair_keys(i: np.ndarray, j: np.ndarray, window: Window) -> np.ndarray:
    bins = (window.end - window.start) // CONTACT_MAPS.resolution
    return i.astype(np.int64) * bins + j.astype(np.int64)


def compare_output(
    out: Path, record: WindowRecord, output: Output, reference: WindowPrediction, thresholds: Thresholds, rng: np.random.Generator
) -> Comparison:
    """One window x one output: the written rows against the reference's, matched by key.

    Tracks and contact maps must have exactly the window's rows (the `layout` check); junctions are
    compared on the pairs both sides predicted, as the two models may select different splice sites
    where probabilities are close to each other or to the threshold."""
    window = reference.window
    part = next((p for p in record.parts if p.path == part_path(output, window.chrom, window.window_id)), None)
    intact = part is not None and validate_part(out, part)
    expected = reference_rows(reference, output)
    try:
        written = read_written(out, window, output) if part is not None else None
    except (OSError, pa.ArrowException, KeyError):  # missing, unreadable, or without its key columns
        written = None
    if written is None or written.values.shape[1] != expected.values.shape[1]:
        nothing = agreement(np.zeros((0, 0)), np.zeros((0, 0)), thresholds.atol, thresholds.rtol)
        return Comparison(window, output, nothing, checks(nothing, False, thresholds), len(expected.keys), intact, np.zeros((0, 2)), np.zeros(0))
    if np.array_equal(written.keys, expected.keys):
        ours, theirs = written.values, expected.values
    else:
        _, mine, its = np.intersect1d(written.keys, expected.keys, return_indices=True)
        ours, theirs = written.values[mine], expected.values[its]
    unmatched = len(written.keys) + len(expected.keys) - 2 * len(ours)
    layout = output == JUNCTIONS or (unmatched == 0 and len(np.unique(written.keys)) == len(written.keys))
    per_bin = output not in (JUNCTIONS, CONTACT_MAPS)
    block_rows = max(1, thresholds.bias_block_bp // output.resolution) if per_bin else 1
    result = agreement(ours, theirs, thresholds.atol, thresholds.rtol, block_rows)
    points = sample_points(theirs, ours, rng)
    used = np.abs(points[:, 1] - points[:, 0]) / (thresholds.atol + thresholds.rtol * np.abs(points[:, 0]))
    return Comparison(window, output, result, checks(result, layout, thresholds), unmatched, intact, points, used)


def sample_points(reference: np.ndarray, ours: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Up to POINTS_PER_COMPARISON (reference, ours) pairs, finite on both sides, at random."""
    size = reference.size
    flat = rng.choice(size, POINTS_PER_COMPARISON, replace=False) if size > POINTS_PER_COMPARISON else np.arange(size)
    points = np.stack([reference.reshape(-1)[flat], ours.reshape(-1)[flat]], axis=1).astype(np.float64)
    return points[np.isfinite(points).all(axis=1)]


# ---------------------------------------------------------------- the verdict


@dataclasses.dataclass(frozen=True)
class Verdict:
    verdict: str  # one of VERDICTS
    summary: str  # one line
    diverged: list[str]  # outputs (head:resolution) with a failed check other than `finite`


def judge(comparisons: Sequence[Comparison], records: Sequence[WindowRecord], windows_checked: int) -> Verdict:
    """nonfinite when the run holds NaN/Inf anywhere (windows.parquet) or either side of a
    comparison does; else diverged when any comparison fails a check, naming the outputs; else pass."""
    diverged = list(dict.fromkeys(str(c.output) for c in comparisons if not all(v for k, v in c.checks.items() if k != "finite")))
    outputs = len({c.output for c in comparisons})
    run_nonfinite = [r for r in records if r.nonfinite_count]
    reference_nonfinite = sum(c.agreement.nonfinite_reference for c in comparisons)
    ours_nonfinite = sum(c.agreement.nonfinite_ours for c in comparisons)
    also = f"; also diverged: {', '.join(diverged)}" if diverged else ""
    if run_nonfinite or ours_nonfinite or reference_nonfinite:
        total = sum(r.nonfinite_count for r in run_nonfinite)
        where = f"{total:,} NaN/Inf values in {len(run_nonfinite)} windows of the run" if run_nonfinite else "no NaN/Inf in the run's output"
        if reference_nonfinite:
            cause = f"the reference gives {reference_nonfinite:,} NaN/Inf values on the same inputs (the weights produce them)"
        else:
            cause = "the reference is finite on the same inputs (a fault of the run's model or weights file)"
        return Verdict("nonfinite", f"nonfinite: {where}; {cause}{also}", diverged)
    if diverged:
        failed = sum(not c.passed for c in comparisons)
        return Verdict("diverged", f"diverged: {', '.join(diverged)} disagree with the JAX reference ({failed} of {len(comparisons)} comparisons fail)", diverged)
    if not windows_checked:
        return Verdict("pass", "pass: no window of the run has predictions to check", [])
    return Verdict("pass", f"pass: {windows_checked} windows x {outputs} outputs agree with the JAX reference", [])
