"""The model's shape: one config object, the official dimensions by default, and the head table.

Everything that depends on the architecture's size (the PyTorch model, the JAX reference, the
parameter mapping, the demo model) reads it from `ModelConfig`; everything that depends on what a
head is (its kind, resolutions, default channel count) reads it from `HEADS`.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

HeadKind = Literal["tracks", "splice_classification", "splice_usage", "splice_junction", "contact_maps"]
ORGANISMS = ("human", "mouse")  # organism_index 0 and 1, as in the official model


@dataclasses.dataclass(frozen=True)
class HeadSpec:
    """What a head is, independent of the model's size."""

    name: str
    kind: HeadKind
    resolutions: tuple[int, ...]
    squash: bool = False  # rna_seq: predictions are raised to 1/0.75 in data space


# Official head order (the order of alphagenome_research's HeadName).
HEADS: dict[str, HeadSpec] = {
    h.name: h
    for h in (
        HeadSpec("atac", "tracks", (1, 128)),
        HeadSpec("dnase", "tracks", (1, 128)),
        HeadSpec("procap", "tracks", (1, 128)),
        HeadSpec("cage", "tracks", (1, 128)),
        HeadSpec("rna_seq", "tracks", (1, 128), squash=True),
        HeadSpec("chip_tf", "tracks", (128,)),
        HeadSpec("chip_histone", "tracks", (128,)),
        HeadSpec("contact_maps", "contact_maps", (2048,)),
        HeadSpec("splice_sites_classification", "splice_classification", (1,)),
        HeadSpec("splice_sites_usage", "splice_usage", (1,)),
        HeadSpec("splice_sites_junction", "splice_junction", (1,)),
    )
}
TRACK_HEADS = tuple(name for name, h in HEADS.items() if h.kind == "tracks")

OFFICIAL_HEAD_CHANNELS: dict[str, int] = {
    "atac": 256,
    "dnase": 384,
    "procap": 128,
    "cage": 640,
    "rna_seq": 768,
    "chip_tf": 1664,
    "chip_histone": 1152,
    "contact_maps": 28,
    "splice_sites_classification": 5,
    "splice_sites_usage": 734,
    "splice_sites_junction": 367,  # tissues; the head predicts 2 x tissues (+ strand, then - strand)
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """AlphaGenome dimensions. The defaults are the official model's."""

    encoder_channels: int = 768  # at 1 bp
    channel_step: int = 128  # added by each of the 6 down blocks: 768 -> 1536 at 128 bp
    num_layers: int = 9
    num_heads: int = 8
    qk_dim: int = 128
    v_dim: int = 192
    pair_dim: int = 128
    seq2pair_heads: int = 32
    seq2pair_head_dim: int = 128
    pos_features: int = 32  # central-mask widths; doubled by the sign features
    junction_dim: int = 768
    num_splice_sites: int = 512
    splice_site_threshold: float = 0.1
    head_channels: tuple[tuple[str, int], ...] = tuple(OFFICIAL_HEAD_CHANNELS.items())

    # Fixed by the architecture, not by size.
    num_down_blocks = 6
    dna_kernel = 15
    conv_kernel = 5
    pair_pool = 16  # 128 bp -> 2048 bp pair resolution
    pair_update_every = 2
    rope_max_position = 8192
    junction_rope_max_position = 2**20
    soft_cap = 5.0

    @property
    def trunk_channels(self) -> int:
        return self.encoder_channels + self.num_down_blocks * self.channel_step

    @property
    def stage_channels(self) -> tuple[int, ...]:
        """Channels at 1, 2, 4, ..., 64 bp (the decoder's skips)."""
        return tuple(self.encoder_channels + i * self.channel_step for i in range(self.num_down_blocks + 1))

    @property
    def embed_128_channels(self) -> int:
        return 2 * self.trunk_channels

    @property
    def embed_1_channels(self) -> int:
        return 2 * self.encoder_channels

    def channels(self, head: str) -> int:
        return dict(self.head_channels)[head]

    def head_outputs(self, head: str) -> int:
        """Width of the head's output channel axis (junctions: two strands x tissues)."""
        n = self.channels(head)
        return 2 * n if HEADS[head].kind == "splice_junction" else n


OFFICIAL = ModelConfig()

# Same structure at a size that runs on a laptop CPU: tests and the demo model.
SMALL = ModelConfig(
    encoder_channels=32,
    channel_step=16,
    num_layers=3,
    num_heads=2,
    qk_dim=16,
    v_dim=24,
    pair_dim=16,
    seq2pair_heads=4,
    seq2pair_head_dim=8,
    pos_features=8,
    junction_dim=16,
    num_splice_sites=32,
    head_channels=(
        ("atac", 6),
        ("dnase", 6),
        ("procap", 4),
        ("cage", 5),
        ("rna_seq", 6),
        ("chip_tf", 8),
        ("chip_histone", 7),
        ("contact_maps", 3),
        ("splice_sites_classification", 5),
        ("splice_sites_usage", 5),
        ("splice_sites_junction", 3),
    ),
)

CONFIGS: dict[str, ModelConfig] = {"official": OFFICIAL, "small": SMALL}


@dataclasses.dataclass(frozen=True, order=True)
class Output:
    """One requested output: a head at one resolution (bp per value)."""

    head: str
    resolution: int

    def __str__(self) -> str:
        return f"{self.head}:{self.resolution}"


ALL_OUTPUTS: tuple[Output, ...] = tuple(Output(h, r) for h, spec in HEADS.items() for r in spec.resolutions)
DEFAULT_OUTPUTS: tuple[Output, ...] = tuple(Output(h, 128) for h in TRACK_HEADS)


def parse_outputs(text: str) -> tuple[Output, ...]:
    """`head:resolution,...`, `head` (all its resolutions), `default` or `all` -> sorted unique outputs."""
    chosen: set[Output] = set()
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        if item == "all":
            chosen.update(ALL_OUTPUTS)
            continue
        if item == "default":
            chosen.update(DEFAULT_OUTPUTS)
            continue
        head, _, res = item.partition(":")
        if head not in HEADS:
            raise ValueError(f"unknown head {head!r} in --outputs: choose from {', '.join(HEADS)}")
        spec = HEADS[head]
        if not res:
            chosen.update(Output(head, r) for r in spec.resolutions)
            continue
        try:
            resolution = int(res.removesuffix("bp"))
        except ValueError:
            raise ValueError(f"bad resolution {res!r} for {head} in --outputs: use a number of bp") from None
        if resolution not in spec.resolutions:
            allowed = ", ".join(str(r) for r in spec.resolutions)
            raise ValueError(f"{head} has no {resolution} bp output: its resolutions are {allowed}")
        chosen.add(Output(head, resolution))
    if not chosen:
        raise ValueError("--outputs names no output: use head:resolution,... or 'all'")
    return tuple(sorted(chosen, key=ALL_OUTPUTS.index))


# Positional constants, shared by the PyTorch model and the JAX reference so that both use the same
# float32 values: the correctly rounded results of the official formulas. (The official model
# evaluates them with XLA's float32 pow, which lands up to ~1e-6 away depending on the platform.)


def rope_frequencies(num_freq: int, max_position: int) -> np.ndarray:
    """RoPE inverse frequencies: 1 / (k + geomspace(1, max_position - num_freq + 1, num_freq)[k])."""
    geom = np.geomspace(1.0, max_position - num_freq + 1, num_freq, dtype=np.float64)
    return (1.0 / (np.arange(num_freq, dtype=np.float64) + geom)).astype(np.float32)


def central_mask_widths(feature_size: int, seq_length: int) -> np.ndarray:
    """Widths of the relative-position central-mask features: k + geomspace(1, L - F + 1, F, endpoint=False)[k]."""
    geom = np.geomspace(1.0, seq_length - feature_size + 1, feature_size, endpoint=False, dtype=np.float64)
    return (np.arange(feature_size, dtype=np.float64) + geom).astype(np.float32)
