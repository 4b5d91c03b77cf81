"""The Triton kernels behind `kernels.conv_bias_residual` (imported only where triton is; see there).

Each computes BLOCK_M positions x BLOCK_N output channels of one sequence as a GEMM over WIDTH taps
x c_in channels, accumulated in float32, and ends with the same epilogue (`_bias_residual_store`):
bias and residual added to the float32 sum, which is rounded once.
"""

import triton
import triton.language as tl


@triton.jit
def _bias_residual_store(
    acc, b, offs_m, offs_n, b_ptr, r_ptr, out_ptr, seq_len, c_out, c_res,
    stride_rb, stride_rs, stride_ob, stride_os, HAS_RES: tl.constexpr,
):
    """acc + bias + residual (channels >= c_res read as the residual's zero padding), rounded once
    and stored; b is the sequence, in int64 (b * stride passes 2^31 from the 7th window of 524,288 x 768)."""
    acc += tl.load(b_ptr + offs_n, mask=offs_n < c_out, other=0.0).to(tl.float32)[None, :]
    in_seq = offs_m[:, None] < seq_len
    if HAS_RES:
        r = tl.load(
            r_ptr + b * stride_rb + offs_m[:, None] * stride_rs + offs_n[None, :],
            mask=in_seq & (offs_n[None, :] < c_res), other=0.0,
        )
        acc += r.to(tl.float32)
    out = out_ptr + b * stride_ob + offs_m[:, None] * stride_os + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=in_seq & (offs_n[None, :] < c_out))


@triton.jit
def _conv_fwd(
    x_ptr, w_ptr, b_ptr, r_ptr, out_ptr,
    seq_len, c_in, c_out, c_res,
    stride_xb, stride_xs, stride_wo, stride_wk, stride_rb, stride_rs, stride_ob, stride_os,
    WIDTH: tl.constexpr, HAS_RES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Tiles loaded through pointers: x shifted by each tap, rows outside the sequence read as SAME
    padding's zeros.

    The output-channel block is the fastest grid axis, so the programs sharing one block of x
    run together and read it from L2; the whole weight (~6 MB at 1,536 channels) stays there."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_base = x_ptr + b * stride_xb
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    blocks = tl.cdiv(c_in, BLOCK_K)
    for i in range(0, WIDTH * blocks):
        tap = i // blocks
        c = (i % blocks) * BLOCK_K + offs_k
        rows = offs_m + (tap - WIDTH // 2)
        a = tl.load(
            x_base + rows[:, None] * stride_xs + c[None, :],
            mask=(rows[:, None] >= 0) & (rows[:, None] < seq_len) & (c[None, :] < c_in), other=0.0,
        )
        w = tl.load(
            w_ptr + offs_n[None, :] * stride_wo + tap * stride_wk + c[:, None],
            mask=(c[:, None] < c_in) & (offs_n[None, :] < c_out), other=0.0,
        )
        acc = tl.dot(a, w, acc)
    _bias_residual_store(acc, b, offs_m, offs_n, b_ptr, r_ptr, out_ptr, seq_len, c_out, c_res,
                         stride_rb, stride_rs, stride_ob, stride_os, HAS_RES)


@triton.jit
def _conv_fwd_tma(
    x_desc, w_desc, b_ptr, r_ptr, out_ptr,
    seq_len, c_in, c_out, c_res,
    stride_rb, stride_rs, stride_ob, stride_os,
    WIDTH: tl.constexpr, HAS_RES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """`_conv_fwd` with its tiles loaded by the tensor memory accelerator, one program per output
    tile: x through a (B, S, C_in) descriptor, whose out-of-bounds rows and channels read as zeros
    (SAME padding, the last channel block), the weight through a (C_out, WIDTH * C_in) one (channels
    past C_in meet those zeros)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = tl.program_id(2)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    blocks = tl.cdiv(c_in, BLOCK_K)
    for i in range(0, WIDTH * blocks):
        tap = i // blocks
        c = (i % blocks) * BLOCK_K
        a = x_desc.load([b, pid_m * BLOCK_M + tap - WIDTH // 2, c]).reshape(BLOCK_M, BLOCK_K)
        w = w_desc.load([pid_n * BLOCK_N, tap * c_in + c])
        acc = tl.dot(a, w.T, acc)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    _bias_residual_store(acc, b.to(tl.int64), offs_m, offs_n, b_ptr, r_ptr, out_ptr, seq_len, c_out, c_res,
                         stride_rb, stride_rs, stride_ob, stride_os, HAS_RES)
