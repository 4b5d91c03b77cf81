"""Reading a finished (or running) run folder: the one implementation behind `agpipe.open` and the
analysis commands (tracks, query, export, plot).

    run = agpipe.open("run1")
    run.query("chr1:1,000,001-1,010,000", tracks="K562", head="atac", resolution=128)

Regions are written the UCSC way: `chr1:1,000,001-2,000,000` means 1-based positions 1,000,001 to
2,000,000 inclusive, which is the 0-based half-open interval [1000000, 2000000) that the files
store. `Region` holds the 0-based form; `str(region)` gives the display form back.

Reads go through pyarrow.dataset over an explicit list of part files: windows.parquet says which
windows' kept spans overlap the region, so only those files are opened; the start/end filter skips
row groups by their statistics, and only the chosen value columns are decoded. (DuckDB would prune
as well, but pyarrow takes column names and paths as plain values, with no SQL quoting of
hostile track or contig names, and hands back Arrow without a copy.)
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs
import pyarrow.parquet as pq

from agpipe.io.parquet import (
    CONTACT_MAPS,
    JUNCTIONS,
    MANIFEST_FILE,
    SCHEMA_VERSION,
    TRACKS_FILE,
    WINDOWS_FILE,
    part_path,
    read_json,
)
from agpipe.model.config import Output

KEY_COLUMNS = ("chrom", "start", "end")
SEARCHED_FIELDS = ("column", "name", "assay", "biosample", "ontology_curie")
# Outputs whose rows are not genome bins: they have tracks.parquet rows but no predictions/ folder.
NOT_BINNED_HEADS = frozenset({JUNCTIONS.head, CONTACT_MAPS.head})
_LOCAL = pyarrow.fs.LocalFileSystem()  # explicit, so no path is ever read as a URI ('%' in contig folders)
_POSITIONS = re.compile(r"(?P<first>[0-9][0-9,]*)(?:-(?P<last>[0-9][0-9,]*))?")


class Region(NamedTuple):
    """A genome interval, 0-based half-open like the files: [start, end)."""

    chrom: str
    start: int
    end: int

    def __str__(self) -> str:
        return f"{self.chrom}:{self.start + 1:,}-{self.end:,}"  # 1-based inclusive, UCSC style


def parse_region(text: str, contigs: Mapping[str, int]) -> Region:
    """`CHROM`, `CHROM:START-END` or `CHROM:POS` (1-based, inclusive, commas allowed) -> Region.

    A contig name may itself hold ':' or '-' (HLA-A*01:01:01:01): a text that is a whole contig name
    means that contig; otherwise the positions follow the last ':'.
    """
    text = text.strip()
    if text in contigs:
        return Region(text, 0, contigs[text])
    chrom, colon, positions = text.rpartition(":")
    if not colon:
        raise ValueError(f"unknown contig {text!r}: {_contig_list(contigs)}")
    if chrom not in contigs:
        raise ValueError(f"unknown contig {chrom!r} in region {text!r}: {_contig_list(contigs)}")
    match = _POSITIONS.fullmatch(positions.strip())
    if not match:
        raise ValueError(f"cannot read region {text!r}: use CHROM, CHROM:START-END or CHROM:POS (1-based, commas allowed)")
    first = int(match["first"].replace(",", ""))
    last = int(match["last"].replace(",", "")) if match["last"] else first
    length = contigs[chrom]
    if first < 1:
        raise ValueError(f"region {text!r} starts at 0: positions are 1-based, the first base is {chrom}:1")
    if last < first:
        raise ValueError(f"region {text!r} ends before it starts")
    if last > length:
        raise ValueError(f"region {text!r} reaches past the end of {chrom} ({length:,} bp)")
    return Region(chrom, first - 1, last)


def _contig_list(contigs: Mapping[str, int]) -> str:
    names = list(contigs)
    shown = ", ".join(repr(n) for n in names[:5])
    return f"this run has {shown}" + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def match_tracks(tracks: pa.Table, patterns: str | Sequence[str]) -> np.ndarray:
    """Which rows of a tracks table match any of the patterns (a boolean mask).

    A pattern equal to a column name (ignoring case) picks that track alone: column names such as
    `K562 RNA_+` are not safe regexes. Otherwise a track matches where the pattern occurs, ignoring
    case, in its column, name, assay, biosample or ontology_curie, as text or as a regular expression.
    """
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    fields = {f: [v or "" for v in tracks[f].to_pylist()] for f in SEARCHED_FIELDS}
    columns = [c.casefold() for c in fields["column"]]
    matched = np.zeros(tracks.num_rows, dtype=bool)
    for pattern in patterns:
        exact = np.array([c == pattern.casefold() for c in columns], dtype=bool)
        if exact.any():
            matched |= exact
            continue
        try:
            regex = re.compile(pattern, re.IGNORECASE)
        except re.error:
            regex = None
        needle = pattern.casefold()
        for i in range(tracks.num_rows):
            values = [fields[f][i] for f in SEARCHED_FIELDS]
            matched[i] |= any(needle in v.casefold() or (regex is not None and regex.search(v)) for v in values)
    return matched


@dataclasses.dataclass(frozen=True)
class Selection:
    """Tracks of one output (a head at one resolution): what a query, export or plot reads."""

    output: Output
    tracks: pa.Table  # rows of tracks.parquet, in the part files' column order

    @property
    def columns(self) -> list[str]:
        return self.tracks["column"].to_pylist()


class Run:
    """A run folder. Tables are read on first use; nothing is cached across folders."""

    def __init__(self, path: Path, manifest: dict[str, Any]):
        self.path = path
        self.manifest = manifest

    def __repr__(self) -> str:
        return f"agpipe.Run({str(self.path)!r}, status={self.manifest.get('status')!r})"

    @functools.cached_property
    def tracks(self) -> pa.Table:
        """tracks.parquet: one row per value column of every output."""
        return pq.read_table(self.path / TRACKS_FILE)

    @functools.cached_property
    def windows(self) -> pa.Table:
        """windows.parquet: one row per window, with its kept span, status and part files."""
        return pq.read_table(self.path / WINDOWS_FILE)

    @functools.cached_property
    def contigs(self) -> dict[str, int]:
        """Contig lengths in genome (FASTA) order, from the manifest. A manifest without them (an
        older or foreign writer) falls back to the windows: kept spans are clipped to the contig,
        so the last window's out_end is its length when the whole contig was planned."""
        listed = self.manifest.get("genome", {}).get("contigs")
        if listed:
            return {str(name): int(length) for name, length in listed}
        by_window = self.windows.group_by("chrom", use_threads=False).aggregate([("out_end", "max")])
        return dict(zip(by_window["chrom"].to_pylist(), by_window["out_end_max"].to_pylist()))

    @property
    def outputs(self) -> list[Output]:
        """The outputs with genome-binned predictions (junctions and contact maps excluded)."""
        pairs = zip(self.tracks["head"].to_pylist(), self.tracks["resolution"].to_pylist())
        return [Output(h, r) for h, r in dict.fromkeys(pairs) if h not in NOT_BINNED_HEADS]

    def region(self, region: str | Region | tuple[str, int, int]) -> Region:
        """A region as text (1-based, see parse_region) or as a 0-based (chrom, start, end), checked."""
        if isinstance(region, str):
            return parse_region(region, self.contigs)
        chrom, start, end = region
        if chrom not in self.contigs:
            raise ValueError(f"unknown contig {chrom!r}: {_contig_list(self.contigs)}")
        if not 0 <= start < end <= self.contigs[chrom]:
            raise ValueError(f"[{start}, {end}) is not a region of {chrom} (0-based, half-open, length {self.contigs[chrom]:,})")
        return Region(chrom, int(start), int(end))

    def find_tracks(
        self, patterns: str | Sequence[str] | None = None, head: str | None = None, resolution: int | None = None
    ) -> pa.Table:
        """Rows of tracks.parquet matching all that is given (see match_tracks for patterns)."""
        tracks = self.tracks
        if head is not None:
            heads = dict.fromkeys(tracks["head"].to_pylist())
            if head not in heads:
                raise ValueError(f"no head {head!r} in this run: it has {', '.join(heads)}")
            tracks = tracks.filter(pc.equal(tracks["head"], head))
        if resolution is not None:
            resolutions = dict.fromkeys(tracks["resolution"].to_pylist())
            if resolution not in resolutions:
                where = head or "this run"
                raise ValueError(f"no {resolution} bp output in {where}: resolutions are {_bp_list(resolutions)}")
            tracks = tracks.filter(pc.equal(tracks["resolution"], resolution))
        if patterns:
            tracks = tracks.filter(pa.array(match_tracks(tracks, patterns)))
            if tracks.num_rows == 0:
                raise ValueError(f"no track matches {_patterns_text(patterns)}" + (f" in {head}" if head else ""))
        return tracks

    def select(
        self, tracks: str | Sequence[str] | None = None, head: str | None = None, resolution: int | None = None
    ) -> Selection:
        """The matching tracks of exactly one binned output; an error names what to add if several match."""
        found = self.find_tracks(tracks, head, resolution)
        binned = pa.array([h not in NOT_BINNED_HEADS for h in found["head"].to_pylist()], pa.bool_())
        found = found.filter(binned)
        if found.num_rows == 0:
            raise ValueError("junction and contact map tracks are not genome bins: choose tracks of another head")
        outputs = list(dict.fromkeys(zip(found["head"].to_pylist(), found["resolution"].to_pylist())))
        if len(outputs) > 1:
            heads = list(dict.fromkeys(h for h, _ in outputs))
            if len(heads) == 1:
                raise ValueError(f"{heads[0]} has resolutions {_bp_list(r for _, r in outputs)}: pass --resolution")
            what = f"tracks matching {_patterns_text(tracks)}" if tracks else "this run's tracks"
            raise ValueError(f"{what} belong to several heads ({', '.join(heads)}): pass --head")
        return Selection(Output(*outputs[0]), found)

    def dataset(self, head: str, resolution: int | None = None) -> ds.Dataset:
        """One output's part files as a pyarrow dataset, with a `contig` partition field (the
        decoded contig name, always a string) that prunes files: filter on ds.field("contig")."""
        output = self.select(head=head, resolution=resolution).output
        folder = (self.path / part_path(output, "any", 0)).parent.parent  # above the contig= folders
        partitioning = ds.partitioning(pa.schema([("contig", pa.string())]), flavor="hive")
        return ds.dataset(folder, format="parquet", partitioning=partitioning, filesystem=_LOCAL)

    def part_files(self, output: Output, region: Region) -> list[Path]:
        """The part files of `output` whose window's kept span overlaps the region, in genome order.
        Windows without predictions (skipped as all N, failed, pending) have none."""
        w = self.windows
        overlapping = w.filter(
            pc.and_(
                pc.and_(pc.equal(w["chrom"], region.chrom), pc.equal(w["status"], "done")),
                pc.and_(pc.less(w["out_start"], region.end), pc.greater(w["out_end"], region.start)),
            )
        ).sort_by("window_id")
        paths = []
        for window_id, parts in zip(overlapping["window_id"].to_pylist(), overlapping["parts"].to_pylist()):
            path = part_path(output, region.chrom, window_id)
            if any(p["path"] == path for p in parts):  # a window lists one part per output it predicted
                paths.append(self.path / path)
        return paths

    def read_region(self, selection: Selection, region: Region) -> pa.Table:
        """chrom, start, end and the selected tracks for the bins overlapping the region, by start."""
        columns = [*KEY_COLUMNS, *selection.columns]
        files = self.part_files(selection.output, region)
        if not files:  # the region lies in windows without predictions
            return self._output_schema(selection.output).empty_table().select(columns)
        dataset = ds.dataset([str(f) for f in files], format="parquet", filesystem=_LOCAL)
        bins = (ds.field("start") < region.end) & (ds.field("end") > region.start)
        table = dataset.to_table(columns=columns, filter=bins)
        if np.any(np.diff(table["start"].to_numpy()) <= 0):  # a threaded scan need not keep file order
            table = table.sort_by("start")
        return table

    def query(
        self,
        region: str | Region | tuple[str, int, int],
        tracks: str | Sequence[str] | None = None,
        head: str | None = None,
        resolution: int | None = None,
        as_: Literal["arrow", "pandas"] = "arrow",
    ) -> Any:
        """Values of the matching tracks (of one output) over a region: columns chrom, start, end and
        one per track, named as in tracks.parquet; one row per bin overlapping the region, so the
        first and last bins may reach past it. Bins of windows without predictions are absent."""
        if as_ not in ("arrow", "pandas"):
            raise ValueError(f"as_={as_!r}: use 'arrow' or 'pandas'")
        table = self.read_region(self.select(tracks, head, resolution), self.region(region))
        return table.to_pandas() if as_ == "pandas" else table

    def iter_contig(self, selection: Selection, chrom: str, columns: Sequence[str], batch_rows: int = 262_144) -> Iterator[pa.RecordBatch]:
        """A contig's bins in genome order as record batches of chrom, start, end and `columns`,
        one part file at a time, so a contig at 1 bp is never in memory whole."""
        for path in self.part_files(selection.output, Region(chrom, 0, self.contigs[chrom])):
            with pq.ParquetFile(path) as part:
                yield from part.iter_batches(batch_size=batch_rows, columns=[*KEY_COLUMNS, *columns])

    def _output_schema(self, output: Output) -> pa.Schema:
        for chrom, window_id, parts in zip(*(self.windows[c].to_pylist() for c in ("chrom", "window_id", "parts"))):
            path = part_path(output, chrom, window_id)
            if any(p["path"] == path for p in parts):
                return pq.read_schema(self.path / path)
        raise ValueError(f"no window of this run has {output} predictions yet")


def open_run(path: str | Path) -> Run:
    """Opens a run folder (exposed as `agpipe.open`); reads only manifest.json until asked for more."""
    folder = Path(path)
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        raise ValueError(f"{folder} is not an agpipe run folder: it has no {MANIFEST_FILE}")
    manifest = read_json(manifest_path)
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(f"{folder} was written with output contract v{version}; this agpipe reads v{SCHEMA_VERSION}")
    return Run(folder, manifest)


def _bp_list(resolutions: Any) -> str:
    return ", ".join(f"{r} bp" for r in resolutions)


def _patterns_text(patterns: str | Sequence[str]) -> str:
    return repr(patterns) if isinstance(patterns, str) else " or ".join(repr(p) for p in patterns)
