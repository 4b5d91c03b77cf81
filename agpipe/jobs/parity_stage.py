"""The parity stage: a sample of a run's windows through the JAX reference, compared with what the run
wrote. `agpipe run` runs it after the main stage; `agpipe parity OUT` runs it on a finished run.

It runs after the main stage, not beside it: the model workers are gone by then, so the reference
has the device to itself, the run's files are final, and the same run gives the same check. The
reference is a Ray actor (agpipe.jobs.reference): on a GPU it asks Ray for a share of one
(REFERENCE_GPU_SHARE, so it can also start beside other work on the card) with JAX's preallocation
off and its allocator capped (REFERENCE_GPU_MEMORY_FRACTION); without a GPU it runs on CPUs. Either
way it takes one window at a time, and reading (encode_window, as the run read) and comparing run
here, on the node that holds OUT and the genome.

    record = run_parity_stage(out, settings, device="cuda", cpus=1, log=print)   # Ray connected
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import ray

from agpipe.io.fasta import open_genome
from agpipe.io.parquet import MANIFEST_FILE, WindowRecord, read_json, read_windows_table, write_json_atomic
from agpipe.jobs.parity import Comparison, ParityError, ParitySettings, Thresholds, compare_output, judge, load_thresholds, sample_windows
from agpipe.jobs.parity_report import PARITY_DIR, REPORT_FILE, write_parity_folder
from agpipe.jobs.plan import Window
from agpipe.jobs.reference import ReferenceWorker, gpu_environment
from agpipe.jobs.stream import error_line
from agpipe.jobs.windows import SkippedWindow, encode_window
from agpipe.model.config import Output, parse_outputs

REFERENCE_GPU_SHARE = 0.2  # Ray's GPU resource: a share, so it never waits for a whole card
REFERENCE_GPU_MEMORY_FRACTION = 0.6  # of the card's memory: the official model at 1 Mb fits
IN_FLIGHT = 2  # windows at the reference at once: one computing while the previous one is compared


def run_parity_stage(out: Path, settings: ParitySettings, device: str, cpus: int, log: Callable[[str], None]) -> dict:
    """Checks a sample of the run in `out` (its manifest, windows.parquet and part files) on `device`
    ("cuda" or "cpu", with `cpus` CPUs for a CPU reference); writes OUT/parity/ and the manifest's
    `parity` field, and returns that field. Ray must be connected; the caller holds OUT's lock."""
    started = time.monotonic()
    manifest = read_json(out / MANIFEST_FILE)
    config = manifest["config"]
    outputs = parse_outputs(",".join(config["outputs"]))
    run_precision = config["precision"]
    reference_precision = run_precision if settings.reference_precision == "auto" else settings.reference_precision
    thresholds = load_thresholds(run_precision, reference_precision)
    records = read_windows_table(out)
    sample = sample_windows(records, settings.sample, settings.seed)
    reference, reference_device = start_reference(manifest, settings, outputs, reference_precision, device, cpus)
    log(f"parity: checking {len(sample)} windows against the JAX reference ({reference_precision} on {reference_device})")
    try:
        comparisons = compare_sample(out, config["genome"], manifest["genome"]["contigs"], sample, outputs, reference, thresholds, settings.seed)
    finally:
        ray.kill(reference)
    verdict = judge(comparisons, records, len(sample))
    record = {
        "verdict": verdict.verdict,
        "summary": verdict.summary,
        "diverged": verdict.diverged,
        "profile": thresholds.profile,
        "sample": settings.sample,
        "seed": settings.seed,
        "windows": [r.window_id for r in sample],
        "windows_done": sum(r.status == "done" for r in records),
        "windows_nonfinite": sum(r.status == "done" and r.nonfinite_count > 0 for r in records),
        "nonfinite_total": sum(r.nonfinite_count for r in records),
        "comparisons": len(comparisons),
        "failed": sum(not c.passed for c in comparisons),
        "run": {
            "out": str(out.resolve()),
            "precision": run_precision,
            "device": manifest.get("timings", {}).get("device", ""),
            "weights": manifest["weights"]["path"],
            "weights_sha256": manifest["weights"]["sha256"],
        },
        "reference": {
            "precision": reference_precision,
            "checkpoint": str(settings.reference_checkpoint.resolve()) if settings.reference_checkpoint else None,
            "device": reference_device,
        },
        "report": f"{PARITY_DIR}/{REPORT_FILE}",
        "checked_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(time.monotonic() - started, 3),
    }
    write_parity_folder(out, record, comparisons, thresholds)
    write_json_atomic(out / MANIFEST_FILE, {**read_json(out / MANIFEST_FILE), "parity": record})
    return record


def start_reference(
    manifest: dict, settings: ParitySettings, outputs: Sequence[Output], precision: str, device: str, cpus: int
) -> tuple[ray.actor.ActorHandle, str]:
    """The reference actor, loaded and ready, and what it runs on."""
    gpu = device == "cuda"
    # On CPU, JAX must not take a GPU of the node for itself (a jax with CUDA would, by default).
    env = gpu_environment(REFERENCE_GPU_MEMORY_FRACTION) if gpu else {"JAX_PLATFORMS": "cpu"}
    actor = ray.remote(ReferenceWorker).options(
        num_gpus=REFERENCE_GPU_SHARE if gpu else 0, num_cpus=1 if gpu else cpus, max_restarts=0, runtime_env={"env_vars": env}
    )
    checkpoint = str(settings.reference_checkpoint.resolve()) if settings.reference_checkpoint else None
    weights = manifest["weights"]
    worker = actor.remote(weights["path"], weights["sha256"], checkpoint, manifest["config"]["organism"], outputs, precision)
    try:
        return worker, ray.get(worker.describe.remote())
    except ray.exceptions.RayError as e:
        ray.kill(worker)
        raise ParityError(f"the parity reference failed to start: {error_line(e)}") from None


def compare_sample(
    out: Path,
    genome_path: str,
    contigs: list[list],
    sample: Sequence[WindowRecord],
    outputs: Sequence[Output],
    reference: ray.actor.ActorHandle,
    thresholds: Thresholds,
    seed: int,
) -> list[Comparison]:
    """Each sampled window read from the genome as the run read it, through the reference, and
    compared output by output with its part files; IN_FLIGHT windows at the reference at once."""
    rng = np.random.default_rng(seed)  # the plots' points: the same check draws the same points
    comparisons: list[Comparison] = []
    pending: deque = deque()
    with open_genome(genome_path) as genome:
        if [list(c) for c in genome.contigs] != [list(c) for c in contigs]:
            raise ParityError(f"{genome_path} is not the genome the run read (its contigs differ from the manifest's)")
        for record in [*sample, None]:
            if record is not None:
                window = Window(record.window_id, record.chrom, record.start, record.end, record.out_start, record.out_end)
                encoded = encode_window(genome, window)
                if isinstance(encoded, SkippedWindow):
                    raise ParityError(f"window {record.window_id} is all N in {genome_path} now, but the run predicted it: the genome changed")
                pending.append((record, reference.predict.remote(encoded)))
            while pending and (record is None or len(pending) >= IN_FLIGHT):
                done, prediction = pending.popleft()
                try:
                    predicted = ray.get(prediction)
                except ray.exceptions.RayError as e:
                    raise ParityError(f"the parity reference failed on window {done.window_id}: {error_line(e)}") from None
                comparisons += [compare_output(out, done, output, predicted, thresholds, rng) for output in outputs]
    return comparisons
