"""`agpipe run` and `agpipe demo` from the command line: bad input, --dry-run, --config, the demo."""

from __future__ import annotations

import gzip
import json
import os
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from agpipe.cli import main
from agpipe.io.fasta import demo_genome_path
from agpipe.io.parquet import write_json_atomic
from agpipe.jobs import estimate
from agpipe.jobs.demo import demo_options
from agpipe.jobs.options import RunOptions, prepare_job
from agpipe.model.weights import demo_weights

from conftest import CROP, WINDOW

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = ["--model", "demo"]


def invoke(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *words: str) -> None:
    assert result.exit_code != 0, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("agpipe: error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def fasta(tmp_path: Path, content: bytes, name: str = "genome.fa") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


BAD_GENOMES = {
    "missing": (None, "does not exist"),
    "directory": ("dir", "is a directory"),
    "not FASTA": (b"hello world\n", "not FASTA"),
    "plain gzip": (gzip.compress(b">chr1\nACGT\n"), "bgzip"),
    "empty": (b"", "empty"),
    "duplicate names": (b">chr1\nACGT\n>chr1\nACGT\n", "appears twice"),
    "control character in a name": (b">chr\x01x\nACGT\n", "control characters"),
}


@pytest.mark.parametrize("case", BAD_GENOMES)
def test_a_bad_genome_is_one_line_and_writes_nothing(tmp_path, case):
    content, words = BAD_GENOMES[case]
    genome = tmp_path / "genome.fa"
    if content == "dir":
        genome.mkdir()
    elif content is not None:
        genome.write_bytes(content)
    out = tmp_path / "out"
    assert_one_line_error(invoke("run", genome, "--out", out, *DEMO_MODEL), words)
    assert not out.exists()


BAD_OPTIONS = {
    "window not a multiple of 2048": (["--window", "10000"], "multiple of 2048"),
    "window too large": (["--window", str(2**21)], "larger than"),
    "crop too large": (["--window", "8192", "--crop", "4096"], "leaves nothing"),
    "crop off the grid": (["--window", "8192", "--crop", "100"], "multiple of 128"),
    "unknown head": (["--outputs", "atac:128,foo:128"], "unknown head 'foo'"),
    "unknown resolution": (["--outputs", "chip_tf:1"], "no 1 bp output"),
    "head without tracks": (["--organism", "mouse", "--outputs", "procap:128"], "procap"),
    "unknown contig": (["--contigs", "chr1,chr9"], "chr9"),
}


@pytest.mark.parametrize("case", BAD_OPTIONS)
def test_a_bad_option_is_one_line_and_writes_nothing(tmp_path, small_genome, case):
    options, words = BAD_OPTIONS[case]
    out = tmp_path / "out"
    assert_one_line_error(invoke("run", small_genome, "--out", out, *DEMO_MODEL, *options), words)
    assert not out.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_genome_is_one_line_and_writes_nothing(tmp_path, small_genome):
    genome = fasta(tmp_path, small_genome.read_bytes())
    genome.chmod(0)
    out = tmp_path / "out"
    assert_one_line_error(invoke("run", genome, "--out", out, *DEMO_MODEL), "cannot read")
    assert not out.exists()


def test_missing_weights_point_to_the_download(tmp_path, small_genome):
    out = tmp_path / "out"
    assert_one_line_error(invoke("run", small_genome, "--out", out), "agpipe weights download", "--model demo")
    assert not out.exists()


def test_cuda_without_a_gpu_is_one_line_and_writes_nothing(tmp_path, small_genome, ray_address):
    out = tmp_path / "out"
    args = ("run", small_genome, "--out", out, *DEMO_MODEL, "--window", WINDOW, "--device", "cuda", "--ray-address", ray_address)
    assert_one_line_error(invoke(*args), "--device cuda", "no GPU")
    assert not out.exists()


def test_a_folder_holding_another_run_is_refused_untouched(tmp_path, small_genome):
    out = tmp_path / "out"
    options = RunOptions(genome=small_genome, out=out, window=WINDOW, crop=CROP, model="demo")
    job = prepare_job(options)
    out.mkdir()
    manifests = {
        "another window": ({**job.identity(), "window": 16384}, job.weights.sha256, "holds another run"),
        "other weights": (job.identity(), "0" * 64, "other weights"),
    }
    for identity, sha256, words in manifests.values():
        write_json_atomic(out / "manifest.json", {"identity": identity, "weights": {"sha256": sha256}})
        before = sorted(p.name for p in out.iterdir())
        result = invoke("run", small_genome, "--out", out, *DEMO_MODEL, "--window", WINDOW, "--crop", CROP)
        assert_one_line_error(result, words)
        assert sorted(p.name for p in out.iterdir()) == before
    (out / "manifest.json").write_text("{not json")
    assert_one_line_error(invoke("run", small_genome, "--out", out, *DEMO_MODEL), "--overwrite")


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, small_genome):
    out = tmp_path / "out"
    result = invoke("run", small_genome, "--out", out, *DEMO_MODEL, "--window", WINDOW, "--crop", CROP, "--dry-run")
    assert result.exit_code == 0, result.output
    job = prepare_job(RunOptions(genome=small_genome, out=out, window=WINDOW, crop=CROP, model="demo"))
    assert f"{job.window_count:,} of {WINDOW:,} bp" in result.stdout and f"{job.bases:,} bases" in result.stdout
    assert "before compression" in result.stdout and "not measured yet" in result.stdout
    assert not out.exists()


def test_dry_run_gpu_time_comes_from_the_newest_matching_measurement(tmp_path, small_genome, monkeypatch):
    results = tmp_path / "results"
    results.mkdir()
    monkeypatch.setattr(estimate, "BENCHMARK_RESULTS", results)
    args = ("run", small_genome, *DEMO_MODEL, "--window", WINDOW, "--crop", CROP, "--outputs", "dnase:128,atac:1", "--dry-run")
    measured = {"window": WINDOW, "outputs": ["atac:1", "dnase:128"], "config": "small", "device": "Test GPU", "precision": "bfloat16"}
    for name, ms, extra in (("old.json", 100.0, {}), ("other-window.json", 1.0, {"window": 2 * WINDOW}), ("new.json", 250.0, {})):
        (results / name).write_text(json.dumps({**measured, "ms_per_window": ms, **extra}))
        time.sleep(0.01)  # newest by modification time
    (results / "broken.json").write_text("{")
    job = prepare_job(RunOptions(genome=small_genome, out=tmp_path, window=WINDOW, crop=CROP, model="demo"))
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert f"{250 * job.window_count / 3.6e6:.2f} GPU-hours at 250 ms per window (Test GPU, bfloat16, new.json)" in result.stdout


def test_regions_and_contigs_filter_the_whole_genome_plan(tmp_path, small_genome):
    bed = tmp_path / "regions.bed"
    bed.write_text("chr2\t7000\t7001\nchrM\t0\t10\n")
    whole = list(prepare_job(RunOptions(genome=small_genome, out=tmp_path, window=WINDOW, crop=CROP, model="demo")).windows())
    job = prepare_job(RunOptions(genome=small_genome, out=tmp_path, window=WINDOW, crop=CROP, model="demo", regions=bed, contigs="chr2"))
    chosen = list(job.windows())
    assert [w.window_id for w in chosen] == [w.window_id for w in whole if w.chrom == "chr2" and w.out_start <= 7000 < w.out_end]
    assert job.window_count == 1 and job.bases == chosen[0].kept


def test_config_file_gives_defaults_and_the_command_line_wins(tmp_path, small_genome):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"genome": small_genome.name, "model": "demo", "window": 16384, "outputs": ["atac:1", "dnase:128"], "contigs": "chr1"}))
    (tmp_path / small_genome.name).symlink_to(small_genome)  # relative to the config's folder
    result = invoke("run", "--config", config, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "of 16,384 bp" in result.stdout and "atac:1 (5), dnase:128 (5)" in result.stdout and "1 of 4 contigs (chr1)" in result.stdout
    result = invoke("run", "--config", config, "--window", WINDOW, "--dry-run")
    assert f"of {WINDOW:,} bp" in result.stdout
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "demo.safetensors").symlink_to(demo_weights())
    config.write_text(yaml.safe_dump({"genome": small_genome.name, "weights": "w/demo.safetensors"}))
    result = invoke("run", "--config", config, "--dry-run")
    assert result.exit_code == 0, result.output
    assert f"weights   {(tmp_path / 'w' / 'demo.safetensors').resolve()}" in result.stdout
    config.write_text("windw: 8192\n")
    assert_one_line_error(invoke("run", small_genome, "--config", config, "--dry-run"), "unknown option 'windw'")


@pytest.mark.parametrize("name", ["demo.yaml", "genome-128bp.yaml", "regions-1bp.yaml"])
def test_shipped_configs_plan(tmp_path, name):
    bed = tmp_path / "regions.bed"
    bed.write_text("chr2\t100000\t120000\n")
    result = invoke("run", demo_genome_path(), "--config", REPO / "configs" / name, "--regions", bed, *DEMO_MODEL, "--weights", "demo-v1", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "windows" in result.stdout


def test_demo_config_is_the_demo():
    config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    demo = demo_options(Path("agpipe-demo"))
    assert (REPO / "configs" / config.pop("genome")).resolve() == demo.genome.resolve()
    assert (REPO / "configs" / config.pop("out")).resolve() == (REPO / demo.out).resolve()
    assert config.pop("crop") == demo.window // 8 and demo.crop is None  # the demo uses the default crop
    assert config == {k: getattr(demo, k) for k in config} and {"window", "model", "outputs"} <= set(config)


def test_demo_runs_queries_and_requeries(tmp_path, ray_address):
    out = tmp_path / "demo"
    result = invoke("demo", "--out", out)
    assert result.exit_code == 0, result.output
    assert "complete: 31 windows done, 3 skipped (all N)" in result.stderr
    assert "mean_dnase" in result.stdout and "chr4" in result.stdout
    result = invoke("demo", "--out", out)
    assert result.exit_code == 0 and "finished demo run" in result.stderr and "mean_dnase" in result.stdout


def test_dry_run_reads_the_model_benchmark_for_the_official_model(tmp_path):
    from types import SimpleNamespace

    from agpipe.model.config import ALL_OUTPUTS, DEFAULT_OUTPUTS

    (tmp_path / "model.json").write_text(json.dumps({
        "card": "Test H100",
        "results": [
            {"impl": "eager-f32", "length": 524288, "outputs": "128", "ms": 999.0},
            {"impl": "fast-bf16-flex-default", "length": 524288, "outputs": "128", "ms": 36.0},
            {"impl": "fast-bf16-flex-default", "length": 524288, "outputs": "all", "ms": 87.0},
        ],
    }))

    def job(outputs, config="official", window=524288):
        return SimpleNamespace(outputs=outputs, options=SimpleNamespace(window=window), weights=SimpleNamespace(config_name=config))

    assert estimate.measured_ms_per_window(job(DEFAULT_OUTPUTS), tmp_path) == (36.0, "Test H100, bfloat16 fast path, model.json")
    assert estimate.measured_ms_per_window(job(ALL_OUTPUTS), tmp_path)[0] == 87.0
    assert estimate.measured_ms_per_window(job(DEFAULT_OUTPUTS, config="small"), tmp_path) is None
    assert estimate.measured_ms_per_window(job(DEFAULT_OUTPUTS, window=131072), tmp_path) is None
