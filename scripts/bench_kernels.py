"""Micro-benchmarks behind the fast path's design choices (one GPU): convolution layouts and the
fused attention kernels (FlexAttention, the hand-written Triton one) against the reference attention.
Prints one line per variant; --triton-configs sweeps the Triton attention kernel's tiles instead,
--conv [--out FILE.json] the Triton convolution's tiles over the model's convolutions against cuDNN,
--head-transforms [--out FILE.json] what the 1 bp RNA-seq head's math after its GEMM costs, step by step,
--heads [--out FILE.json] the heads' kernel against cuBLAS's GEMM + Inductor's activations at the model's shapes,
--attention-forms [--out FILE.json] the attention kernel's two forms, each with the exact soft-cap and FAST_TANH."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from agpipe.model import kernels  # noqa: E402
from agpipe.model.kernels import flex_mha, triton_mha  # noqa: E402
from bench_model import timed  # noqa: E402  (scripts/ is on sys.path when run as a script)


def flex_mha_folded(q, k, v, bias, soft_cap, options=None):
    """Variant: the 8 query heads folded into the query rows against the one shared K/V head."""
    from torch.nn.attention.flex_attention import flex_attention

    b, h, s, d = q.shape
    r = s // bias.shape[-1]

    def score_mod(score, bi, hi, q_idx, kv_idx):
        head, pos = q_idx // s, q_idx % s
        t = score + bias[bi, head, pos // r, kv_idx // r]
        return soft_cap * torch.tanh(t / soft_cap)

    fn = _folded.get(str(options))
    if fn is None:
        fn = _folded[str(options)] = torch.compile(flex_attention, dynamic=False)
    out = fn(q.reshape(b, 1, h * s, d), k, v, score_mod=score_mod, scale=d**-0.5,
             kernel_options=options or {"BLOCK_M": 128, "BLOCK_N": 64, "num_stages": 1})
    return out.view(b, h, s, -1)


_folded = {}


def median_ms(fn, warmup=3, runs=10) -> float:
    """Median warm milliseconds per call (bench_model's CUDA-event timing)."""
    return statistics.median(timed(fn, warmup, runs)[1])


def back_to_back_ms(fn, calls=10) -> float:
    """Median milliseconds per call over back-to-back calls: a sub-millisecond kernel timed alone also
    counts its Python launch (the model replays CUDA graphs, which have none)."""
    return median_ms(lambda: [fn() for _ in range(calls)]) / calls


def attention_inputs(s: int):
    q = torch.randn(1, 8, s, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 1, s, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, 1, s, 192, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(1, 8, s // 16, s // 16, device="cuda")
    return q, k, v, bias


def attention_reference(q, k, v, bias):
    """MHABlock.attend's math in float32 (probabilities rounded to bf16)."""
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) / 128**0.5
    logits = logits + bias.repeat_interleave(16, -1).repeat_interleave(16, -2)
    w = torch.softmax(torch.tanh(logits / 5) * 5, -1).bfloat16()
    return torch.matmul(w.float(), v.float()).bfloat16()


def attention_flop(q, v) -> int:
    b, h, s, d = q.shape
    return 2 * b * h * s * s * (d + v.shape[-1])


def differences(out, ref) -> str:
    diff = out.float() - ref.float()
    return f"max abs {diff.abs().max():.1e}  rel L2 {diff.norm() / ref.float().norm():.1e}"


# Tiles for --triton-configs; shared memory per program ~ Q tile + num_stages * (K + V tiles).
TRITON_SWEEP = [
    {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": nw, "num_stages": st}
    for bm in (64, 128) for bn in (64, 128) for nw in (4, 8) for st in (1, 2, 3)
]


def triton_configs() -> None:
    """Each config of TRITON_SWEEP (exact soft-cap), then the fastest with FAST_TANH, at 4,096 and 8,192 tokens."""
    default = dict(kernels.TRITON_MHA_CONFIG)
    for s in (4096, 8192):
        q, k, v, bias = attention_inputs(s)
        ref = attention_reference(q, k, v, bias)
        results = []
        for cfg in TRITON_SWEEP + [None]:
            if cfg is None:  # the fastest tiles again, with tanh.approx
                cfg = dict(min(results, key=lambda r: r[0])[1], FAST_TANH=True)
            kernels.TRITON_MHA_CONFIG = dict(default, **cfg)
            try:
                out = triton_mha(q, k, v, bias, 5.0)
                t = back_to_back_ms(lambda: triton_mha(q, k, v, bias, 5.0))
            except Exception as e:  # a tile that does not fit shared memory or registers
                print(f"  triton {s} {cfg}: failed ({str(e).splitlines()[0][:80]})", flush=True)
                continue
            if not cfg.get("FAST_TANH"):
                results.append((t, cfg))
            print(f"  triton {s} {cfg}: {t:.3f} ms ({attention_flop(q, v) / t / 1e9:.0f} TFLOP/s)  {differences(out, ref)}", flush=True)
        t, cfg = min(results, key=lambda r: r[0])
        print(f"triton {s} tokens: fastest {cfg} {t:.3f} ms", flush=True)
    kernels.TRITON_MHA_CONFIG = default


def conv_layouts() -> None:
    torch.backends.cudnn.benchmark = True
    for c_in, c_out, length in ((768, 768, 524288), (896, 768, 524288), (1024, 896, 262144), (1536, 1536, 8192)):
        x = torch.randn(1, c_in, length, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(c_out, c_in, 5, device="cuda", dtype=torch.bfloat16)
        flop = 2 * length * c_in * c_out * 5
        ncl = median_ms(lambda: F.conv1d(x, w, padding=2))
        x4 = x[:, :, None, :].contiguous(memory_format=torch.channels_last)
        w4 = w[:, :, None, :].contiguous(memory_format=torch.channels_last)
        nhwc = median_ms(lambda: F.conv2d(x4, w4, padding=(0, 2)))
        xt = x.transpose(1, 2).contiguous()  # (B, S, C): 5 shifted GEMMs
        wt = w.permute(2, 1, 0).contiguous()

        def shifted():
            y = xt @ wt[2]
            for k in (0, 1, 3, 4):
                o = k - 2
                if o < 0:
                    y[:, -o:] += xt[:, :o] @ wt[k]
                else:
                    y[:, :-o] += xt[:, o:] @ wt[k]
            return y

        sg = median_ms(shifted)
        print(f"conv {c_in}->{c_out} x {length}: NCL {ncl:.2f} ms ({flop / ncl / 1e9:.0f} TF/s)  NHWC {nhwc:.2f} ms ({flop / nhwc / 1e9:.0f})  5xGEMM {sg:.2f} ms ({flop / sg / 1e9:.0f})", flush=True)


# The official model's 27 width-5 convolutions at 524,288 bp: (channels in, channels out, positions),
# encoder then decoder (the decoder's conv_in runs at the lower resolution, its conv_out at the higher).
MODEL_CONVS = [(768, 768, 524288)] + [
    conv for c_in, c_out, s in zip((768, 896, 1024, 1152, 1280, 1408), (896, 1024, 1152, 1280, 1408, 1536), (262144 >> i for i in range(6)))
    for conv in ((c_in, c_out, s), (c_out, c_out, s))
] + [(1536, 1536, 4096), (1536, 1536, 8192)] + [
    conv for c_in, c_out, s in zip((1536, 1408, 1280, 1152, 1024, 896), (1408, 1280, 1152, 1024, 896, 768), (8192 << i for i in range(6)))
    for conv in ((c_in, c_out, s), (c_out, c_out, 2 * s))
]
# The TMA kernel as the sessions before the warp-specialized one chose it (the sweep of nine tiles that
# chose it: conv-kernel-H100-20261128-persistent-sweep.json), the warp-specialized kernel with each of
# its tiles, and the choice between them that the model makes (kernels._ws_tiles).
CONV_SWEEP = [
    {"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 4, "TMA": True, "WS": False},
    {"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 4, "TMA": True, "WS": True, "WS_STAGES": 3},
    {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "num_warps": 8, "num_stages": 4, "TMA": True, "WS": True, "WS_STAGES": 3},
    {"BLOCK_M": 256, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 4, "TMA": True, "WS": "auto", "WS_STAGES": 3},
]


def conv_kernel(out: str | None) -> None:
    """The Triton convolution (bias and residual in its epilogue, rounded once) against cuDNN over
    the model's convolutions: per config of CONV_SWEEP the summed milliseconds, and per convolution
    cuDNN's conv alone, cuDNN's conv + the eager bias and residual adds, and agreement with the
    reference (kernels.conv_bias_residual_once: share of values equal)."""
    default = dict(kernels.TRITON_CONV_CONFIG)
    rows, totals = [], {}
    for c_in, c_out, s in MODEL_CONVS:
        x = torch.randn(1, s, c_in, device="cuda", dtype=torch.bfloat16)
        w = (torch.randn(c_out, c_in, 1, 5, device="cuda", dtype=torch.bfloat16) / (5 * c_in) ** 0.5).contiguous(memory_format=torch.channels_last)
        b = torch.randn(c_out, device="cuda", dtype=torch.bfloat16)
        r = torch.randn(1, s, min(c_in, c_out), device="cuda", dtype=torch.bfloat16)
        flop = 2 * s * c_in * c_out * 5
        cudnn = back_to_back_ms(lambda: kernels.conv_bsc(x, w), calls=5)
        cudnn_adds = back_to_back_ms(lambda: kernels.conv_bsc(x, w) + b + F.pad(r, (0, c_out - r.shape[-1])), calls=5)
        ref = kernels.conv_bias_residual_once(x, w, b, r)
        row = {"c_in": c_in, "c_out": c_out, "positions": s, "cudnn_ms": cudnn, "cudnn_with_adds_ms": cudnn_adds, "triton_ms": {}}
        for i, cfg in enumerate(CONV_SWEEP):
            kernels.TRITON_CONV_CONFIG = cfg
            try:
                y = torch.ops.agpipe.conv_bias_residual(x, w, b, r)
                t = back_to_back_ms(lambda: torch.ops.agpipe.conv_bias_residual(x, w, b, r), calls=5)
            except Exception as e:  # a tile that does not fit shared memory or registers
                print(f"  {cfg}: failed ({str(e).splitlines()[0][:80]})", flush=True)
                continue
            row["triton_ms"][i] = t
            totals[i] = totals.get(i, 0.0) + t
            row.setdefault("equal_to_reference", {})[i] = (y == ref).float().mean().item()
        rows.append(row)
        best = min(row["triton_ms"].values())
        print(f"conv {c_in}->{c_out} x {s}: cuDNN {cudnn:.3f} ms ({flop / cudnn / 1e9:.0f} TF/s), with adds {cudnn_adds:.3f}; "
              f"triton best {best:.3f} ({flop / best / 1e9:.0f} TF/s) {row['triton_ms']}; equal {min(row['equal_to_reference'].values()):.4f}", flush=True)
    kernels.TRITON_CONV_CONFIG = default
    summary = {
        "card": torch.cuda.get_device_name(), "torch": torch.__version__, "configs": CONV_SWEEP,
        "cudnn_total_ms": sum(r["cudnn_ms"] for r in rows), "cudnn_with_adds_total_ms": sum(r["cudnn_with_adds_ms"] for r in rows),
        "triton_total_ms": {i: totals[i] for i in totals}, "convs": rows,
    }
    print(f"total: cuDNN {summary['cudnn_total_ms']:.2f} ms, with adds {summary['cudnn_with_adds_total_ms']:.2f}; triton per config "
          + ", ".join(f"{i}: {t:.2f}" for i, t in totals.items()), flush=True)
    if out:
        Path(out).write_text(json.dumps(summary, indent=1))


def head_transforms(out: str | None) -> None:
    """The 1 bp RNA-seq head after its GEMM (524,288 x 667 float32 logits -> bf16 data-space
    predictions), compiled as in the model, against cheaper forms of the same math: where the heads'
    elementwise time goes (the profile calls it computation, not memory)."""
    from agpipe.model.heads import SOFT_CLIP, to_data_space
    from agpipe.model.precision import compile_options

    logits = torch.randn(1, 524288, 667, device="cuda") * 3
    scale, means = torch.rand(667, device="cuda") + 0.5, torch.rand(667, device="cuda") * 10
    scale_once = F.softplus(scale)  # the model folds it at load (heads.TrackHead.fold_)

    def model_space(x):
        return F.softplus(x) * scale_once

    def powf_power(x):
        y = model_space(x)
        y = torch.where(y > SOFT_CLIP, (y + SOFT_CLIP) ** 2 / (4 * SOFT_CLIP), y)
        return y ** (1.0 / 0.75) * means

    variants = {
        "bf16 copy (memory floor)": lambda x: x.to(torch.bfloat16),
        # the ninth session's rows: softplus(scale) in the expression (does Inductor evaluate it for every value?)
        "softplus x softplus(scale)": lambda x: (F.softplus(x) * F.softplus(scale)).to(torch.bfloat16),
        "softplus x softplus(scale) folded": lambda x: model_space(x).to(torch.bfloat16),
        "+ soft clip, the power as exp2(log2(x) / 0.75), means (the model until the fold)": lambda x: to_data_space(
            F.softplus(x) * F.softplus(scale), means, 1, True).to(torch.bfloat16),
        "the same, softplus(scale) folded (the model)": lambda x: to_data_space(model_space(x), means, 1, True).to(torch.bfloat16),
        "the same, the power as x ** (1/0.75) (powf, the official form)": lambda x: powf_power(x).to(torch.bfloat16),
    }
    expected = variants["the same, softplus(scale) folded (the model)"](logits).float()
    rows = []
    for name, fn in variants.items():
        compiled = torch.compile(fn, dynamic=False, options=compile_options())
        y = compiled(logits)
        t = back_to_back_ms(lambda: compiled(logits), calls=5)
        rel = ((y.float() - expected).abs() / expected.abs().clamp_min(1e-6)).max().item()
        rows.append({"variant": name, "ms": t, "max_relative_difference_to_model_eager": rel})
        print(f"head transform {name}: {t:.3f} ms ({logits.numel() / t / 1e6:.0f} G values/s); max rel diff to the model's math run eagerly {rel:.1e}", flush=True)
    if out:
        summary = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "logits": list(logits.shape), "variants": rows}
        Path(out).write_text(json.dumps(summary, indent=1))

# The heads of one resolution at a 524,288 bp window (official model, human): positions, embedding
# width, fused columns (real tracks padded to 64), and each head's (kind, tracks) in column order.
HEAD_SHAPES = {
    "1 bp": (524288, 1536, 2496, [("track", 167 + 305 + 12 + 546), ("squashed_track", 667), ("sigmoid", 4 + 734)]),
    "128 bp": (4096, 3072, 4480, [("track", 167 + 305 + 12 + 546), ("squashed_track", 667), ("track", 1617 + 1116)]),
}


def write_rows(out: str | None, rows: list[dict]) -> None:
    """The rows so far as JSON at `out`, written after each one: a variant that hangs or faults
    leaves the rows before it."""
    if out:
        Path(out).write_text(json.dumps({"card": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, indent=1))


def heads(out: str | None) -> None:
    """`kernels.head_predictions` (one kernel: GEMM, bias, each column's activation, bf16 out) against
    what the model runs without it: cuBLAS's GEMM writing float32 logits (`matmul_f32_out`) and the
    same activations compiled by Inductor (`head_activations`), on random inputs of the model's shapes;
    for each of `kernels.HEAD_KERNEL_VARIANTS`, and with the activations, then the whole epilogue, left out."""
    from agpipe.model.precision import compile_options

    # What L2 and the card's memory move (a copy, bytes read + written), for the kernel's operand loads
    # from L2. Copies of 20 MB (both buffers stay in the 50 MB L2), 50 to a CUDA graph so that no
    # launch comes between them: still a lower bound, as the graph's kernels do not overlap
    src, dst = torch.empty(2, 5 << 20, device="cuda").unbind()
    copies = torch.cuda.CUDAGraph()
    dst.copy_(src)
    with torch.cuda.graph(copies):
        for _ in range(50):
            dst.copy_(src)
    l2_copy_tbps = 2 * src.nbytes / (median_ms(copies.replay) / 50) / 1e9
    big, big_copy = torch.empty(2, 256 << 20, device="cuda").unbind()  # 1 GiB each
    dram_copy_tbps = 2 * big.nbytes / median_ms(lambda: big_copy.copy_(big)) / 1e9
    print(f"L2 copy {l2_copy_tbps:.2f} TB/s, memory copy {dram_copy_tbps:.2f} TB/s", flush=True)
    rows = []
    for name, (s, k, n, runs) in HEAD_SHAPES.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(1, s, k, device="cuda", generator=g).bfloat16()
        w = (torch.randn(k, n, device="cuda", generator=g) * (3 / k**0.5)).bfloat16()
        bias = torch.randn(n, device="cuda", generator=g)
        kinds = torch.zeros(n, dtype=torch.int32, device="cuda")
        start = 0
        for kind, width in runs:
            kinds[start : start + width] = kernels.HEAD_KINDS[kind]
            start += width
        scale = F.softplus(torch.randn(n, device="cuda", generator=g))
        data = torch.rand(n, device="cuda", generator=g) * 100
        activate = torch.compile(lambda z: kernels.head_activations(z, kinds, scale, data, True).to(torch.bfloat16),
                                 dynamic=False, options=compile_options())
        logits = kernels.matmul_f32_out(x, w) + bias
        gemm_ms = median_ms(lambda: kernels.matmul_f32_out(x, w) + bias)
        bf16_gemm_ms = median_ms(lambda: x @ w)  # the products at cuBLAS's rate, for the kernel's "products_only"
        activate_ms = median_ms(lambda: activate(logits))
        ref = activate(logits)
        assert kernels.head_kernel_applies(x, w)
        tflop = 2 * s * k * n / 1e12
        default = dict(kernels.HEAD_KERNEL_CONFIG)
        first = None
        for label, variant in kernels.HEAD_KERNEL_VARIANTS.items():
            kernels.HEAD_KERNEL_CONFIG = {**default, **variant}
            y = kernels.head_predictions(x, w, bias, scale, data, kinds, True)
            first = y if first is None else first
            kernel_ms = median_ms(lambda: kernels.head_predictions(x, w, bias, scale, data, kinds, True))
            row = {"shape": name, "variant": label, "s": s, "k": k, "n": n, "tflop": tflop, "kernel_ms": kernel_ms,
                   "kernel_tflops": tflop / kernel_ms * 1e3, "cublas_gemm_ms": gemm_ms, "inductor_activations_ms": activate_ms,
                   "cublas_tflops": tflop / gemm_ms * 1e3, "cublas_bf16_out_gemm_ms": bf16_gemm_ms,
                   "equal_fraction": (y == ref).float().mean().item(), "same_as_first": bool(torch.equal(y, first)),
                   "config": dict(kernels.HEAD_KERNEL_CONFIG), "l2_copy_tbps": l2_copy_tbps, "dram_copy_tbps": dram_copy_tbps}
            # each tile loads its rows of x and its columns of w over all of K
            bm, bn = kernels.HEAD_KERNEL_CONFIG["BLOCK_M"], kernels.HEAD_KERNEL_CONFIG["BLOCK_N"]
            row["operand_load_tb"] = -(-s // bm) * -(-n // bn) * (bm + bn) * k * 2 / 1e12
            # the kernel with parts left out: which one binds
            for parts in kernels.HEAD_KERNEL_PARTS:
                row[f"{parts}_ms"] = median_ms(lambda: kernels._launch_heads(x, w, bias, scale, data, kinds, True, parts=parts))
            rows.append(row)
            write_rows(out, rows)
            print(f"heads {name}, {label}: kernel {kernel_ms:.3f} ms ({row['kernel_tflops']:.0f} TFLOP/s) against cuBLAS "
                  f"{gemm_ms:.3f} ({row['cublas_tflops']:.0f} TFLOP/s) + activations {activate_ms:.3f} ms, cuBLAS's bf16-out GEMM "
                  f"{bf16_gemm_ms:.3f}; equal to cuBLAS + activations {row['equal_fraction']:.5f}; bitwise as the first variant: {row['same_as_first']}; "
                  f"without the activations {row['no_activation_ms']:.3f} ms, the products alone {row['products_only_ms']:.3f} "
                  f"(operand loads {row['operand_load_tb'] / row['products_only_ms'] * 1e3:.1f} TB/s)", flush=True)
        kernels.HEAD_KERNEL_CONFIG = default


def attention() -> None:
    for s in (4096, 8192):
        q, k, v, bias = attention_inputs(s)
        flex = median_ms(lambda: flex_mha(q, k, v, bias, 5.0))
        folded = median_ms(lambda: flex_mha_folded(q, k, v, bias, 5.0))
        folded_err = (flex_mha_folded(q, k, v, bias, 5.0).float() - flex_mha(q, k, v, bias, 5.0).float()).norm() / flex_mha(q, k, v, bias, 5.0).float().norm()
        for bm, bn, st, nw in ((128, 64, 1, 4), (128, 64, 1, 8), (64, 64, 2, 4), (128, 32, 2, 4), (128, 128, 1, 8)):
            try:
                t = median_ms(lambda: flex_mha_folded(q, k, v, bias, 5.0, {"BLOCK_M": bm, "BLOCK_N": bn, "num_stages": st, "num_warps": nw}))
                print(f"  folded BLOCK_M={bm} BLOCK_N={bn} stages={st} warps={nw}: {t:.2f} ms", flush=True)
            except Exception as e:  # a tile that does not fit shared memory
                print(f"  folded BLOCK_M={bm} BLOCK_N={bn} stages={st} warps={nw}: failed ({str(e).splitlines()[0][:80]})", flush=True)
        print(f"attention {s} tokens: folded {folded:.2f} ms (vs flex rel {folded_err:.1e})", flush=True)

        ref = median_ms(lambda: attention_reference(q, k, v, bias))
        expected = attention_reference(q, k, v, bias)
        err = (flex_mha(q, k, v, bias, 5.0).float() - expected.float()).norm() / expected.float().norm()
        print(f"attention {s} tokens: flex {flex:.2f} ms  reference {ref:.2f} ms  rel L2 {err:.1e}", flush=True)
        flop = attention_flop(q, v)
        for name, fn in (("flex", flex_mha), ("triton", triton_mha)):
            t = back_to_back_ms(lambda: fn(q, k, v, bias, 5.0))
            print(f"attention {s} tokens: {name} {t:.3f} ms back to back ({flop / t / 1e9:.0f} TFLOP/s)  vs reference: {differences(fn(q, k, v, bias, 5.0), expected)}", flush=True)


def attention_forms(out: str | None) -> None:
    """`triton_mha` in its two forms (`TRITON_MHA_CONFIG["FORM"]`: the Triton kernel, the ping-pong
    Gluon one), each with the exact soft-cap and FAST_TANH, at the model's lengths and layout (q a
    (B, S, H, D) tensor seen as (B, H, S, D)), against the float32 reference."""
    rows = []
    default = dict(kernels.TRITON_MHA_CONFIG)
    for s in (4096, 8192):
        g = torch.Generator(device="cuda").manual_seed(s)
        q = torch.randn(1, s, 8, 128, device="cuda", generator=g).bfloat16().transpose(1, 2)
        k = torch.randn(1, 1, s, 128, device="cuda", generator=g).bfloat16()
        v = torch.randn(1, 1, s, 192, device="cuda", generator=g).bfloat16()
        bias = torch.randn(1, 8, s // 16, s // 16, device="cuda", generator=g)
        expected = attention_reference(q, k, v, bias)
        flop = attention_flop(q, v)
        first = {}
        for form in ("triton", "pingpong"):
            for fast_tanh in (False, True):
                kernels.TRITON_MHA_CONFIG = {**default, "FORM": form, "FAST_TANH": fast_tanh}
                tiles = kernels._mha_tiles(q, k, v, bias, 5.0)
                applies = form == "triton" or kernels._pingpong_applies(q, k, v, tiles)
                y = triton_mha(q, k, v, bias, 5.0)
                first.setdefault(fast_tanh, y)
                ms = back_to_back_ms(lambda: triton_mha(q, k, v, bias, 5.0))
                diff = y.float() - expected.float()
                row = {"tokens": s, "form": form, "fast_tanh": fast_tanh, "kernel_applies": applies, "ms": ms,
                       "tflops": flop / ms / 1e9, "max_abs": diff.abs().max().item(),
                       "rel_l2": (diff.norm() / expected.float().norm()).item(),
                       "equal_to_triton_form": (y == first[fast_tanh]).float().mean().item()}
                rows.append(row)
                write_rows(out, rows)
                print(f"attention {s} tokens, {form}{' FAST_TANH' if fast_tanh else ''}{'' if applies else ' (DID NOT APPLY)'}: "
                      f"{ms:.3f} ms ({row['tflops']:.0f} TFLOP/s), vs reference max abs {row['max_abs']:.1e} rel L2 "
                      f"{row['rel_l2']:.1e}, equal to the Triton form's {row['equal_to_triton_form']:.4f}", flush=True)
    kernels.TRITON_MHA_CONFIG = default


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), torch.__version__)
    if "--triton-configs" in sys.argv:
        triton_configs()
    elif "--head-transforms" in sys.argv:
        head_transforms(sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else None)
    elif "--heads" in sys.argv:
        heads(sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else None)
    elif "--attention-forms" in sys.argv:
        attention_forms(sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else None)
    elif "--conv" in sys.argv:
        conv_kernel(sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else None)
    else:
        if "--attention-only" not in sys.argv:
            conv_layouts()
        attention()
