"""`agpipe demo`: the whole job on the bundled genome with the demo model, then a DuckDB query of it.

configs/demo.yaml holds the same settings for `agpipe run --config` (a test keeps the two equal).
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from agpipe.io.fasta import demo_genome_path
from agpipe.jobs.options import RunOptions

DEMO_WINDOW = 131_072  # crop: the default window / 8 = 16,384
TOP_BINS = 5


def demo_options(out: Path, overwrite: bool = False) -> RunOptions:
    return RunOptions(genome=demo_genome_path(), out=out, window=DEMO_WINDOW, model="demo", overwrite=overwrite)


def demo_queries(out: Path) -> list[str]:
    """The SQL the demo prints and runs: per-contig mean of the first DNase track, and its top bins."""
    folder = str(out).replace("'", "''")
    with duckdb.connect() as con:
        (column,) = con.execute(
            f"SELECT \"column\" FROM '{folder}/tracks.parquet' WHERE head = 'dnase' AND resolution = 128 ORDER BY track_index LIMIT 1"
        ).fetchone()
    track = '"' + column.replace('"', '""') + '"'
    dnase = f"read_parquet('{folder}/predictions/head=dnase/resolution=128/*/*.parquet', hive_partitioning = false)"
    return [
        f"SELECT chrom, count(*) AS bins, round(avg({track}), 4) AS mean_dnase, round(max({track}), 4) AS max_dnase\n"
        f"FROM {dnase}\nGROUP BY chrom ORDER BY chrom",
        f"SELECT chrom, start, \"end\", round({track}, 4) AS dnase\nFROM {dnase}\nORDER BY dnase DESC LIMIT {TOP_BINS}",
    ]


def demo_report(out: Path) -> str:
    """The queries and their results, as the demo prints them."""
    parts = []
    with duckdb.connect() as con:
        for sql in demo_queries(out):
            parts.append(f"{sql};\n{con.sql(sql)}")
    return "\n".join(parts)
