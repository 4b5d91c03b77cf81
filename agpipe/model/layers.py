"""Building blocks shared by the trunk and the heads.

Every module holds its parameters under the names our weights file uses (raw, as trained). `fold_()`
turns them into inference constants once at load (standardized conv weights, RMSBatchNorm's
scale * rsqrt(var_ema + eps)); `forward` reads only the folded form. Activations are (B, S, C)
("channels last") except inside the convolutional encoder and decoder, which run (B, C, S).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

NORM_EPS = 1e-5


def sigmoid_gelu(x: torch.Tensor) -> torch.Tensor:
    """The GELU of the conv blocks and output embedders: x * sigmoid(1.702 x)."""
    return x * torch.sigmoid(1.702 * x)


def tanh_gelu(x: torch.Tensor) -> torch.Tensor:
    """jax.nn.gelu's default (tanh approximation): attention-bias and sequence-to-pair blocks."""
    return F.gelu(x, approximate="tanh")


class RMSBatchNorm(nn.Module):
    """Inference RMSBatchNorm over the channel axis: x * scale * rsqrt(var_ema + eps) + offset."""

    def __init__(self, channels: int, channel_dim: int = -1):
        super().__init__()
        self.channel_dim = channel_dim
        self.scale = nn.Parameter(torch.ones(channels), requires_grad=False)
        self.offset = nn.Parameter(torch.zeros(channels), requires_grad=False)
        self.register_buffer("var_ema", torch.ones(channels))

    def fold_(self) -> None:
        inv = self.scale.float() * torch.rsqrt(self.var_ema.float() + NORM_EPS)
        self.inv = nn.Parameter(inv, requires_grad=False)
        del self.scale, self.var_ema

    def _shape(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        if self.channel_dim == -1:
            return t
        return t.view(-1, *([1] * (ndim - 2)))  # (C, 1, ...) for a (B, C, S...) tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self._shape(self.offset, x.ndim), x, self._shape(self.inv, x.ndim))


class LayerNorm(nn.Module):
    """LayerNorm over the last axis with float32 statistics; `rms=True` skips the centring."""

    def __init__(self, channels: int, rms: bool = False):
        super().__init__()
        self.rms = rms
        self.scale = nn.Parameter(torch.ones(channels), requires_grad=False)
        self.offset = nn.Parameter(torch.zeros(channels), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.rms:
            x = x - x.mean(-1, keepdim=True, dtype=torch.float32).to(x.dtype)
        var = x.square().mean(-1, keepdim=True, dtype=torch.float32)
        inv = self.scale * torch.rsqrt(var + NORM_EPS).to(x.dtype)
        return torch.addcmul(self.offset, inv, x)


class Linear(nn.Module):
    """y = x @ w (+ b), with w stored (in, out) like the official model."""

    def __init__(self, d_in: int, d_out: int, bias: bool = True):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(d_in, d_out), requires_grad=False)
        self.b = nn.Parameter(torch.zeros(d_out), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w if self.b is None else torch.addmm(self.b, x.flatten(0, -2), self.w).view(
            *x.shape[:-1], -1
        )


class StandardizedConv(nn.Module):
    """Conv1D with scaled weight standardization (folded at load) and SAME padding on (B, C, S)."""

    def __init__(self, d_in: int, d_out: int, width: int):
        super().__init__()
        self.width = width
        self.w = nn.Parameter(torch.zeros(width, d_in, d_out), requires_grad=False)
        self.scale = nn.Parameter(torch.ones(d_out), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(d_out), requires_grad=False)

    def fold_(self) -> None:
        w = self.w.double()
        w = w - w.mean(dim=(0, 1), keepdim=True)
        var = w.square().mean(dim=(0, 1), keepdim=True)
        fan_in = w.shape[0] * w.shape[1]
        w = w * (self.scale.double() * torch.rsqrt(torch.clamp(fan_in * var, min=1e-4)))
        self.weight = nn.Parameter(w.permute(2, 1, 0).float().contiguous(), requires_grad=False)  # (out, in, width)
        del self.w, self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv1d(x, self.weight, self.bias, padding=self.width // 2)


class ConvBlock(nn.Module):
    """RMSBatchNorm -> sigmoid GELU -> standardized conv (width > 1) or pointwise linear, on (B, C, S)."""

    def __init__(self, d_in: int, d_out: int, width: int):
        super().__init__()
        self.norm = RMSBatchNorm(d_in, channel_dim=1)
        self.conv = StandardizedConv(d_in, d_out, width) if width > 1 else Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = sigmoid_gelu(self.norm(x))
        if isinstance(self.conv, Linear):
            return torch.einsum("bcs,cd->bds", h, self.conv.w) + self.conv.b[:, None]
        return self.conv(h)


def rope(x: torch.Tensor, positions: torch.Tensor, max_position: int) -> torch.Tensor:
    """Rotary embedding over the last axis, rotating interleaved (even, odd) pairs.

    x: (B, S, H, C); positions: (B, S) or (S,), in x's dtype (as the official model computes it,
    so positions are rounded to bfloat16 under the bf16 policy).
    """
    num_freq = x.shape[-1] // 2
    geom = torch.logspace(0, math.log10(max_position - num_freq + 1), num_freq, dtype=torch.float64)
    inv_freq = (1.0 / (torch.arange(num_freq, dtype=torch.float64) + geom)).to(torch.float32)
    inv_freq = inv_freq.to(device=x.device, dtype=x.dtype)
    theta = positions.to(x.dtype)[..., None] * inv_freq  # (B, S, F) or (S, F)
    theta = theta.repeat_interleave(2, dim=-1)
    theta = theta[..., None, :] if theta.ndim == 3 else theta[None, :, None, :]
    rotated = torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).flatten(-2)
    return x * torch.cos(theta) + rotated * torch.sin(theta)
