"""The writing side of a run: which columns each output gets, and writing one window's predictions
(the body of the CPU Ray task that runs behind the model workers).

The worker hands over only the kept part of each output (see agpipe.jobs.windows), so each group of
outputs is written against the sub-span its rows cover: `cropped_span` is a WindowSpan whose
[start, end) is those rows, and parquet.write_window, keeping the rows whose bins start in the kept
span, keeps all of them.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from agpipe.io.parquet import (
    CONTACT_MAPS,
    DEFAULT_COMPRESSION,
    JUNCTIONS,
    Junctions,
    PartInfo,
    TrackRow,
    WindowRecord,
    kept_rows,
    track_columns,
    write_window,
)
from agpipe.jobs.plan import Window
from agpipe.jobs.windows import JunctionPairs, SkippedWindow, WindowPrediction
from agpipe.model.config import Output
from agpipe.model.metadata import TrackMetadata


@dataclasses.dataclass(frozen=True)
class WrittenWindow:
    """What the driver gets back for a window: its windows.parquet row, the model's seconds on it
    and the seconds its writing took."""

    record: WindowRecord
    compute_seconds: float
    write_seconds: float = 0.0


def output_columns(metadata: TrackMetadata, organism: str, outputs: Sequence[Output]) -> tuple[dict[Output, list[str]], list[TrackRow]]:
    """Value column names per output and the tracks.parquet rows describing them.

    Columns are the head's real (non-padding) tracks in ascending channel order, which is the order
    in which the prepared model emits them; track_index is the channel in the head's full output.
    """
    columns: dict[Output, list[str]] = {}
    rows: list[TrackRow] = []
    for output in outputs:
        tracks = metadata.tracks(organism, output.head)
        real = [(index, track) for index, track in enumerate(tracks) if not track.padding]
        names = track_columns([t.name for _, t in real], [t.strand or None for _, t in real])
        columns[output] = names
        rows.extend(
            TrackRow(
                head=output.head,
                resolution=output.resolution,
                organism=organism,
                track_index=index,
                column=column,
                name=track.name,
                strand=track.strand or None,
                assay=track.assay or None,
                biosample=track.biosample_name or None,
                ontology_curie=track.ontology_curie or None,
                nonzero_mean=None if math.isnan(track.nonzero_mean) else track.nonzero_mean,
            )
            for (index, track), column in zip(real, names)
        )
    return columns, rows


def cropped_span(window: Window, resolution: int) -> Window:
    """The window with its input span [start, end) narrowed to the rows kept_rows(window, resolution)
    cover: what the kept predictions of an output at that resolution are written against."""
    rows = kept_rows(window, resolution)
    return dataclasses.replace(window, start=window.start + resolution * rows.start, end=window.start + resolution * rows.stop)


def write_prediction(
    out_dir: str | Path,
    result: WindowPrediction | SkippedWindow,
    contig_length: int,
    columns: Mapping[Output, Sequence[str]],
    on_nonfinite: str,
    compression: str = DEFAULT_COMPRESSION,
) -> WrittenWindow:
    """Writes one window's part files; returns its windows.parquet row.

    A window with non-finite values under `--on-nonfinite fail` is not written: it is recorded
    `failed` (with its count), so a rerun computes it again instead of trusting it.
    """
    w = result.window
    record = dict(window_id=w.window_id, chrom=w.chrom, start=w.start, end=w.end, out_start=w.out_start, out_end=w.out_end)
    if isinstance(result, SkippedWindow):
        return WrittenWindow(WindowRecord(**record, status="skipped_all_n", nonfinite_count=0, seconds=result.seconds), 0.0)
    if result.nonfinite_count and on_nonfinite == "fail":
        failed = WindowRecord(**record, status="failed", nonfinite_count=result.nonfinite_count, seconds=result.seconds)
        return WrittenWindow(failed, result.compute_seconds)
    started = time.perf_counter()
    parts: list[PartInfo] = []
    by_resolution: dict[int, dict[Output, np.ndarray]] = {}
    for output in result.tracks:
        by_resolution.setdefault(output.resolution, {})[output] = result.values(output)
    junctions = None
    if result.junction_positions is not None:
        junctions = junctions_from_pairs(result.junction_positions, result.junction_pairs, w.out_start - w.start)
        by_resolution.setdefault(JUNCTIONS.resolution, {})
    for resolution, outputs in by_resolution.items():
        with_junctions = junctions if resolution == JUNCTIONS.resolution else None
        parts += write_window(out_dir, cropped_span(w, resolution), contig_length, outputs, columns, junctions=with_junctions, compression=compression)
    if result.contact_maps is not None:
        span = cropped_span(w, CONTACT_MAPS.resolution)
        parts += write_window(out_dir, span, contig_length, {}, columns, contact_maps=result.contact_maps, compression=compression)
    writing = time.perf_counter() - started
    done = WindowRecord(**record, status="done", nonfinite_count=result.nonfinite_count, seconds=result.seconds + writing, parts=tuple(parts))
    return WrittenWindow(done, result.compute_seconds, writing)


class PredictionWriter:
    """A process of the driver's node that writes predictions into OUT, one window at a time (no
    torch imported: it starts in about a second; agpipe.jobs.stream.IoPool runs these)."""

    def __init__(self, out: str, lengths: dict[str, int], columns: dict[Output, list[str]], on_nonfinite: str, compression: str):
        self.out, self.lengths, self.columns = out, lengths, columns
        self.on_nonfinite, self.compression = on_nonfinite, compression

    def write(self, prediction: WindowPrediction | SkippedWindow) -> WrittenWindow:
        length = self.lengths[prediction.window.chrom]
        return write_prediction(self.out, prediction, length, self.columns, self.on_nonfinite, self.compression)


def junctions_from_pairs(positions: np.ndarray, pairs: Sequence[JunctionPairs], offset: int) -> Junctions:
    """The dense Junctions that write_window takes, rebuilt from the worker's sparse pairs over only
    the sites that take part in a pair, with positions moved from the window's start to `offset`
    bases into it (the start of the cropped 1 bp span).

    write_window writes every real, kept, ordered donor x acceptor pair of what it is given; the
    sites kept here pair up exactly as in the model's output, so it writes the same rows.
    """
    used = []  # per class (+ donor, + acceptor, - donor, - acceptor): the original site indices kept
    for p in pairs:
        used += [np.unique(p.donor), np.unique(p.acceptor)]
    k = max(len(u) for u in used)
    tissues = pairs[0].counts.shape[1]
    compact = np.full((4, k), -1, np.int64)
    counts = np.zeros((k, k, 2, tissues), np.float32)
    for c, sites in enumerate(used):
        compact[c, : len(sites)] = positions[c, sites] - offset
    for strand, p in enumerate(pairs):
        d = np.searchsorted(used[2 * strand], p.donor)
        a = np.searchsorted(used[2 * strand + 1], p.acceptor)
        counts[d, a, strand] = p.counts
    return Junctions(compact, counts)

