"""Writes agpipe/data/demo_genome.fa.gz (+ .fai, .gzi): a small synthetic genome for demos and tests.

Deterministic (seeded). Four contigs, 3 Mb in all, with roughly human composition: GC near 41% that
varies along the contigs, CpG depletion except in a few CpG islands, diverged copies of an Alu-like
and an L1-like element and microsatellites (all soft-masked, lowercase), a few IUPAC codes, and N
runs: chr2 starts with 60 kb of N, chr3 ends with 20 kb of N, chr1 has a 350 kb gap (whole windows
of N at the default window sizes) and every contig has a few short gaps.

    python scripts/make_demo_genome.py [--out agpipe/data/demo_genome.fa.gz]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import pysam

SEED = 20250611
LINE = 60
CONTIGS = [("chr1", 1_200_000), ("chr2", 900_000), ("chr3", 600_000), ("chr4", 300_000)]
BIG_N_RUNS = {"chr1": [(500_000, 850_000)], "chr2": [(0, 60_000)], "chr3": [(580_000, 600_000)]}
MICROSATELLITE_UNITS = ["A", "CA", "AT", "GATA", "GGAA", "CAG", "AAAT", "TTAGGG", "TG"]
COMPLEMENT = np.frombuffer(bytes.maketrans(b"ACGTacgt", b"TGCAtgca"), np.uint8)


def random_bases(rng: np.random.Generator, n: int, gc: float) -> np.ndarray:
    p_gc, p_at = gc / 2, (1 - gc) / 2
    return np.frombuffer(b"ACGT", np.uint8)[rng.choice(4, n, p=[p_at, p_gc, p_gc, p_at])]


def deplete_cpg(rng: np.random.Generator, seq: np.ndarray, keep: float) -> None:
    """Mutates most CG to TG or CA in place, as methylated-cytosine deamination did in real genomes."""
    cg = np.flatnonzero((seq[:-1] == ord("C")) & (seq[1:] == ord("G")))
    cg = cg[rng.random(cg.size) > keep]
    to_tg = rng.random(cg.size) < 0.5
    seq[cg[to_tg]] = ord("T")
    seq[cg[~to_tg] + 1] = ord("A")


def diverged_copy(rng: np.random.Generator, consensus: np.ndarray, divergence: float) -> np.ndarray:
    copy = consensus.copy()
    hit = rng.random(copy.size) < divergence
    copy[hit] = random_bases(rng, int(hit.sum()), 0.41)
    deplete_cpg(rng, copy, keep=0.3)  # old copies lost CpGs too
    return COMPLEMENT[copy] if rng.random() < 0.5 else copy


def soft_masked(seq: np.ndarray) -> np.ndarray:
    return seq | 0x20  # ASCII letters: setting bit 5 lowercases


def make_contig(rng: np.random.Generator, name: str, length: int, alu: np.ndarray, l1: np.ndarray) -> bytes:
    # Isochores: GC drifts between 100 kb blocks.
    blocks = [random_bases(rng, min(100_000, length - at), rng.uniform(0.41, 0.50)) for at in range(0, length, 100_000)]
    seq = np.concatenate(blocks)
    deplete_cpg(rng, seq, keep=0.15)
    for at in rng.integers(0, length - 1_000, length // 150_000 + 1):  # CpG islands keep their CpGs
        seq[at : at + 1_000] = random_bases(rng, 1_000, 0.65)
    # Repeats overwrite the background (lengths stay fixed) and are soft-masked, as RepeatMasker does.
    for at in rng.integers(0, length - alu.size, length // 2_000):
        seq[at : at + alu.size] = soft_masked(diverged_copy(rng, alu, rng.uniform(0.04, 0.18)))
    for at in rng.integers(0, length - l1.size, length // 25_000):
        fragment = l1[-rng.integers(400, l1.size) :]  # L1 copies are mostly 5'-truncated
        seq[at : at + fragment.size] = soft_masked(diverged_copy(rng, fragment, rng.uniform(0.08, 0.25)))
    for at in rng.integers(0, length - 100, length // 4_000):
        unit = MICROSATELLITE_UNITS[rng.integers(len(MICROSATELLITE_UNITS))].encode()
        run = np.frombuffer(unit * (rng.integers(20, 90) // len(unit) + 1), np.uint8).copy()
        slips = rng.random(run.size) < 0.03
        run[slips] = random_bases(rng, int(slips.sum()), 0.41)
        seq[at : at + run.size] = soft_masked(run)
    seq[rng.integers(0, length, 6)] = np.frombuffer(b"RYKMSW", np.uint8)  # references carry a few IUPAC codes
    for at in rng.integers(0, length - 5_000, 3):  # short assembly gaps
        seq[at : at + rng.integers(50, 5_000)] = ord("N")
    for start, end in BIG_N_RUNS.get(name, []):
        seq[start:end] = ord("N")
    return seq.tobytes()


def write_demo_genome(out: Path) -> None:
    rng = np.random.default_rng(SEED)
    alu = random_bases(rng, 280, 0.53)
    alu[-30:] = ord("A")  # Alu elements end in a poly-A tail
    l1 = random_bases(rng, 6_000, 0.42)
    fd, plain = tempfile.mkstemp(suffix=".fa")
    try:
        with os.fdopen(fd, "wb") as f:
            for name, length in CONTIGS:
                seq = make_contig(rng, name, length, alu, l1)
                f.write(f">{name} synthetic demo contig\n".encode())
                f.writelines(seq[i : i + LINE] + b"\n" for i in range(0, length, LINE))
        for stale in (f"{out}.fai", f"{out}.gzi"):
            if os.path.exists(stale):
                os.remove(stale)
        pysam.tabix_compress(plain, str(out), force=True)
        pysam.faidx(str(out))  # writes .fai and .gzi beside it
    finally:
        os.remove(plain)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "agpipe" / "data" / "demo_genome.fa.gz")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_demo_genome(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
