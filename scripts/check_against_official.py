"""End-to-end check against the official model: the official alphagenome_research model with random
weights -> its Orbax checkpoint -> `agpipe convert` -> `agpipe run` (float32, CPU, one window equal
to the sequence, no crop, every output) on a FASTA of the same sequence -> the Parquet values
compared with the official predictions for every genome-track head.

Needs a Python with alphagenome_research (and its dependencies) installed, given as --official-python;
agpipe runs in this interpreter. Nothing of alphagenome_research is part of agpipe.

    python scripts/check_against_official.py --official-python /path/to/venv/bin/python --length 16384
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq

# Runs in the official environment: random weights of realistic scale for every array of the
# official tree (Haiku's own init leaves conv kernels at zero), the Orbax checkpoint as published
# (StandardCheckpointer, (params, state)), and the official float32 predictions.
OFFICIAL_SIDE = textwrap.dedent(
    """
    import sys, numpy as np, jax, haiku as hk, orbax.checkpoint as ocp
    from alphagenome.models import dna_model as dm
    from alphagenome_research.model import model as model_lib
    from alphagenome_research.model.metadata import metadata as metadata_lib
    out, length, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    md = {o: metadata_lib.load(o) for o in (dm.Organism.HOMO_SAPIENS, dm.Organism.MUS_MUSCULUS)}
    f = hk.transform_with_state(lambda x, o: model_lib.AlphaGenome(md)(x, o))
    rng = np.random.default_rng(seed)
    seq = rng.choice(list(b"ACGT"), size=length).astype(np.uint8)
    x = np.eye(4, dtype=np.float32)[np.searchsorted(np.frombuffer(b"ACGT", np.uint8), seq)][None]
    org = np.zeros(1, np.int32)
    params, state = jax.eval_shape(f.init, jax.random.PRNGKey(0), x, org)
    def value(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "var_ema": return rng.uniform(0.5, 2.0, shape).astype(np.float32)
        if name == "scale": return (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        if name in ("offset", "b", "bias"): return (0.05 * rng.standard_normal(shape)).astype(np.float32)
        if name == "residual_scale": return np.float32(0.5)
        fan = int(np.prod(shape[:-1])) if len(shape) == 3 and name == "w" else (shape[-2] if len(shape) >= 2 else 1)
        return (rng.standard_normal(shape) / np.sqrt(max(fan, 1))).astype(np.float32)
    params = jax.tree_util.tree_map_with_path(value, params)
    state = jax.tree_util.tree_map_with_path(value, state)
    ocp.StandardCheckpointer().save(out + "/checkpoint", (params, state))
    (pred, _), _ = jax.jit(f.apply)(params, state, None, x, org)
    arrays = {f"{h}/{k}": np.asarray(v, np.float32) for h, d in pred.items() if isinstance(d, dict) for k, v in d.items() if k.startswith("predictions_")}
    np.savez(out + "/official.npz", sequence=seq, **arrays)
    """
)


def agpipe(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "agpipe", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"agpipe {' '.join(args)} failed:\n{proc.stderr}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official-python", required=True)
    ap.add_argument("--metadata", required=True, help="folder with the official metadata textproto files")
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default=None, help="write the report as JSON here")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="agpipe-official-"))
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run([args.official_python, "-c", OFFICIAL_SIDE, str(work), str(args.length), str(args.seed)], check=True)
    official = np.load(work / "official.npz")
    (work / "genome.fa").write_bytes(b">seq\n" + official["sequence"].tobytes() + b"\n")
    agpipe("convert", str(work / "checkpoint"), "-o", str(work / "weights.safetensors"), "--metadata", args.metadata)
    agpipe(
        "run", str(work / "genome.fa"), "--weights", str(work / "weights.safetensors"), "--out", str(work / "run"),
        "--window", str(args.length), "--crop", "0", "--outputs", "all", "--precision", "float32", "--device", "cpu",
        "--num-cpus", "2", "--parity-sample", "0",
    )
    tracks = pq.read_table(work / "run" / "tracks.parquet").to_pylist()
    report, ok = {}, True
    for key in official.files:
        if key == "sequence":
            continue
        head, name = key.split("/")
        resolution = int(name.removeprefix("predictions_").removesuffix("bp"))
        cols = [t for t in tracks if t["head"] == head and t["resolution"] == resolution]
        if not cols:
            continue
        table = ds.dataset(work / "run" / "predictions" / f"head={head}" / f"resolution={resolution}", format="parquet").to_table()
        table = table.sort_by("start")
        ours = np.stack([table[c["column"]].to_numpy() for c in cols], axis=1)
        theirs = official[key][0][:, [c["track_index"] for c in cols]]
        r = float(np.corrcoef(ours.ravel(), theirs.ravel())[0, 1])
        close = float(np.mean(np.abs(ours - theirs) <= 1e-2 + 1e-2 * np.abs(theirs)))
        report[f"{head}:{resolution}"] = {"pearson": r, "within_1e-2": close, "max_abs": float(np.abs(ours - theirs).max())}
        ok &= r >= 0.9999 and close >= 0.99
    print(json.dumps(report, indent=1))
    print("PASS" if ok else "FAIL", f"({work})")
    if args.out:
        result = {"length": args.length, "seed": args.seed, "verdict": "pass" if ok else "fail", "outputs": report}
        Path(args.out).write_text(json.dumps(result, indent=1))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
