"""Output embeddings and heads, specialized at load to one organism and its real (non-padding) tracks.

Head weights are stored per organism, (2, D, C) as in the official checkpoint; `select_` keeps the
organism's slice and the requested channels, so the matmuls only compute real tracks. Head einsums
accumulate and return float32 (the official `preferred_element_type=float32`), as do the
nonlinearities and the data-space scaling.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from agpipe.model.config import ModelConfig
from agpipe.model.kernels import HEAD_KINDS, bmm_f32_out, head_kernel_applies, head_predictions, matmul_f32_out
from agpipe.model.layers import LayerNorm, Linear, RMSBatchNorm, rope, rope_buffer, sigmoid_gelu

SOFT_CLIP = 10.0


def to_data_space(scaled: torch.Tensor, track_means: torch.Tensor, resolution: int, squash: bool) -> torch.Tensor:
    """Model-space (scaled) track predictions -> experimental data scale, as the official model defines it."""
    x = torch.where(scaled > SOFT_CLIP, (scaled + SOFT_CLIP) ** 2 / (4 * SOFT_CLIP), scaled)
    if squash:
        # x ** (1 / 0.75) as exp2 and log2: relative error < 2e-6 up to 1e6 (powf's: < 6e-7), far under
        # the bf16 output's step, and on the GPU the 1 bp RNA-seq head's math after its GEMM takes
        # 1.5 ms instead of 2.0 at 524,288 bp (`bench_kernels.py --head-transforms`, H100)
        x = torch.exp2(torch.log2(x) * (1.0 / 0.75))
    return x * (track_means * resolution)


class OrganismEmbedding(nn.Module):
    def __init__(self, num_organisms: int, d: int):
        super().__init__()
        self.embeddings = nn.Parameter(torch.zeros(num_organisms, d), requires_grad=False)

    def select_(self, organism: int) -> None:
        self.vector = nn.Parameter(self.embeddings[organism].clone(), requires_grad=False)
        del self.embeddings


class OutputEmbedder128(nn.Module):
    """gelu(RMSBatchNorm(Linear(trunk)) + organism) -> (B, S/128, 2D)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.linear = Linear(cfg.trunk_channels, cfg.embed_128_channels)
        self.norm = RMSBatchNorm(cfg.embed_128_channels)
        self.organism = OrganismEmbedding(2, cfg.embed_128_channels)

    def forward(self, trunk: torch.Tensor) -> torch.Tensor:
        return sigmoid_gelu(self.norm(self.linear(trunk)) + self.organism.vector)


class OutputEmbedder1(nn.Module):
    """gelu(RMSBatchNorm(Linear(decoder) + repeat128(Linear(emb128))) + organism) -> (B, S, 2 x 768)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.linear = Linear(cfg.encoder_channels, cfg.embed_1_channels)
        self.skip = Linear(cfg.embed_128_channels, cfg.embed_1_channels, bias=False)
        self.norm = RMSBatchNorm(cfg.embed_1_channels)
        self.organism = OrganismEmbedding(2, cfg.embed_1_channels)

    def forward(self, decoded: torch.Tensor, emb128: torch.Tensor) -> torch.Tensor:
        """decoded: (B, S, C) from the decoder; emb128: (B, S/128, 2D)."""
        x = self.linear(decoded)
        skip = self.skip(emb128)
        x = x + skip.repeat_interleave(x.shape[1] // skip.shape[1], dim=1)
        return sigmoid_gelu(self.norm(x) + self.organism.vector)


class OutputPair(nn.Module):
    """gelu(RMS LayerNorm((P + P^T) / 2) + organism) -> (B, S/2048, S/2048, F)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = LayerNorm(cfg.pair_dim, rms=True)
        self.organism = OrganismEmbedding(2, cfg.pair_dim)

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        x = (pair + pair.transpose(1, 2)) / 2.0
        return sigmoid_gelu(self.norm(x) + self.organism.vector)


def pad_columns(w: torch.Tensor, multiple: int = 64) -> torch.Tensor:
    """Zero columns up to a multiple of 64: cuBLAS falls back to slow kernels for odd widths."""
    return torch.nn.functional.pad(w, (0, (-w.shape[-1]) % multiple))


class MultiOrganismLinear(nn.Module):
    """Organism-specific linear layer; after `select_`, only one organism's chosen channels remain."""

    def __init__(self, d_in: int, d_out: int, num_organisms: int = 2):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(num_organisms, d_in, d_out), requires_grad=False)
        self.b = nn.Parameter(torch.zeros(num_organisms, d_out), requires_grad=False)

    def select_(self, organism: int, channels: torch.Tensor | None) -> None:
        w, b = self.w[organism], self.b[organism]
        if channels is not None:
            w, b = w[:, channels], b[channels]
        self.width = w.shape[1]
        self.weight = nn.Parameter(pad_columns(w).contiguous(), requires_grad=False)
        self.bias = nn.Parameter(pad_columns(b).contiguous(), requires_grad=False)
        del self.w, self.b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (matmul_f32_out(x, self.weight) + self.bias.float())[..., : self.width]


class FusedLinear(nn.Module):
    """The selected linear layers of every head that reads one embedding, run as one GEMM.

    Takes over the weights of the given MultiOrganismLinear layers (already `select_`ed); returns
    each head's float32 logits as a view of the one result.
    """

    def __init__(self, linears: dict[str, MultiOrganismLinear]):
        super().__init__()
        self.slices: dict[str, tuple[int, int]] = {}
        weights, biases, start = [], [], 0
        for name, linear in linears.items():
            self.slices[name] = (start, start + linear.width)
            start += linear.width
            weights.append(linear.weight[:, : linear.width])
            biases.append(linear.bias[: linear.width])
            del linear.weight, linear.bias
        self.weight = nn.Parameter(pad_columns(torch.cat(weights, dim=1)).contiguous(), requires_grad=False)
        self.bias = nn.Parameter(pad_columns(torch.cat(biases)).contiguous(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = matmul_f32_out(x, self.weight) + self.bias.float()
        return {name: y[..., a:b] for name, (a, b) in self.slices.items()}

    def activations_(self, heads: dict[str, tuple[str, torch.Tensor | None, torch.Tensor | None]]) -> None:
        """Each column's activation for `predictions`: per head its kind (`kernels.HEAD_KINDS`), output
        scale (softplus of the learnt scale) and data-space factor (track mean x resolution), float32;
        padding columns are tracks of scale 0. Built where the weights are (no copies to the host)."""
        n, device = self.weight.shape[1], self.weight.device
        kinds = torch.zeros(n, dtype=torch.int32, device=device)
        scale, data = torch.zeros(n, device=device), torch.zeros(n, device=device)
        for name, (kind, head_scale, head_data) in heads.items():
            a, b = self.slices[name]
            kinds[a:b] = HEAD_KINDS[kind]
            if head_scale is not None:
                scale[a:b], data[a:b] = head_scale, head_data
        for name, t in (("kinds", kinds), ("column_scale", scale), ("column_data", data)):
            self.register_buffer(name, t, persistent=False)

    def kernel_applies(self, x: torch.Tensor) -> bool:
        return hasattr(self, "kinds") and head_kernel_applies(x, self.weight)

    def predictions(self, x: torch.Tensor, data_space: bool) -> dict[str, torch.Tensor]:
        """Every head's predictions in one kernel (where `kernel_applies`): the GEMM, the bias and each
        column's activation, rounded once to bf16; what `forward` and the heads' activations compute."""
        y = head_predictions(x, self.weight, self.bias.float(), self.column_scale, self.column_data, self.kinds, data_space)
        return {name: y[..., a:b] for name, (a, b) in self.slices.items()}


class TrackHead(nn.Module):
    """A genome-track head at one resolution: softplus(linear(x)) * softplus(learnt_scale)."""

    def __init__(self, d_in: int, channels: int):
        super().__init__()
        self.linear = MultiOrganismLinear(d_in, channels)
        self.learnt_scale = nn.Parameter(torch.ones(2, channels), requires_grad=False)

    def select_(self, organism: int, channels: torch.Tensor) -> None:
        self.linear.select_(organism, channels)
        self.scale = nn.Parameter(self.learnt_scale[organism, channels].contiguous(), requires_grad=False)
        del self.learnt_scale

    def fold_(self, dtype: torch.dtype) -> None:
        """softplus(scale) once, in float32 from the scale in the policy's dtype (as `activate` computed
        it on every call). Left in the forward, Inductor would evaluate it again for each predicted
        value on a GPU: it materializes a broadcast operand only when its expression is large or
        reads many inputs (`should_realize_on_reuse` in torch 2.13's source, a rule of earlier versions
        too; only the CPU backend realizes exp and log), and this one is a few ops."""
        self.register_buffer("output_scale", F.softplus(self.scale.to(dtype).float()), persistent=False)
        del self.scale

    def activate(self, logits: torch.Tensor) -> torch.Tensor:
        """Model-space predictions from this head's linear output (computed by a FusedLinear)."""
        return F.softplus(logits) * self.output_scale


@dataclasses.dataclass
class JunctionPredictions:
    """Splice junction counts for the top splice sites of each window.

    positions: (B, 4, K) 0-based positions in the window of + donors, + acceptors, - donors,
    - acceptors (-1 where fewer than K sites pass the threshold); counts: (B, K, K, 2, T) for
    donor x acceptor x strand (+, -) x tissue, zero where either site is padding (a view of a
    (B, 2, T, K, K) tensor).
    """

    positions: torch.Tensor
    counts: torch.Tensor


def top_splice_sites(probs: torch.Tensor, k: int, threshold: float) -> torch.Tensor:
    """(B, S, 5) splice-site probabilities -> (B, 4, K) positions of the K most probable sites per class.

    Matches the official selection: the top K by probability (ties to the lower position),
    dropping those under the threshold, sorted by position, padded with -1.
    """
    values, positions = torch.sort(probs[..., :4], dim=1, descending=True, stable=True)
    values, positions = values[:, :k], positions[:, :k].to(torch.float32)
    if threshold > 0:
        positions = torch.where(values < threshold, torch.inf, positions)
    positions = torch.sort(positions, dim=1).values
    positions = torch.where(torch.isinf(positions), -1.0, positions)
    return positions.transpose(1, 2).to(torch.int64)


class JunctionHead(nn.Module):
    """Donor x acceptor junction counts from 1 bp embeddings at the predicted splice sites."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.tissues = cfg.channels("splice_sites_junction")
        self.d = cfg.junction_dim
        self.register_buffer("inv_freq", rope_buffer(cfg.junction_dim, cfg.junction_rope_max_position), persistent=False)
        self.linear = MultiOrganismLinear(cfg.embed_1_channels, self.d)
        n = 2 * self.tissues * self.d
        self.pos_acceptor = nn.Parameter(torch.zeros(2, n), requires_grad=False)
        self.pos_donor = nn.Parameter(torch.zeros(2, n), requires_grad=False)
        self.neg_acceptor = nn.Parameter(torch.zeros(2, n), requires_grad=False)
        self.neg_donor = nn.Parameter(torch.zeros(2, n), requires_grad=False)

    def select_(self, organism: int, tissues: int) -> None:
        """Keeps the organism's first `tissues` tissues (the rest are padding)."""
        self.linear.select_(organism, None)
        for name in ("pos_acceptor", "pos_donor", "neg_acceptor", "neg_donor"):
            p = getattr(self, name)[organism].view(2, self.tissues, self.d)[:, :tissues]
            setattr(self, name, nn.Parameter(p.contiguous(), requires_grad=False))
        self.tissues = tissues

    def _site_logits(self, sites: torch.Tensor, idx: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """sites: (B, K, d) float32 at positions idx (B, K) -> (B, T, K, d) with RoPE at those positions,
        in the compute dtype: the official donor x acceptor einsum takes bf16 operands
        (BF16_BF16_F32) under the bf16 policy."""
        scale, offset = table.float()[0], table.float()[1]  # (T, d)
        x = scale[None, :, None, :] * sites[:, None, :, :] + offset[None, :, None, :]
        return rope(x, idx.to(torch.float32)[:, None, :], self.inv_freq).to(table.dtype)

    def forward(self, emb1: torch.Tensor, positions: torch.Tensor) -> JunctionPredictions:
        b = emb1.shape[0]
        gather = positions.clamp(min=0)  # padding sites (-1) are masked below
        rows = torch.arange(b, device=emb1.device)[:, None, None]
        sites = self.linear(emb1[rows, gather])  # (B, 4, K, d): only the selected positions are projected
        pd, pa, nd, na = (sites[:, i] for i in range(4))
        ipd, ipa, ind, ina = (positions[:, i] for i in range(4))
        strands = []
        for donors, acceptors in (
            (self._site_logits(pd, ipd, self.pos_donor), self._site_logits(pa, ipa, self.pos_acceptor)),
            (self._site_logits(nd, ind, self.neg_donor), self._site_logits(na, ina, self.neg_acceptor)),
        ):
            # one (K, d) @ (d, K) product per tissue: (B, T, K, K) donor x acceptor
            logits = bmm_f32_out(donors.flatten(0, 1), acceptors.flatten(0, 1).transpose(1, 2))
            strands.append(logits.view(donors.shape[:3] + (acceptors.shape[2],)))
        valid = torch.stack(
            [(ipd >= 0)[:, :, None] & (ipa >= 0)[:, None, :], (ind >= 0)[:, :, None] & (ina >= 0)[:, None, :]], dim=1
        )  # (B, 2, K, K)
        counts = torch.where(valid[:, :, None], F.softplus(torch.stack(strands, dim=1)), 0.0)  # (B, 2, T, K, K)
        # (B, K, K, 2, T) as a view: the layout the GEMMs wrote, as transposing it took 2.7 ms a window
        return JunctionPredictions(positions, counts.permute(0, 3, 4, 1, 2))


def real_channels(padding: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.flatnonzero(~np.asarray(padding, dtype=bool)), dtype=torch.long)
