"""The sampled JAX parity stage: the sample, the metrics, and whole runs checked against the JAX
reference (demo model on the small genome, the session's Ray instance): clean weights pass, a
perturbed or NaN tensor in our weights and a corrupted value in a part file do not."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from agpipe.cli import main
from agpipe.io.parquet import WindowRecord, read_json, read_windows_table
from agpipe.jobs.options import RunOptions
from agpipe.jobs.parity import parse_sample, sample_windows
from agpipe.jobs.run import run_job
from agpipe.model.agreement import agreement
from agpipe.model.checkpoint import load_weights, ours_to_official, save_weights, write_orbax
from agpipe.model.weights import demo_weights

from conftest import CROP, WINDOW

PARITY_FILES = {"report.md", "parity.parquet", "errors.png"}


def invoke(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def run(genome: Path, out: Path, ray_address: str, **options):
    options = {"window": WINDOW, "crop": CROP, "model": "demo", "parity_seed": 5, **options}
    return run_job(RunOptions(genome=genome, out=out, **options), ray_address=ray_address, progress=False, log=lambda message: None)


# ---------------------------------------------------------------- the sample


def records() -> list[WindowRecord]:
    """chrA: 10 windows (one skipped, one failed), chrB: 5 (one with NaN), chrC: 1."""
    rows = []
    for i in range(16):
        chrom = "chrA" if i < 10 else "chrB" if i < 15 else "chrC"
        status = {3: "skipped_all_n", 7: "failed"}.get(i, "done")
        rows.append(WindowRecord(i, chrom, 0, 8192, 1024, 7168, status, 5 if i == 12 else 0, 0.1))
    return rows


def test_the_sample_is_seeded_stratified_and_takes_every_nonfinite_window():
    windows = records()
    done = [r for r in windows if r.status == "done"]
    assert [r.window_id for r in sample_windows(windows, 3, seed=1)] == [r.window_id for r in sample_windows(windows, 3, seed=1)]
    for seed in range(20):
        picked = sample_windows(windows, 3, seed)
        drawn = [r for r in picked if r.window_id != 12]
        assert {r.status for r in picked} == {"done"} and 12 in {r.window_id for r in picked}  # the NaN window joins
        assert {r.chrom for r in picked} == {"chrA", "chrB", "chrC"} and len(drawn) == len({r.chrom for r in drawn})  # one per contig
    assert len({tuple(r.window_id for r in sample_windows(windows, 2, seed)) for seed in range(20)}) > 5  # random within and across contigs
    fraction = sample_windows(windows, 0.25, seed=3)  # ceil(0.25 x 14 done) drawn, plus the NaN window
    assert len(fraction) in (4, 5) and 12 in {r.window_id for r in fraction}
    assert [r.window_id for r in sample_windows(windows, 100, seed=3)] == [r.window_id for r in done]


def test_parity_sample_values():
    assert parse_sample("4") == 4 and parse_sample("0.01") == 0.01 and parse_sample(0) == 0 and parse_sample("2.0") == 2
    for bad in ("1.5", "-1", "many", "nan"):
        with pytest.raises(ValueError, match="count of windows"):
            parse_sample(bad)


# ---------------------------------------------------------------- the metrics


def test_agreement_metrics():
    rng = np.random.default_rng(0)
    reference = rng.gamma(2.0, 10.0, size=(512, 4)).astype(np.float32)
    same = agreement(reference, reference.copy(), 0.05, 0.05, block_rows=8)
    assert (same.pearson, same.max_abs_diff, same.within, same.max_scaled_error, same.bias_z) == (1.0, 0.0, 1.0, 0.0, 0.0)

    noisy = reference * (1 + 1e-3 * rng.standard_normal(reference.shape)).astype(np.float32)
    result = agreement(noisy, reference, 0.05, 0.05, block_rows=8)
    assert result.pearson > 0.9999 and result.within == 1.0 and abs(result.bias_z) < 4 and result.values == reference.size

    scaled = agreement(reference * 1.01, reference, 0.05, 0.05, block_rows=8)  # a 1% scale: only the bias shows it
    assert scaled.within == 1.0 and scaled.bias_z > 5 and abs(scaled.bias_relative - 0.01) < 1e-4

    corrupted = reference.copy()
    corrupted[100, 2] = corrupted[100, 2] * 3 + 50
    one = agreement(corrupted, reference, 0.05, 0.05)
    assert one.within > 0.999 and one.max_scaled_error > 1 and one.max_abs_diff == pytest.approx(reference[100, 2] * 2 + 50, rel=1e-5)

    holes = reference.copy()
    holes[0, 0], holes[1, 1] = np.nan, np.inf
    nonfinite = agreement(holes, reference, 0.05, 0.05)
    assert (nonfinite.nonfinite_ours, nonfinite.nonfinite_reference, nonfinite.values) == (2, 0, reference.size - 2)
    assert nonfinite.pearson == pytest.approx(1.0)


# ---------------------------------------------------------------- whole runs


OUTPUTS = "atac:1,dnase:128,contact_maps,splice_sites_classification,splice_sites_junction"


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, small_genome, ray_address) -> Path:
    """A run of every kind of output (1 and 128 bp tracks, contact maps, splice sites, junctions)
    on three contigs, checked with 3 windows: one per contig."""
    out = tmp_path_factory.mktemp("clean") / "out"
    summary = run(small_genome, out, ray_address, outputs=OUTPUTS, contigs="chr2,odd:name/1,chrM", parity_sample=3)
    assert summary.status == "complete"
    return out


def test_clean_weights_pass(clean_run):
    manifest = read_json(clean_run / "manifest.json")
    parity = manifest["parity"]
    assert parity["verdict"] == "pass" and parity["summary"].startswith("pass:") and parity["profile"] == "f32_vs_f32"
    assert parity["seed"] == manifest["config"]["parity_seed"] == 5
    windows = {r.window_id: r for r in read_windows_table(clean_run)}
    assert {windows[i].chrom for i in parity["windows"]} == {"chr2", "odd:name/1", "chrM"}
    table = pq.read_table(clean_run / "parity" / "parity.parquet").to_pylist()
    assert len(table) == 3 * 5 and all(row["pass"] and row["part_intact"] for row in table)
    compared = {head: sum(row["values"] for row in table if row["head"] == head) for head in {row["head"] for row in table}}
    assert compared["splice_sites_junction"] > 0 and compared["contact_maps"] > 0  # junction pairs both sides predicted, kept bin pairs
    # float32 on the CPU: the written values agree with the reference to ~1e-6 (relative).
    assert all(row["max_scaled_error"] < 1e-5 and row["pearson"] > 0.99999 for row in table if row["values"] > 1)
    names = {p.name for p in (clean_run / "parity").iterdir()}
    assert PARITY_FILES | {f"scatter-{h}.png" for h in ("atac", "dnase", "contact_maps", "splice_sites_junction")} <= names
    assert (clean_run / "parity" / "report.md").read_text().startswith("# Parity check: pass\n")


def test_parity_command_checks_a_run_again_and_catches_a_corrupted_value(clean_run, tmp_path, ray_address):
    result = invoke("parity", clean_run, "--ray-address", ray_address)
    assert result.exit_code == 0, result.output
    names = {p.name for p in (clean_run / "parity").iterdir()}
    assert "parity pass:" in result.stderr and PARITY_FILES <= names and "scatter-dnase.png" in names
    manifest = read_json(clean_run / "manifest.json")
    assert manifest["parity"]["verdict"] == "pass" and manifest["parity"]["seed"] == 5  # the run's sample again

    # One value of a sampled window's part file rewritten after the run: the check reads it back.
    out = tmp_path / "copy"
    shutil.copytree(clean_run, out)
    window = next(r for r in read_windows_table(out) if r.window_id == manifest["parity"]["windows"][0])
    part = out / next(p.path for p in window.parts if "head=dnase" in p.path)
    table = pq.read_table(part)
    column = table.column_names[4]
    values = table[column].to_numpy().copy()
    values[len(values) // 2] = values[len(values) // 2] * 1.5 + 1
    pq.write_table(table.set_column(4, column, [values]), part)
    result = invoke("parity", out, "--ray-address", ray_address)
    assert result.exit_code == 3, result.output
    assert "diverged: dnase:128" in result.stderr
    rows = [r for r in pq.read_table(out / "parity" / "parity.parquet").to_pylist() if not r["pass"]]
    assert [(r["window_id"], r["head"], r["pass_worst"], r["part_intact"]) for r in rows] == [(window.window_id, "dnase", False, False)]
    report = (out / "parity" / "report.md").read_text()
    assert report.startswith("# Parity check: diverged\n") and "## Failed comparisons" in report


@pytest.fixture(scope="module")
def official_checkpoint(tmp_path_factory) -> Path:
    """The demo weights as an official Orbax checkpoint: the reference's untouched weights."""
    weights = load_weights(demo_weights())
    directory = tmp_path_factory.mktemp("orbax") / "checkpoint"
    write_orbax(directory, *ours_to_official(weights.tensors, weights.cfg))
    return directory


def modified_weights(tmp_path: Path, tensor: str, change) -> Path:
    """A copy of the demo weights with one tensor changed (ours only: the checkpoint keeps it)."""
    weights = load_weights(demo_weights())
    tensors = dict(weights.tensors)
    tensors[tensor] = change(tensors[tensor].copy())
    path = tmp_path / "weights.safetensors"
    save_weights(path, tensors, weights.cfg, weights.metadata_json)
    return path


def test_a_perturbed_head_is_reported_diverged(tmp_path, small_genome, ray_address, official_checkpoint):
    weights = modified_weights(tmp_path, "heads.atac.res_128.linear.w", lambda w: w * 1.2)
    out = tmp_path / "out"
    result = invoke(
        "run", small_genome, "--out", out, "--model", "demo", "--weights", weights, "--window", WINDOW, "--crop", CROP,
        "--outputs", "atac:128,dnase:128", "--contigs", "chrM,odd:name/1", "--reference-checkpoint", official_checkpoint,
        "--ray-address", ray_address,
    )
    assert result.exit_code == 3, result.output
    parity = read_json(out / "manifest.json")["parity"]
    assert parity["verdict"] == "diverged" and parity["diverged"] == ["atac:128"]
    assert parity["summary"].startswith("diverged: atac:128 ") and parity["reference"]["checkpoint"] == str(official_checkpoint.resolve())
    assert "diverged: atac:128" in result.stderr and "parity.parquet" not in result.stderr
    failed = {r["head"] for r in pq.read_table(out / "parity" / "parity.parquet").to_pylist() if not r["pass"]}
    assert failed == {"atac"}


def test_a_nan_weight_is_reported_nonfinite(tmp_path, small_genome, ray_address, official_checkpoint):
    def plant_nan(bias):
        bias[0, 0] = np.nan
        return bias

    weights = modified_weights(tmp_path, "heads.dnase.res_128.linear.b", plant_nan)
    out = tmp_path / "out"
    summary = run(small_genome, out, ray_address, weights=str(weights), outputs="atac:128,dnase:128", contigs="chrM", reference_checkpoint=official_checkpoint)
    assert summary.status == "complete" and summary.parity["verdict"] == "nonfinite"
    assert "the reference is finite" in summary.parity["summary"]
    windows = read_windows_table(out)
    assert all(w.nonfinite_count > 0 for w in windows) and summary.parity["nonfinite_total"] == sum(w.nonfinite_count for w in windows)
    rows = pq.read_table(out / "parity" / "parity.parquet").to_pylist()
    assert {(r["head"], r["pass_finite"]) for r in rows} == {("atac", True), ("dnase", False)}
    assert (out / "parity" / "report.md").read_text().startswith("# Parity check: nonfinite\n")


def test_parity_sample_zero_skips_the_stage(tmp_path, small_genome, ray_address):
    out = tmp_path / "out"
    result = invoke(
        "run", small_genome, "--out", out, "--model", "demo", "--window", WINDOW, "--crop", CROP, "--outputs", "dnase:128",
        "--contigs", "chrM", "--parity-sample", "0", "--ray-address", ray_address,
    )
    assert result.exit_code == 0, result.output
    manifest = read_json(out / "manifest.json")
    assert "parity" not in manifest and manifest["config"]["parity_sample"] == 0
    assert not (out / "parity").exists() and "parity: not checked" in result.stderr
