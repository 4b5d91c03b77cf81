"""Fast kernels beside the reference ops they replace (same function, compared in the tests).

- `flex_mha`: AlphaGenome's main attention in one fused FlexAttention kernel: 8 query heads
  sharing one key/value head (MQA), value dim 192, the pair bias read at (q // 16, k // 16) from the
  (B, H, S/16, S/16) map instead of a materialized (B, H, S, S) tensor, and the 5 * tanh(x / 5)
  soft-cap. Logits and softmax stay float32 inside the kernel, the policy's float32 island.
- `triton_mha`: the same attention in a hand-written Triton kernel (`_mha_fwd`), same contract.
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


# Tiles and launch options of `_mha_fwd` (scripts/bench_kernels.py --triton-configs sweeps them). H100,
# 2026-11-27: 0.232 ms at 4,096 tokens (370 TFLOP/s), 0.955 ms at 8,192; 128 x 64 tiles, 8 warps and 3
# stages ran 0.247 and 0.938 ms. FAST_TANH swaps the exact soft-cap for tanh.approx.f32 (CUDA only,
# ~2^-11 relative error on tanh): 15% faster.
TRITON_MHA_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "FAST_TANH": False}

_LOG2E = 1.4426950408889634


@functools.cache
def _mha_kernel():
    """The jitted kernel, built on first use: triton is optional (CI has none) and TRITON_INTERPRET,
    read when @triton.jit runs, may be set by the tests after this module is imported."""
    import triton
    import triton.language as tl

    @triton.jit
    def _mha_fwd(
        q_ptr, k_ptr, v_ptr, bias_ptr, out_ptr,
        stride_qb, stride_qh, stride_qs, stride_kb, stride_ks, stride_vb, stride_vs,
        stride_bb, stride_bh, stride_bq, stride_ob, stride_oh, stride_os,
        heads, seq_len, qk_scale, bias_scale, p_scale,
        D: tl.constexpr, DV_LO: tl.constexpr, DV_HI: tl.constexpr, R: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FAST_TANH: tl.constexpr,
    ):
        """One program: BLOCK_M query rows of one head against all keys of the shared K/V head.

        The soft-cap bounds every logit to [-cap, cap], so the softmax needs no running maximum:
        p = exp(capped - cap) lies in [exp(-2 cap), 1], and the accumulator is never rescaled.
        Exactly, capped - cap = cap * (tanh(x / cap) - 1) = -2 cap / (exp(2 x / cap) + 1), which
        gives p from two exp2 and one division with no cancellation near x = 0 (the host folds
        the constants: y = 2 log2(e) x / cap, p = exp2(p_scale / (exp2(y) + 1))).
        """
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // heads
        h = bh % heads
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :])
        k_ptrs = k_ptr + b * stride_kb + offs_n[:, None] * stride_ks + offs_d[None, :]
        # Dv = DV_LO + DV_HI, both powers of two (192 = 128 + 64): two PV products, no padding.
        v_lo_ptrs = v_ptr + b * stride_vb + offs_n[:, None] * stride_vs + tl.arange(0, DV_LO)[None, :]
        v_hi_ptrs = v_ptr + b * stride_vb + offs_n[:, None] * stride_vs + DV_LO + tl.arange(0, DV_HI)[None, :]
        # The bias is constant over R x R blocks: load the (BLOCK_M/R, BLOCK_N/R) distinct values only.
        offs_bq = pid_m * (BLOCK_M // R) + tl.arange(0, BLOCK_M // R)
        offs_bk = tl.arange(0, BLOCK_N // R)
        b_ptrs = bias_ptr + b * stride_bb + h * stride_bh + offs_bq[:, None] * stride_bq + offs_bk[None, :]

        acc_lo = tl.zeros([BLOCK_M, DV_LO], dtype=tl.float32)
        acc_hi = tl.zeros([BLOCK_M, DV_HI], dtype=tl.float32)
        row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        for _ in range(0, seq_len, BLOCK_N):
            k = tl.load(k_ptrs)
            s = tl.dot(q, tl.trans(k))
            small = tl.load(b_ptrs) * bias_scale
            tile_bias = tl.reshape(
                tl.broadcast_to(small[:, None, :, None], (BLOCK_M // R, R, BLOCK_N // R, R)), (BLOCK_M, BLOCK_N)
            )
            y = s * qk_scale + tile_bias
            if FAST_TANH:
                # y = x / cap here, p_scale = cap * log2(e): p = exp2(p_scale * (tanh(y) - 1)).
                t = tl.inline_asm_elementwise(
                    "tanh.approx.f32 $0, $1;", "=r,r", [y], dtype=tl.float32, is_pure=True, pack=1
                )
                p = tl.exp2(p_scale * t - p_scale)
            else:
                p = tl.exp2(p_scale / (tl.exp2(y) + 1.0))
            row_sum += tl.sum(p, 1)
            # The probabilities meet V in bf16 (attention_probs_dtype), as FlashAttention rounds them.
            p16 = p.to(v_ptr.dtype.element_ty)
            acc_lo = tl.dot(p16, tl.load(v_lo_ptrs), acc_lo)
            acc_hi = tl.dot(p16, tl.load(v_hi_ptrs), acc_hi)
            k_ptrs += BLOCK_N * stride_ks
            v_lo_ptrs += BLOCK_N * stride_vs
            v_hi_ptrs += BLOCK_N * stride_vs
            b_ptrs += BLOCK_N // R

        inv = 1.0 / row_sum[:, None]
        o_ptrs = out_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os
        tl.store(o_ptrs + tl.arange(0, DV_LO)[None, :], (acc_lo * inv).to(out_ptr.dtype.element_ty))
        tl.store(o_ptrs + DV_LO + tl.arange(0, DV_HI)[None, :], (acc_hi * inv).to(out_ptr.dtype.element_ty))

    return _mha_fwd


def _mha_tiles(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, soft_cap: float) -> tuple[int, int, int, int, int] | None:
    """(BLOCK_M, BLOCK_N, Dv low part, Dv high part, bias block r) for these inputs, or None where
    the kernel does not apply."""
    cfg = TRITON_MHA_CONFIG
    bsz, heads, s, d = q.shape
    dv = v.shape[-1]
    r = s // bias.shape[-1]
    # Short sequences (tests) shrink the tiles to fit.
    block_m = min(cfg["BLOCK_M"], 1 << (s.bit_length() - 1))
    block_n = min(cfg["BLOCK_N"], 1 << (s.bit_length() - 1))
    dv_lo = 1 << (dv.bit_length() - 1)
    dv_lo = dv_lo if dv_lo < dv else dv // 2
    dv_hi = dv - dv_lo

    def pow2(n: int) -> bool:  # tl.arange and tl.dot sizes
        return n >= 16 and n & (n - 1) == 0

    fits = (
        k.shape == (bsz, 1, s, d) and v.shape == (bsz, 1, s, dv) and bias.shape == (bsz, heads, s // r, s // r)
        and pow2(d) and pow2(dv_lo) and pow2(dv_hi) and pow2(block_m) and pow2(block_n) and r & (r - 1) == 0 and r * bias.shape[-1] == s
        and s % block_m == 0 and s % block_n == 0 and block_m % r == 0 and block_n % r == 0
        and q.dtype == k.dtype == v.dtype and q.dtype in (torch.bfloat16, torch.float16)
        and bias.dtype == torch.float32 and 0.0 < soft_cap <= 40.0  # p >= exp(-2 cap) stays a normal float
    )
    return (block_m, block_n, dv_lo, dv_hi, r) if fits else None


def _launch_mha(kernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, soft_cap: float) -> torch.Tensor:
    """Checks the shapes, picks the tiles and runs `kernel` (jitted, or interpreted on the CPU)."""
    cfg = TRITON_MHA_CONFIG
    tiles = _mha_tiles(q, k, v, bias, soft_cap)
    if tiles is None:
        raise ValueError(
            f"triton_mha: unsupported q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)} bias {tuple(bias.shape)} "
            f"{q.dtype}/{bias.dtype} soft_cap {soft_cap}: needs one K/V head, power-of-two D >= 16, Dv a sum of two "
            "powers of two >= 16, S a multiple of power-of-two tiles and of the power-of-two bias block r <= tiles, "
            "bf16/fp16 inputs, float32 bias, 0 < soft_cap <= 40"
        )
    block_m, block_n, dv_lo, dv_hi, r = tiles
    bsz, heads, s, d = q.shape
    dv = v.shape[-1]
    q, k, v, bias = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, bias))
    # Stored (B, S, H, Dv) and viewed as (B, H, S, Dv): the block's transpose + reshape is then free.
    out = torch.empty(bsz, s, heads, dv, device=q.device, dtype=q.dtype).transpose(1, 2)
    if cfg["FAST_TANH"]:
        qk_scale, bias_scale, p_scale = 1.0 / (math.sqrt(d) * soft_cap), 1.0 / soft_cap, soft_cap * _LOG2E
    else:
        y = 2.0 * _LOG2E / soft_cap
        qk_scale, bias_scale, p_scale = y / math.sqrt(d), y, -2.0 * soft_cap * _LOG2E
    kernel[(s // block_m, bsz * heads)](
        q, k, v, bias, out,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(2), v.stride(0), v.stride(2),
        bias.stride(0), bias.stride(1), bias.stride(2), out.stride(0), out.stride(1), out.stride(2),
        heads, s, qk_scale, bias_scale, p_scale,
        D=d, DV_LO=dv_lo, DV_HI=dv_hi, R=r, BLOCK_M=block_m, BLOCK_N=block_n, FAST_TANH=cfg["FAST_TANH"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


# A custom op, so that torch.compile traces through it (no graph break) and CUDA graphs capture the
# launch. Not torch.library.triton_op: that imports triton where it is declared, which would tie every
# import of this module to triton and fix the interpreter choice (TRITON_INTERPRET) before tests set it.
@torch.library.custom_op("agpipe::triton_mha", mutates_args=())
def _triton_mha_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, soft_cap: float) -> torch.Tensor:
    return _launch_mha(_mha_kernel(), q, k, v, bias, soft_cap)


@_triton_mha_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, soft_cap: float) -> torch.Tensor:
    bsz, heads, s, _ = q.shape
    return q.new_empty(bsz, s, heads, v.shape[-1]).transpose(1, 2)


def triton_mha(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, soft_cap: float) -> torch.Tensor:
    """`flex_mha` in the hand-written kernel: q (B, H, S, D), k (B, 1, S, D), v (B, 1, S, Dv),
    bias (B, H, S/r, S/r) float32 -> (B, H, S, Dv). Needs triton; CPU tensors need TRITON_INTERPRET=1."""
    return torch.ops.agpipe.triton_mha(q, k, v, bias, soft_cap)


def triton_or_flex_mha(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, soft_cap: float) -> torch.Tensor:
    """`triton_mha` where its kernel applies (the official model's shapes), else `flex_mha` (e.g. the
    demo model's value dim 24). Decided from shapes, so once when torch.compile traces."""
    return (triton_mha if _mha_tiles(q, k, v, bias, soft_cap) else flex_mha)(q, k, v, bias, soft_cap)


# The main attention's implementations: the reference math in MHABlock.attend (None), or a fused kernel.
ATTENTION_KERNELS = {"reference": None, "flex": flex_mha, "triton": triton_or_flex_mha}


def fast_attention(device: torch.device | str) -> str:
    """The attention the fast path runs on `device`: on CUDA the hand-written kernel where it applies
    (3.2x faster than FlexAttention at 4,096 tokens on an H100, docs/performance.md) and
    FlexAttention elsewhere or where triton is missing; the reference on the CPU, where neither
    kernel is faster."""
    if torch.device(device).type != "cuda":
        return "reference"
    try:
        import triton  # noqa: F401  (ships with CUDA builds of torch)
    except ImportError:
        return "flex"
    return "triton"


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
