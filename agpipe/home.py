"""AGPIPE_HOME, agpipe's cache folder, and what its processes keep there before anything heavy is imported.

Layout (default ~/.cache/agpipe):
    weights/<name>.safetensors     converted weights, found later by name (`--weights all-folds`)
    weights/demo-v1.safetensors    the demo model, written on first use
    metadata/                      the official track metadata (textproto), checked by sha256
    jax-cache/                     compiled JAX reference programs (the parity check), reused across runs
    compile-cache/inductor/        torch.compile's compiled model (Inductor's FX graph and kernel caches)
    compile-cache/triton/          compiled Triton and Gluon kernels (ours and Inductor's)
    sha256/                        digests of weights files by their stat (checkpoint.file_sha256)
    pycache/                       Python bytecode, where the environment forbids writing it beside the sources
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# The variables that carry keep_bytecode's and keep_compile_cache's choices to the processes Ray
# starts on other nodes.
BYTECODE_ENV = ("PYTHONPYCACHEPREFIX", "PYTHONDONTWRITEBYTECODE")
COMPILE_CACHE_ENV = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")


def agpipe_home() -> Path:
    return Path(os.environ.get("AGPIPE_HOME", Path.home() / ".cache" / "agpipe"))


def keep_bytecode() -> None:
    """Where PYTHONDONTWRITEBYTECODE forbids bytecode beside the sources (container images often set
    it and ship torch without any), this process and the ones it starts write it to AGPIPE_HOME/pycache
    instead: otherwise every process compiles torch's ~2,500 modules again, about 10 s of each GPU
    worker's start on the H100 image. Sources are never written to. A prefix the user chose is kept."""
    if not sys.dont_write_bytecode or os.environ.get("PYTHONPYCACHEPREFIX"):
        return
    prefix = str(agpipe_home() / "pycache")
    os.environ["PYTHONPYCACHEPREFIX"] = prefix
    os.environ["PYTHONDONTWRITEBYTECODE"] = ""  # empty is unset to Python, and overrides the value on other nodes
    sys.pycache_prefix = prefix
    sys.dont_write_bytecode = False


def keep_compile_cache() -> None:
    """torch.compile's caches and Triton's in AGPIPE_HOME/compile-cache, for this process and the ones
    it starts: a worker that finds the model compiled starts in ~20 s instead of ~60 (H100,
    docs/performance.md). Their defaults, /tmp/torchinductor_<user> and ~/.triton/cache, are split
    between two places and the first is lost whenever /tmp is cleared. A folder the user chose is kept."""
    folder = agpipe_home() / "compile-cache"
    for name, sub in zip(COMPILE_CACHE_ENV, ("inductor", "triton")):
        os.environ.setdefault(name, str(folder / sub))
