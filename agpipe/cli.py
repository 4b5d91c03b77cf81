"""The agpipe command line.

Every command turns the errors a user can fix (bad input, missing weights, unwritable output) into
one line on stderr and a non-zero exit; tracebacks are kept for bugs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from agpipe import __version__
from agpipe.jobs.plan import DEFAULT_WINDOW
from agpipe.model.config import ORGANISMS


class UserError(click.ClickException):
    """An error the user can act on: printed as one line, exit code 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"agpipe: error: {self.message}", err=True)


class ParityFailed(click.ClickException):
    """The parity check's verdict is not `pass`: the output is not to be trusted. Exit code 3, so
    scripts can tell it from a run that failed (2)."""

    exit_code = 3

    def show(self, file=None) -> None:
        click.echo(f"agpipe: parity: {self.message}", err=True)


class SampleSize(click.ParamType):
    """A count of windows (4), a fraction of them (0.01), or 0."""

    name = "N"

    def convert(self, value, param, ctx) -> float:
        from agpipe.jobs.parity import parse_sample

        try:
            return parse_sample(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


def user_errors(fn):
    """Turns the library's one-line ValueError/OSError subclasses into UserError."""
    import functools

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except (ValueError, OSError) as e:
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise UserError(message) from e

    return wrapped


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="agpipe")
def main() -> None:
    """Genome-scale AlphaGenome predictions: FASTA in, Parquet out.

    \b
    Start here:
      agpipe demo                              the whole job on a bundled genome with a small model
      agpipe weights download                  fetch and convert the official weights (gated)
      agpipe run genome.fa --out run1          predict a genome; rerun the same command to resume
      agpipe parity run1                       check a run against the JAX reference (again)
    """


@main.command()
@click.argument("checkpoint_dir", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out", required=True, type=click.Path(path_type=Path), help="Weights file to write (.safetensors).")
@click.option(
    "--metadata",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder with the official track metadata textproto files. Default: the cached official "
    "files (downloaded and sha256-checked on first use); synthetic metadata for non-official sizes.",
)
@user_errors
def convert(checkpoint_dir: Path, out: Path, metadata: Path | None) -> None:
    """Convert an official AlphaGenome Orbax checkpoint to an agpipe weights file.

    Every official array is mapped through one table and checked (names, shapes, dtypes); the track
    metadata is stored in the same file. Nothing is written unless the whole conversion succeeds.
    """
    from agpipe.model.checkpoint import file_sha256
    from agpipe.model.weights import convert_checkpoint

    cfg = convert_checkpoint(checkpoint_dir, out, metadata)
    size = "official" if cfg.trunk_channels == 1536 else f"{cfg.trunk_channels}-channel"
    click.echo(f"wrote {out} ({size} AlphaGenome, sha256 {file_sha256(out)[:16]}...)")


@main.group()
def weights() -> None:
    """Download and manage model weights."""


@weights.command("download")
@click.option("--repo", default="google/alphagenome-all-folds", show_default=True, help="Hugging Face model repository.")
@click.option("--revision", default=None, help="Branch, tag or commit of the repository.")
@click.option("--name", default="all-folds", show_default=True, help="Name to find the weights by later (--weights NAME).")
@click.option("--metadata", type=click.Path(path_type=Path), default=None, help="Folder with the official track metadata textproto files.")
@user_errors
def weights_download(repo: str, revision: str | None, name: str, metadata: Path | None) -> None:
    """Download official AlphaGenome weights and convert them into the cache.

    The repository is gated: accept the model terms on its Hugging Face page, then set HF_TOKEN or
    run `hf auth login`. With HF_HUB_OFFLINE=1 the local Hugging Face cache is used.
    """
    from agpipe.model.weights import download_weights

    path = download_weights(repo, revision, name, metadata)
    click.echo(f"weights ready: {path} (use --weights {name})")


# ---------------------------------------------------------------- run and demo

PATH_KEYS = ("genome", "out", "regions")  # config values that are paths, relative to the config's folder


def looks_like_path(weights: str) -> bool:
    """Whether --weights names a file rather than a cached name (as agpipe.model.weights decides)."""
    return weights.endswith(".safetensors") or "/" in weights


def load_config(ctx: click.Context, param: click.Parameter, value: Path | None) -> None:
    """--config FILE: its keys become defaults of the other options (the command line wins)."""
    if value is None:
        return
    import yaml

    try:
        data = yaml.safe_load(value.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeError, yaml.YAMLError) as e:
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise UserError(f"cannot read config {value}: {reason}") from None
    if not isinstance(data, dict):
        raise UserError(f"config {value} must be a mapping of option names to values")
    known = {p.name for p in ctx.command.params if p.name and p.expose_value}
    defaults = {}
    for key, item in data.items():
        name = str(key).replace("-", "_")
        name = {"compile": "compile_model"}.get(name, name)
        if name not in known:
            raise UserError(f"config {value}: unknown option {key!r} (options: {', '.join(sorted(known))})")
        if isinstance(item, list):
            item = ",".join(str(x) for x in item)
        if item is not None and (name in PATH_KEYS or (name == "weights" and looks_like_path(str(item)))):
            item = value.parent / Path(str(item))
        defaults[name] = item
    ctx.default_map = {**(ctx.default_map or {}), **defaults}


@main.command()
@click.argument("genome", required=False, type=click.Path(path_type=Path))
@click.option("--config", type=click.Path(path_type=Path), is_eager=True, expose_value=False, callback=load_config,
              help="YAML file of options, keyed by long option name (genome too); paths in it are relative to its folder. The command line wins.")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=None, help="Output folder. Rerun with the same folder to resume.")
@click.option("--window", type=int, default=DEFAULT_WINDOW, show_default=True, help="Window in bp: a multiple of 2048, at most 1048576.")
@click.option("--crop", type=int, default=None, help="Bases of predictions dropped on each side of a window, a multiple of 128.  [default: window/8]")
@click.option("--contigs", default=None, help="Comma-separated contigs to predict (default: all). Window ids stay those of the whole genome.")
@click.option("--regions", type=click.Path(path_type=Path), default=None, help="BED file: predict only the windows whose kept span meets a region.")
@click.option("--organism", type=click.Choice(ORGANISMS), default="human", show_default=True)
@click.option("--outputs", default="default", show_default=True,
              help="head:resolution,...; 'default' is the seven genome-track heads at 128 bp, 'all' every head and resolution.")
@click.option("--model", type=click.Choice(["alphagenome", "demo"]), default="alphagenome", show_default=True,
              help="The official AlphaGenome (weights from `agpipe weights download`) or the small demo model.")
@click.option("--weights", default=None, help="Weights file, or a name in the cache.  [default: all-folds; the demo model with --model demo]")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True, help="auto: one worker per GPU of the Ray cluster, else CPU workers.")
@click.option("--precision", type=click.Choice(["auto", "bfloat16", "float32"]), default="auto", show_default=True, help="auto: bfloat16 on GPU, float32 on CPU.")
@click.option("--compile/--no-compile", "compile_model", default=None, help="torch.compile the model.  [default: on GPU only]")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Windows per model call.  [default: 524288/window on GPU, 1 on CPU]")
@click.option("--on-nonfinite", type=click.Choice(["flag", "fail"]), default="flag", show_default=True,
              help="NaN/Inf in predictions: count them in windows.parquet, or stop the run.")
@click.option("--compression", type=click.Choice(["lz4", "zstd"]), default="lz4", show_default=True,
              help="Codec of the Parquet files: zstd makes them ~25% smaller and takes twice the CPU to write.")
@click.option("--parity-sample", type=SampleSize(), default=4, show_default=True,
              help="Windows checked against the JAX reference after the run: a count, a fraction of the done windows (0.01), or 0 for none.")
@click.option("--parity-seed", type=int, default=None, help="Seed of the parity sample.  [default: random, recorded in the manifest]")
@click.option("--reference-checkpoint", type=click.Path(path_type=Path), default=None,
              help="Official Orbax checkpoint for the parity reference.  [default: the run's weights, mapped back to the official tree]")
@click.option("--reference-precision", type=click.Choice(["auto", "float32", "bfloat16"]), default="auto", show_default=True,
              help="Precision of the parity reference; auto: the run's.")
@click.option("--fail-on-divergence/--no-fail-on-divergence", default=True, show_default=True,
              help="Exit with code 3 when the parity verdict is not pass (--no-...: only report it).")
@click.option("--ray-address", default=None, help="Ray cluster to run on.  [default: RAY_ADDRESS, else a local instance for this job]")
@click.option("--num-cpus", type=click.IntRange(min=1), default=None, help="CPUs of the local Ray instance.  [default: all]")
@click.option("--ray-timeline", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write Ray's trace of the run's tasks here (Chrome trace JSON: open in ui.perfetto.dev) to see where time goes.")
@click.option("--overwrite", is_flag=True, help="Delete agpipe's files in the output folder and start afresh.")
@click.option("--dry-run", is_flag=True, help="Print the plan and its estimated size and GPU time; write nothing.")
@user_errors
def run(
    genome: Path | None,
    out: Path | None,
    dry_run: bool,
    ray_address: str | None,
    num_cpus: int | None,
    ray_timeline: Path | None,
    compile_model: bool | None,
    fail_on_divergence: bool,
    **options,
) -> None:
    """Predict a genome: FASTA in, Parquet out (see docs/output-format.md).

    \b
    agpipe run genome.fa --out run1                        seven track heads at 128 bp, 512 kb windows
    agpipe run genome.fa --out run1 --contigs chr1,chr2    a few contigs (same window ids)
    agpipe run genome.fa --config configs/regions-1bp.yaml --regions my.bed --out run2

    Rerunning the same command resumes: windows already written (and intact) are skipped.
    After the run, a sample of windows is checked against the JAX reference (docs/parity.md); a
    verdict other than pass exits with code 3.
    """
    from agpipe.jobs.estimate import dry_run_report
    from agpipe.jobs.options import RunOptions, prepare_job
    from agpipe.jobs.run import run_job
    from agpipe.jobs.runfolder import check_run_folder

    if genome is None:
        raise UserError("give the genome FASTA: agpipe run GENOME.fa --out DIR (or genome: in --config)")
    if out is None and not dry_run:
        raise UserError("give an output folder: --out DIR")
    run_options = RunOptions(genome=genome, out=out or Path("."), compile=compile_model, **options)
    if dry_run:
        job = prepare_job(run_options)
        if out is not None:
            check_run_folder(out, job.identity(), job.weights.sha256, run_options.overwrite)
        click.echo(dry_run_report(job))
        return
    finish(run_job(run_options, ray_address=ray_address, num_cpus=num_cpus, timeline=ray_timeline), fail_on_divergence)


@main.command()
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("agpipe-demo"), show_default=True, help="Output folder.")
@click.option("--overwrite", is_flag=True, help="Run the demo again even if the folder holds a finished demo run.")
@user_errors
def demo(out: Path, overwrite: bool) -> None:
    """Run the whole job on the bundled demo genome with the demo model, then query it with DuckDB.

    The demo genome has 4 contigs (3 Mb) with N runs and soft-masked repeats; the demo model is the
    real architecture in a small config. It runs on a local Ray instance (CPU float32 unless a GPU
    is there), 131,072 bp windows, the default outputs, and checks 4 windows against the JAX
    reference. Rerunning re-queries a finished demo.
    """
    from agpipe.jobs.demo import demo_options, demo_report
    from agpipe.jobs.run import run_job

    summary = run_job(demo_options(out, overwrite))
    if summary.computed == 0 and summary.status == "complete":
        click.echo(f"{out} holds a finished demo run: querying it (--overwrite runs it again)", err=True)
    finish(summary)
    click.echo(demo_report(out))


def finish(summary, fail_on_divergence: bool = True) -> None:
    """Prints a run's closing summary; a run that did not complete exits non-zero with its error,
    and so does one whose parity verdict is not pass (unless told only to report it)."""
    for line in summary.lines(error=False):  # the error, if any, is the last line
        click.echo(line, err=True)
    if summary.status != "complete":
        raise UserError(summary.error or "the run did not complete")
    if fail_on_divergence and summary.parity is not None and summary.parity["verdict"] != "pass":
        raise ParityFailed(f"{summary.parity['verdict']}: the output is not to be trusted; see {summary.out / summary.parity['report']}")


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--sample", type=SampleSize(), default=None,
              help="Windows to check: a count, or a fraction of the done windows (0.01).  [default: as the run's last check, else 4]")
@click.option("--seed", type=int, default=None, help="Seed of the sample.  [default: as the run's last check, else random]")
@click.option("--reference-checkpoint", type=click.Path(path_type=Path), default=None,
              help="Official Orbax checkpoint for the reference.  [default: as the run's last check, else the run's weights]")
@click.option("--reference-precision", type=click.Choice(["auto", "float32", "bfloat16"]), default=None,
              help="Precision of the reference; auto: the run's.  [default: as the run's last check]")
@click.option("--ray-address", default=None, help="Ray cluster to run on.  [default: RAY_ADDRESS, else a local instance]")
@click.option("--num-cpus", type=click.IntRange(min=1), default=None, help="CPUs of the local Ray instance.  [default: all]")
@click.option("--fail-on-divergence/--no-fail-on-divergence", default=True, show_default=True,
              help="Exit with code 3 when the verdict is not pass (--no-...: only report it).")
@user_errors
def parity(
    out: Path,
    sample: float | None,
    seed: int | None,
    reference_checkpoint: Path | None,
    reference_precision: str | None,
    ray_address: str | None,
    num_cpus: int | None,
    fail_on_divergence: bool,
) -> None:
    """Check a finished run against the JAX reference of the official model (again).

    A seeded sample of windows, spread over the contigs (plus every window with NaN/Inf), is read
    from the genome as the run read it, run through the reference, and compared with what the run
    wrote. Writes OUT/parity/ (report.md, parity.parquet, plots) and the manifest's parity field.

    \b
      agpipe parity run1                              the run's check again (same sample)
      agpipe parity run1 --sample 0.01 --seed 7       another sample: 1% of the windows
      agpipe parity run1 --reference-checkpoint /ckpt/alphagenome --reference-precision float32
    """
    from agpipe.jobs.run import check_run

    record = check_run(out, sample, seed, reference_checkpoint, reference_precision, ray_address, num_cpus)
    click.echo(f"parity {record['summary']}", err=True)
    click.echo(f"report: {out / record['report']}", err=True)
    if fail_on_divergence and record["verdict"] != "pass":
        raise ParityFailed(f"{record['verdict']}: the output is not to be trusted; see {out / record['report']}")



# ---------------------------------------------------------------- analysis: tracks, query, export, plot

TABLE_ROWS_SHOWN = 40  # a terminal table longer than this shows its first and last rows


def _open_run(out: Path):
    from agpipe.io.results import open_run

    run = open_run(out)
    status = run.manifest.get("status")
    if status not in (None, "complete"):
        click.echo(f"agpipe: note: {out} has status {status!r}: only its finished windows have predictions", err=True)
    return run


def _track_options(fn):
    """--tracks, --head and --resolution: which tracks of which output (shared by query, export, plot)."""
    options = [
        click.option(
            "-t", "--tracks", "patterns", multiple=True, metavar="PATTERN",
            help="Tracks whose column, name, assay, biosample or ontology CURIE contains PATTERN (text or "
            "regex, any case); an exact column name picks that track alone. Repeat for more. Default: all.",
        ),
        click.option("--head", default=None, help="Head to read (atac, rna_seq, ...; see `agpipe tracks`)."),
        click.option("-r", "--resolution", type=int, default=None, help="Resolution in bp, when the head has several."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _text_table(table, max_rows: int | None = None) -> str:
    """A pyarrow table as aligned text; with max_rows, long tables show their first and last rows."""
    rows = table.num_rows
    if max_rows is not None and rows > max_rows:
        half = max_rows // 2
        shown = [*table.slice(0, half).to_pylist(), None, *table.slice(rows - half).to_pylist()]
    else:
        shown = table.to_pylist()
    names = table.column_names
    cells = [[("" if row[n] is None else f"{row[n]:.6g}" if isinstance(row[n], float) else str(row[n])) for n in names] if row else ["..."] * len(names) for row in shown]
    widths = [max([len(n), *(len(c[i]) for c in cells)]) for i, n in enumerate(names)]
    numeric = [t in ("int64", "float", "double", "halffloat") for t in map(str, table.schema.types)]
    lines = []
    for line in [names, *cells]:
        lines.append("  ".join(c.rjust(w) if right else c.ljust(w) for c, w, right in zip(line, widths, numeric)).rstrip())
    return "\n".join(lines)


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("-s", "--search", default=None, metavar="TEXT", help="Text or regex (any case) in the column, name, assay, biosample or ontology CURIE.")
@click.option("--head", default=None, help="Only this head.")
@click.option("-r", "--resolution", type=int, default=None, help="Only this resolution (bp).")
@user_errors
def tracks(out: Path, search: str | None, head: str | None, resolution: int | None) -> None:
    """List a run's tracks and the columns that hold them.

    \b
      agpipe tracks run1 --search K562
      agpipe tracks run1 --head atac --search 'CL:00000(84|47)'
    """
    found = _open_run(out).find_tracks(search, head, resolution)
    columns = ["head", "resolution", "column", "name", "strand", "assay", "biosample", "ontology_curie"]
    click.echo(_text_table(found.select(columns)))
    click.echo(f"{found.num_rows} tracks", err=True)


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--region", required=True, help="CHROM, CHROM:START-END or CHROM:POS; 1-based and inclusive like the UCSC browser, commas allowed.")
@_track_options
@click.option("-f", "--format", "fmt", type=click.Choice(["table", "csv", "parquet"]), default="table", show_default=True)
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, help="File to write (all rows). Default: stdout.")
@user_errors
def query(out: Path, region: str, patterns: tuple[str, ...], head: str | None, resolution: int | None, fmt: str, output: Path | None) -> None:
    """Predicted values of tracks over a region.

    Columns: chrom, start, end (0-based, half-open, as stored) and one per track; one row per bin
    overlapping the region.

    \b
      agpipe query run1 --region chr1:1,000,001-1,010,000 --head atac -r 128 --tracks K562
      agpipe query run1 --region chrX --head dnase -r 128 -f parquet -o chrX.parquet
    """
    import pyarrow.csv
    import pyarrow.parquet as pq

    from agpipe.io.export import atomic_files

    table = _open_run(out).query(region, patterns or None, head, resolution)
    if output is None:
        if fmt == "parquet":
            raise UserError("--format parquet writes a file: add -o FILE")
        if fmt == "csv":
            pyarrow.csv.write_csv(table, sys.stdout.buffer)
        else:
            click.echo(_text_table(table, TABLE_ROWS_SHOWN))
            if table.num_rows > TABLE_ROWS_SHOWN:
                click.echo(f"{table.num_rows:,} rows; all of them: --format csv, or -o FILE", err=True)
        return
    with atomic_files([output]) as (temp,):
        if fmt == "parquet":
            pq.write_table(table, temp, compression="zstd")
        elif fmt == "csv":
            pyarrow.csv.write_csv(table, temp)
        else:
            temp.write_text(_text_table(table) + "\n", encoding="utf-8")
    click.echo(f"wrote {output} ({table.num_rows:,} rows, {table.num_columns - 3} tracks)", err=True)


@main.group()
def export() -> None:
    """Write tracks as genome-browser files, one per track."""


@export.command("bigwig")
@click.argument("out", type=click.Path(path_type=Path))
@_track_options
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path), help="Folder for the files.")
@user_errors
def export_bigwig(out: Path, patterns: tuple[str, ...], head: str | None, resolution: int | None, out_dir: Path) -> None:
    """One bigWig per track.

    Fixed-step records at the output's resolution, zoom levels for browsing whole contigs, the
    run's contigs in the header. Names: <head>.<r>bp.<column>.bw.

    \b
      agpipe export bigwig run1 --head atac -r 128 --tracks K562 -o bigwig/
    """
    from agpipe.io.export import export_bigwig as write_bigwigs

    run = _open_run(out)
    for path in write_bigwigs(run, run.select(patterns or None, head, resolution), out_dir):
        click.echo(path)


@export.command("bedgraph")
@click.argument("out", type=click.Path(path_type=Path))
@_track_options
@click.option("-o", "--output", "out_dir", required=True, type=click.Path(path_type=Path), help="Folder for the files.")
@click.option("--gzip", is_flag=True, help="Write .bedGraph.gz.")
@user_errors
def export_bedgraph(out: Path, patterns: tuple[str, ...], head: str | None, resolution: int | None, out_dir: Path, gzip: bool) -> None:
    """One bedGraph per track.

    chrom, start, end, value: tab-separated, sorted, no header line.

    \b
      agpipe export bedgraph run1 --head rna_seq -r 128 --tracks liver --gzip -o bedgraph/
    """
    from agpipe.io.export import export_bedgraph as write_bedgraphs

    run = _open_run(out)
    for path in write_bedgraphs(run, run.select(patterns or None, head, resolution), out_dir, compressed=gzip):
        click.echo(path)


@main.command()
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--region", required=True, help="CHROM, CHROM:START-END or CHROM:POS (1-based, inclusive, commas allowed).")
@_track_options
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="PNG file to write.")
@user_errors
def plot(out: Path, region: str, patterns: tuple[str, ...], head: str | None, resolution: int | None, output: Path) -> None:
    """Plot tracks over a region as a PNG.

    One panel per track (at most 40), genome coordinates below.

    \b
      agpipe plot run1 --region chr1:1,000,001-1,200,000 --head atac -r 128 --tracks K562 -o k562.png
    """
    from agpipe.io.plot import plot_region

    run = _open_run(out)
    width, height = plot_region(run, run.select(patterns or None, head, resolution), run.region(region), output)
    click.echo(f"wrote {output} ({width} x {height} px)", err=True)

