"""Genome-browser files from a run: one bigWig or bedGraph per track.

Both stream the run contig by contig and part file by part file (Run.iter_contig), writing each
batch of bins to every open track file, so memory holds one batch, never a contig at 1 bp. Files are
written under temporary names and renamed into place only when complete. Contigs are written in
name order (the order bedGraphToBigWig and `sort -k1,1 -k2,2n` expect); bins that are not finite
(NaN, infinity) and bins of windows without predictions are left out: browsers show no data there.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.csv

from agpipe.io.parquet import TEMP_SUFFIX
from agpipe.io.results import Run, Selection

# Open files per pass over the data: a pass reads only its tracks' columns, and an official head has
# hundreds of tracks, more than a process may keep open.
FILES_PER_PASS = 64
_UNSAFE_FILE_CHARS = re.compile(r"[^A-Za-z0-9._+-]+")  # "+" kept: strand suffixes
MAX_STEM = 150  # file names stay well below the usual 255-byte limit


def file_stems(selection: Selection) -> list[str]:
    """Safe, unique file names (without suffix) for the selected tracks: `<head>.<r>bp.<column>`
    with every run of characters outside [A-Za-z0-9._+-] turned into '_', unique ignoring case
    (macOS and Windows file systems ignore it) by numbering repeats."""
    prefix = f"{selection.output.head}.{selection.output.resolution}bp."
    stems, taken = [], set()
    for column in selection.columns:
        base = prefix + (_UNSAFE_FILE_CHARS.sub("_", column).strip("._") or "track")[: MAX_STEM - len(prefix)]
        stem, n = base, 1
        while stem.casefold() in taken:
            n += 1
            stem = f"{base}_{n}"
        taken.add(stem.casefold())
        stems.append(stem)
    return stems


@contextlib.contextmanager
def atomic_files(paths: Sequence[Path]) -> Iterator[list[Path]]:
    """Temporary paths next to `paths`, renamed over them only if the block completes (a reader sees
    whole files or none); on any error the temporaries are removed and `paths` are untouched. The
    names follow agpipe.io.parquet's temporaries, so remove_stale_temporaries also cleans these."""
    temps = [p.with_name(f".tmp-{uuid.uuid4().hex}-{p.name}{TEMP_SUFFIX}") for p in paths]
    try:
        yield temps
        for temp in temps:
            with open(temp, "rb") as f:
                os.fsync(f.fileno())
        for temp, path in zip(temps, paths):
            os.replace(temp, path)
    except BaseException:
        for temp in temps:
            with contextlib.suppress(OSError):
                temp.unlink(missing_ok=True)
        raise


class _TrackWriter(Protocol):
    def write(self, chrom: str, starts: np.ndarray, ends: np.ndarray, values: np.ndarray) -> None: ...
    def close(self) -> None: ...


class _BigWigWriter:
    """Fixed-step records (span = step = bin width): 4 bytes per bin, the compact bigWig form."""

    def __init__(self, path: Path, contigs: Sequence[tuple[str, int]]):
        self._file = _pybigwig().open(str(path), "w")
        if self._file is None:
            raise OSError(f"cannot write {path}")
        self._file.addHeader(list(contigs), maxZooms=10)  # zoom levels let browsers show whole contigs fast

    def write(self, chrom: str, starts: np.ndarray, ends: np.ndarray, values: np.ndarray) -> None:
        for lo, hi in _fixed_step_runs(starts, ends, np.isfinite(values)):
            width = int(ends[lo] - starts[lo])
            self._file.addEntries(chrom, int(starts[lo]), values=values[lo:hi], span=width, step=width)

    def close(self) -> None:
        self._file.close()


def _pybigwig():
    """pyBigWig, an optional dependency: only bigWig export needs it."""
    try:
        import pyBigWig
    except ImportError:
        raise ValueError("bigWig export needs pyBigWig: pip install 'agpipe[bigwig]'") from None
    return pyBigWig


def _fixed_step_runs(starts: np.ndarray, ends: np.ndarray, finite: np.ndarray) -> Iterator[tuple[int, int]]:
    """[lo, hi) slices of adjacent, equally wide, finite bins: each is one fixed-step record block.
    A run breaks at a gap (a skipped window), at a non-finite value and at the clipped last bin."""
    widths = ends - starts
    breaks = np.flatnonzero((starts[1:] != ends[:-1]) | (widths[1:] != widths[:-1]) | (finite[1:] != finite[:-1])) + 1
    for lo, hi in zip([0, *breaks.tolist()], [*breaks.tolist(), len(starts)]):
        if hi > lo and finite[lo]:
            yield lo, hi


class _BedGraphWriter:
    """chrom, start, end, value separated by tabs, no header or track line (bedGraphToBigWig and
    bedtools read it as is), optionally gzip-compressed."""

    _SCHEMA = pa.schema([("chrom", pa.string()), ("start", pa.int64()), ("end", pa.int64()), ("value", pa.float32())])

    def __init__(self, path: Path, compressed: bool):
        # Level 1: about 4x faster than gzip's default 6 on bedGraph text, for files ~10% larger
        # (Arrow's own gzip stream uses level 9, over 10x slower).
        self._stream = gzip.open(path, "wb", compresslevel=1) if compressed else pa.output_stream(str(path))
        # quoting "none" refuses (rather than quotes) a contig name holding a tab or newline.
        options = pyarrow.csv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
        self._writer = pyarrow.csv.CSVWriter(self._stream, self._SCHEMA, write_options=options)

    def write(self, chrom: str, starts: np.ndarray, ends: np.ndarray, values: np.ndarray) -> None:
        finite = np.isfinite(values)
        columns = [pa.repeat(pa.scalar(chrom), int(finite.sum())), *(pa.array(a[finite]) for a in (starts, ends, values))]
        self._writer.write_table(pa.Table.from_arrays(columns, schema=self._SCHEMA))

    def close(self) -> None:
        self._writer.close()
        self._stream.close()


def export_bigwig(run: Run, selection: Selection, out_dir: Path) -> list[Path]:
    """One bigWig per selected track in out_dir, named by file_stems; returns their paths."""
    _pybigwig()  # before any file is opened
    contigs = sorted(run.contigs.items())
    return _export(run, selection, out_dir, ".bw", lambda path: _BigWigWriter(path, contigs))


def export_bedgraph(run: Run, selection: Selection, out_dir: Path, compressed: bool = False) -> list[Path]:
    """One bedGraph (.bedGraph, or gzip-compressed .bedGraph.gz) per selected track in out_dir."""
    suffix = ".bedGraph.gz" if compressed else ".bedGraph"
    return _export(run, selection, out_dir, suffix, lambda path: _BedGraphWriter(path, compressed))


def _export(run: Run, selection: Selection, out_dir: Path, suffix: str, open_writer: Callable[[Path], _TrackWriter]) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / (stem + suffix) for stem in file_stems(selection)]
    columns = selection.columns
    for first in range(0, len(columns), FILES_PER_PASS):
        group = columns[first : first + FILES_PER_PASS]
        # The writers close (ExitStack exits first) before atomic_files renames their files.
        with atomic_files(paths[first : first + FILES_PER_PASS]) as temps, contextlib.ExitStack() as open_files:
            writers: list[_TrackWriter] = []
            for temp in temps:
                writers.append(open_writer(temp))
                open_files.callback(writers[-1].close)
            for chrom in sorted(run.contigs):
                for batch in run.iter_contig(selection, chrom, group):
                    starts, ends = batch["start"].to_numpy(), batch["end"].to_numpy()
                    for writer, column in zip(writers, group):
                        values = batch[column].to_numpy(zero_copy_only=False).astype(np.float32, copy=False)  # float16 runs
                        writer.write(chrom, starts, ends, values)
    return paths
