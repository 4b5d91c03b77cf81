"""The AlphaGenome trunk: convolutional encoder, transformer tower with pair updates, U-Net decoder."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from agpipe.model.config import ModelConfig, central_mask_widths
from agpipe.model.kernels import ATTENTION_KERNELS, bmm_f32_out, conv_bias_residual
from agpipe.model.layers import (
    ConvBlock,
    LayerNorm,
    Linear,
    RMSBatchNorm,
    rope,
    rope_buffer,
    tanh_gelu,
)


class DnaEmbedder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c = cfg.encoder_channels
        self.conv_w = nn.Parameter(torch.zeros(cfg.dna_kernel, 4, c), requires_grad=False)
        self.conv_b = nn.Parameter(torch.zeros(c), requires_grad=False)
        self.block = ConvBlock(c, c, cfg.conv_kernel)

    def fold_(self, dtype: torch.dtype) -> None:
        # A zero 16th tap makes the GEMM's inner dimension 64: one channel block of the convolution kernel
        self.width, d_in, d_out = self.conv_w.shape
        w = F.pad(self.conv_w.to(dtype), (0, 0, 0, 0, 0, 1))
        # (out, in, 1, 1): the GEMM runs as a pointwise convolution, whose GPU kernel writes bf16 with the
        # bias added before its one rounding (a cuBLAS GEMM wrote float32 for another pass to read)
        self.weight = nn.Parameter(w.reshape(-1, d_out).t().contiguous()[:, :, None, None], requires_grad=False)
        del self.conv_w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # 4 input channels are too few for a convolution kernel to use tensor cores: read each
        # position's 15-base window (and one base more, for the zero tap) as 64 channels and run one
        # GEMM instead. The windows are a view (row i starts 4 values after row i - 1), not a copy.
        taps, half = self.weight.shape[1] // x.shape[-1], self.width // 2
        windows = F.pad(x, (0, 0, half, taps - 1 - half)).unfold(1, taps, 1)  # (B, S, 4, taps)
        x = conv_bias_residual(windows.transpose(2, 3).reshape(*x.shape[:2], -1), self.weight, self.conv_b)
        return self.block(x, residual=x)


def max_pool2(x: torch.Tensor) -> torch.Tensor:
    """Max over pairs of positions of a (B, S, C) tensor."""
    b, s, c = x.shape
    return x.view(b, s // 2, 2, c).amax(dim=2)


class DownResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, width: int):
        super().__init__()
        self.block1 = ConvBlock(c_in, c_out, width)
        self.block2 = ConvBlock(c_out, c_out, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block1(x, residual=x)  # the residual is zero-padded to the new width
        return self.block2(out, residual=out)


class Encoder(nn.Module):
    """(B, S, 4) one-hot -> (B, S/128, C) trunk and the skips at 1, 2, ..., 64 bp."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        ch = cfg.stage_channels
        self.dna_embedder = DnaEmbedder(cfg)
        self.down = nn.ModuleList(DownResBlock(ch[i], ch[i + 1], cfg.conv_kernel) for i in range(cfg.num_down_blocks))

    def forward(self, x: torch.Tensor, keep_skips: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        x = self.dna_embedder(x)
        for block in self.down:
            if keep_skips:
                skips.append(x)
            x = block(max_pool2(x))
        if keep_skips:
            skips.append(x)
        return max_pool2(x), skips


class UpResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, width: int):
        super().__init__()
        self.conv_in = ConvBlock(c_in, c_out, width)
        self.skip = ConvBlock(c_out, c_out, 1)
        self.conv_out = ConvBlock(c_out, c_out, width)
        self.residual_scale = nn.Parameter(torch.ones(()), requires_grad=False)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        c = skip.shape[-1]
        out = self.conv_in(x, residual=x[..., :c])
        out = out.repeat_interleave(2, dim=1) * self.residual_scale
        out = out + self.skip(skip)
        return self.conv_out(out, residual=out)


class Decoder(nn.Module):
    """128 bp trunk (B, S/128, C) -> 1 bp (B, S, 768) through the encoder's skips."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        ch = cfg.stage_channels
        ins = [cfg.trunk_channels] + list(reversed(ch[1:]))
        self.up = nn.ModuleList(UpResBlock(ins[i], ch[-1 - i], cfg.conv_kernel) for i in range(len(ch)))

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for block, skip in zip(self.up, reversed(skips)):
            x = block(x, skip)
        return x


def attention_probs_dtype(v: torch.Tensor) -> torch.dtype:
    """Attention weights meet V in V's dtype (bf16 under the bf16 policy, as BF16_BF16_F32 does)."""
    return v.dtype


def f32_logits(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q @ k^T accumulated in float32 (bf16 products are exact in float32)."""
    return torch.matmul(q.float(), k.float().transpose(-1, -2))


class MHABlock(nn.Module):
    """Multi-query attention: 8 query heads, one shared key/value head, RoPE, pair bias, soft-cap."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, self.h, self.dk, self.dv = cfg.trunk_channels, cfg.num_heads, cfg.qk_dim, cfg.v_dim
        self.soft_cap = cfg.soft_cap
        self.register_buffer("inv_freq", rope_buffer(cfg.qk_dim, cfg.rope_max_position), persistent=False)
        self.norm = RMSBatchNorm(d)
        self.q = Linear(d, self.h * self.dk, bias=False)
        self.k = Linear(d, self.dk, bias=False)
        self.v = Linear(d, self.dv, bias=False)
        self.norm_q = LayerNorm(self.dk)
        self.norm_k = LayerNorm(self.dk)
        self.norm_v = LayerNorm(self.dv)
        self.out = Linear(self.h * self.dv, d)
        self.out_norm = RMSBatchNorm(d)
        self.kernel = ATTENTION_KERNELS["reference"]  # prepare_ may pick a fused kernel

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """(B, H, S, dk), (B, 1, S, dk), (B, 1, S, dv), bias (B, H, S/16, S/16) -> (B, H, S, dv)."""
        if self.kernel is not None:
            return self.kernel(q, k, v, bias, self.soft_cap)
        s = q.shape[2]
        logits = f32_logits(q, k) / math.sqrt(self.dk)  # (B, H, S, S)
        rep = s // bias.shape[-1]
        logits = logits + bias.repeat_interleave(rep, dim=-2).repeat_interleave(rep, dim=-1)
        logits = torch.tanh(logits / self.soft_cap) * self.soft_cap
        w = torch.softmax(logits, dim=-1).to(attention_probs_dtype(v))
        return torch.matmul(w.float(), v.float()).to(q.dtype)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x: (B, S, D); bias: (B, H, S/16, S/16) in float32, indexed at (q//16, k//16)."""
        b, s, _ = x.shape
        h = self.norm(x)
        positions = torch.arange(s, device=x.device)
        q = rope(self.norm_q(self.q(h).view(b, s, self.h, self.dk)), positions, self.inv_freq)
        k = rope(self.norm_k(self.k(h).view(b, s, 1, self.dk)), positions, self.inv_freq)
        v = self.norm_v(self.v(h).view(b, s, 1, self.dv))
        y = self.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), bias)
        y = y.transpose(1, 2).reshape(b, s, self.h * self.dv)
        return self.out_norm(self.out(y))


class MLPBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm = RMSBatchNorm(d)
        self.fc1 = Linear(d, 2 * d)
        self.fc2 = Linear(2 * d, d)
        self.out_norm = RMSBatchNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_norm(self.fc2(torch.relu(self.fc1(self.norm(x)))))


class AttentionBiasBlock(nn.Module):
    """Pair activations (B, P, P, F) -> per-head bias at pair resolution (B, H, P, P), float32."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSBatchNorm(cfg.pair_dim)
        self.proj = Linear(cfg.pair_dim, cfg.num_heads, bias=False)

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        return self.proj(tanh_gelu(self.norm(pair))).permute(0, 3, 1, 2).float()


def central_mask_features(distances: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """Exponentially spaced central-mask features of |relative position| (float32)."""
    return (widths > distances[..., None]).float()


def relative_shift(x: torch.Tensor) -> torch.Tensor:
    """(..., Q, 2Q) scores over relative positions -Q..Q-1 -> (..., Q, Q) with out[i, j] = x[i, j - i + Q]."""
    q = x.shape[-2]
    i = torch.arange(q, device=x.device)
    idx = (i[None, :] - i[:, None] + q).expand(*x.shape[:-1], q)
    return torch.gather(x, -1, idx)


class SequenceToPair(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, self.h, self.c, f = cfg.trunk_channels, cfg.seq2pair_heads, cfg.seq2pair_head_dim, cfg.pair_dim
        self.pool = cfg.pair_pool
        widths = central_mask_widths(cfg.pos_features, cfg.rope_max_position // cfg.pair_pool)
        self.register_buffer("mask_widths", torch.from_numpy(widths), persistent=False)
        self.norm = LayerNorm(d, rms=True)
        self.q = Linear(d, self.h * self.c, bias=False)
        self.k = Linear(d, self.h * self.c, bias=False)
        self.pos = Linear(2 * cfg.pos_features, self.h * self.c)
        self.q_r_bias = nn.Parameter(torch.zeros(self.h, self.c), requires_grad=False)
        self.k_r_bias = nn.Parameter(torch.zeros(self.h, self.c), requires_grad=False)
        self.y_q = Linear(d, f, bias=False)
        self.y_k = Linear(d, f, bias=False)
        self.pair = Linear(self.h, f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        x = self.norm(x.view(b, s // self.pool, self.pool, d).mean(2))
        p = x.shape[1]
        q = self.q(x).view(b, p, self.h, self.c)
        k = self.k(x).view(b, p, self.h, self.c)
        rel = torch.arange(-p, p, device=x.device, dtype=torch.float32)
        feats = central_mask_features(rel.abs(), self.mask_widths)
        feats = torch.cat([feats, torch.sign(rel)[:, None] * feats], dim=-1).to(x.dtype)
        pos = self.pos(feats).view(2 * p, self.h, self.c)
        rel_q = relative_shift(torch.einsum("bqhc,phc->bhqp", q + self.q_r_bias, pos))
        rel_k = relative_shift(torch.einsum("bkhc,phc->bhkp", k + self.k_r_bias, pos))
        a = torch.einsum("bqhc,bkhc->bqkh", q, k)
        a = a + 0.5 * (rel_q.permute(0, 2, 3, 1) + rel_k.permute(0, 3, 2, 1))
        y_q = self.y_q(tanh_gelu(x))
        y_k = self.y_k(tanh_gelu(x))
        return self.pair(a) + y_q[:, :, None, :] + y_k[:, None, :, :]


class RowAttention(nn.Module):
    def __init__(self, f: int):
        super().__init__()
        self.norm = LayerNorm(f, rms=True)
        self.q = Linear(f, f, bias=False)
        self.k = Linear(f, f, bias=False)
        self.v = Linear(f, f)

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        """Each row of the (B, P, P, F) map attends over its own P entries; both products accumulate in
        float32 from bf16 operands (bf16 GEMMs on the GPU, not TF32 ones on upcast copies)."""
        b, p, _, f = pair.shape
        x = self.norm(pair)
        q, k, v = (proj(x).reshape(b * p, p, f) for proj in (self.q, self.k, self.v))
        w = torch.softmax(bmm_f32_out(q, k.transpose(1, 2)) / math.sqrt(f), dim=-1).to(attention_probs_dtype(v))
        return bmm_f32_out(w, v).to(pair.dtype).view(b, p, p, f)


class PairMLP(nn.Module):
    def __init__(self, f: int):
        super().__init__()
        self.norm = LayerNorm(f, rms=True)
        self.fc1 = Linear(f, 2 * f)
        self.fc2 = Linear(2 * f, f)

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.norm(pair))))


class PairUpdate(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.seq2pair = SequenceToPair(cfg)
        self.row_attn = RowAttention(cfg.pair_dim)
        self.mlp = PairMLP(cfg.pair_dim)

    def forward(self, x: torch.Tensor, pair: torch.Tensor | None) -> torch.Tensor:
        y = self.seq2pair(x)
        pair = y if pair is None else pair + y
        pair = pair + self.row_attn(pair)
        return pair + self.mlp(pair)


class TransformerTower(nn.Module):
    """9 x (x += MHA(x, bias); x += MLP(x)), with a pair update before every second layer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        n = cfg.num_layers
        self.every = cfg.pair_update_every
        self.pair_updates = nn.ModuleList(PairUpdate(cfg) for _ in range(0, n, self.every))
        self.bias = nn.ModuleList(AttentionBiasBlock(cfg) for _ in range(n))
        self.attn = nn.ModuleList(MHABlock(cfg) for _ in range(n))
        self.mlp = nn.ModuleList(MLPBlock(cfg.trunk_channels) for _ in range(n))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pair = None
        for i in range(len(self.attn)):
            if i % self.every == 0:
                pair = self.pair_updates[i // self.every](x, pair)
            x = x + self.attn[i](x, self.bias[i](pair))
            x = x + self.mlp[i](x)
        return x, pair

