"""Faults injected into `agpipe run` on a real multi-node Ray cluster on this machine.

    python tests/fault_cluster.py GENOME WORKDIR [SCENARIO ...]

Starts a ray.cluster_utils.Cluster: a head node of 1 CPU, where the driver runs and reads and
writes, and two worker nodes of 1 CPU each, where agpipe places its two model workers. Then, per
scenario, runs the demo model over GENOME into WORKDIR/<scenario> and injects one fault once a few
windows are recorded done:

    worker_process   SIGKILL a model worker's process (os.kill of the actor's pid)
    node             remove a worker node abruptly (its raylet and every process on it killed)
    driver           SIGKILL the driver (`agpipe run` in a subprocess), then rerun the command

Prints one JSON line per scenario (the fault, when, the run's summary); the test checks the run
folders. It owns its Ray cluster, so it runs in its own process, apart from the test session's
local Ray instance (tests/test_cluster_faults.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from agpipe.io.parquet import read_windows_table
from agpipe.jobs import run as run_module
from agpipe.jobs.options import RunOptions
from agpipe.jobs.run import run_job

WINDOW, CROP = 8192, 1024
OUTPUTS = "atac:1,dnase:128"
DONE_BEFORE_FAULT = 3  # windows recorded done before the fault is injected
SCENARIOS = ("worker_process", "driver", "node")


def options(genome: Path, out: Path) -> RunOptions:
    return RunOptions(genome=genome, out=out, window=WINDOW, crop=CROP, model="demo", outputs=OUTPUTS)


def done_windows(out: Path) -> int:
    try:
        return sum(r.status == "done" for r in read_windows_table(out))
    except (OSError, ValueError):
        return 0


def wait_for_done(out: Path, count: int, alive=lambda: True, timeout: float = 120) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        if (n := done_windows(out)) >= count:
            return n
        time.sleep(0.02)
    raise RuntimeError(f"{out}: {count} windows not done in time")


class Workers:
    """Captures the run's model workers as run_job starts them, with each one's pid and node."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.info: list[tuple[int, str]] = []
        self.original = run_module.start_workers

    def __enter__(self) -> Workers:
        def start_workers(*args, **kwargs):
            workers, *rest = self.original(*args, **kwargs)
            where = lambda self_: (os.getpid(), ray.get_runtime_context().get_node_id())  # noqa: E731
            self.info = ray.get([w.__ray_call__.remote(where) for w in workers])
            self.started.set()
            return workers, *rest

        run_module.start_workers = start_workers
        return self

    def __exit__(self, *exc) -> None:
        run_module.start_workers = self.original


def run_with_fault(genome: Path, out: Path, inject) -> dict:
    """run_job in this driver while another thread injects a fault once some windows are done."""
    fault: dict = {}

    def injector() -> None:
        try:
            workers.started.wait(120)
            fault["done_at_fault"] = wait_for_done(out, DONE_BEFORE_FAULT)
            fault.update(inject(workers.info))
        except Exception as e:  # noqa: BLE001 - reported, the test fails on it
            fault["fault_error"] = repr(e)

    with Workers() as workers:
        thread = threading.Thread(target=injector, daemon=True)
        thread.start()
        summary = run_job(options(genome, out), progress=False, log=lambda message: None)
        thread.join(10)
    return {**fault, "status": summary.status, "counts": summary.counts, "computed": summary.computed, "error": summary.error}


def main(genome: Path, work: Path, scenarios: list[str]) -> None:
    run_module.SAVE_WINDOWS = 1  # windows.parquet after every window: the fault comes mid-run, on cue
    started = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    print(json.dumps({"cluster_seconds": round(time.monotonic() - started, 1)}), flush=True)
    try:
        for scenario in scenarios:
            out = work / scenario
            if out.exists():
                raise SystemExit(f"{out} exists: give an empty WORKDIR")
            started = time.monotonic()
            if scenario == "worker_process":

                def kill_process(info):
                    pid, _ = info[0]
                    os.kill(pid, signal.SIGKILL)
                    return {"faults": 1, "killed_pid": pid}

                result = run_with_fault(genome, out, kill_process)
            elif scenario == "node":

                def remove_node(info):
                    node_id = info[0][1]
                    node = next(n for n in nodes if n.node_id == node_id)
                    cluster.remove_node(node, allow_graceful=False)
                    nodes.remove(node)
                    return {"faults": 1, "removed_node": node_id}

                result = run_with_fault(genome, out, remove_node)
                nodes.append(cluster.add_node(num_cpus=1))  # back to two worker nodes
                cluster.wait_for_nodes()
            elif scenario == "driver":
                result = kill_driver_and_rerun(genome, out, cluster.address)
            else:
                raise SystemExit(f"unknown scenario {scenario}")
            result.update(scenario=scenario, out=str(out), seconds=round(time.monotonic() - started, 1))
            print(json.dumps(result), flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()


def kill_driver_and_rerun(genome: Path, out: Path, address: str) -> dict:
    """`agpipe run` as its own driver process, SIGKILLed mid-run; then the same run again here."""
    code = "import sys, agpipe.jobs.run as r; r.SAVE_WINDOWS = 1; from agpipe.cli import main; sys.argv[0] = 'agpipe'; main()"
    args = ["run", str(genome), "--out", str(out), "--model", "demo", "--window", str(WINDOW), "--crop", str(CROP), "--outputs", OUTPUTS, "--ray-address", address]
    driver = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        done = wait_for_done(out, DONE_BEFORE_FAULT, alive=lambda: driver.poll() is None)
    except RuntimeError:
        driver.kill()
        raise RuntimeError(f"the driver ended before the fault: {driver.communicate()[1].decode()[-2000:]}") from None
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    status_after_kill = json.loads((out / "manifest.json").read_text())["status"]
    time.sleep(2)  # Ray notices the dead driver and stops its workers and tasks
    summary = run_job(options(genome, out), progress=False, log=lambda message: None)
    return {
        "faults": 1, "done_at_fault": done, "status_after_kill": status_after_kill, "status": summary.status,
        "counts": summary.counts, "computed": summary.computed, "error": summary.error,
    }


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:] or list(SCENARIOS))
