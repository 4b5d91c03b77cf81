import gzip
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agpipe.io.bed import read_regions
from agpipe.jobs.plan import plan_windows

CONTIGS = [("chr1", 1000), ("chr2", 500)]


def regions_of(tmp_path, text, contigs=CONTIGS):
    path = tmp_path / "r.bed"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return read_regions(path, contigs)


def one_line_error(tmp_path, text) -> str:
    with pytest.raises(ValueError) as e:
        regions_of(tmp_path, text)
    message = str(e.value)
    assert len(message.splitlines()) == 1, message
    return message


def test_tolerates_headers_comments_and_whitespace(tmp_path):
    text = (
        "chrom\tstart\tend\n"
        "# a comment\n"
        "track name=x description='y z'\n"
        "browser position chr1:1-100\n"
        "\n"
        "chr2   10 20 name 0 +\n"
        "chr1\t100\t200\textra\n"
        "chr1 \t 150 \t 250  \r\n"
        "chr1\t250\t260\n"  # touches the previous one: merged
        "chr1\t500\t500\n"  # zero length: ignored
        "chr1\t900\t5000\n"  # clipped to the contig
        "chr1\t0\t10"
    )
    assert regions_of(tmp_path, text) == {"chr1": [(0, 10), (100, 260), (900, 1000)], "chr2": [(10, 20)]}


def test_gzipped_bed(tmp_path):
    path = tmp_path / "r.bed.gz"
    path.write_bytes(gzip.compress(b"chr1\t5\t9\n"))
    assert read_regions(path, dict(CONTIGS)) == {"chr1": [(5, 9)]}


@pytest.mark.parametrize(
    "text, words",
    [
        ("chr1\t5\n", "line 1: expected at least 3 fields"),
        ("chr1\t5\t9\nchr1 x\n", "line 2: expected at least 3 fields"),
        ("chr1\t5\t9\nchr1\t1O\t20\n", "line 2: start and end must be whole numbers"),
        ("chr1\t5\t9.5\n", "whole numbers"),
        ("chr1\t1e3\t2000\n", "whole numbers"),
        ("chr1\t-5\t9\n", "negative"),
        ("chr1\t20\t10\n", "end 10 is before start 20"),
        ("chr1\t1000\t1010\n", "start 1000 is beyond the end of 'chr1' (length 1000)"),
        ("chr1\t5\t9\nchrUn\t1\t2\n1\t1\t2\nchrUn\t3\t4\n", "'chrUn' (line 2), '1' (line 3)"),
        ("# only a comment\ntrack x\n", "selects nothing"),
        ("chr1\t5\t5\n", "selects nothing"),
        ("", "selects nothing"),
        ("chrom\tstart\tend\nchrom\tstart\tend\n", "line 2: start and end must be whole numbers"),
        (b"chr1\t\xff\t2\n", "line 1 is not UTF-8"),
    ],
)
def test_malformed_bed_is_a_one_line_error(tmp_path, text, words):
    assert words in one_line_error(tmp_path, text)


def test_missing_bed(tmp_path):
    with pytest.raises(ValueError, match="cannot read regions BED"):
        read_regions(tmp_path / "nope.bed", CONTIGS)


def test_regions_select_windows(tmp_path):
    contigs = [("chr1", 300_000), ("chr2", 100_000)]
    regions = regions_of(tmp_path, "chr1\t200000\t200001\n", contigs)
    windows = list(plan_windows(contigs, 131072, 16384, regions))
    assert [(w.chrom, w.window_id) for w in windows] == [("chr1", 2)]
    assert windows[0].out_start <= 200_000 < windows[0].out_end


# Fuzzing: BED text built from line kinds with known meaning, and raw bytes. read_regions must
# either raise a one-line ValueError (exactly when a line is bad or nothing is selected) or return
# exactly the expected merged intervals.

SEPARATOR = st.sampled_from(["\t", " ", "  ", " \t"])
END = st.sampled_from(["\n", "\r\n"])


@st.composite
def bed_line(draw):
    """(text, interval or None, bad) for one line."""
    kind = draw(st.sampled_from(["interval"] * 6 + ["skipped", "bad"]))
    sep = draw(SEPARATOR)
    if kind == "skipped":
        return draw(st.sampled_from(["", "# c", "track name=a", "browser hide all", "  ", "#chr1\t1\t2"])), None, False
    chrom, length = draw(st.sampled_from(CONTIGS))
    start = draw(st.integers(0, length - 1))
    end = draw(st.integers(start, length + 50))
    extra = draw(st.sampled_from(["", sep + "name", sep + "name" + sep + "0" + sep + "+"]))
    if kind == "interval":
        return f"{chrom}{sep}{start}{sep}{end}{extra}{draw(st.sampled_from(['', ' ', chr(9)]))}", (chrom, start, min(end, length)), False
    bad = draw(
        st.sampled_from(
            [
                f"{chrom}{sep}{start}",
                f"{chrom}{sep}{start}{sep}x{end}",
                f"{chrom}{sep}-{start + 1}{sep}{end}",
                f"{chrom}{sep}{end + 1}{sep}{start}",
                f"chrZ{sep}{start}{sep}{end}",
                f"{chrom}{sep}{length + start}{sep}{length + end + 1}",
            ]
        )
    )
    return bad, None, True


def expected_regions(intervals):
    covered = {}
    for chrom, start, end in intervals:
        covered.setdefault(chrom, set()).update(range(start, end))
    out = {}
    for chrom, bases in covered.items():
        runs, previous = [], None
        for base in sorted(bases):
            if previous is not None and base == previous + 1:
                runs[-1][1] = base + 1
            else:
                runs.append([base, base + 1])
            previous = base
        if runs:
            out[chrom] = [tuple(r) for r in runs]
    return out


def read_text(data: bytes):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "r.bed"
        path.write_bytes(data)
        return read_regions(path, CONTIGS)


@settings(max_examples=150, deadline=None)
@given(st.lists(bed_line(), max_size=8), END, st.booleans())
def test_fuzz_structured_bed(lines, end, header):
    text = ("chrom\tstart\tend" + end if header else "") + end.join(line for line, _, _ in lines)
    expected = expected_regions([interval for _, interval, _ in lines if interval])
    if any(bad for _, _, bad in lines) or not expected:
        with pytest.raises(ValueError) as e:
            read_text(text.encode())
        assert len(str(e.value).splitlines()) == 1
    else:
        assert read_text(text.encode()) == expected


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.binary(max_size=120), st.text(st.sampled_from("chr12\t -x#\n0123456789"), max_size=60).map(str.encode)))
def test_fuzz_random_bed(data):
    try:
        regions = read_text(data)
    except ValueError as e:
        assert len(str(e).splitlines()) == 1
        return
    lengths = dict(CONTIGS)
    assert regions
    for chrom, spans in regions.items():
        assert all(0 <= s < e <= lengths[chrom] for s, e in spans)
        assert all(a[1] < b[0] for a, b in zip(spans, spans[1:]))  # sorted, merged
