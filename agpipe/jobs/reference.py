"""The reference side of the parity stage: the JAX reference of the official model (agpipe.model.
jax_reference) on one window at a time, cropped exactly as the run's model workers crop.

`ReferenceWorker` is a plain class; agpipe.jobs.parity_stage makes it a Ray actor (a share of a GPU, or
CPUs). It returns each window's predictions as a WindowPrediction built by the workers' own
`kept_outputs`, so the kept rows, the kept square of the contact maps and the junctions between
kept sites are chosen by the same code for both sides. JAX is imported only where the reference
runs, so `agpipe run` does not load it in the driver.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from agpipe.home import agpipe_home
from agpipe.io.parquet import JUNCTIONS
from agpipe.jobs.windows import CODE_ONE_HOT, EncodedWindow, WindowPrediction
from agpipe.jobs.worker import kept_outputs
from agpipe.model.checkpoint import load_weights, official_to_ours, ours_to_official, read_orbax
from agpipe.model.config import HEADS, ORGANISMS, ModelConfig, Output
from agpipe.model.heads import JunctionPredictions
from agpipe.model.metadata import TrackMetadata
from agpipe.model.weights import WeightsError, sha256_memo


def reference_inputs(metadata: TrackMetadata) -> dict:
    """track_means and junction_tissues for jax_reference.forward, from the run's track metadata."""
    means = {h: np.stack([metadata.head_tracks(o, h).nonzero_mean for o in (0, 1)]) for h, s in HEADS.items() if s.kind == "tracks"}
    tissues = np.array([metadata.real_track_count(o, "splice_sites_junction") for o in (0, 1)])
    return {"track_means": means, "junction_tissues": tissues}


def reference_outputs(params, state, one_hot, organism_index, *, cfg: ModelConfig, precision: str, outputs: Sequence[Output], inputs: Mapping) -> dict:
    """The official outputs the run wrote, by str(Output), plus the junctions' sites. Under jit, XLA
    drops whatever the returned outputs do not need (the decoder without a 1 bp output, other heads)."""
    from agpipe.model import jax_reference

    heads, _ = jax_reference.forward(params, state, one_hot, organism_index, cfg=cfg, precision=precision, **inputs)
    wanted = {}
    for output in outputs:
        kind = HEADS[output.head].kind
        if kind == "tracks":
            wanted[str(output)] = heads[output.head][f"predictions_{output.resolution}bp"]
        else:
            wanted[str(output)] = heads[output.head]["predictions"]
        if output == JUNCTIONS:
            wanted["junction_positions"] = heads[output.head]["splice_site_positions"]
    return wanted


class ReferenceWorker:
    """The JAX reference on one device with one set of official weights, for one run's organism,
    outputs and precision."""

    def __init__(
        self,
        weights_path: str,
        weights_sha256: str,
        checkpoint: str | None,
        organism: str,
        outputs: Sequence[Output],
        precision: str,
    ) -> None:
        import jax

        from agpipe.model import jax_reference

        # Compiled programs are kept in the cache: checking a run again skips the compilation.
        jax.config.update("jax_compilation_cache_dir", str(agpipe_home() / "jax-cache"))
        weights = load_weights(weights_path, sha256_memo())
        if weights.sha256 != weights_sha256:
            raise WeightsError(f"{weights_path} changed after the run (sha256 differs): the parity check needs the run's weights")
        self.cfg = weights.cfg
        self.metadata = TrackMetadata.from_json(weights.metadata_json)
        if checkpoint:
            params, state = read_orbax(checkpoint)
            official_to_ours(params, state, self.cfg)  # one-line CheckpointError unless it fits the run's model
        else:
            params, state = ours_to_official(weights.tensors, self.cfg)
        self.device = jax.devices()[0]
        self.params, self.state = jax.device_put((params, state), self.device)
        self.organism = ORGANISMS.index(organism)
        self.outputs = tuple(outputs)
        forward = functools.partial(
            reference_outputs, cfg=self.cfg, precision=precision, outputs=self.outputs, inputs=reference_inputs(self.metadata)
        )
        self.forward = jax_reference.jit_exact(forward)

    def describe(self) -> str:
        """What the reference computes on, e.g. "gpu (NVIDIA H100 80GB HBM3)" or "cpu"."""
        kind = getattr(self.device, "device_kind", "")
        return self.device.platform if self.device.platform == "cpu" or not kind else f"{self.device.platform} ({kind})"

    def predict(self, encoded: EncodedWindow) -> WindowPrediction:
        """The reference's kept predictions for one window, from the same one-hot the run's worker
        made of the same base codes."""
        one_hot = CODE_ONE_HOT[encoded.codes][None]
        raw = self.forward(self.params, self.state, one_hot, np.full((1,), self.organism, np.int32))
        # Host copies (writable, for torch), floats as float32: bfloat16 values convert exactly.
        raw = {key: np.array(value, dtype=None if np.issubdtype(value.dtype, np.integer) else np.float32) for key, value in raw.items()}
        return kept_outputs(self.as_model_outputs(raw), 0, encoded.window)

    def as_model_outputs(self, raw: Mapping[str, np.ndarray]) -> dict[Output, torch.Tensor | JunctionPredictions]:
        """The official outputs in the PyTorch model's form: the organism's real channels only, and
        junction counts as (B, K, K, strand, real tissues)."""
        out: dict[Output, torch.Tensor | JunctionPredictions] = {}
        for output in self.outputs:
            values = raw[str(output)]
            if output == JUNCTIONS:
                tissues = self.cfg.channels(output.head)  # counts: + strand tissues, then - strand
                real = self.metadata.real_track_count(self.organism, output.head)  # the first `real` are real
                counts = np.stack([values[..., :real], values[..., tissues : tissues + real]], axis=3)
                out[output] = JunctionPredictions(torch.from_numpy(raw["junction_positions"]), torch.from_numpy(counts))
                continue
            padding = self.metadata.head_tracks(self.organism, output.head).padding
            channels = np.flatnonzero(~padding)
            out[output] = torch.from_numpy(np.ascontiguousarray(values[..., channels]))
        return out


def gpu_environment(memory_fraction: float) -> dict[str, str]:
    """JAX's memory settings for an actor sharing a GPU: no preallocation, and a cap on what its
    allocator may take. The older name of the cap, which every jax reads (newer ones also read
    XLA_CLIENT_MEM_FRACTION, and refuse to start if both are set)."""
    return {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{memory_fraction:.2f}"}
