"""A functional JAX forward pass of the official AlphaGenome, run directly on the official tree.

No Haiku: `params` and `state` are the nested dicts of an official checkpoint
({'alphagenome/sequence_encoder/dna_embedder/conv1_d': {'w': ..., 'b': ...}, ...}). The computation
follows alphagenome_research 0.2.0 op for op, under either policy:

- float32: every op in float32, matmuls at HIGHEST precision (a true float32 reference on any
  platform; the official `BF16_BF16_F32` dot presets are no-ops on float32 CPU inputs).
- RoPE frequencies and central-mask widths are the correctly rounded float32 values of the official
  formulas (`config.rope_frequencies`), shared with the PyTorch model.
- bfloat16: the official jmp policy (params, state and inputs cast to bfloat16 on use; the same
  float32 islands). The `BF16_BF16_F32` presets are emulated by casting their operands to bfloat16,
  which is what they do on a GPU, so the reference means the same thing on CPU and GPU.

Outputs keep the official structure: ({head: {...}}, {'embeddings_1bp': ..., ...}), all channels
(padding included), every organism's head weights indexed by `organism_index`.

Compile it with `jit_exact`: plain `jax.jit` lets XLA keep float32 inside fused bfloat16 chains
(excess precision), rounding where its fusion happens to end rather than where the policy says, so
two compilations of the same policy disagree (small config, 16 kb, CPU: Pearson 0.99993 against the
op-by-op evaluation; 0.99999 with `jit_exact`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from agpipe.model.config import HEADS, OFFICIAL, ModelConfig, central_mask_widths, rope_frequencies

Tree = Mapping[str, Mapping[str, Any]]
HIGHEST = jax.lax.Precision.HIGHEST


def jit_exact(fn):
    """jax.jit with every rounding of the policy kept (no excess precision in fused bf16 code)."""
    return jax.jit(fn, compiler_options={"xla_allow_excess_precision": False})


class _Policy:
    """Parameter access and dot products under one precision policy."""

    def __init__(self, params: Tree, state: Tree, name: str):
        self.params, self.state, self.name = params, state, name
        self.compute = jnp.bfloat16 if name == "bfloat16" else jnp.float32
        self.precision = None if name == "bfloat16" else HIGHEST

    def p(self, module: str, name: str) -> jax.Array:
        return jnp.asarray(self.params[module][name]).astype(self.compute)

    def s(self, module: str, name: str) -> jax.Array:
        return jnp.asarray(self.state[module][name]).astype(self.compute)

    def einsum(self, spec: str, *xs: jax.Array, f32_out: bool = False) -> jax.Array:
        kw = {"preferred_element_type": jnp.float32} if f32_out else {}
        return jnp.einsum(spec, *xs, precision=self.precision, **kw)

    def bf16_f32_einsum(self, spec: str, a: jax.Array, b: jax.Array, f32_out: bool = True) -> jax.Array:
        """The official einsums with precision=BF16_BF16_F32 (bf16 operands, float32 accumulation)."""
        if self.name == "bfloat16":
            a, b = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
        out = jnp.einsum(spec, a, b, precision=self.precision, preferred_element_type=jnp.float32)
        return out if f32_out else out.astype(jnp.result_type(a, b))


def _f32(fn, x):
    """A transcendental function evaluated in float32 and rounded to x's dtype, as XLA does on GPU
    (XLA's CPU backend expands some of them in bfloat16 steps, which would make the reference
    depend on the platform)."""
    return fn(x.astype(jnp.float32)).astype(x.dtype)


def _sigmoid_gelu(x):
    return _f32(jax.nn.sigmoid, jnp.asarray(1.702, x.dtype) * x) * x


def _tanh_gelu(x):
    return _f32(jax.nn.gelu, x)


def _sfx(i: int) -> str:
    return "" if i == 0 else f"_{i}"


def _linear(P: _Policy, m: str, x, bias: bool = True):
    y = P.einsum("...i,ij->...j", x, P.p(m, "w"))
    return y + P.p(m, "b") if bias else y


def _rms_batch_norm(P: _Policy, m: str, x):
    var = P.s(m, "var_ema")
    inv = P.p(m, "scale") * _f32(jax.lax.rsqrt, var + 1e-5).astype(x.dtype)
    return x * inv + P.p(m, "offset")


def _layer_norm(P: _Policy, m: str, x, rms: bool = False):
    dtype = x.dtype
    if not rms:
        x = x - jnp.mean(x, axis=-1, dtype=jnp.float32, keepdims=True).astype(dtype)
    var = jnp.mean(jnp.square(x), axis=-1, dtype=jnp.float32, keepdims=True)
    inv = P.p(m, "scale") * jax.lax.rsqrt(var + 1e-5).astype(dtype)
    return inv * x + P.p(m, "offset")


def _standardized_conv(P: _Policy, m: str, x):
    w = P.p(m, "w")
    w = w - jnp.mean(w, axis=(0, 1), keepdims=True)
    var_w = jnp.var(w, axis=(0, 1), keepdims=True)
    fan_in = w.shape[0] * w.shape[1]
    w = w * (P.p(m, "scale") * _f32(jax.lax.rsqrt, jnp.maximum(fan_in * var_w, 1e-4)))
    out = _conv(P, x, w)
    return out + P.p(m, "bias")


def _conv(P: _Policy, x, w):
    return jax.lax.conv_general_dilated(
        x, w, window_strides=[1], padding="SAME", dimension_numbers=("NWC", "WIO", "NWC"), precision=P.precision
    )


def _conv_block(P: _Policy, m: str, x, width: int):
    x = _sigmoid_gelu(_rms_batch_norm(P, f"{m}/rms_batch_norm", x))
    if width == 1:
        return _linear(P, f"{m}/linear", x)
    return _standardized_conv(P, f"{m}/standardized_conv1_d", x)


def _max_pool(x, by: int = 2):
    b, s, c = x.shape
    return x.reshape(b, s // by, by, c).max(axis=2)


def _encoder(P: _Policy, cfg: ModelConfig, x):
    m = "alphagenome/sequence_encoder"
    x = _conv(P, x, P.p(f"{m}/dna_embedder/conv1_d", "w")) + P.p(f"{m}/dna_embedder/conv1_d", "b")
    x = x + _conv_block(P, f"{m}/dna_embedder/conv_block", x, cfg.conv_kernel)
    skips = [x]
    x = _max_pool(x)
    for i in range(cfg.num_down_blocks):
        d = f"{m}/downres_block_{i}"
        out = _conv_block(P, f"{d}/conv_block", x, cfg.conv_kernel)
        out = out + jnp.pad(x, [(0, 0), (0, 0), (0, out.shape[-1] - x.shape[-1])])
        x = out + _conv_block(P, f"{d}/conv_block_1", out, cfg.conv_kernel)
        skips.append(x)
        x = _max_pool(x)
    return x, skips


def _decoder(P: _Policy, cfg: ModelConfig, x, skips):
    for i, skip in enumerate(reversed(skips)):
        m = f"alphagenome/sequence_decoder/up_res_block{_sfx(i)}"
        c = skip.shape[-1]
        out = _conv_block(P, f"{m}/conv_in", x, cfg.conv_kernel) + x[:, :, :c]
        out = jnp.repeat(out, 2, axis=1)
        out = out * P.p(m, "residual_scale")
        out = out + _conv_block(P, f"{m}/pointwise_conv_unet_skip", skip, 1)
        x = out + _conv_block(P, f"{m}/conv_out", out, cfg.conv_kernel)
    return x


def apply_rope(x, positions, max_position: int):
    """RoPE as the official `apply_rope` (positions in x's dtype unless given)."""
    if positions is None:
        positions = jnp.arange(x.shape[1]).astype(x.dtype).reshape(1, x.shape[1])
    inv_freq = jnp.asarray(rope_frequencies(x.shape[-1] // 2, max_position)).astype(x.dtype)
    theta = jnp.einsum("bs,f->bsf", positions, inv_freq, precision=HIGHEST)
    theta = jnp.repeat(theta, 2, axis=-1)[..., None, :]
    x_rotated = jnp.stack([-x[..., 1::2], x[..., ::2]], axis=-1).reshape(x.shape)
    return x * _f32(jnp.cos, theta) + x_rotated * _f32(jnp.sin, theta)


def _mha(P: _Policy, cfg: ModelConfig, m: str, x, bias):
    b, s, _ = x.shape
    h = _rms_batch_norm(P, f"{m}/rms_batch_norm", x)
    q = _layer_norm(P, f"{m}/norm_q", _linear(P, f"{m}/q_layer", h, False).reshape(b, s, cfg.num_heads, cfg.qk_dim))
    k = _layer_norm(P, f"{m}/norm_k", _linear(P, f"{m}/k_layer", h, False).reshape(b, s, 1, cfg.qk_dim))
    v = _layer_norm(P, f"{m}/norm_v", _linear(P, f"{m}/v_layer", h, False).reshape(b, s, 1, cfg.v_dim))
    q = apply_rope(q, None, cfg.rope_max_position)
    k = apply_rope(k, None, cfg.rope_max_position)
    logits = P.bf16_f32_einsum("bshc,bS1c->bhsS", q, k) / math.sqrt(cfg.qk_dim)
    logits = (logits + bias).astype(jnp.float32)
    logits = jnp.tanh(logits / cfg.soft_cap) * cfg.soft_cap
    w = jax.nn.softmax(logits, axis=-1)
    y = P.bf16_f32_einsum("bhsS,bS1c->bshc", w, v).astype(q.dtype)
    y = _linear(P, f"{m}/linear_embedding", y.reshape(b, s, -1))
    return _rms_batch_norm(P, f"{m}/rms_batch_norm_1", y)


def _mlp(P: _Policy, m: str, x):
    h = _rms_batch_norm(P, f"{m}/rms_batch_norm", x)
    h = jax.nn.relu(_linear(P, f"{m}/linear", h))
    return _rms_batch_norm(P, f"{m}/rms_batch_norm_1", _linear(P, f"{m}/linear_1", h))


def _attention_bias(P: _Policy, cfg: ModelConfig, m: str, pair):
    x = _tanh_gelu(_rms_batch_norm(P, f"{m}/rms_batch_norm", pair))
    x = _linear(P, f"{m}/linear", x, False)
    for axis in (1, 2):
        x = jnp.repeat(x, cfg.pair_pool, axis=axis)
    return jnp.moveaxis(x, 3, 1)


def _shift(x, query_length: int, key_length: int):
    *batch, rows, diags = x.shape
    x = x.reshape(batch + [diags, rows])[..., 1:, :]
    return x.reshape(batch + [rows, diags - 1])[..., :key_length]


def _central_mask_features(distances, feature_size: int, seq_length: int):
    widths = jax.lax.broadcast_to_rank(jnp.asarray(central_mask_widths(feature_size, seq_length)), distances.ndim)
    return (widths > distances[..., None]).astype(distances.dtype)


def _sequence_to_pair(P: _Policy, cfg: ModelConfig, m: str, x):
    b, s, d = x.shape
    # hk.AvgPool; summed in float32 and rounded once, as XLA does on GPU
    x = x.reshape(b, s // cfg.pair_pool, cfg.pair_pool, d).astype(jnp.float32).mean(axis=2).astype(x.dtype)
    x = _layer_norm(P, f"{m}/norm_seq2pair", x, rms=True)
    p, h, c = x.shape[1], cfg.seq2pair_heads, cfg.seq2pair_head_dim
    q = _linear(P, f"{m}/linear_q", x, False).reshape(b, p, h, c)
    k = _linear(P, f"{m}/linear_k", x, False).reshape(b, p, h, c)
    rel = jnp.arange(-p, p).astype(jnp.float32)
    feats = _central_mask_features(jnp.abs(rel), cfg.pos_features, cfg.rope_max_position // cfg.pair_pool)
    feats = feats.astype(x.dtype)
    feats = jnp.concatenate([feats, jnp.sign(rel)[..., None] * feats], axis=-1).astype(x.dtype)
    pos = _linear(P, f"{m}/linear_pos_features", feats).reshape(2 * p, h, c)
    q_bias = P.p(m, "q_r_bias")
    k_bias = P.p(m, "k_r_bias")
    rel_q = _shift(P.einsum("bqhc,phc->bhqp", q + q_bias, pos), p, p)
    rel_k = _shift(P.einsum("bkhc,phc->bhkp", k + k_bias, pos), p, p)
    a = P.einsum("bqhc,bkhc->bqkh", q, k)
    a = a + 0.5 * (jnp.transpose(rel_q, (0, 2, 3, 1)) + jnp.transpose(rel_k, (0, 3, 2, 1)))
    y_q = _linear(P, f"{m}/linear_y_q", _tanh_gelu(x), False)
    y_k = _linear(P, f"{m}/linear_y_k", _tanh_gelu(x), False)
    return _linear(P, f"{m}/linear_pair", a) + y_q[:, :, None, :] + y_k[:, None, :, :]


def _row_attention(P: _Policy, m: str, pair):
    x = _layer_norm(P, f"{m}/layer_norm", pair, rms=True)
    k = _linear(P, f"{m}/linear_k", x, False)
    q = _linear(P, f"{m}/linear_q", x, False)
    v = _linear(P, f"{m}/linear_v", x)
    w = P.bf16_f32_einsum("bpqf,bpkf->bpqk", q, k) / math.sqrt(q.shape[-1])
    w = jax.nn.softmax(w, axis=-1)
    return P.bf16_f32_einsum("bpqk,bpkf->bpqf", w, v).astype(q.dtype)


def _pair_mlp(P: _Policy, m: str, pair):
    x = _layer_norm(P, f"{m}/layer_norm", pair, rms=True)
    return _linear(P, f"{m}/linear_1", jax.nn.relu(_linear(P, f"{m}/linear", x)))


def _tower(P: _Policy, cfg: ModelConfig, x):
    t = "alphagenome/transformer_tower"
    pair = None
    for i in range(cfg.num_layers):
        if i % cfg.pair_update_every == 0:
            m = f"{t}/pair_update_block{_sfx(i // cfg.pair_update_every)}"
            y = _sequence_to_pair(P, cfg, f"{m}/sequence_to_pair_block", x)
            pair = y if pair is None else pair + y
            pair = pair + _row_attention(P, f"{m}/row_attention_block", pair)
            pair = pair + _pair_mlp(P, f"{m}/pair_mlp_block", pair)
        bias = _attention_bias(P, cfg, f"{t}/attention_bias_block{_sfx(i)}", pair)
        x = x + _mha(P, cfg, f"{t}/mha_block{_sfx(i)}", x, bias)
        x = x + _mlp(P, f"{t}/mlp_block{_sfx(i)}", x)
    return x, pair


def _organism(P: _Policy, m: str, organism_index):
    return P.p(m, "embeddings")[organism_index]


def _multi_organism_linear(P: _Policy, m: str, x, organism_index):
    w = P.p(m, "w")[organism_index]
    b = P.p(m, "b")[organism_index]
    b = b.reshape((b.shape[0],) + (1,) * (x.ndim - 2) + (b.shape[1],))
    return P.einsum("b...i,bij->b...j", x, w, f32_out=True) + b


def to_data_space(scaled, track_means, resolution: int, squash: bool):
    """The official `predictions_scaling`: soft-clip inverse, rna_seq power, nonzero_mean x resolution."""
    x = jnp.where(scaled > 10.0, (scaled + 10.0) ** 2 / 40.0, scaled)
    if squash:
        x = jnp.power(x, 1.0 / 0.75)
    return x * (track_means[:, None] * resolution).astype(x.dtype)


def top_splice_sites(probs, k: int, threshold: float):
    """The official site selection with ties going to the lower position (lax.top_k). The official
    model uses lax.approx_max_k, which picks among exactly tied probabilities in a platform-defined
    order; otherwise they agree."""
    values, positions = jax.lax.top_k(jnp.moveaxis(probs[..., :4], 1, -1), k)  # (B, 4, K)
    values, positions = jnp.moveaxis(values, -1, 1), jnp.moveaxis(positions, -1, 1)
    if threshold > 0:
        positions = jnp.where(values < threshold, jnp.inf, positions)
    positions = jnp.sort(positions, axis=1)
    if threshold > 0:
        positions = jnp.where(positions == jnp.inf, -1, positions)
    return positions.swapaxes(1, 2).astype(jnp.int32)


def _junctions(P: _Policy, cfg: ModelConfig, e1, positions, organism_index, tissue_mask):
    m = "alphagenome/head/splice_sites_junction"
    logits = _multi_organism_linear(P, f"{m}/multi_organism_linear", e1, organism_index)
    t = cfg.channels("splice_sites_junction")

    def site(name, idx):
        x = jax.vmap(lambda e, i: jnp.take(e, i, axis=0))(logits, idx).astype(jnp.float32)
        table = P.p(f"{m}/{name}_logits", "embeddings").astype(jnp.float32)
        table = table.reshape(table.shape[0], 2, t, cfg.junction_dim)[organism_index]
        x = table[:, [0]] * x[:, :, None, :] + table[:, [1]]
        return apply_rope(x, idx, cfg.junction_rope_max_position)

    pd, pa, nd, na = (positions[:, i] for i in range(4))
    pos = P.bf16_f32_einsum("bdtc,batc->bdat", site("pos_donor", pd), site("pos_acceptor", pa))
    neg = P.bf16_f32_einsum("bdtc,batc->bdat", site("neg_donor", nd), site("neg_acceptor", na))
    pos_mask = ((pd >= 0)[:, :, None] & (pa >= 0)[:, None, :])[..., None] & tissue_mask[:, None, None, :]
    neg_mask = ((nd >= 0)[:, :, None] & (na >= 0)[:, None, :])[..., None] & tissue_mask[:, None, None, :]
    mask = jnp.concatenate([pos_mask, neg_mask], axis=-1)
    counts = jnp.concatenate([jax.nn.softplus(pos), jax.nn.softplus(neg)], axis=-1)
    return {"predictions": jnp.where(mask, counts, 0), "splice_site_positions": positions, "splice_junction_mask": mask}


def forward(
    params: Tree,
    state: Tree,
    one_hot,
    organism_index,
    *,
    track_means: Mapping[str, np.ndarray],
    junction_tissues: np.ndarray,
    cfg: ModelConfig = OFFICIAL,
    precision: str = "float32",
    splice_site_positions=None,
):
    """The official forward pass: ({head: outputs}, embeddings).

    track_means: per genome-track head, (2, channels) nonzero_mean per organism and track.
    junction_tissues: (2,) number of real splice-junction tissues per organism.
    splice_site_positions: (B, 4, K) sites to read junctions at (as the official `predict_junctions`
    takes them); by default the top sites of the model's own splice-site predictions.
    """
    P = _Policy(params, state, precision)
    x = jnp.asarray(one_hot).astype(P.compute)
    organism_index = jnp.asarray(organism_index, jnp.int32)
    trunk, skips = _encoder(P, cfg, x)
    trunk = trunk + _organism(P, "alphagenome/embed", organism_index)[:, None, :]
    trunk, pair = _tower(P, cfg, trunk)
    dec = _decoder(P, cfg, trunk, skips)

    e = "alphagenome/output_embedder"
    e128 = _rms_batch_norm(P, f"{e}/rms_batch_norm", _linear(P, f"{e}/linear", trunk))
    e128 = _sigmoid_gelu(e128 + _organism(P, f"{e}/embed", organism_index)[:, None, :])
    e = "alphagenome/output_embedder_1"
    e1 = _linear(P, f"{e}/linear", dec)
    skip = _linear(P, f"{e}/linear_1", e128, False)
    e1 = e1 + jnp.repeat(skip, e1.shape[1] // skip.shape[1], axis=1)
    e1 = _sigmoid_gelu(_rms_batch_norm(P, f"{e}/rms_batch_norm", e1) + _organism(P, f"{e}/embed", organism_index)[:, None, :])
    ep = (pair + jnp.swapaxes(pair, 1, 2)) / 2.0
    ep = _layer_norm(P, "alphagenome/output_pair/layer_norm", ep, rms=True)
    ep = _sigmoid_gelu(ep + _organism(P, "alphagenome/output_pair/embed", organism_index)[:, None, None, :])
    embeddings = {"embeddings_1bp": e1, "embeddings_128bp": e128, "embeddings_pair": ep}

    out: dict[str, dict[str, jax.Array]] = {}
    for name, spec in HEADS.items():
        m = f"alphagenome/head/{name}"
        if spec.kind == "tracks":
            means = jnp.asarray(track_means[name], jnp.float32)[organism_index]
            out[name] = {}
            for r in spec.resolutions:
                emb = e1 if r == 1 else e128
                y = _multi_organism_linear(P, f"{m}/resolution_{r}/multi_organism_linear", emb, organism_index)
                scale = P.p(f"{m}/resolution_{r}", "learnt_scale").astype(y.dtype)[organism_index]
                scaled = jax.nn.softplus(y) * jax.nn.softplus(scale[:, None, :])
                out[name][f"scaled_predictions_{r}bp"] = scaled
                out[name][f"predictions_{r}bp"] = to_data_space(scaled, means, r, spec.squash)
        elif spec.kind == "contact_maps":
            out[name] = {"predictions": _multi_organism_linear(P, f"{m}/multi_organism_linear", ep, organism_index)}
        elif spec.kind == "splice_classification":
            logits = _multi_organism_linear(P, f"{m}/multi_organism_linear", e1, organism_index)
            out[name] = {"logits": logits, "predictions": jax.nn.softmax(logits.astype(jnp.float32), axis=-1)}
        elif spec.kind == "splice_usage":
            logits = _multi_organism_linear(P, f"{m}/multi_organism_linear", e1, organism_index)
            out[name] = {"logits": logits, "predictions": jax.nn.sigmoid(logits.astype(jnp.float32))}
    t = cfg.channels("splice_sites_junction")
    positions = splice_site_positions
    if positions is None:
        positions = top_splice_sites(
            out["splice_sites_classification"]["predictions"], cfg.num_splice_sites, cfg.splice_site_threshold
        )
    real = jnp.arange(t)[None, :] < jnp.asarray(junction_tissues)[organism_index][:, None]
    out["splice_sites_junction"] = _junctions(P, cfg, e1, jnp.asarray(positions, jnp.int32), organism_index, real)
    if precision == "bfloat16":  # jmp's output=bfloat16
        to_output = lambda a: a.astype(jnp.bfloat16) if jnp.issubdtype(a.dtype, jnp.floating) else a  # noqa: E731
        out, embeddings = jax.tree_util.tree_map(to_output, (out, embeddings))
    return out, embeddings
