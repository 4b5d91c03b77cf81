"""Output contract v1: files written by agpipe.io.parquet, read back with pyarrow and DuckDB."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agpipe.io import parquet
from agpipe.io.parquet import (
    CONTACT_MAPS,
    JUNCTIONS,
    RESERVED_COLUMNS,
    Junctions,
    OutputError,
    PartInfo,
    TrackRow,
    WindowRecord,
    decode_contig,
    encode_contig,
    part_path,
    read_json,
    read_windows_table,
    remove_stale_temporaries,
    track_columns,
    validate_part,
    write_json_atomic,
    write_tracks_table,
    write_window,
    write_windows_table,
)
from agpipe.jobs.plan import Window, plan_windows
from agpipe.model.config import Output

ATAC_1, ATAC_128 = Output("atac", 1), Output("atac", 128)
COLUMNS = {ATAC_1: ["bin start", "bin start + 1"], ATAC_128: ["bin start", "bin start + 1"]}


def bin_start_values(window: Window, resolution: int) -> np.ndarray:
    """A model output whose channel c at each bin is the bin's genome start + c: rows read back
    must carry their own coordinates (exact in float32 below 2**24)."""
    starts = window.start + resolution * np.arange((window.end - window.start) // resolution)
    return np.stack([starts, starts + 1], axis=1).astype(np.float32)


def write_all(out: Path, contigs: list[tuple[str, int]], window: int, crop: int, dtype: str = "float32", compression: str = "zstd") -> list[PartInfo]:
    lengths = dict(contigs)
    parts = []
    for w in plan_windows(contigs, window, crop):
        outputs = {o: bin_start_values(w, o.resolution) for o in (ATAC_1, ATAC_128)}
        parts += write_window(out, w, lengths[w.chrom], outputs, COLUMNS, dtype=dtype, compression=compression)
    return parts


def output_folder(out: Path, output: Output) -> Path:
    return out / "predictions" / f"head={output.head}" / f"resolution={output.resolution}"


def duck(query: str) -> pa.Table:
    return duckdb.sql(query).to_arrow_table()


def files_under(folder: Path) -> list[Path]:
    return [Path(d) / f for d, _, files in os.walk(folder) for f in files]


# ---------------------------------------------------------------- coverage


@settings(max_examples=12, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 9000), min_size=1, max_size=3),
    window_crop=st.sampled_from([(2048, 0), (2048, 256), (2048, 896), (4096, 768)]),
)
def test_windows_write_every_bin_once(lengths: list[int], window_crop: tuple[int, int]) -> None:
    contigs = [(f"chr{i}", length) for i, length in enumerate(lengths)]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        write_all(out, contigs, *window_crop)
        for output in (ATAC_1, ATAC_128):
            r = output.resolution
            folder = output_folder(out, output)
            by_duckdb = duck(f"SELECT * FROM read_parquet('{folder}/**/*.parquet', hive_partitioning=false) ORDER BY chrom, start")
            by_pyarrow = ds.dataset(folder, format="parquet").to_table().sort_by([("chrom", "ascending"), ("start", "ascending")])
            assert by_duckdb.equals(by_pyarrow)
            for chrom, length in contigs:
                rows = by_pyarrow.filter(pa.compute.equal(by_pyarrow["chrom"], chrom))
                starts = rows["start"].to_numpy()
                np.testing.assert_array_equal(starts, np.arange(0, length, r))  # ceil(L/r) bins, each once
                np.testing.assert_array_equal(rows["end"].to_numpy(), np.minimum(starts + r, length))
                np.testing.assert_array_equal(rows["bin start"].to_numpy(), starts)
                np.testing.assert_array_equal(rows["bin start + 1"].to_numpy(), starts + 1)
            for path in files_under(folder):
                starts = pq.read_table(path)["start"].to_numpy()
                assert np.all(np.diff(starts) > 0)  # each file sorted by start


def test_part_file_format(tmp_path: Path) -> None:
    (part, _) = write_all(tmp_path, [("chr1", 5000)], 2048, 256)[:2]
    assert part.path == "predictions/head=atac/resolution=1/contig=chr1/part-00000000.parquet"
    f = pq.ParquetFile(tmp_path / part.path)
    assert f.schema_arrow.names == ["chrom", "start", "end", "bin start", "bin start + 1"]
    assert f.schema_arrow.types == [pa.string(), pa.int64(), pa.int64(), pa.float32(), pa.float32()]
    assert f.schema_arrow.metadata[b"agpipe.schema_version"] == b"1"
    assert {f.metadata.row_group(0).column(i).compression for i in range(5)} == {"ZSTD"}
    assert part.rows == f.metadata.num_rows == 1536


def test_lz4_parts_hold_the_same_values_and_only_keys_carry_statistics(tmp_path: Path) -> None:
    zstd = write_all(tmp_path / "zstd", [("chr1", 5000)], 2048, 256)
    lz4 = write_all(tmp_path / "lz4", [("chr1", 5000)], 2048, 256, compression="lz4")
    for a, b in zip(zstd, lz4):
        assert a.path == b.path
        f = pq.ParquetFile(tmp_path / "lz4" / b.path)
        columns = [f.metadata.row_group(0).column(i) for i in range(f.metadata.num_columns)]
        assert {c.compression for c in columns} == {"LZ4"}
        assert [c.path_in_schema for c in columns if c.is_stats_set] == ["chrom", "start", "end"]  # range queries prune by these
        assert f.read().equals(pq.read_table(tmp_path / "zstd" / a.path))
    folder = output_folder(tmp_path / "lz4", ATAC_128)
    assert duck(f"SELECT count(*) AS n FROM read_parquet('{folder}/**/*.parquet') WHERE start >= 2048")["n"][0].as_py() > 0


def test_wide_1bp_windows_are_split_into_row_groups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parquet, "ROW_GROUP_BYTES", 24 * 1000)  # 1000 rows of (chrom, start, end, 2 floats)
    (part,) = write_window(tmp_path, Window(0, "c", 0, 4096, 0, 4096), 4096, {ATAC_1: bin_start_values(Window(0, "c", 0, 4096, 0, 4096), 1)}, COLUMNS)
    f = pq.ParquetFile(tmp_path / part.path)
    assert [f.metadata.row_group(i).num_rows for i in range(f.num_row_groups)] == [1024] * 4
    np.testing.assert_array_equal(f.read()["start"].to_numpy(), np.arange(4096))


def test_float16_option(tmp_path: Path) -> None:
    write_all(tmp_path, [("chr1", 3000)], 2048, 256, dtype="float16")
    folder = output_folder(tmp_path, ATAC_128)
    table = ds.dataset(folder, format="parquet").to_table()
    assert table.schema.field("bin start").type == pa.float16()
    starts = table["start"].to_numpy()
    np.testing.assert_allclose(table["bin start"].to_numpy().astype(np.float64), starts, rtol=1e-3)
    by_duckdb = duckdb.sql(f"SELECT start, \"bin start\" FROM read_parquet('{folder}/**/*.parquet') ORDER BY start").fetchnumpy()
    np.testing.assert_allclose(by_duckdb["bin start"], by_duckdb["start"], rtol=1e-3)


def test_wrong_shapes_are_refused(tmp_path: Path) -> None:
    w = Window(0, "c", -256, 1792, 0, 1536)
    with pytest.raises(ValueError, match="shape"):
        write_window(tmp_path, w, 2000, {ATAC_128: np.zeros((15, 2), np.float32)}, COLUMNS)
    with pytest.raises(ValueError, match="not inside"):
        write_window(tmp_path, w, 1000, {ATAC_128: np.zeros((16, 2), np.float32)}, COLUMNS)
    with pytest.raises(ValueError, match="junctions="):
        write_window(tmp_path, w, 2000, {JUNCTIONS: np.zeros((16, 2), np.float32)}, COLUMNS)


# ---------------------------------------------------------------- column names


def test_track_columns_keep_unique_names_and_suffix_strands() -> None:
    names = ["CL:0000084 ATAC-seq", "K562 RNA", "K562 RNA", "HepG2 RNA"]
    assert track_columns(names, [".", "+", "-", "+"]) == ["CL:0000084 ATAC-seq", "K562 RNA_+", "K562 RNA_-", "HepG2 RNA"]


def test_track_columns_number_what_still_collides() -> None:
    assert track_columns(["a", "A"], [".", "."]) == ["a_1", "A_2"]  # DuckDB column names ignore case
    assert track_columns(["x", "x", "x_1"], ["+", "+", "."]) == ["x_+_1", "x_+_2", "x_1"]
    assert track_columns(["start", "Chrom", "t"], [".", ".", "."]) == ["start_1", "Chrom_1", "t"]
    assert track_columns(["", "  "], [None, None]) == ["track_0", "track_1"]
    with pytest.raises(ValueError):
        track_columns(["a"], [])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "A", "a_1", "a_+", "b", "start", "Start", "", "c:1 x"]), st.sampled_from(["+", "-", ".", None])), max_size=12))
def test_track_columns_are_unique_and_stable(tracks: list[tuple[str, str | None]]) -> None:
    names, strands = [n for n, _ in tracks], [s for _, s in tracks]
    columns = track_columns(names, strands)
    assert len(columns) == len(names)
    assert len({c.casefold() for c in columns}) == len(columns)
    assert not {c.casefold() for c in columns} & RESERVED_COLUMNS
    assert track_columns(list(names), list(strands)) == columns
    folded = [n.casefold() for n in names]
    if all(n and folded.count(n.casefold()) == 1 and n.casefold() not in RESERVED_COLUMNS for n in names):
        assert columns == names


# ---------------------------------------------------------------- contig names


HOSTILE_NAMES = ["../../etc", "a/b", ".", "..", ".hidden", "chr 1 with spaces", "染色体_é", "100%", "k=v", "back\\slash", "~x", "chr1"]


def test_contig_encoding_is_reversible_and_never_a_path() -> None:
    for name in HOSTILE_NAMES:
        encoded = encode_contig(name)
        assert decode_contig(encoded) == name
        assert set(encoded) <= parquet.SAFE_CONTIG_CHARS | {"%"}
        assert not encoded.startswith(".")
    assert encode_contig("chr1") == "chr1"
    with pytest.raises(ValueError):
        encode_contig("")


def test_hostile_contig_names_stay_inside_and_read_back_true(tmp_path: Path) -> None:
    out = tmp_path / "out"
    write_all(out, [(name, 300) for name in HOSTILE_NAMES], 2048, 256)
    for path in files_under(tmp_path):
        assert path.resolve().is_relative_to(out.resolve())
    folder = output_folder(out, ATAC_128)
    assert len(os.listdir(folder)) == len(HOSTILE_NAMES)
    by_pyarrow = ds.dataset(folder, format="parquet", partitioning="hive").to_table()
    assert set(by_pyarrow["chrom"].to_pylist()) == set(HOSTILE_NAMES)
    for hive in ("true", "false"):
        rows = duck(f"SELECT DISTINCT chrom FROM read_parquet('{folder}/**/*.parquet', hive_partitioning={hive})")
        assert sorted(rows["chrom"].to_pylist()) == sorted(HOSTILE_NAMES)


def test_numeric_contig_names_stay_strings_under_hive_discovery(tmp_path: Path) -> None:
    # Ensembl names: a `chrom=` folder key would be inferred as an integer and override the column.
    write_all(tmp_path, [("1", 300), ("2", 300), ("10", 300)], 2048, 256)
    folder = output_folder(tmp_path, ATAC_128)
    by_pyarrow = ds.dataset(folder, format="parquet", partitioning="hive").to_table()
    assert by_pyarrow.schema.field("chrom").type == pa.string()
    assert set(by_pyarrow["chrom"].to_pylist()) == {"1", "2", "10"}
    rows = duck(f"SELECT DISTINCT chrom FROM read_parquet('{folder}/**/*.parquet', hive_partitioning=true)")
    assert rows.schema.field("chrom").type == pa.string()
    assert set(rows["chrom"].to_pylist()) == {"1", "2", "10"}


# ---------------------------------------------------------------- junctions and contact maps


def test_junction_table(tmp_path: Path) -> None:
    w = Window(4, "chrJ", -256, 1792, 0, 1000)  # genome = window position - 256; kept positions 256..1255
    positions = np.array(
        [
            [300, 600, 100, -1],  # + donors: 100 lies before the contig
            [400, 500, 1300, -1],  # + acceptors: 1300 lies past the kept span
            [900, 350, -1, -1],  # - donors
            [700, 1000, -1, -1],  # - acceptors
        ]
    )
    d, a, s, t = np.meshgrid(*(np.arange(n) for n in (4, 4, 2, 2)), indexing="ij")
    counts = (1000 * d + 100 * a + 10 * s + t).astype(np.float32)  # each value names its index
    columns = {JUNCTIONS: ["Liver", "Brain"]}
    (part,) = write_window(tmp_path, w, 1000, {}, columns, junctions=Junctions(positions, counts))
    assert part.path == "junctions/contig=chrJ/part-00000004.parquet"
    expected = {
        "chrom": ["chrJ"] * 3,
        "donor": [44, 44, 644],
        "acceptor": [144, 244, 444],
        "strand": ["+", "+", "-"],
        "Liver": [0.0, 100.0, 10.0],
        "Brain": [1.0, 101.0, 11.0],
    }
    assert pq.read_table(tmp_path / part.path).to_pydict() == expected
    by_duckdb = duck(f"SELECT * FROM read_parquet('{tmp_path}/junctions/**/*.parquet', hive_partitioning=false)")
    assert by_duckdb.to_pydict() == expected


def test_window_without_junctions_writes_an_empty_readable_part(tmp_path: Path) -> None:
    w = Window(0, "c", -256, 1792, 0, 1536)
    none = Junctions(np.full((4, 3), -1), np.ones((3, 3, 2, 1), np.float32))
    (part,) = write_window(tmp_path, w, 5000, {}, {JUNCTIONS: ["t"]}, junctions=none)
    assert part.rows == 0 and validate_part(tmp_path, part)
    rows = duck(f"SELECT * FROM read_parquet('{tmp_path}/junctions/**/*.parquet', hive_partitioning=false)")
    assert rows.num_rows == 0 and rows.column_names == ["chrom", "donor", "acceptor", "strand", "t"]


def test_contact_map_table(tmp_path: Path) -> None:
    w = Window(3, "chrC", -1024, 7168, 0, 6144)  # pair bins start at -1024, 1024, 3072, 5120
    i, j, c = np.meshgrid(np.arange(4), np.arange(4), np.arange(2), indexing="ij")
    maps = (100 * i + 10 * j + c).astype(np.float32)
    (part,) = write_window(tmp_path, w, 10_000, {}, {CONTACT_MAPS: ["HFF", "H1"]}, contact_maps=maps)
    assert part.path == "contact_maps/contig=chrC/part-00000003.parquet"
    kept = [(1, 1), (1, 2), (1, 3), (2, 2), (2, 3), (3, 3)]  # bin 0 starts before the kept span
    expected = {
        "chrom": ["chrC"] * 6,
        "bin_start_i": [-1024 + 2048 * a for a, _ in kept],
        "bin_start_j": [-1024 + 2048 * b for _, b in kept],
        "HFF": [float(100 * a + 10 * b) for a, b in kept],
        "H1": [float(100 * a + 10 * b + 1) for a, b in kept],
    }
    assert pq.read_table(tmp_path / part.path).to_pydict() == expected
    by_duckdb = duck(f"SELECT * FROM read_parquet('{tmp_path}/contact_maps/**/*.parquet', hive_partitioning=false)")
    assert by_duckdb.to_pydict() == expected


# ---------------------------------------------------------------- integrity and atomicity


def test_validate_part_detects_damage(tmp_path: Path) -> None:
    part = write_all(tmp_path, [("chr1", 3000)], 2048, 256)[0]
    path = tmp_path / part.path
    assert validate_part(tmp_path, part)
    assert not validate_part(tmp_path, PartInfo(part.path, part.rows + 1, part.bytes, part.sha256))
    assert not validate_part(tmp_path, PartInfo("../" + part.path, part.rows, part.bytes, part.sha256))
    good = path.read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x01
    path.write_bytes(bytes(flipped))
    assert not validate_part(tmp_path, part)
    path.write_bytes(good[:-10])
    assert not validate_part(tmp_path, part)
    path.unlink()
    assert not validate_part(tmp_path, part)


def fail_after_writing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills up after the first row group reached the temporary file."""
    original = pq.ParquetWriter.write_table

    def write_then_fail(self: pq.ParquetWriter, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", write_then_fail)


def test_failed_write_leaves_nothing_and_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = Window(0, "c", -256, 1792, 0, 1536)
    outputs = {ATAC_128: bin_start_values(w, 128)}
    with monkeypatch.context() as m:
        fail_after_writing(m)
        with pytest.raises(OutputError) as failed:
            write_window(tmp_path, w, 5000, outputs, COLUMNS)
    assert failed.value.errno == errno.ENOSPC
    message = str(failed.value)
    assert "\n" not in message and str(tmp_path / part_path(ATAC_128, "c", 0)) in message
    assert files_under(tmp_path) == []

    (part,) = write_window(tmp_path, w, 5000, outputs, COLUMNS)
    with monkeypatch.context() as m:
        fail_after_writing(m)
        with pytest.raises(OutputError):
            write_window(tmp_path, w, 5000, {ATAC_128: np.zeros_like(outputs[ATAC_128])}, COLUMNS)
    assert files_under(tmp_path) == [tmp_path / part.path]
    assert validate_part(tmp_path, part)


def test_failed_rename_leaves_no_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(OutputError, match="Permission denied"):
        write_json_atomic(tmp_path / "manifest.json", {"a": 1})
    assert files_under(tmp_path) == []


def test_remove_stale_temporaries(tmp_path: Path) -> None:
    (part,) = write_all(tmp_path, [("chr1", 300)], 2048, 256)[1:]
    folder = (tmp_path / part.path).parent
    planted = folder / f".tmp-{'0' * 32}-part-00000009.parquet.partial"
    planted.write_bytes((tmp_path / part.path).read_bytes()[:50])
    (folder / "notes.tmp.txt").write_text("not ours")
    # A crashed writer's temporary is invisible to `*.parquet` globs and to pyarrow discovery.
    assert duck(f"SELECT count(*) AS n FROM read_parquet('{folder}/*.parquet')")["n"][0].as_py() == 3
    assert remove_stale_temporaries(tmp_path) == 1
    assert not planted.exists() and (folder / "notes.tmp.txt").exists() and validate_part(tmp_path, part)


def chmod_is_enforced(folder: Path) -> bool:
    """False when running as root (or on a filesystem that ignores modes): then nothing is read-only."""
    probe = folder / "probe"
    try:
        probe.write_text("")
    except PermissionError:
        return True
    probe.unlink()
    return False


def test_read_only_folder_gives_one_line_error(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        if not chmod_is_enforced(out):
            pytest.skip("read-only modes are not enforced here (running as root?)")
        w = Window(0, "c", -256, 1792, 0, 1536)
        with pytest.raises(OutputError) as failed:
            write_window(out, w, 5000, {ATAC_128: bin_start_values(w, 128)}, COLUMNS)
        assert "\n" not in str(failed.value) and str(out) in str(failed.value)
        with pytest.raises(OutputError, match="manifest.json"):
            write_json_atomic(out / "manifest.json", {})
        assert files_under(out) == []
    finally:
        out.chmod(0o755)


def test_unwritable_path_gives_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "predictions").write_text("a file where a folder should be")  # fails as root too
    w = Window(0, "c", -256, 1792, 0, 1536)
    with pytest.raises(OutputError) as failed:
        write_window(tmp_path, w, 5000, {ATAC_128: bin_start_values(w, 128)}, COLUMNS)
    message = str(failed.value)
    assert "\n" not in message and message.startswith(f"cannot write {tmp_path / part_path(ATAC_128, 'c', 0)}: ")
    assert isinstance(failed.value, OSError)


# ---------------------------------------------------------------- run tables and manifest


def test_windows_table_round_trip(tmp_path: Path) -> None:
    parts = write_all(tmp_path, [("chr1", 3000)], 2048, 256)
    records = [
        WindowRecord(1, "chr1", 1280, 3328, 1536, 3000, "done", 0, 1.5, tuple(parts[2:])),
        WindowRecord(0, "chr1", -256, 1792, 0, 1536, "done", 3, 2.0, tuple(parts[:2])),
        WindowRecord(2, "chrN", -256, 1792, 0, 900, "skipped_all_n", 0, 0.0),
    ]
    write_windows_table(tmp_path, records)
    assert read_windows_table(tmp_path) == sorted(records, key=lambda r: r.window_id)
    paths = duck(f"SELECT window_id, unnest(parts).path AS path FROM '{tmp_path}/windows.parquet' ORDER BY path")
    assert paths["path"].to_pylist() == sorted(p.path for p in parts)
    assert all(validate_part(tmp_path, p) for r in read_windows_table(tmp_path) for p in r.parts)
    with pytest.raises(ValueError, match="status"):
        write_windows_table(tmp_path, [WindowRecord(0, "c", 0, 1, 0, 1, "finished", 0, 0.0)])


def test_tracks_table(tmp_path: Path) -> None:
    def row(head: str, resolution: int, index: int, column: str) -> TrackRow:
        return TrackRow(head, resolution, "human", index, column, column, ".", "ATAC-seq", None, "CL:0000084", 1.5)

    rows = [row("atac", 128, 1, "b"), row("atac", 1, 0, "a"), row("atac", 128, 0, "a")]
    write_tracks_table(tmp_path, rows)
    table = duck(f"SELECT head, resolution, track_index, \"column\", biosample FROM '{tmp_path}/tracks.parquet'")
    assert table.to_pydict() == {
        "head": ["atac"] * 3,
        "resolution": [1, 128, 128],
        "track_index": [0, 0, 1],
        "column": ["a", "a", "b"],
        "biosample": [None] * 3,
    }
    with pytest.raises(ValueError, match="twice"):
        write_tracks_table(tmp_path, [row("atac", 1, 0, "a"), row("atac", 1, 1, "a")])


def test_json_round_trip(tmp_path: Path) -> None:
    manifest = {"schema_version": parquet.SCHEMA_VERSION, "weights": {"sha256": "ab" * 32}, "counts": {"done": 3}}
    write_json_atomic(tmp_path / "manifest.json", manifest)
    write_json_atomic(tmp_path / "manifest.json", {**manifest, "counts": {"done": 4}})
    assert read_json(tmp_path / "manifest.json")["counts"] == {"done": 4}
    with pytest.raises(ValueError):
        write_json_atomic(tmp_path / "manifest.json", {"seconds": float("nan")})
    assert os.listdir(tmp_path) == ["manifest.json"]


def test_parts_are_written_unsynced_and_the_run_tables_synced(tmp_path: Path, monkeypatch) -> None:
    """Part files skip fsync (the run syncs them all at its end); windows.parquet does not."""
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(parquet.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    parts = write_all(tmp_path, [("chr1", 5000)], 2048, 256)
    assert parts and not synced
    write_windows_table(tmp_path, [WindowRecord(0, "chr1", -256, 1792, 0, 1536, "done", 0, 1.0, tuple(parts[:2]))])
    assert synced
