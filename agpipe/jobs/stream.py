"""Streaming windows through Ray: reading ahead of the model workers, writing behind them.

Each window goes GenomeReader.read -> ModelWorker.predict -> PredictionWriter.write. All three calls
are submitted together and Ray runs each once its input exists, so reading runs ahead of the model
and writing behind it. The driver holds only ObjectRefs, and at most `windows_in_flight` windows
are between read and written, so memory and object store stay bounded whatever the genome.
Readers and writers run on the driver's node (the genome and OUT need to exist only where agpipe
runs; see IoPool); only encoded windows and kept predictions travel to and from the workers.
"""

from __future__ import annotations

import itertools
import re
import time
from collections import deque
from collections.abc import Iterator

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from agpipe.jobs.options import Execution, Job
from agpipe.jobs.plan import Window
from agpipe.jobs.windows import GenomeReader
from agpipe.jobs.writer import PredictionWriter, WrittenWindow

# Submitted to a worker at once (it takes them all at once, see agpipe.jobs.worker): one being stored
# by Ray, one computing, one enqueued on the device behind it, and one arriving, so the device
# never waits for the driver or a read. With three, four GPUs' workers had no batch 7% of the time.
BATCHES_PER_WORKER = 4
OBJECT_STORE_SHARE = 0.25  # of the driver node's object store, for predictions waiting to be written
TRACEBACK_LAST_LINE = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception): (.+)$")
# A worker that can take no more batches: its restarts are used up, or its node is gone (workers
# are pinned to their nodes, see options.resolve_execution).
WORKER_GONE = (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnschedulableError)
# A window whose prediction was lost (its node died before it was written), or whose worker did
# not answer through Ray's retries: it may or may not have been computed, so it is computed again.
WINDOW_LOST = (ray.exceptions.ObjectLostError, ray.exceptions.ActorUnavailableError)
WINDOW_RETRIES = 3  # times a window goes round again after such losses
PROBE_SECONDS = 0.5  # between calls to a rested worker
CANCEL_SECONDS = 30.0  # the most a failed run waits for its cancelled writes to end


def windows_in_flight(execution: Execution, window_bytes: int, store_bytes: float, io_cpus: int) -> int:
    """How many windows may be between read and written at once: BATCHES_PER_WORKER batches per
    worker at the model, plus two per CPU the driver's node has left for reading and writing (one
    being written, one waiting for its writer: writing a window takes far longer than computing it,
    a 512 kb window's 128 bp tracks ~32 ms on an H100 and ~0.3-0.45 s to encode and compress), fewer
    if their predictions would fill more than OBJECT_STORE_SHARE of the object store, but never
    under the batches at the model.

    The rate is at most this number over a window's time from read to written (~0.8 s on 4 x H100):
    with one per CPU, four GPUs were held to ~95 windows/s where the model gave 116.
    """
    at_model = BATCHES_PER_WORKER * execution.workers * execution.batch_size
    fits = int(store_bytes * OBJECT_STORE_SHARE) // max(1, window_bytes)
    return max(at_model, min(at_model + 2 * max(at_model, io_cpus), fits))


class IoPool:
    """The reading and writing processes of a run, started once on the driver's node (the genome and
    OUT need to exist only where agpipe runs). Long-lived actors rather than Ray tasks: a task
    process is started on demand and imports its modules at its first task (~3.5 s each on the
    GPU machine), and a model worker waiting for a read on such a process idles that long; while
    Ray's pool of task processes grew, GPU workers idled more than half of the time. Their classes
    live in modules without torch, so dozens of them start quickly beside the model workers.

    Reads are a few ms a window, so a few readers (holding no CPU of Ray's accounting) serve many
    GPUs; each writer holds a CPU, and a write goes to the writer with the fewest writes queued.
    """

    def __init__(self, job: Job, node_id: str, writers: int, readers: int, restarts: int):
        on_driver_node = NodeAffinitySchedulingStrategy(node_id, soft=False)
        options = dict(scheduling_strategy=on_driver_node, max_restarts=restarts, max_task_retries=restarts)
        reader = ray.remote(GenomeReader).options(num_cpus=0, **options)
        writer = ray.remote(PredictionWriter).options(num_cpus=1, **options)
        genome = str(job.options.genome.resolve())
        out = str(job.options.out.resolve())
        lengths = dict(job.genome_contigs)
        self.readers = [reader.remote(genome) for _ in range(readers)]
        self.writers = [writer.remote(out, lengths, job.columns, job.options.on_nonfinite, job.options.compression) for _ in range(writers)]
        self.reads = 0
        self.queued = [0] * writers  # writes submitted to each writer, not yet finished
        self.writer_of: dict[ray.ObjectRef, int] = {}

    def read(self, window: Window) -> ray.ObjectRef:
        self.reads += 1
        return self.readers[self.reads % len(self.readers)].read.remote(window)

    def write(self, prediction: ray.ObjectRef) -> ray.ObjectRef:
        i = min(range(len(self.writers)), key=self.queued.__getitem__)
        ref = self.writers[i].write.remote(prediction)
        self.queued[i] += 1
        self.writer_of[ref] = i
        return ref

    def written(self, ref: ray.ObjectRef) -> None:
        """A write has finished (or failed): its writer has one fewer queued."""
        self.queued[self.writer_of.pop(ref)] -= 1

    def close(self) -> None:
        for actor in self.readers + self.writers:
            ray.kill(actor)


def readers_for(workers: int) -> int:
    """Reading processes for `workers` model workers: a read task takes a few ms (5-7 ms on the GPU
    machines when reads still went through a one-hot matrix) and a window ~36 ms on an H100, so one
    reader keeps about four GPUs fed."""
    return max(1, -(-workers // 4))


class WindowStream:
    """Feeds windows to the workers in batches, a bounded number in flight, and yields each window
    with its outcome (WrittenWindow, or the exception that failed it) as its writing finishes.

    A worker that dies is restarted by Ray on its node, which reruns its batches. One that does not
    answer (Ray's retries used up while its process restarts or its node is being declared dead)
    is rested: it gets no batches until a call to it succeeds, and its windows go to the others.
    One that dies for good (its restarts used up, or its node gone) is dropped, its windows going
    to the others; with none left, they fail. A prediction lost with its node is computed again.
    """

    def __init__(self, windows: Iterator[Window], workers: list, batch_size: int, limit: int, io: IoPool):
        self.windows = windows
        self.workers = dict(enumerate(workers))  # the live ones, taking batches
        self.batch_size = batch_size
        self.limit = limit
        self.io = io
        self.batches: dict[int, int] = dict.fromkeys(self.workers, 0)  # per worker: batches submitted, not done
        self.batch_done: dict[ray.ObjectRef, int] = {}  # a batch's first prediction -> its worker
        self.writes: dict[ray.ObjectRef, tuple[Window, int]] = {}  # write call -> its window and worker
        self.probes: dict[ray.ObjectRef, tuple[int, object]] = {}  # a call to a rested worker -> it
        self.requeued: deque[Window] = deque()  # windows of lost workers or predictions, to go first
        self.retries: dict[int, int] = {}  # window id -> times requeued
        self.stopped = False
        self.last_loss: str | None = None  # why the latest worker was dropped

    @property
    def lost_workers(self) -> str | None:
        """Why no worker is left, if none is."""
        return None if self.workers or self.probes else self.last_loss

    def stop(self) -> None:
        """Submit nothing more; what is in flight still finishes."""
        self.stopped = True

    def cancel(self, timeout: float = CANCEL_SECONDS) -> None:
        """Submits nothing more, cancels the writes still queued and waits (up to `timeout`) for
        those being written (a writer is not interrupted mid-file) to end: a run that fails lets go
        of OUT with nothing still writing there."""
        self.stop()
        if writes := list(self.writes):
            for ref in writes:
                ray.cancel(ref)
            ray.wait(writes, num_returns=len(writes), timeout=timeout, fetch_local=False)

    def __iter__(self) -> Iterator[tuple[Window, WrittenWindow | Exception]]:
        while True:
            self._submit()
            # Done when nothing is being written nor computed (a batch may still count at its worker
            # after its windows are written); with rested workers only, wait for them.
            if not self.writes and not self.batch_done and (not self.probes or self.stopped):
                return
            refs = [*self.batch_done, *self.probes, *self.writes]
            ray.wait(refs, num_returns=1, fetch_local=False)
            ready = set(ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)[0])
            for ref in ready & self.batch_done.keys():
                self.batches[self.batch_done.pop(ref)] -= 1
            for ref in ready & self.probes.keys():
                self._probed(ref)
            self._submit()  # the workers get their next batches before the driver records the writes
            for ref in ready & self.writes.keys():
                window, worker = self.writes.pop(ref)
                self.io.written(ref)
                try:
                    yield window, ray.get(ref)
                except ray.exceptions.RayError as e:
                    cause = getattr(e, "cause", None) or e
                    if isinstance(cause, WORKER_GONE):
                        self._drop(worker, e)
                    elif isinstance(cause, ray.exceptions.ActorUnavailableError):
                        self._rest(worker)
                    if isinstance(cause, (*WORKER_GONE, *WINDOW_LOST)) and (self.workers or self.probes) and self._retry(window):
                        continue
                    yield window, e

    def _drop(self, worker: int, error: Exception) -> None:
        """A worker dead for good: its restarts are used up, or its node is gone."""
        if self.workers.pop(worker, None) is not None:
            self.last_loss = error_line(error)

    def _rest(self, worker: int) -> None:
        """Takes a worker that did not answer out of rotation until a call to it succeeds."""
        handle = self.workers.pop(worker, None)
        if handle is not None:
            self.probes[handle.describe.remote()] = (worker, handle)

    def _probed(self, ref: ray.ObjectRef) -> None:
        worker, handle = self.probes.pop(ref)
        try:
            ray.get(ref)
        except ray.exceptions.RayError as e:
            if isinstance(getattr(e, "cause", None) or e, ray.exceptions.ActorUnavailableError):
                time.sleep(PROBE_SECONDS)  # still restarting, or its node not yet declared dead: ask again
                self.probes[handle.describe.remote()] = (worker, handle)
            else:
                self.last_loss = error_line(e)
            return
        self.workers[worker] = handle

    def _retry(self, window: Window) -> bool:
        """Queues a window whose worker or prediction was lost to go first, unless that happened
        too often to it (a window that kills every worker it meets must not go round for ever)."""
        self.retries[window.window_id] = self.retries.get(window.window_id, 0) + 1
        if self.retries[window.window_id] > WINDOW_RETRIES:
            return False
        self.requeued.append(window)
        return True

    def _submit(self) -> None:
        while not self.stopped and self.workers and len(self.writes) < self.limit:
            worker = min(self.workers, key=self.batches.__getitem__)
            if self.batches[worker] >= BATCHES_PER_WORKER:
                return
            size = min(self.batch_size, self.limit - len(self.writes))
            batch = [self.requeued.popleft() for _ in range(min(size, len(self.requeued)))]
            batch += itertools.islice(self.windows, size - len(batch))
            if not batch:
                return
            reads = [self.io.read(w) for w in batch]
            predictions = self.workers[worker].predict.options(num_returns=len(batch)).remote(*reads)
            predictions = predictions if len(batch) > 1 else [predictions]
            self.batch_done[predictions[0]] = worker
            self.batches[worker] += 1
            for w, prediction in zip(batch, predictions):
                self.writes[self.io.write(prediction)] = (w, worker)


def error_line(e: BaseException) -> str:
    """One line for an exception, through Ray's wrapping to the error that caused it. A worker that
    failed to start carries its exception only as traceback text, whose last line names it."""
    cause = getattr(e, "cause", None) or e
    lines = [line for line in str(cause).strip().splitlines() if line.strip()]
    raised = TRACEBACK_LAST_LINE.match(lines[-1]) if len(lines) > 1 else None
    if raised:
        return raised.group(1)
    text = lines[0] if lines else ""
    return text if isinstance(cause, (ValueError, OSError)) and text else f"{type(cause).__name__}: {text}".rstrip(": ")
