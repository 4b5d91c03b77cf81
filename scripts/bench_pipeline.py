"""Whole-pipeline throughput and multi-GPU scaling: `agpipe run` on a synthetic genome of realistic
shape, on 1, 2, 4 ... GPUs of this host, with the default outputs (seven track heads at 128 bp).

    python scripts/bench_pipeline.py --gpus 1,2 --genome-mb 120

Generates the genome (contigs of varied length, N runs and gaps, soft-masked stretches) and random
official-size weights on this machine, runs the real command once per GPU count, samples GPU
utilization with nvidia-smi while it runs, and reports windows/s, bases/s, GPU busy fraction, bytes
written/s, time to first window, scaling efficiency, whether runs on different GPU counts wrote
identical values, and the projection for a 3.1 Gb genome. JSON goes to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import bisect
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HG38_BASES = 3.1e9


def synthetic_genome(path: Path, total_mb: int, seed: int = 0) -> list[tuple[str, int]]:
    """Contigs from 40 Mb down to 50 kb scaffolds, N gaps (some longer than a window), telomeric
    N runs, soft-masked repeats: the shape of a real assembly, written as plain FASTA."""
    rng = np.random.default_rng(seed)
    sizes = []
    remaining = total_mb * 1_000_000
    for mb in (40, 30, 20, 15, 10, 5, 2, 1):
        if remaining <= 0:
            break
        size = min(int(mb * 1e6 * rng.uniform(0.8, 1.2)), remaining)
        sizes.append(size)
        remaining -= size
    while remaining > 0:
        size = min(int(rng.uniform(5e4, 5e5)), remaining)
        sizes.append(size)
        remaining -= size
    bases = np.frombuffer(b"ACGT", np.uint8)
    contigs = []
    with open(path, "wb") as f:
        for i, size in enumerate(sizes):
            seq = bases[rng.choice(4, size, p=[0.295, 0.205, 0.205, 0.295])]
            seq[: min(10_000, size // 10)] = ord("N")  # telomere
            for _ in range(max(1, size // 5_000_000)):  # gaps, one in five longer than a window
                start = rng.integers(0, size)
                seq[start : start + (rng.integers(600_000, 900_000) if rng.random() < 0.2 else rng.integers(100, 50_000))] = ord("N")
            for _ in range(size // 20_000):  # soft-masked repeats
                start = rng.integers(0, size)
                span = seq[start : start + rng.integers(100, 6_000)]
                span[span != ord("N")] |= 0x20  # lowercase
            name = f"chr{i + 1}" if i < 8 else f"scaffold_{i - 7}"
            f.write(f">{name}\n".encode())
            body = seq.tobytes()
            f.write(b"\n".join(body[j : j + 80] for j in range(0, size, 80)) + b"\n")
            contigs.append((name, size))
    return contigs


def official_weights(path: Path) -> None:
    from agpipe.model.checkpoint import official_to_ours, random_official_tree, save_weights
    from agpipe.model.config import OFFICIAL
    from agpipe.model.metadata import synthetic_metadata

    params, state = random_official_tree(OFFICIAL, seed=0)
    save_weights(path, official_to_ours(params, state, OFFICIAL), OFFICIAL, synthetic_metadata(OFFICIAL).to_json())


class GpuSampler:
    """nvidia-smi utilization samples (every 200 ms) while a run is going."""

    def __init__(self, gpus: int):
        self.gpus, self.samples, self.stop = gpus, [], threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def loop(self) -> None:
        while not self.stop.is_set():
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"], capture_output=True, text=True
            ).stdout.split()
            self.samples.append((time.monotonic(), [float(u) for u in out[: self.gpus]]))
            time.sleep(0.2)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def run_pipeline(genome: Path, weights: Path, out: Path, gpus: int, window: int, cpus: int, timeout: float, extra: Sequence[str] = ()) -> dict:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(gpus))}
    timeline = out.parent / f"{out.name}-timeline.json"
    cmd = [sys.executable, "-m", "agpipe", "run", str(genome), "--weights", str(weights), "--out", str(out),
           "--window", str(window), "--num-cpus", str(cpus), "--parity-sample", "0", "--ray-timeline", str(timeline), *extra]
    t0 = time.monotonic()
    with GpuSampler(gpus) as sampler:
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise SystemExit(f"agpipe run on {gpus} GPU(s) did not finish in {timeout:.0f} s:\n{(e.stderr or b'')[-3000:]}") from None
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"agpipe run on {gpus} GPU(s) failed:\n{proc.stderr[-3000:]}")
    timings = json.loads((out / "manifest.json").read_text())["timings"]
    first = timings.get("first_window_seconds") or 0.0
    last = timings.get("last_window_seconds") or timings["wall_seconds"]
    busy = [np.mean(u) for t, u in sampler.samples if first + 1.0 < t - t0 < last]
    row = run_metrics(out, gpus, cpus)
    row.update(wall_s=wall, gpu_busy_fraction=float(np.mean(busy)) / 100 if busy else None, stderr_tail=proc.stderr[-1500:])
    row["timeline"] = timeline_summary(timeline) if timeline.exists() else None
    return row


def timeline_summary(path: Path) -> dict:
    """Where the time goes, from the run's Ray timeline (agpipe run --ray-timeline): the rate of
    windows written between the first and the last write (skipped windows included); per task kind,
    median milliseconds of the whole task and of its phases (fetching arguments, executing, storing
    outputs); per model worker, the share of the steady run (after its first batch) in which it
    had no batch at all."""
    events = [e for e in json.loads(path.read_text()) if e.get("ph") == "X"]
    spans: dict[str, list] = {}  # process -> its task spans, by start
    for e in events:
        if e["cat"].startswith("task::") and not e["cat"].endswith("__init__"):
            spans.setdefault(e["tid"], []).append(e)
    for tid in spans:
        spans[tid].sort(key=lambda e: e["ts"])
    durations: dict[tuple[str, str], list] = {}
    for e in events:
        if not e["cat"].startswith("task::") and e["cat"].startswith("task:") and e["tid"] in spans:
            kind = containing_kind(spans[e["tid"]], e)
            if kind:
                durations.setdefault((kind, e["cat"].removeprefix("task:")), []).append(e["dur"])
    writes = sorted(e["ts"] + e["dur"] for s in spans.values() for e in s if e["cat"].endswith("Writer.write"))
    summary: dict = {}
    if len(writes) > 1:  # windows written per second from the first write's end to the last's
        summary["windows_per_s"] = (len(writes) - 1) / ((writes[-1] - writes[0]) / 1e6)
    for kind in sorted({e["cat"] for s in spans.values() for e in s}):
        of_kind = [e for s in spans.values() for e in s if e["cat"] == kind]
        name = kind.removeprefix("task::")
        row = {"tasks": len(of_kind), "processes": len({e["tid"] for e in of_kind}), "median_ms": float(np.median([e["dur"] for e in of_kind])) / 1e3}
        for phase in ("deserialize_arguments", "execute", "store_outputs"):
            if durations.get((kind, phase)):
                row[f"{phase}_median_ms"] = float(np.median(durations[kind, phase])) / 1e3
        if name.endswith(".predict"):
            row["idle_fraction"] = {tid[-8:]: idle_fraction([e for e in s if e["cat"] == kind]) for tid, s in sorted(spans.items()) if any(e["cat"] == kind for e in s)}
        summary[name] = row
    return summary


def containing_kind(spans: list[dict], phase: dict) -> str | None:
    """The kind of the task span (of one process, sorted by start) that contains a phase event."""
    i = bisect.bisect_right([e["ts"] for e in spans], phase["ts"])
    for e in reversed(spans[max(0, i - 4) : i]):
        if e["ts"] <= phase["ts"] and phase["ts"] + phase["dur"] <= e["ts"] + e["dur"] + 1:
            return e["cat"]
    return None


def idle_fraction(spans: list[dict]) -> float:
    """The share of the time from the end of the first span to the last span's end covered by no span."""
    spans = sorted(spans, key=lambda e: e["ts"])
    start = spans[0]["ts"] + spans[0]["dur"]
    end = max(e["ts"] + e["dur"] for e in spans)
    covered, reach = 0.0, start
    for e in spans[1:]:
        lo, hi = max(e["ts"], reach), e["ts"] + e["dur"]
        if hi > lo:
            covered += hi - lo
            reach = hi
    return 1.0 - covered / (end - start) if end > start else 0.0


def run_metrics(out: Path, gpus: int, cpus: int) -> dict:
    """A finished run's throughput, from its manifest and windows.parquet."""
    timings = json.loads((out / "manifest.json").read_text())["timings"]
    first = timings.get("first_window_seconds") or 0.0
    windows = pq.read_table(out / "windows.parquet").to_pylist()
    done = [w for w in windows if w["status"] == "done"]
    bases = sum(w["out_end"] - w["out_start"] for w in done)
    written = sum(p["bytes"] for w in windows for p in (w.get("parts") or []))
    # From the first window written (compile and start-up behind us) to the last (not the final
    # save, the trace, stopping the workers nor the interpreter's exit).
    steady = (timings.get("last_window_seconds") or timings["wall_seconds"]) - first
    streaming = (timings.get("last_window_seconds") or timings["wall_seconds"]) - (timings.get("workers_ready_seconds") or 0.0)
    return {
        "gpus": gpus,
        "windows": len(windows),
        "windows_done": len(done),
        "windows_skipped": sum(w["status"] == "skipped_all_n" for w in windows),
        "bases": bases,
        "first_window_s": first,
        "workers_ready_s": timings.get("workers_ready_seconds"),  # includes Ray's start and planning
        "worker_start_s": timings.get("worker_start_seconds"),  # the slowest worker: read, load, compile
        "sync_s": timings.get("sync_seconds"),  # flushing the parts to disk after the last window (in wall_s)
        "steady_s": steady,
        "windows_per_s": len(done) / steady,
        "bases_per_s": bases / steady,
        "bytes_written": written,
        "bytes_written_per_s": written / steady,
        "model_seconds": timings.get("compute_seconds"),
        "write_seconds": timings.get("write_seconds"),  # summed over windows: writing's CPU-seconds, roughly
        # the share of the CPUs left to reading and writing that writing kept busy after the first window
        "writer_cpu_busy_fraction": timings["write_seconds"] / steady / (cpus - gpus) if timings.get("write_seconds") else None,
        "model_only_windows_per_s": len(done) / timings["compute_seconds"] * gpus if timings.get("compute_seconds") else None,
        # the driver's CPU-seconds per second while windows streamed (its feeding thread, its process)
        **{f"driver_{k}_cpu_fraction": v / streaming for k, v in (timings.get("driver_cpu_seconds") or {}).items()},
    }


def table(rows: list[dict]) -> str:
    """The runs as a Markdown table (timeline columns from timeline_summary)."""
    lines = [
        "| GPUs | args | windows/s | Mb/s | GPU busy | worker idle | predict ms (store) | write s | MB/s written | first window s | scaling | end-to-end / model-only | hg38 hours | same values |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        t = r["timeline"] or {}
        predict, write = t.get("ModelWorker.predict", {}), t.get("PredictionWriter.write", {})
        idle = max(predict.get("idle_fraction", {}).values(), default=float("nan"))
        lines.append(
            f"| {r['gpus']} | {' '.join(r['run_args']) or '-'} | {r['windows_per_s']:.2f} | {r['bases_per_s'] / 1e6:.1f} | {fmt(r['gpu_busy_fraction'])} | {idle:.2f} | "
            f"{predict.get('median_ms', float('nan')):.1f} ({predict.get('store_outputs_median_ms', float('nan')):.1f}) | {write.get('median_ms', float('nan')) / 1e3:.2f} | "
            f"{r['bytes_written_per_s'] / 1e6:.0f} | {r['first_window_s']:.0f} | {r['scaling_efficiency']:.2f} | {fmt(r['end_to_end_over_model_only'])} | "
            f"{r['hg38_projection_hours']:.2f} | {r.get('identical_to_first', '-')} |"
        )
    return "\n".join(lines)


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def same_values(a: Path, b: Path) -> bool:
    """Both runs wrote the same part files with the same values (bit for bit): parts whose sha256
    (recorded in windows.parquet) match hold the same bytes; any other pair is compared by value."""
    from agpipe.io.parquet import read_windows_table

    digests = [{p.path: p.sha256 for w in read_windows_table(run) for p in w.parts} for run in (a, b)]
    if not digests[0] or digests[0].keys() != digests[1].keys():
        return False
    differing = [path for path, digest in digests[0].items() if digests[1][path] != digest]
    return all(pq.read_table(a / path).equals(pq.read_table(b / path)) for path in differing)


def compare(row: dict, rows: list[dict]) -> None:
    """A run's scaling (over the run with its arguments on the fewest GPUs), ratio to model-only, hg38
    projection and, with the first run's arguments, whether it wrote the first run's values."""
    base = min((r for r in rows if r["run_args"] == row["run_args"]), key=lambda r: r["gpus"])
    row["scaling_efficiency"] = row["windows_per_s"] / (base["windows_per_s"] * row["gpus"] / base["gpus"])
    row["end_to_end_over_model_only"] = row["windows_per_s"] / row["model_only_windows_per_s"] if row["model_only_windows_per_s"] else None
    row["hg38_projection_hours"] = HG38_BASES / row["bases_per_s"] / 3600
    if row is not rows[0] and row["run_args"] == rows[0]["run_args"] and "identical_to_first" not in row:  # same codec: compares checksums
        row["identical_to_first"] = same_values(Path(rows[0]["out"]), Path(row["out"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", default="1,2")
    ap.add_argument("--genome-mb", type=int, default=120)
    ap.add_argument("--window", type=int, default=524288)
    ap.add_argument("--work", default="/tmp/agpipe-bench")
    ap.add_argument("--out", default=None)
    ap.add_argument("--timeout", type=float, default=420.0, help="Seconds one run may take.")
    ap.add_argument("--run-args", action="append", default=[], metavar="ARGS",
                    help="More `agpipe run` arguments for the run of the same index in --gpus (e.g. '--compression lz4'); repeat per run.")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    genome, weights = work / f"genome-{args.genome_mb}mb.fa", work / "weights.safetensors"
    if not genome.exists():  # deterministic: a second bench in the same --work reuses it
        t = time.monotonic()
        contigs = synthetic_genome(genome.with_suffix(".partial"), args.genome_mb)
        genome.with_suffix(".partial").rename(genome)
        print(f"genome: {len(contigs)} contigs, {sum(c[1] for c in contigs) / 1e6:.0f} Mb ({time.monotonic() - t:.0f} s)", flush=True)
    if not weights.exists():
        t = time.monotonic()
        official_weights(weights)
        print(f"weights: {weights.stat().st_size / 2**30:.2f} GiB ({time.monotonic() - t:.0f} s)", flush=True)
    cpus = os.cpu_count() or 16
    import torch

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    result = Path(args.out or ROOT / "benchmarks" / "results" / f"pipeline-{card.replace(' ', '_')}-{stamp}.json")
    result.parent.mkdir(parents=True, exist_ok=True)
    shm = shutil.disk_usage("/dev/shm").total / 2**30 if Path("/dev/shm").exists() else None  # Ray's object store lives there
    header = {"card": card, "window": args.window, "genome_mb": args.genome_mb, "cpus": cpus, "dev_shm_gib": shm}
    rows = []
    for i, gpus in enumerate(int(g) for g in args.gpus.split(",")):
        out = work / f"run{len(rows) + 1}-{gpus}gpu"  # a GPU count may repeat: the second run finds a warm compile cache
        subprocess.run(["rm", "-rf", str(out)])
        extra = shlex.split(args.run_args[i]) if i < len(args.run_args) else []
        row = run_pipeline(genome, weights, out, gpus, args.window, cpus, args.timeout, extra)
        row["out"], row["run_args"] = str(out), extra
        rows.append(row)
        print(
            f"{gpus} GPU: {row['windows_done']} windows in {row['wall_s']:.0f} s (first window at {row['first_window_s']:.0f} s); "
            f"steady {row['windows_per_s']:.2f} windows/s, {row['bases_per_s'] / 1e6:.1f} Mb/s, GPU busy "
            f"{row['gpu_busy_fraction'] if row['gpu_busy_fraction'] is None else round(row['gpu_busy_fraction'], 2)}, "
            f"{row['bytes_written_per_s'] / 1e6:.0f} MB/s written; model-only {row['model_only_windows_per_s']:.2f} windows/s; "
            f"driver CPU {fmt(row.get('driver_loop_cpu_fraction'))} (loop), {fmt(row.get('driver_process_cpu_fraction'))} (process)",
            flush=True,
        )
        print(json.dumps(row["timeline"], indent=1), flush=True)
        compare(row, rows)
        result.write_text(json.dumps({**header, "runs": rows}, indent=1))  # kept if a later run fails
    for row in rows:  # a run on fewer GPUs may have come after it
        compare(row, rows)
    result.write_text(json.dumps({**header, "runs": rows}, indent=1))
    print("\n" + table(rows))
    print(f"wrote {result}")


if __name__ == "__main__":
    main()
