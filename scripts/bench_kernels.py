"""Micro-benchmarks behind the fast path's design choices (one GPU): convolution layouts and the
fused attention kernel against the reference attention. Prints one line per variant."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from agpipe.model.kernels import flex_mha  # noqa: E402
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


def attention() -> None:
    for s in (4096, 8192):
        q = torch.randn(1, 8, s, 128, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(1, 1, s, 128, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(1, 1, s, 192, device="cuda", dtype=torch.bfloat16)
        bias = torch.randn(1, 8, s // 16, s // 16, device="cuda")
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

        def reference():
            logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) / 128**0.5
            logits = logits + bias.repeat_interleave(16, -1).repeat_interleave(16, -2)
            w = torch.softmax(torch.tanh(logits / 5) * 5, -1).bfloat16()
            return torch.matmul(w.float(), v.float()).bfloat16()

        ref = median_ms(reference)
        err = (flex_mha(q, k, v, bias, 5.0).float() - reference().float()).norm() / reference().float().norm()
        print(f"attention {s} tokens: flex {flex:.2f} ms  reference {ref:.2f} ms  rel L2 {err:.1e}", flush=True)


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), torch.__version__)
    if "--attention-only" not in sys.argv:
        conv_layouts()
    attention()
