"""What a plan will cost: output size from its bins and columns, and GPU time where it was measured.

GPU time comes only from measurements: benchmarks/results/*.json files holding at least
    {"window": 524288, "outputs": ["atac:128", ...], "config": "official", "ms_per_window": 812.0,
     "device": "NVIDIA H100 80GB HBM3", "precision": "bfloat16"}
or the fast-path rows of scripts/bench_model.py's results (official model; outputs "all" or "128").
The newest file (by modification time) matching the window size, outputs and model config is used.
"""

from __future__ import annotations

import json
from pathlib import Path

from agpipe.io.parquet import CONTACT_MAPS, JUNCTIONS, kept_rows
from agpipe.jobs.options import Job
from agpipe.model.config import ALL_OUTPUTS
from agpipe.jobs.plan import Window

VALUE_BYTES = 4  # float32
BENCHMARK_RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
SHOWN_CONTIGS = 8


def window_value_bytes(job: Job, window: Window) -> int:
    """Bytes of the values one window writes (junctions, which depend on the predictions, not counted)."""
    total = 0
    for output, columns in job.columns.items():
        if output == JUNCTIONS:
            continue
        rows = len(kept_rows(window, output.resolution))
        cells = rows * (rows + 1) // 2 if output == CONTACT_MAPS else rows  # contact maps: upper triangle
        total += cells * len(columns) * VALUE_BYTES
    return total


def full_window(job: Job) -> Window:
    """A window whose kept span is whole, for per-window sizes."""
    crop = job.crop
    return Window(0, "", 0, job.options.window, crop, job.options.window - crop)


def measured_ms_per_window(job: Job, results: Path | None = None) -> tuple[float, str] | None:
    """(ms per window, what it was measured on) from the newest matching benchmark result, if any."""
    results = results or BENCHMARK_RESULTS
    wanted = sorted(str(o) for o in job.outputs)
    files = sorted(results.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True) if results.is_dir() else []
    output_sets = {
        "all": sorted(str(o) for o in ALL_OUTPUTS),
        "128": sorted(str(o) for o in ALL_OUTPUTS if o.resolution == 128),
    }
    for path in files:
        try:
            result = json.loads(path.read_text())
            for row in result.get("results", []):  # scripts/bench_model.py
                if (
                    row["impl"].startswith("fast")
                    and row["length"] == job.options.window
                    and output_sets.get(row["outputs"]) == wanted
                    and job.weights.config_name == "official"
                ):
                    return float(row["ms"]), f"{result['card']}, bfloat16 fast path, {path.name}"
            matches = (result["window"], sorted(result["outputs"]), result["config"]) == (job.options.window, wanted, job.weights.config_name)
            if matches:
                return float(result["ms_per_window"]), f"{result.get('device', '?')}, {result.get('precision', '?')}, {path.name}"
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def dry_run_report(job: Job) -> str:
    """The plan as --dry-run prints it."""
    o = job.options
    names = [name for name, _ in job.contigs]
    shown = ", ".join(names[:SHOWN_CONTIGS]) + (f", ... ({len(names) - SHOWN_CONTIGS} more)" if len(names) > SHOWN_CONTIGS else "")
    size = sum(window_value_bytes(job, w) for w in job.windows())
    columns = ", ".join(f"{out} ({len(cols)})" for out, cols in job.columns.items())
    lines = [
        f"genome    {o.genome}: {len(names)} of {len(job.genome_contigs)} contigs ({shown})"
        + (f", regions from {o.regions}" if o.regions else ""),
        f"windows   {job.window_count:,} of {o.window:,} bp, crop {job.crop:,} bp each side; {job.bases:,} bases kept",
        f"outputs   {columns} (columns per output)",
        *(f"note      {note}" for note in job.notes),
        f"weights   {job.weights.path} ({job.weights.config_name})",
        f"output    about {human_bytes(size)} of values before compression (bins x columns x {VALUE_BYTES} bytes;"
        " all-N windows, which are skipped, included"
        + ("; junctions not estimated: they depend on the predicted sites)" if JUNCTIONS in job.outputs else ")"),
    ]
    measured = measured_ms_per_window(job)
    if measured is None:
        lines.append(
            f"GPU time  not measured yet for {o.window:,} bp windows with these outputs "
            f"({job.weights.config_name} model; no matching benchmarks/results/*.json)"
        )
    else:
        ms, where = measured
        hours = ms * job.window_count / 3.6e6
        lines.append(f"GPU time  about {hours:.2f} GPU-hours at {ms:.0f} ms per window ({where}); divide by the number of GPUs")
    return "\n".join(lines)


def human_bytes(n: float) -> str:
    units = ("bytes", "KB", "MB", "GB", "TB")
    unit = 0
    while n >= 1000 and unit < len(units) - 1:
        n /= 1000
        unit += 1
    return f"{n:.0f} bytes" if unit == 0 else f"{n:.1f} {units[unit]}"
