import gzip
import os
import pickle
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pysam
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agpipe.io.fasta import GenomeError, contig_filter, demo_genome_path, is_all_n, one_hot, open_genome
from agpipe.jobs.plan import plan_windows


def fasta_bytes(records, width=60, newline=b"\n"):
    out = []
    for name, seq in records:
        out.append(b">" + name + newline)
        out.extend(seq[i : i + width] + newline for i in range(0, len(seq), width))
    return b"".join(out)


def write_fasta(path: Path, data: bytes, compress=False) -> Path:
    if not compress:
        path.write_bytes(data)
        return path
    plain = path.with_name(path.name + ".plain")
    plain.write_bytes(data)
    pysam.tabix_compress(str(plain), str(path), force=True)
    plain.unlink()
    return path


def random_sequence(rng, n):
    return np.frombuffer(b"ACGTACGTACGTacgtNNRY", np.uint8)[rng.integers(0, 20, n)].tobytes()


def one_line(error) -> str:
    message = str(error.value)
    assert len(message.splitlines()) == 1, message
    return message


RECORDS = [(b"chr1 first contig", random_sequence(np.random.default_rng(1), 10_007)), (b"chrM", b"ACGTN" * 33)]


@pytest.mark.parametrize("compress", [False, True])
def test_builds_index_and_reads(tmp_path, compress):
    path = write_fasta(tmp_path / ("g.fa.gz" if compress else "g.fa"), fasta_bytes(RECORDS), compress)
    with open_genome(path) as genome:
        assert genome.contigs == [("chr1", 10_007), ("chrM", 165)]
        assert genome.fetch("chr1", 0, 10_007) == RECORDS[0][1]
        assert genome.fetch("chr1", 59, 61) == RECORDS[0][1][59:61]
        assert genome.fetch("chrM", 3, 160) == RECORDS[1][1][3:160]
    expected = {path.name, path.name + ".fai"} | ({path.name + ".gzi"} if compress else set())
    assert set(os.listdir(tmp_path)) == expected  # no temporary index files left


def test_plain_and_bgzip_read_the_same(tmp_path):
    rng = np.random.default_rng(2)
    records = [(b"a", random_sequence(rng, 200_000)), (b"b", random_sequence(rng, 77))]
    plain = open_genome(write_fasta(tmp_path / "g.fa", fasta_bytes(records, width=70)))
    packed = open_genome(write_fasta(tmp_path / "g.fa.gz", fasta_bytes(records, width=70), compress=True))
    assert plain.contigs == packed.contigs == [("a", 200_000), ("b", 77)]
    for start in rng.integers(-1_000, 200_500, 50):
        assert plain.fetch("a", start, start + 5_000) == packed.fetch("a", start, start + 5_000)


def test_existing_index_is_used(tmp_path):
    path = write_fasta(tmp_path / "g.fa", fasta_bytes(RECORDS))
    open_genome(path).close()
    index = Path(f"{path}.fai").read_bytes()
    assert open_genome(path).contigs[0] == ("chr1", 10_007)
    assert Path(f"{path}.fai").read_bytes() == index


def test_missing_gzi_is_rebuilt(tmp_path):
    path = write_fasta(tmp_path / "g.fa.gz", fasta_bytes(RECORDS), compress=True)
    open_genome(path).close()
    Path(f"{path}.gzi").unlink()
    assert open_genome(path).fetch("chrM", 0, 5) == b"ACGTN"
    assert Path(f"{path}.gzi").exists()


@pytest.fixture
def read_only(tmp_path):
    """Makes a folder unwritable, even for root (chattr +i) where chmod is not enough."""
    frozen = []

    def freeze(folder: Path):
        folder.chmod(0o555)
        frozen.append(folder)
        if os.access(folder, os.W_OK):
            subprocess.run(["chattr", "+i", str(folder)], capture_output=True)
        if os.access(folder, os.W_OK):
            pytest.skip("cannot make a folder read-only here (root without chattr)")

    yield freeze
    for folder in frozen:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
        folder.chmod(0o755)


def test_read_only_folder_without_index_is_a_clear_error(tmp_path, read_only):
    folder = tmp_path / "ro"
    folder.mkdir()
    path = write_fasta(folder / "g.fa", fasta_bytes(RECORDS))
    read_only(folder)
    with pytest.raises(GenomeError) as e:
        open_genome(path)
    message = one_line(e)
    assert "samtools faidx" in message and "writable" in message
    assert os.listdir(folder) == ["g.fa"]


def test_read_only_folder_with_index_opens(tmp_path, read_only):
    folder = tmp_path / "ro"
    folder.mkdir()
    path = write_fasta(folder / "g.fa.gz", fasta_bytes(RECORDS), compress=True)
    open_genome(path).close()
    read_only(folder)
    assert open_genome(path).fetch("chrM", 0, 5) == b"ACGTN"


def test_plain_gzip_is_refused(tmp_path):
    path = tmp_path / "g.fa.gz"
    path.write_bytes(gzip.compress(fasta_bytes(RECORDS)))
    with pytest.raises(GenomeError) as e:
        open_genome(path)
    assert "bgzip" in one_line(e)


@pytest.mark.parametrize("keep", [18, 400_000])
def test_truncated_bgzip_is_refused(tmp_path, keep):
    path = tmp_path / "g.fa.gz"
    path.write_bytes(demo_genome_path().read_bytes()[:keep])
    with pytest.raises(GenomeError) as e:
        open_genome(path)
    assert "truncated" in one_line(e)
    assert os.listdir(tmp_path) == ["g.fa.gz"]


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(GenomeError) as e:
        open_genome(tmp_path / "nope.fa")
    assert "does not exist" in one_line(e)
    with pytest.raises(GenomeError) as e:
        open_genome(tmp_path)
    assert "directory" in one_line(e)


@pytest.mark.parametrize(
    "data, words",
    [
        (b"", "empty"),
        (b"\n\n", "empty"),
        (b">a\n", "empty"),
        (b">a\n>b\n\n", "empty"),
        (bytes(range(256)) * 4, "binary"),
        (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", "binary"),
        (b"hello world\nACGT\n", "not FASTA"),
        (b"  \n>a\nACGT\n", "not FASTA"),
        (b"@read1\nACGT\n+\nIIII\n", "FASTQ"),
        (b">a\nACGT\n>b x\nAC\n>a\nGG\n", "'a' appears twice (lines 1 and 5)"),
        (b">\nACGT\n", "no contig name"),
        (b"> \t\nACGT\n", "no contig name"),
        (b">a\x01b\nACGT\n", "control characters"),
        (b">a\x1bb\nACGT\n", "control characters"),
        (b">\xff\xfe\nACGT\n", "not UTF-8"),
        (b">a\nACGT\n>b\n>c\nAC\n", "'b' has no sequence"),
        (b">a\nACGT\nAC\nACGT\n", "line 4"),
        (b">a\nAC\nACGT\n", "line 3"),
        (b">a\nACGT\n\nACGT\n", "line 4"),
        (b">a\n\nACGT\n", "line 3"),
        (b">a\nACGT\r\nACGT\nAC\n", "line 3"),
        (b">a\nAC T\nACG\n", "line 2: a sequence line holds spaces"),
        (b">a\n ACG\n ACG\n", "line 2"),
        (b">a\nACGT\nAC\xc3\xa9T\n", "non-ASCII"),
        (b">a\nAC\rGT\n", "line 2"),
    ],
)
@pytest.mark.parametrize("compress", [False, True])
def test_bad_fasta_is_a_one_line_error(tmp_path, data, words, compress):
    path = write_fasta(tmp_path / "g.fa", data, compress)
    with pytest.raises(GenomeError) as e:
        open_genome(path)
    assert words in one_line(e)
    assert os.listdir(tmp_path) == ["g.fa"]  # no index, finished or half-written


def test_bad_name_beyond_the_first_bytes(tmp_path):
    # NUL in the first 64 KiB reads as a binary file; later it is caught as a control character.
    data = fasta_bytes([(b"a", b"ACGT" * 20_000), (b"b\0c", b"ACGT")])
    with pytest.raises(GenomeError) as e:
        open_genome(write_fasta(tmp_path / "g.fa", data))
    assert "control characters" in one_line(e)


def test_unusual_names_are_allowed(tmp_path):
    names = ["chr1:100-200", "HLA-A*01:01:01:01", "a/b", "x|y=z", "ünïcode", "chrUn_KI270302v1", "1", "..", "#a"]
    path = write_fasta(tmp_path / "g.fa", fasta_bytes([(n.encode() + b" d", b"ACGTA" * 3) for n in names]))
    genome = open_genome(path)
    assert [c for c, _ in genome.contigs] == names
    assert all(genome.fetch(n, 1, 4) == b"CGT" for n in names)


@pytest.mark.parametrize(
    "data",
    [
        b">a\r\nACGT\r\nAC\r\n>b\r\nA\r\n",  # CRLF
        b">a\nACGTAC\n>b\nA",  # unwrapped, no final newline
        b"\n\n>a\nACGT\nAC\n\n\n>b\nA\n\n",  # blank lines before a header or at the end
    ],
)
def test_accepted_layouts(tmp_path, data):
    genome = open_genome(write_fasta(tmp_path / "g.fa", data))
    assert genome.contigs == [("a", 6), ("b", 1)]
    assert genome.fetch("a", -1, 7) == b"NACGTACN"


def test_fetch_pads_with_n_past_both_ends(tmp_path):
    genome = open_genome(write_fasta(tmp_path / "g.fa", fasta_bytes([(b"c", b"ACGTacgtRY")], width=4)))
    assert genome.fetch("c", -3, 2) == b"NNNAC"
    assert genome.fetch("c", 8, 14) == b"RYNNNN"
    assert genome.fetch("c", -2, 12) == b"NNACGTacgtRYNN"
    assert genome.fetch("c", -5, -1) == b"NNNN"
    assert genome.fetch("c", 10, 13) == b"NNN"
    assert genome.fetch("c", 4, 4) == b""
    with pytest.raises(ValueError):
        genome.fetch("c", 5, 4)
    with pytest.raises(GenomeError) as e:
        genome.fetch("chrZ", 0, 4)
    assert "chrZ" in one_line(e)


def test_fetch_refuses_a_stale_index(tmp_path):
    path = write_fasta(tmp_path / "g.fa", b">a\nACGTACGT\nACGT\n")
    open_genome(path).close()
    path.write_bytes(b">a\nACGT ACG\nACGT\n")  # same size, so htslib reads the space as a base
    genome = open_genome(path)
    with pytest.raises(GenomeError) as e:
        genome.fetch("a", 0, 12)
    assert "does not match its index" in one_line(e)


def test_genome_pickles_by_reopening(tmp_path):
    path = write_fasta(tmp_path / "g.fa", fasta_bytes(RECORDS))
    copy = pickle.loads(pickle.dumps(open_genome(path)))
    assert copy.contigs == [("chr1", 10_007), ("chrM", 165)] and copy.fetch("chrM", -1, 2) == b"NAC"


def test_one_hot():
    assert one_hot(b"ACGT").tolist() == np.eye(4).tolist()
    assert one_hot(b"acgt").tolist() == np.eye(4).tolist()
    assert not one_hot(b"NnRYSWKMBDHVryswkmbdhv-.*X\0\xff").any()
    repeat = one_hot(b"CA" * 50)
    assert repeat.dtype == np.float32 and repeat.shape == (100, 4)
    assert repeat[0::2, 1].all() and repeat[1::2, 0].all() and repeat.sum() == 100
    assert one_hot(b"").shape == (0, 4)


def test_is_all_n():
    assert is_all_n(b"N" * 1000) and is_all_n(b"nNRY-") and is_all_n(b"")
    assert not is_all_n(b"N" * 1000 + b"a") and not is_all_n(b"NNTNN")


def test_contig_filter():
    contigs = [("chr1", 10), ("chr2", 20), ("chrX", 5)]
    assert contig_filter(contigs, "chrX,chr1") == [("chr1", 10), ("chrX", 5)]
    assert contig_filter(contigs, ["chr2", " chr2 "]) == [("chr2", 20)]
    with pytest.raises(GenomeError) as e:
        contig_filter(contigs, "chr1,1,chrY")
    message = one_line(e)
    assert "'1', 'chrY'" in message and "chr1, chr2, chrX" in message
    with pytest.raises(GenomeError):
        contig_filter(contigs, ",")


def test_demo_genome():
    genome = open_genome(demo_genome_path())
    assert len(genome.contigs) == 4 and 2_500_000 < sum(n for _, n in genome.contigs) < 3_500_000
    sequences = {chrom: genome.fetch(chrom, 0, length) for chrom, length in genome.contigs}
    assert sequences["chr2"].startswith(b"N" * 1000)
    assert any(b"acgt"[i : i + 1] in seq for seq in sequences.values() for i in range(4))  # soft-masked
    bases = b"".join(sequences.values()).upper()
    gc = (bases.count(b"G") + bases.count(b"C")) / sum(bases.count(b) for b in (b"A", b"C", b"G", b"T"))
    assert 0.38 < gc < 0.44
    all_n = [
        w for w in plan_windows(genome.contigs, 131072, 16384) if is_all_n(sequences[w.chrom][w.out_start : w.out_end])
    ]
    assert sum(w.chrom == "chr1" for w in all_n) >= 2  # inside the 350 kb gap
    assert sum(Path(f"{demo_genome_path()}{suffix}").stat().st_size for suffix in ("", ".fai", ".gzi")) < 1_500_000


def test_demo_genome_validates_when_indexed_afresh(tmp_path):
    copy = tmp_path / "demo.fa.gz"
    copy.write_bytes(demo_genome_path().read_bytes())
    assert open_genome(copy).contigs == open_genome(demo_genome_path()).contigs


# Fuzzing: mostly well-formed FASTA with a few corruptions, and raw bytes. open_genome must either
# raise a one-line GenomeError or read exactly what a simple reference parser reads.

NAME_TEXT = st.text(st.sampled_from("abcXYZ019:|*/_.-=é"), min_size=1, max_size=6).map(str.encode)


@st.composite
def messy_fasta(draw):
    names = draw(st.lists(NAME_TEXT, min_size=1, max_size=4))
    seqs = [draw(st.text(st.sampled_from("ACGTNacgtnRY*-"), min_size=1, max_size=40)).encode() for _ in names]
    headers = [draw(st.sampled_from([b"", b"", b" ", b"\t"])) + n + draw(st.sampled_from([b"", b" d e", b"\tx"])) for n in names]
    newline = draw(st.sampled_from([b"\n", b"\r\n"]))
    data = bytearray(fasta_bytes(zip(headers, seqs), width=draw(st.integers(1, 12)), newline=newline))
    for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):
        at = draw(st.integers(0, len(data)))
        change = draw(st.sampled_from(["insert", "delete", "line", "space"]))
        if change == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=3))
        elif change == "delete":
            del data[at : at + draw(st.integers(1, 3))]
        elif change == "line":
            data[at:at] = draw(st.sampled_from([newline, b">" + newline, b">x" + newline]))
        else:
            data[at:at] = draw(st.sampled_from([b" ", b"\t", b"\r", b"\x0b"]))
    if draw(st.booleans()):
        data = data.rstrip(b"\r\n")
    return bytes(data)


def reference_parse(data: bytes) -> list[tuple[bytes, bytes]]:
    records = []
    for line in data.split(b"\n"):
        if line.startswith(b">"):
            words = line[1:].split()
            records.append((words[0] if words else b"", bytearray()))
        elif records:
            records[-1][1].extend(b for b in line if 0x21 <= b < 0x7F)
    return [(name, bytes(seq)) for name, seq in records]


def check_against_reference(data: bytes, compress: bool, draw_span) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = write_fasta(Path(folder) / "g.fa", data, compress)
        try:
            genome = open_genome(path)
        except GenomeError as e:
            assert len(str(e).splitlines()) == 1, str(e)
            assert set(os.listdir(folder)) == {"g.fa"}
            return
        expected = reference_parse(data)
        assert genome.contigs == [(name.decode(), len(seq)) for name, seq in expected]
        for name, seq in expected:
            assert genome.fetch(name.decode(), 0, len(seq)) == seq
            start, end = draw_span(len(seq))
            padded = bytes(seq[i] if 0 <= i < len(seq) else ord("N") for i in range(start, end))
            assert genome.fetch(name.decode(), start, end) == padded
        expected_contigs = [(name.decode(), len(seq)) for name, seq in expected]
        assert list(plan_windows(genome.contigs, 2048, 128)) == list(plan_windows(expected_contigs, 2048, 128))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messy_fasta(), st.booleans(), st.data())
def test_fuzz_messy_fasta(data, compress, positions):
    def draw_span(n):
        start = positions.draw(st.integers(-20, n + 20))
        return start, start + positions.draw(st.integers(0, n + 40))

    check_against_reference(data, compress, draw_span)


@settings(max_examples=80, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.binary(max_size=40).map(lambda b: b">" + b)), st.booleans())
def test_fuzz_random_bytes(data, compress):
    check_against_reference(data, compress, lambda n: (-1, n + 1))
