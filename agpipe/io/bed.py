"""Reading a --regions BED file into the sorted, merged intervals the window plan filters by.

Only the first three columns count (0-based, half-open, as BED is); fields may be separated by tabs
or spaces and further columns are ignored. Blank lines, '#' comments, 'track' and 'browser' lines
are skipped, and so is a header line ("chrom start end") when it is the first line with fields.
Zero-length intervals select no bases and are ignored; intervals reaching past a contig's end are
clipped to it. Anything else that is not a valid interval on a genome contig is a one-line
ValueError naming the file and line.
"""

from __future__ import annotations

import gzip
import os
import re
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path

WHOLE_NUMBER = re.compile(r"-?[0-9]+")
UNKNOWN_SHOWN = 5


def read_regions(
    path: str | os.PathLike[str], contigs: Mapping[str, int] | Iterable[tuple[str, int]]
) -> dict[str, list[tuple[int, int]]]:
    """The BED's intervals per contig, sorted, merged (overlapping or touching) and clipped."""
    path = Path(path)
    lengths = dict(contigs)
    intervals: dict[str, list[tuple[int, int]]] = {}
    unknown: dict[str, int] = {}  # contig name -> first line naming it
    header_allowed = True
    for number, line in enumerate(read_lines(path), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#") or fields[0] in ("track", "browser"):
            continue
        where = f"{path} line {number}"
        if len(fields) < 3:
            raise ValueError(f"{where}: expected at least 3 fields (chrom, start, end), found {len(fields)}")
        chrom, start_text, end_text = fields[:3]
        numeric = [bool(WHOLE_NUMBER.fullmatch(t)) for t in (start_text, end_text)]
        if header_allowed and not any(numeric):
            header_allowed = False
            continue
        header_allowed = False
        if not all(numeric):
            raise ValueError(f"{where}: start and end must be whole numbers, found {start_text!r} and {end_text!r}")
        start, end = int(start_text), int(end_text)
        if start < 0 or end < 0:
            raise ValueError(f"{where}: negative coordinate ({start} {end}); BED coordinates start at 0")
        if end < start:
            raise ValueError(f"{where}: end {end} is before start {start}")
        if chrom not in lengths:
            unknown.setdefault(chrom, number)
            continue
        if end == start:
            continue
        if start >= lengths[chrom]:
            raise ValueError(f"{where}: start {start} is beyond the end of {chrom!r} (length {lengths[chrom]})")
        intervals.setdefault(chrom, []).append((start, min(end, lengths[chrom])))
    if unknown:
        shown = ", ".join(f"{name!r} (line {line})" for name, line in list(unknown.items())[:UNKNOWN_SHOWN])
        more = f" and {len(unknown) - UNKNOWN_SHOWN} more" if len(unknown) > UNKNOWN_SHOWN else ""
        raise ValueError(
            f"{path} names contigs that are not in the genome: {shown}{more}; "
            "check that the BED is for this genome build and uses its contig names (e.g. 'chr1' vs '1')"
        )
    if not intervals:
        raise ValueError(f"{path} selects nothing: it has no interval of one base or more")
    return {chrom: merged(spans) for chrom, spans in intervals.items()}


def read_lines(path: Path) -> list[str]:
    try:
        data = path.read_bytes()
        if data.startswith(b"\x1f\x8b"):  # .bed.gz, plain gzip or bgzip
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"cannot read regions BED {path}: {getattr(e, 'strerror', None) or e}") from None
    lines = []
    for number, raw in enumerate(data.splitlines(), 1):
        try:
            lines.append(raw.decode())
        except UnicodeDecodeError:
            raise ValueError(f"{path} line {number} is not UTF-8 text: is this a BED file?") from None
    return lines


def merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out
