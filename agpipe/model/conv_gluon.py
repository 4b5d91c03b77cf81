"""`kernels.conv_bias_residual` on Hopper as a warp-specialized persistent kernel (Gluon; imported only
where triton has Gluon's Hopper language, see `kernels._conv_ws_kernel`).

The same implicit GEMM as `conv_triton._conv_fwd_tma` (BLOCK_M positions x BLOCK_N output channels,
WIDTH taps x c_in channels accumulated in float32, bias and residual added before one rounding), with
the work split the way Hopper's own GEMM kernels split it, so that no tile waits on memory:

- one producer warp issues every TMA load: each k-step's x and weight tiles into a ring of STAGES
  buffers, and each tile's residual into the epilogue's staging buffers halfway through its loop;
- two consumer warpgroups each multiply half of the tile's rows (wgmma from shared memory), release
  each stage as its product is done, then add bias and the prefetched residual, round once, and hand
  the tile to an asynchronous TMA store, while the producer is already filling the next tile's stages.

Programs are persistent (one per SM) and walk the tiles with the channel block fastest, as
`_conv_fwd_tma`'s grid does. Out-of-bounds rows and channels of every descriptor read as zeros (SAME
padding, the residual's missing channels) and are not written.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait


@gluon.jit
def _tile(tile, tiles_n, tiles_m):
    """(sequence, row block, channel block) of a tile index, the channel block fastest."""
    return tile // (tiles_n * tiles_m), (tile // tiles_n) % tiles_m, tile % tiles_n


@gluon.jit
def _load_partition(x_desc, w_desc, r_desc, a_bufs, b_bufs, staging, ready, empty, res_ready, res_empty,
                    c_in, c_res, tiles_m, tiles_n, num_tiles, WIDTH: gl.constexpr, HAS_RES: gl.constexpr):
    STAGES: gl.constexpr = a_bufs.shape[0]
    BLOCK_M: gl.constexpr = a_bufs.shape[2]
    BLOCK_K: gl.constexpr = a_bufs.shape[3]
    BLOCK_N: gl.constexpr = b_bufs.shape[1]
    HALF_M: gl.constexpr = staging.shape[2]
    blocks = gl.cdiv(c_in, BLOCK_K)
    steps = WIDTH * blocks
    it = 0
    done = 0
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        b, pid_m, pid_n = _tile(tile, tiles_n, tiles_m)
        for k in range(steps):
            s = it % STAGES
            mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
            tap = k // blocks
            c = (k % blocks) * BLOCK_K
            bar = ready.index(s)
            mbarrier.expect(bar, x_desc.block_type.nbytes + w_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(x_desc, [b, pid_m * BLOCK_M + tap - WIDTH // 2, c], bar, a_bufs.index(s))
            tma.async_copy_global_to_shared(w_desc, [pid_n * BLOCK_N, tap * c_in + c], bar, b_bufs.index(s))
            if HAS_RES:
                # halfway: the staging buffers' last store has long finished, and the residual lands
                # well before the epilogue needs it (none for channels past the residual's)
                if k == steps // 2:
                    for h in gl.static_range(2):
                        mbarrier.wait(res_empty.index(h), (done & 1) ^ 1)
                        if pid_n * BLOCK_N < c_res:
                            fence_async_shared()
                            mbarrier.expect(res_ready.index(h), r_desc.block_type.nbytes)
                            tma.async_copy_global_to_shared(r_desc, [b, pid_m * BLOCK_M + h * HALF_M, pid_n * BLOCK_N],
                                                            res_ready.index(h), staging.index(h))
            it += 1
        done += 1


@gluon.jit
def _mma_partition(h: gl.constexpr, o_desc, a_bufs, b_bufs, staging, ready, empty, res_ready, res_empty, bias_ptr,
                   c_in, c_out, c_res, tiles_m, tiles_n, num_tiles, WIDTH: gl.constexpr, HAS_RES: gl.constexpr):
    """Consumer warpgroup h: rows [h * HALF_M, (h + 1) * HALF_M) of every tile, and their epilogue."""
    STAGES: gl.constexpr = a_bufs.shape[0]
    BLOCK_M: gl.constexpr = a_bufs.shape[2]
    BLOCK_K: gl.constexpr = a_bufs.shape[3]
    BLOCK_N: gl.constexpr = b_bufs.shape[1]
    HALF_M: gl.constexpr = staging.shape[2]
    dtype: gl.constexpr = a_bufs.dtype
    # The 3-d buffers' (leading dimension 1) bytes seen as the 2-d tiles wgmma and the registers take
    a_layout: gl.constexpr = gl.NVMMASharedLayout(a_bufs.type.layout.swizzle_byte_width, dtype.primitive_bitwidth, rank=2)
    o_layout: gl.constexpr = gl.NVMMASharedLayout(staging.type.layout.swizzle_byte_width, dtype.primitive_bitwidth, rank=2)
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
    out = staging.index(h)._reinterpret(dtype, [HALF_M, BLOCK_N], o_layout)
    blocks = gl.cdiv(c_in, BLOCK_K)
    steps = WIDTH * blocks
    it = 0
    done = 0
    residuals = 0
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        b, pid_m, pid_n = _tile(tile, tiles_n, tiles_m)
        offs_n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, acc_layout))
        bias = gl.load(bias_ptr + offs_n, mask=offs_n < c_out, other=0.0)  # its latency hidden by the loop
        acc = gl.zeros((HALF_M, BLOCK_N), dtype=gl.float32, layout=acc_layout)
        for k in range(steps):
            s = it % STAGES
            mbarrier.wait(ready.index(s), (it // STAGES) & 1)
            a = a_bufs.index(s)._reinterpret(dtype, [BLOCK_M, BLOCK_K], a_layout).slice(h * HALF_M, HALF_M)
            acc = warpgroup_mma(a, b_bufs.index(s).permute((1, 0)), acc, use_acc=k > 0, is_async=True)
            # one product in flight: the one before it is done, and its stage free
            acc = warpgroup_mma_wait(1, deps=(acc,))
            if k > 0:
                gl.thread_barrier()
                mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES))
            elif done > 0:
                # every warp's part of the last tile's store has left the staging buffer
                tma.store_wait(0)
                gl.thread_barrier()
                if HAS_RES:
                    mbarrier.arrive(res_empty.index(h))
            it += 1
        acc = warpgroup_mma_wait(0, deps=(acc,))
        gl.thread_barrier()
        mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES))

        acc += bias.to(gl.float32)[None, :]
        if HAS_RES:
            if pid_n * BLOCK_N < c_res:
                mbarrier.wait(res_ready.index(h), residuals & 1)
                acc += out.load(acc_layout).to(gl.float32)
                gl.thread_barrier()  # all of the residual read before the output overwrites it
                residuals += 1
        out.store(acc.to(dtype))
        fence_async_shared()
        gl.thread_barrier()
        tma.async_copy_shared_to_global(o_desc, [b, pid_m * BLOCK_M + h * HALF_M, pid_n * BLOCK_N], staging.index(h))
        done += 1
    tma.store_wait(0)


@gluon.jit
def _second_half(x_desc, w_desc, r_desc, o_desc, a_bufs, b_bufs, staging, ready, empty, res_ready, res_empty,
                 bias_ptr, c_in, c_out, c_res, tiles_m, tiles_n, num_tiles, WIDTH: gl.constexpr, HAS_RES: gl.constexpr):
    _mma_partition(1, o_desc, a_bufs, b_bufs, staging, ready, empty, res_ready, res_empty, bias_ptr,
                   c_in, c_out, c_res, tiles_m, tiles_n, num_tiles, WIDTH, HAS_RES)


@gluon.jit
def _producer(x_desc, w_desc, r_desc, o_desc, a_bufs, b_bufs, staging, ready, empty, res_ready, res_empty,
              bias_ptr, c_in, c_out, c_res, tiles_m, tiles_n, num_tiles, WIDTH: gl.constexpr, HAS_RES: gl.constexpr):
    _load_partition(x_desc, w_desc, r_desc, a_bufs, b_bufs, staging, ready, empty, res_ready, res_empty,
                    c_in, c_res, tiles_m, tiles_n, num_tiles, WIDTH, HAS_RES)


@gluon.jit
def _conv_fwd_ws(x_desc, w_desc, r_desc, o_desc, bias_ptr, c_in, c_out, c_res, tiles_m, tiles_n, num_tiles,
                 WIDTH: gl.constexpr, HAS_RES: gl.constexpr, STAGES: gl.constexpr):
    """x_desc (B, S, C_in) [1, BLOCK_M, BLOCK_K]; w_desc (C_out, WIDTH * C_in) [BLOCK_N, BLOCK_K];
    r_desc, o_desc (B, S, C) [1, BLOCK_M / 2, BLOCK_N]. Launch with 4 warps (the first consumer);
    the second consumer and the producer are worker partitions."""
    BLOCK_M: gl.constexpr = x_desc.block_type.shape[1]
    BLOCK_K: gl.constexpr = x_desc.block_type.shape[2]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    HALF_M: gl.constexpr = o_desc.block_type.shape[1]
    gl.static_assert(2 * HALF_M == BLOCK_M)
    dtype: gl.constexpr = x_desc.dtype
    a_bufs = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_M, BLOCK_K], x_desc.layout)
    b_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, BLOCK_K], w_desc.layout)
    staging = gl.allocate_shared_memory(dtype, [2, 1, HALF_M, BLOCK_N], o_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    res_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    res_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # both consumers
    for i in gl.static_range(2):
        mbarrier.init(res_ready.index(i), count=1)
        mbarrier.init(res_empty.index(i), count=1)
    args = (x_desc, w_desc, r_desc, o_desc, a_bufs, b_bufs, staging, ready, empty, res_ready, res_empty,
            bias_ptr, c_in, c_out, c_res, tiles_m, tiles_n, num_tiles, WIDTH, HAS_RES)
    # registers: 232 for each consumer (a 128 x 128 float32 accumulator is 128 of them), 40 for the
    # producer; 3 warpgroups x 128 threads x 168 at launch
    gl.warp_specialize([
        (_mma_partition, (0, o_desc, a_bufs, b_bufs, staging, ready, empty, res_ready, res_empty, bias_ptr,
                          c_in, c_out, c_res, tiles_m, tiles_n, num_tiles, WIDTH, HAS_RES)),
        (_second_half, args),
        (_producer, args),
    ], [4, 1], [232, 40])
