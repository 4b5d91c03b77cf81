"""What a parity check leaves in OUT/parity/: parity.parquet (one row per window x output, every
metric and check), report.md (the verdict first, then the tables), and PNG plots (reference vs ours
per head, the errors in units of the tolerance).

Every file is written under a temporary name and renamed into place (agpipe.io.export.atomic_files);
plots of an earlier check that this one has no data for are removed. The manifest's `parity` field,
written after these files, is what says which check they belong to.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from agpipe.io.export import atomic_files
from agpipe.io.parquet import SCHEMA_VERSION
from agpipe.io.results import Region
from agpipe.jobs.parity import CHECKS, Comparison, Thresholds
from agpipe.model.config import ALL_OUTPUTS

PARITY_DIR = "parity"
TABLE_FILE = "parity.parquet"
REPORT_FILE = "report.md"
ERRORS_PLOT = "errors.png"
SCATTER_PLOT = re.compile(r"^scatter-[a-z_]+\.png$")
DPI = 110


def comparison_table(comparisons: Sequence[Comparison]) -> pa.Table:
    """parity.parquet: one row per comparison, sorted by window then output; `pass_<check>` per check."""
    rows = []
    for c in comparisons:
        a = c.agreement
        rows.append(
            {
                "window_id": c.window.window_id,
                "chrom": c.window.chrom,
                "out_start": c.window.out_start,
                "out_end": c.window.out_end,
                "head": c.output.head,
                "resolution": c.output.resolution,
                "values": a.values,
                "unmatched_rows": c.unmatched_rows,
                "nonfinite_ours": a.nonfinite_ours,
                "nonfinite_reference": a.nonfinite_reference,
                "pearson": a.pearson,
                "max_abs_diff": a.max_abs_diff,
                "mean_abs_diff": a.mean_abs_diff,
                "within": a.within,
                "max_scaled_error": a.max_scaled_error,
                "bias": a.bias,
                "bias_relative": a.bias_relative,
                "bias_z": a.bias_z,
                "part_intact": c.part_intact,
                **{f"pass_{check}": c.checks[check] for check in CHECKS},
                "pass": c.passed,
            }
        )
    fields = [
        ("window_id", pa.int64()), ("chrom", pa.string()), ("out_start", pa.int64()), ("out_end", pa.int64()),
        ("head", pa.string()), ("resolution", pa.int64()), ("values", pa.int64()), ("unmatched_rows", pa.int64()),
        ("nonfinite_ours", pa.int64()), ("nonfinite_reference", pa.int64()),
        *((name, pa.float64()) for name in ("pearson", "max_abs_diff", "mean_abs_diff", "within", "max_scaled_error", "bias", "bias_relative", "bias_z")),
        ("part_intact", pa.bool_()), *((f"pass_{check}", pa.bool_()) for check in CHECKS), ("pass", pa.bool_()),
    ]
    schema = pa.schema(fields, metadata={"agpipe.schema_version": str(SCHEMA_VERSION)})
    return pa.Table.from_pylist(rows, schema=schema)


def write_parity_folder(out: Path, record: Mapping[str, Any], comparisons: Sequence[Comparison], thresholds: Thresholds) -> None:
    """Writes OUT/parity/ for one check; `record` is the manifest's parity field for it."""
    import matplotlib

    matplotlib.use("Agg")  # before pyplot: no display needed
    folder = out / PARITY_DIR
    folder.mkdir(parents=True, exist_ok=True)
    heads = list(dict.fromkeys(c.output.head for c in sorted(comparisons, key=lambda c: ALL_OUTPUTS.index(c.output))))
    plots = [f"scatter-{head}.png" for head in heads] + ([ERRORS_PLOT] if comparisons else [])
    names = [TABLE_FILE, REPORT_FILE, *plots]
    with atomic_files([folder / name for name in names]) as temps:
        files = dict(zip(names, temps))
        pq.write_table(comparison_table(comparisons), files[TABLE_FILE], compression="zstd")
        files[REPORT_FILE].write_text(report_markdown(record, comparisons, thresholds, plots), encoding="utf-8")
        for head in heads:
            plot_scatter(files[f"scatter-{head}.png"], head, [c for c in comparisons if c.output.head == head])
        if comparisons:
            plot_errors(files[ERRORS_PLOT], comparisons)
    for stale in folder.iterdir():
        if (SCATTER_PLOT.match(stale.name) or stale.name == ERRORS_PLOT) and stale.name not in plots:
            stale.unlink()


# ---------------------------------------------------------------- report.md


def number(value: float, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}g}"


def cell(text: str) -> str:
    """Text for a Markdown table cell: contig names may hold '|'."""
    return text.replace("\\", "\\\\").replace("|", "\\|")


def comparison_line(c: Comparison) -> str:
    a = c.agreement
    failed = [check for check in CHECKS if not c.checks[check]]
    region = cell(str(Region(c.window.chrom, c.window.out_start, c.window.out_end)))
    one_sided = f" ({c.unmatched_rows:,} row{'s' if c.unmatched_rows != 1 else ''} on one side only)" if c.unmatched_rows else ""
    values = f"{a.values:,}{one_sided}"
    cells = [
        str(c.window.window_id), region, str(c.output), values, number(a.pearson, 6), number(a.max_abs_diff), number(a.mean_abs_diff),
        "-" if math.isnan(a.within) else f"{a.within:.2%}", number(a.max_scaled_error, 3), number(a.bias_z, 3), number(a.bias_relative, 2),
        f"{a.nonfinite_ours} / {a.nonfinite_reference}",
        "pass" if c.passed else "**fail: " + ", ".join(failed) + "**" + ("" if c.part_intact else " (part file changed since the run wrote it)"),
    ]
    return "| " + " | ".join(cells) + " |"


def comparisons_table(comparisons: Sequence[Comparison]) -> list[str]:
    header = ["window", "kept span", "output", "values", "Pearson r", "max abs diff", "mean abs diff", "within tol.", "worst", "bias z", "rel. bias", "NaN/Inf ours / ref", "result"]
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *(comparison_line(c) for c in comparisons)]


def report_markdown(record: Mapping[str, Any], comparisons: Sequence[Comparison], thresholds: Thresholds, plots: Sequence[str]) -> str:
    """The report: the verdict and its one-line summary first, then what was compared with what,
    the thresholds, the failed comparisons, every comparison, and the plots."""
    t = thresholds
    reference = record["reference"]
    weights = f"official checkpoint {reference['checkpoint']}" if reference["checkpoint"] else "the run's weights, mapped back to the official tree"
    sample = record["sample"]
    asked = f"{sample:g} of the done windows" if 0 < sample < 1 else f"{int(sample)} windows"
    lines = [
        f"# Parity check: {record['verdict']}",
        "",
        record["summary"],
        "",
        f"- run: `{record['run']['out']}`, {record['run']['precision']} on {record['run']['device'] or 'an unknown device'}, "
        f"weights `{record['run']['weights']}` (sha256 {record['run']['weights_sha256'][:12]}...)",
        f"- reference: JAX reference of the official model, {reference['precision']} on {reference['device']}, {weights}",
        f"- sample: {len(record['windows'])} of {record['windows_done']} done windows (asked: {asked}, seed {record['seed']}, "
        f"stratified over contigs; {record['windows_nonfinite']} with NaN/Inf added)",
        f"- NaN/Inf values in the whole run (windows.parquet): {record['nonfinite_total']:,}",
        f"- thresholds (configs/parity.yaml, profile `{t.profile}`): Pearson r >= {t.min_pearson:g}; >= {t.min_within:.1%} of values within "
        f"{t.atol:g} + {t.rtol:g} x |ref|; worst value within {t.max_scaled_error:g} x (track RMS + |ref|); bias fails if "
        f"|z| > {t.max_bias_z:g} (blocks of {t.bias_block_bp} bp) and |bias| > {t.max_bias_relative:g} x mean |ref|",
        f"- checked {record['checked_at']} in {record['seconds']:.1f} s",
        "",
    ]
    failed = [c for c in comparisons if not c.passed]
    if failed:
        lines += ["## Failed comparisons", "", *comparisons_table(failed), ""]
    lines += ["## Comparisons", "", "One row per sampled window and output: the values the run wrote to Parquet against the reference's.", ""]
    lines += [*comparisons_table(comparisons), ""] if comparisons else ["No window had predictions to compare.", ""]
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{name.removesuffix('.png')}]({name})" for name in plots]
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------- plots


def plot_scatter(path: Path, head: str, comparisons: Sequence[Comparison]) -> None:
    """Reference (x) against ours (y), one panel per output of the head, every sampled window's
    points together; log axes where every value is positive (genome tracks in data space)."""
    import matplotlib.pyplot as plt

    outputs = sorted({c.output for c in comparisons}, key=ALL_OUTPUTS.index)
    fig, axes = plt.subplots(1, len(outputs), figsize=(4.2 * len(outputs), 4.2), squeeze=False)
    for ax, output in zip(axes[0], outputs):
        points = np.concatenate([c.points for c in comparisons if c.output == output])
        failed = any(not c.passed for c in comparisons if c.output == output)
        ax.scatter(points[:, 0], points[:, 1], s=3, alpha=0.4, color="tab:red" if failed else "tab:blue", linewidths=0)
        if len(points):
            lo, hi = float(points.min()), float(points.max())
            if lo > 0:
                ax.set_xscale("log")
                ax.set_yscale("log")
            ax.plot([lo, hi], [lo, hi], color="black", linewidth=0.8)
        ax.set_title(f"{output}{' (fails)' if failed else ''}")
        ax.set_xlabel("JAX reference")
        ax.set_ylabel("ours (written)")
    fig.suptitle(f"{head}: written predictions vs the JAX reference")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, format="png")
    plt.close(fig)


def plot_errors(path: Path, comparisons: Sequence[Comparison]) -> None:
    """Histogram per output of |ours - ref| in units of the tolerance (atol + rtol |ref|): values
    right of 1 are outside it; exact agreement is drawn at the left edge."""
    import matplotlib.pyplot as plt

    floor = 1e-6
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bins = np.linspace(np.log10(floor), 3, 61)
    for output in sorted({c.output for c in comparisons}, key=ALL_OUTPUTS.index):
        used = np.concatenate([c.tolerance_used for c in comparisons if c.output == output])
        if used.size:
            ax.hist(np.log10(np.clip(used, floor, 1e3)), bins=bins, histtype="step", label=str(output))
    ax.axvline(0.0, color="black", linestyle="--", linewidth=0.8)
    ax.set_xlabel("log10 |ours - ref| / (atol + rtol |ref|)    (right of 0: outside the tolerance)")
    ax.set_ylabel("sampled values")
    ax.set_yscale("log")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Errors of the written predictions, in units of the tolerance")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI, format="png")
    plt.close(fig)

