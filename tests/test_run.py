"""The whole job on Ray (the session's local instance) with the demo model, read back with pyarrow and DuckDB."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import ray
import torch
from click.testing import CliRunner

from agpipe.cli import main
from agpipe.io.fasta import is_all_n, one_hot, open_genome
from agpipe.io.parquet import TEMP_NAME, kept_rows, read_json, read_windows_table
from agpipe.jobs.options import Execution, RunOptions, prepare_job
from agpipe.jobs import run as run_module
from agpipe.jobs.plan import Window
from agpipe.jobs.run import run_job
from agpipe.jobs.stream import BATCHES_PER_WORKER, OBJECT_STORE_SHARE, IoPool, WindowStream, windows_in_flight
from agpipe.jobs.windows import EncodedWindow, SkippedWindow
from agpipe.jobs.worker import EXIT_ON_BATCH_ENV
from agpipe.model.checkpoint import load_weights, save_weights
from agpipe.model.config import SMALL, Output, parse_outputs
from agpipe.model.precision import FLOAT32
from agpipe.model.weights import demo_weights, load_model

from conftest import CROP, WINDOW, EchoIo, random_sequence, write_fasta

REPO = Path(__file__).resolve().parents[1]


def run(genome: Path, out: Path, ray_address: str, **options):
    # The parity stage has its own tests (test_parity.py); here it would only add its minutes.
    options = {"window": WINDOW, "crop": CROP, "model": "demo", "parity_sample": 0, **options}
    return run_job(RunOptions(genome=genome, out=out, **options), ray_address=ray_address, progress=False, log=lambda message: None)


def output_table(out: Path, output: Output):
    return ds.dataset(out / "predictions" / f"head={output.head}" / f"resolution={output.resolution}", format="parquet").to_table()


def check_every_bin_once(out: Path, genome: Path, outputs: list[Output]) -> None:
    """Each planned contig's bins at each resolution are exactly ceil(L/r), written once, except those
    in the kept spans of windows skipped as all N; values are finite; DuckDB reads the same rows."""
    windows = read_windows_table(out)
    assert {w.status for w in windows} <= {"done", "skipped_all_n"}
    lengths = {name: length for name, length in open_genome(genome).contigs if name in {w.chrom for w in windows}}
    for output in outputs:
        r = output.resolution
        table = output_table(out, output)
        values = np.stack([table[c].to_numpy() for c in table.column_names[3:]])
        assert np.isfinite(values).all()
        starts: dict[str, list[int]] = {chrom: [] for chrom in lengths}
        for chrom, start, end in zip(*(table[c].to_pylist() for c in ("chrom", "start", "end"))):
            starts[chrom].append(start)
            assert end == min(start + r, lengths[chrom])
        for chrom, length in lengths.items():
            skipped = {s for w in windows if w.chrom == chrom and w.status == "skipped_all_n" for s in range(w.out_start, w.out_end)}
            expected = [s for s in range(0, length, r) if s not in skipped]
            assert sorted(starts[chrom]) == expected, (output, chrom)
            if not skipped:
                assert len(expected) == -(-length // r)
        glob = f"{out}/predictions/head={output.head}/resolution={r}/*/*.parquet"
        rows, distinct = duckdb.sql(f"SELECT count(*), count(DISTINCT (chrom, start)) FROM read_parquet('{glob}', hive_partitioning = false)").fetchall()[0]
        assert rows == distinct == table.num_rows


def test_run_writes_every_bin_once_and_what_the_model_predicts(tmp_path, small_genome, ray_address):
    out = tmp_path / "out"
    outputs = parse_outputs("atac:1,atac:128,dnase:128,rna_seq:1")
    summary = run(small_genome, out, ray_address, outputs="atac:1,atac:128,dnase:128,rna_seq:1")
    assert summary.status == "complete" and summary.counts["skipped_all_n"] == 1 and summary.counts["failed"] == 0
    check_every_bin_once(out, small_genome, list(outputs))

    manifest = read_json(out / "manifest.json")
    assert manifest["status"] == "complete" and manifest["windows"]["done"] == summary.counts["done"]
    assert manifest["config"]["precision"] == "float32" and manifest["config"]["device"] == "cpu"
    t = manifest["timings"]
    assert t["write_seconds"] > 0 and 0 < sum(t["worker_start_seconds"].values()) < t["workers_ready_seconds"] <= t["first_window_seconds"] <= t["last_window_seconds"] <= t["wall_seconds"]
    assert 0 < t["driver_cpu_seconds"]["loop"] <= t["driver_cpu_seconds"]["process"]
    assert manifest["weights"]["sha256"] == load_weights(demo_weights()).sha256 and manifest["nonfinite_total"] == 0
    tracks = pq.read_table(out / "tracks.parquet").to_pylist()
    for output in outputs:
        columns = [t["column"] for t in tracks if (t["head"], t["resolution"]) == (output.head, output.resolution)]
        assert output_table(out, output).column_names == ["chrom", "start", "end", *columns]

    # A window's rows are the model's own forward on the same one-hot, at the kept span.
    model, _ = load_model(load_weights(demo_weights()), 0, outputs, FLOAT32, "cpu")
    genome = open_genome(small_genome)
    done = [w for w in read_windows_table(out) if w.status == "done"]
    for w in (done[0], done[-1], next(w for w in done if w.out_end == dict(genome.contigs)[w.chrom] and w.chrom == "chr1")):
        with torch.inference_mode():
            expected = model(torch.from_numpy(one_hot(genome.fetch(w.chrom, w.start, w.end)))[None])
        for part in w.parts:
            head, resolution = (p.split("=")[1] for p in part.path.split("/")[1:3])
            output = Output(head, int(resolution))
            table = pq.read_table(out / part.path)
            got = np.stack([table[c].to_numpy() for c in table.column_names[3:]], axis=1)
            rows = kept_rows(w, output.resolution)
            np.testing.assert_allclose(got, expected[output][0, rows.start : rows.stop].numpy(), rtol=1e-5, atol=1e-6)


def test_mouse_run_leaves_out_heads_without_tracks(tmp_path, small_genome, ray_address):
    out = tmp_path / "out"
    notes = []
    summary = run_job(
        RunOptions(genome=small_genome, out=out, window=WINDOW, crop=CROP, model="demo", organism="mouse", contigs="chr2,chrM"),
        ray_address=ray_address, progress=False, log=notes.append,
    )
    assert summary.status == "complete"
    assert summary.parity["verdict"] == "pass"  # the reference reads the mouse weights and tracks too
    assert any("procap" in n and "mouse" in n for n in notes)
    tracks = pq.read_table(out / "tracks.parquet").to_pylist()
    assert {t["organism"] for t in tracks} == {"mouse"} and "procap" not in {t["head"] for t in tracks}
    assert not (out / "predictions" / "head=procap").exists()
    # Window ids are those of the whole-genome plan, whatever --contigs selects.
    whole = {(w.chrom, w.start): w.window_id for w in prepare_job(RunOptions(genome=small_genome, out=out, window=WINDOW, crop=CROP, model="demo")).windows()}
    windows = read_windows_table(out)
    assert {w.chrom for w in windows} == {"chr2", "chrM"}
    assert all(whole[(w.chrom, w.start)] == w.window_id for w in windows)


def test_overwrite_replaces_a_run_and_keeps_other_files(tmp_path, small_genome, ray_address):
    out = tmp_path / "out"
    assert run(small_genome, out, ray_address, outputs="atac:128", contigs="chrM").status == "complete"
    (out / "notes.txt").write_text("mine")
    summary = run(small_genome, out, ray_address, outputs="dnase:128", contigs="chrM", overwrite=True)
    assert summary.status == "complete" and summary.computed == 1
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "predictions" / "head=atac").exists() and (out / "predictions" / "head=dnase").exists()
    assert read_json(out / "manifest.json")["identity"]["outputs"] == ["dnase:128"]


def test_all_outputs_write_junctions_and_contact_maps(tmp_path, small_genome, ray_address):
    out = tmp_path / "out"
    summary = run(small_genome, out, ray_address, outputs="all", contigs="odd:name/1,chrM")
    assert summary.status == "complete"
    windows = read_windows_table(out)
    assert all(len(w.parts) == 16 for w in windows)  # every head at every resolution, junctions and contact maps
    for w in windows:
        maps = next(p for p in w.parts if p.path.startswith("contact_maps/"))
        n = len(kept_rows(w, 2048))
        assert maps.rows == n * (n + 1) // 2
    junctions = duckdb.sql(f"SELECT * FROM read_parquet('{out}/junctions/*/*.parquet', hive_partitioning = false)").fetchall()
    assert junctions and all(row[0] in ("odd:name/1", "chrM") for row in junctions)
    assert all((d < a) == (strand == "+") for _, d, a, strand, *_ in junctions)
    assert ds.dataset(out / "contact_maps", format="parquet").to_table().num_rows == sum(
        p.rows for w in windows for p in w.parts if p.path.startswith("contact_maps/")
    )
    tracks = pq.read_table(out / "tracks.parquet").to_pylist()
    assert {"contact_maps", "splice_sites_junction"} <= {t["head"] for t in tracks}
    check_every_bin_once(out, small_genome, [Output("splice_sites_classification", 1), Output("chip_tf", 128)])


@pytest.fixture(scope="module")
def longer_genome(tmp_path_factory) -> Path:
    """~65 windows: long enough to kill a run in the middle."""
    rng = np.random.default_rng(11)
    records = {"chrA": random_sequence(rng, 250_013, [(100_000, 120_000)]), "chrB": random_sequence(rng, 149_999, [])}
    return write_fasta(tmp_path_factory.mktemp("longer") / "longer.fa", records)


def test_a_killed_run_resumes_and_writes_each_window_once(tmp_path, longer_genome, ray_address):
    out = tmp_path / "out"
    args = ["run", str(longer_genome), "--out", str(out), "--model", "demo", "--window", str(WINDOW), "--crop", str(CROP), "--outputs", "atac:1,dnase:128"]
    env = {**os.environ, "RAY_ADDRESS": ray_address, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-m", "agpipe", *args], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:  # until windows.parquet records some done windows
        try:
            if any(w.status == "done" for w in read_windows_table(out)):
                break
        except OSError:
            pass
        time.sleep(0.05)
    assert process.poll() is None, process.stderr.read().decode()
    process.send_signal(signal.SIGKILL)
    process.wait()
    time.sleep(2)  # Ray stops the dead driver's tasks
    assert read_json(out / "manifest.json")["status"] == "running"

    summary = run(longer_genome, out, ray_address, outputs="atac:1,dnase:128")
    total = summary.counts["done"] + summary.counts["skipped_all_n"]
    assert summary.status == "complete" and 0 < summary.computed < total
    assert read_json(out / "manifest.json")["status"] == "complete"
    assert not [p for p in out.rglob("*") if TEMP_NAME.match(p.name)]
    check_every_bin_once(out, longer_genome, [Output("atac", 1), Output("dnase", 128)])

    # Rerunning a complete run does nothing and succeeds.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    result = CliRunner().invoke(main, [*args, "--ray-address", ray_address])
    assert result.exit_code == 0, result.output
    assert "nothing to do" in result.output
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_a_worker_that_dies_is_replaced_and_the_run_completes(tmp_path, small_genome, ray_address, monkeypatch):
    marker = tmp_path / "worker-exited"
    monkeypatch.setenv(EXIT_ON_BATCH_ENV, f"3:{marker}")
    out = tmp_path / "out"
    summary = run(small_genome, out, ray_address, outputs="dnase:128")
    assert marker.exists()  # the worker did die
    assert summary.status == "complete" and summary.counts["failed"] == 0
    check_every_bin_once(out, small_genome, [Output("dnase", 128)])


def test_a_complete_run_syncs_its_parts_before_it_says_so(tmp_path, small_genome, ray_address, monkeypatch):
    out = tmp_path / "out"
    status_at_sync = []
    monkeypatch.setattr(run_module.os, "sync", lambda: status_at_sync.append(read_json(out / "manifest.json")["status"]))
    summary = run(small_genome, out, ray_address, outputs="dnase:128")
    assert summary.status == "complete" and status_at_sync == ["running"]
    assert read_json(out / "manifest.json")["timings"]["sync_seconds"] is not None


def test_saves_during_a_run_leave_the_driver_free_and_the_last_is_its_own(tmp_path, small_genome, ray_address, monkeypatch):
    """Mid-run saves of windows.parquet go to the saver thread (the driver goes on feeding the
    workers); the final save is the driver's, after them."""
    saved_by = []
    real_write = run_module.write_windows_table

    def write_windows_table(folder, rows):
        saved_by.append(threading.current_thread().name)
        return real_write(folder, rows)

    monkeypatch.setattr(run_module, "SAVE_WINDOWS", 1)
    monkeypatch.setattr(run_module, "write_windows_table", write_windows_table)
    summary = run(small_genome, tmp_path / "out", ray_address, outputs="dnase:128")
    assert summary.status == "complete"
    assert saved_by[0] == saved_by[-1] == "MainThread"  # "running" before the workers start, and the last
    assert len(saved_by) > 3 and all(name.startswith("save") for name in saved_by[1:-1])


def test_a_run_whose_workers_all_die_fails_and_a_rerun_completes_it(tmp_path, small_genome, ray_address, monkeypatch):
    monkeypatch.setattr(run_module, "WORKER_RESTARTS", 0)
    # A worker holds BATCHES_PER_WORKER calls at once: by its 8th, its first windows are written.
    monkeypatch.setenv(EXIT_ON_BATCH_ENV, f"8:{tmp_path / 'worker-exited'}")
    out = tmp_path / "out"
    summary = run(small_genome, out, ray_address, outputs="dnase:128")
    assert summary.status == "failed" and "every model worker died" in summary.error
    assert read_json(out / "manifest.json")["status"] == "failed"
    statuses = {w.status for w in read_windows_table(out)}
    assert "done" in statuses and statuses & {"pending", "failed"}  # some written, the rest left to the rerun
    monkeypatch.undo()
    summary = run(small_genome, out, ray_address, outputs="dnase:128")
    assert summary.status == "complete" and summary.computed
    check_every_bin_once(out, small_genome, [Output("dnase", 128)])


@pytest.fixture(scope="module")
def nan_weights(tmp_path_factory) -> Path:
    """The demo weights with one human ATAC track at 128 bp made NaN."""
    weights = load_weights(demo_weights())
    tensors = dict(weights.tensors)
    bias = tensors["heads.atac.res_128.linear.b"].copy()
    bias[0, 0] = np.nan
    tensors["heads.atac.res_128.linear.b"] = bias
    path = tmp_path_factory.mktemp("nan-weights") / "nan.safetensors"
    save_weights(path, tensors, SMALL, weights.metadata_json)
    return path


@pytest.mark.parametrize("mode", ["flag", "fail"])
def test_nonfinite_predictions_are_counted_or_stop_the_run(tmp_path, small_genome, ray_address, nan_weights, mode):
    out = tmp_path / "out"
    summary = run(small_genome, out, ray_address, weights=str(nan_weights), outputs="atac:128", contigs="chrM,chr2", on_nonfinite=mode)
    windows = read_windows_table(out)
    manifest = read_json(out / "manifest.json")
    if mode == "flag":
        assert summary.status == "complete"
        assert all(w.nonfinite_count == len(kept_rows(w, 128)) for w in windows)  # one NaN track
        assert manifest["nonfinite_total"] == sum(w.nonfinite_count for w in windows) > 0
    else:
        assert summary.status == "failed" and "--on-nonfinite fail" in summary.error
        assert manifest["status"] == "failed"
        failed = [w for w in windows if w.status == "failed"]
        assert failed and all(w.nonfinite_count and not w.parts for w in failed)


@ray.remote(num_cpus=0, max_restarts=0)
class EchoWorker:
    """A stand-in for ModelWorker that returns its inputs, or dies on its first batch."""

    def __init__(self, dies: bool):
        self.dies = dies

    def predict(self, *items):
        if self.dies:
            os._exit(1)
        return list(items) if len(items) > 1 else items[0]


def test_the_io_pool_reads_windows_and_sends_each_write_to_the_least_busy_writer(small_genome, tmp_path, ray_address):
    job = prepare_job(RunOptions(genome=small_genome, out=tmp_path / "out", window=WINDOW, crop=CROP, model="demo"))
    pool = IoPool(job, ray.get_runtime_context().get_node_id(), writers=2, readers=1, restarts=0)
    try:
        windows = list(job.windows())
        read = ray.get([pool.read(w) for w in windows])
        genome = open_genome(small_genome)
        for w, r in zip(windows, read):  # base codes 0..4: no base, A, C, G, T; all-N spans skipped
            sequence = genome.fetch(w.chrom, w.start, w.end)
            assert r.window == w and isinstance(r, SkippedWindow) == is_all_n(sequence[w.out_start - w.start : w.out_end - w.start])
            assert isinstance(r, SkippedWindow) or np.array_equal(r.codes, one_hot(sequence) @ np.arange(1, 5))
        assert any(isinstance(r, EncodedWindow) for r in read)
        windows = windows[:3]
        skipped = [ray.put(SkippedWindow(w, 0.0)) for w in windows]  # written as records only: no files
        first, second = pool.write(skipped[0]), pool.write(skipped[1])
        assert pool.queued == [1, 1]
        pool.written(first)
        third = pool.write(skipped[2])  # to the writer that has none queued
        assert pool.queued == [1, 1] and pool.writer_of[third] == 0
        assert [r.record.status for r in ray.get([second, third])] == ["skipped_all_n"] * 2
    finally:
        pool.close()


def test_the_reading_and_writing_processes_do_not_import_torch():
    """A run starts one writer per free CPU (dozens on a GPU host) beside its model workers: their
    modules must not load torch (seconds of CPU and hundreds of MB each)."""
    code = "import sys, agpipe.jobs.windows, agpipe.jobs.writer; print(sorted(m for m in ('torch', 'jax') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_a_run_writes_its_ray_timeline_and_the_benchmark_reads_it(small_genome, tmp_path, ray_address):
    sys.path.insert(0, str(REPO / "scripts"))
    from bench_pipeline import timeline_summary

    trace = tmp_path / "trace" / "run.json"
    options = RunOptions(genome=small_genome, out=tmp_path / "out", window=WINDOW, crop=CROP, model="demo", parity_sample=0)
    summary = run_job(options, ray_address=ray_address, progress=False, log=lambda message: None, timeline=trace)
    found = timeline_summary(trace)  # the session's Ray instance: earlier tests' tasks are in it too
    assert found["ModelWorker.predict"]["tasks"] >= summary.computed > 0
    assert found["PredictionWriter.write"]["tasks"] >= summary.counts["done"] + summary.counts["skipped_all_n"]
    assert found["GenomeReader.read"]["execute_median_ms"] > 0 and found["windows_per_s"] > 0
    assert 0 <= min(found["ModelWorker.predict"]["idle_fraction"].values()) <= 1


def test_windows_in_flight_keep_each_writer_a_window_ahead_within_the_object_store():
    four_gpus = Execution("cuda", "bfloat16", True, batch_size=1, workers=4, worker_cpus=1)
    at_model = BATCHES_PER_WORKER * 4
    window = 18 * 2**20
    # a writer per CPU left, each writing one window with the next waiting
    assert windows_in_flight(four_gpus, window, 2**40, io_cpus=60) == at_model + 120
    # the object store's share caps it, but never under the batches at the model
    small_store = 40 * window / OBJECT_STORE_SHARE
    assert windows_in_flight(four_gpus, window, small_store, io_cpus=60) == 40
    assert windows_in_flight(four_gpus, window, window, io_cpus=60) == at_model
    # few CPUs left: the writers still get as many as the model holds
    assert windows_in_flight(four_gpus, window, 2**40, io_cpus=2) == 3 * at_model


def test_windows_of_a_worker_dead_for_good_go_to_the_others(ray_address):
    windows = [Window(i, "chr1", 100 * i, 100 * i + 100, 100 * i, 100 * i + 100) for i in range(20)]
    workers = [EchoWorker.remote(True), EchoWorker.remote(False)]
    stream = WindowStream(iter(windows), workers, batch_size=2, limit=6, io=EchoIo())
    outcomes = list(stream)
    assert sorted(w.window_id for w, _ in outcomes) == list(range(20))
    assert all(outcome == w for w, outcome in outcomes) and stream.lost_workers is None


def test_the_stream_ends_only_when_every_window_is_written(ray_address):
    """A slow driver (recording each window takes a while): by the time it looks again, the batches at
    the worker are done and so are their windows' writes, so at times nothing is being written
    while batches are still counted at the worker."""
    windows = [Window(i, "chr1", 100 * i, 100 * i + 100, 100 * i, 100 * i + 100) for i in range(20)]
    stream = WindowStream(iter(windows), [EchoWorker.remote(False)], batch_size=1, limit=10, io=EchoIo())
    written = []
    for window, _ in stream:
        written.append(window.window_id)
        time.sleep(0.2)
    assert sorted(written) == list(range(20))
