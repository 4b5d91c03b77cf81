"""Running a job: checks, the Ray cluster, the model workers, the run folder's records (windows.parquet
and the manifest, saved as it goes), a progress bar and a closing summary.

    summary = run_job(RunOptions(genome=Path("genome.fa"), out=Path("run1")))

agpipe.jobs.stream moves the windows through Ray. Faults: a worker process that dies is restarted by
Ray on its node (max_restarts), which reruns its unfinished batches on the new process
(max_task_retries); the windows of a worker whose node is gone go to the others. A window that
still fails is recorded `failed`, the run goes on and ends with status `failed`; an output folder
that cannot take more (disk full, permission denied) stops the run at its first failed write.
Rerunning the command computes what is missing (agpipe.jobs.runfolder describes resuming).
docs/reliability.md lists the faults tested.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import secrets
import shlex
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm import tqdm

from agpipe import __version__
from agpipe.home import BYTECODE_ENV, COMPILE_CACHE_ENV
from agpipe.io.parquet import (
    MANIFEST_FILE,
    SCHEMA_VERSION,
    STATUSES,
    OutputError,
    WindowRecord,
    remove_stale_temporaries,
    write_json_atomic,
    write_tracks_table,
    write_windows_table,
)
from agpipe.io.results import open_run
from agpipe.jobs.estimate import full_window, window_value_bytes
from agpipe.jobs.options import Execution, Job, Node, RunOptions, cpu_workers, prepare_job, resolve_execution
from agpipe.jobs.parity import DEFAULT_SAMPLE, ParityError, ParitySettings, parse_sample
from agpipe.jobs.parity_stage import run_parity_stage
from agpipe.jobs.plan import Window
from agpipe.jobs.runfolder import check_run_folder, check_same_precision, clear_parity_check, locked_run_folder, trusted_windows
from agpipe.jobs.stream import BATCHES_PER_WORKER, IoPool, WindowStream, error_line, readers_for, windows_in_flight
from agpipe.jobs.worker import EXIT_ON_BATCH_ENV, ModelWorker
from agpipe.jobs.writer import WrittenWindow
from agpipe.model.checkpoint import find_orbax_root

# While running, windows.parquet and the manifest are rewritten after this many seconds or finished
# windows, whichever comes first: a killed run loses at most about that much work. Saves run in a
# thread of their own (Recorder.save_in_background): each syncs two files, which takes up to seconds
# while the disk takes a 4-GPU host's parts, and a driver blocked that long would leave every
# worker without its next batch. A save rewrites the whole table (0.3 s for a genome's 8,000 windows
# on a slow CPU, much of it holding Python's lock), so saves also start at least SAVE_COST_FACTOR
# times the last one's duration apart: the driver gives at most ~1/SAVE_COST_FACTOR of its time to them.
SAVE_SECONDS = 5.0
SAVE_WINDOWS = 25
SAVE_COST_FACTOR = 10.0
WORKER_RESTARTS = 3
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # see loopback_only
ERRORS_SHOWN = 5
TIMELINE_FLUSH_SECONDS = 1.5  # Ray's processes report task events every second


class RunError(ValueError):
    """The run cannot go on (one-line message saying why). A ValueError, as the other errors a user
    acts on, so the CLI prints it as one line."""


@dataclasses.dataclass
class RunSummary:
    out: Path
    status: str  # complete or failed
    counts: dict[str, int]  # windows of the whole run per status
    computed: int = 0  # windows predicted by this invocation
    bases: int = 0  # kept bases predicted by this invocation
    wall_seconds: float = 0.0
    compute_seconds: float = 0.0
    write_seconds: float = 0.0  # summed over windows (written in parallel)
    bytes_written: int = 0
    nonfinite_total: int = 0
    device: str = ""
    error: str | None = None
    parity: dict | None = None  # the manifest's parity field: this run's check, or the one recorded

    def lines(self, error: bool = True) -> list[str]:
        """The closing summary; `error=False` leaves out the error line, for a caller that shows it."""
        c = self.counts
        rate = f"{self.bases / self.wall_seconds:,.0f} bases/s" if self.wall_seconds else "-"
        lines = [
            f"{self.status}: {c['done']} windows done, {c['skipped_all_n']} skipped (all N), {c['failed']} failed, "
            f"{c['pending']} pending in {self.out}"
        ]
        if not self.wall_seconds:  # nothing was run
            return lines + self.parity_lines()
        lines += [
            f"this run: {self.computed} windows, {self.bases:,} bases in {self.wall_seconds:.1f} s ({rate}); "
            f"model {self.compute_seconds:.1f} s{' on ' + self.device if self.device else ''}",
            f"written: {self.bytes_written / 1e6:,.1f} MB; non-finite values in the run: {self.nonfinite_total}",
        ]
        return lines + ([f"error: {self.error}"] if self.error and error else []) + self.parity_lines()

    def parity_lines(self) -> list[str]:
        if self.parity is not None:
            return [f"parity {self.parity['summary']} (report: {self.out / self.parity['report']})"]
        if self.status == "complete":
            return [f"parity: not checked; `agpipe parity {self.out}` checks the run against the JAX reference"]
        return []


def run_job(
    options: RunOptions,
    ray_address: str | None = None,
    num_cpus: int | None = None,
    progress: bool = True,
    command_line: str | None = None,
    log: Callable[[str], None] = lambda message: tqdm.write(message, file=sys.stderr),
    timeline: Path | None = None,
) -> RunSummary:
    """Runs (or resumes) a job into options.out. Input problems raise a one-line ValueError before
    OUT is created; `num_cpus` sizes a local Ray instance (when no cluster address is known);
    `timeline` receives Ray's trace of the run's tasks (see write_timeline)."""
    started = time.monotonic()
    job = prepare_job(options)
    for note in job.notes:
        log(f"note: {note}")
    previous = check_run_folder(options.out, job.identity(), job.weights.sha256, options.overwrite)
    trusted = trusted_windows(options.out, job.windows()) if previous else {}
    if previous and options.precision != "auto":
        check_same_precision(options.out, previous, options.precision)
    if previous and len(trusted) == job.window_count:  # nothing to compute, so no cluster needed
        return finish_resumed(job, previous, trusted, log)
    if trusted:
        log(f"resuming: {len(trusted)} of {job.window_count} windows are already done in {options.out}")
    parity = run_parity_settings(options)
    with ray_cluster(ray_address, num_cpus):
        node_id, store_bytes = driver_node()
        nodes = cluster_nodes(node_id)
        execution, placement = resolve_execution(options, nodes)
        if previous:
            check_same_precision(options.out, previous, execution.precision)
        with locked_run_folder(options.out, options.overwrite):
            records = {w.window_id: trusted.get(w.window_id) or pending_record(w) for w in job.windows()}
            run = Recorder(job, execution, records, started, command_line, parity)
            clear_parity_check(options.out)  # new windows: an earlier check no longer speaks for the run
            write_tracks_table(options.out, job.track_rows)
            run.save("running")
            workers: list = []
            stream = None
            # Readers and writers start while the model workers load (they wait for their calls).
            driver_cpus = next(n.cpus for n in nodes if n.driver)
            io_cpus = driver_cpus - execution.worker_cpus * placement.count(node_id)  # what the workers leave
            io = IoPool(job, node_id, max(1, io_cpus), readers_for(execution.workers), WORKER_RESTARTS)
            try:
                workers, device, run.worker_start_seconds = start_workers(job, execution, placement)
                run.workers_ready_seconds = time.monotonic() - started
                run.summary.device = device
                log(
                    f"running {job.window_count - len(trusted)} windows on {execution.workers} worker(s) ({device}): "
                    f"{execution.precision}, batch {execution.batch_size}{', compiled' if execution.compile else ''}"
                )
                limit = windows_in_flight(execution, window_value_bytes(job, full_window(job)), store_bytes, io_cpus)
                todo = (w for w in job.windows() if w.window_id not in trusted)
                stream = WindowStream(todo, workers, execution.batch_size, limit, io)
                run.follow(stream, job.window_count - len(trusted), progress, log)
                # Nothing is being written now (a save's temporary is not stale); a writer killed
                # mid-file (and replaced) left a temporary.
                run.finish_saving()
                remove_stale_temporaries(options.out)
            except BaseException as error:
                if stream is not None:
                    with contextlib.suppress(Exception):  # best effort: the error that stopped the run comes first
                        stream.cancel()  # nothing may write into OUT once the lock is let go
                run.summary.error = run.summary.error or error_line(error)
                with contextlib.suppress(OSError):  # a full disk must not hide the error that stopped the run
                    run.save("failed")
                raise
            finally:
                if timeline is not None:
                    write_timeline(timeline)
                for worker in workers:  # frees their GPUs now, not when the driver exits
                    ray.kill(worker)
                io.close()
            finished = run.finished()
            if finished:  # the part files were written unsynced: on disk before the run says complete
                synced = time.monotonic()
                os.sync()
                run.sync_seconds = time.monotonic() - synced
            try:
                run.save("complete" if finished else "failed")
            except OSError:
                if run.summary.error:  # what stopped the run, e.g. the part file that filled the disk
                    raise RunError(run.summary.error) from None
                raise
            if parity is not None and run.summary.status == "complete":
                run.summary.parity = run_parity_stage(options.out, parity, execution.device, execution.worker_cpus, log)
    return run.summary


def write_timeline(path: Path) -> None:
    """Ray's trace of the cluster's tasks (Chrome trace format: every read, predict and write task
    with its argument fetching, execution and output storing, per process) written to `path`.
    Processes report their task events every second, so it waits that long first."""
    time.sleep(TIMELINE_FLUSH_SECONDS)
    path.parent.mkdir(parents=True, exist_ok=True)
    ray.timeline(filename=str(path))


def run_parity_settings(options: RunOptions) -> ParitySettings | None:
    """The run's parity check, None with --parity-sample 0; a seed is drawn if none is given."""
    sample = parse_sample(options.parity_sample)
    if not sample:
        return None
    seed = options.parity_seed if options.parity_seed is not None else secrets.randbelow(2**31)
    return ParitySettings(sample, seed, options.reference_checkpoint, options.reference_precision)


def check_run(
    out: Path,
    sample: float | None = None,
    seed: int | None = None,
    reference_checkpoint: Path | None = None,
    reference_precision: str | None = None,
    ray_address: str | None = None,
    num_cpus: int | None = None,
    log: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
) -> dict:
    """`agpipe parity OUT`: checks a finished run (again) and returns the manifest's new parity field.
    What is not given is taken from the run's last check, else from the run's own options."""
    settings = recheck_settings(open_run(out).manifest, sample, seed, reference_checkpoint, reference_precision)
    with ray_cluster(ray_address, num_cpus):
        gpus = int(ray.cluster_resources().get("GPU", 0))
        with locked_run_folder(out, overwrite=False):
            reference_cpus = cpu_workers(cluster_nodes(ray.get_runtime_context().get_node_id()))[0]
            return run_parity_stage(out, settings, "cuda" if gpus else "cpu", reference_cpus, log)


def recheck_settings(manifest: dict, sample: float | None, seed: int | None, reference_checkpoint: Path | None, reference_precision: str | None) -> ParitySettings:
    """The settings of a new check of a run: those given, else its last check's, else its options'."""
    if manifest.get("status") != "complete":
        raise ParityError(f"the run is not complete (status {manifest.get('status')!r}): finish it first (rerun its command)")
    config = manifest.get("config", {})
    last = manifest.get("parity") or {}
    if sample is None:
        sample = last.get("sample") or config.get("parity_sample") or DEFAULT_SAMPLE
    if not parse_sample(sample):
        raise ParityError("--sample 0 checks nothing: give a count of windows (4) or a fraction of them (0.01)")
    if seed is None:
        seed = last.get("seed", config.get("parity_seed"))
        seed = seed if seed is not None else secrets.randbelow(2**31)
    if reference_checkpoint is None:
        recorded = last.get("reference", {}).get("checkpoint") if last else config.get("reference_checkpoint")
        reference_checkpoint = Path(recorded) if recorded else None
    if reference_checkpoint is not None:
        find_orbax_root(reference_checkpoint)
    if reference_precision is None:
        reference_precision = last.get("reference", {}).get("precision") if last else config.get("reference_precision", "auto")
    return ParitySettings(float(sample), int(seed), reference_checkpoint, reference_precision)


def finish_resumed(job: Job, manifest: dict, trusted: dict[int, WindowRecord], log: Callable[[str], None]) -> RunSummary:
    """Every window is already done: nothing to compute. A run killed after its last window but
    before its closing save gets that save now; a complete run is left untouched."""
    counts = status_counts(trusted)
    nonfinite = sum(r.nonfinite_count for r in trusted.values())
    summary = RunSummary(job.options.out, "complete", counts, nonfinite_total=nonfinite, parity=manifest.get("parity"))
    log(f"nothing to do: all {job.window_count} windows in {job.options.out} are done")
    if manifest.get("status") != "complete":
        with locked_run_folder(job.options.out, overwrite=False):
            write_windows_table(job.options.out, trusted.values())
            write_json_atomic(job.options.out / MANIFEST_FILE, {**manifest, "status": "complete", "windows": counts})
    return summary


@contextlib.contextmanager
def ray_cluster(address: str | None, num_cpus: int | None) -> Iterator[None]:
    """Connects to `address`, else to RAY_ADDRESS (as under `ray job submit`), else starts a local
    Ray instance for this job (loopback only, dashboard off) and stops it afterwards. A driver that
    is already connected (tests, notebooks) is used as it is."""
    if ray.is_initialized():
        yield
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        with loopback_only():
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()  # stops a local instance; only disconnects from a cluster


@contextlib.contextmanager
def loopback_only() -> Iterator[None]:
    """Makes a local Ray instance started inside the block listen on 127.0.0.1 only.

    On Linux Ray (2.60) maps 127.0.0.1, even when passed as `_node_ip_address`, to the machine's
    address, and its GCS, raylets and workers listen on every interface. Only with
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (what Ray does on macOS and Windows) does it keep 127.0.0.1
    as the node's address, and its servers then bind to loopback alone. Ray reads the variable at
    import, so the constant is set too; the processes Ray starts inherit the variable. Both are
    restored afterwards, so a later connection to a real cluster from this process is unaffected."""
    from ray._private import ray_constants

    previous = os.environ.get(LOOPBACK_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[LOOPBACK_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous[1]
        if previous[0] is None:
            os.environ.pop(LOOPBACK_ENV, None)
        else:
            os.environ[LOOPBACK_ENV] = previous[0]


def driver_node() -> tuple[str, float]:
    """(node id, object store bytes) of the node this driver runs on: reading and writing run there."""
    node_id = ray.get_runtime_context().get_node_id()
    node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
    if not node["Resources"].get("CPU"):
        raise RunError("the Ray node running agpipe has no CPUs for its readers and writers: run agpipe on a node with CPUs")
    return node_id, node["Resources"].get("object_store_memory", 0)


def cluster_nodes(driver_node_id: str) -> list[Node]:
    """The live nodes of the cluster, with their CPUs and GPUs."""
    return [
        Node(n["NodeID"], int(n["Resources"].get("CPU", 0)), int(n["Resources"].get("GPU", 0)), n["NodeID"] == driver_node_id)
        for n in ray.nodes()
        if n["Alive"]
    ]


def start_workers(job: Job, execution: Execution, placement: list[str]) -> tuple[list, str, dict[str, float]]:
    """The model workers, each pinned to its node (see resolve_execution), loaded and ready; what
    they run on; and the slowest worker's start seconds (read, load, compile)."""
    env = {name: os.environ[name] for name in (EXIT_ON_BATCH_ENV, *BYTECODE_ENV, *COMPILE_CACHE_ENV) if name in os.environ}
    actor = ray.remote(ModelWorker)
    options = dict(
        num_gpus=1 if execution.device == "cuda" else 0,
        num_cpus=execution.worker_cpus,
        max_restarts=WORKER_RESTARTS,
        max_task_retries=WORKER_RESTARTS,
        max_concurrency=BATCHES_PER_WORKER,  # its batches overlap: one stored while the next computes
        runtime_env={"env_vars": env} if env else None,
    )
    o = job.options
    threads = execution.worker_cpus if execution.device == "cpu" else None
    workers = [
        actor.options(**options, scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
            str(job.weights.path), job.weights.sha256, o.organism, job.outputs, execution.precision,
            execution.device, execution.compile, execution.batch_size, o.window, threads, job.crop,
        )
        for node in placement
    ]
    try:
        devices = ray.get([w.describe.remote() for w in workers])
        starts = ray.get([w.start_timings.remote() for w in workers])
    except ray.exceptions.RayError as e:
        raise RunError(f"a model worker failed to start: {error_line(e)}") from None
    return workers, devices[0], {key: max(s[key] for s in starts) for key in starts[0]}


class Recorder:
    """The run's state as the driver sees it: windows.parquet rows, the manifest, the summary."""

    def __init__(
        self,
        job: Job,
        execution: Execution,
        records: dict[int, WindowRecord],
        started: float,
        command_line: str | None,
        parity: ParitySettings | None,
    ):
        self.job = job
        self.execution = execution
        self.parity = parity
        self.records = records
        self.started = started
        self.started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.command_line = command_line if command_line is not None else shlex.join(sys.argv)
        self.summary = RunSummary(job.options.out, "running", status_counts(records))
        self.saved = time.monotonic()  # when the last save started
        self.save_seconds = 0.0  # what the last save in the background took
        self.unsaved = 0  # windows finished since the last save
        self.saver = ThreadPoolExecutor(1, thread_name_prefix="save")
        self.saving: Future | None = None  # the save in flight in the saver thread
        self.first_window_seconds: float | None = None  # from the command's start to its first window
        self.last_window_seconds: float | None = None  # ... to its latest: the steady rate lies between
        self.workers_ready_seconds: float | None = None  # from the command's start to loaded workers
        self.worker_start_seconds: dict[str, float] = {}  # the slowest worker's read, load and compile
        self.sync_seconds: float | None = None  # flushing the part files to disk at the end
        # CPU-seconds of the driver while the windows streamed: its process (Ray's threads in it
        # included) and the thread feeding the workers; near the wall time, the driver limits the run.
        self.driver_cpu_seconds: dict[str, float] = {}

    def follow(self, stream: WindowStream, todo: int, progress: bool, log: Callable[[str], None]) -> None:
        """Records every window the stream finishes, saving as it goes; stops the stream on a
        non-finite window under --on-nonfinite fail."""
        s = self.summary
        errors = 0
        stopped_by_output = False
        process_cpu, loop_cpu = time.process_time(), time.thread_time()
        with tqdm(total=todo, unit="window", file=sys.stderr, disable=not progress, dynamic_ncols=True) as bar:
            for window, outcome in stream:
                self.last_window_seconds = time.monotonic() - self.started
                if self.first_window_seconds is None:
                    self.first_window_seconds = self.last_window_seconds
                if isinstance(outcome, WrittenWindow):
                    record = outcome.record
                    s.compute_seconds += outcome.compute_seconds
                    s.write_seconds += outcome.write_seconds
                    s.bytes_written += sum(p.bytes for p in record.parts)
                    if record.status == "done":
                        s.computed += 1
                        s.bases += window.kept
                    if record.nonfinite_count:
                        where = f"window {window.window_id} ({window.chrom}:{window.out_start}-{window.out_end})"
                        if record.status == "failed":  # --on-nonfinite fail
                            s.error = f"{where} has {record.nonfinite_count} non-finite values (--on-nonfinite fail)"
                            stream.stop()
                        else:
                            log(f"{where}: {record.nonfinite_count} non-finite values (flagged in windows.parquet)")
                elif isinstance(getattr(outcome, "cause", None) or outcome, OutputError):
                    # OUT cannot take more (disk full, permission denied, read-only): every window
                    # would fail the same way, so stop at the first and keep what is written.
                    record = pending_record(window, "failed")
                    if not stopped_by_output:
                        stopped_by_output = True
                        s.error = f"{error_line(outcome)}; the run stopped: rerun the command to resume once it can write there"
                        log(s.error)
                        stream.stop()
                else:
                    record = pending_record(window, "failed")
                    errors += 1
                    line = f"window {window.window_id} failed: {error_line(outcome)}"
                    s.error = s.error if stopped_by_output else line
                    if errors <= ERRORS_SHOWN:
                        log(line)
                self.records[window.window_id] = record
                bar.update(1)
                bar.set_postfix_str(f"{s.bases / max(time.monotonic() - self.started, 1e-9):,.0f} bases/s", refresh=False)
                self.unsaved += 1
                since = time.monotonic() - self.saved
                if (self.unsaved >= SAVE_WINDOWS or since > SAVE_SECONDS) and since > SAVE_COST_FACTOR * self.save_seconds:
                    self.save_in_background()
        self.driver_cpu_seconds = {"process": round(time.process_time() - process_cpu, 3), "loop": round(time.thread_time() - loop_cpu, 3)}
        if stream.lost_workers:
            s.error = f"every model worker died ({stream.lost_workers}); rerun the command to compute the rest"

    def finished(self) -> bool:
        return all(r.status in ("done", "skipped_all_n") for r in self.records.values())

    def save(self, status: str) -> None:
        """Rewrites windows.parquet and the manifest (both atomically), once the save in flight is done."""
        self.finish_saving()
        write_run_tables(*self._snapshot(status))

    def finish_saving(self) -> None:
        """Waits for the save in flight, if any, and raises what it raised (a full disk, say)."""
        if self.saving is not None:
            saving, self.saving = self.saving, None
            saving.result()

    def save_in_background(self) -> None:
        """Saves a running run in the saver thread while the driver goes on; nothing if the last
        such save is still in flight (what it raised is raised here)."""
        if self.saving is not None:
            if not self.saving.done():
                return
            saving, self.saving = self.saving, None
            self.save_seconds = saving.result()
        self.saving = self.saver.submit(write_run_tables, *self._snapshot("running"))

    def _snapshot(self, status: str) -> tuple[Path, list[WindowRecord], dict]:
        """The summary brought up to date, and what a save writes, taken now."""
        s = self.summary
        s.status, s.counts = status, status_counts(self.records)
        s.wall_seconds = time.monotonic() - self.started
        s.nonfinite_total = sum(r.nonfinite_count for r in self.records.values())
        if status == "failed" and not s.error:
            s.error = f"{s.counts['failed']} windows failed: rerun the command to compute them again"
        self.saved = time.monotonic()
        self.unsaved = 0
        return self.job.options.out, list(self.records.values()), self.manifest()

    def manifest(self) -> dict:
        job, e, o, s = self.job, self.execution, self.job.options, self.summary
        return {
            "schema_version": SCHEMA_VERSION,
            "agpipe_version": __version__,
            "status": s.status,
            "command_line": self.command_line,
            "config": {
                "genome": str(o.genome.resolve()),
                "out": str(o.out.resolve()),
                "window": o.window,
                "crop": job.crop,
                "contigs": o.contigs,
                "regions": str(o.regions.resolve()) if o.regions else None,
                "organism": o.organism,
                "outputs": [str(x) for x in job.outputs],
                "model": o.model,
                "weights": str(job.weights.path),
                "on_nonfinite": o.on_nonfinite,
                "compression": o.compression,
                **dataclasses.asdict(e),
                "parity_sample": self.parity.sample if self.parity else 0,
                "parity_seed": self.parity.seed if self.parity else None,
                "reference_checkpoint": str(o.reference_checkpoint.resolve()) if o.reference_checkpoint else None,
                "reference_precision": o.reference_precision,
            },
            "identity": {**job.identity(), "precision": e.precision},
            "weights": {"path": str(job.weights.path.resolve()), "sha256": job.weights.sha256, "config": job.weights.config_name},
            "genome": {"path": str(o.genome.resolve()), "contigs": [[n, length] for n, length in job.genome_contigs]},
            "plan": {"windows": job.window_count, "bases": job.bases, "contigs": [n for n, _ in job.contigs]},
            "windows": s.counts,
            "nonfinite_total": s.nonfinite_total,
            "timings": {
                "started_at": self.started_at,
                "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "wall_seconds": round(s.wall_seconds, 3),
                "compute_seconds": round(s.compute_seconds, 3),
                "write_seconds": round(s.write_seconds, 3),
                "first_window_seconds": None if self.first_window_seconds is None else round(self.first_window_seconds, 3),
                "last_window_seconds": None if self.last_window_seconds is None else round(self.last_window_seconds, 3),
                "workers_ready_seconds": None if self.workers_ready_seconds is None else round(self.workers_ready_seconds, 3),
                "worker_start_seconds": self.worker_start_seconds,
                "sync_seconds": None if self.sync_seconds is None else round(self.sync_seconds, 3),
                "driver_cpu_seconds": self.driver_cpu_seconds,
                "device": s.device,
            },
            "error": s.error,
        }


def write_run_tables(out: Path, records: list[WindowRecord], manifest: dict) -> float:
    """Rewrites windows.parquet and the manifest; returns the seconds it took."""
    started = time.monotonic()
    write_windows_table(out, records)
    write_json_atomic(out / MANIFEST_FILE, manifest)
    return time.monotonic() - started


def pending_record(w: Window, status: str = "pending") -> WindowRecord:
    return WindowRecord(w.window_id, w.chrom, w.start, w.end, w.out_start, w.out_end, status, 0, 0.0)


def status_counts(records: dict[int, WindowRecord]) -> dict[str, int]:
    counts = Counter(r.status for r in records.values())
    return {status: counts[status] for status in STATUSES}
