"""The hand-written Triton kernels against the math they replace: `triton_mha` (attention) and the
convolution with bias and residual rounded once (`agpipe::conv_bias_residual`).

On a machine without CUDA the kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1, set here
before triton is first imported); with CUDA the same tests run the compiled kernel."""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

INTERPRET = not torch.cuda.is_available()
if INTERPRET:
    if "triton" in sys.modules and not os.environ.get("TRITON_INTERPRET"):
        pytest.skip("triton was imported before TRITON_INTERPRET could be set", allow_module_level=True)
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

from agpipe.model import kernels  # noqa: E402
from agpipe.model.kernels import (  # noqa: E402
    ATTENTION_KERNELS,
    conv_bias_residual,
    conv_bias_residual_once,
    conv_bsc,
    flex_mha,
    triton_mha,
)

DEVICE = "cpu" if INTERPRET else "cuda"
SOFT_CAP = 5.0


@pytest.fixture(scope="module", autouse=True)
def interpreter_bf16():
    """Two bf16 gaps of Triton's interpreter (seen in 3.9), patched for this module: tl.dot multiplies
    bf16 operands as their uint16 bit patterns, and float32 -> bf16 truncates where the GPU rounds to
    nearest even."""
    if not INTERPRET:
        yield
        return
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    dot, trunc = builder.create_dot, builder.create_fp_trunc

    def create_dot(self, a, b, d, *args):
        a, b = (self.cast_impl(x, tl.float32) if x.dtype.scalar == tl.bfloat16 else x for x in (a, b))
        return dot(self, a, b, d, *args)

    def create_fp_trunc(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16).view(torch.uint16)
            return interpreter.TensorHandle(bits.numpy(), dst_type.scalar)
        return trunc(self, src, dst_type)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(builder, "create_dot", create_dot)
        mp.setattr(builder, "create_fp_trunc", create_fp_trunc)
        yield


def reference(q, k, v, bias, soft_cap=SOFT_CAP):
    """MHABlock.attend's math: float32 logits, bias at (q // r, k // r), soft-cap, float32 softmax,
    probabilities rounded to V's dtype, float32 PV, output in q's dtype."""
    r = q.shape[2] // bias.shape[-1]
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
    logits = logits + bias.repeat_interleave(r, -2).repeat_interleave(r, -1)
    logits = torch.tanh(logits / soft_cap) * soft_cap
    w = torch.softmax(logits, -1).to(v.dtype)
    return torch.matmul(w.float(), v.float()).to(q.dtype)


def inputs(b, s, seed, q_scale=1.0, bias_scale=1.0, h=8, d=128, dv=192):
    g = torch.Generator().manual_seed(seed)
    # q as the block makes it: (B, S, H, D) transposed to (B, H, S, D), not contiguous.
    q = (torch.randn(b, s, h, d, generator=g) * q_scale).bfloat16().transpose(1, 2)
    k = torch.randn(b, 1, s, d, generator=g).bfloat16()
    v = torch.randn(b, 1, s, dv, generator=g).bfloat16()
    bias = torch.randn(b, h, s // 16, s // 16, generator=g) * bias_scale
    return (t.to(DEVICE) for t in (q, k, v, bias))


def errors(out, ref):
    diff = out.float() - ref.float()
    return diff.abs().max().item(), (diff.norm() / ref.float().norm()).item()


@pytest.mark.parametrize(("b", "s"), [(1, 64), (1, 128), (2, 256)])
def test_matches_reference(b, s):
    q, k, v, bias = inputs(b, s, seed=s)
    out = triton_mha(q, k, v, bias, SOFT_CAP)
    assert out.shape == (b, 8, s, 192) and out.dtype == torch.bfloat16
    max_abs, rel = errors(out, reference(q, k, v, bias))
    assert max_abs <= 2e-2 and rel <= 5e-3, (max_abs, rel)


def test_soft_cap_saturated():
    """Logits of +-40 before the cap: the cap decides the weights, and p = exp(capped - cap) stays
    finite without a running maximum."""
    q, k, v, bias = inputs(1, 128, seed=7, q_scale=4.0, bias_scale=8.0)
    ref = reference(q, k, v, bias)
    uncapped = reference(q, k, v, bias, soft_cap=1e4)
    assert errors(uncapped, ref)[1] > 0.1  # the cap matters on these inputs
    out = triton_mha(q, k, v, bias, SOFT_CAP)
    assert torch.isfinite(out.float()).all()
    max_abs, rel = errors(out, ref)
    assert max_abs <= 2e-2 and rel <= 5e-3, (max_abs, rel)


def test_rejects_unsupported_shapes():
    q, k, v, bias = inputs(1, 64, seed=1)
    with pytest.raises(ValueError, match="triton_mha"):
        triton_mha(q[:, :, :48], k[:, :, :48], v[:, :, :48], bias[:, :, :3, :3], SOFT_CAP)  # S = 48: no multiple of its 32-row tile
    with pytest.raises(ValueError, match="triton_mha"):
        triton_mha(q, k.expand(1, 2, 64, 128), v, bias, SOFT_CAP)  # two K/V heads


def test_the_fast_path_takes_the_kernel_where_it_applies_and_flex_elsewhere():
    """The official model's shapes run the Triton kernel; the demo model's value dim (24: no sum of
    two powers of two >= 16) runs FlexAttention instead of failing."""
    fast = ATTENTION_KERNELS["triton"]
    q, k, v, bias = inputs(1, 64, seed=3)
    assert torch.equal(fast(q, k, v, bias, SOFT_CAP), triton_mha(q, k, v, bias, SOFT_CAP))
    q, k, v, bias = inputs(1, 64, seed=4, h=2, d=16, dv=24)
    assert torch.equal(fast(q, k, v, bias, SOFT_CAP), flex_mha(q, k, v, bias, SOFT_CAP))


def use_form(form: str, monkeypatch) -> None:
    if form == "pingpong" and not hopper():
        pytest.skip("the ping-pong form needs a Hopper GPU and Gluon")
    monkeypatch.setitem(kernels.TRITON_MHA_CONFIG, "FORM", form)


@pytest.mark.skipif(INTERPRET, reason="needs CUDA")
@pytest.mark.parametrize("form", ["triton", "pingpong"])
@pytest.mark.parametrize("fast_tanh", [False, True], ids=["exact soft-cap", "tanh.approx"])
@pytest.mark.parametrize(("s", "q_scale", "bias_scale"), [(4096, 1.0, 1.0), (8192, 1.0, 1.0), (4096, 4.0, 8.0)])
def test_full_length_on_gpu(s, q_scale, bias_scale, fast_tanh, form, monkeypatch):
    """At the model's lengths, with logits as the model has them and saturating the cap (+-40), the
    exact soft-cap and FAST_TANH's tanh.approx.f32 (~2^-11 relative on tanh) within the same bounds,
    in both of the kernel's forms."""
    use_form(form, monkeypatch)
    monkeypatch.setitem(kernels.TRITON_MHA_CONFIG, "FAST_TANH", fast_tanh)
    q, k, v, bias = inputs(1, s, seed=s, q_scale=q_scale, bias_scale=bias_scale)
    assert form == "triton" or kernels._pingpong_applies(q, k, v, kernels._mha_tiles(q, k, v, bias, SOFT_CAP))
    out = triton_mha(q, k, v, bias, SOFT_CAP)
    assert torch.isfinite(out.float()).all()
    max_abs, rel = errors(out, reference(q, k, v, bias))
    assert max_abs <= 2e-2 and rel <= 5e-3, (max_abs, rel)


@pytest.mark.skipif(INTERPRET, reason="needs CUDA")
@pytest.mark.parametrize(("b", "s"), [(1, 128), (2, 256), (3, 1024)])
def test_pingpong_form_matches_the_triton_form_on_gpu(b, s, monkeypatch):
    """The ping-pong kernel computes `_mha_fwd`'s math (the same ops on the same tiles of 64 keys):
    batches and heads side by side in its 2-d views, one key tile and many. Its row sums add the
    tiles' in the same order, so outputs agree but for a rounding step now and then."""
    use_form("pingpong", monkeypatch)
    q, k, v, bias = inputs(b, s, seed=b * s)
    out = triton_mha(q, k, v, bias, SOFT_CAP)
    monkeypatch.setitem(kernels.TRITON_MHA_CONFIG, "FORM", "triton")
    ref = triton_mha(q, k, v, bias, SOFT_CAP)
    assert out.shape == ref.shape == (b, 8, s, 192) and out.stride() == ref.stride()
    assert (out == ref).float().mean() > 0.99
    torch.testing.assert_close(out.float(), ref.float(), rtol=2**-7, atol=1e-3)
    max_abs, rel = errors(out, reference(q, k, v, bias))
    assert max_abs <= 2e-2 and rel <= 5e-3, (max_abs, rel)


def test_torch_compile_full_graph():
    """The model runs under torch.compile with CUDA graphs: the op must trace without a graph break
    (its fake kernel giving the real output's strides). On the CPU, aot_eager checks the tracing."""
    q, k, v, bias = inputs(1, 128 if INTERPRET else 512, seed=3)

    def block(q, k, v, bias):
        return triton_mha(q, k, v, bias, SOFT_CAP).transpose(1, 2).reshape(1, q.shape[2], -1) * 2

    compiled = torch.compile(block, fullgraph=True, **({"backend": "aot_eager"} if INTERPRET else {"mode": "reduce-overhead"}))
    for _ in range(3):  # CUDA graphs record on a later call
        out = compiled(q, k, v, bias)
    assert torch.equal(out, block(q, k, v, bias))


def conv_inputs(s: int, c_in: int, c_out: int, c_res: int, seed: int, b: int = 2):
    """x (B, S, C_in), a channels-last (C_out, C_in, 1, 5) weight of the model's scale, bias, and a
    residual of c_res <= C_out channels taken as a slice (the decoder's x[..., :c]: not contiguous)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, s, c_in, generator=g).bfloat16()
    w = (torch.randn(c_out, c_in, 1, 5, generator=g) / (5 * c_in) ** 0.5).bfloat16().contiguous(memory_format=torch.channels_last)
    bias = torch.randn(c_out, generator=g).bfloat16()
    residual = torch.randn(b, s, c_res + 16, generator=g).bfloat16()[..., :c_res]
    return (t.to(DEVICE) for t in (x, w, bias, residual))


def assert_rounding_apart(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Sums of the same products in another order: nearly every value equal, and a differing one
    off by one bf16 step of the value, or of the sum's scale where conv, bias and residual cancel."""
    diff = (out.float() - ref.float()).abs()
    scale = ref.float().square().mean().sqrt()
    assert (out == ref).float().mean() > 0.99 and (diff <= (ref.float().abs() + scale) * 2**-7).all(), diff.max()


def hopper() -> bool:
    """A Hopper GPU and a triton with Gluon's Hopper language: what the warp-specialized kernel needs."""
    return not INTERPRET and torch.cuda.get_device_capability()[0] == 9 and kernels._conv_ws_kernel() is not None


@pytest.mark.parametrize("loads", ["pointers", "tma", "ws-256x128", "ws-128x256"])
@pytest.mark.parametrize(("s", "c_in", "c_out", "c_res"), [(70, 96, 80, 64), (40, 64, 64, 64), (600, 64, 320, 200)])
def test_conv_kernel_matches_its_reference(s, c_in, c_out, c_res, loads, monkeypatch):
    """Sequence edges (SAME padding), channel counts off the tiles, a residual narrower than the
    output and not contiguous; tiles loaded through pointers or tensor descriptors (TMA), or by the
    warp-specialized Hopper kernel with either of its tiles (600 x 320 with a 200-channel residual: a
    channel block with none)."""
    if loads.startswith("ws") and not hopper():
        pytest.skip("the warp-specialized kernel needs a Hopper GPU and Gluon")
    monkeypatch.setitem(kernels.TRITON_CONV_CONFIG, "TMA", loads != "pointers")
    monkeypatch.setitem(kernels.TRITON_CONV_CONFIG, "WS", loads.startswith("ws"))
    if loads.startswith("ws"):
        block_m, block_n = map(int, loads[3:].split("x"))
        monkeypatch.setitem(kernels.TRITON_CONV_CONFIG, "BLOCK_M", block_m)
        monkeypatch.setitem(kernels.TRITON_CONV_CONFIG, "BLOCK_N", block_n)
    x, w, bias, residual = conv_inputs(s, c_in, c_out, c_res, seed=s)
    out = torch.ops.agpipe.conv_bias_residual(x, w, bias, residual)
    ref = conv_bias_residual_once(x, w, bias, residual)
    assert out.shape == (2, s, c_out) and out.dtype == torch.bfloat16
    assert_rounding_apart(out, ref)
    assert_rounding_apart(torch.ops.agpipe.conv_bias_residual(x, w, bias, None), conv_bias_residual_once(x, w, bias))


@pytest.mark.parametrize("tma", [False, True])
def test_pointwise_conv_kernel_is_the_dna_embedders_gemm(tma, monkeypatch):
    """Width 1, 64 input channels (the DNA embedder's 16 taps x 4 bases), no residual: the float32
    GEMM plus bias, rounded once; also from the embedder's overlapping windows (a view, rows 8 bytes
    apart, which a tensor descriptor cannot take)."""
    monkeypatch.setitem(kernels.TRITON_CONV_CONFIG, "TMA", tma)
    x, w, bias, _ = conv_inputs(300, 64, 96, 1, seed=3)
    w = w[..., 2:3]
    out = conv_bias_residual(x, w, bias) if not INTERPRET else torch.ops.agpipe.conv_bias_residual(x, w, bias, None)
    ref = (conv_bsc(x.float(), w.float()) + bias.float()).to(torch.bfloat16)
    assert out.shape == (2, 300, 96)
    assert_rounding_apart(out, ref)
    one_hot = F.one_hot(torch.randint(0, 4, (2, 300), generator=torch.Generator().manual_seed(4)), 4).bfloat16().to(DEVICE)
    windows = F.pad(one_hot, (0, 0, 7, 8)).unfold(1, 16, 1).transpose(2, 3).reshape(2, 300, 64)
    assert windows.stride(1) == 4
    out = torch.ops.agpipe.conv_bias_residual(windows, w, bias, None)
    assert_rounding_apart(out, torch.ops.agpipe.conv_bias_residual(windows.contiguous(), w, bias, None))
    assert_rounding_apart(out, (conv_bsc(windows.float(), w.float()) + bias.float()).to(torch.bfloat16))


@pytest.mark.skipif(INTERPRET, reason="needs CUDA")
def test_conv_kernel_at_the_models_widths_on_gpu():
    """What the model's GPU path runs: the kernel through conv_bias_residual, at 1,536 channels."""
    x, w, bias, residual = conv_inputs(4096, 1536, 1536, 1536, seed=5, b=1)
    out = conv_bias_residual(x, w, bias, residual)
    ref = conv_bias_residual_once(x, w, bias, residual)
    assert_rounding_apart(out, ref)
    assert torch.equal(out, torch.ops.agpipe.conv_bias_residual(x, w, bias, residual))


@pytest.mark.skipif(INTERPRET or not hopper(), reason="needs a Hopper GPU and Gluon")
@pytest.mark.parametrize("tiles", [(256, 128), (128, 256)])
@pytest.mark.parametrize(("s", "c_in", "c_out", "c_res", "b"), [(8192, 768, 896, 768, 2), (16384, 1024, 1024, 0, 1), (4100, 128, 256, 256, 3)])
def test_warp_specialized_conv_kernel_many_tiles_a_program_on_gpu(s, c_in, c_out, c_res, b, tiles, monkeypatch):
    """The persistent kernel at the model's widths, each program walking many tiles: the encoder's
    widening block (a 768-channel residual into 896 channels), no residual, a sequence off the tiles
    across batch edges; within a rounding of the reference, and nearly always equal to the TMA kernel,
    which sums the same products in the same order."""
    x, w, bias, residual = conv_inputs(s, c_in, c_out, max(c_res, 1), seed=s, b=b)
    residual = residual if c_res else None
    monkeypatch.setitem(kernels.TRITON_CONV_CONFIG, "WS", True)
    monkeypatch.setitem(kernels.TRITON_CONV_CONFIG, "BLOCK_M", tiles[0])
    monkeypatch.setitem(kernels.TRITON_CONV_CONFIG, "BLOCK_N", tiles[1])
    out = torch.ops.agpipe.conv_bias_residual(x, w, bias, residual)
    assert_rounding_apart(out, conv_bias_residual_once(x, w, bias, residual))
    monkeypatch.setitem(kernels.TRITON_CONV_CONFIG, "WS", False)
    monkeypatch.setitem(kernels.TRITON_CONV_CONFIG, "BLOCK_M", 256)
    monkeypatch.setitem(kernels.TRITON_CONV_CONFIG, "BLOCK_N", 128)
    tma = torch.ops.agpipe.conv_bias_residual(x, w, bias, residual)
    assert (out == tma).float().mean() > 0.999


@pytest.mark.skipif(INTERPRET or not hopper(), reason="needs a Hopper GPU and Gluon")
def test_the_model_takes_the_warp_specialized_kernel_where_it_was_measured_faster():
    """"auto": the warp-specialized kernel from 65,536 positions (128 x 256 tiles for 768 channels,
    256 x 128 for 896), the TMA kernel below."""
    x = torch.empty(1, 65536, 768, device=DEVICE, dtype=torch.bfloat16)
    w = torch.empty(896, 768, 1, 5, device=DEVICE, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    assert kernels.TRITON_CONV_CONFIG["WS"] == "auto"
    assert kernels._ws_tiles(x, w, None) == (256, 128)
    assert kernels._ws_tiles(x, w[:768], x) == (128, 256)
    assert kernels._ws_tiles(x[:, :32768], w, None) is None


def head_inputs(b: int, s: int, k: int, n: int, seed: int, logit_scale: float = 3.0):
    """x, weight, bias and per-column parameters of the heads' kernel: the three kinds in runs whose
    edges are off the kernel's 64-column chunks and 128-column tiles, zero padding columns last."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, s, k, generator=g).bfloat16()
    w = (torch.randn(k, n, generator=g) * (logit_scale / math.sqrt(k))).bfloat16()
    bias = torch.randn(n, generator=g).bfloat16().float()
    kinds = torch.zeros(n, dtype=torch.int32)
    runs = [("track", 167), ("squashed_track", 305), ("sigmoid", 260), ("track", 61), ("squashed_track", 99)]
    start = 0
    for kind, width in runs:
        kinds[start : start + width] = kernels.HEAD_KINDS[kind]
        start += width
    scale = F.softplus(torch.randn(n, generator=g))
    data = torch.rand(n, generator=g) * 100
    scale[start:], data[start:], w[:, start:], bias[start:] = 0, 0, 0, 0
    return (t.to(DEVICE) for t in (x, w, bias, scale, data, kinds))


@pytest.mark.skipif(INTERPRET or not hopper(), reason="needs a Hopper GPU and Gluon")
@pytest.mark.parametrize("variant", list(kernels.HEAD_KERNEL_VARIANTS))
@pytest.mark.parametrize("data_space", [True, False], ids=["data space", "model space"])
@pytest.mark.parametrize(("b", "s", "k", "n", "logit_scale"), [(2, 1000, 1536, 960, 3.0), (1, 16384, 1536, 1000, 3.0), (1, 4096, 768, 960, 40.0)])
def test_heads_kernel_matches_its_reference_on_gpu(b, s, k, n, logit_scale, data_space, variant):
    """The heads' GEMM and activations in one kernel against the GEMM in float32 and
    `head_activations`: sequences off the tiles across batch edges, many tiles a program, logits up
    to ~|150| (softplus's linear branch, the sigmoid's saturation). The sums differ in order only, so
    values are equal but for a rounding step now and then. Where the softplus or sigmoid, or the
    prediction, falls below float32's normal range (z < -87), the kernel's SFU ops flush to zero where
    the reference keeps a subnormal, scaled up to ~1e-37 by the track means: those compare within 1e-30.
    In the exponential tails (z < -20: softplus, sigmoid < 2e-9) exp2's rounded argument, z log2(e),
    gives a relative error up to |z| 2^-24 (Inductor's exp has it too): those compare within rtol."""
    x, w, bias, scale, data, kinds = head_inputs(b, s, k, n, seed=s, logit_scale=logit_scale)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(kernels.HEAD_KERNEL_CONFIG, "ENABLED", True)
        for key, value in kernels.HEAD_KERNEL_VARIANTS[variant].items():
            mp.setitem(kernels.HEAD_KERNEL_CONFIG, key, value)
        assert kernels.head_kernel_applies(x, w)
        out = kernels.head_predictions(x, w, bias, scale, data, kinds, data_space)
    z = torch.matmul(x.float(), w.float()) + bias
    ref = kernels.head_activations(z, kinds, scale, data, data_space).to(torch.bfloat16)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    tiny = torch.finfo(torch.float32).tiny
    activated = torch.where(kinds == kernels.HEAD_KINDS["sigmoid"], torch.sigmoid(z), F.softplus(z))
    exact = (ref.float().abs() >= tiny) & (activated >= tiny) & (z >= -20)
    assert exact[..., :892].float().mean() > 0.5
    assert (out == ref)[exact].float().mean() > 0.999
    torch.testing.assert_close(out.float(), ref.float(), rtol=2**-7, atol=1e-30)
    assert (out[..., 892:] == 0).all()  # padding columns


@pytest.mark.skipif(INTERPRET or not hopper(), reason="needs a Hopper GPU and Gluon")
@pytest.mark.parametrize("scaled", [False, True], ids=["data space", "model space"])
def test_the_model_with_the_heads_kernel_predicts_what_it_predicts_without_on_gpu(scaled):
    """Every 1 bp and 128 bp track and splice-usage output of a bf16 model on the GPU, through the
    heads kernel and through cuBLAS + the activations, compiled as the pipeline compiles it."""
    from agpipe.model.config import ALL_OUTPUTS, SMALL
    from agpipe.model.precision import BFLOAT16, compile_options
    from model_harness import batch, random_model, random_sequence, torch_model

    _, _, tensors, metadata = random_model(SMALL)
    outputs = tuple(o for o in ALL_OUTPUTS if metadata.real_track_count(0, o.head) > 0)
    model = torch_model(SMALL, tensors, metadata, 0, outputs, BFLOAT16, "triton").to(DEVICE)
    x = torch.from_numpy(batch(random_sequence(16384, 6))).to(DEVICE)
    results = {}
    for enabled in (False, True):
        with pytest.MonkeyPatch.context() as mp, torch.inference_mode():
            mp.setitem(kernels.HEAD_KERNEL_CONFIG, "ENABLED", enabled)
            torch._dynamo.reset()
            assert all(f.kernel_applies(torch.empty(1, 128, f.weight.shape[0], device=DEVICE, dtype=torch.bfloat16)) == enabled
                       for f in model.fused.values())
            results[enabled] = torch.compile(model, dynamic=False, options=compile_options())(x, scaled=scaled)
    fused = {(int(r.removeprefix("res_")), head) for r, f in model.fused.items() for head in f.slices}
    checked = 0
    for o, ref in results[False].items():
        if (o.resolution, o.head) in fused:
            out = results[True][o]
            assert out.shape == ref.shape and out.dtype == ref.dtype
            normal = ref.float().abs() >= torch.finfo(torch.float32).tiny
            assert (out == ref)[normal].float().mean() > 0.999, o
            torch.testing.assert_close(out.float(), ref.float(), rtol=2**-7, atol=1e-30)
            checked += 1
    assert checked >= 8


@pytest.mark.skipif(INTERPRET, reason="needs CUDA")
def test_conv_kernel_past_two_to_the_31_elements_on_gpu():
    """A batch of 8 windows of 524,288 x 768 (3.2e9 elements): the last window computed in the batch
    equals it computed alone (the kernel's batch offsets need int64 from the 7th window on)."""
    torch.manual_seed(0)
    x = torch.randn(8, 524288, 768, device=DEVICE, dtype=torch.bfloat16)
    w = (torch.randn(768, 768, 1, 5, device=DEVICE) / 62).bfloat16().contiguous(memory_format=torch.channels_last)
    bias = torch.randn(768, device=DEVICE, dtype=torch.bfloat16)
    out = torch.ops.agpipe.conv_bias_residual(x, w, bias, x)
    assert torch.equal(out[7], torch.ops.agpipe.conv_bias_residual(x[7:].clone(), w, bias, x[7:].clone())[0])


def test_conv_kernel_under_torch_compile():
    """The op traces without a graph break (its fake kernel gives the output's shape and strides)."""
    x, w, bias, residual = conv_inputs(40, 64, 64, 64, seed=9, b=1)

    def block(x, residual):
        return torch.ops.agpipe.conv_bias_residual(x * 2, w, bias, residual) * 3

    compiled = torch.compile(block, fullgraph=True, **({"backend": "aot_eager"} if INTERPRET else {"mode": "reduce-overhead"}))
    for _ in range(3):
        out = compiled(x, residual)
    assert torch.equal(out, block(x, residual))

