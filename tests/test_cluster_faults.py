"""Faults on a real multi-node Ray cluster: a worker process killed, a worker node removed, the
driver killed and rerun. Each run must end complete with every window written exactly once.

The cluster (ray.cluster_utils.Cluster: a head node and two worker nodes) runs in a subprocess,
tests/fault_cluster.py, which owns its Ray and leaves the session's local Ray instance alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fault_cluster
from run_audit import assert_clean, audit
from agpipe.jobs.options import RunOptions

from conftest import random_sequence, write_fasta

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # about a minute: a three-node cluster, three runs, node-death detection
FAULTS = {
    "worker_process": "model worker process SIGKILLed (cluster)",
    "node": "worker node removed (cluster)",
    "driver": "driver SIGKILLed, command rerun (cluster)",
}


@pytest.fixture(scope="module")
def cluster_runs(tmp_path_factory, agpipe_home):
    """Runs every scenario once in one cluster; (genome, {scenario: result}, the harness's stderr)."""
    folder = tmp_path_factory.mktemp("cluster-faults")
    rng = np.random.default_rng(11)  # 35 windows of 8 kb, two all N
    genome = write_fasta(folder / "genome.fa", {"chrA": random_sequence(rng, 150_001, [(60_000, 75_000)]), "chrB": random_sequence(rng, 60_013, [])})
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    harness = subprocess.run(
        [sys.executable, str(REPO / "tests" / "fault_cluster.py"), str(genome), str(folder / "runs")],
        env=env, capture_output=True, text=True, timeout=420,
    )
    assert harness.returncode == 0, harness.stderr[-5000:]
    records = [json.loads(line) for line in harness.stdout.splitlines() if line.startswith("{")]  # Ray prints too
    results = {r["scenario"]: r for r in records if "scenario" in r}
    return genome, results, harness.stderr


@pytest.mark.parametrize("scenario", list(FAULTS))
def test_a_fault_on_a_cluster_loses_and_duplicates_no_window(cluster_runs, scenario, fault_ledger):
    genome, results, stderr = cluster_runs
    result = results[scenario]
    out = Path(result["out"])
    options = RunOptions(genome=genome, out=out, window=fault_cluster.WINDOW, crop=fault_cluster.CROP, model="demo", outputs=fault_cluster.OUTPUTS)
    found = audit(out, options)
    fault_ledger(FAULTS[scenario], result.get("faults", 0), found)
    assert "fault_error" not in result and result.get("faults") == 1, result
    assert result["done_at_fault"] < found.planned, "the fault came after the run had finished"
    assert result["status"] == "complete" and result["counts"]["failed"] == result["counts"]["pending"] == 0, result
    assert_clean(found)
    if scenario == "driver":
        assert result["status_after_kill"] == "running"
        assert 0 < result["computed"] < result["counts"]["done"]  # the rerun resumed what was recorded
