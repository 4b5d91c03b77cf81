"""A small but realistic run folder, written with agpipe.io.parquet the way `agpipe run` writes one.

Four contigs, hostile names among them (a path-like name with a space, an HLA allele with ':' and
'*'), lengths that are not multiples of 128 (every contig's last 128 bp bin is clipped), 8 kb
windows with 1 kb crops, one all-N window skipped, tracks heads at 1 and 128 bp (stranded RNA-seq
tracks whose columns carry a strand suffix, a padding channel left out), a 128 bp-only head,
junctions and contact maps, and a NaN and an infinity among the predictions. Row groups hold 1024
rows, so a 1 bp part has several and row-group pruning can be seen.

Values are a smooth positive signal of the genome position (peaks every few kb), different per
track, so plots look like tracks and every bin's value is known.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agpipe.io import parquet
from agpipe.io.parquet import (
    CONTACT_MAPS,
    JUNCTIONS,
    Junctions,
    TrackRow,
    WindowRecord,
    track_columns,
    write_json_atomic,
    write_tracks_table,
    write_window,
    write_windows_table,
)
from agpipe.jobs.plan import plan_windows
from agpipe.model.config import Output

CONTIGS = [("chr1", 50_000), ("chr2", 20_000), ("chr 1/../x", 9_000), ("HLA-A*01:01:01:01", 3_000)]
WINDOW, CROP = 8192, 1024
ALL_N_WINDOWS = {("chr2", 6144)}  # (contig, out_start) of windows whose kept span is all N
OUTPUTS = [Output("atac", 1), Output("atac", 128), Output("rna_seq", 1), Output("rna_seq", 128), Output("chip_histone", 128)]
NAN_AT = ("chr1", 20_000)  # atac track 0 is NaN at this base (1 bp) and infinite in its 128 bp bin

# (track_index, name, strand, assay, biosample, ontology_curie) per head; index 2 of atac is padding.
TRACKS = {
    "atac": [
        (0, "CL:0000084 ATAC-seq", ".", "ATAC-seq", "T-cell", "CL:0000084"),
        (1, "EFO:0002067 ATAC-seq", ".", "ATAC-seq", "K562", "EFO:0002067"),
        (3, "UBERON:0002107 ATAC-seq", ".", "ATAC-seq", "liver", "UBERON:0002107"),
    ],
    "rna_seq": [
        (0, "EFO:0002067 polyA plus RNA-seq", "+", "polyA plus RNA-seq", "K562", "EFO:0002067"),
        (1, "EFO:0002067 polyA plus RNA-seq", "-", "polyA plus RNA-seq", "K562", "EFO:0002067"),
        (2, "UBERON:0002107 total RNA-seq", ".", "total RNA-seq", "liver", "UBERON:0002107"),
    ],
    "chip_histone": [
        (0, "EFO:0002067 H3K27ac ChIP-seq", ".", "Histone ChIP-seq", "K562", "EFO:0002067"),
        (1, "CL:0000084 H3K4me3 ChIP-seq", ".", "Histone ChIP-seq", "T-cell", "CL:0000084"),
    ],
    "contact_maps": [(0, "HFF", ".", "Micro-C", "HFF", "CL:0002551"), (1, "H1", ".", "Micro-C", "H1", "EFO:0003042")],
    "splice_sites_junction": [(0, "Liver", None, None, "liver", "UBERON:0002107"), (1, "Brain", None, None, "brain", "UBERON:0000955")],
}
HEAD_OUTPUTS = {
    "atac": [Output("atac", 1), Output("atac", 128)],
    "rna_seq": [Output("rna_seq", 1), Output("rna_seq", 128)],
    "chip_histone": [Output("chip_histone", 128)],
    "contact_maps": [CONTACT_MAPS],
    "splice_sites_junction": [JUNCTIONS],
}


def columns() -> dict[Output, list[str]]:
    names = {h: track_columns([t[1] for t in rows], [t[2] for t in rows]) for h, rows in TRACKS.items()}
    return {o: names[h] for h, outputs in HEAD_OUTPUTS.items() for o in outputs}


def signal(head: str, track: int, chrom: str, positions: np.ndarray) -> np.ndarray:
    """A track's value at genome positions: peaks of varying height every few kb, never negative."""
    phase = 0.7 * track + 1.3 * list(TRACKS).index(head) + 0.5 * [c for c, _ in CONTIGS].index(chrom)
    x = positions / (1500.0 + 250.0 * track)
    return ((1 + track) * np.exp(3.0 * np.sin(x + phase) * np.cos(0.37 * x) - 1.0)).astype(np.float32)


def predictions(chrom: str, start: int, end: int, output: Output) -> np.ndarray:
    """(bins, tracks) values over an input span; position = bin centre, so 1 and 128 bp agree."""
    r = output.resolution
    centres = start + r * np.arange((end - start) // r) + r / 2
    values = np.stack([signal(output.head, i, chrom, centres) for i in range(len(TRACKS[output.head]))], axis=1)
    if output.head == "atac" and chrom == NAN_AT[0]:
        row = (NAN_AT[1] - start) // r
        if 0 <= row < len(values):
            values[row, 0] = np.nan if r == 1 else np.inf
    return values


def junctions(rng: np.random.Generator, window_length: int) -> Junctions:
    positions = rng.integers(0, window_length, size=(4, 6))
    positions[:, -1] = -1  # the model pads with -1
    counts = rng.gamma(1.0, 2.0, size=(6, 6, 2, len(TRACKS["splice_sites_junction"]))).astype(np.float32)
    return Junctions(positions, counts)


def contact_maps(rng: np.random.Generator, window_length: int) -> np.ndarray:
    p = window_length // CONTACT_MAPS.resolution
    maps = rng.normal(size=(p, p, len(TRACKS["contact_maps"]))).astype(np.float32)
    return (maps + maps.transpose(1, 0, 2)) / 2


def build_run(out: Path) -> None:
    """Writes the whole run folder at `out`."""
    rng = np.random.default_rng(7)
    lengths = dict(CONTIGS)
    cols = columns()
    records = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(parquet, "ROW_GROUP_BYTES", 1)  # the minimum: 1024-row groups
        for w in plan_windows(CONTIGS, WINDOW, CROP):
            if (w.chrom, w.out_start) in ALL_N_WINDOWS:
                records.append(WindowRecord(w.window_id, w.chrom, w.start, w.end, w.out_start, w.out_end, "skipped_all_n", 0, 0.0))
                continue
            outputs = {o: predictions(w.chrom, w.start, w.end, o) for o in OUTPUTS}
            parts = write_window(
                out, w, lengths[w.chrom], outputs, cols,
                junctions=junctions(rng, w.end - w.start), contact_maps=contact_maps(rng, w.end - w.start),
            )
            nonfinite = sum(
                int(np.sum(~np.isfinite(v[(w.out_start <= s) & (s < w.out_end)])))
                for o, v in outputs.items()
                for s in [w.start + o.resolution * np.arange(len(v))]
            )
            records.append(WindowRecord(w.window_id, w.chrom, w.start, w.end, w.out_start, w.out_end, "done", nonfinite, 0.5, tuple(parts)))
    write_windows_table(out, records)
    write_tracks_table(
        out,
        [
            TrackRow(o.head, o.resolution, "human", index, column, name, strand, assay, biosample, curie, 1.0)
            for head, rows in TRACKS.items()
            for o in HEAD_OUTPUTS[head]
            for (index, name, strand, assay, biosample, curie), column in zip(rows, cols[o])
        ],
    )
    statuses = [r.status for r in records]
    write_json_atomic(
        out / parquet.MANIFEST_FILE,
        {
            "schema_version": parquet.SCHEMA_VERSION,
            "agpipe_version": "0.1.0",
            "status": "complete",
            "run": {"organism": "human", "window": WINDOW, "crop": CROP, "outputs": [str(o) for o in OUTPUTS], "dtype": "float32"},
            "genome": {"fasta": "genome.fa", "contigs": [[name, length] for name, length in CONTIGS]},
            "windows": {s: statuses.count(s) for s in parquet.STATUSES},
        },
    )
