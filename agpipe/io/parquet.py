"""Output contract v1: the one place that decides what a run folder holds and how its files are written.

    OUT/manifest.json       run description, written by the job (write_json_atomic / read_json)
    OUT/tracks.parquet      one row per output column: which track of which head it is
    OUT/windows.parquet     one row per window: spans, status, and the part files it wrote
    OUT/predictions/head=<head>/resolution=<bp>/contig=<name>/part-<window_id>.parquet
    OUT/junctions/contig=<name>/part-<window_id>.parquet
    OUT/contact_maps/contig=<name>/part-<window_id>.parquet

docs/output-format.md is the reader's description; this module is the writer's. Every file is
written under a temporary name in its final folder and renamed into place when complete, so a
reader or a resumed run sees whole files or none. The folder key is `contig=`, not `chrom=`,
because hive partition discovery (pyarrow, DuckDB) would otherwise put the folder value, possibly
type-inferred as a number ("1", "2", ...), in place of the true `chrom` column.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from agpipe.model.config import ALL_OUTPUTS, HEADS, Output

SCHEMA_VERSION = 1

MANIFEST_FILE = "manifest.json"
TRACKS_FILE = "tracks.parquet"
WINDOWS_FILE = "windows.parquet"
STATUSES = ("done", "skipped_all_n", "failed", "pending")

# The two outputs that are not one row per genome bin; `columns` names their tissues / tracks under these keys.
JUNCTIONS = Output("splice_sites_junction", 1)
CONTACT_MAPS = Output("contact_maps", 2048)

# The key columns that start each per-window table; one value column per track follows them.
PREDICTION_KEYS = (("chrom", pa.string()), ("start", pa.int64()), ("end", pa.int64()))
JUNCTION_KEYS = (("chrom", pa.string()), ("donor", pa.int64()), ("acceptor", pa.int64()), ("strand", pa.string()))
CONTACT_MAP_KEYS = (("chrom", pa.string()), ("bin_start_i", pa.int64()), ("bin_start_j", pa.int64()))
RESERVED_COLUMNS = frozenset(name for keys in (PREDICTION_KEYS, JUNCTION_KEYS, CONTACT_MAP_KEYS) for name, _ in keys)

# Codecs of the part files. lz4, the default, takes half the CPU of zstd to write a window of the
# default outputs (0.11 vs 0.24 s of Parquet encoding for 4,430 columns), which is what keeps a GPU
# host's CPUs ahead of its GPUs; zstd makes files ~25% smaller (docs/performance.md).
COMPRESSIONS = ("lz4", "zstd")
DEFAULT_COMPRESSION = "lz4"
# Row groups of about this many uncompressed bytes: a 1 bp window of a wide head is gigabytes, and
# readers hold a whole row group in memory; a 128 bp window (tens of MB) stays one row group.
ROW_GROUP_BYTES = 64 * 2**20
MIN_ROW_GROUP_ROWS = 1024

# Temporaries start with '.' (pyarrow.dataset skips them) and do not end in .parquet (DuckDB's
# globs match dot files, so a `*.parquet` glob would otherwise read a half-written file).
TEMP_SUFFIX = ".partial"
TEMP_NAME = re.compile(r"^\.tmp-[0-9a-f]{32}-.+\.partial$")
PYARROW_ERRNO = re.compile(r"\[errno (\d+)\]")

SAFE_CONTIG_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")

ValueDtype = Literal["float32", "float16"]


class OutputError(OSError):
    """A file of the run folder could not be written. The message is one line naming the file."""


class WindowSpan(Protocol):
    """The window fields this module needs (agpipe.jobs.plan.Window has them)."""

    @property
    def window_id(self) -> int: ...
    @property
    def chrom(self) -> str: ...
    @property
    def start(self) -> int: ...  # input span, may reach past the contig ends
    @property
    def end(self) -> int: ...
    @property
    def out_start(self) -> int: ...  # kept span, inside the contig
    @property
    def out_end(self) -> int: ...


class Junctions(NamedTuple):
    """One window's splice junction predictions (the model's JunctionPredictions for one window).

    positions: (4, K) int, positions in the window of + donors, + acceptors, - donors, - acceptors,
    -1 for padding. counts: (K, K, 2, T) float, donor x acceptor x strand (+, -) x tissue.
    """

    positions: np.ndarray
    counts: np.ndarray


@dataclasses.dataclass(frozen=True)
class PartInfo:
    """One written part file: what resume checks before trusting it."""

    path: str  # relative to the run folder, '/'-separated
    rows: int
    bytes: int
    sha256: str  # hex


@dataclasses.dataclass(frozen=True)
class TrackRow:
    """One row of tracks.parquet: the metadata of one output column."""

    head: str
    resolution: int
    organism: str
    track_index: int  # channel in the model's output
    column: str
    name: str
    strand: str | None  # '+', '-' or '.' (unstranded)
    assay: str | None
    biosample: str | None
    ontology_curie: str | None
    nonzero_mean: float | None


@dataclasses.dataclass(frozen=True)
class WindowRecord:
    """One row of windows.parquet."""

    window_id: int
    chrom: str
    start: int
    end: int
    out_start: int
    out_end: int
    status: str  # one of STATUSES
    nonfinite_count: int
    seconds: float
    parts: tuple[PartInfo, ...] = ()


# ---------------------------------------------------------------- contig names and paths


def encode_contig(name: str) -> str:
    """A contig name as a folder value: percent-encoded UTF-8 outside [A-Za-z0-9._-], and a leading
    '.' encoded too, so the value is never '.', '..', hidden, or a path. Reversed by decode_contig."""
    if not name:
        raise ValueError("empty contig name")
    encoded = "".join(c if c in SAFE_CONTIG_CHARS else "".join(f"%{b:02X}" for b in c.encode()) for c in name)
    return "%2E" + encoded[1:] if encoded.startswith(".") else encoded


def decode_contig(value: str) -> str:
    return urllib.parse.unquote(value, errors="strict")


def part_path(output: Output, chrom: str, window_id: int) -> str:
    """Where a window's part of one output lives, relative to the run folder."""
    name = f"part-{window_id:08d}.parquet"  # zero-padded: listing order is genome order within a contig
    contig = f"contig={encode_contig(chrom)}"
    if output == JUNCTIONS:
        return f"junctions/{contig}/{name}"
    if output == CONTACT_MAPS:
        return f"contact_maps/{contig}/{name}"
    return f"predictions/head={output.head}/resolution={output.resolution}/{contig}/{name}"


# ---------------------------------------------------------------- column names


def track_columns(names: Sequence[str], strands: Sequence[str | None]) -> list[str]:
    """Column names for one output's tracks: unique (ignoring case, as DuckDB does), stable, readable.

    A track keeps its name when no other track of the output has it. Names shared by several tracks
    get their strand as a suffix ("name_+", "name_-"); whatever still collides, or is a key column
    name, is numbered ("name_1", "name_2", ...) in track order. Blank names become "track_<index>".
    """
    if len(names) != len(strands):
        raise ValueError(f"{len(names)} track names but {len(strands)} strands")
    bases = [name.strip() or f"track_{i}" for i, name in enumerate(names)]
    base_counts = Counter(b.casefold() for b in bases)
    wanted = [
        f"{b}_{s}" if base_counts[b.casefold()] > 1 and s in ("+", "-") else b for b, s in zip(bases, strands)
    ]
    wanted_counts = Counter(w.casefold() for w in wanted)
    keeps = [wanted_counts[w.casefold()] == 1 and w.casefold() not in RESERVED_COLUMNS for w in wanted]
    taken = set(RESERVED_COLUMNS) | {w.casefold() for w, keep in zip(wanted, keeps) if keep}
    columns = []
    for w, keep in zip(wanted, keeps):
        column, n = w, 0
        while not keep and (n == 0 or column.casefold() in taken):
            n += 1
            column = f"{w}_{n}"
        taken.add(column.casefold())
        columns.append(column)
    return columns


# ---------------------------------------------------------------- one window's parts


def write_window(
    out_dir: str | os.PathLike[str],
    window: WindowSpan,
    contig_length: int,
    outputs: Mapping[Output, np.ndarray],
    columns: Mapping[Output, Sequence[str]],
    junctions: Junctions | None = None,
    contact_maps: np.ndarray | None = None,
    dtype: ValueDtype = "float32",
    compression: str = DEFAULT_COMPRESSION,
) -> list[PartInfo]:
    """Writes one window's part files and returns what resume needs to trust them.

    outputs: per-position outputs (tracks, splice sites), each (window bins, channels) over the
    input span. junctions and contact_maps (P, P, C) go to their own tables, their column names
    taken from columns[JUNCTIONS] and columns[CONTACT_MAPS]. Only what lies in the kept span is
    written, so the windows of a plan write every bin of a contig exactly once. Part paths depend
    only on output and window, so writing a window again replaces its parts.
    """
    if not 0 <= window.out_start < window.out_end <= contig_length:
        raise ValueError(
            f"window {window.window_id}: kept span [{window.out_start}, {window.out_end}) "
            f"is not inside {window.chrom} of length {contig_length}"
        )
    if dtype not in ("float32", "float16"):
        raise ValueError(f"dtype {dtype!r}: use float32 or float16")
    value_dtype = np.dtype(dtype)
    out = Path(out_dir)
    parts = []
    for output, values in outputs.items():
        if HEADS[output.head].kind in ("splice_junction", "contact_maps"):
            raise ValueError(f"{output} goes in write_window's junctions= / contact_maps=, not outputs")
        bins = (window.end - window.start) // output.resolution
        _check_shape(window, f"{output} output", values.shape, (bins, len(columns[output])))
        schema = _schema(PREDICTION_KEYS, columns[output], value_dtype)
        chunks = _prediction_chunks(window, contig_length, output, values, schema)
        parts.append(_write_part(out, output, window, schema, chunks, compression))
    if junctions is not None:
        schema = _schema(JUNCTION_KEYS, columns[JUNCTIONS], value_dtype)
        parts.append(_write_part(out, JUNCTIONS, window, schema, [_junction_table(window, junctions, schema)], compression))
    if contact_maps is not None:
        schema = _schema(CONTACT_MAP_KEYS, columns[CONTACT_MAPS], value_dtype)
        parts.append(_write_part(out, CONTACT_MAPS, window, schema, [_contact_map_table(window, contact_maps, schema)], compression))
    return parts


def _schema(keys: Sequence[tuple[str, pa.DataType]], columns: Sequence[str], value_dtype: np.dtype) -> pa.Schema:
    fields = [pa.field(k, t) for k, t in keys] + [pa.field(c, pa.from_numpy_dtype(value_dtype)) for c in columns]
    return pa.schema(fields, metadata={"agpipe.schema_version": str(SCHEMA_VERSION)})


def _table(schema: pa.Schema, chrom: str, keys: Sequence[np.ndarray], values: np.ndarray) -> pa.Table:
    """A table of `schema` from the key columns after chrom and the (rows, tracks) values."""
    fields = list(schema)[1:]
    value_type = fields[len(keys)].type if len(fields) > len(keys) else pa.float32()
    rows = len(values)
    # One transposed copy in the value dtype; each track column is then a zero-copy view of it
    # (pa.array(column, type) per column costs ~130 us each: 0.2 s for a window's 1,600 tracks).
    by_track = np.ascontiguousarray(values.T, dtype=value_type.to_pandas_dtype())
    buffer = pa.py_buffer(by_track)
    tracks = [pa.Array.from_buffers(value_type, rows, [None, buffer], offset=i * rows) for i in range(by_track.shape[0])]
    key_arrays = [pa.array(c, f.type) for c, f in zip(keys, fields)]
    return pa.Table.from_arrays([pa.repeat(pa.scalar(chrom), rows), *key_arrays, *tracks], schema=schema)


def _rows_per_group(schema: pa.Schema) -> int:
    row_bytes = sum(8 if pa.types.is_string(t) else t.byte_width for t in schema.types)  # strings: ~ a dictionary index
    return max(MIN_ROW_GROUP_ROWS, ROW_GROUP_BYTES // row_bytes)


def _check_shape(window: WindowSpan, what: str, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if shape != expected:
        raise ValueError(f"window {window.window_id}: {what} has shape {shape}, expected {expected}")


def kept_rows(window: WindowSpan, resolution: int) -> range:
    """Rows of a window's output at `resolution` whose bin starts lie in the kept span."""
    first = -(-(window.out_start - window.start) // resolution)
    return range(first, -(-(window.out_end - window.start) // resolution))


def _prediction_chunks(
    window: WindowSpan, contig_length: int, output: Output, values: np.ndarray, schema: pa.Schema
) -> Iterator[pa.Table]:
    """The kept bins as row-group-sized tables, so a 1 bp window is never copied whole."""
    r = output.resolution
    rows = kept_rows(window, r)
    chunk = _rows_per_group(schema)
    for first in range(rows.start, rows.stop, chunk):
        last = min(first + chunk, rows.stop)
        starts = window.start + r * np.arange(first, last, dtype=np.int64)
        ends = np.minimum(starts + r, contig_length)  # a contig's last bin ends at the contig's end
        yield _table(schema, window.chrom, [starts, ends], values[first:last])


def _junction_table(window: WindowSpan, junctions: Junctions, schema: pa.Schema) -> pa.Table:
    """Junctions whose donor and acceptor are both real sites in the kept span, in biological order:
    on + the donor lies left of the acceptor, on - right of it (transcription runs right to left)."""
    positions, counts = np.asarray(junctions.positions), np.asarray(junctions.counts)
    k = positions.shape[-1]
    _check_shape(window, "junction positions", positions.shape, (4, k))
    _check_shape(window, "junction counts", counts.shape, (k, k, 2, len(schema) - len(JUNCTION_KEYS)))
    genome = window.start + positions.astype(np.int64)
    usable = (positions >= 0) & (window.out_start <= genome) & (genome < window.out_end)
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    for s, strand in enumerate("+-"):
        donor, acceptor = genome[2 * s], genome[2 * s + 1]
        ordered = donor[:, None] < acceptor if strand == "+" else donor[:, None] > acceptor
        d, a = np.nonzero(usable[2 * s][:, None] & usable[2 * s + 1] & ordered)
        found.append((donor[d], acceptor[a], np.full(len(d), strand), counts[d, a, s]))
    donor, acceptor, strand, values = (np.concatenate(x) for x in zip(*found))
    order = np.lexsort((strand, np.maximum(donor, acceptor), np.minimum(donor, acceptor)))  # by left end
    return _table(schema, window.chrom, [donor[order], acceptor[order], strand[order]], values[order])


def _contact_map_table(window: WindowSpan, maps: np.ndarray, schema: pa.Schema) -> pa.Table:
    """The upper triangle (i <= j: the map is symmetric) of the pairs whose bins both start in the kept span."""
    size = CONTACT_MAPS.resolution
    p = (window.end - window.start) // size
    _check_shape(window, "contact maps", maps.shape, (p, p, len(schema) - len(CONTACT_MAP_KEYS)))
    rows = kept_rows(window, size)
    i, j = (rows.start + x for x in np.triu_indices(len(rows)))
    return _table(schema, window.chrom, [window.start + size * i, window.start + size * j], maps[i, j])


def _write_part(out: Path, output: Output, window: WindowSpan, schema: pa.Schema, tables: Iterable[pa.Table], compression: str) -> PartInfo:
    relative = part_path(output, window.chrom, window.window_id)
    rows = 0
    rows_per_group = _rows_per_group(schema)  # predictions come in chunks of this; junctions may need splitting

    def write(temp: Path) -> None:
        nonlocal rows
        with pq.ParquetWriter(
            temp,
            schema,
            compression=compression,
            use_dictionary=[c for c in ("chrom", "strand") if c in schema.names],  # floats gain nothing from it
            # Min/max only of the keys (what range queries prune by): those of thousands of value
            # columns cost ~7% of writing and serve no common query.
            write_statistics=[f.name for f in schema if not pa.types.is_floating(f.type)],
            # Byte-stream-split lets lz4 and zstd shrink floats markedly; DuckDB cannot read it for float16.
            use_byte_stream_split=[f.name for f in schema if f.type == pa.float32()] or False,
        ) as writer:
            for table in tables:
                writer.write_table(table, row_group_size=rows_per_group)
                rows += table.num_rows

    # Not synced one by one: 14 syncs a window (file and folder, 7 parts) kept 60 writers of a 4-GPU
    # host waiting on the disk (0.58 s a write against 0.24 s). Resume re-hashes every part it
    # trusts, so a part that a crash of the machine lost costs a recomputed window, and a run syncs
    # everything once before it records itself complete (agpipe.jobs.run).
    size, sha256 = _write_atomically(out / relative, write, sync=False)
    return PartInfo(relative, rows, size, sha256)


def validate_part(out_dir: str | os.PathLike[str], part: PartInfo) -> bool:
    """Whether a part file is exactly the one written: inside the run folder, same size and sha256,
    a readable Parquet file with the expected rows. Resume trusts a window's parts only if all pass."""
    relative = Path(part.path)
    if relative.is_absolute() or ".." in relative.parts:
        return False
    path = Path(out_dir) / relative
    try:
        if path.stat().st_size != part.bytes or _hash_and_sync(path, sync=False)[1] != part.sha256:
            return False
        return pq.read_metadata(path).num_rows == part.rows
    except (OSError, pa.ArrowException):
        return False


# ---------------------------------------------------------------- run tables and manifest

PART_TYPE = pa.struct([("path", pa.string()), ("rows", pa.int64()), ("bytes", pa.int64()), ("sha256", pa.string())])

WINDOWS_SCHEMA = pa.schema(
    [
        ("window_id", pa.int64()),
        ("chrom", pa.string()),
        ("start", pa.int64()),
        ("end", pa.int64()),
        ("out_start", pa.int64()),
        ("out_end", pa.int64()),
        ("status", pa.string()),
        ("nonfinite_count", pa.int64()),
        ("seconds", pa.float64()),
        ("parts", pa.list_(PART_TYPE)),
    ],
    metadata={"agpipe.schema_version": str(SCHEMA_VERSION)},
)

TRACKS_SCHEMA = pa.schema(
    [
        ("head", pa.string()),
        ("resolution", pa.int64()),
        ("organism", pa.string()),
        ("track_index", pa.int64()),
        ("column", pa.string()),
        ("name", pa.string()),
        ("strand", pa.string()),
        ("assay", pa.string()),
        ("biosample", pa.string()),
        ("ontology_curie", pa.string()),
        ("nonzero_mean", pa.float64()),
    ],
    metadata={"agpipe.schema_version": str(SCHEMA_VERSION)},
)


def write_windows_table(out_dir: str | os.PathLike[str], rows: Iterable[WindowRecord]) -> None:
    """Writes OUT/windows.parquet, sorted by window_id (replacing any earlier one atomically)."""
    records = sorted(rows, key=lambda r: r.window_id)
    for r in records:
        if r.status not in STATUSES:
            raise ValueError(f"window {r.window_id}: status {r.status!r} is not one of {', '.join(STATUSES)}")
    # Column by column, parts as plain dicts: dataclasses.asdict's deep copies made a save of a
    # whole-genome table (8,000 windows) take 0.66 s, and the driver saves every few seconds.
    columns = {name: [getattr(r, name) for r in records] for name in WINDOWS_SCHEMA.names if name != "parts"}
    columns["parts"] = [[vars(p) for p in r.parts] for r in records]
    table = pa.Table.from_pydict(columns, schema=WINDOWS_SCHEMA)
    _write_table(Path(out_dir) / WINDOWS_FILE, table)


def read_windows_table(out_dir: str | os.PathLike[str]) -> list[WindowRecord]:
    table = pq.read_table(Path(out_dir) / WINDOWS_FILE)
    return [
        WindowRecord(**{**row, "parts": tuple(PartInfo(**p) for p in row["parts"])}) for row in table.to_pylist()
    ]


def write_tracks_table(out_dir: str | os.PathLike[str], rows: Iterable[TrackRow]) -> None:
    """Writes OUT/tracks.parquet, sorted by output (in ALL_OUTPUTS order), then track_index."""
    records = list(rows)
    for key in ("track_index", "column"):
        seen = Counter((r.head, r.resolution, getattr(r, key)) for r in records)
        if repeated := [k for k, n in seen.items() if n > 1]:
            raise ValueError(f"tracks table: {key} {repeated[0][2]!r} appears twice for {Output(*repeated[0][:2])}")
    records.sort(key=lambda r: (ALL_OUTPUTS.index(Output(r.head, r.resolution)), r.track_index))
    table = pa.Table.from_pylist([dataclasses.asdict(r) for r in records], schema=TRACKS_SCHEMA)
    _write_table(Path(out_dir) / TRACKS_FILE, table)


def _write_table(path: Path, table: pa.Table) -> None:
    _write_atomically(path, lambda temp: pq.write_table(table, temp, compression="zstd"))


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    """Writes strict JSON (no NaN, which most JSON readers reject), replacing the file atomically."""
    text = json.dumps(obj, indent=2, allow_nan=False) + "\n"
    _write_atomically(Path(path), lambda temp: temp.write_text(text, encoding="utf-8"))


def read_json(path: str | os.PathLike[str]) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


# ---------------------------------------------------------------- atomic files


def _write_atomically(path: Path, write: Callable[[Path], None], sync: bool = True) -> tuple[int, str]:
    """Runs write(temporary) in path's folder, syncs it (unless told not to), renames it to path;
    returns (bytes, sha256).

    On any failure the temporary is removed and path is untouched (an earlier file there survives);
    OS errors become a one-line OutputError naming path.
    """
    temp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}{TEMP_SUFFIX}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(temp)
        size, sha256 = _hash_and_sync(temp, sync)
        os.replace(temp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            temp.unlink(missing_ok=True)
        if isinstance(err, OSError) and not isinstance(err, OutputError):
            raise output_error(path, err) from err
        raise
    if sync:
        _sync_directory(path.parent)
    return size, sha256


def output_error(path: Path, err: OSError) -> OutputError:
    """An OS error writing `path` as one line naming it (and its errno, for telling a full disk apart)."""
    # pyarrow's messages (its strerror too) name the temporary and may span lines, e.g. "Error writing
    # bytes to file. Detail: [errno 28] No space left on device"; the errno's text says it all.
    number = err.errno
    if number is None and (found := PYARROW_ERRNO.search(str(err))):
        number = int(found.group(1))
    reason = (os.strerror(number) if number else err.strerror or str(err)) or type(err).__name__
    error = OutputError(f"cannot write {path}: {' '.join(reason.split())}")
    error.errno = number  # lets a caller tell a full disk (ENOSPC) from a permission problem
    return error


def _hash_and_sync(path: Path, sync: bool) -> tuple[int, str]:
    """(size, sha256) of a file; with sync, also forces it to disk (same pass, page-cache reads)."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(4 * 2**20):
            digest.update(block)
            size += len(block)
        if sync:
            os.fsync(f.fileno())
    return size, digest.hexdigest()


def _sync_directory(folder: Path) -> None:
    """Makes a rename durable where the platform allows syncing a folder (not Windows, not every
    filesystem). Resume re-validates parts anyway, so a lost rename costs a recomputed window."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(out_dir: str | os.PathLike[str]) -> int:
    """Deletes temporaries left by a crashed writer anywhere under out_dir; returns how many.
    Call it only while no writer is running on the folder."""
    removed = 0
    for folder, _, files in os.walk(out_dir):
        for name in files:
            if TEMP_NAME.match(name):
                os.unlink(os.path.join(folder, name))
                removed += 1
    return removed
