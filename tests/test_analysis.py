"""Downstream analysis: agpipe.open / Run.query, bigWig and bedGraph export, plots, the CLI, and the
recipes of docs/analysis.md, all against the run folder of run_fixture.py."""

from __future__ import annotations

import ast
import gzip
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pyBigWig
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import agpipe
from agpipe.cli import main
from agpipe.io import export
from agpipe.io.export import export_bedgraph, export_bigwig, file_stems
from agpipe.io.results import Region, Run, Selection, parse_region
from agpipe.model.config import Output
from run_fixture import ALL_N_WINDOWS, CONTIGS, NAN_AT, OUTPUTS, build_run

REPO = Path(__file__).resolve().parents[1]
LENGTHS = dict(CONTIGS)
HOSTILE = "chr 1/../x"
HLA = "HLA-A*01:01:01:01"
K562_ATAC = "EFO:0002067 ATAC-seq"


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run1"
    build_run(out)
    return out


@pytest.fixture(scope="session")
def run(run_dir: Path) -> Run:
    return agpipe.open(run_dir)


def output_files(run_dir: Path, output: Output) -> list[Path]:
    folder = run_dir / "predictions" / f"head={output.head}" / f"resolution={output.resolution}"
    return sorted(Path(d) / f for d, _, files in os.walk(folder) for f in files)


def brute_force(run_dir: Path, output: Output, region: Region, columns: list[str]) -> pa.Table:
    """Every file of the output read whole, then filtered: what a query must return."""
    table = pa.concat_tables(pq.read_table(f) for f in output_files(run_dir, output))
    overlapping = pc.and_(
        pc.equal(table["chrom"], region.chrom),
        pc.and_(pc.less(table["start"], region.end), pc.greater(table["end"], region.start)),
    )
    return table.filter(overlapping).sort_by("start").select(["chrom", "start", "end", *columns])


def assert_same_table(actual: pa.Table, expected: pa.Table) -> None:
    assert actual.column_names == expected.column_names
    assert actual.schema.types == expected.schema.types
    for name in expected.column_names:  # numpy's comparison takes NaN == NaN
        np.testing.assert_array_equal(actual[name].to_numpy(), expected[name].to_numpy(), err_msg=name)


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


# ---------------------------------------------------------------- regions


@pytest.mark.parametrize(
    "text, expected",
    [
        ("chr1:10,001-20,000", Region("chr1", 10_000, 20_000)),
        ("chr1:10001-20000", Region("chr1", 10_000, 20_000)),
        ("chr1", Region("chr1", 0, 50_000)),
        (" chr1:15,000 ", Region("chr1", 14_999, 15_000)),
        ("chr1:1-50,000", Region("chr1", 0, 50_000)),
        (HLA, Region(HLA, 0, 3_000)),
        (f"{HLA}:101-200", Region(HLA, 100, 200)),
        (f"{HOSTILE}:1-9,000", Region(HOSTILE, 0, 9_000)),
    ],
)
def test_regions_are_ucsc_one_based_inclusive(text: str, expected: Region) -> None:
    region = parse_region(text, LENGTHS)
    assert region == expected
    assert parse_region(str(region), LENGTHS) == region  # str() gives the display form back


@pytest.mark.parametrize(
    "text, message",
    [
        ("chr9", "unknown contig 'chr9'"),
        ("chr9:1-10", "unknown contig 'chr9'"),
        ("chr1:200-100", "ends before it starts"),
        ("chr1:0-100", "1-based"),
        ("chr1:1-50,001", "reaches past the end of chr1 (50,000 bp)"),
        ("chr1:60,000", "reaches past the end"),
        ("chr1:1-x", "cannot read region"),
        ("chr1:-5", "cannot read region"),
    ],
)
def test_bad_regions_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_region(text, LENGTHS)


def test_region_tuples_are_zero_based(run: Run) -> None:
    assert run.region(("chr1", 0, 128)) == Region("chr1", 0, 128)
    with pytest.raises(ValueError, match="not a region"):
        run.region(("chr1", 10, 10))


# ---------------------------------------------------------------- queries


@settings(max_examples=40, deadline=None)
@given(
    output=st.sampled_from(OUTPUTS),
    contig=st.sampled_from(CONTIGS),
    first=st.floats(0, 1, exclude_max=True),
    width=st.integers(1, 20_000),
)
def test_query_agrees_with_the_files(run: Run, run_dir: Path, output: Output, contig: tuple[str, int], first: float, width: int) -> None:
    chrom, length = contig
    start = int(first * length)
    region = Region(chrom, start, min(length, start + width))
    columns = run.select(head=output.head, resolution=output.resolution).columns
    expected = brute_force(run_dir, output, region, columns)
    assert_same_table(run.query(region, head=output.head, resolution=output.resolution), expected)


def test_run_outputs(run: Run) -> None:
    assert run.outputs == OUTPUTS  # junctions and contact maps are not genome-binned outputs


def test_query_edges(run: Run, run_dir: Path) -> None:
    atac_128 = Output("atac", 128)
    columns = run.select(head="atac", resolution=128).columns
    last = run.query("chr1:49,990-50,000", head="atac", resolution=128)
    assert last["start"].to_pylist() == [49_920] and last["end"].to_pylist() == [50_000]  # the clipped last bin
    ((chrom, out_start),) = ALL_N_WINDOWS
    assert (chrom, out_start) == ("chr2", 6_144)  # kept span [6144, 12288)
    skipped = run.query("chr2:7,001-12,000", head="atac", resolution=128)  # inside the all-N window
    assert skipped.num_rows == 0 and skipped.column_names == ["chrom", "start", "end", *columns]
    across = run.query("chr2:6,001-12,500", head="atac", resolution=128)
    assert across["start"].to_pylist() == [5_888, 6_016, 12_288, 12_416]  # bins of the skipped window absent
    base = run.query(f"{NAN_AT[0]}:{NAN_AT[1] + 1}", tracks="CL:0000084", head="atac", resolution=1)
    assert base["start"].to_pylist() == [NAN_AT[1]] and np.isnan(base["CL:0000084 ATAC-seq"][0].as_py())
    whole = run.query(HOSTILE, head="atac", resolution=128)
    assert whole.num_rows == -(-LENGTHS[HOSTILE] // 128) and set(whole["chrom"].to_pylist()) == {HOSTILE}
    assert_same_table(whole, brute_force(run.path, atac_128, Region(HOSTILE, 0, LENGTHS[HOSTILE]), columns))


def test_query_selects_tracks_and_returns_pandas(run: Run) -> None:
    frame = run.query("chr1:1-1,000", tracks=["K562", "liver"], head="atac", resolution=128, as_="pandas")
    assert list(frame.columns) == ["chrom", "start", "end", K562_ATAC, "UBERON:0002107 ATAC-seq"]
    assert frame["start"].tolist() == list(range(0, 1_000, 128))
    stranded = run.query("chr1:1-1,000", tracks="EFO:0002067 polyA plus RNA-seq_+", head="rna_seq", resolution=128)
    assert stranded.column_names[3:] == ["EFO:0002067 polyA plus RNA-seq_+"]  # an exact column, not a regex


def test_pushdown_reads_only_the_needed_files_row_groups_and_columns(run_dir: Path, tmp_path: Path) -> None:
    """Everything a region query does not need is overwritten with garbage (file footers of the
    needed files kept): the query still returns the right values, so it never decoded any of it."""
    output, region, track = Output("atac", 1), Region("chr1", 20_480, 20_600), K562_ATAC
    expected = agpipe.open(run_dir).query(region, tracks=track, head="atac", resolution=1)
    damaged = tmp_path / "run1"
    shutil.copytree(run_dir, damaged)
    run = agpipe.open(damaged)
    needed = run.part_files(output, region)
    assert [p.name for p in needed] == ["part-00000003.parquet"]  # the one window whose kept span holds it
    for path in output_files(damaged, output):
        if path not in needed:
            path.write_bytes(b"\xff" * path.stat().st_size)
    (part,) = needed
    skipped_row_groups = skipped_chunks = 0
    metadata = pq.read_metadata(part)
    with open(part, "r+b") as f:
        for g in range(metadata.num_row_groups):
            group = metadata.row_group(g)
            starts = group.column(1).statistics
            overlaps = starts.min < region.end and starts.max + 1 > region.start
            skipped_row_groups += not overlaps
            for c in range(group.num_columns):
                chunk = group.column(c)
                if overlaps and chunk.path_in_schema in ("chrom", "start", "end", track):
                    continue
                offset = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
                f.seek(offset)
                f.write(b"\xff" * chunk.total_compressed_size)
                skipped_chunks += 1
    assert metadata.num_row_groups == 6 and skipped_row_groups == 5 and skipped_chunks == 5 * 6 + 2  # + 2 other tracks
    with pytest.raises((OSError, pa.ArrowException)):  # the damage is real: a full read fails
        pq.read_table(part)
    assert_same_table(run.query(region, tracks=track, head="atac", resolution=1), expected)


def test_dataset_prunes_by_contig(run: Run) -> None:
    atac = run.dataset("atac", 128)
    assert atac.schema.field("contig").type == pa.string()
    fragments = list(atac.get_fragments(filter=ds.field("contig") == HOSTILE))
    assert len(fragments) == 2  # the hostile contig's two windows, out of all files
    table = atac.to_table(filter=ds.field("contig") == HOSTILE)
    assert table.num_rows == -(-LENGTHS[HOSTILE] // 128) and set(table["chrom"].to_pylist()) == {HOSTILE}


def test_contigs_fall_back_to_windows_without_manifest_genome(run: Run) -> None:
    bare = Run(run.path, {"schema_version": 1})
    assert bare.contigs == LENGTHS


# ---------------------------------------------------------------- finding tracks


def test_find_tracks(run: Run) -> None:
    def columns(*args: object, **kwargs: object) -> list[tuple[str, int, str]]:
        found = run.find_tracks(*args, **kwargs)
        return list(zip(found["head"].to_pylist(), found["resolution"].to_pylist(), found["column"].to_pylist()))

    assert len(columns()) == run.tracks.num_rows
    assert columns("LIVER", head="rna_seq", resolution=128) == [("rna_seq", 128, "UBERON:0002107 total RNA-seq")]
    assert {c for _, _, c in columns(r"CL:00000(84|47)")} == {"CL:0000084 ATAC-seq", "CL:0000084 H3K4me3 ChIP-seq"}
    assert [h for h, _, _ in columns("micro-c")] == ["contact_maps", "contact_maps"]
    assert columns(["liver", "T-cell"], head="atac", resolution=1) == [
        ("atac", 1, "CL:0000084 ATAC-seq"),
        ("atac", 1, "UBERON:0002107 ATAC-seq"),
    ]
    assert columns("polyA plus RNA-seq_-", resolution=1) == [("rna_seq", 1, "EFO:0002067 polyA plus RNA-seq_-")]
    with pytest.raises(ValueError, match="no track matches"):  # not a regex: searched as text, not an re.error
        run.find_tracks("ATAC-seq (")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"head": "atac"}, "atac has resolutions 1 bp, 128 bp: pass --resolution"),
        ({}, "belong to several heads (atac, rna_seq, chip_histone): pass --head"),
        ({"tracks": "K562", "resolution": 128}, "tracks matching 'K562' belong to several heads"),
        ({"tracks": "nothing like this", "head": "atac"}, "no track matches 'nothing like this' in atac"),
        ({"head": "dnase"}, "no head 'dnase' in this run"),
        ({"head": "chip_histone", "resolution": 1}, "no 1 bp output in chip_histone"),
        ({"tracks": "Brain"}, "junction and contact map tracks are not genome bins"),
    ],
)
def test_selection_errors_say_what_to_add(run: Run, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        run.select(**kwargs)


# ---------------------------------------------------------------- export


def expected_intervals(run_dir: Path, output: Output, column: str, chrom: str) -> list[tuple[int, int, float]]:
    """A track's finite bins on a contig, read from the files: what a browser file must hold."""
    table = brute_force(run_dir, output, Region(chrom, 0, LENGTHS[chrom]), [column])
    values = table[column].to_numpy()
    finite = np.isfinite(values)
    return list(zip(table["start"].to_numpy()[finite].tolist(), table["end"].to_numpy()[finite].tolist(), values[finite].tolist()))


@pytest.mark.parametrize("output", [Output("atac", 128), Output("atac", 1)])
def test_bigwig_holds_every_finite_bin(run: Run, run_dir: Path, tmp_path: Path, output: Output) -> None:
    selection = run.select(head=output.head, resolution=output.resolution)
    paths = export_bigwig(run, selection, tmp_path)
    assert [p.name for p in paths] == [f"atac.{output.resolution}bp.{c}.bw" for c in ("CL_0000084_ATAC-seq", "EFO_0002067_ATAC-seq", "UBERON_0002107_ATAC-seq")]
    assert not [p for p in tmp_path.iterdir() if p not in paths]  # no temporaries left
    for path, column in zip(paths, selection.columns):
        with pyBigWig.open(str(path)) as bw:
            assert bw.isBigWig()
            assert list(bw.chroms().items()) == sorted(CONTIGS)  # the run's contigs, in name order
            for chrom in LENGTHS:
                expected = expected_intervals(run_dir, output, column, chrom)
                assert list(bw.intervals(chrom)) == expected
    with pyBigWig.open(str(paths[0])) as bw:
        assert bw.intervals("chr2", 6_144, 12_288) is None  # the all-N window: no data
        assert np.isnan(bw.values(NAN_AT[0], NAN_AT[1], NAN_AT[1] + 1)[0])  # NaN / inf predictions left out
        assert bw.header()["nLevels"] > 0  # zoom levels


def test_bigwig_clipped_last_bins(run: Run, tmp_path: Path) -> None:
    (path,) = export_bigwig(run, run.select(K562_ATAC, head="atac", resolution=128), tmp_path)
    with pyBigWig.open(str(path)) as bw:
        for chrom, length in CONTIGS:
            start, end, value = bw.intervals(chrom)[-1]
            assert (start, end) == (length // 128 * 128, length)
            stored = run.query((chrom, length - 1, length), tracks=K562_ATAC, head="atac", resolution=128)
            assert value == stored[K562_ATAC][0].as_py()
            assert bw.stats(chrom, start, end, type="mean")[0] == pytest.approx(value)


@pytest.mark.parametrize("compress", [False, True])
def test_bedgraph_holds_every_finite_bin(run: Run, run_dir: Path, tmp_path: Path, compress: bool) -> None:
    output = Output("rna_seq", 128)
    selection = run.select("K562", head="rna_seq", resolution=128)
    paths = export_bedgraph(run, selection, tmp_path, compressed=compress)
    assert [p.name for p in paths] == [
        f"rna_seq.128bp.EFO_0002067_polyA_plus_RNA-seq_{strand}.bedGraph{'.gz' if compress else ''}" for strand in "+-"
    ]
    for path, column in zip(paths, selection.columns):
        text = (gzip.open(path, "rt") if compress else open(path)).read()
        lines = [line.split("\t") for line in text.splitlines()]
        assert [line[0] for line in lines] == sorted(line[0] for line in lines)  # sorted by contig name
        rows = [(c, int(s), int(e), float(np.float32(v))) for c, s, e, v in lines]
        expected = [(chrom, *interval) for chrom in sorted(LENGTHS) for interval in expected_intervals(run_dir, output, column, chrom)]
        assert rows == expected


def test_file_names_are_safe_and_unique() -> None:
    columns = ["a/b", "A/B", "..", "", "x" * 300, "chr 1/../x ünï", "a_b"]
    tracks = pa.table({"column": columns})
    stems = file_stems(Selection(Output("atac", 128), tracks))
    assert len({s.casefold() for s in stems}) == len(stems)
    for stem in stems:
        assert re.fullmatch(r"atac\.128bp\.[A-Za-z0-9._+-]+", stem) and len(stem) <= export.MAX_STEM + 3
    assert stems[:4] == ["atac.128bp.a_b", "atac.128bp.A_B_2", "atac.128bp.track", "atac.128bp.track_2"]


def test_failed_export_leaves_no_files(run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    selection = run.select(head="atac", resolution=128)
    (tmp_path / "atac.128bp.CL_0000084_ATAC-seq.bw").write_bytes(b"an earlier export")
    original = Run.iter_contig

    def fail_on_second_contig(self: Run, selection: Selection, chrom: str, columns: list[str]):
        if chrom == "chr 1/../x":
            raise OSError(28, "No space left on device")
        return original(self, selection, chrom, columns)

    monkeypatch.setattr(Run, "iter_contig", fail_on_second_contig)
    with pytest.raises(OSError, match="No space"):
        export_bigwig(run, selection, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["atac.128bp.CL_0000084_ATAC-seq.bw"]
    assert (tmp_path / "atac.128bp.CL_0000084_ATAC-seq.bw").read_bytes() == b"an earlier export"


def test_export_in_several_passes(run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export, "FILES_PER_PASS", 2)  # 3 tracks: two passes, the second with one file
    selection = run.select(head="atac", resolution=128)
    paths = export_bigwig(run, selection, tmp_path)
    for path, column in zip(paths, selection.columns):
        with pyBigWig.open(str(path)) as bw:
            assert list(bw.intervals("chr1")) == expected_intervals(run.path, selection.output, column, "chr1")


# ---------------------------------------------------------------- plots


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


@pytest.mark.parametrize(
    "region, args, panels",
    [
        ("chr1:10,001-30,000", ["--head", "atac", "-r", "128"], 3),
        ("chr2:1-20,000", ["--head", "rna_seq", "-r", "1", "--tracks", "K562"], 2),  # 20,000 bins: max per display bin
        (f"{HOSTILE}:1-9,000", ["--tracks", "H3K27ac"], 1),
    ],
)
def test_plot_renders(run_dir: Path, tmp_path: Path, region: str, args: list[str], panels: int) -> None:
    path = tmp_path / "fig.png"
    code, _, stderr = invoke("plot", str(run_dir), "--region", region, *args, "-o", str(path))
    assert code == 0, stderr
    width, height = png_size(path)
    assert (width, height) == (1500, round(150 * (panels + 0.8)))
    assert path.stat().st_size > 15_000  # drawn, not blank
    assert f"wrote {path} ({width} x {height} px)" in stderr


def test_plot_refuses_too_many_tracks(run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from agpipe.io import plot

    monkeypatch.setattr(plot, "MAX_TRACKS", 2)
    with pytest.raises(ValueError, match="narrow --tracks"):
        plot.plot_region(run, run.select(head="atac", resolution=128), run.region("chr1"), tmp_path / "x.png")
    assert not list(tmp_path.iterdir())


def test_plot_gaps_and_display_bins() -> None:
    from agpipe.io.plot import _max_per_display_bin, _nan_runs

    values = np.array([1.0, np.nan, np.nan, 2.0, np.nan])
    assert _nan_runs(values).tolist() == [[1, 3], [4, 5]]
    edges = np.array([0, 128, 256, 384, 512, 600])
    coarse_edges, maxima = _max_per_display_bin(edges, values[None, :], 2)
    assert coarse_edges.tolist() == [0, 256, 512, 600]
    np.testing.assert_array_equal(maxima, [[1.0, 2.0, np.nan]])  # an all-NaN display bin stays a gap

# ---------------------------------------------------------------- command line


def test_cli_tracks(run_dir: Path) -> None:
    code, stdout, stderr = invoke("tracks", str(run_dir), "--search", "k562", "--head", "atac")
    assert code == 0
    header, *rows = stdout.splitlines()
    assert header.split() == ["head", "resolution", "column", "name", "strand", "assay", "biosample", "ontology_curie"]
    assert len(rows) == 2 and all(K562_ATAC in row and "K562" in row for row in rows)
    assert stderr == "2 tracks\n"


def test_cli_query_formats(run: Run, run_dir: Path, tmp_path: Path) -> None:
    region = f"{HOSTILE}:1,001-3,000"
    args = ["query", str(run_dir), "--region", region, "--head", "atac", "-r", "128"]
    expected = run.query(region, head="atac", resolution=128)

    code, stdout, _ = invoke(*args, "--format", "csv")
    assert code == 0
    lines = stdout.splitlines()
    assert lines[0] == '"chrom","start","end","CL:0000084 ATAC-seq","EFO:0002067 ATAC-seq","UBERON:0002107 ATAC-seq"'
    assert len(lines) == expected.num_rows + 1 and lines[1].startswith(f'"{HOSTILE}",896,1024,')

    code, _, stderr = invoke(*args, "--format", "parquet", "-o", str(tmp_path / "q.parquet"))
    assert code == 0 and f"{expected.num_rows} rows, 3 tracks" in stderr
    assert_same_table(pq.read_table(tmp_path / "q.parquet"), expected)

    code, stdout, stderr = invoke(*args)
    assert code == 0 and len(stdout.splitlines()) == expected.num_rows + 1 and stderr == ""
    code, stdout, stderr = invoke("query", str(run_dir), "--region", "chr1", "--tracks", "H3K27ac")
    assert code == 0 and len(stdout.splitlines()) == 1 + 40 + 1  # header, first and last 20, "..."
    assert "391 rows; all of them: --format csv, or -o FILE" in stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["query", "{run}", "--region", "chrZ:1-10", "--head", "atac", "-r", "1"], "unknown contig 'chrZ'"),
        (["query", "{run}", "--region", "chr1:10-1", "--head", "atac", "-r", "1"], "ends before it starts"),
        (["query", "{run}", "--region", "chr1:1-60,000", "--head", "atac", "-r", "1"], "reaches past the end of chr1"),
        (["query", "{run}", "--region", "chr1", "--head", "atac", "--tracks", "zzz", "-r", "1"], "no track matches 'zzz'"),
        (["query", "{run}", "--region", "chr1", "--head", "atac"], "atac has resolutions 1 bp, 128 bp: pass --resolution"),
        (["query", "{run}", "--region", "chr1", "--head", "atac", "-r", "1", "-f", "parquet"], "--format parquet writes a file"),
        (["query", "{missing}", "--region", "chr1"], "is not an agpipe run folder"),
        (["tracks", "{run}", "--search", "zzz"], "no track matches 'zzz'"),
        (["export", "bigwig", "{run}", "--tracks", "K562", "-o", "{tmp}"], "belong to several heads"),
        (["export", "bedgraph", "{run}", "--head", "chip_histone", "-r", "1", "-o", "{tmp}"], "no 1 bp output in chip_histone"),
        (["plot", "{run}", "--region", "chr1:0-5", "--head", "chip_histone", "-o", "{tmp}/x.png"], "1-based"),
    ],
)
def test_cli_errors_are_one_line(run_dir: Path, tmp_path: Path, args: list[str], message: str) -> None:
    filled = [a.format(run=run_dir, tmp=tmp_path, missing=tmp_path / "nowhere") for a in args]
    code, stdout, stderr = invoke(*filled)
    assert code == 2 and stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith("agpipe: error: ") and message in stderr
    assert not list(tmp_path.glob("*.png"))


def test_cli_notes_an_unfinished_run(run_dir: Path, tmp_path: Path) -> None:
    running = tmp_path / "run1"
    shutil.copytree(run_dir, running)
    manifest = (running / "manifest.json").read_text().replace('"complete"', '"running"')
    (running / "manifest.json").write_text(manifest)
    code, _, stderr = invoke("tracks", str(running), "--head", "atac", "-r", "1")
    assert code == 0 and "has status 'running': only its finished windows have predictions" in stderr


def test_cli_export_hostile_contig_end_to_end(run_dir: Path, tmp_path: Path) -> None:
    code, stdout, _ = invoke("export", "bigwig", str(run_dir), "--head", "chip_histone", "--tracks", "H3K4me3", "-o", str(tmp_path / "bw"))
    assert code == 0
    (path,) = [Path(line) for line in stdout.splitlines()]
    assert path.parent == tmp_path / "bw" and path.name == "chip_histone.128bp.CL_0000084_H3K4me3_ChIP-seq.bw"
    with pyBigWig.open(str(path)) as bw:
        assert bw.chroms(HOSTILE) == 9_000 and bw.intervals(HOSTILE)[-1][:2] == (8_960, 9_000)
        assert bw.chroms(HLA) == 3_000


# ---------------------------------------------------------------- docs and API surface


def doc_blocks() -> list[tuple[str, str]]:
    return re.findall(r"```(\w+)\n(.*?)```", (REPO / "docs" / "analysis.md").read_text(), flags=re.S)


def test_every_doc_block_runs(run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/analysis.md runs as written, from a folder holding `run1` and `genes.bed`; each Python
    block's last expression (what a notebook shows) and each SQL result must be non-empty."""
    (tmp_path / "run1").symlink_to(run_dir, target_is_directory=True)
    genes = [("chr1", 1_000, 5_000, "GENE1"), ("chr1", 19_000, 26_000, "GENE2"), ("chr2", 5_000, 14_000, "GENE3"), (HOSTILE, 100, 8_999, "GENE4")]
    (tmp_path / "genes.bed").write_text("".join("\t".join(map(str, g)) + "\n" for g in genes))
    monkeypatch.chdir(tmp_path)
    blocks = doc_blocks()
    assert {lang for lang, _ in blocks} == {"bash", "python", "sql"}
    for lang, code in blocks:
        if lang == "bash":
            for line in code.splitlines():
                exit_code, _, stderr = invoke(*shlex.split(line)[1:])
                assert exit_code == 0, f"{line}: {stderr}"
        elif lang == "sql":
            assert duckdb.connect().sql(code).fetchall(), code
        else:
            tree = ast.parse(code)
            last = tree.body.pop()
            assert isinstance(last, ast.Expr), code
            namespace: dict = {}
            exec(compile(tree, "docs/analysis.md", "exec"), namespace)
            assert len(eval(compile(ast.Expression(last.value), "docs/analysis.md", "eval"), namespace)) > 0, code
    assert (tmp_path / "atac.png").exists() and len(list((tmp_path / "bigwig").iterdir())) == 1


def test_import_agpipe_stays_light(run_dir: Path) -> None:
    code = (
        "import sys, agpipe; assert 'pyarrow' not in sys.modules and 'pandas' not in sys.modules;"
        f"run = agpipe.open({str(run_dir)!r}); print(type(run).__name__, len(run.contigs))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "Run 4"
