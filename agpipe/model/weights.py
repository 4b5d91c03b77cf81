"""Where weights come from: the official checkpoint (download + conversion), the demo model, and
loading either into a prepared PyTorch model. Everything that finds or loads weights asks here.
Weights are cached in AGPIPE_HOME (its layout: agpipe.home).
"""

from __future__ import annotations

import hashlib
import os
import re
import urllib.request
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from agpipe.home import agpipe_home
from agpipe.model.alphagenome import AlphaGenome
from agpipe.model.checkpoint import (
    WeightsFile,
    flatten_tree,
    official_spec,
    official_to_ours,
    random_official_tree,
    read_orbax,
    save_weights,
)
from agpipe.model.config import CONFIGS, OFFICIAL, SMALL, ModelConfig, Output
from agpipe.model.kernels import fast_attention
from agpipe.model.metadata import TrackMetadata, load_metadata, synthetic_metadata
from agpipe.model.precision import Precision, configure_backends

DEFAULT_REPO = "google/alphagenome-all-folds"
# Files that are (or usually wrap) Python pickles, which agpipe never loads: named in a clear error.
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin", ".joblib")
DEMO_NAME = "demo-v1"
DEMO_SEED = 20260127
# The official metadata, pinned to one commit of google-deepmind/alphagenome_research and checked.
METADATA_URL = (
    "https://raw.githubusercontent.com/google-deepmind/alphagenome_research/"
    "3f79219086685598d13b41c5d39e112f76dc8216/src/alphagenome_research/model/metadata/{name}"
)
METADATA_SHA256 = {
    "OutputMetadataResponse_ORGANISM_HOMO_SAPIENS.textproto": "413b4063096bbf7a75a7fdf5560030f8e3866c6af2455fb313e58686ae3d49e8",
    "OutputMetadataResponse_ORGANISM_MUS_MUSCULUS.textproto": "a22eb7b2e435ed5d34325eb2ffc575679adc1fc6d91958f8c3bf4c7c8a55a929",
}


class WeightsError(ValueError):
    """Weights that cannot be found, fetched or used (one-line message saying what to do)."""


def _offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it (1, ON, YES, TRUE in any case)."""
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def sha256_memo() -> Path:
    """Where checkpoint.file_sha256 remembers the digests of weights files."""
    return agpipe_home() / "sha256"


def weights_dir() -> Path:
    return agpipe_home() / "weights"


# ---- finding weights ----------------------------------------------------------------------------


def demo_weights() -> Path:
    """The demo model: the real architecture in the small config, deterministic random weights and
    synthetic track metadata, written once as a normal weights file and loaded like real weights."""
    path = weights_dir() / f"{DEMO_NAME}.safetensors"
    if not path.exists():
        params, state = random_official_tree(SMALL, DEMO_SEED)
        tensors = official_to_ours(params, state, SMALL)
        save_weights(path, tensors, SMALL, synthetic_metadata(SMALL).to_json())
    return path


def resolve_weights(spec: str | None, model: str) -> Path:
    """`--weights PATH|NAME` and `--model alphagenome|demo` -> the weights file to load."""
    if model == "demo" and spec is None:
        return demo_weights()
    if spec is None:
        spec = "all-folds"
    path = Path(spec)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise WeightsError(
            f"--weights {spec}: agpipe loads weights only from .safetensors files, never from pickles "
            "(loading one can run any code); convert an official checkpoint with `agpipe convert`"
        )
    if path.suffix == ".safetensors" or os.sep in spec:
        if not path.is_file():
            raise WeightsError(f"weights file {path} does not exist")
        return path
    named = weights_dir() / f"{spec}.safetensors"
    if named.is_file():
        return named
    if model == "demo" and spec == DEMO_NAME:
        return demo_weights()
    raise WeightsError(
        f"no AlphaGenome weights named {spec!r} in {weights_dir()}: "
        "run `agpipe weights download` (needs a Hugging Face token with the model terms accepted) or use --model demo"
    )


# ---- conversion -------------------------------------------------------------------------------


def detect_config(params: dict, state: dict) -> ModelConfig:
    """The config whose official tree the checkpoint matches (official first), for `agpipe convert`."""
    flat = {path: np.shape(a) for path, a in flatten_tree(params, state).items()}
    best, best_misses = OFFICIAL, None
    for cfg in CONFIGS.values():
        spec = official_spec(cfg)
        misses = len(set(spec) ^ set(flat)) + sum(1 for p, (_, shape) in spec.items() if p in flat and flat[p] != shape)
        if best_misses is None or misses < best_misses:
            best, best_misses = cfg, misses
    return best


def official_metadata_dir(fetch: bool = True) -> Path:
    """The official textproto metadata in the cache, downloaded (pinned, sha256-checked) when missing."""
    directory = agpipe_home() / "metadata"
    for name, digest in METADATA_SHA256.items():
        path = directory / name
        if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() == digest:
            continue
        if not fetch or _offline():
            raise WeightsError(f"official track metadata not in {directory}: pass --metadata DIR (the official textproto files)")
        try:
            with urllib.request.urlopen(METADATA_URL.format(name=name), timeout=60) as response:
                data = response.read()
        except OSError as e:
            raise WeightsError(f"cannot download the official track metadata ({e}): pass --metadata DIR (the official textproto files)") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise WeightsError(f"downloaded {name} does not match its pinned sha256: pass --metadata DIR")
        directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return directory


def convert_checkpoint(checkpoint_dir: str | os.PathLike, out: str | os.PathLike, metadata_dir: str | os.PathLike | None) -> ModelConfig:
    """An official Orbax checkpoint -> our weights file with its track metadata. Returns the config."""
    params, state = read_orbax(checkpoint_dir)
    cfg = detect_config(params, state)
    tensors = official_to_ours(params, state, cfg)
    if metadata_dir is not None:
        metadata = load_metadata(metadata_dir)
    elif cfg == OFFICIAL:
        metadata = load_metadata(official_metadata_dir())
    else:
        metadata = synthetic_metadata(cfg)
    metadata.check_against(cfg)
    save_weights(out, tensors, cfg, metadata.to_json())
    return cfg


def download_weights(repo: str, revision: str | None, name: str, metadata_dir: str | os.PathLike | None) -> Path:
    """Downloads an official checkpoint from Hugging Face and converts it into the cache as `name`.

    The token comes from HF_TOKEN or the `hf auth login` cache (huggingface_hub reads both; we never
    print it). With HF_HUB_OFFLINE=1 the snapshot is taken from the local Hugging Face cache.
    """
    import huggingface_hub
    from huggingface_hub import errors

    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise WeightsError(f"weights name {name!r} must be letters, digits, '.', '_' or '-'")
    try:
        snapshot = huggingface_hub.snapshot_download(repo_id=repo, revision=revision)
    except errors.GatedRepoError:
        raise WeightsError(
            f"{repo} is gated: accept the AlphaGenome model terms at https://huggingface.co/{repo} "
            "with your account, then set HF_TOKEN or run `hf auth login`"
        ) from None
    except errors.RepositoryNotFoundError:  # also what a gated repo answers to a request without a token
        raise WeightsError(
            f"{repo} not found or not visible to you: check the name, accept the model terms at "
            f"https://huggingface.co/{repo}, then set HF_TOKEN or run `hf auth login`"
        ) from None
    except errors.LocalEntryNotFoundError:  # offline, or the Hub unreachable, and nothing cached
        if _offline():
            raise WeightsError(f"{repo} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: unset it to download") from None
        raise WeightsError(f"cannot reach the Hugging Face Hub for {repo} and it is not in the local cache: check your connection") from None
    except errors.HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        if status in (401, 403):
            raise WeightsError(
                f"access to {repo} refused ({status}): accept the model terms at https://huggingface.co/{repo} "
                "and set HF_TOKEN or run `hf auth login`"
            ) from None
        raise WeightsError(f"download of {repo} failed: {str(e).splitlines()[0]}") from None
    out = weights_dir() / f"{name}.safetensors"
    convert_checkpoint(snapshot, out, metadata_dir)
    return out


# ---- loading ----------------------------------------------------------------------------------


def load_model(
    weights: WeightsFile,
    organism: int,
    outputs: Iterable[Output],
    precision: Precision,
    device: torch.device | str,
) -> tuple[AlphaGenome, TrackMetadata]:
    """Weights file -> a PyTorch model prepared for one organism, the outputs and the dtype policy."""
    metadata = TrackMetadata.from_json(weights.metadata_json)
    outputs = tuple(outputs)
    tracks = {o.head: metadata.head_tracks(organism, o.head) for o in outputs}
    tracks.update({h: metadata.head_tracks(organism, h) for h in ("splice_sites_classification",) if any(o.head == "splice_sites_junction" for o in outputs)})
    configure_backends(precision)
    with torch.device("meta"):  # no zero-filled parameters to overwrite (~2 s at full size on one CPU)
        model = AlphaGenome(weights.cfg)
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in weights.tensors.items()}, strict=True, assign=True)
    # prepare_ folds the weights where they are: on a GPU in milliseconds, where a GPU worker's one
    # CPU thread took most of its 9-13 s model build; the second .to moves the buffers it creates.
    model.to(device)
    model.prepare_(organism, outputs, tracks, precision, attention=fast_attention(device))
    return model.to(device).eval(), metadata

