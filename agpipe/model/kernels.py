"""Fast kernels beside the reference ops they replace (same function, compared in the tests).

- `flex_mha`: AlphaGenome's main attention in one fused FlexAttention kernel: 8 query heads
  sharing one key/value head (MQA), value dim 192, the pair bias read at (q // 16, k // 16) from the
  (B, H, S/16, S/16) map instead of a materialized (B, H, S, S) tensor, and the 5 * tanh(x / 5)
  soft-cap. Logits and softmax stay float32 inside the kernel, the policy's float32 island.
- `matmul_f32_out`: x @ w with float32 accumulation and a float32 result without upcasting x
  (cuBLAS bf16 GEMM with a float32 output on CUDA).
"""

from __future__ import annotations

import functools
import math

import torch


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_mha(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, soft_cap: float) -> torch.Tensor:
    """q (B, H, S, D), k (B, 1, S, D), v (B, 1, S, Dv), bias (B, H, S/r, S/r) float32 -> (B, H, S, Dv)."""
    from torch.nn.attention.flex_attention import flex_attention

    r = q.shape[2] // bias.shape[-1]

    def score_mod(score, b, h, q_idx, kv_idx):
        s = score + bias[b, h, q_idx // r, kv_idx // r]
        return soft_cap * torch.tanh(s / soft_cap)

    kwargs = dict(score_mod=score_mod, scale=1.0 / math.sqrt(q.shape[-1]), enable_gqa=True)
    if q.is_cuda:
        # Default Triton tiles need 245,760 bytes of shared memory with Dv = 192; an H100 has 232,448.
        # 8 warps: 0.87 ms against 3.5 ms with 4 (one 4,096-token layer, H100).
        kwargs["kernel_options"] = {"BLOCK_M": 128, "BLOCK_N": 64, "num_stages": 1, "num_warps": 8}
        run = flex_attention if torch.compiler.is_compiling() else _compiled_flex()
        return run(q, k, v, **kwargs)
    return flex_attention(q, k, v, **kwargs)


def bmm_f32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched a (N, M, K) @ b (N, K, P), accumulated and returned in float32."""
    if a.is_cuda and a.dtype == b.dtype and a.dtype in (torch.bfloat16, torch.float16):
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a.float(), b.float())


def matmul_f32_out(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ w (K, N) accumulated and returned in float32 (the heads' float32 island)."""
    if x.is_cuda and x.dtype == w.dtype and x.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(x.reshape(-1, x.shape[-1]), w, out_dtype=torch.float32).view(*x.shape[:-1], w.shape[-1])
    return torch.matmul(x.float(), w.float())
