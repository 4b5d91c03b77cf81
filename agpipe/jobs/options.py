"""A run's options, checked and resolved before anything is written or started.

`prepare_job` opens the genome, reads the regions, builds the window plan, finds the weights and
decides the outputs and their columns: every mistake in the input is a one-line ValueError here,
before the output folder exists. `resolve_execution` then decides device, precision, compilation,
batch size and worker count from what the Ray cluster has.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from agpipe.io.bed import read_regions
from agpipe.io.fasta import contig_filter, open_genome
from agpipe.io.parquet import COMPRESSIONS, DEFAULT_COMPRESSION, TrackRow
from agpipe.jobs.parity import DEFAULT_SAMPLE, parse_sample
from agpipe.jobs.plan import DEFAULT_WINDOW, Window, check_window, default_crop, plan_windows
from agpipe.jobs.writer import output_columns
from agpipe.model.checkpoint import file_sha256, find_orbax_root, read_weights_header
from agpipe.model.config import CONFIGS, ORGANISMS, Output, parse_outputs
from agpipe.model.metadata import TrackMetadata
from agpipe.model.precision import resolve_precision
from agpipe.model.weights import resolve_weights, sha256_memo

# GPU batches hold about this many bases (batch 1 at 512 kb); the CPU gains nothing from batching.
GPU_BATCH_BASES = 524_288
# CPU workers: one per this many CPUs, so each gets enough threads to use its cores well.
CPUS_PER_CPU_WORKER = 16


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """What the user asked for (command line, config file or Python), before checking."""

    genome: Path
    out: Path
    window: int = DEFAULT_WINDOW
    crop: int | None = None  # default window / 8
    contigs: str | None = None  # comma-separated names
    regions: Path | None = None  # BED
    organism: str = "human"
    outputs: str = "default"
    model: str = "alphagenome"  # or "demo"
    weights: str | None = None  # path or cached name
    device: str = "auto"  # auto, cpu, cuda
    precision: str = "auto"  # auto, bfloat16, float32
    compile: bool | None = None  # default: on GPU only
    batch_size: int | None = None  # default: GPU_BATCH_BASES / window on GPU, 1 on CPU
    on_nonfinite: str = "flag"  # or "fail"
    compression: str = DEFAULT_COMPRESSION  # of the part files: agpipe.io.parquet.COMPRESSIONS
    overwrite: bool = False
    parity_sample: float = DEFAULT_SAMPLE  # windows checked against the JAX reference: a count, a fraction (< 1), 0 for none
    parity_seed: int | None = None  # default: drawn at random (and recorded)
    reference_checkpoint: Path | None = None  # official Orbax checkpoint; default: the run's weights
    reference_precision: str = "auto"  # auto (the run's), float32, bfloat16


@dataclasses.dataclass(frozen=True)
class WeightsInfo:
    path: Path
    sha256: str
    config_name: str  # "official", "small" or "custom"
    metadata: TrackMetadata


@dataclasses.dataclass(frozen=True)
class Job:
    """A checked run: the plan, the outputs and their columns, the weights."""

    options: RunOptions
    genome_contigs: list[tuple[str, int]]  # every contig of the FASTA, in file order
    contigs: list[tuple[str, int]]  # the contigs --contigs selects (all by default)
    regions: dict[str, list[tuple[int, int]]] | None
    crop: int
    outputs: tuple[Output, ...]
    notes: tuple[str, ...]  # what was adjusted, for the user
    weights: WeightsInfo
    columns: dict[Output, list[str]]
    track_rows: list[TrackRow]
    window_count: int
    bases: int  # kept bases over all windows of the plan

    def windows(self) -> Iterator[Window]:
        """The plan, streamed: the whole genome's windows (so ids never depend on the selection),
        kept where they lie on a selected contig and meet a region."""
        selected = {name for name, _ in self.contigs}
        plan = plan_windows(self.genome_contigs, self.options.window, self.crop, self.regions)
        return (w for w in plan if w.chrom in selected)

    def identity(self) -> dict:
        """What a resumed run must share with the one in the folder. Weights (by sha256) and the
        precision (known once the cluster is) are compared apart. The genome counts by file name
        and contigs, not path: `ray job submit` runs in a copy of the working folder."""
        regions = None
        if self.regions is not None:
            regions = hashlib.sha256(json.dumps(self.regions, sort_keys=True).encode()).hexdigest()
        return {
            "genome": self.options.genome.name,
            "genome_contigs": [[name, length] for name, length in self.genome_contigs],
            "contigs": [name for name, _ in self.contigs],
            "regions_sha256": regions,
            "window": self.options.window,
            "crop": self.crop,
            "organism": self.options.organism,
            "outputs": [str(o) for o in self.outputs],
        }


def prepare_job(options: RunOptions) -> Job:
    """Checks every input and resolves the plan; raises a one-line ValueError for the first problem."""
    crop = default_crop(options.window) if options.crop is None else options.crop
    check_window(options.window, crop)
    if options.organism not in ORGANISMS:
        raise ValueError(f"unknown --organism {options.organism!r}: use {' or '.join(ORGANISMS)}")
    for name, value, allowed in (
        ("--device", options.device, ("auto", "cpu", "cuda")),
        ("--precision", options.precision, ("auto", "bfloat16", "float32")),
        ("--on-nonfinite", options.on_nonfinite, ("flag", "fail")),
        ("--compression", options.compression, COMPRESSIONS),
        ("--model", options.model, ("alphagenome", "demo")),
        ("--reference-precision", options.reference_precision, ("auto", "float32", "bfloat16")),
    ):
        if value not in allowed:
            raise ValueError(f"unknown {name} {value!r}: use {', '.join(allowed)}")
    if options.batch_size is not None and options.batch_size < 1:
        raise ValueError(f"--batch-size {options.batch_size} must be at least 1")
    parse_sample(options.parity_sample)
    if options.reference_checkpoint is not None:
        find_orbax_root(options.reference_checkpoint)  # a wrong folder fails now, not after the run
    with open_genome(options.genome) as genome:
        genome_contigs = genome.contigs
    contigs = contig_filter(genome_contigs, options.contigs) if options.contigs else genome_contigs
    regions = read_regions(options.regions, genome_contigs) if options.regions else None
    path = resolve_weights(options.weights, options.model).resolve()  # workers may run elsewhere
    cfg, metadata_json = read_weights_header(path)
    metadata = TrackMetadata.from_json(metadata_json)
    config_name = next((name for name, c in CONFIGS.items() if c == cfg), "custom")
    weights = WeightsInfo(path, file_sha256(path, sha256_memo()), config_name, metadata)
    outputs, notes = resolve_outputs(options.outputs, metadata, options.organism)
    columns, track_rows = output_columns(metadata, options.organism, outputs)
    job = Job(options, genome_contigs, contigs, regions, crop, outputs, notes, weights, columns, track_rows, 0, 0)
    count = bases = 0
    for w in job.windows():
        count += 1
        bases += w.kept
    if not count:
        raise ValueError("the plan has no windows: --regions selects nothing on the --contigs chosen")
    return dataclasses.replace(job, window_count=count, bases=bases)


def resolve_outputs(text: str, metadata: TrackMetadata, organism: str) -> tuple[tuple[Output, ...], tuple[str, ...]]:
    """--outputs -> outputs and notes. Heads without tracks for the organism (mouse PRO-cap) are
    dropped with a note when they come from `all` or `default`, and an error when named."""
    named: set[Output] = set()
    implied: set[Output] = set()
    for item in (t.strip() for t in text.split(",")):
        if item:
            (implied if item in ("all", "default") else named).update(parse_outputs(item))
    if not named and not implied:
        raise ValueError("--outputs names no output: use head:resolution,... or 'all'")
    empty = {head for head in {o.head for o in named | implied} if not metadata.real_track_count(organism, head)}
    if named_empty := sorted({o.head for o in named} & empty):
        raise ValueError(f"--outputs {named_empty[0]}: these weights have no {organism} tracks for it; leave it out")
    outputs = parse_outputs(",".join(str(o) for o in named | implied if o.head not in empty))
    notes = tuple(f"{head}: no {organism} tracks in these weights, left out" for head in sorted(empty))
    return outputs, notes


@dataclasses.dataclass(frozen=True)
class Execution:
    """How a run executes on the cluster at hand."""

    device: str  # cpu or cuda
    precision: str  # bfloat16 or float32
    compile: bool
    batch_size: int
    workers: int
    worker_cpus: int  # Ray CPUs each worker reserves (and its torch threads on CPU)


@dataclasses.dataclass(frozen=True)
class Node:
    """A live Ray node, as far as placing model workers goes."""

    node_id: str
    cpus: int
    gpus: int
    driver: bool  # agpipe runs here: its readers and writers need some of this node's CPUs


def resolve_execution(options: RunOptions, nodes: Sequence[Node]) -> tuple[Execution, list[str]]:
    """Device, precision, compile, batch size and workers, and the node of each worker: one per GPU
    of each node; on CPU see cpu_workers.

    Each worker is pinned to its node. A worker process that dies is restarted there; a worker
    whose node is gone cannot be placed again and its windows go to the others. Left to Ray, it
    would wait for a free GPU elsewhere, and on a cluster whose GPUs are all busy with this run's
    other workers the run would hang for good."""
    cluster_gpus = sum(n.gpus for n in nodes)
    device = options.device
    if device == "auto":
        device = "cuda" if cluster_gpus else "cpu"
    if device == "cuda" and not cluster_gpus:
        raise ValueError("--device cuda: the Ray cluster has no GPU; use --device cpu (or auto)")
    precision = resolve_precision(options.precision, device).name
    compile_model = device == "cuda" if options.compile is None else options.compile
    default_batch = max(1, GPU_BATCH_BASES // options.window) if device == "cuda" else 1
    batch_size = options.batch_size or default_batch
    if device == "cuda":
        placement = [n.node_id for n in nodes for _ in range(n.gpus)]
        return Execution(device, precision, compile_model, batch_size, len(placement), 1), placement
    cpus, placement = cpu_workers(nodes)
    return Execution(device, precision, compile_model, batch_size, len(placement), cpus), placement


def cpu_workers(nodes: Sequence[Node]) -> tuple[int, list[str]]:
    """(CPUs each, node of each worker) for a CPU-only run. The node running agpipe keeps a quarter
    of its CPUs (at least one) for the readers and writers; the rest of every node goes to
    workers of about CPUS_PER_CPU_WORKER threads, as one model using many threads beats many models
    sharing memory bandwidth. All workers have one size, set by the largest node, so each fits on
    its node. On one node of 2 CPUs: one worker of one CPU (its torch threads: see ModelWorker's
    `threads`)."""
    usable = [(n.node_id, n.cpus - (max(1, n.cpus // 4) if n.driver else 0)) for n in nodes]
    largest = max((cpus for _, cpus in usable), default=0)
    if largest < 1:
        raise ValueError(
            "the Ray cluster has no CPU to spare for a model worker: the node running agpipe keeps one for "
            "reading and writing, so give it at least 2 (--num-cpus 2) or add a node"
        )
    each = largest // max(1, largest // CPUS_PER_CPU_WORKER)
    return each, [node for node, cpus in usable for _ in range(cpus // each)]
