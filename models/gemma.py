"""Gemma 2 and Gemma 3 (text): embeddings scaled by sqrt(d); RMSNorms that scale by
(1 + weight), before and after both attention and the MLP; a gated gelu-tanh MLP (GeGLU);
sliding-window layers alternating with global ones (Gemma 2: 1 : 1, Gemma 3: 5 : 1 by
default); scores scaled by `query_pre_attn_scalar`^-1/2. Gemma 2 soft-caps the attention
scores and the final logits (c tanh(s / c)); Gemma 3 RMS-normalises each query and key head
and gives sliding layers their own rotary base. The family's config, model and Hugging Face
mapping."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from flax import nnx

from models import hf_mapping as hfm
from models.causal_lm import CausalLM
from models.config import (
    LAYER_TYPES,
    Fields,
    ModelConfig,
    RopeConfig,
    gated_decoder_fields,
    rope_config,
)
from models.family import Family, Positions
from models.layers import MLP, Attention, Embedding, RMSNorm
from models.ops import Ops, softcap
from models.rope import apply_rope, rope_cos_sin
from polar_jax.errors import PolarJaxError

POSITIONS = Positions(rope_types=("default", "linear"))


@dataclasses.dataclass(frozen=True)
class GemmaConfig(ModelConfig):
    """Gemma 2 and Gemma 3 text."""

    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()  # global layers
    local_rope: RopeConfig = RopeConfig()  # sliding-window layers
    sliding_windows: tuple[int | None, ...] = ()  # per layer; None = global
    query_pre_attn_scalar: float = 256.0
    attention_bias: bool = False
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    qk_norm: bool = False  # Gemma 3


def _ropes(fields: Fields, max_positions: int, head_dim: int) -> tuple[RopeConfig, RopeConfig]:
    """(global, local): Gemma 2's one rope; Gemma 3's per layer type, from `rope_parameters`
    keyed by layer type (transformers v5) or `rope_theta`, `rope_scaling` and
    `rope_local_base_freq` (v4)."""
    read = lambda parameters=None, theta=10000.0: rope_config(
        fields, max_positions, head_dim, POSITIONS.rope_types, parameters=parameters,
        default_theta=theta)
    if fields.model_type == "gemma2":
        rope = read()
        return rope, rope
    parameters = fields.nested("rope_parameters")
    if parameters.has("full_attention") or parameters.has("sliding_attention"):
        return (read(parameters.nested("full_attention"), 1e6),
                read(parameters.nested("sliding_attention"), 1e4))
    return read(theta=1e6), RopeConfig(theta=fields.float("rope_local_base_freq", 1e4))


def parse_config(fields: Fields) -> GemmaConfig:
    gemma2 = fields.model_type == "gemma2"
    base = gated_decoder_fields(fields, head_dim=256, max_positions=8192 if gemma2 else 131072,
                                activation="hidden_activation",
                                default_activation="gelu_pytorch_tanh", tie_word_embeddings=True)
    layers = base["num_layers"]
    if fields.bool("use_bidirectional_attention", False):
        raise PolarJaxError("config.json: 'use_bidirectional_attention' is true (an embedding "
                            "model); only causal Gemma models are supported")
    pattern = 2 if gemma2 else fields.int("sliding_window_pattern", 6)
    layer_types = fields.strs("layer_types", [
        "sliding_attention" if (i + 1) % pattern else "full_attention"
        for i in range(layers)], layers, LAYER_TYPES)
    window = fields.int("sliding_window", 4096)
    rope, local_rope = _ropes(fields, base["max_position_embeddings"], base["head_dim"])
    cap = lambda key, default: (
        (fields.float(key) if fields.has(key) else None) if key in fields.hf else default)
    return GemmaConfig(
        **base,
        rope=rope,
        local_rope=local_rope,
        sliding_windows=tuple(window if t == "sliding_attention" else None for t in layer_types),
        query_pre_attn_scalar=fields.float("query_pre_attn_scalar", 256.0),
        attention_bias=fields.bool("attention_bias", False),
        # An explicit null turns soft-capping off; absent, each version's default.
        attn_logit_softcap=cap("attn_logit_softcapping", 50.0 if gemma2 else None),
        final_logit_softcap=cap("final_logit_softcapping", 30.0 if gemma2 else None),
        qk_norm=not gemma2,
    )


class GemmaBlock(nnx.Module):
    def __init__(self, config: GemmaConfig, layer: int, dtype):
        c = config
        norm = lambda dim: RMSNorm(dim, c.rms_norm_eps, dtype, offset=1.0)
        self.layer = layer
        self.attn_norm = norm(c.hidden_size)
        self.attn = Attention(c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, dtype,
                              qkv_bias=c.attention_bias, out_bias=c.attention_bias)
        self.q_norm = norm(c.head_dim) if c.qk_norm else None
        self.k_norm = norm(c.head_dim) if c.qk_norm else None
        self.post_attn_norm = norm(c.hidden_size)
        self.mlp_norm = norm(c.hidden_size)
        self.mlp = MLP(c.hidden_size, c.mlp_dim, dtype, c.activation, gated=True, bias=False)
        self.post_mlp_norm = norm(c.hidden_size)
        self.sliding_window = c.sliding_windows[layer]
        # The ops scale scores by head_dim^-1/2; Gemma's scale is query_pre_attn_scalar^-1/2.
        self.query_scale = math.sqrt(c.head_dim / c.query_pre_attn_scalar)
        self.logit_softcap = c.attn_logit_softcap

    def __call__(self, x, ropes, ops: Ops, kv):
        """x `[B, T, d]`, ropes the (cos, sin) tables of the tokens' positions for global and
        for sliding-window layers."""
        u = self.attn_norm(x)
        route = ops.route(layer=self.layer, u=u)
        q, k, v = self.attn.project_qkv(u, ops.matmul)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        rope = ropes[self.sliding_window is not None]
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if self.query_scale != 1.0:
            q = (q.astype(jnp.float32) * self.query_scale).astype(q.dtype)
        o, kv, attn_record = ops.attention(layer=self.layer, route=route, q=q, k=k, v=v, kv=kv,
                                           window=self.sliding_window,
                                           logit_softcap=self.logit_softcap)
        x = x + self.post_attn_norm(self.attn.project_out(o, ops.matmul))
        y, mlp_record = ops.mlp(layer=self.layer, route=route, x=self.mlp_norm(x), mlp=self.mlp)
        return x + self.post_mlp_norm(y), kv, attn_record | mlp_record


class GemmaModel(CausalLM):
    def __init__(self, config: GemmaConfig, dtype=jnp.float32):
        c = config
        self.config = config
        self.embed = Embedding(c.vocab_size, c.hidden_size, dtype)
        self.layers = nnx.List([GemmaBlock(c, i, dtype) for i in range(c.num_layers)])
        self.final_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype, offset=1.0)
        self.lm_head = None if c.tie_word_embeddings else Embedding(c.vocab_size, c.hidden_size, dtype)

    def embed_inputs(self, tokens, positions):
        c = self.config
        x = self.embed(tokens)
        # sqrt(d) rounded to the embedding's dtype first, as Hugging Face does
        x = x * jnp.asarray(math.sqrt(c.hidden_size), x.dtype)
        tables = lambda rope: rope_cos_sin(positions, rope, c.head_dim, c.max_position_embeddings)
        full = tables(c.rope)
        return x, (full, full if c.local_rope == c.rope else tables(c.local_rope))

    def final(self, x):
        return self.final_norm(x)

    def logits(self, hidden_states):
        """Final hidden states -> float32 logits, soft-capped (Gemma 2)."""
        return softcap(super().logits(hidden_states), self.config.final_logit_softcap)


def param_specs(c: GemmaConfig) -> hfm.Specs:
    d, n = c.hidden_size, c.mlp_dim
    specs = {"model.embed_tokens.weight": hfm.identity(("embed", "embedding"), (c.vocab_size, d)),
             "model.norm.weight": hfm.identity(("final_norm", "weight"), (d,))}
    if not c.tie_word_embeddings:
        specs["lm_head.weight"] = hfm.identity(("lm_head", "embedding"), (c.vocab_size, d))
    norms = (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "post_attn_norm"),
             ("pre_feedforward_layernorm", "mlp_norm"),
             ("post_feedforward_layernorm", "post_mlp_norm"))
    for i in range(c.num_layers):
        hf, ours = f"model.layers.{i}", ("layers", i)
        for name, at in norms:
            specs[f"{hf}.{name}.weight"] = hfm.identity(ours + (at, "weight"), (d,))
        hfm.attention(specs, f"{hf}.self_attn", ours + ("attn",), c, c.attention_bias,
                      c.attention_bias, "o_proj")
        if c.qk_norm:
            for name in ("q_norm", "k_norm"):
                specs[f"{hf}.self_attn.{name}.weight"] = hfm.identity(ours + (name, "weight"),
                                                                      (c.head_dim,))
        hfm.gate_up(specs, f"{hf}.mlp", ours + ("mlp",), n, d, bias=False)
        specs[f"{hf}.mlp.down_proj.weight"] = hfm.transposed(ours + ("mlp", "w_out"), (d, n))
    return specs


_GEMMA = dict(hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, head_dim=256,
              query_pre_attn_scalar=256, sliding_window=4096, tie_word_embeddings=True)

FAMILY = Family(
    name="Gemma",
    model_types=("gemma2", "gemma3_text"),
    parse_config=parse_config,
    model=GemmaModel,
    param_specs=param_specs,
    param_axes={},
    positions=POSITIONS,
    bench_shapes={
        "gemma-2-9b": dict(_GEMMA, model_type="gemma2", vocab_size=256000, hidden_size=3584,
                           intermediate_size=14336, num_hidden_layers=42,
                           num_attention_heads=16, num_key_value_heads=8,
                           max_position_embeddings=8192),
        "gemma-3-12b": dict(_GEMMA, model_type="gemma3_text", vocab_size=262208,
                            hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
                            num_attention_heads=16, num_key_value_heads=8,
                            max_position_embeddings=131072, sliding_window=1024,
                            rope_parameters={
                                "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                   "rope_theta": 1000000.0},
                                "sliding_attention": {"rope_type": "default",
                                                      "rope_theta": 10000.0}}),
    },
)
