"""The genome input: FASTA (plain or bgzip) through pysam, N-padded fetches, one-hot encoding.

Every problem with the input is a GenomeError whose message is one line naming the problem and what
to do about it.

The first open of a FASTA builds its index (.fai, plus .gzi for bgzip) and validates the whole file
while doing so, because htslib on its own silently drops duplicate and empty records and misplaces
bases on lines with inner spaces: wrong predictions instead of an error. An index that already
exists is trusted (delete it to have the file checked again); fetch still refuses bytes that cannot
be sequence or a length that disagrees with the index.

Contig names end at the first whitespace of the header line. They are stored in Parquet and, after
encoding by the output writer, in partition folder names, so the only names rejected here are those
that are empty, not UTF-8 or that contain control characters (NUL included); ':', '/', '*', '|',
'=' and any other printable character are allowed.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
import unicodedata
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pysam


class GenomeError(ValueError):
    """A problem with the genome input; the message is one line saying what is wrong and what to do."""


SNIFF_BYTES = 1 << 16
SCAN_CHUNK_BYTES = 1 << 23
REWRAP_HINT = "rewrap it to one line length, e.g. `seqkit seq -w 60`"
# htslib counts printable ASCII other than space as bases; the scan maps those to 'g', keeps line
# endings and maps every other byte (space, tab, control, non-ASCII) to ' '.
BYTE_CLASS = bytes(ord("g") if 0x21 <= b < 0x7F else b if b in b"\n\r" else ord(" ") for b in range(256))
SEQUENCE_BYTES = bytes(range(0x21, 0x7F))
STRAY_CR = re.compile(rb"\r(?!\n)")


def demo_genome_path() -> Path:
    """The small synthetic genome bundled with agpipe (bgzip, indexed)."""
    return Path(__file__).resolve().parent.parent / "data" / "demo_genome.fa.gz"


class Genome:
    """An open, validated FASTA: contigs in file order and N-padded fetches."""

    def __init__(self, path: Path, fasta: pysam.FastaFile, contigs: list[tuple[str, int]]) -> None:
        self.path = path
        self.contigs = contigs
        self._lengths = dict(contigs)
        self._fasta = fasta

    def fetch(self, chrom: str, start: int, end: int) -> bytes:
        """Exactly end - start bases of chrom[start:end], as in the file (soft-masking kept); positions
        before 0 or at/after the contig end are 'N', since windows reach past contig ends."""
        length = self._lengths.get(chrom)
        if length is None:
            raise GenomeError(f"contig {chrom!r} is not in {self.path}")
        if end < start:
            raise ValueError(f"fetch of {chrom}:{start}-{end}: end is before start")
        lo, hi = max(start, 0), min(end, length)
        if lo >= hi:
            return b"N" * (end - start)
        return b"N" * (lo - start) + self._read(chrom, lo, hi) + b"N" * (end - hi)

    def _read(self, chrom: str, lo: int, hi: int) -> bytes:
        try:
            seq = self._fasta.fetch(chrom, lo, hi).encode("ascii")
        except UnicodeError:  # non-ASCII bytes inside the sequence
            seq = b""
        except OSError as e:
            raise GenomeError(f"cannot read {chrom}:{lo}-{hi} from {self.path}: {e}") from None
        # htslib returns the raw bytes at offsets computed from the index, so a stale or foreign
        # index shows up as spaces, control bytes or a short read.
        if len(seq) != hi - lo or (not seq.isalpha() and seq.translate(None, SEQUENCE_BYTES)):
            raise GenomeError(
                f"{self.path} does not match its index at {chrom}:{lo}-{hi}: "
                f"delete {self.path}.fai (and .gzi) so the file is checked and indexed again"
            )
        return seq

    def close(self) -> None:
        self._fasta.close()

    def __enter__(self) -> Genome:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple:
        # pysam handles cannot be pickled; a worker that receives a Genome opens the file itself.
        return open_genome, (self.path,)


def open_genome(path: str | os.PathLike[str]) -> Genome:
    """Opens a plain or bgzip FASTA, building and validating its index on first use."""
    path = Path(path)
    compressed = check_fasta_file(path)
    fai = Path(f"{path}.fai")
    gzi = Path(f"{path}.gzi") if compressed else None
    if not fai.exists() or (gzi is not None and not gzi.exists()):
        build_index(path, compressed, fai, gzi)
    contigs = read_fai(fai)
    try:
        fasta = pysam.FastaFile(str(path), filepath_index=str(fai), filepath_index_compressed=str(gzi) if gzi else None)
    except (OSError, ValueError) as e:
        raise GenomeError(f"pysam cannot open {path} with its index: {e}; delete {fai.name} so it is rebuilt") from None
    return Genome(path, fasta, contigs)


def check_fasta_file(path: Path) -> bool:
    """Cheap checks of the file itself and its first bytes; returns whether it is bgzip-compressed."""
    if not path.exists():
        raise GenomeError(f"genome FASTA {path} does not exist")
    if path.is_dir():
        raise GenomeError(f"genome FASTA {path} is a directory: pass the FASTA file itself")
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
    except OSError as e:
        raise GenomeError(f"cannot read genome FASTA {path}: {e.strerror}") from None
    compressed = head.startswith(b"\x1f\x8b")
    if compressed:
        if not is_bgzf(head):
            raise GenomeError(
                f"{path} is gzip- but not bgzip-compressed, so it cannot be read at random positions: "
                f"recompress it with bgzip (`gunzip -c {path.name} | bgzip > {path.stem}.bgz.gz`)"
            )
        try:
            with pysam.BGZFile(str(path), "rb") as f:
                head = f.read(SNIFF_BYTES)
        except OSError:
            raise GenomeError(f"cannot decompress {path}: it is truncated or corrupt (htslib's message is above)") from None
    if b"\0" in head:
        raise GenomeError(f"{path} is binary, not a FASTA text file")
    first = head.lstrip(b"\r\n")[:1]
    if not first:
        raise GenomeError(f"genome FASTA {path} is empty: it has no sequences")
    if first != b">":
        hint = " (it looks like FASTQ)" if first == b"@" else ""
        raise GenomeError(f"{path} is not FASTA{hint}: it must start with a '>' header line")
    return compressed


def is_bgzf(head: bytes) -> bool:
    """Whether gzip data starts with a BGZF block: gzip with the 'BC' extra subfield bgzip writes."""
    if len(head) < 12 or not head[3] & 0x04:  # FEXTRA flag
        return False
    extra = head[12 : 12 + int.from_bytes(head[10:12], "little")]
    while len(extra) >= 4:
        if extra[:2] == b"BC":
            return True
        extra = extra[4 + int.from_bytes(extra[2:4], "little") :]
    return False


def build_index(path: Path, compressed: bool, fai: Path, gzi: Path | None) -> None:
    """Validates the whole FASTA, has htslib index it into temporary files beside it, checks that
    htslib read the same contigs, then renames the index into place: no half-written index remains."""
    folder = path.parent
    unwritable = GenomeError(
        f"{path} has no index and its folder is not writable: run `samtools faidx {path}` as someone "
        "who can write there, or copy the FASTA to a writable folder"
    )
    if not os.access(folder, os.W_OK):
        raise unwritable
    records = scan_fasta(path, compressed)
    temporary: list[str] = []
    try:
        try:
            for final in (fai, gzi) if gzi else (fai,):
                fd, name = tempfile.mkstemp(dir=folder, prefix=f".{final.name}.", suffix=".tmp")
                os.close(fd)
                temporary.append(name)
        except OSError:
            raise unwritable from None
        gzi_args = ["--gzi-idx", temporary[1]] if gzi else []
        try:
            pysam.faidx(str(path), "--fai-idx", temporary[0], *gzi_args)
        except pysam.SamtoolsError:
            raise GenomeError(f"htslib could not index {path} (its message is above): fix the file or report it") from None
        if read_fai(Path(temporary[0])) != [(r.name.decode(), r.length) for r in records]:
            raise GenomeError(f"htslib indexed {path} differently from agpipe's reading of it: please report this file")
        if gzi:
            os.replace(temporary[1], gzi)
        os.replace(temporary[0], fai)
    finally:
        for name in temporary:
            if os.path.exists(name):
                os.remove(name)


@dataclasses.dataclass
class Record:
    name: bytes
    line: int  # of its header, 1-based
    length: int = 0
    line_bytes: int = 0  # of its first sequence line, ending included: all lines but the last match it
    line_bases: int = 0
    ended: bool = False  # a shorter (so the last) line was seen: only blank lines may follow


def scan_fasta(path: Path, compressed: bool) -> list[Record]:
    """Reads the whole file once and checks what htslib needs but does not check itself: a header
    first, unique safe names, non-empty records, lines of one length holding only sequence bytes."""
    records: list[Record] = []
    lines_before = 0
    partial = b""
    try:
        for chunk in read_chunks(path, compressed):
            data = partial + chunk  # whole lines only, so no header or line is split
            cut = data.rfind(b"\n") + 1
            partial = data[cut:]
            lines_before = scan_lines(path, data[:cut], lines_before, records)
    except OSError as e:
        raise GenomeError(f"cannot read {path} ({e.strerror or 'htslib message above'}): is it truncated or corrupt?") from None
    if partial:  # no newline at the end of the file
        scan_lines(path, partial + b"\n", lines_before, records)
    check_contigs(str(path), [(r.name, r.length, r.line) for r in records], "line")
    return records


def read_chunks(path: Path, compressed: bool) -> Iterator[bytes]:
    with pysam.BGZFile(str(path), "rb") if compressed else open(path, "rb") as f:
        while chunk := f.read(SCAN_CHUNK_BYTES):
            yield chunk


def scan_lines(path: Path, data: bytes, lines_before: int, records: list[Record]) -> int:
    """Scans whole lines that follow `lines_before` lines of the file; returns the lines seen in all."""
    pos = 0
    while pos < len(data):
        if data.startswith(b">", pos):
            end = data.index(b"\n", pos) + 1
            header = data[pos + 1 : end].split()
            lines_before += 1
            records.append(Record(header[0] if header else b"", lines_before))
        else:
            end = data.find(b"\n>", pos) + 1 or len(data)
            scan_sequence(path, data[pos:end], lines_before, records)
            lines_before += data.count(b"\n", pos, end)
        pos = end
    return lines_before


def scan_sequence(path: Path, data: bytes, lines_before: int, records: list[Record]) -> None:
    """Checks whole sequence lines (no headers) and adds their bases to the last record."""
    classes = data.translate(BYTE_CLASS)
    if b" " in classes or (b"\r" in classes and STRAY_CR.search(classes)):
        bad = classes.find(b" ")
        bad = bad if bad >= 0 else STRAY_CR.search(classes).start()
        line = lines_before + data.count(b"\n", 0, bad) + 1
        raise GenomeError(f"{path} line {line}: a sequence line holds spaces, control or non-ASCII bytes; {REWRAP_HINT}")
    ends = np.flatnonzero(np.frombuffer(data, np.uint8) == ord("\n"))
    line_bytes = np.diff(ends, prepend=-1)
    bases = line_bytes - 1 - ((line_bytes > 1) & (np.frombuffer(classes, np.uint8)[ends - 1] == ord("\r")))
    if not records:
        if bases.any():
            raise GenomeError(f"{path} is not FASTA: it must start with a '>' header line")
        return
    record = records[-1]
    record.length += int(bases.sum())
    first = 0
    if record.line_bytes == 0:  # its first line, which sets the length of all but the last
        record.line_bytes, record.line_bases = int(line_bytes[0]), int(bases[0])
    if not record.ended:
        differs = np.flatnonzero((line_bytes != record.line_bytes) | (bases != record.line_bases))
        if not differs.size:
            return
        short = int(differs[0])
        if bases[short] >= record.line_bases:
            raise uneven_lines(path, record, lines_before + short + 1)
        record.ended = True
        first = short + 1
    after = np.flatnonzero(bases[first:])
    if after.size:
        raise uneven_lines(path, record, lines_before + first + int(after[0]) + 1)


def uneven_lines(path: Path, record: Record, line: int) -> GenomeError:
    return GenomeError(
        f"{path} line {line}: lines of contig {record.name.decode(errors='replace')!r} differ in length "
        f"(or a blank line splits it); {REWRAP_HINT}"
    )


def read_fai(fai: Path) -> list[tuple[str, int]]:
    """The contigs of a .fai index in file order, checked like the FASTA headers."""
    try:
        text = fai.read_bytes()
    except OSError as e:
        raise GenomeError(f"cannot read index {fai}: {e.strerror}") from None
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split(b"\t")
        if len(fields) < 5 or not all(f.isdigit() for f in fields[1:5]):
            raise GenomeError(f"index {fai} line {number} is malformed: delete it so it is rebuilt")
        entries.append((fields[0], int(fields[1]), number))
    check_contigs(str(fai), entries, "index line")
    return [(name.decode(), length) for name, length, _ in entries]


def check_contigs(source: str, entries: Sequence[tuple[bytes, int, int]], where: str) -> None:
    """Rejects a genome without bases and names we cannot store; entries are (name, length, line)."""
    if not any(length for _, length, _ in entries):
        raise GenomeError(f"{source} is empty: it has no sequences")
    first_line: dict[bytes, int] = {}
    for name, length, line in entries:
        if not name:
            raise GenomeError(f"{source} {where} {line}: the header has no contig name")
        try:
            text = name.decode()
        except UnicodeDecodeError:
            raise GenomeError(f"{source} {where} {line}: contig name {name!r} is not UTF-8 text") from None
        if any(unicodedata.category(c) == "Cc" for c in text):
            raise GenomeError(f"{source} {where} {line}: contig name {text!r} contains control characters")
        if name in first_line:
            raise GenomeError(
                f"{source}: contig name {text!r} appears twice ({where}s {first_line[name]} and {line}); names must be unique"
            )
        first_line[name] = line
        if not length:
            raise GenomeError(f"{source} {where} {line}: contig {text!r} has no sequence; remove the empty record")


ONE_HOT = np.zeros((256, 4), np.float32)  # a row per byte value
ONE_HOT[list(b"ACGT"), range(4)] = ONE_HOT[list(b"acgt"), range(4)] = 1


def one_hot(seq: bytes) -> np.ndarray:
    """(len(seq), 4) float32 in A, C, G, T order; soft-masked (lowercase) bases count as bases, N and
    every other byte (IUPAC codes included) is all zero."""
    return np.take(ONE_HOT, np.frombuffer(seq, np.uint8), axis=0)  # ~10x faster than ONE_HOT[index]


def is_all_n(seq: bytes) -> bool:
    """Whether seq has no A, C, G or T in either case: such a span needs no prediction."""
    return not any(base in seq for base in (b"A", b"C", b"G", b"T", b"a", b"c", b"g", b"t"))


def contig_filter(contigs: Sequence[tuple[str, int]], names: str | Iterable[str]) -> list[tuple[str, int]]:
    """The contigs chosen by --contigs (a comma-separated string or a list of names), in genome order."""
    wanted = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    if not wanted:
        raise GenomeError("--contigs names no contig: give a comma-separated list such as chr1,chr2")
    known = {name for name, _ in contigs}
    unknown = list(dict.fromkeys(n for n in wanted if n not in known))
    if unknown:
        examples = ", ".join(name for name, _ in contigs[:3]) + (", ..." if len(contigs) > 3 else "")
        raise GenomeError(
            f"--contigs names contigs not in the genome: {', '.join(map(repr, unknown))} (its contigs are {examples})"
        )
    chosen = set(wanted)
    return [(name, length) for name, length in contigs if name in chosen]
