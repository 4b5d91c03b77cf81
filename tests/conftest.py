"""Shared fixtures: a private AGPIPE_HOME, one Ray instance for the session, a small test genome."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import ray

# A small genome of awkward shape: lengths that are multiples of nothing, soft-masked (lowercase)
# stretches, IUPAC codes, N runs, a contig shorter than one window and one whose name needs
# encoding as a folder name. With 8192 bp windows and crop 1024 (kept spans of 6144), chr1's N run
# covers the whole kept span [12288, 18432), so that window is skipped.
SMALL_GENOME = {"chr1": 40_001, "chr2": 25_037, "odd:name/1": 3_001, "chrM": 1_234}
N_RUNS = {"chr1": [(11_000, 20_000), (39_000, 39_500)], "chr2": [(0, 700)]}
WINDOW, CROP = 8192, 1024


@ray.remote(num_cpus=0)
def echo(item):
    return item


class EchoIo:
    """A stand-in for a run's IoPool (agpipe.jobs.stream): a window reads as itself, a prediction
    writes as itself."""

    def read(self, window):
        return ray.put(window)

    def write(self, prediction):
        return echo.remote(prediction)

    def written(self, ref):
        pass


def random_sequence(rng: np.random.Generator, length: int, n_runs: list[tuple[int, int]]) -> bytes:
    seq = np.frombuffer(b"ACGT", np.uint8)[rng.integers(0, 4, length)].copy()
    for start in range(0, length, 2500):  # soft-masked repeats
        seq[start : start + 300] += ord("a") - ord("A")
    seq[rng.integers(0, length, 20)] = np.frombuffer(b"RYKMSWN", np.uint8)[rng.integers(0, 7, 20)]
    for start, end in n_runs:
        seq[start:end] = ord("N")
    return seq.tobytes()


def write_fasta(path: Path, records: dict[str, bytes], line: int = 60) -> Path:
    with open(path, "wb") as f:
        for name, seq in records.items():
            f.write(b">" + name.encode() + b" test contig\n")
            for i in range(0, len(seq), line):
                f.write(seq[i : i + line] + b"\n")
    return path


@pytest.fixture(scope="session", autouse=True)
def agpipe_home(tmp_path_factory: pytest.TempPathFactory):
    """Weights and metadata caches go to a temporary folder, never ~/.cache (set before Ray starts,
    so its workers see it too)."""
    home = tmp_path_factory.mktemp("agpipe-home")
    previous = os.environ.get("AGPIPE_HOME")
    os.environ["AGPIPE_HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("AGPIPE_HOME", None)
    else:
        os.environ["AGPIPE_HOME"] = previous


@pytest.fixture(scope="session")
def ray_address(agpipe_home) -> str:
    """One local Ray instance for the session; tests pass its address to the job."""
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def small_genome(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(7)
    records = {name: random_sequence(rng, length, N_RUNS.get(name, [])) for name, length in SMALL_GENOME.items()}
    return write_fasta(tmp_path_factory.mktemp("genome") / "small.fa", records)


# ---------------------------------------------------------------- fault figures (docs/reliability.md)

FAULT_LEDGER: list[dict] = []


@pytest.fixture
def fault_ledger(request):
    """record(fault, injected, audit): one line of the faults table printed at the end of the session
    (and written as JSON to $AGPIPE_FAULT_LEDGER if set); `audit` is a tests/run_audit.py Audit."""

    def record(fault: str, injected: int, audit) -> None:
        FAULT_LEDGER.append(
            {
                "test": request.node.name,
                "fault": fault,
                "injected": injected,
                "windows": audit.planned,
                "windows_lost": audit.windows_lost,
                "windows_duplicated": audit.windows_duplicated,
                "problems": audit.problems(),
            }
        )

    return record


def pytest_terminal_summary(terminalreporter) -> None:
    if not FAULT_LEDGER:
        return
    import json

    write = terminalreporter.write_line
    terminalreporter.section("faults injected")
    for row in FAULT_LEDGER:
        write(f"{row['fault']:<58} injected {row['injected']}  windows {row['windows']:>3}  lost {row['windows_lost']}  duplicated {row['windows_duplicated']}")
    total = {k: sum(r[k] for r in FAULT_LEDGER) for k in ("injected", "windows_lost", "windows_duplicated")}
    write(f"total: {total['injected']} faults injected, {total['windows_lost']} windows lost, {total['windows_duplicated']} windows duplicated")
    if path := os.environ.get("AGPIPE_FAULT_LEDGER"):
        Path(path).write_text(json.dumps({"faults": FAULT_LEDGER, "total": total}, indent=2) + "\n")
