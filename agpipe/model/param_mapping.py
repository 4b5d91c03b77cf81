"""The parameter mapping: every official checkpoint array <-> one tensor of our weights file.

One table, built from the architecture in the official (Haiku) naming. Our tensors keep the
official memory layout (Linear w as (in, out), conv w as (width, in, out), heads as (organism, in,
out)); the only transform is a reshape of size-1 axes ((1, 1, C) -> (C,)), so conversion in either
direction is bit-exact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from agpipe.model.config import HEADS, ModelConfig

ROOT = "alphagenome"


@dataclasses.dataclass(frozen=True)
class Entry:
    official: str  # 'module/path/name' as in official_param_tree.txt
    ours: str  # key in our weights file (= the PyTorch state_dict key)
    state: bool  # Haiku state (var_ema) rather than a parameter
    lead: int  # number of leading size-1 axes the official array has (rank of the padding)


def _suffix(i: int) -> str:
    return "" if i == 0 else f"_{i}"


def _linear(off: str, ours: str, bias: bool = True) -> Iterator[Entry]:
    yield Entry(f"{off}/w", f"{ours}.w", False, 0)
    if bias:
        yield Entry(f"{off}/b", f"{ours}.b", False, 0)


def _rms_batch_norm(off: str, ours: str, lead: int = 2) -> Iterator[Entry]:
    yield Entry(f"{off}/scale", f"{ours}.scale", False, lead)
    yield Entry(f"{off}/offset", f"{ours}.offset", False, lead)
    yield Entry(f"{off}/var_ema", f"{ours}.var_ema", True, lead)


def _layer_norm(off: str, ours: str) -> Iterator[Entry]:
    yield Entry(f"{off}/scale", f"{ours}.scale", False, 0)
    yield Entry(f"{off}/offset", f"{ours}.offset", False, 0)


def _conv_block(off: str, ours: str, width: int) -> Iterator[Entry]:
    yield from _rms_batch_norm(f"{off}/rms_batch_norm", f"{ours}.norm")
    if width == 1:
        yield from _linear(f"{off}/linear", f"{ours}.conv")
    else:
        conv = f"{off}/standardized_conv1_d"
        yield Entry(f"{conv}/w", f"{ours}.conv.w", False, 0)
        yield Entry(f"{conv}/scale", f"{ours}.conv.scale", False, 2)
        yield Entry(f"{conv}/bias", f"{ours}.conv.bias", False, 0)


def _encoder(cfg: ModelConfig) -> Iterator[Entry]:
    enc = f"{ROOT}/sequence_encoder"
    yield Entry(f"{enc}/dna_embedder/conv1_d/w", "encoder.dna_embedder.conv_w", False, 0)
    yield Entry(f"{enc}/dna_embedder/conv1_d/b", "encoder.dna_embedder.conv_b", False, 0)
    yield from _conv_block(f"{enc}/dna_embedder/conv_block", "encoder.dna_embedder.block", cfg.conv_kernel)
    for i in range(cfg.num_down_blocks):
        yield from _conv_block(f"{enc}/downres_block_{i}/conv_block", f"encoder.down.{i}.block1", cfg.conv_kernel)
        yield from _conv_block(f"{enc}/downres_block_{i}/conv_block_1", f"encoder.down.{i}.block2", cfg.conv_kernel)


def _tower(cfg: ModelConfig) -> Iterator[Entry]:
    tt = f"{ROOT}/transformer_tower"
    for j in range(len(range(0, cfg.num_layers, cfg.pair_update_every))):
        off, ours = f"{tt}/pair_update_block{_suffix(j)}", f"tower.pair_updates.{j}"
        s2p, s = f"{off}/sequence_to_pair_block", f"{ours}.seq2pair"
        yield from _layer_norm(f"{s2p}/norm_seq2pair", f"{s}.norm")
        yield from _linear(f"{s2p}/linear_q", f"{s}.q", bias=False)
        yield from _linear(f"{s2p}/linear_k", f"{s}.k", bias=False)
        yield from _linear(f"{s2p}/linear_pos_features", f"{s}.pos")
        yield Entry(f"{s2p}/q_r_bias", f"{s}.q_r_bias", False, 2)
        yield Entry(f"{s2p}/k_r_bias", f"{s}.k_r_bias", False, 2)
        yield from _linear(f"{s2p}/linear_y_q", f"{s}.y_q", bias=False)
        yield from _linear(f"{s2p}/linear_y_k", f"{s}.y_k", bias=False)
        yield from _linear(f"{s2p}/linear_pair", f"{s}.pair")
        row, r = f"{off}/row_attention_block", f"{ours}.row_attn"
        yield from _layer_norm(f"{row}/layer_norm", f"{r}.norm")
        yield from _linear(f"{row}/linear_q", f"{r}.q", bias=False)
        yield from _linear(f"{row}/linear_k", f"{r}.k", bias=False)
        yield from _linear(f"{row}/linear_v", f"{r}.v")
        mlp, m = f"{off}/pair_mlp_block", f"{ours}.mlp"
        yield from _layer_norm(f"{mlp}/layer_norm", f"{m}.norm")
        yield from _linear(f"{mlp}/linear", f"{m}.fc1")
        yield from _linear(f"{mlp}/linear_1", f"{m}.fc2")
    for i in range(cfg.num_layers):
        bias = f"{tt}/attention_bias_block{_suffix(i)}"
        yield from _rms_batch_norm(f"{bias}/rms_batch_norm", f"tower.bias.{i}.norm", lead=3)
        yield from _linear(f"{bias}/linear", f"tower.bias.{i}.proj", bias=False)
        mha, a = f"{tt}/mha_block{_suffix(i)}", f"tower.attn.{i}"
        yield from _rms_batch_norm(f"{mha}/rms_batch_norm", f"{a}.norm")
        yield from _linear(f"{mha}/q_layer", f"{a}.q", bias=False)
        yield from _linear(f"{mha}/k_layer", f"{a}.k", bias=False)
        yield from _linear(f"{mha}/v_layer", f"{a}.v", bias=False)
        for n in ("q", "k", "v"):
            yield from _layer_norm(f"{mha}/norm_{n}", f"{a}.norm_{n}")
        yield from _linear(f"{mha}/linear_embedding", f"{a}.out")
        yield from _rms_batch_norm(f"{mha}/rms_batch_norm_1", f"{a}.out_norm")
        mlp, m = f"{tt}/mlp_block{_suffix(i)}", f"tower.mlp.{i}"
        yield from _rms_batch_norm(f"{mlp}/rms_batch_norm", f"{m}.norm")
        yield from _linear(f"{mlp}/linear", f"{m}.fc1")
        yield from _linear(f"{mlp}/linear_1", f"{m}.fc2")
        yield from _rms_batch_norm(f"{mlp}/rms_batch_norm_1", f"{m}.out_norm")


def _decoder(cfg: ModelConfig) -> Iterator[Entry]:
    for i in range(cfg.num_down_blocks + 1):
        off, ours = f"{ROOT}/sequence_decoder/up_res_block{_suffix(i)}", f"decoder.up.{i}"
        yield Entry(f"{off}/residual_scale", f"{ours}.residual_scale", False, 0)
        yield from _conv_block(f"{off}/conv_in", f"{ours}.conv_in", cfg.conv_kernel)
        yield from _conv_block(f"{off}/pointwise_conv_unet_skip", f"{ours}.skip", 1)
        yield from _conv_block(f"{off}/conv_out", f"{ours}.conv_out", cfg.conv_kernel)


def _embedders() -> Iterator[Entry]:
    yield Entry(f"{ROOT}/embed/embeddings", "organism.embeddings", False, 0)
    e = f"{ROOT}/output_embedder"
    yield from _linear(f"{e}/linear", "embed128.linear")
    yield from _rms_batch_norm(f"{e}/rms_batch_norm", "embed128.norm")
    yield Entry(f"{e}/embed/embeddings", "embed128.organism.embeddings", False, 0)
    e = f"{ROOT}/output_embedder_1"
    yield from _linear(f"{e}/linear", "embed1.linear")
    yield from _linear(f"{e}/linear_1", "embed1.skip", bias=False)
    yield from _rms_batch_norm(f"{e}/rms_batch_norm", "embed1.norm")
    yield Entry(f"{e}/embed/embeddings", "embed1.organism.embeddings", False, 0)
    yield from _layer_norm(f"{ROOT}/output_pair/layer_norm", "embed_pair.norm")
    yield Entry(f"{ROOT}/output_pair/embed/embeddings", "embed_pair.organism.embeddings", False, 0)


def _heads() -> Iterator[Entry]:
    for name, spec in HEADS.items():
        off, ours = f"{ROOT}/head/{name}", f"heads.{name}"
        if spec.kind == "tracks":
            for r in spec.resolutions:
                yield from _linear(f"{off}/resolution_{r}/multi_organism_linear", f"{ours}.res_{r}.linear")
                yield Entry(f"{off}/resolution_{r}/learnt_scale", f"{ours}.res_{r}.learnt_scale", False, 0)
        elif spec.kind == "splice_junction":
            yield from _linear(f"{off}/multi_organism_linear", f"{ours}.linear")
            for site in ("pos_acceptor", "pos_donor", "neg_acceptor", "neg_donor"):
                yield Entry(f"{off}/{site}_logits/embeddings", f"{ours}.{site}", False, 0)
        else:
            yield from _linear(f"{off}/multi_organism_linear", ours)


def mapping(cfg: ModelConfig) -> list[Entry]:
    """The whole table, in a stable order."""
    return [*_encoder(cfg), *_tower(cfg), *_decoder(cfg), *_embedders(), *_heads()]


def official_shape(entry: Entry, ours_shape: tuple[int, ...]) -> tuple[int, ...]:
    return (1,) * entry.lead + tuple(ours_shape)
