"""`kernels.head_predictions` on Hopper: the genome-track heads of one resolution as one warp-specialized
persistent kernel (Gluon; imported only where triton has Gluon's Hopper language, see
`kernels._heads_gluon`).

The heads' fused GEMM (`heads.FusedLinear`) with every column's activation in the epilogue, so that
neither the float32 logits (5.1 GB a 524,288 bp window at 1 bp) nor a second pass over them reaches
memory. A kernel whose epilogue stops its products measured slower than cuBLAS plus Inductor's
passes (tenth session, docs/performance.md): the epilogue's exp and log per value kept the tensor
cores idle. Here the epilogue has a warpgroup of its own:

- one producer warp issues every TMA load: each k-step's x and weight tiles into a ring of STAGES
  buffers;
- one MMA warpgroup multiplies each 128 x 128 tile (wgmma from shared memory, float32 accumulation),
  releases each stage as its product is done, and leaves the tile's sums in shared memory;
- the epilogue warpgroup (the default partition) takes those sums, adds the bias, applies each
  column's activation (the track heads' softplus x softplus(scale), soft-clip inverse, RNA-seq power
  and track mean; the splice-usage sigmoid), rounds once and stores the tile by TMA, while the MMA
  warpgroup is already on the next tile.

The activations are the float32 ops of `heads.TrackHead.activate`, `heads.to_data_space` and
`torch.sigmoid`, evaluated with the SFU's approximate exp2, log2 and reciprocal (the exp Inductor
emits is that exp2 too) and softplus's log1p as a short series: ~25 instructions a value. The
twelfth session's version, with libdevice's log1p, log2, exp2 and IEEE divisions (~110 a value),
took 22.6 ms a 524,288 bp window (both resolutions); this one 8.8 (H100), where cuBLAS's GEMM and
Inductor's passes take ~10.3 at 1 bp alone. Below float32's normal range the SFU ops flush to zero
(predictions under ~1e-36). Each 64 columns evaluate only the kinds they hold, so the RNA-seq power
and the sigmoid cost nothing in the other heads' tiles.

A second form, `_heads_fwd_coop` (below), runs the same products and epilogue in two warpgroups
that share a 128 x 256 tile and apply its epilogue themselves.
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

# Column kinds (`kind`): kernels.HEAD_KINDS names the same values.
TRACK = gl.constexpr(0)
SQUASHED_TRACK = gl.constexpr(1)
SIGMOID = gl.constexpr(2)
LOG2E = gl.constexpr(1.4426950408889634)
# What the kernel runs (`PARTS`): everything; the epilogue without the activations (bias added, rounded,
# stored); the MMA warpgroup's products alone (no sums handed over, nothing written). The two less
# than everything are for `scripts/bench_kernels.py --heads`, which times them to tell which part binds.
ALL_PARTS = gl.constexpr(2)
NO_ACTIVATION = gl.constexpr(1)
PRODUCTS_ONLY = gl.constexpr(0)


@gluon.jit
def _tile(tile, tiles_n, tiles_m):
    """(sequence, row block, column block) of a tile index, the column block fastest."""
    return tile // (tiles_n * tiles_m), (tile // tiles_n) % tiles_m, tile % tiles_n


@gluon.jit
def _load_partition(x_desc, w_desc, a_bufs, b_bufs, ready, empty, k_dim, tiles_m, tiles_n, num_tiles):
    STAGES: gl.constexpr = a_bufs.shape[0]
    BLOCK_M: gl.constexpr = a_bufs.shape[2]
    BLOCK_K: gl.constexpr = a_bufs.shape[3]
    BLOCK_N: gl.constexpr = b_bufs.shape[2]
    steps = gl.cdiv(k_dim, BLOCK_K)
    it = 0
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        b, pid_m, pid_n = _tile(tile, tiles_n, tiles_m)
        for k in range(steps):
            s = it % STAGES
            mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
            bar = ready.index(s)
            mbarrier.expect(bar, x_desc.block_type.nbytes + w_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(x_desc, [b, pid_m * BLOCK_M, k * BLOCK_K], bar, a_bufs.index(s))
            tma.async_copy_global_to_shared(w_desc, [k * BLOCK_K, pid_n * BLOCK_N], bar, b_bufs.index(s))
            it += 1


@gluon.jit
def _products(a_bufs, b_bufs, ready, empty, it, steps, acc_layout: gl.constexpr):
    """One tile's sums over the k-steps of the ring (stage counter `it` on), float32 in acc_layout,
    each stage released once its product is done; returns them and the counter after."""
    STAGES: gl.constexpr = a_bufs.shape[0]
    BLOCK_M: gl.constexpr = a_bufs.shape[2]
    BLOCK_K: gl.constexpr = a_bufs.shape[3]
    BLOCK_N: gl.constexpr = b_bufs.shape[2]
    dtype: gl.constexpr = a_bufs.dtype
    # The 3-d buffer's (leading dimension 1) bytes seen as the 2-d tile wgmma takes
    a_layout: gl.constexpr = gl.NVMMASharedLayout(a_bufs.type.layout.swizzle_byte_width, dtype.primitive_bitwidth, rank=2)
    acc = gl.zeros((BLOCK_M, BLOCK_N), dtype=gl.float32, layout=acc_layout)
    for k in range(steps):
        s = it % STAGES
        mbarrier.wait(ready.index(s), (it // STAGES) & 1)
        a = a_bufs.index(s)._reinterpret(dtype, [BLOCK_M, BLOCK_K], a_layout)
        acc = warpgroup_mma(a, b_bufs.index(s), acc, use_acc=k > 0, is_async=True)
        # one product in flight: the one before it is done, and its stage free
        acc = warpgroup_mma_wait(1, deps=(acc,))
        if k > 0:
            gl.thread_barrier()
            mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES))
        it += 1
    acc = warpgroup_mma_wait(0, deps=(acc,))
    gl.thread_barrier()
    mbarrier.arrive(empty.index((it + STAGES - 1) % STAGES))
    return acc, it


@gluon.jit
def _mma_partition(a_bufs, b_bufs, sums, ready, empty, sums_full, sums_free, k_dim, num_tiles, PARTS: gl.constexpr):
    BLOCK_K: gl.constexpr = a_bufs.shape[3]
    BLOCK_N: gl.constexpr = b_bufs.shape[2]
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
    steps = gl.cdiv(k_dim, BLOCK_K)
    it = 0
    done = 0
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        acc, it = _products(a_bufs, b_bufs, ready, empty, it, steps, acc_layout)
        if PARTS != PRODUCTS_ONLY:
            mbarrier.wait(sums_free, (done & 1) ^ 1)  # the epilogue has read the last tile's sums
            sums.store(acc)
            gl.thread_barrier()
            mbarrier.arrive(sums_full)
        elif k_dim < 0:  # never true: a use of the sums, without which the products are compiled away
            sums.store(acc)
        done += 1


@gluon.jit
def _rcp(x):
    # rcp.approx.ftz.f32: 1 ulp, one MUFU op (the IEEE division is a Newton iteration of ~10)
    return gl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=gl.float32, is_pure=True, pack=1)


@gluon.jit
def _ex2(x):
    return gl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=gl.float32, is_pure=True, pack=1)


@gluon.jit
def _lg2(x):
    return gl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=gl.float32, is_pure=True, pack=1)


@gluon.jit
def _softplus(z):
    """log(1 + exp(z)) = max(z, 0) + log1p(e), e = exp(-|z|) in (0, 1], with log1p(e) = 2 atanh(s),
    s = e / (2 + e) <= 1/3: the odd series to s^13 is within 2e-8 relative, for the smallest e too
    (lg2(1 + e) would lose e's low bits to the rounding of 1 + e)."""
    e = _ex2(gl.abs(z) * -LOG2E)
    s = e * _rcp(2.0 + e)
    t = s * s
    p = 1.0 / 13.0
    p = p * t + 1.0 / 11.0
    p = p * t + 1.0 / 9.0
    p = p * t + 1.0 / 7.0
    p = p * t + 1.0 / 5.0
    p = p * t + 1.0 / 3.0
    p = p * t + 1.0
    return gl.maximum(z, 0.0) + 2.0 * s * p


@gluon.jit
def _bit_or(a, b):
    return a | b


@gluon.jit
def _activation(z, kind, scale, data, present, DATA_SPACE: gl.constexpr):
    """Each column's head activation of its float32 logits z (bias added)."""
    y = z
    if (present & ((1 << TRACK) | (1 << SQUASHED_TRACK))) != 0:
        x = _softplus(z) * scale
        if DATA_SPACE:
            c = x + 10.0
            x = gl.where(x > 10.0, c * c * (1.0 / 40.0), x)
            if (present & (1 << SQUASHED_TRACK)) != 0:
                x = gl.where(kind == SQUASHED_TRACK, _ex2(_lg2(x) * (1.0 / 0.75)), x)
            x = x * data
        y = gl.where(kind == SIGMOID, y, x)
    if (present & (1 << SIGMOID)) != 0:
        y = gl.where(kind == SIGMOID, _rcp(1.0 + _ex2(z * -LOG2E)), y)
    return y


@gluon.jit
def _columns(offs_n, n, bias_ptr, scale_ptr, data_ptr, kind_ptr):
    """The parameters of the columns offs_n, broadcast over rows, and the kinds they hold (a bit set)."""
    inside = offs_n < n
    bias = gl.load(bias_ptr + offs_n, mask=inside, other=0.0)[None, :]
    scale = gl.load(scale_ptr + offs_n, mask=inside, other=0.0)[None, :]
    data = gl.load(data_ptr + offs_n, mask=inside, other=0.0)[None, :]
    kind = gl.load(kind_ptr + offs_n, mask=inside, other=TRACK)
    present = gl.reduce(1 << kind, 0, _bit_or)
    return bias, scale, data, kind[None, :], present


@gluon.jit
def _predictions(z, bias, scale, data, kind, present, DATA_SPACE: gl.constexpr, PARTS: gl.constexpr):
    """float32 sums z -> the columns' predictions (bias added; activated unless PARTS says otherwise)."""
    y = z + bias
    if PARTS == ALL_PARTS:
        y = _activation(y, kind, scale, data, present, DATA_SPACE)
    return y


@gluon.jit
def _epilogue_partition(o_desc, sums, staging, sums_full, sums_free, bias_ptr, scale_ptr, data_ptr, kind_ptr,
                        n, tiles_m, tiles_n, num_tiles, DATA_SPACE: gl.constexpr, PARTS: gl.constexpr):
    if PARTS != PRODUCTS_ONLY:
        _epilogue(o_desc, sums, staging, sums_full, sums_free, bias_ptr, scale_ptr, data_ptr, kind_ptr,
                  n, tiles_m, tiles_n, num_tiles, DATA_SPACE, PARTS)


@gluon.jit
def _epilogue(o_desc, sums, staging, sums_full, sums_free, bias_ptr, scale_ptr, data_ptr, kind_ptr,
              n, tiles_m, tiles_n, num_tiles, DATA_SPACE: gl.constexpr, PARTS: gl.constexpr):
    BLOCK_M: gl.constexpr = sums.shape[0]
    BLOCK_N: gl.constexpr = sums.shape[1]
    # 64 columns at a time (the 128-byte swizzle span of the bf16 staging): a whole tile's values and
    # its columns' four parameters did not fit the registers
    CHUNK: gl.constexpr = 64
    dtype: gl.constexpr = o_desc.dtype
    # the MMA warpgroup's accumulator layout restricted to CHUNK columns, over this partition's warps
    # (with 4, the same thread for each value)
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1], instr_shape=[16, CHUNK, 16])
    col_layout: gl.constexpr = gl.SliceLayout(0, layout)
    out_layout: gl.constexpr = gl.NVMMASharedLayout(staging.type.layout.swizzle_byte_width, dtype.primitive_bitwidth, rank=2)
    out = staging._reinterpret(dtype, [BLOCK_M, BLOCK_N], out_layout)
    done = 0
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        b, pid_m, pid_n = _tile(tile, tiles_n, tiles_m)
        mbarrier.wait(sums_full, done & 1)
        for j in gl.static_range(BLOCK_N // CHUNK):
            offs_n = pid_n * BLOCK_N + j * CHUNK + gl.arange(0, CHUNK, layout=col_layout)
            bias, scale, data, kind, present = _columns(offs_n, n, bias_ptr, scale_ptr, data_ptr, kind_ptr)
            z = sums.slice(j * CHUNK, CHUNK, dim=1).load(layout)
            if j == BLOCK_N // CHUNK - 1:
                gl.thread_barrier()
                mbarrier.arrive(sums_free)  # the MMA warpgroup may write the next tile's sums
            y = _predictions(z, bias, scale, data, kind, present, DATA_SPACE, PARTS)
            if j == 0:
                tma.store_wait(0)  # the last tile's store has left the staging buffer
                gl.thread_barrier()
            out.slice(j * CHUNK, CHUNK, dim=1).store(y.to(dtype))
        fence_async_shared()
        gl.thread_barrier()
        tma.async_copy_shared_to_global(o_desc, [b, pid_m * BLOCK_M, pid_n * BLOCK_N], staging)
        done += 1
    tma.store_wait(0)


@gluon.jit
def _mma_worker(x_desc, w_desc, o_desc, a_bufs, b_bufs, sums, staging, ready, empty, sums_full, sums_free,
                bias_ptr, scale_ptr, data_ptr, kind_ptr, k_dim, n, tiles_m, tiles_n, num_tiles,
                DATA_SPACE: gl.constexpr, PARTS: gl.constexpr):
    _mma_partition(a_bufs, b_bufs, sums, ready, empty, sums_full, sums_free, k_dim, num_tiles, PARTS)


@gluon.jit
def _load_worker(x_desc, w_desc, o_desc, a_bufs, b_bufs, sums, staging, ready, empty, sums_full, sums_free,
                 bias_ptr, scale_ptr, data_ptr, kind_ptr, k_dim, n, tiles_m, tiles_n, num_tiles,
                 DATA_SPACE: gl.constexpr, PARTS: gl.constexpr):
    _load_partition(x_desc, w_desc, a_bufs, b_bufs, ready, empty, k_dim, tiles_m, tiles_n, num_tiles)


@gluon.jit
def _heads_fwd_ws(x_desc, w_desc, o_desc, bias_ptr, scale_ptr, data_ptr, kind_ptr,
                  k_dim, n, tiles_m, tiles_n, num_tiles, DATA_SPACE: gl.constexpr, STAGES: gl.constexpr,
                  MMA_REGS: gl.constexpr, LOAD_REGS: gl.constexpr, SUMS_SWIZZLED: gl.constexpr = False,
                  PARTS: gl.constexpr = ALL_PARTS):
    """x_desc (B, S, K) [1, BLOCK_M, BLOCK_K]; w_desc (K, N) [BLOCK_K, BLOCK_N]; o_desc (B, S, N)
    [1, BLOCK_M, BLOCK_N]; per column (N,): bias, scale (softplus of the learnt scale), data (track
    mean x resolution), kind (int32). Launch with the epilogue's warps (4 or 8); the MMA warpgroup and
    the producer are workers with MMA_REGS and LOAD_REGS registers a thread (`kernels.HEAD_REGISTERS`)."""
    BLOCK_M: gl.constexpr = x_desc.block_type.shape[1]
    BLOCK_K: gl.constexpr = x_desc.block_type.shape[2]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[1]
    dtype: gl.constexpr = x_desc.dtype
    a_bufs = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_M, BLOCK_K], x_desc.layout)
    b_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_K, BLOCK_N], w_desc.layout)
    # written from the MMA warpgroup's registers and read back by the epilogue in the same layout. In
    # the default layout each access of a warp takes two wavefronts where one would do (a bank
    # conflict of 1, by gl.bank_conflicts); swizzling 8-float runs by row has none
    if SUMS_SWIZZLED:
        sums = gl.allocate_shared_memory(gl.float32, [BLOCK_M, BLOCK_N], gl.SwizzledSharedLayout(8, 1, 8, [1, 0]))
    else:
        sums = gl.allocate_shared_memory(gl.float32, [BLOCK_M, BLOCK_N], gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N], gl.float32))
    staging = gl.allocate_shared_memory(dtype, [1, BLOCK_M, BLOCK_N], o_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    sums_full = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    sums_free = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    mbarrier.init(sums_full, count=1)
    mbarrier.init(sums_free, count=1)
    args = (x_desc, w_desc, o_desc, a_bufs, b_bufs, sums, staging, ready, empty, sums_full, sums_free,
            bias_ptr, scale_ptr, data_ptr, kind_ptr, k_dim, n, tiles_m, tiles_n, num_tiles, DATA_SPACE, PARTS)
    gl.warp_specialize([
        (_epilogue_partition, (o_desc, sums, staging, sums_full, sums_free, bias_ptr, scale_ptr, data_ptr, kind_ptr,
                               n, tiles_m, tiles_n, num_tiles, DATA_SPACE, PARTS)),
        (_mma_worker, args),
        (_load_worker, args),
    ], [4, 1], [MMA_REGS, LOAD_REGS])


# The cooperative form (`HEAD_KERNEL_CONFIG["FORM"] = "cooperative"`): two warpgroups share each
# 128 x 256 tile, 64 rows each, and apply the epilogue from their own registers after its products,
# while the producer warp loads the next tile's first stages. Its wgmma are 64 x 256 x 16 (the form
# above issues 64 x 128 x 16), which read fewer operand bytes from shared memory per product, and
# the tile loads 25% fewer bytes per product than 128 x 128; the price is an epilogue that the
# products wait for. Which form is faster is for `bench_kernels.py --heads` to tell (not yet run).


@gluon.jit
def _halves(x):
    """x (M, N) -> its columns [0, N/2) and [N/2, N), from the registers that hold them."""
    M: gl.constexpr = x.shape[0]
    N: gl.constexpr = x.shape[1]
    return gl.split(gl.permute(gl.reshape(x, [M, 2, N // 2]), [0, 2, 1]))


@gluon.jit
def _chunks_out(z, j: gl.constexpr, out, col0, n, bias_ptr, scale_ptr, data_ptr, kind_ptr, CHUNK: gl.constexpr,
                DATA_SPACE: gl.constexpr, PARTS: gl.constexpr):
    """Predictions of the float32 sums z, the tile's columns from chunk j on, into the staging tile
    `out`, CHUNK columns at a time: a whole tile's column parameters do not fit beside its sums."""
    if z.shape[1] > CHUNK:
        left, right = _halves(z)
        _chunks_out(left, j, out, col0, n, bias_ptr, scale_ptr, data_ptr, kind_ptr, CHUNK, DATA_SPACE, PARTS)
        _chunks_out(right, j + z.shape[1] // 2 // CHUNK, out, col0, n, bias_ptr, scale_ptr, data_ptr, kind_ptr, CHUNK, DATA_SPACE, PARTS)
    else:
        col_layout: gl.constexpr = gl.SliceLayout(0, z.type.layout)
        offs_n = col0 + j * CHUNK + gl.arange(0, CHUNK, layout=col_layout)
        bias, scale, data, kind, present = _columns(offs_n, n, bias_ptr, scale_ptr, data_ptr, kind_ptr)
        y = _predictions(z, bias, scale, data, kind, present, DATA_SPACE, PARTS)
        out.slice(j * CHUNK, CHUNK, dim=1).store(y.to(out.dtype))


@gluon.jit
def _cooperative_partition(o_desc, a_bufs, b_bufs, staging, ready, empty, bias_ptr, scale_ptr, data_ptr, kind_ptr,
                           k_dim, n, tiles_m, tiles_n, num_tiles, CHUNK: gl.constexpr, DATA_SPACE: gl.constexpr,
                           PARTS: gl.constexpr):
    BLOCK_M: gl.constexpr = a_bufs.shape[2]
    BLOCK_K: gl.constexpr = a_bufs.shape[3]
    BLOCK_N: gl.constexpr = b_bufs.shape[2]
    dtype: gl.constexpr = o_desc.dtype
    # both warpgroups' wgmma over the whole tile width, 64 rows each
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1], instr_shape=[16, BLOCK_N, 16])
    out_layout: gl.constexpr = gl.NVMMASharedLayout(staging.type.layout.swizzle_byte_width, dtype.primitive_bitwidth, rank=2)
    out = staging._reinterpret(dtype, [BLOCK_M, BLOCK_N], out_layout)
    steps = gl.cdiv(k_dim, BLOCK_K)
    it = 0
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        b, pid_m, pid_n = _tile(tile, tiles_n, tiles_m)
        acc, it = _products(a_bufs, b_bufs, ready, empty, it, steps, acc_layout)
        if PARTS != PRODUCTS_ONLY:
            tma.store_wait(0)  # the last tile's store has left the staging buffer
            gl.thread_barrier()
            col0 = pid_n * BLOCK_N
            _chunks_out(acc, 0, out, col0, n, bias_ptr, scale_ptr, data_ptr, kind_ptr, CHUNK, DATA_SPACE, PARTS)
            fence_async_shared()
            gl.thread_barrier()
            tma.async_copy_shared_to_global(o_desc, [b, pid_m * BLOCK_M, col0], staging)
        elif k_dim < 0:  # never true: a use of the sums, without which the products are compiled away
            out.store(acc.to(dtype))
    tma.store_wait(0)


@gluon.jit
def _cooperative_load_worker(o_desc, a_bufs, b_bufs, staging, ready, empty, bias_ptr, scale_ptr, data_ptr, kind_ptr,
                             k_dim, n, tiles_m, tiles_n, num_tiles, x_desc, w_desc):
    _load_partition(x_desc, w_desc, a_bufs, b_bufs, ready, empty, k_dim, tiles_m, tiles_n, num_tiles)


@gluon.jit
def _heads_fwd_coop(x_desc, w_desc, o_desc, bias_ptr, scale_ptr, data_ptr, kind_ptr,
                    k_dim, n, tiles_m, tiles_n, num_tiles, DATA_SPACE: gl.constexpr, STAGES: gl.constexpr,
                    LOAD_REGS: gl.constexpr, CHUNK: gl.constexpr, PARTS: gl.constexpr = ALL_PARTS):
    """The cooperative form: arguments as `_heads_fwd_ws`'s. Launch with 8 warps (the two
    warpgroups); the producer is a worker with LOAD_REGS registers a thread."""
    BLOCK_M: gl.constexpr = x_desc.block_type.shape[1]
    BLOCK_K: gl.constexpr = x_desc.block_type.shape[2]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[1]
    dtype: gl.constexpr = x_desc.dtype
    gl.static_assert(gl.num_warps() == 8, "the cooperative form runs two warpgroups")
    a_bufs = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_M, BLOCK_K], x_desc.layout)
    b_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_K, BLOCK_N], w_desc.layout)
    staging = gl.allocate_shared_memory(dtype, [1, BLOCK_M, BLOCK_N], o_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    args = (o_desc, a_bufs, b_bufs, staging, ready, empty, bias_ptr, scale_ptr, data_ptr, kind_ptr,
            k_dim, n, tiles_m, tiles_n, num_tiles)
    gl.warp_specialize([
        (_cooperative_partition, args + (CHUNK, DATA_SPACE, PARTS)),
        (_cooperative_load_worker, args + (x_desc, w_desc)),
    ], [1], [LOAD_REGS])
