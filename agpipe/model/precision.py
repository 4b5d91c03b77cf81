"""The dtype policy: the one place that decides what runs in which precision.

Two policies, both mirroring the official model:
- float32: everything in float32 (TF32 off, so a CUDA float32 run is a true float32 run).
- bfloat16: the official jmp policy (params float32, compute bfloat16), with the same float32
  islands: attention and row-attention logits and softmax (bf16 inputs, float32 accumulation),
  normalization statistics, the RMSBatchNorm rsqrt(var_ema), head einsums and the head
  nonlinearities (softplus, softmax, sigmoid) and data-space scaling; outputs are returned in
  bfloat16, as jmp's output=bfloat16 does.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch

PrecisionName = Literal["float32", "bfloat16"]


@dataclasses.dataclass(frozen=True)
class Precision:
    name: PrecisionName

    @property
    def compute(self) -> torch.dtype:
        """Activation and weight dtype outside the float32 islands."""
        return torch.bfloat16 if self.name == "bfloat16" else torch.float32

    @property
    def output(self) -> torch.dtype:
        """Dtype of the model's outputs (jmp's output=bfloat16 under the bf16 policy)."""
        return self.compute


FLOAT32 = Precision("float32")
BFLOAT16 = Precision("bfloat16")


def resolve_precision(name: str, device: torch.device | str) -> Precision:
    """`auto` is bfloat16 on a GPU and float32 on the CPU."""
    if name == "auto":
        name = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"unknown precision {name!r}: use auto, bfloat16 or float32")
    return Precision(name)  # type: ignore[arg-type]


def configure_backends(precision: Precision) -> None:
    """Keep float32 matmuls and convolutions in true float32 (no TF32) under the float32 policy."""
    exact = precision.name == "float32"
    torch.backends.cuda.matmul.allow_tf32 = not exact
    torch.backends.cudnn.allow_tf32 = not exact


def compile_options(mode: str = "default") -> dict:
    """Inductor's options for torch.compile(..., options=): a compile mode's own, plus rounding where
    the policy rounds.

    Inductor otherwise computes a fused chain of bfloat16 ops in float32 and rounds once at its end:
    more accurate, but not the official policy, and it moves the compiled model away from the eager
    one (small config, 16 kb, CPU: Pearson 0.99992 on the 1 bp embeddings, 0.99998 with the casts
    emulated; docs/performance.md). Imports Inductor (~2 s), so only where something is compiled.

    Deterministic: Inductor otherwise times several block sizes of a reduction kernel on the card
    when it first runs and keeps the fastest, which fixes the order of its additions; workers that
    compile at once can choose differently, and a 4-GPU run wrote other values than a 1-GPU run of
    the same windows. This keeps each kernel to one configuration chosen without timing.
    """
    import torch._inductor

    options = {**torch._inductor.list_mode_options(mode), "emulate_precision_casts": True}
    if hasattr(torch._inductor.config, "deterministic"):  # torch >= 2.10
        options["deterministic"] = True
    return options
