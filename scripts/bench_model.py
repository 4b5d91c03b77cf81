"""Model speed on one GPU: our eager float32 baseline, our fast path, and the JAX reference (jit,
official bf16 policy), for the cases of the performance issue. One process, one card.

    python scripts/bench_model.py                        # all cases, all implementations
    python scripts/bench_model.py --cases 524288:all --impls fast

Prints a table (ms per window, TFLOP/s, % of the measured bf16 matmul ceiling, peak GiB, first-call
seconds) and writes JSON to benchmarks/results/. Random official-size weights, one random one-hot
sequence, batch 1 (`--batch 1,2` also times the fast path on batches of windows: ms per window is
then the call's time over the batch), outputs kept on the GPU, median of warm runs timed with CUDA events.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agpipe.model.alphagenome import AlphaGenome  # noqa: E402
from agpipe.model.checkpoint import official_to_ours, random_official_tree  # noqa: E402
from agpipe.model.config import ALL_OUTPUTS, HEADS, OFFICIAL  # noqa: E402
from agpipe.model import kernels  # noqa: E402
from agpipe.model.kernels import ATTENTION_KERNELS, fast_attention  # noqa: E402
from agpipe.model.metadata import synthetic_metadata  # noqa: E402
from agpipe.model.precision import BFLOAT16, FLOAT32, compile_options, configure_backends  # noqa: E402

OUTPUT_SETS = {"all": ALL_OUTPUTS, "128": tuple(o for o in ALL_OUTPUTS if o.resolution == 128)}
# The work of one window as ../shared/reference/ANCHORS.md counts it for the official model (every
# channel, padding included), so that TFLOP/s figures compare across implementations.
OFFICIAL_TFLOP = {(131072, "all"): 9.53, (524288, "all"): 37.94, (524288, "128"): 15.41, (1048576, "all"): 77.57}


def parse_cases(text: str) -> list[tuple[int, str]]:
    return [(int(length), outputs) for length, outputs in (c.split(":") for c in text.split(","))]


def timed(fn, warmup: int, runs: int) -> tuple[float, list[float], list[float]]:
    """First-call seconds (host clock), warm per-call milliseconds (CUDA events), and the warm calls'
    host milliseconds: until the call returns with its kernels enqueued, i.e. the CPU a call holds
    (a pipeline worker's other work must fit beside it)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    for _ in range(warmup):
        fn()
    times, host = [], []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t0) * 1e3)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return first, times, host


def matmul_ceiling() -> float:
    """Measured bf16 GEMM rate (TFLOP/s) at 8192^3."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    _, times, _ = timed(lambda: a @ b, 5, 20)
    return 2 * 8192**3 / (statistics.median(times) / 1e3) / 1e12


def count_flops(length: int, outputs, tensors, metadata) -> float:
    """Matmul and conv FLOPs of one window (torch.utils.flop_counter on the meta device)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = build(tensors, metadata, outputs, FLOAT32, "reference", device="meta")
        x = torch.zeros(1, length, 4)
        with FlopCounterMode(display=False) as counter:
            model(x)
    return counter.get_total_flops()


def build(tensors, metadata, outputs, precision, attention: str, device) -> AlphaGenome:
    heads = {o.head for o in outputs} | {"splice_sites_classification"}
    model = AlphaGenome(OFFICIAL)
    if device == "meta":
        model = model.to_empty(device="meta")
    else:
        model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()})
    model.prepare_(0, outputs, {h: metadata.head_tracks(0, h) for h in heads}, precision, attention)
    return model.to(device).eval()


def kernel_summary(fn) -> dict:
    """CUDA time of one call by kernel family, and the 40 most expensive kernels."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    families: dict[str, float] = {}
    for e in events:
        n = e.key
        # Inductor's kernels first: they are named after the ops they fuse, "conv_bias_residual" among them
        family = ("fused elementwise (triton)" if n.startswith(("triton_poi", "triton_per", "triton_red")) else
                  "convolution" if "fprop" in n or "conv" in n else "attention" if n.startswith("triton_tem") or "mha_fwd" in n else
                  "gemm" if any(t in n for t in ("gemm", "nvjet", "cutlass", "xmma")) else "fused elementwise (triton)" if n.startswith("triton") else "other")
        families[family] = families.get(family, 0.0) + e.device_time_total / 1e3
    top = [{"ms": e.device_time_total / 1e3, "count": e.count, "kernel": e.key[:200]} for e in sorted(events, key=lambda e: -e.device_time_total)[:40]]
    return {"families_ms": dict(sorted(families.items(), key=lambda kv: -kv[1])), "top_kernels": top}


def print_kernel_summary(summary: dict) -> None:
    for k, v in summary["families_ms"].items():
        print(f"    {k:28s} {v:8.2f} ms")
    for t in summary["top_kernels"]:
        print(f"      {t['ms']:7.2f} ms x{t['count']:<3d} {t['kernel'][:110]}")
    sys.stdout.flush()


def bench_torch(name, length, outputs, tensors, metadata, precision, attention, compile_mode, warmup, runs, profile=False, batch=1):
    configure_backends(precision)
    model = build(tensors, metadata, outputs, precision, attention, "cuda")
    # a variant's kernel choices are read when the model is traced: each variant traces its own graph
    torch._dynamo.reset()
    fn = torch.compile(model, dynamic=False, options=compile_options(compile_mode)) if compile_mode else model
    x = torch.nn.functional.one_hot(torch.randint(0, 4, (batch, length), device="cuda"), 4).float()
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        first, times, host = timed(lambda: fn(x), warmup, runs)
        peak = torch.cuda.max_memory_allocated() / 2**30
        summary = kernel_summary(lambda: fn(x)) if profile else None
    if summary:
        print_kernel_summary(summary)
    call_ms = statistics.median(times)
    row = {"impl": name, "batch": batch, "first_call_s": first, "ms": call_ms / batch, "ms_call": call_ms, "ms_all": times, "host_ms": statistics.median(host), "peak_gib": peak}
    return {**row, "profile": summary} if summary else row


def bench_jax(length, outputs_name, params, state, metadata, warmup, runs):
    import jax
    import jax.numpy as jnp

    from agpipe.model import jax_reference

    means = {
        h: np.stack([metadata.head_tracks(o, h).nonzero_mean for o in (0, 1)]) for h, s in HEADS.items() if s.kind == "tracks"
    }
    tissues = np.array([metadata.real_track_count(o, "splice_sites_junction") for o in (0, 1)])
    wanted = {o.head for o in OUTPUT_SETS[outputs_name]}

    def forward(p, s, x):
        pred, _ = jax_reference.forward(p, s, x, jnp.zeros((1,), jnp.int32), track_means=means, junction_tissues=tissues, precision="bfloat16")
        if outputs_name == "128":  # jit prunes everything the 128 bp track predictions do not need
            return {h: pred[h]["predictions_128bp"] for h in wanted if HEADS[h].kind == "tracks"}
        return pred

    fn = jax.jit(forward)
    p = jax.device_put(params)
    s = jax.device_put(state)
    x = jax.device_put(np.eye(4, dtype=np.float32)[np.random.default_rng(0).integers(0, 4, (1, length))])

    def run():
        jax.block_until_ready(fn(p, s, x))

    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    for _ in range(warmup):
        run()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
    stats = jax.devices()[0].memory_stats() or {}
    return {"impl": "jax-reference-bf16-jit", "first_call_s": first, "ms": statistics.median(times), "ms_all": times, "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="524288:all,524288:128,1048576:all")
    ap.add_argument("--impls", default="eager-f32,fast,jax")
    ap.add_argument("--compile-mode", default="max-autotune", help="torch.compile mode(s) for the fast path, comma-separated")
    ap.add_argument("--attention", default=fast_attention("cuda"), help="the bf16 paths' attention kernel(s), comma-separated, from "
                    f"{', '.join(k for k in ATTENTION_KERNELS if k != 'reference')} (default: the fast path's)")
    ap.add_argument("--gpu-conv", default=kernels.GPU_CONV, help="the fast path's convolutions, comma-separated, from triton (rounded "
                    "once, as XLA), cudnn (cuDNN, bias and residual added after its rounding); see kernels.GPU_CONV")
    ap.add_argument("--conv-config", default="", help="variants of kernels.TRITON_CONV_CONFIG to compare, ';'-separated JSON "
                    'objects merged into it, e.g. \'{};{"num_stages": 3}\' (default: the configuration as it is)')
    ap.add_argument("--mha-config", default="", help="variants of kernels.TRITON_MHA_CONFIG (the attention kernel) to compare, "
                    "';'-separated JSON objects merged into it, e.g. '{};{\"FAST_TANH\": true}'")
    ap.add_argument("--head-config", default="", help="variants of kernels.HEAD_KERNEL_CONFIG (the heads' GEMM and activations in "
                    "one Hopper kernel) to compare, ';'-separated JSON objects merged into it, e.g. '{\"ENABLED\": false};{\"ENABLED\": true}'")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--batch", default="1", help="the fast path's windows per call, comma-separated (ms are per window)")
    ap.add_argument("--profile", action="store_true", help="print the fast path's top CUDA kernels")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/model-<card>-<time>.json)")
    args = ap.parse_args()

    card = torch.cuda.get_device_name()
    print(f"{card}, torch {torch.__version__}", flush=True)
    ceiling = matmul_ceiling()
    print(f"bf16 matmul ceiling: {ceiling:.0f} TFLOP/s", flush=True)
    params, state = random_official_tree(OFFICIAL, seed=0)
    tensors = official_to_ours(params, state, OFFICIAL)
    metadata = synthetic_metadata(OFFICIAL)
    impls = args.impls.split(",")
    default_gpu_conv, default_conv, default_mha = kernels.GPU_CONV, dict(kernels.TRITON_CONV_CONFIG), dict(kernels.TRITON_MHA_CONFIG)
    default_heads = dict(kernels.HEAD_KERNEL_CONFIG)
    rows = []
    for length, outputs_name in parse_cases(args.cases):
        outputs = OUTPUT_SETS[outputs_name]
        flops = count_flops(length, outputs, tensors, metadata)
        case = {"length": length, "outputs": outputs_name, "tflop": flops / 1e12, "official_tflop": OFFICIAL_TFLOP.get((length, outputs_name))}
        print(f"\n{length} bp, {outputs_name} outputs: {flops / 1e12:.2f} TFLOP", flush=True)
        results = []
        if "eager-f32" in impls:
            results.append(bench_torch("eager-f32", length, outputs, tensors, metadata, FLOAT32, "reference", None, 1, 3))
        for attention in args.attention.split(","):
            if "eager-bf16" in impls:
                results.append(bench_torch(f"eager-bf16-{attention}", length, outputs, tensors, metadata, BFLOAT16, attention, None, args.warmup, args.runs))
            if "fast" in impls:
                variants = itertools.product(
                    args.compile_mode.split(","), args.gpu_conv.split(","), args.conv_config.split(";"), args.mha_config.split(";"),
                    args.head_config.split(";"), map(int, args.batch.split(",")),
                )
                for mode, conv, conv_variant, mha_variant, head_variant, batch in variants:
                    kernels.GPU_CONV = conv
                    kernels.TRITON_CONV_CONFIG = {**default_conv, **json.loads(conv_variant or "{}")}
                    kernels.TRITON_MHA_CONFIG = {**default_mha, **json.loads(mha_variant or "{}")}
                    kernels.HEAD_KERNEL_CONFIG = {**default_heads, **json.loads(head_variant or "{}")}
                    name = (f"fast-bf16-{attention}-{mode}" + ("" if conv == "triton" else f"-{conv}-conv")
                            + (f"-conv{conv_variant}" if conv_variant.strip("{} ") else "")
                            + (f"-mha{mha_variant}" if mha_variant.strip("{} ") else "")
                            + (f"-heads{head_variant}" if head_variant.strip("{} ") else "") + (f"-batch{batch}" if batch > 1 else ""))
                    results.append(bench_torch(name, length, outputs, tensors, metadata, BFLOAT16, attention, mode, args.warmup, args.runs, args.profile, batch))
                # the next case's other implementations run with the defaults again
                kernels.GPU_CONV, kernels.TRITON_CONV_CONFIG, kernels.TRITON_MHA_CONFIG = default_gpu_conv, default_conv, default_mha
                kernels.HEAD_KERNEL_CONFIG = default_heads
        if "jax" in impls:
            results.append(bench_jax(length, outputs_name, params, state, metadata, args.warmup, args.runs))
        gc.collect()  # the models of this case are gone: hand their memory back before the next case
        torch.cuda.empty_cache()
        for r in results:
            r.update(case)
            r["tflops"] = flops / (r["ms"] / 1e3) / 1e12
            r["pct_ceiling"] = 100 * r["tflops"] / ceiling
            rows.append(r)
            print(f"  {r['impl']:28s} {r['ms']:9.1f} ms  {r['tflops']:6.0f} TFLOP/s  {r['pct_ceiling']:5.1f}%  peak {r['peak_gib']:6.2f} GiB  first {r['first_call_s']:6.1f} s  host {r.get('host_ms', float('nan')):6.1f} ms", flush=True)
    print("\n| length | outputs | implementation | ms / window | TFLOP/s | % of ceiling | peak GiB | first call s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['length']:,} | {r['outputs']} | {r['impl']} | {r['ms']:.1f} | {r['tflops']:.0f} | {r['pct_ceiling']:.1f} | {r['peak_gib']:.2f} | {r['first_call_s']:.1f} |")
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = Path(args.out or Path(__file__).resolve().parents[1] / "benchmarks" / "results" / f"model-{card.replace(' ', '_')}-{stamp}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"card": card, "torch": torch.__version__, "ceiling_tflops": ceiling, "compile_mode": args.compile_mode, "results": rows}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
