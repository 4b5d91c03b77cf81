"""The agpipe command line.

Every command turns the errors a user can fix (bad input, missing weights, unwritable output) into
one line on stderr and a non-zero exit; tracebacks are kept for bugs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from agpipe import __version__


class UserError(click.ClickException):
    """An error the user can act on: printed as one line, exit code 2."""

    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"agpipe: error: {self.message}", err=True)


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


if __name__ == "__main__":
    sys.exit(main())
