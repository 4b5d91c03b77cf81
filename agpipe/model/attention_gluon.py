"""`kernels.triton_mha` on Hopper with its softmax beside the products (Gluon; imported only where
triton has Gluon's Hopper language, see `kernels._attention_gluon`).

The same attention as `kernels._mha_fwd` (the pair bias at (q // R, k // R), the soft-cap, no running
maximum: p = exp(capped - cap) lies in [exp(-2 cap), 1]; probabilities rounded to bf16 before they
meet V; float32 sums), with the work split the way FlashAttention-3 splits it. `_mha_fwd` spends a
key tile's products and its softmax one after the other: at 8,192 tokens its 3 SFU operations a
score take about as long as the tensor cores' products, and the two add up (0.95 ms a layer, H100).
Here a program takes 128 query rows of one head:

- one producer warp loads the two warpgroups' queries once, then each key tile's K and V by TMA
  into a ring of STAGES buffers;
- two consumer warpgroups take 64 rows each. They take turns at the tensor cores: each issues its
  tile's products (S = Q K^T, and O += P V for the tile before) and hands the turn over, then applies
  the softmax to S while the other warpgroup's products run ("ping-pong").

One consumer's loop, key tile j: wait for its turn; issue S_j and PV_{j-1} (P from registers); give
the turn; wait for S_j; P_j = softmax weights of S_j (the bias loaded through L1), row sums in
float32; wait for PV_{j-1}, and release tile j-1's stage.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait


@gluon.jit
def _load_partition(q_desc, k_desc, v_lo_desc, v_hi_desc, q_smem, k_bufs, v_lo_bufs, v_hi_bufs, q_ready, kv_ready, kv_empty,
                    row0, col_q, kv_row0, tiles):
    STAGES: gl.constexpr = k_bufs.shape[0]
    BLOCK_N: gl.constexpr = k_bufs.shape[1]
    HALF_M: gl.constexpr = q_smem.shape[1]
    mbarrier.expect(q_ready, 2 * q_desc.block_type.nbytes)
    for g in gl.static_range(2):
        tma.async_copy_global_to_shared(q_desc, [row0 + g * HALF_M, col_q], q_ready, q_smem.index(g))
    for j in range(tiles):
        s = j % STAGES
        mbarrier.wait(kv_empty.index(s), ((j // STAGES) & 1) ^ 1)
        bar = kv_ready.index(s)
        mbarrier.expect(bar, k_desc.block_type.nbytes + v_lo_desc.block_type.nbytes + v_hi_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [kv_row0 + j * BLOCK_N, 0], bar, k_bufs.index(s))
        tma.async_copy_global_to_shared(v_lo_desc, [kv_row0 + j * BLOCK_N, 0], bar, v_lo_bufs.index(s))
        tma.async_copy_global_to_shared(v_hi_desc, [kv_row0 + j * BLOCK_N, v_lo_desc.block_type.shape[1]], bar, v_hi_bufs.index(s))


@gluon.jit
def _weights(s_acc, bias, qk_scale, bias_scale, p_scale, FAST_TANH: gl.constexpr):
    """Unnormalized softmax weights of a tile's float32 logits (as `_mha_fwd` computes them)."""
    y = s_acc * qk_scale + bias * bias_scale
    if FAST_TANH:
        t = gl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [y], dtype=gl.float32, is_pure=True, pack=1)
        return gl.exp2(p_scale * t - p_scale)
    return gl.exp2(p_scale / (gl.exp2(y) + 1.0))


@gluon.jit
def _consumer(g: gl.constexpr, o_lo_desc, o_hi_desc, q_smem, k_bufs, v_lo_bufs, v_hi_bufs, o_lo_smem, o_hi_smem,
              q_ready, kv_ready, kv_empty, turn, bias_ptr, stride_bq, row0, col_o, q_block0, tiles,
              qk_scale, bias_scale, p_scale, R: gl.constexpr, FAST_TANH: gl.constexpr):
    """Consumer warpgroup g: query rows [g * HALF_M, (g + 1) * HALF_M) of the program's block. V's
    columns in two parts, each a power of two (192 = 128 + 64), as `_mha_fwd` takes them."""
    STAGES: gl.constexpr = k_bufs.shape[0]
    BLOCK_N: gl.constexpr = k_bufs.shape[1]
    HALF_M: gl.constexpr = q_smem.shape[1]
    DV_LO: gl.constexpr = v_lo_bufs.shape[2]
    DV_HI: gl.constexpr = v_hi_bufs.shape[2]
    dtype: gl.constexpr = q_smem.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
    lo_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, DV_LO, 16])
    hi_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, DV_HI, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=lo_layout, k_width=2)
    p_hi_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=hi_layout, k_width=2)
    rows: gl.constexpr = gl.SliceLayout(1, s_layout)
    cols: gl.constexpr = gl.SliceLayout(0, s_layout)
    # The bias is constant over R x R blocks: each thread's rows share one row of it
    bias_rows = bias_ptr + ((q_block0 + g * HALF_M + gl.arange(0, HALF_M, layout=rows)) // R) * stride_bq
    key_blocks = gl.arange(0, BLOCK_N, layout=cols) // R
    q = q_smem.index(g)
    mbarrier.wait(q_ready, 0)
    o_lo = gl.zeros((HALF_M, DV_LO), dtype=gl.float32, layout=lo_layout)
    o_hi = gl.zeros((HALF_M, DV_HI), dtype=gl.float32, layout=hi_layout)
    row_sum = gl.zeros((HALF_M,), dtype=gl.float32, layout=rows)
    # key tile 0: its logits only
    mbarrier.wait(kv_ready.index(0), 0)
    if g == 1:
        mbarrier.wait(turn.index(0), 0)
    s_acc = warpgroup_mma(q, k_bufs.index(0).permute((1, 0)), gl.zeros((HALF_M, BLOCK_N), dtype=gl.float32, layout=s_layout),
                          use_acc=False, is_async=True)
    gl.thread_barrier()
    mbarrier.arrive(turn.index(g))
    s_acc = warpgroup_mma_wait(0, deps=(s_acc,))
    w = _weights(s_acc, gl.load(bias_rows[:, None] + key_blocks[None, :]), qk_scale, bias_scale, p_scale, FAST_TANH)
    row_sum += gl.sum(w, 1)
    # The probabilities meet V in bf16 (attention_probs_dtype), as FlashAttention rounds them
    p = gl.convert_layout(w.to(dtype), p_layout)
    p_hi = gl.convert_layout(w.to(dtype), p_hi_layout)
    for j in range(1, tiles):
        s = j % STAGES
        prev = (j + STAGES - 1) % STAGES
        mbarrier.wait(kv_ready.index(s), (j // STAGES) & 1)
        # The turn at the tensor cores: consumer 0's tile j after consumer 1's tile j - 1, 1's after 0's
        # tile j. Consumer g's arrival for tile t completes turn[g]'s phase t.
        mbarrier.wait(turn.index(1 - g), (j + g - 1) & 1)
        s_acc = warpgroup_mma(q, k_bufs.index(s).permute((1, 0)), gl.zeros((HALF_M, BLOCK_N), dtype=gl.float32, layout=s_layout),
                              use_acc=False, is_async=True)
        o_lo = warpgroup_mma(p, v_lo_bufs.index(prev), o_lo, is_async=True)
        o_hi = warpgroup_mma(p_hi, v_hi_bufs.index(prev), o_hi, is_async=True)
        gl.thread_barrier()
        mbarrier.arrive(turn.index(g))
        # S_j done; the products of the tile before may still run, and p, which they read, stays live
        s_acc, p, p_hi = warpgroup_mma_wait(2, deps=(s_acc, p, p_hi))
        bias = gl.load(bias_rows[:, None] + (j * (BLOCK_N // R) + key_blocks)[None, :])
        w = _weights(s_acc, bias, qk_scale, bias_scale, p_scale, FAST_TANH)
        row_sum += gl.sum(w, 1)
        o_lo, o_hi = warpgroup_mma_wait(0, deps=(o_lo, o_hi))
        gl.thread_barrier()
        mbarrier.arrive(kv_empty.index(prev))  # tile j - 1's K and V are read
        p = gl.convert_layout(w.to(dtype), p_layout)
        p_hi = gl.convert_layout(w.to(dtype), p_hi_layout)
    # the last tile's products: the turn is no longer needed
    last = (tiles + STAGES - 1) % STAGES
    o_lo = warpgroup_mma(p, v_lo_bufs.index(last), o_lo, is_async=True)
    o_hi = warpgroup_mma(p_hi, v_hi_bufs.index(last), o_hi, is_async=True)
    o_lo, o_hi = warpgroup_mma_wait(0, deps=(o_lo, o_hi))
    gl.thread_barrier()
    mbarrier.arrive(kv_empty.index(last))
    inv = 1.0 / row_sum
    lo = o_lo * gl.convert_layout(inv, gl.SliceLayout(1, lo_layout))[:, None]
    hi = o_hi * gl.convert_layout(inv, gl.SliceLayout(1, hi_layout))[:, None]
    o_lo_smem.index(g).store(lo.to(dtype))
    o_hi_smem.index(g).store(hi.to(dtype))
    fence_async_shared()
    gl.thread_barrier()
    tma.async_copy_shared_to_global(o_lo_desc, [row0 + g * HALF_M, col_o], o_lo_smem.index(g))
    tma.async_copy_shared_to_global(o_hi_desc, [row0 + g * HALF_M, col_o + DV_LO], o_hi_smem.index(g))
    tma.store_wait(0)


@gluon.jit
def _second_consumer(q_desc, k_desc, v_lo_desc, v_hi_desc, o_lo_desc, o_hi_desc, q_smem, k_bufs, v_lo_bufs, v_hi_bufs,
                     o_lo_smem, o_hi_smem, q_ready, kv_ready, kv_empty, turn, bias_ptr, stride_bq, row0, col_q, col_o,
                     kv_row0, q_block0, tiles, qk_scale, bias_scale, p_scale, R: gl.constexpr, FAST_TANH: gl.constexpr):
    _consumer(1, o_lo_desc, o_hi_desc, q_smem, k_bufs, v_lo_bufs, v_hi_bufs, o_lo_smem, o_hi_smem, q_ready, kv_ready,
              kv_empty, turn, bias_ptr, stride_bq, row0, col_o, q_block0, tiles, qk_scale, bias_scale, p_scale, R, FAST_TANH)


@gluon.jit
def _producer(q_desc, k_desc, v_lo_desc, v_hi_desc, o_lo_desc, o_hi_desc, q_smem, k_bufs, v_lo_bufs, v_hi_bufs,
              o_lo_smem, o_hi_smem, q_ready, kv_ready, kv_empty, turn, bias_ptr, stride_bq, row0, col_q, col_o,
              kv_row0, q_block0, tiles, qk_scale, bias_scale, p_scale, R: gl.constexpr, FAST_TANH: gl.constexpr):
    _load_partition(q_desc, k_desc, v_lo_desc, v_hi_desc, q_smem, k_bufs, v_lo_bufs, v_hi_bufs, q_ready, kv_ready, kv_empty,
                    row0, col_q, kv_row0, tiles)


@gluon.jit
def _mha_fwd_pingpong(q_desc, k_desc, v_lo_desc, v_hi_desc, o_lo_desc, o_hi_desc, bias_ptr, stride_bb, stride_bh, stride_bq,
                      seq_len, heads, qk_scale, bias_scale, p_scale, R: gl.constexpr, STAGES: gl.constexpr,
                      FAST_TANH: gl.constexpr):
    """Program (query block of 128 rows, batch x head). q_desc over (B * S, H * D) [64, D]; k_desc
    (B * S, D) [BLOCK_N, D]; v_lo_desc, v_hi_desc (B * S, Dv) [BLOCK_N, DV_LO], [BLOCK_N, DV_HI];
    o_lo_desc, o_hi_desc (B * S, H * Dv) [64, DV_LO], [64, DV_HI]; bias (B, H, S / R, S / R) float32
    and its strides; the constants as `kernels._launch_mha` folds them. Launch with 4 warps (the
    first consumer); the second consumer and the producer are workers."""
    HALF_M: gl.constexpr = q_desc.block_type.shape[0]
    D: gl.constexpr = q_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    DV_LO: gl.constexpr = v_lo_desc.block_type.shape[1]
    DV_HI: gl.constexpr = v_hi_desc.block_type.shape[1]
    dtype: gl.constexpr = q_desc.dtype
    bh = gl.program_id(1)
    b = bh // heads
    h = bh % heads
    q_block0 = gl.program_id(0) * (2 * HALF_M)
    row0 = b * seq_len + q_block0
    q_smem = gl.allocate_shared_memory(dtype, [2, HALF_M, D], q_desc.layout)
    k_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, D], k_desc.layout)
    v_lo_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, DV_LO], v_lo_desc.layout)
    v_hi_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, DV_HI], v_hi_desc.layout)
    o_lo_smem = gl.allocate_shared_memory(dtype, [2, HALF_M, DV_LO], o_lo_desc.layout)
    o_hi_smem = gl.allocate_shared_memory(dtype, [2, HALF_M, DV_HI], o_hi_desc.layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    kv_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_ready, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(kv_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=2)  # both consumers
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=1)
    bias_ptr = bias_ptr + b * stride_bb + h * stride_bh
    tiles = gl.cdiv(seq_len, BLOCK_N)
    args = (q_desc, k_desc, v_lo_desc, v_hi_desc, o_lo_desc, o_hi_desc, q_smem, k_bufs, v_lo_bufs, v_hi_bufs,
            o_lo_smem, o_hi_smem, q_ready, kv_ready, kv_empty, turn, bias_ptr, stride_bq, row0, h * D, h * (DV_LO + DV_HI),
            b * seq_len, q_block0, tiles, qk_scale, bias_scale, p_scale, R, FAST_TANH)
    gl.warp_specialize([
        (_consumer, (0, o_lo_desc, o_hi_desc, q_smem, k_bufs, v_lo_bufs, v_hi_bufs, o_lo_smem, o_hi_smem, q_ready, kv_ready,
                     kv_empty, turn, bias_ptr, stride_bq, row0, h * (DV_LO + DV_HI), q_block0, tiles,
                     qk_scale, bias_scale, p_scale, R, FAST_TANH)),
        (_second_consumer, args),
        (_producer, args),
    ], [4, 1], [232, 40])
