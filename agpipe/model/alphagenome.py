"""AlphaGenome in PyTorch: the whole official architecture, computing only the outputs asked for.

    model = AlphaGenome(cfg)                       # raw parameters, named as in our weights file
    model.load_state_dict(tensors)                  # see agpipe.model.weights
    model.prepare_(organism=0, outputs=..., tracks=..., precision=BFLOAT16)
    predictions = model(one_hot)                    # {Output: tensor}, data space, float32

`prepare_` folds inference constants, keeps one organism's real tracks, drops every module the
requested outputs do not need (no decoder without a 1 bp output), and casts to the policy's dtype.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn

from agpipe.model.config import HEADS, ModelConfig, Output
from agpipe.model.heads import (
    FusedLinear,
    JunctionHead,
    JunctionPredictions,
    MultiOrganismLinear,
    OrganismEmbedding,
    OutputEmbedder1,
    OutputEmbedder128,
    OutputPair,
    TrackHead,
    real_channels,
    to_data_space,
    top_splice_sites,
)
from agpipe.model.kernels import ATTENTION_KERNELS
from agpipe.model.metadata import HeadTracks
from agpipe.model.precision import FLOAT32, Precision
from agpipe.model.trunk import Decoder, Encoder, TransformerTower


@dataclasses.dataclass
class Embeddings:
    e1: torch.Tensor | None  # (B, S, 1536)
    e128: torch.Tensor | None  # (B, S/128, 3072)
    pair: torch.Tensor | None  # (B, S/2048, S/2048, 128)


class AlphaGenome(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.organism = OrganismEmbedding(2, cfg.trunk_channels)
        self.tower = TransformerTower(cfg)
        self.decoder = Decoder(cfg)
        self.embed128 = OutputEmbedder128(cfg)
        self.embed1 = OutputEmbedder1(cfg)
        self.embed_pair = OutputPair(cfg)
        heads: dict[str, nn.Module] = {}
        for name, spec in HEADS.items():
            c = cfg.channels(name)
            if spec.kind == "tracks":
                dims = {1: cfg.embed_1_channels, 128: cfg.embed_128_channels}
                heads[name] = nn.ModuleDict({f"res_{r}": TrackHead(dims[r], c) for r in spec.resolutions})
            elif spec.kind == "contact_maps":
                heads[name] = MultiOrganismLinear(cfg.pair_dim, c)
            elif spec.kind == "splice_junction":
                heads[name] = JunctionHead(cfg)
            else:
                heads[name] = MultiOrganismLinear(cfg.embed_1_channels, c)
        self.heads = nn.ModuleDict(heads)
        self.outputs: tuple[Output, ...] = ()

    # ---- load-time specialization -------------------------------------------------------------

    def prepare_(
        self,
        organism: int,
        outputs: Iterable[Output],
        tracks: Mapping[str, HeadTracks],
        precision: Precision = FLOAT32,
        attention: str = "reference",
    ) -> AlphaGenome:
        """Specialize in place for inference: one organism, the requested outputs, one dtype policy.

        attention: "reference" (einsum + softmax, materializing (B, H, S, S) logits) or a fused
        kernel of kernels.ATTENTION_KERNELS ("flex", "triton"; kernels.fast_attention picks one).
        """
        self.outputs = tuple(outputs)
        self.organism_index = organism
        self.precision = precision
        wanted = {o.head for o in self.outputs}
        if "splice_sites_junction" in wanted:
            wanted.add("splice_sites_classification")  # junctions are read at the predicted sites
        self.need_1bp = any(o.resolution == 1 for o in self.outputs)
        self.need_128 = self.need_1bp or any(o.resolution == 128 for o in self.outputs)
        self.need_pair = "contact_maps" in wanted
        if not self.need_1bp:
            del self.decoder, self.embed1
        if not self.need_pair:
            del self.embed_pair
        for name in list(self.heads):
            if name not in wanted:
                del self.heads[name]
        for o in self.outputs:
            spec = HEADS[o.head]
            if spec.kind == "tracks" and o.head not in tracks:
                raise ValueError(f"no track metadata for {o.head}")
        for name, head in self.heads.items():
            kind = HEADS[name].kind
            if kind == "tracks":
                keep = {f"res_{o.resolution}" for o in self.outputs if o.head == name}
                for res in list(head):
                    if res not in keep:
                        del head[res]
                channels = real_channels(tracks[name].padding)
                for sub in head.values():
                    sub.select_(organism, channels)
                head.register_buffer(
                    "means", torch.as_tensor(np.asarray(tracks[name].nonzero_mean, np.float32))[channels]
                )
            elif kind == "splice_junction":
                head.select_(organism, int(np.count_nonzero(~tracks[name].padding[: head.tissues])))
            elif kind == "splice_classification":
                head.select_(organism, None)  # the softmax runs over every class, padding included
                head.register_buffer("keep", real_channels(tracks[name].padding))
            else:
                head.select_(organism, real_channels(tracks[name].padding))
        self.fused = nn.ModuleDict()
        for r in sorted({o.resolution for o in self.outputs if HEADS[o.head].kind in ("tracks", "splice_usage")}):
            linears = {
                o.head: self.heads[o.head][f"res_{r}"].linear if HEADS[o.head].kind == "tracks" else self.heads[o.head]
                for o in self.outputs
                if o.resolution == r and HEADS[o.head].kind in ("tracks", "splice_usage")
            }
            self.fused[f"res_{r}"] = FusedLinear(linears)
        for module in self.modules():
            if isinstance(module, OrganismEmbedding):
                module.select_(organism)
            elif hasattr(module, "fold_"):
                module.fold_(precision.compute)
        for r, fused in self.fused.items():
            fused.activations_({
                o.head: ("sigmoid", None, None) if HEADS[o.head].kind == "splice_usage" else (
                    "squashed_track" if HEADS[o.head].squash else "track",
                    self.heads[o.head][r].output_scale, self.heads[o.head].means * o.resolution)
                for o in self.outputs if f"res_{o.resolution}" == r and o.head in fused.slices
            })
        for p in self.parameters():
            p.data = p.data.to(precision.compute)
        for block in self.tower.attn:
            block.kernel = ATTENTION_KERNELS[attention]
        return self

    # ---- forward ------------------------------------------------------------------------------

    def embed(self, one_hot: torch.Tensor) -> Embeddings:
        """(B, S, 4) one-hot -> the embeddings the prepared outputs need."""
        trunk, skips = self.encoder(one_hot.to(self.precision.compute), keep_skips=self.need_1bp)
        trunk, pair = self.tower(trunk + self.organism.vector)
        e128 = self.embed128(trunk) if self.need_128 else None
        e1 = self.embed1(self.decoder(trunk, skips), e128) if self.need_1bp else None
        return Embeddings(e1, e128, self.embed_pair(pair) if self.need_pair else None)

    def forward(
        self, one_hot: torch.Tensor, scaled: bool = False, keep: tuple[int, int] | None = None
    ) -> dict[Output, torch.Tensor | JunctionPredictions]:
        """Predictions for the prepared outputs, in the policy's output dtype.

        scaled: genome tracks in model space instead of data space.
        keep: (start, end) in bp within the window, multiples of 128: per-position outputs are only
        computed there (heads are pointwise, so this equals cropping afterwards; junctions and contact
        maps always cover the whole window).
        """
        emb = self.embed(one_hot)
        full_e1 = emb.e1
        if keep is not None:
            lo, hi = keep
            emb.e1 = None if emb.e1 is None else emb.e1[:, lo:hi]
            emb.e128 = None if emb.e128 is None else emb.e128[:, lo // 128 : hi // 128]
        out: dict[Output, torch.Tensor | JunctionPredictions] = {}
        probs = None
        if "splice_sites_classification" in self.heads:
            probs = torch.softmax(self.heads["splice_sites_classification"](full_e1), dim=-1)
        inputs = {r: emb.e1 if r == "res_1" else emb.e128 for r in self.fused}
        # one kernel for the GEMM and activations where it applies (Hopper), else GEMM then activations
        predicted = {r: fused.predictions(inputs[r], not scaled) for r, fused in self.fused.items() if fused.kernel_applies(inputs[r])}
        logits = {r: fused(inputs[r]) for r, fused in self.fused.items() if r not in predicted}
        for o in self.outputs:
            head = self.heads[o.head]
            kind = HEADS[o.head].kind
            if f"res_{o.resolution}" in predicted and kind in ("tracks", "splice_usage"):
                out[o] = predicted[f"res_{o.resolution}"][o.head]
            elif kind == "tracks":
                x = head[f"res_{o.resolution}"].activate(logits[f"res_{o.resolution}"][o.head])
                out[o] = x if scaled else to_data_space(x, head.means, o.resolution, HEADS[o.head].squash)
            elif kind == "contact_maps":
                out[o] = head(emb.pair)
            elif kind == "splice_classification":
                window_probs = probs if keep is None else probs[:, keep[0] : keep[1]]
                out[o] = window_probs[..., self.heads["splice_sites_classification"].keep]
            elif kind == "splice_usage":
                out[o] = torch.sigmoid(logits["res_1"][o.head])
            else:
                positions = top_splice_sites(probs, self.cfg.num_splice_sites, self.cfg.splice_site_threshold)
                junctions = head(full_e1, positions)
                out[o] = JunctionPredictions(junctions.positions, junctions.counts.to(self.precision.output))
                continue
            out[o] = out[o].to(self.precision.output)
        return out
