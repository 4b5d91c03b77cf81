"""Streaming windows through Ray: reading tasks ahead of the model workers, writing tasks behind them.

Each window goes read task -> ModelWorker.predict -> write task. All three are submitted together
and Ray starts each step once its input exists, so reading runs ahead of the model and writing
behind it. The driver holds only ObjectRefs, and at most `windows_in_flight` windows are between
read and written, so memory and object store stay bounded whatever the genome. Reading and writing
run on the driver's node (the genome and OUT need to exist only where agpipe runs); only encoded
windows and kept predictions travel to and from the workers.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections import deque
from collections.abc import Callable, Iterator

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from agpipe.io.fasta import Genome, open_genome
from agpipe.jobs.options import Execution, Job
from agpipe.jobs.plan import Window
from agpipe.jobs.worker import EncodedWindow, SkippedWindow, encode_window
from agpipe.jobs.writer import WrittenWindow, write_prediction

BATCHES_PER_WORKER = 2  # submitted to a worker at once: one computing, one waiting, so it never idles
OBJECT_STORE_SHARE = 0.25  # of the driver node's object store, for predictions waiting to be written
TRACEBACK_LAST_LINE = re.compile(r"^[A-Za-z_][\w.]*(?:Error|Exception): (.+)$")


def windows_in_flight(execution: Execution, window_bytes: int, store_bytes: float, io_cpus: int) -> int:
    """How many windows may be between read and written at once: two batches per worker at the
    model, plus one being read or written per CPU the driver's node has left for that (writing a
    window takes far longer than computing it on a GPU: a 512 kb window's 128 bp tracks take ~40 ms
    on an H100 and ~0.5 s to encode and compress), fewer if their predictions would fill more than
    OBJECT_STORE_SHARE of the object store, but never under a batch computing and one waiting."""
    at_model = BATCHES_PER_WORKER * execution.workers * execution.batch_size
    fits = int(store_bytes * OBJECT_STORE_SHARE) // max(1, window_bytes)
    return max(at_model, min(at_model + max(at_model, io_cpus), fits))


@functools.lru_cache(maxsize=4)
def cached_genome(path: str) -> Genome:
    """One open genome per task process, reused by every window it reads."""
    return open_genome(path)


def read_window(genome_path: str, window: Window) -> EncodedWindow | SkippedWindow:
    return encode_window(cached_genome(genome_path), window)


def io_tasks(job: Job, node_id: str) -> tuple[Callable, Callable]:
    """(read, write): submit a window's reading task, and its writing task given its prediction."""
    on_driver_node = NodeAffinitySchedulingStrategy(node_id, soft=False)
    read = ray.remote(read_window).options(num_cpus=1, scheduling_strategy=on_driver_node)
    write = ray.remote(write_prediction).options(num_cpus=1, scheduling_strategy=on_driver_node)
    genome = str(job.options.genome.resolve())
    out = str(job.options.out.resolve())
    lengths = dict(job.genome_contigs)
    columns = ray.put(job.columns)
    return (
        lambda w: read.remote(genome, w),
        lambda w, prediction: write.remote(out, prediction, lengths[w.chrom], columns, job.options.on_nonfinite),
    )


class WindowStream:
    """Feeds windows to the workers in batches, a bounded number in flight, and yields each window
    with its outcome (WrittenWindow, or the exception that failed it) as its writing finishes.

    A worker that dies is restarted by Ray, which reruns its batches. One that dies for good (its
    restarts used up) is dropped and its windows go to the others; with none left, they fail.
    """

    def __init__(self, windows: Iterator[Window], workers: list, batch_size: int, limit: int, tasks: tuple[Callable, Callable]):
        self.windows = windows
        self.workers = dict(enumerate(workers))  # the live ones
        self.batch_size = batch_size
        self.limit = limit
        self.read, self.write = tasks
        self.batches: dict[int, int] = dict.fromkeys(self.workers, 0)  # per worker: batches submitted, not done
        self.batch_done: dict[ray.ObjectRef, int] = {}  # a batch's first prediction -> its worker
        self.writes: dict[ray.ObjectRef, tuple[Window, int]] = {}  # write task -> its window and worker
        self.requeued: deque[Window] = deque()  # windows of workers that died for good, to go first
        self.stopped = False
        self.lost_workers: str | None = None  # why no worker is left, if so

    def stop(self) -> None:
        """Submit nothing more; what is in flight still finishes."""
        self.stopped = True

    def __iter__(self) -> Iterator[tuple[Window, WrittenWindow | Exception]]:
        while True:
            self._submit()
            if not self.writes:
                return
            ready, _ = ray.wait([*self.writes, *self.batch_done], num_returns=1, fetch_local=False)
            for ref in ready:
                if ref in self.batch_done:
                    self.batches[self.batch_done.pop(ref)] -= 1
                    continue
                window, worker = self.writes.pop(ref)
                try:
                    yield window, ray.get(ref)
                except ray.exceptions.RayError as e:
                    if isinstance(getattr(e, "cause", e), ray.exceptions.ActorDiedError):
                        self.workers.pop(worker, None)  # dead for good: Ray's restarts are used up
                        if self.workers:
                            self.requeued.append(window)
                            continue
                        self.lost_workers = error_line(e)
                    yield window, e

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
            reads = [self.read(w) for w in batch]
            predictions = self.workers[worker].predict.options(num_returns=len(batch)).remote(*reads)
            predictions = predictions if len(batch) > 1 else [predictions]
            self.batch_done[predictions[0]] = worker
            self.batches[worker] += 1
            for w, prediction in zip(batch, predictions):
                self.writes[self.write(w, prediction)] = (w, worker)


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
