"""The model worker: loads the weights once, then turns batches of encoded windows into each window's
kept predictions as numpy arrays (agpipe.jobs.windows describes what goes in and out).

`ModelWorker` is a plain class; agpipe.jobs.run makes it a Ray actor (one per GPU, or CPU workers)
taking several calls at once. Outputs stay on the device until they are cropped to the window's kept
span, so the host copy and the object store after it hold only what will be written.

Why a model thread: Ray stores a call's result (a 512 kb window's 128 bp tracks are ~37 MB) after
the call returns, and a worker running one call at a time leaves its GPU idle meanwhile (5-17 ms of
every ~45 on an H100, more as GPUs share a host). Here every call hands its batch to the one thread
that runs the model, which enqueues the batch's kernels and its copies to the host (pinned memory,
asynchronous) and goes on to the next call's batch; the call waits for its copies alone, and Ray
stores its result while the GPU computes the batches behind it.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import torch

from agpipe.io.parquet import CONTACT_MAPS, JUNCTIONS, kept_rows
from agpipe.jobs.plan import Window
from agpipe.jobs.windows import CODE_ONE_HOT, EncodedWindow, JunctionPairs, SkippedWindow, WindowPrediction
from agpipe.model.checkpoint import load_weights
from agpipe.model.config import ORGANISMS, Output
from agpipe.model.heads import JunctionPredictions
from agpipe.model.precision import compile_options, resolve_precision
from agpipe.model.weights import WeightsError, load_model, sha256_memo

# Test hook: "N:MARKER" makes a worker process die hard (os._exit) when its Nth batch arrives, once:
# it creates MARKER first, and does nothing while MARKER exists. Tests kill a worker mid-run with it.
EXIT_ON_BATCH_ENV = "AGPIPE_TEST_EXIT_ON_BATCH"
# On a GPU the compiled model replays CUDA graphs: a call then holds the model thread's CPU (and
# Python's lock) for about a millisecond instead of launching each of its kernels from Python, so
# Ray can store the previous batch's results beside it. A replay overwrites the previous one's
# outputs; copy_kept_outputs enqueues every read of them before the next call. The graphs are
# recorded on the second call (the first warms up), so a worker makes two calls before its first batch.
COMPILE_MODE = {"cuda": "reduce-overhead", "cpu": "default"}
WARMUP_CALLS = {"reduce-overhead": 2, "default": 1}


class ModelWorker:
    """One model on one device, prepared once for the run's organism, outputs and precision."""

    def __init__(
        self,
        weights_path: str,
        weights_sha256: str,
        organism: str,
        outputs: Sequence[Output],
        precision: str,
        device: str,
        compile_model: bool,
        batch_size: int,
        window: int,
        threads: int | None = None,
        crop: int = 0,
    ) -> None:
        started = time.perf_counter()
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        weights = load_weights(weights_path, sha256_memo())  # the driver's digest, unless the file changed
        read = time.perf_counter()
        if weights.sha256 != weights_sha256:
            raise WeightsError(f"{weights_path} changed after the run started (sha256 differs): rerun the command")
        policy = resolve_precision(precision, self.device)
        model, _ = load_model(weights, ORGANISMS.index(organism), outputs, policy, self.device)
        # Compiled models get batches of one shape (short batches padded), so they compile once.
        mode = COMPILE_MODE[self.device.type]
        self.model = torch.compile(model, dynamic=False, options=compile_options(mode)) if compile_model else model
        self.pad_to = batch_size if compile_model else None
        # Per-position heads only over [crop, window - crop): every window's kept span lies inside it
        # (a contig's last window keeps less), and heads are pointwise, so this equals cropping after.
        self.keep = (crop, window - crop) if crop else None
        self.code_one_hot = torch.from_numpy(CODE_ONE_HOT).to(self.device)
        self.batches = itertools.count(1)
        self.exit_on_batch = os.environ.get(EXIT_ON_BATCH_ENV)
        self.batches_to_run: queue.SimpleQueue[tuple[np.ndarray, Sequence[Window], Future]] = queue.SimpleQueue()
        threading.Thread(target=self._run_model, name="model", daemon=True).start()
        loaded = time.perf_counter()
        # Compile now, in the model thread where it will run, so the first batch's time is the model's.
        for _ in range(WARMUP_CALLS[mode] if compile_model else 0):
            self._launch(np.zeros((batch_size, window), np.uint8), []).wait()
        # Where a worker's start goes: reading (and hashing) the weights, building the model on its
        # device, the first (compiling) call; the manifest keeps it: warm-start time is a target.
        self.start_seconds = {
            "read": round(read - started, 3),
            "load": round(loaded - read, 3),
            "compile": round(time.perf_counter() - loaded, 3),
        }

    def describe(self) -> str:
        """What the worker computes on, e.g. "NVIDIA H100 80GB HBM3" or "CPU, 4 threads"."""
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        threads = torch.get_num_threads()
        return f"CPU, {threads} thread{'s' if threads != 1 else ''}"

    def start_timings(self) -> dict[str, float]:
        """Seconds this worker took to read the weights, load the model and compile it."""
        return self.start_seconds

    def predict(self, *batch: EncodedWindow | SkippedWindow) -> list[WindowPrediction | SkippedWindow] | WindowPrediction | SkippedWindow:
        """Each window's kept predictions, in batch order; skipped windows pass through. Ray gives
        one object per window (num_returns = len(batch)), which for one window is the result itself."""
        self._exit_if_asked(next(self.batches))
        encoded = [item for item in batch if isinstance(item, EncodedWindow)]
        predicted: dict[int, WindowPrediction] = {}
        if encoded:
            kept, seconds = self._launch(np.stack([e.codes for e in encoded]), [e.window for e in encoded]).wait()
            share = seconds / len(encoded)
            for e, prediction in zip(encoded, kept):
                predicted[e.window.window_id] = dataclasses.replace(prediction, compute_seconds=share, seconds=e.seconds + share)
        results = [predicted.get(item.window.window_id, item) for item in batch]
        return results if len(results) > 1 else results[0]

    def _launch(self, codes: np.ndarray, windows: Sequence[Window]) -> HostCopies:
        """Has the model thread run a batch; returns once its work is enqueued on the device."""
        launched: Future = Future()
        self.batches_to_run.put((codes, windows, launched))
        return launched.result()

    def _run_model(self) -> None:
        while True:
            codes, windows, launched = self.batches_to_run.get()
            try:
                launched.set_result(self._forward(codes, windows))
            except BaseException as e:  # the calling thread raises it
                launched.set_exception(e)

    # no_grad, not inference_mode: under inference_mode torch.compile (2.13) fails a guard on the
    # tensors the model makes from numpy constants inside forward.
    @torch.no_grad()
    def _forward(self, codes: np.ndarray, windows: Sequence[Window]) -> HostCopies:
        """Batch item i being window i (none for a warm-up): the kept predictions on their way to the host."""
        started = DeviceClock(self.device)
        if self.pad_to and len(codes) < self.pad_to:
            codes = np.concatenate([codes, np.zeros((self.pad_to - len(codes), codes.shape[1]), np.uint8)])
        x = self.code_one_hot[device_copy(codes, self.device).long()]
        out = self.model(x, keep=self.keep)
        first = self.keep[0] if self.keep else 0
        return HostCopies.start([copy_kept_outputs(out, i, w, first) for i, w in enumerate(windows)], started, self.device)

    def _exit_if_asked(self, batches: int) -> None:
        if not self.exit_on_batch:
            return
        batch, marker = self.exit_on_batch.split(":", 1)
        if batches == int(batch) and not Path(marker).exists():
            Path(marker).touch()
            os._exit(1)


class DeviceClock:
    """A point in the device's work: a CUDA event on the current stream, or the time on the CPU."""

    def __init__(self, device: torch.device):
        self.event = torch.cuda.Event(enable_timing=True) if device.type == "cuda" else None
        self.time = time.perf_counter()
        if self.event:
            self.event.record(torch.cuda.current_stream(device))

    def wait(self) -> None:
        if self.event:
            self.event.synchronize()

    def seconds_since(self, start: DeviceClock) -> float:
        """Device time between the two points (both passed), i.e. the work between them."""
        if self.event and start.event:
            return start.event.elapsed_time(self.event) / 1e3
        return self.time - start.time


@dataclasses.dataclass(frozen=True)
class HostCopies:
    """A batch's kept predictions being copied to the host: their arrays and counts are complete
    once the device has passed `copied`."""

    predictions: list[WindowPrediction]  # nonfinite_count set by wait()
    nonfinite: torch.Tensor  # (windows,) on the host
    started: DeviceClock
    copied: DeviceClock

    @classmethod
    def start(cls, kept: list[tuple[WindowPrediction, torch.Tensor]], started: DeviceClock, device: torch.device) -> HostCopies:
        """Enqueues the copy of the windows' non-finite counts (device scalars) after their values."""
        counts = torch.stack([count for _, count in kept]) if kept else torch.zeros(0, dtype=torch.int64, device=device)
        return cls([prediction for prediction, _ in kept], host_copy(counts), started, DeviceClock(device))

    def wait(self) -> tuple[list[WindowPrediction], float]:
        """The predictions once on the host, and the device time of their batch (forward, crop, copies)."""
        self.copied.wait()
        counts = self.nonfinite.tolist()
        return [dataclasses.replace(p, nonfinite_count=int(n)) for p, n in zip(self.predictions, counts)], self.copied.seconds_since(self.started)


def device_copy(values: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host values on the device, the copy enqueued without waiting for the device: staged in
    pinned memory. A copy from pageable memory makes torch wait until the device has finished all
    the work before it, so the model thread could not enqueue the next batch while the device runs
    this one, and every GIL pause of the worker's other threads became device idle time."""
    tensor = torch.from_numpy(values)
    if device.type == "cpu":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def host_copy(values: torch.Tensor) -> torch.Tensor:
    """A copy of device values on the host, enqueued after the work producing them: into pinned
    memory, so the device copies it without the CPU (its caching allocator reuses the buffers)."""
    if values.device.type == "cpu":
        return values
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    return host.copy_(values, non_blocking=True)


def kept_outputs(
    out: dict[Output, torch.Tensor | JunctionPredictions], i: int, window: Window, first: int = 0
) -> WindowPrediction:
    """Batch item i of the model's outputs, cropped on the device to what the window writes and
    copied to the host (without timings). Per-position outputs start `first` bases into the window."""
    prediction, nonfinite = copy_kept_outputs(out, i, window, first)
    # Reading the count waits for the device's stream, so for the track copies enqueued before it.
    return dataclasses.replace(prediction, nonfinite_count=int(nonfinite))


def copy_kept_outputs(
    out: dict[Output, torch.Tensor | JunctionPredictions], i: int, window: Window, first: int = 0
) -> tuple[WindowPrediction, torch.Tensor]:
    """kept_outputs with the track copies enqueued and not awaited: the prediction (its track arrays
    filled once the device's stream has passed the copies, nonfinite_count unset) and its count of
    non-finite values on the device. Contact maps and junctions (not default outputs) are copied
    at once."""
    nonfinite: list[torch.Tensor] = []
    tracks: dict[Output, np.ndarray] = {}
    maps = positions = pairs = None
    for output, values in out.items():
        if output == JUNCTIONS:
            positions, pairs, bad = kept_junctions(values, i, window)
            nonfinite.append(bad)
            continue
        rows = kept_rows(window, output.resolution)
        if output == CONTACT_MAPS:
            square = values[i, rows.start : rows.stop, rows.start : rows.stop].float()
            upper = torch.triu(torch.ones(square.shape[:2], dtype=torch.bool, device=square.device))
            nonfinite.append((~torch.isfinite(square[upper])).sum())  # the upper triangle is what is written
            maps = square.cpu().numpy()
        else:
            skip = first // output.resolution
            # Column-major on the host (transposed on the device): Parquet writes track by track,
            # so the writer then takes each column without copying.
            kept = values[i, rows.start - skip : rows.stop - skip].t().contiguous()
            nonfinite.append((~torch.isfinite(kept)).sum())
            if kept.dtype == torch.bfloat16:
                tracks[output] = host_copy(kept.view(torch.int16)).numpy().view(np.uint16).T
            else:
                tracks[output] = host_copy(kept.float()).numpy().T
    count = torch.stack(nonfinite).sum() if nonfinite else torch.zeros((), dtype=torch.int64)
    return WindowPrediction(window, tracks, maps, positions, pairs, 0), count


def kept_junctions(predictions: JunctionPredictions, i: int, window: Window) -> tuple[np.ndarray, tuple[JunctionPairs, JunctionPairs], torch.Tensor]:
    """The junctions of batch item i that parquet.write_window would write (both sites real and in
    the kept span; on + the donor left of the acceptor, on - right of it), as sparse pairs: the
    dense (K, K, 2, tissues) counts of the official model are ~770 MB a window."""
    positions = predictions.positions[i]  # (4, K)
    counts = predictions.counts[i]  # (K, K, 2, T)
    lo, hi = window.out_start - window.start, window.out_end - window.start
    usable = (positions >= 0) & (positions >= lo) & (positions < hi)
    pairs = []
    nonfinite = []
    for strand in (0, 1):
        donor, acceptor = positions[2 * strand], positions[2 * strand + 1]
        ordered = donor[:, None] < acceptor[None, :] if strand == 0 else donor[:, None] > acceptor[None, :]
        d, a = torch.nonzero(usable[2 * strand][:, None] & usable[2 * strand + 1][None, :] & ordered, as_tuple=True)
        values = counts[d, a, strand].float()
        nonfinite.append((~torch.isfinite(values)).sum())
        pairs.append(JunctionPairs(d.cpu().numpy(), a.cpu().numpy(), values.cpu().numpy()))
    return positions.cpu().numpy(), (pairs[0], pairs[1]), torch.stack(nonfinite).sum()
