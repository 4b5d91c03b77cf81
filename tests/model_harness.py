"""Shared pieces of the numerics tests: a random official tree, both implementations, comparisons."""

from __future__ import annotations

import functools

import jax
import numpy as np
import torch

from agpipe.io.fasta import one_hot
from agpipe.model import jax_reference
from agpipe.model.alphagenome import AlphaGenome
from agpipe.model.checkpoint import official_to_ours, random_official_tree
from agpipe.model.config import HEADS, ModelConfig, Output
from agpipe.model.metadata import TrackMetadata, synthetic_metadata
from agpipe.model.precision import Precision


@functools.lru_cache(maxsize=4)
def random_model(cfg: ModelConfig, seed: int = 0):
    """(params, state, our tensors, metadata) for a random model of `cfg`."""
    params, state = random_official_tree(cfg, seed)
    return params, state, official_to_ours(params, state, cfg), synthetic_metadata(cfg)


def torch_model(cfg: ModelConfig, tensors, metadata: TrackMetadata, organism: int, outputs, precision: Precision, attention: str = "reference"):
    model = AlphaGenome(cfg)
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in tensors.items()})
    heads = {o.head for o in outputs} | {"splice_sites_classification"}
    return model.prepare_(organism, outputs, {h: metadata.head_tracks(organism, h) for h in heads}, precision, attention)


def reference_inputs(cfg: ModelConfig, metadata: TrackMetadata) -> dict:
    """track_means and junction_tissues for jax_reference.forward, from the same metadata."""
    means = {
        h: np.stack([metadata.head_tracks(o, h).nonzero_mean for o in (0, 1)])
        for h, spec in HEADS.items()
        if spec.kind == "tracks"
    }
    tissues = np.array([metadata.real_track_count(o, "splice_sites_junction") for o in (0, 1)])
    return {"track_means": means, "junction_tissues": tissues}


def reference(cfg, params, state, metadata, x: np.ndarray, organism: int, precision: str, positions=None, jit=True):
    def fn(p, s, seq, pos):
        return jax_reference.forward(
            p, s, seq, np.full((seq.shape[0],), organism, np.int32), cfg=cfg, precision=precision,
            splice_site_positions=pos, **reference_inputs(cfg, metadata),
        )

    if jit:
        return jax.jit(fn)(params, state, x, positions)
    with jax.disable_jit():
        return fn(params, state, x, positions)


def reference_output(ref_pred: dict, output: Output, metadata: TrackMetadata, organism: int) -> np.ndarray:
    """The official output for one of our Output keys, restricted to the organism's real channels."""
    spec = HEADS[output.head]
    real = ~metadata.head_tracks(organism, output.head).padding
    if spec.kind == "tracks":
        return np.asarray(ref_pred[output.head][f"predictions_{output.resolution}bp"], np.float32)[..., real]
    if spec.kind == "splice_junction":
        counts = np.asarray(ref_pred[output.head]["predictions"], np.float32)  # (B, K, K, 2T): + tissues then -
        t = real.size
        return np.stack([counts[..., :t][..., real], counts[..., t:][..., real]], axis=3)
    return np.asarray(ref_pred[output.head]["predictions"], np.float32)[..., real]


def relative_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def random_sequence(length: int, seed: int) -> bytes:
    return bytes(np.random.default_rng(seed).choice(list(b"ACGT"), size=length).astype(np.uint8))


def awkward_sequences(length: int) -> dict[str, bytes]:
    """Sequences that break naive ports: all N, soft-masked, long repeats, IUPAC codes."""
    rng = np.random.default_rng(7)
    mixed = bytearray(random_sequence(length, 3))
    mixed[length // 4 : length // 2] = b"N" * (length // 4)
    iupac = bytes(rng.choice(list(b"ACGTNRYSWKMBDHVN"), size=length).astype(np.uint8))
    return {
        "random": random_sequence(length, 1),
        "all_n": b"N" * length,
        "lowercase": random_sequence(length, 2).lower(),
        "dinucleotide_repeat": b"CA" * (length // 2),
        "homopolymer": b"A" * length,
        "n_gap": bytes(mixed),
        "iupac": iupac,
    }


def batch(*seqs: bytes) -> np.ndarray:
    return np.stack([one_hot(s) for s in seqs])
