"""What agpipe survives on one machine: damaged part files and tables, changed weights, a full disk,
permission denied, a read-only output, pickled weights, tokens in the environment, hostile contig
names, what a local Ray instance listens on. Runs share the session's Ray instance unless they test
Ray itself. Faults injected and windows lost or duplicated go to the session's faults table
(conftest.fault_ledger; docs/reliability.md)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import pickle
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from agpipe.cli import main
from agpipe.io.fasta import GenomeError, open_genome
from agpipe.io.parquet import TEMP_NAME, OutputError, decode_contig, output_error, read_json, read_windows_table
from agpipe.jobs import run as run_module
from agpipe.jobs.options import Node, RunOptions, resolve_execution
from agpipe.jobs.plan import Window, plan_windows
from agpipe.jobs.stream import IoPool, WindowStream
from agpipe.jobs.run import run_job
from agpipe.model.checkpoint import CheckpointError, load_weights, read_weights_header, save_weights
from agpipe.model.config import SMALL
from agpipe.model.weights import demo_weights

from conftest import CROP, WINDOW, EchoIo, random_sequence, write_fasta
from run_audit import assert_clean, audit
from test_fasta import fasta_bytes, messy_fasta, reference_parse
from test_fasta import write_fasta as write_fasta_bytes

REPO = Path(__file__).resolve().parents[1]
OUTPUTS = "atac:1,dnase:128"  # a 1 bp output: a window written twice would show as duplicate bins


def options(genome: Path, out: Path, **extra) -> RunOptions:
    return RunOptions(genome=genome, out=out, window=WINDOW, crop=CROP, model="demo", outputs=OUTPUTS, **extra)


def run(genome: Path, out: Path, ray_address: str, log=lambda message: None, **extra):
    return run_job(options(genome, out, **extra), ray_address=ray_address, progress=False, log=log)


def cli(*args) -> str:
    """`agpipe` in this process (the session's Ray): its one error line, asserting it failed cleanly."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("agpipe: error: ") and not any("Traceback" in line for line in lines), result.stderr
    return lines[-1]


def agpipe(*args, env: dict | None = None, ray_address: str | None = None) -> subprocess.CompletedProcess:
    """`agpipe` as a user runs it, in its own process: stdout and stderr as the user sees them."""
    env = {**os.environ, **(env or {})}
    env.pop("RAY_ADDRESS", None)
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "agpipe", *map(str, args)], env=env, capture_output=True, text=True, timeout=300)


def run_args(genome: Path, out: Path, *extra) -> list:
    return ["run", genome, "--out", out, "--model", "demo", "--window", WINDOW, "--crop", CROP, "--outputs", OUTPUTS, *extra]


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one error line of a failed command; asserts there is no traceback."""
    assert result.returncode != 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("agpipe: error: ")]
    assert len(errors) == 1 and result.stderr.rstrip().endswith(errors[0]), result.stderr
    return errors[0]


def files(folder: Path) -> dict[str, tuple[int, str]]:
    """Every file under folder: relative path -> (size, sha256)."""
    return {
        p.relative_to(folder).as_posix(): (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def no_temporaries(out: Path) -> bool:
    return not [p for p in out.rglob("*") if TEMP_NAME.match(p.name)]


@contextlib.contextmanager
def tmpfs(folder: Path, size: str):
    """A small tmpfs at folder (a disk that fills, or can be made read-only); skips where mounting
    is not allowed (needs root, or CAP_SYS_ADMIN)."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or 'mount failed'}): needs root or CAP_SYS_ADMIN")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def remount(folder: Path, how: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{how}", str(folder)], check=True, capture_output=True)


@contextlib.contextmanager
def unwritable(folder: Path):
    """folder made unwritable: `chattr +i` as root (root ignores file modes), chmod 555 otherwise."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    made = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
    if made.returncode:
        pytest.skip(f"chattr +i is not available here ({made.stderr.strip()}); root writes whatever the mode")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)


# ---------------------------------------------------------------- integrity: part files, tables, weights


def test_parts_carry_their_checksums_and_resume_recomputes_exactly_the_damaged_windows(tmp_path, small_genome, ray_address, fault_ledger):
    out = tmp_path / "out"
    assert run(small_genome, out, ray_address).status == "complete"
    windows = {w.window_id: w for w in read_windows_table(out)}
    for w in windows.values():  # windows.parquet records each part's size and sha256
        for part in w.parts:
            data = (out / part.path).read_bytes()
            assert (part.bytes, part.sha256) == (len(data), hashlib.sha256(data).hexdigest())

    done = [w for w in windows.values() if w.status == "done"]
    truncated, flipped, deleted = done[1], done[5], done[-1]
    path = out / truncated.parts[0].path
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    path = out / flipped.parts[1].path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only the checksum tells
    path.write_bytes(bytes(data))
    (out / deleted.parts[0].path).unlink()
    damaged = {truncated.window_id, flipped.window_id, deleted.window_id}
    assert audit(out, options(small_genome, out)).windows_lost == 3
    before = {p: os.stat(out / p).st_mtime_ns for w in done if w.window_id not in damaged for p in (x.path for x in w.parts)}

    summary = run(small_genome, out, ray_address)
    assert summary.status == "complete" and summary.computed == 3
    assert {p: os.stat(out / p).st_mtime_ns for p in before} == before  # intact windows untouched
    rewritten = {w.window_id for w in read_windows_table(out) if any(os.stat(out / p.path).st_mtime_ns not in before.values() for p in w.parts)}
    assert rewritten == damaged
    found = audit(out, options(small_genome, out))
    fault_ledger("part files truncated, bit-flipped, deleted; rerun", 3, found)
    assert_clean(found)


def test_an_unreadable_windows_table_trusts_nothing(tmp_path, small_genome, ray_address, fault_ledger):
    out = tmp_path / "out"
    assert run(small_genome, out, ray_address, contigs="chr2,chrM").status == "complete"
    table = out / "windows.parquet"
    table.write_bytes(table.read_bytes()[:100])
    summary = run(small_genome, out, ray_address, contigs="chr2,chrM")
    assert summary.status == "complete" and summary.computed == summary.counts["done"]  # all computed again
    found = audit(out, options(small_genome, out, contigs="chr2,chrM"))
    fault_ledger("windows.parquet truncated; rerun", 1, found)
    assert_clean(found)

    # The audit sees a window written twice: a copy of one of its parts under another name.
    part = next(p for w in read_windows_table(out) if w.status == "done" for p in w.parts if "resolution=1/" in p.path)
    (out / part.path).with_name("part-99999999.parquet").write_bytes((out / part.path).read_bytes())
    planted = audit(out, options(small_genome, out, contigs="chr2,chrM"))
    assert (planted.windows_duplicated, planted.rows_duplicated, planted.orphan_parts) == (1, part.rows, 1)


def test_weights_that_changed_since_the_run_are_refused_on_resume(tmp_path, small_genome, ray_address):
    weights = tmp_path / "mine.safetensors"
    weights.write_bytes(demo_weights().read_bytes())
    out = tmp_path / "out"
    assert run(small_genome, out, ray_address, contigs="chrM", weights=str(weights)).status == "complete"
    (out / "windows.parquet").unlink()  # so that the rerun has work to do
    before = files(out)
    loaded = load_weights(weights)
    tensors = dict(loaded.tensors)
    tensors["heads.dnase.res_128.linear.b"] = tensors["heads.dnase.res_128.linear.b"] + 1
    save_weights(weights, tensors, SMALL, loaded.metadata_json)  # same path, other bytes
    result = CliRunner().invoke(main, [str(a) for a in run_args(small_genome, out, "--contigs", "chrM", "--weights", weights)])
    assert result.exit_code == 2 and result.exception.__class__ is SystemExit
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "other weights" in lines[0] and "sha256" in lines[0], result.stderr
    assert files(out) == before


# ---------------------------------------------------------------- workers: placement, unanswering workers


def test_workers_are_placed_on_nodes_they_fit_and_one_cpu_is_an_error_not_a_hang():
    cpu = RunOptions(genome=Path("g.fa"), out=Path("o"), device="cpu")
    place = lambda *nodes: resolve_execution(cpu, [Node(*n) for n in nodes])  # noqa: E731
    # One node of 2 CPUs (as before): a worker of one CPU, one CPU left for reading and writing.
    execution, placement = place(("a", 2, 0, True))
    assert placement == ["a"] and execution.worker_cpus == 1
    # A head of 1 CPU and two worker nodes of 1 CPU: one worker on each worker node, none on the head
    # (a 2-CPU worker, sized from the cluster's total, fitted no node and the run waited for ever).
    execution, placement = place(("head", 1, 0, True), ("w1", 1, 0, False), ("w2", 1, 0, False))
    assert placement == ["w1", "w2"] and execution.worker_cpus == 1
    execution, placement = place(("a", 64, 0, True))
    assert placement == ["a"] * 3 and execution.worker_cpus == 16
    with pytest.raises(ValueError, match="--num-cpus 2"):  # the worker would take the only CPU: reads never ran
        place(("a", 1, 0, True))
    execution, placement = resolve_execution(RunOptions(genome=Path("g.fa"), out=Path("o")), [Node("a", 16, 2, True), Node("b", 8, 1, False)])
    assert execution.device == "cuda" and placement == ["a", "a", "b"]


@ray.remote(num_cpus=0)
class FlakyWorker:
    """A stand-in for ModelWorker that does not answer its first batch, as a worker whose process
    is being restarted or whose node is not yet declared dead."""

    def __init__(self, silent: int):
        self.silent = silent
        self.probes = 0

    def predict(self, *items):
        if self.silent > 0:
            self.silent -= 1
            raise ray.exceptions.ActorUnavailableError("restarting", None)
        return list(items) if len(items) > 1 else items[0]

    def describe(self) -> str:
        self.probes += 1
        return "stand-in"

    def probed(self) -> int:
        return self.probes


def test_a_worker_that_does_not_answer_is_rested_its_windows_go_round_and_it_comes_back(ray_address):
    windows = [Window(i, "chr1", 100 * i, 100 * i + 100, 100 * i, 100 * i + 100) for i in range(12)]
    workers = [FlakyWorker.remote(1), FlakyWorker.remote(0)]
    stream = WindowStream(iter(windows), workers, batch_size=2, limit=6, io=EchoIo())
    outcomes = list(stream)
    assert sorted(w.window_id for w, _ in outcomes) == list(range(12))  # each window once
    assert all(outcome == w for w, outcome in outcomes) and stream.lost_workers is None
    assert ray.get(workers[0].probed.remote()) >= 1 and 0 in stream.workers  # probed, and back in rotation


@pytest.mark.parametrize("role", ["writers", "readers"])
def test_a_reader_or_writer_killed_mid_run_is_replaced_and_the_run_completes(tmp_path, small_genome, ray_address, monkeypatch, fault_ledger, role):
    """SIGKILL of a PredictionWriter's or GenomeReader's process (as the OOM killer would): Ray
    restarts it and retries its calls; the run completes with every window once, no temporary left."""
    out = tmp_path / "out"
    monkeypatch.setattr(run_module, "SAVE_WINDOWS", 1)  # windows.parquet after every window: the kill comes mid-run
    pools: list[IoPool] = []

    class RecordedPool(IoPool):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pools.append(self)

    monkeypatch.setattr(run_module, "IoPool", RecordedPool)
    killed: dict = {}

    def kill_a_writer() -> None:
        deadline = time.monotonic() + 120
        while not pools and time.monotonic() < deadline:
            time.sleep(0.01)
        pid = ray.get(getattr(pools[0], role)[0].__ray_call__.remote(lambda actor: os.getpid()))
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):  # absent or being replaced
                if sum(w.status == "done" for w in read_windows_table(out)) >= 2:
                    break
            time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
        killed["at"] = time.monotonic()

    thread = threading.Thread(target=kill_a_writer, daemon=True)
    thread.start()
    summary = run(small_genome, out, ray_address)
    finished = time.monotonic()
    thread.join(10)
    assert killed["at"] < finished  # mid-run
    assert summary.status == "complete" and summary.counts["failed"] == 0
    found = audit(out, options(small_genome, out))
    fault_ledger(f"{role[:-1]} process SIGKILLed mid-run", 1, found)
    assert_clean(found)


# ---------------------------------------------------------------- write failures


def test_a_full_disk_stops_the_run_in_one_line_and_a_rerun_with_space_resumes(tmp_path, small_genome, ray_address, fault_ledger):
    with tmpfs(tmp_path / "disk", "800k") as disk:  # about half of what the run writes
        out = disk / "out"
        result = agpipe(*run_args(small_genome, out), ray_address=ray_address)
        line = error_line(result)
        assert re.match(rf"agpipe: error: cannot write {re.escape(str(out))}/\S+: No space left on device", line), line
        assert no_temporaries(out)
        stopped = audit(out, options(small_genome, out), expect_status=read_json(out / "manifest.json")["status"])
        assert stopped.invalid_files == stopped.temporaries == stopped.rows_duplicated == 0, stopped.problems()
        windows = read_windows_table(out)
        kept = sum(w.status in ("done", "skipped_all_n") for w in windows)
        kept_done = sum(w.status == "done" for w in windows)
        assert 0 < kept and stopped.windows_lost > 0  # some windows finished and are kept, the rest are not

        remount(disk, "size=64m")  # space again
        log: list[str] = []
        summary = run(small_genome, out, ray_address, log=log.append)
        # every window not kept is predicted once; an all-N one is recorded skipped, not predicted,
        # whichever run reaches it
        assert summary.status == "complete" and summary.computed == summary.counts["done"] - kept_done
        assert any(line.startswith(f"resuming: {kept} of") for line in log), log
        found = audit(out, options(small_genome, out))
    fault_ledger("disk full mid-run (tmpfs); rerun with space", 1, found)
    assert_clean(found)


def test_a_failed_save_of_the_run_tables_stops_the_run_and_a_rerun_resumes(tmp_path, small_genome, ray_address, monkeypatch, fault_ledger):
    """ENOSPC while the driver saves windows.parquet mid-run (simulated: the driver's own writes run
    in this process): the run stops with that one error, the previous tables stand, a rerun resumes."""
    out = tmp_path / "out"
    saves = []

    def write_windows_table(folder, rows):
        saves.append(1)
        if len(saves) == 3:
            raise output_error(Path(folder) / "windows.parquet", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        return real_write(folder, rows)

    real_write = run_module.write_windows_table
    monkeypatch.setattr(run_module, "SAVE_WINDOWS", 2)
    monkeypatch.setattr(run_module, "write_windows_table", write_windows_table)
    with pytest.raises(OutputError) as failed:
        run(small_genome, out, ray_address)
    assert str(failed.value) == f"cannot write {out / 'windows.parquet'}: No space left on device"
    assert len(saves) == 4 and no_temporaries(out)  # the failed save, then the final save tried once more
    kept = sum(w.status == "done" for w in read_windows_table(out))
    monkeypatch.undo()
    summary = run(small_genome, out, ray_address)
    assert summary.status == "complete" and summary.computed == summary.counts["done"] - kept
    found = audit(out, options(small_genome, out))
    fault_ledger("windows.parquet save fails (ENOSPC) mid-run; rerun", 1, found)
    assert_clean(found)


def test_permission_denied_mid_run_stops_in_one_line_and_a_rerun_resumes(tmp_path, small_genome, ray_address, fault_ledger):
    out = tmp_path / "out"
    folder = out / "predictions" / "head=atac" / "resolution=1" / "contig=chr2"
    folder.mkdir(parents=True)
    with unwritable(folder):
        result = agpipe(*run_args(small_genome, out), ray_address=ray_address)
        line = error_line(result)
        reason = "Operation not permitted" if os.geteuid() == 0 else "Permission denied"
        assert re.match(rf"agpipe: error: cannot write {re.escape(str(folder))}/part-\d+\.parquet: {reason}", line), line
        assert no_temporaries(out)
        windows = read_windows_table(out)
        assert {w.chrom for w in windows if w.status == "done"} >= {"chr1"}  # what was written is kept
        assert not [w for w in windows if w.chrom == "chr2" and w.status == "done"]
    assert run(small_genome, out, ray_address).status == "complete"
    found = audit(out, options(small_genome, out))
    fault_ledger("permission denied mid-run (chattr +i); rerun", 1, found)
    assert_clean(found)


def test_an_unwritable_output_is_one_line_and_writes_nothing(tmp_path, small_genome, ray_address):
    out = tmp_path / "out"
    out.mkdir()
    with unwritable(out):
        line = cli(*run_args(small_genome, out))
    assert line.startswith(f"agpipe: error: cannot write {out}/.agpipe.lock: "), line
    assert not list(out.iterdir())


def test_a_read_only_output_is_one_line_and_left_untouched(tmp_path, small_genome, ray_address):
    with tmpfs(tmp_path / "disk", "16m") as disk:
        remount(disk, "ro")
        line = cli(*run_args(small_genome, disk / "out", "--contigs", "chrM"))
        assert line == f"agpipe: error: cannot write {disk / 'out'}: Read-only file system", line

        remount(disk, "rw")
        out = disk / "out"
        assert run(small_genome, out, ray_address, contigs="chr2,chrM").status == "complete"
        remount(disk, "ro")
        result = CliRunner().invoke(main, [str(a) for a in run_args(small_genome, out, "--contigs", "chr2,chrM")])
        assert result.exit_code == 0 and "nothing to do" in result.stderr, result.output  # a finished run reads fine

        remount(disk, "rw")
        (out / read_windows_table(out)[0].parts[0].path).unlink()
        before = files(out)
        remount(disk, "ro")
        line = cli(*run_args(small_genome, out, "--contigs", "chr2,chrM"))
        assert line == f"agpipe: error: cannot write {out}/.agpipe.lock: Read-only file system", line
        assert files(out) == before


# ---------------------------------------------------------------- security


class Payload:
    """Unpickling this creates a file: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_pickled_weights_are_refused_without_being_unpickled(tmp_path, small_genome):
    marker = tmp_path / "pwned"
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(Payload(proof)))
    assert proof.exists()  # the payload works when something does unpickle it
    candidates = {
        "torch.pt": lambda p: torch.save({"weights": Payload(marker)}, p),
        "model.pkl": lambda p: p.write_bytes(pickle.dumps(Payload(marker))),
        "pytorch_model.bin": lambda p: torch.save(Payload(marker), p),
        "renamed.safetensors": lambda p: torch.save(Payload(marker), p),  # a pickle by another name
    }
    for name, write in candidates.items():
        path = tmp_path / name
        write(path)
        result = CliRunner().invoke(main, ["run", str(small_genome), "--out", str(tmp_path / "out"), "--weights", str(path), "--dry-run"])
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("agpipe: error: ") and name in lines[0], result.stderr
        for load in (read_weights_header, load_weights):
            with pytest.raises(CheckpointError):
                load(path)
        assert not marker.exists(), f"{name} was unpickled"
    assert not (tmp_path / "out").exists()


def test_agpipe_has_no_code_path_that_unpickles():
    unpickling = re.compile(r"torch\.load\(|pickle\.loads?\(|allow_pickle\s*=\s*True|joblib\.load|dill\.load|cloudpickle\.loads?\(")
    found = [f"{p.relative_to(REPO)}:{n}" for p in (REPO / "agpipe").rglob("*.py") for n, line in enumerate(p.read_text().splitlines(), 1) if unpickling.search(line)]
    assert not found


def test_a_run_keeps_tokens_out_of_its_files_and_output_and_ray_listens_on_loopback_only(tmp_path, small_genome):
    """A run that starts its own Ray instance, with Hugging Face tokens in its environment."""
    token = "hf_agpipeReliabilityToken" + "x" * 16
    out = tmp_path / "out"
    env = {"HF_TOKEN": token, "HUGGING_FACE_HUB_TOKEN": token}
    env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    args = [str(a) for a in run_args(small_genome, out, "--num-cpus", "2")]
    process = subprocess.Popen([sys.executable, "-m", "agpipe", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    listening: set[tuple[str, str]] = set()
    try:
        while process.poll() is None:
            listening |= listeners(process_tree(process.pid))
            time.sleep(0.2)
    finally:
        stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert listening, "saw no Ray process listening"  # the check saw Ray running
    assert {name for _, name in listening} >= {"gcs_server", "raylet"}
    exposed = {(address, name) for address, name in listening if not is_loopback(address)}
    assert not exposed, f"listening beyond loopback: {exposed}"
    assert not any("dashboard" in name for _, name in listening) and not any(a.endswith(":8265") for a, _ in listening)

    assert token not in stdout + stderr
    for path in out.rglob("*"):
        assert not path.is_file() or token.encode() not in path.read_bytes(), path


def process_tree(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for line in subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout.splitlines():
        child, parent = map(int, line.split())
        children.setdefault(parent, []).append(child)
    tree, todo = set(), [pid]
    while todo:
        tree.add(p := todo.pop())
        todo += children.get(p, [])
    return tree


def listeners(pids: set[int]) -> set[tuple[str, str]]:
    """(local address, process name) of the TCP and UDP sockets that processes in pids listen on."""
    try:
        text = subprocess.run(["ss", "-ltunpH"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("`ss` (iproute2) is not available to list listening sockets")
    found = set()
    for line in text.splitlines():
        for name, pid in re.findall(r'\("([^"]+)",pid=(\d+)', line):
            if int(pid) in pids:
                found.add((line.split()[4], name))
    return found


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "::1", "::ffff:127.0.0.1") or host.startswith("127.")


HOSTILE_NAMES = ["../../etc/passwd", "/abs", "a\\b", ".", "..", "~", "-rf", "$(touch${IFS}pwned)", "`id`", "chr1;rm", "%2E", "nul"]


def test_hostile_contig_names_stay_out_of_paths(tmp_path, ray_address, fault_ledger):
    rng = np.random.default_rng(5)
    genome = write_fasta(tmp_path / "hostile.fa", {name: random_sequence(rng, 3_001, []) for name in HOSTILE_NAMES})
    out = tmp_path / "out"
    outside = {p for p in tmp_path.parent.iterdir()} | set(Path("/").iterdir())
    assert run(genome, out, ray_address).status == "complete"
    assert set(tmp_path.iterdir()) == {genome, Path(f"{genome}.fai"), out}  # nothing beside OUT
    assert {p for p in tmp_path.parent.iterdir()} | set(Path("/").iterdir()) == outside
    root = out.resolve()
    for path in out.rglob("*"):
        assert not path.is_symlink() and path.resolve().is_relative_to(root), path
    folders = {p.name for p in out.glob("predictions/*/*/*")}
    assert {decode_contig(f.removeprefix("contig=")) for f in folders} == set(HOSTILE_NAMES)
    assert all(f == "contig=" + f.removeprefix("contig=").replace("/", "") and not f.removeprefix("contig=").startswith(".") for f in folders)
    assert {w.chrom for w in read_windows_table(out)} == set(HOSTILE_NAMES)
    found = audit(out, options(genome, out))
    fault_ledger("hostile contig names (../../etc/passwd, /abs, ., .., ...)", 0, found)
    assert_clean(found)


# ---------------------------------------------------------------- bad input through the command line

FUZZ_WINDOW, FUZZ_CROP = 2048, 128


@st.composite
def genome_and_bed(draw):
    """(FASTA bytes, compressed, BED bytes or None, expected window count or None for an error)."""
    if draw(st.booleans()):
        fasta = draw(messy_fasta())  # mostly well-formed, sometimes corrupted
    else:  # well-formed: names with punctuation, soft-masking, IUPAC codes, N runs
        names = draw(st.lists(st.text(st.sampled_from("chrXY019_.:|*/=-é"), min_size=1, max_size=8), min_size=1, max_size=3, unique=True))
        fasta = fasta_bytes([(n.encode(), draw(st.text(st.sampled_from("ACGTNacgtnRY"), min_size=1, max_size=3000)).encode()) for n in names])
    compress = draw(st.booleans())
    records = reference_parse(fasta)
    contigs = [(name.decode(errors="replace"), len(seq)) for name, seq in records]
    if not draw(st.booleans()):
        return fasta, compress, None, contigs
    lines, intervals, bad = [], [], False
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["interval"] * 8 + ["comment"] * 2 + ["unknown", "garbage", "beyond"]))
        name, length = draw(st.sampled_from(contigs)) if contigs else ("chr1", 1)
        sep = draw(st.sampled_from(["\t", " "]))
        if kind == "comment":
            lines.append(draw(st.sampled_from(["# note", "track name=x", ""])))
        elif kind == "unknown":
            lines.append(f"notacontig{sep}0{sep}10")
            bad = True
        elif kind == "garbage":
            lines.append(draw(st.sampled_from([f"{name}{sep}1", f"{name}{sep}x{sep}5", f"{name}{sep}5{sep}2", f"{name}{sep}-1{sep}4"])))
            bad = True
        elif kind == "beyond":
            lines.append(f"{name}{sep}{length + draw(st.integers(0, 5))}{sep}{length + 10}")
            bad = True
        else:
            start = draw(st.integers(0, max(0, length - 1)))
            end = draw(st.integers(start, length + 20))
            lines.append(f"{name}{sep}{start}{sep}{end}")
            bad = bad or start >= length
            if end > start:
                intervals.append((name, start, min(end, length)))
    bed = ("\n".join(lines) + draw(st.sampled_from(["", "\n"]))).encode()
    regions: dict[str, list[tuple[int, int]]] = {}
    for name, start, end in intervals:
        regions.setdefault(name, []).append((start, end))
    regions = {name: merge(spans) for name, spans in regions.items()}
    return fasta, compress, bed, None if bad or not regions else (contigs, regions)


def merge(spans):
    out = []
    for start, end in sorted(spans):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def dry_run(fasta: bytes, compress: bool, bed: bytes | None):
    """`agpipe run --dry-run` on the input: (exit code, stdout, stderr), asserting no traceback."""
    with tempfile.TemporaryDirectory() as folder:
        genome = write_fasta_bytes(Path(folder) / "g.fa", fasta, compress)
        args = ["run", str(genome), "--model", "demo", "--window", str(FUZZ_WINDOW), "--crop", str(FUZZ_CROP), "--dry-run"]
        if bed is not None:
            (Path(folder) / "r.bed").write_bytes(bed)
            args += ["--regions", str(Path(folder) / "r.bed")]
        result = CliRunner().invoke(main, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), "".join(traceback.format_exception(result.exception))
    if result.exit_code:
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("agpipe: error: "), result.stderr
    return result.exit_code, result.stdout


def planned(stdout: str) -> int:
    return int(re.search(r"^windows +([\d,]+) of", stdout, re.M).group(1).replace(",", ""))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(genome_and_bed())
def test_fuzz_bad_genomes_and_regions_through_the_cli_give_one_line_or_the_right_plan(case):
    fasta, compress, bed, expected = case
    code, stdout = dry_run(fasta, compress, bed)
    event(f"{'one-line error' if code else 'planned'}, {'no BED' if bed is None else 'BED'}")
    try:
        with tempfile.TemporaryDirectory() as folder:
            reference = open_genome(write_fasta_bytes(Path(folder) / "g.fa", fasta, compress)).contigs
    except GenomeError:
        assert code, "a genome the reader refuses was planned"
        return
    if bed is None:
        assert code == 0 and planned(stdout) == len(list(plan_windows(reference, FUZZ_WINDOW, FUZZ_CROP)))
    elif expected is None:
        assert code, "bad regions were planned"
    else:
        contigs, regions = expected
        assert reference == contigs  # the reader agrees with the reference parser (tests/test_fasta.py)
        count = len(list(plan_windows(contigs, FUZZ_WINDOW, FUZZ_CROP, regions)))
        assert code == 0 and planned(stdout) == count


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=120), st.one_of(st.none(), st.binary(max_size=80)))
def test_fuzz_random_bytes_through_the_cli_never_give_a_traceback(fasta, bed):
    dry_run(b">c\n" + fasta if fasta[:1] != b">" else fasta, False, bed)
