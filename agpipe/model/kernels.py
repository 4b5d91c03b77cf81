"""Fast kernels beside the reference ops they replace (same function, compared in the tests).

- `flex_mha`: AlphaGenome's main attention in one fused FlexAttention kernel: 8 query heads
  sharing one key/value head (MQA), value dim 192, the pair bias read at (q // 16, k // 16) from the
  (B, H, S/16, S/16) map instead of a materialized (B, H, S, S) tensor, and the 5 * tanh(x / 5)
  soft-cap. Logits and softmax stay float32 inside the kernel, the policy's float32 island.
- `triton_mha`: the same attention in a hand-written Triton kernel (`_mha_fwd`), same contract.
- `matmul_f32_out`: x @ w with float32 accumulation and a float32 result without upcasting x
  (cuBLAS bf16 GEMM with a float32 output on CUDA).
- `conv_bias_residual`: a SAME-padded 1D convolution plus its bias and the block's residual, rounded
  where XLA rounds them for the official model: on a GPU once (XLA hands conv + bias + residual to
  cuDNN as one fused call, `__cudnn$convBiasActivationForward` with a side input), on the CPU after
  each op. On CUDA in bf16 it runs an implicit-GEMM Triton kernel with that epilogue: on Hopper the
  large ones warp-specialized (`conv_gluon._conv_fwd_ws`, Gluon), the others `_conv_fwd_tma` (tiles
  loaded by TMA, Hopper and later), and `_conv_fwd` through pointers elsewhere. The DNA
  embedder's GEMM runs through it as a pointwise (width 1) convolution of overlapping windows (rows
  8 bytes apart, which only the pointer kernel reads: no TMA descriptor takes them).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F


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
# ~2^-11 relative error on tanh): the 9 layers 2.27 -> 2.02 ms a window, and the model meets the bf16
# criteria with it (H100, 2026-11-28, docs/performance.md); off until the GPU tests have run with it.
TRITON_MHA_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "FAST_TANH": False, "FORM": "triton"}
# FORM "pingpong": on Hopper, `attention_gluon._mha_fwd_pingpong` (FlashAttention-3's split: a TMA
# producer warp, two consumer warpgroups of 64 query rows taking turns at the tensor cores, each one's
# softmax beside the other's products) where its shapes apply, the kernel above elsewhere.
# MHA_PINGPONG_CONFIG: its key tile and ring depth (200 KB of shared memory with 3 stages of 64 keys; no
# register spills, offline sm_90 compile). Not yet run on a GPU (sixteenth session: none was lent), so off.
MHA_PINGPONG_CONFIG = {"BLOCK_N": 64, "STAGES": 3}

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


@functools.cache
def _attention_gluon():
    """The ping-pong attention kernel's module, or None where this triton lacks Gluon's Hopper language."""
    try:
        from agpipe.model import attention_gluon
    except ImportError:
        return None
    return attention_gluon


def _pingpong_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tiles: tuple[int, int, int, int, int]) -> bool:
    """Whether `_mha_fwd_pingpong` takes these inputs (already fit for `_mha_fwd`): FORM "pingpong",
    a Hopper card, bf16, the official model's head dims (D 128, Dv 192 = 128 + 64: what its registers
    were budgeted for), q a (B, S, H, D) tensor seen as (B, H, S, D), whole 128-row query blocks and
    key tiles, the bias block no wider than a key tile."""
    _, _, dv_lo, dv_hi, r = tiles
    bsz, heads, s, d = q.shape
    return (
        TRITON_MHA_CONFIG.get("FORM") == "pingpong" and q.is_cuda and torch.cuda.get_device_capability(q.device)[0] == 9
        and q.dtype == torch.bfloat16 and q.transpose(1, 2).is_contiguous() and k.is_contiguous() and v.is_contiguous()
        and (d, dv_lo, dv_hi) == (128, 128, 64) and s % 128 == 0 and s % MHA_PINGPONG_CONFIG["BLOCK_N"] == 0
        and r <= MHA_PINGPONG_CONFIG["BLOCK_N"] and _attention_gluon() is not None
    )


def _gluon_descriptor(t: torch.Tensor, block: list[int]):
    """A TMA descriptor of bf16 tensor t for Gluon's Hopper kernels: blocks of `block`, NVMMA-swizzled."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    return TensorDescriptor(t, list(t.shape), list(t.stride()), block, gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16))


def _launch_mha_pingpong(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, tiles: tuple[int, int, int, int, int],
                         scales: tuple[float, float, float]) -> torch.Tensor:
    """Runs `attention_gluon._mha_fwd_pingpong`: one program per 128 query rows of one head."""
    _, _, dv_lo, dv_hi, r = tiles
    bsz, heads, s, d = q.shape
    dv = v.shape[-1]
    block_n = MHA_PINGPONG_CONFIG["BLOCK_N"]
    out = torch.empty(bsz, s, heads, dv, device=q.device, dtype=q.dtype)

    # 2-d (rows, columns) views: the kernel addresses V's and the output's high columns from column 0
    q2, k2, v2, o2 = q.transpose(1, 2).reshape(bsz * s, heads * d), k.reshape(bsz * s, d), v.reshape(bsz * s, dv), out.view(bsz * s, heads * dv)
    descriptors = [_gluon_descriptor(t, block) for t, block in (
        (q2, [64, d]), (k2, [block_n, d]), (v2, [block_n, dv_lo]), (v2, [block_n, dv_hi]), (o2, [64, dv_lo]), (o2, [64, dv_hi]))]
    _attention_gluon()._mha_fwd_pingpong[(s // 128, bsz * heads)](
        *descriptors, bias, bias.stride(0), bias.stride(1), bias.stride(2), s, heads, *scales,
        R=r, STAGES=MHA_PINGPONG_CONFIG["STAGES"], FAST_TANH=bool(TRITON_MHA_CONFIG["FAST_TANH"]), num_warps=4, maxnreg=168,
    )
    return out.transpose(1, 2)


def _launch_mha(kernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, soft_cap: float) -> torch.Tensor:
    """Checks the shapes, picks the tiles and runs `kernel` (jitted, or interpreted on the CPU), or
    the ping-pong kernel where FORM asks for it and it applies."""
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
    if cfg["FAST_TANH"]:
        qk_scale, bias_scale, p_scale = 1.0 / (math.sqrt(d) * soft_cap), 1.0 / soft_cap, soft_cap * _LOG2E
    else:
        y = 2.0 * _LOG2E / soft_cap
        qk_scale, bias_scale, p_scale = y / math.sqrt(d), y, -2.0 * soft_cap * _LOG2E
    if _pingpong_applies(q, k, v, tiles):
        return _launch_mha_pingpong(q, k, v, bias, tiles, (qk_scale, bias_scale, p_scale))
    # Stored (B, S, H, Dv) and viewed as (B, H, S, Dv): the block's transpose + reshape is then free.
    out = torch.empty(bsz, s, heads, dv, device=q.device, dtype=q.dtype).transpose(1, 2)
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
    return "triton" if triton_available() else "flex"


@functools.cache
def triton_available() -> bool:
    """Whether triton imports (it ships with CUDA builds of torch; CPU builds lack it)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


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


# Tiles of the convolution kernel (scripts/bench_kernels.py --conv sweeps them); TMA: `_conv_fwd_tma`.
# A persistent form of it (one program per SM walking tiles) was slower in the model, 80.3 against
# 77.2 ms (H100, 2026-11-28, docs/performance.md), and was removed.
# H100, 2026-11-27, the model's 27 convolutions at 524,288 bp: 42.1 ms with these (~630 TFLOP/s),
# 51.8 ms for the best tiles loaded through pointers, 40.0 ms for cuDNN's convolutions alone.
TRITON_CONV_CONFIG = {"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 4, "TMA": True, "WS": "auto", "WS_STAGES": 3}
# "WS": the warp-specialized Hopper kernel (`conv_gluon._conv_fwd_ws`, WS_STAGES buffers: three of 48 KB
# fit beside its 64 KB of epilogue staging) with these tiles (True), never (False), or where it was
# measured faster ("auto", `_ws_tiles`).
# How a GPU convolution rounds (bf16): "triton" once, as XLA (`_conv_fwd`); "cudnn" cuDNN's convolution
# (rounded), then bias and residual added in float32 and rounded once: one rounding more than XLA.
GPU_CONV = "triton"


@functools.cache
def _conv_kernel():
    """The jitted convolution kernels (pointers, TMA), imported on first use: triton is optional, as
    for `_mha_kernel`, and a module of their own lets them share jitted helpers."""
    from agpipe.model import conv_triton

    return conv_triton._conv_fwd, conv_triton._conv_fwd_tma


@functools.cache
def _conv_ws_kernel():
    """The warp-specialized Hopper kernel, or None where this triton lacks Gluon's Hopper language."""
    try:
        from agpipe.model import conv_gluon
    except ImportError:
        return None
    return conv_gluon._conv_fwd_ws


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _ws_tiles(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> tuple[int, int] | None:
    """(BLOCK_M, BLOCK_N) of the warp-specialized kernel for this convolution, or None for the TMA or
    pointer kernel. It needs a Hopper card (wgmma is sm_90's), TMA's alignment for every operand (output
    channels a multiple of 8: its rows are stored by TMA) and Gluon. "auto" takes it from 65,536
    positions a sequence, 128 x 256 tiles where the channels fill them, else 256 x 128: the model's 27
    convolutions at 524,288 bp, back to back on an H100 (`bench_kernels.py --conv`,
    conv-kernel-H100-20261206-ws.json), 39.7 ms against 42.5 for the TMA kernel alone; below 65,536
    positions the TMA kernel was as fast or faster (a few tiles per program, 3 stages against 4)."""
    cfg = TRITON_CONV_CONFIG
    usable = (
        cfg.get("WS") and x.is_cuda and torch.cuda.get_device_capability(x.device)[0] == 9 and _uses_tma(x, weight)
        and weight.shape[0] % 8 == 0 and (residual is None or _tma_rows(residual)) and _conv_ws_kernel() is not None
    )
    if not usable:
        return None
    if cfg["WS"] != "auto":
        return cfg["BLOCK_M"], cfg["BLOCK_N"]
    if x.shape[1] < 65536:
        return None
    return (128, 256) if weight.shape[0] % 256 == 0 else (256, 128)


def _launch_conv_ws(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None, out: torch.Tensor,
                    bm: int, bn: int) -> None:
    """Runs `conv_gluon._conv_fwd_ws`, one persistent program per SM, with bm x bn tiles."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    cfg = TRITON_CONV_CONFIG
    bk = cfg["BLOCK_K"]
    bsz, s, c_in = x.shape
    c_out, _, _, width = weight.shape
    dtype = gl.bfloat16 if x.dtype == torch.bfloat16 else gl.float16

    def desc(t: torch.Tensor, shape: list[int], strides: list[int], block: list[int]) -> TensorDescriptor:
        return TensorDescriptor(t, shape, strides, block, gl.NVMMASharedLayout.get_default_for(block, dtype))

    x_desc = desc(x, list(x.shape), list(x.stride()), [1, bm, bk])
    w_desc = desc(weight, [c_out, width * c_in], [weight.stride(0), 1], [bn, bk])
    o_desc = desc(out, list(out.shape), list(out.stride()), [1, bm // 2, bn])  # each consumer's half
    r_desc = o_desc if residual is None else desc(residual, list(residual.shape), list(residual.stride()), [1, bm // 2, bn])
    tiles_m, tiles_n = -(-s // bm), -(-c_out // bn)
    num_tiles = bsz * tiles_m * tiles_n
    _conv_ws_kernel()[(min(num_tiles, _sm_count(x.device)),)](
        x_desc, w_desc, r_desc, o_desc, bias, c_in, c_out, 0 if residual is None else residual.shape[-1], tiles_m, tiles_n, num_tiles,
        WIDTH=width, HAS_RES=residual is not None, STAGES=cfg["WS_STAGES"], num_warps=4, maxnreg=168,
    )


def _tma_rows(t: torch.Tensor) -> bool:
    """A (B, S, C) bf16 tensor a descriptor takes: 16-byte aligned base and row strides."""
    return t.stride(0) % 8 == 0 and t.stride(1) % 8 == 0 and t.data_ptr() % 16 == 0


def _uses_tma(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """TMA loads: asked for, a card that has them (compute capability 9+; Triton's CPU interpreter
    takes descriptors too), and the 16-byte aligned rows and base addresses a descriptor needs."""
    return (
        bool(TRITON_CONV_CONFIG.get("TMA")) and (not x.is_cuda or torch.cuda.get_device_capability(x.device)[0] >= 9)
        and _tma_rows(x) and weight.stride(0) % 8 == 0 and weight.data_ptr() % 16 == 0
    )


def _launch_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """Runs a convolution kernel: warp-specialized (`_ws_tiles`), else TMA or pointer loads with
    TRITON_CONV_CONFIG's tiles."""
    cfg = TRITON_CONV_CONFIG
    bsz, s, c_in = x.shape
    c_out, _, _, width = weight.shape
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty(bsz, s, c_out, device=x.device, dtype=x.dtype)
    ws = _ws_tiles(x, weight, residual)
    if ws is not None:
        _launch_conv_ws(x, weight, bias, residual, out, *ws)
        return out
    res = residual if residual is not None else out  # not read without HAS_RES
    grid = (-(-c_out // cfg["BLOCK_N"]), -(-s // cfg["BLOCK_M"]), bsz)
    pointers, tma = _conv_kernel()
    tiles = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    c_res = res.shape[-1] if residual is not None else 0
    if _uses_tma(x, weight):
        from triton.tools.tensor_descriptor import TensorDescriptor

        x_desc = TensorDescriptor(x, list(x.shape), list(x.stride()), [1, cfg["BLOCK_M"], cfg["BLOCK_K"]])
        w_desc = TensorDescriptor(weight, [c_out, width * c_in], [weight.stride(0), 1], [cfg["BLOCK_N"], cfg["BLOCK_K"]])
        tma[grid](
            x_desc, w_desc, bias, res, out, s, c_in, c_out, c_res,
            res.stride(0), res.stride(1), out.stride(0), out.stride(1), WIDTH=width, HAS_RES=residual is not None, **tiles,
        )
        return out
    pointers[grid](
        x, weight, bias, res, out, s, c_in, c_out, c_res,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(3), res.stride(0), res.stride(1), out.stride(0), out.stride(1),
        WIDTH=width, HAS_RES=residual is not None, **tiles,
    )
    return out


@torch.library.custom_op("agpipe::conv_bias_residual", mutates_args=())
def _conv_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    return _launch_conv(x, weight, bias, residual)


@_conv_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:2], weight.shape[0])


def _conv_fits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None) -> bool:
    """Whether `_conv_fwd` takes these inputs: bf16/fp16 (B, S, C) with unit channel stride, a
    channels-last (out, in, 1, width) weight of odd width, a residual (B, S, <= out) of unit channel stride."""
    return (
        x.is_cuda and x.dim() == 3 and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == bias.dtype == x.dtype
        and weight.dim() == 4 and weight.shape[1] == x.shape[-1] and weight.shape[2] == 1 and weight.shape[3] % 2 == 1
        and weight.stride(1) == 1 and bias.is_contiguous()
        and (residual is None or (residual.dtype == x.dtype and residual.shape[:2] == x.shape[:2]
                                  and residual.shape[-1] <= weight.shape[0] and residual.stride(-1) == 1))
    )


def conv_bias_residual_once(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """The reference of `_conv_fwd`: conv(x) + bias + residual in float32 (bf16 products are exact in
    float32, and in TF32), rounded once to x's dtype."""
    y = F.conv2d(x.float().permute(0, 2, 1)[:, :, None, :], weight.float(), padding=(0, weight.shape[-1] // 2))
    y = y[:, :, 0, :].permute(0, 2, 1) + bias.float()
    return (y if residual is None else y + padded(residual.float(), y.shape[-1])).to(x.dtype)


def conv_bias_residual(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """SAME-padded conv of x (B, S, C_in) with a channels-last (C_out, C_in, 1, width) weight, plus
    bias and residual (B, S, <= C_out; missing channels are zero), rounded as XLA rounds the official
    model on x's device: once on a GPU (cuDNN's fused conv-bias-side-input), after each op on the CPU."""
    if not x.is_cuda:
        y = conv_bsc(x, weight) + bias
        return y if residual is None else y + padded(residual, y.shape[-1])
    if x.dtype == torch.float32:
        return conv_bias_residual_once(x, weight, bias, residual)
    if GPU_CONV == "triton" and _conv_fits(x, weight, bias, residual) and triton_available():
        return torch.ops.agpipe.conv_bias_residual(x, weight, bias, residual)
    y = conv_bsc(x, weight).float() + bias.float()
    return (y if residual is None else y + padded(residual.float(), y.shape[-1])).to(x.dtype)


def padded(residual: torch.Tensor, channels: int) -> torch.Tensor:
    """A residual with zero channels appended up to `channels` (an encoder block widens its input)."""
    return residual if residual.shape[-1] == channels else F.pad(residual, (0, channels - residual.shape[-1]))


def conv_bsc(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """SAME-padded 1D convolution of a (B, S, C) tensor, as conv2d on its channels-last NCHW view;
    a pointwise one (width 1) as a matmul."""
    if weight.shape[-1] == 1:
        return x @ weight[:, :, 0, 0].t()
    y = F.conv2d(x.permute(0, 2, 1)[:, :, None, :], weight, padding=(0, weight.shape[-1] // 2))
    return y[:, :, 0, :].permute(0, 2, 1)


# The track heads of one resolution in one kernel: their fused GEMM with each column's activation in
# a warp-specialized epilogue (`heads_gluon._heads_fwd_ws`, Hopper), bf16 predictions out and no
# float32 logits in memory. Without it (off, or another card): cuBLAS's GEMM writing float32 logits,
# then Inductor's activation passes over them. H100, 2026-12-07: 71.9 -> 71.5 ms at 524,288 bp all
# outputs (peak 8.9 -> 7.0 GiB), 30.0 -> 29.1 at 128 bp, 151.1 -> 146.6 ms at 1 Mb (16.7 -> 11.2 GiB).
HEAD_KERNEL_CONFIG = {"ENABLED": True, "FORM": "ws", "BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "STAGES": 4, "EPI_WARPS": 4,
                      "SUMS_SWIZZLED": False}
# The kernel's forms and settings that `bench_kernels.py --heads` times and its GPU test checks, each
# over HEAD_KERNEL_CONFIG: the warp-specialized form with 4 or 8 epilogue warps, its sums handed over
# in the default shared layout or in one without bank conflicts, and the cooperative form on 128 x 256
# and 128 x 128 tiles (two warpgroups of 64-row wgmma, the epilogue in their registers;
# `heads_gluon._heads_fwd_coop`).
# Not yet measured on a GPU against each other.
HEAD_KERNEL_VARIANTS = {
    "ws, 4 epilogue warps": {"FORM": "ws", "BLOCK_N": 128, "STAGES": 4, "EPI_WARPS": 4, "SUMS_SWIZZLED": False},
    "ws, 8 epilogue warps": {"FORM": "ws", "BLOCK_N": 128, "STAGES": 4, "EPI_WARPS": 8, "SUMS_SWIZZLED": False},
    "ws, 4 epilogue warps, swizzled sums": {"FORM": "ws", "BLOCK_N": 128, "STAGES": 4, "EPI_WARPS": 4, "SUMS_SWIZZLED": True},
    "ws, 8 epilogue warps, swizzled sums": {"FORM": "ws", "BLOCK_N": 128, "STAGES": 4, "EPI_WARPS": 8, "SUMS_SWIZZLED": True},
    "cooperative 128 x 256": {"FORM": "cooperative", "BLOCK_N": 256, "STAGES": 3},
    # the warp-specialized form's tile, its epilogue in the MMA warpgroups' registers: what the
    # sums' handover and the separate epilogue warps cost or gain, at the same operand traffic
    "cooperative 128 x 128": {"FORM": "cooperative", "BLOCK_N": 128, "STAGES": 4},
}
# Registers a thread of the warp-specialized form, by the epilogue's warps: (launch maxnreg, MMA
# warpgroup, producer). The launch rounds the 1-warp producer up to a warpgroup, so the pool is
# maxnreg x (epilogue + 8 warps) x 32 (64K registers an SM at most); the epilogue gets what the
# workers leave: 232 with 4 warps, 152 with 8. The MMA warpgroup's 128 x 128 float32 accumulator is
# 128 of its registers.
HEAD_REGISTERS = {4: (168, 232, 40), 8: (128, 184, 24)}
# The cooperative form's (launch maxnreg, producer): a pool of 168 x 12 warps (the producer's
# rounded up to a warpgroup), of which its two warpgroups get 232 a thread (128 for the 128 x 256
# float32 accumulator). Its epilogue takes 32 columns at a time: with 64, their parameters beside the
# sums spilled registers (offline sm_90 compile, Triton 3.6).
HEAD_COOPERATIVE_REGISTERS = (168, 40)
HEAD_COOPERATIVE_CHUNK = 32
HEAD_KERNEL_PARTS = {"all": 2, "no_activation": 1, "products_only": 0}  # heads_gluon.ALL_PARTS and the rest
# A column's activation (`heads_gluon`'s TRACK, SQUASHED_TRACK, SIGMOID): a genome-track head's, the
# same with the RNA-seq power, the splice-usage sigmoid.
HEAD_KINDS = {"track": 0, "squashed_track": 1, "sigmoid": 2}


@functools.cache
def _heads_gluon():
    """The heads' Hopper kernels (`heads_gluon`), or None where this triton lacks Gluon's Hopper language."""
    try:
        from agpipe.model import heads_gluon
    except ImportError:
        return None
    return heads_gluon


def head_kernel_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `head_predictions` takes x (B, S, K) and weight (K, N): enabled, a Hopper card (wgmma),
    bf16, and the 16-byte aligned rows TMA descriptors need."""
    return (
        bool(HEAD_KERNEL_CONFIG["ENABLED"]) and x.is_cuda and x.dim() == 3 and x.dtype == weight.dtype == torch.bfloat16
        and torch.cuda.get_device_capability(x.device)[0] == 9 and x.stride(-1) == 1 and _tma_rows(x)
        and weight.is_contiguous() and weight.shape[1] % 8 == 0 and weight.data_ptr() % 16 == 0
        and x.shape[-1] == weight.shape[0] and triton_available() and _heads_gluon() is not None
    )


def head_activations(z: torch.Tensor, kinds: torch.Tensor, scale: torch.Tensor, data: torch.Tensor, data_space: bool) -> torch.Tensor:
    """The reference of the kernel's epilogue: float32 logits z (..., N) (bias added) -> each column's
    activation, the ops of `heads.TrackHead.activate`, `heads.to_data_space` and the sigmoid, in float32."""
    from agpipe.model.heads import SOFT_CLIP

    x = F.softplus(z) * scale
    if data_space:
        x = torch.where(x > SOFT_CLIP, (x + SOFT_CLIP) ** 2 / (4 * SOFT_CLIP), x)
        x = torch.where(kinds == HEAD_KINDS["squashed_track"], torch.exp2(torch.log2(x) * (1.0 / 0.75)), x)
        x = x * data
    return torch.where(kinds == HEAD_KINDS["sigmoid"], torch.sigmoid(z), x)


def _launch_heads(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor, data: torch.Tensor,
                  kinds: torch.Tensor, data_space: bool, parts: str = "all") -> torch.Tensor:
    """Runs the heads kernel of HEAD_KERNEL_CONFIG's form (`heads_gluon._heads_fwd_ws` or
    `_heads_fwd_coop`), one persistent program per SM. `parts` other than "all" ("no_activation",
    "products_only": `heads_gluon.ALL_PARTS`) leave work out, for timing only."""
    cfg = HEAD_KERNEL_CONFIG
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    bsz, s, k_dim = x.shape
    n = weight.shape[1]
    out = torch.empty(bsz, s, n, device=x.device, dtype=x.dtype)

    tiles_m, tiles_n = -(-s // bm), -(-n // bn)
    num_tiles = bsz * tiles_m * tiles_n
    args = (_gluon_descriptor(x, [1, bm, bk]), _gluon_descriptor(weight, [bk, bn]), _gluon_descriptor(out, [1, bm, bn]),
            bias, scale, data, kinds, k_dim, n, tiles_m, tiles_n, num_tiles)
    grid = (min(num_tiles, _sm_count(x.device)),)
    heads_kernels = _heads_gluon()
    if cfg["FORM"] == "cooperative":
        maxnreg, load_regs = HEAD_COOPERATIVE_REGISTERS
        heads_kernels._heads_fwd_coop[grid](*args, DATA_SPACE=data_space, STAGES=cfg["STAGES"], LOAD_REGS=load_regs,
                                            CHUNK=HEAD_COOPERATIVE_CHUNK, PARTS=HEAD_KERNEL_PARTS[parts], num_warps=8, maxnreg=maxnreg)
    else:
        maxnreg, mma_regs, load_regs = HEAD_REGISTERS[cfg["EPI_WARPS"]]
        heads_kernels._heads_fwd_ws[grid](*args, DATA_SPACE=data_space, STAGES=cfg["STAGES"], MMA_REGS=mma_regs, LOAD_REGS=load_regs,
                                          SUMS_SWIZZLED=cfg["SUMS_SWIZZLED"], PARTS=HEAD_KERNEL_PARTS[parts],
                                          num_warps=cfg["EPI_WARPS"], maxnreg=maxnreg)
    return out


@torch.library.custom_op("agpipe::head_predictions", mutates_args=())
def _heads_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor, data: torch.Tensor,
              kinds: torch.Tensor, data_space: bool) -> torch.Tensor:
    return _launch_heads(x, weight, bias, scale, data, kinds, data_space)


@_heads_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor, data: torch.Tensor,
      kinds: torch.Tensor, data_space: bool) -> torch.Tensor:
    return x.new_empty(*x.shape[:2], weight.shape[1])


def head_predictions(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor, data: torch.Tensor,
                     kinds: torch.Tensor, data_space: bool) -> torch.Tensor:
    """x (B, S, K) bf16 @ weight (K, N) + bias, then each column's activation (`head_activations`;
    per column: float32 bias, scale, data, int32 kinds), rounded once to bf16: (B, S, N). Only where
    `head_kernel_applies`."""
    return torch.ops.agpipe.head_predictions(x, weight, bias, scale, data, kinds, data_space)
