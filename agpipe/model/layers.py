"""Building blocks shared by the trunk and the heads.

Every module holds its parameters under the names our weights file uses (raw, as trained).
`fold_(dtype)` turns them into inference constants once at load (standardized conv weights,
RMSBatchNorm's scale * rsqrt(var_ema + eps)), computed op for op in the policy's dtype as the official
model computes them at every call (under the bf16 policy these folds are where most of its rounding
happens, so we round the same way); `forward` reads only the folded form. Elementwise steps keep the
official order of roundings (x * inv, then + offset). Activations are (B, S, C) everywhere;
convolutions read them as channels-last NCHW views (no transposes, cuDNN's NHWC kernels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from agpipe.model.config import rope_frequencies
from agpipe.model.kernels import conv_bias_residual

NORM_EPS = 1e-5


def in_f32(fn, x: torch.Tensor) -> torch.Tensor:
    """A transcendental function evaluated in float32 and rounded once to x's dtype (the JAX
    reference does the same; torch's own bfloat16 kernels for some of them round differently)."""
    return fn(x.float()).to(x.dtype)


def sigmoid_gelu(x: torch.Tensor) -> torch.Tensor:
    """The GELU of the conv blocks and output embedders: x * sigmoid(1.702 x), 1.702 in x's dtype."""
    return x * in_f32(torch.sigmoid, torch.tensor(1.702, dtype=x.dtype) * x)


def tanh_gelu(x: torch.Tensor) -> torch.Tensor:
    """jax.nn.gelu's default (tanh approximation): attention-bias and sequence-to-pair blocks."""
    return in_f32(lambda t: F.gelu(t, approximate="tanh"), x)


class RMSBatchNorm(nn.Module):
    """Inference RMSBatchNorm over the channel axis: x * scale * rsqrt(var_ema + eps) + offset."""

    def __init__(self, channels: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels), requires_grad=False)
        self.offset = nn.Parameter(torch.zeros(channels), requires_grad=False)
        self.register_buffer("var_ema", torch.ones(channels))

    def fold_(self, dtype: torch.dtype) -> None:
        inv = self.scale.to(dtype) * in_f32(torch.rsqrt, self.var_ema.to(dtype) + NORM_EPS)
        self.inv = nn.Parameter(inv, requires_grad=False)
        del self.scale, self.var_ema

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.inv + self.offset


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
        return inv * x + self.offset


class Linear(nn.Module):
    """y = x @ w (+ b), with w stored (in, out) like the official model."""

    def __init__(self, d_in: int, d_out: int, bias: bool = True):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(d_in, d_out), requires_grad=False)
        self.b = nn.Parameter(torch.zeros(d_out), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.w
        return y if self.b is None else y + self.b


class StandardizedConv(nn.Module):
    """Conv1D with scaled weight standardization (folded at load) and SAME padding on (B, S, C)."""

    def __init__(self, d_in: int, d_out: int, width: int):
        super().__init__()
        self.width = width
        self.w = nn.Parameter(torch.zeros(width, d_in, d_out), requires_grad=False)
        self.scale = nn.Parameter(torch.ones(d_out), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(d_out), requires_grad=False)

    def fold_(self, dtype: torch.dtype) -> None:
        w = self.w.to(dtype)
        w = w - w.mean(dim=(0, 1), keepdim=True, dtype=torch.float32).to(dtype)
        wf = w.float()
        var = (wf - wf.mean(dim=(0, 1), keepdim=True)).square().mean(dim=(0, 1), keepdim=True).to(dtype)
        fan_in = w.shape[0] * w.shape[1]
        scale = self.scale.to(dtype) * in_f32(torch.rsqrt, torch.clamp(fan_in * var, min=1e-4))
        self.weight = nn.Parameter(conv_weight(w * scale), requires_grad=False)
        del self.w, self.scale

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return conv_bias_residual(x, self.weight, self.bias, residual)


class ConvBlock(nn.Module):
    """RMSBatchNorm -> sigmoid GELU -> standardized conv (width > 1) or pointwise linear."""

    def __init__(self, d_in: int, d_out: int, width: int):
        super().__init__()
        self.norm = RMSBatchNorm(d_in)
        self.conv = StandardizedConv(d_in, d_out, width) if width > 1 else Linear(d_in, d_out)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The block's output plus `residual` (zero-padded to the output's channels), which a
        convolution adds before its one rounding on a GPU (kernels.conv_bias_residual)."""
        h = sigmoid_gelu(self.norm(x))
        if isinstance(self.conv, StandardizedConv):
            return self.conv(h, residual)
        y = self.conv(h)
        return y if residual is None else y + residual


def conv_weight(w: torch.Tensor) -> torch.Tensor:
    """(width, in, out) official layout -> (out, in, 1, width) channels-last conv2d weight."""
    return w.permute(2, 1, 0)[:, :, None, :].contiguous(memory_format=torch.channels_last)


def rope_buffer(dim: int, max_position: int) -> torch.Tensor:
    return torch.from_numpy(rope_frequencies(dim // 2, max_position))


@torch.library.custom_op("agpipe::cos_sin", mutates_args=())
def cos_sin(theta: torch.Tensor) -> torch.Tensor:
    """(2, *theta.shape): cos and sin of theta, each evaluated in float32 and rounded once to theta's
    dtype. An op the compiler cannot see into, so the table is computed once: Inductor otherwise
    inlines cos and sin into the kernel that broadcasts the table, and evaluates them again for every
    tissue of the junction head (3 ms of a 524,288 bp window)."""
    return torch.stack([in_f32(torch.cos, theta), in_f32(torch.sin, theta)])


@cos_sin.register_fake
def _cos_sin_shape(theta: torch.Tensor) -> torch.Tensor:
    return theta.new_empty((2, *theta.shape))


def rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotary embedding over the last axis, rotating interleaved (even, odd) pairs.

    x: (B, S, H, C) with positions (B, S) or (S,), or any x with positions broadcasting against
    x.shape[:-1]; positions are taken in x's dtype (as the official model computes
    it, so positions are rounded to bfloat16 under the bf16 policy); inv_freq from `rope_buffer`.
    """
    inv_freq = inv_freq.to(x.dtype)
    theta = positions.to(x.dtype)[..., None] * inv_freq  # positions' shape + (F,)
    cos, sin = cos_sin(theta)
    # The rotation takes each (even, odd) pair to (-odd, even): the pair swapped, times sin with its
    # sign flipped at the even channels (exact: (-a) * s == a * (-s)). A swap is an index map that
    # Inductor fuses into the one pass over x; a stack of x's two halves is a concatenation, which its
    # CPU backend always writes to memory first (and its GPU backend when its heuristics say so). The
    # junction head rotates 4 x 144 M values a 524,288 bp window; only the small table is stacked here
    signed_sin = torch.stack([-sin, sin], dim=-1).flatten(-2)
    table = torch.stack([cos.repeat_interleave(2, dim=-1), signed_sin])  # (2,) + positions' shape + (C,)
    table = table[:, :, :, None, :] if theta.ndim == 3 else table[:, None, :, None, :] if theta.ndim == 2 else table
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
    return x * table[0] + swapped * table[1]
