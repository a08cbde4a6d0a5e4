"""Llama 2/3, Mistral, Qwen2 and Qwen3: RMSNorm, rotary positions, grouped-query attention,
gated MLP; Qwen2's q/k/v biases, Mistral's and Qwen's sliding windows and Qwen3's per-head
q/k RMSNorm come from the config. The family's config, model and Hugging Face mapping (Phi-3,
`models.phi3`, runs this model too)."""

from __future__ import annotations

import dataclasses

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
from models.ops import Ops
from models.rope import apply_rope, rope_cos_sin

POSITIONS = Positions(rope_types=("default", "linear", "dynamic", "llama3"))


@dataclasses.dataclass(frozen=True)
class LlamaConfig(ModelConfig):
    """Llama 2/3, Mistral, Qwen2, Qwen3 and Phi-3."""

    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    attention_bias: bool = False  # q/k/v (and, for Llama and Qwen3, o) projection biases
    out_proj_bias: bool = False
    mlp_bias: bool = False
    sliding_windows: tuple[int | None, ...] = ()  # per layer; None = full attention
    qk_norm: bool = False  # Qwen3: RMSNorm over each query and key head before the rotation

    @property
    def longrope_switch(self) -> int | None:
        rope = self.rope
        return rope.original_max_position_embeddings if rope.rope_type == "longrope" else None


def _sliding_windows(fields: Fields, num_layers: int) -> tuple[int | None, ...]:
    """Per layer, the attention window (None: full attention)."""
    if fields.model_type not in ("mistral", "qwen2", "qwen3"):
        return (None,) * num_layers
    window = fields.int("sliding_window", None)
    if fields.model_type == "mistral":
        return (window,) * num_layers
    max_window_layers = fields.int("max_window_layers", num_layers, low=0)
    layer_types = fields.strs("layer_types", [
        "sliding_attention" if i >= max_window_layers else "full_attention"
        for i in range(num_layers)], num_layers, LAYER_TYPES)
    if not fields.bool("use_sliding_window", False) or window is None:
        return (None,) * num_layers
    return tuple(window if t == "sliding_attention" else None for t in layer_types)


def parse_config(fields: Fields) -> LlamaConfig:
    model_type = fields.model_type
    # Qwen3's head_dim is 128 unless config.json says otherwise (transformers' default).
    base = gated_decoder_fields(fields, head_dim=128 if model_type == "qwen3" else None)
    attention_bias = fields.bool("attention_bias", model_type == "qwen2")
    return LlamaConfig(
        **base,
        rope=rope_config(fields, base["max_position_embeddings"], base["head_dim"],
                         POSITIONS.rope_types),
        attention_bias=attention_bias,
        # Llama and Qwen3 put `attention_bias` on o_proj too; Qwen2 and Mistral never do.
        out_proj_bias=attention_bias and model_type in ("llama", "qwen3"),
        mlp_bias=fields.bool("mlp_bias", False),
        sliding_windows=_sliding_windows(fields, base["num_layers"]),
        qk_norm=model_type == "qwen3",
    )


class LlamaBlock(nnx.Module):
    def __init__(self, config: LlamaConfig, layer: int, dtype):
        c = config
        self.layer = layer
        self.attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        self.attn = Attention(c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, dtype,
                              qkv_bias=c.attention_bias, out_bias=c.out_proj_bias)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype) if c.qk_norm else None
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype) if c.qk_norm else None
        self.mlp_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        self.mlp = MLP(c.hidden_size, c.mlp_dim, dtype, c.activation, gated=True, bias=c.mlp_bias)
        self.sliding_window = c.sliding_windows[layer]

    def __call__(self, x, rope, ops: Ops, kv):
        """x `[B, T, d]`, rope the (cos, sin) tables of the tokens' positions."""
        u = self.attn_norm(x)
        route = ops.route(layer=self.layer, u=u)
        q, k, v = self.attn.project_qkv(u, ops.matmul)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        o, kv, attn_record = ops.attention(layer=self.layer, route=route, q=q, k=k, v=v, kv=kv,
                                           window=self.sliding_window, logit_softcap=None)
        x = x + self.attn.project_out(o, ops.matmul)
        y, mlp_record = ops.mlp(layer=self.layer, route=route, x=self.mlp_norm(x), mlp=self.mlp)
        return x + y, kv, attn_record | mlp_record


class LlamaModel(CausalLM):
    def __init__(self, config: LlamaConfig, dtype=jnp.float32):
        c = config
        self.config = config
        self.embed = Embedding(c.vocab_size, c.hidden_size, dtype)
        self.layers = nnx.List([LlamaBlock(c, i, dtype) for i in range(c.num_layers)])
        self.final_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        self.lm_head = None if c.tie_word_embeddings else Embedding(c.vocab_size, c.hidden_size, dtype)

    def embed_inputs(self, tokens, positions):
        c = self.config
        return self.embed(tokens), rope_cos_sin(positions, c.rope, c.head_dim,
                                                c.max_position_embeddings)

    def final(self, x):
        return self.final_norm(x)


def top_specs(c: LlamaConfig) -> hfm.Specs:
    """The embedding, the final norm and an untied head."""
    specs = {"model.embed_tokens.weight": hfm.identity(("embed", "embedding"),
                                                       (c.vocab_size, c.hidden_size)),
             "model.norm.weight": hfm.identity(("final_norm", "weight"), (c.hidden_size,))}
    if not c.tie_word_embeddings:
        specs["lm_head.weight"] = hfm.identity(("lm_head", "embedding"),
                                               (c.vocab_size, c.hidden_size))
    return specs


def param_specs(c: LlamaConfig) -> hfm.Specs:
    d, n = c.hidden_size, c.mlp_dim
    specs = top_specs(c)
    for i in range(c.num_layers):
        hf, ours = f"model.layers.{i}", ("layers", i)
        specs[f"{hf}.input_layernorm.weight"] = hfm.identity(ours + ("attn_norm", "weight"), (d,))
        specs[f"{hf}.post_attention_layernorm.weight"] = hfm.identity(
            ours + ("mlp_norm", "weight"), (d,))
        hfm.attention(specs, f"{hf}.self_attn", ours + ("attn",), c, c.attention_bias,
                      c.out_proj_bias, "o_proj")
        if c.qk_norm:
            for name in ("q_norm", "k_norm"):
                specs[f"{hf}.self_attn.{name}.weight"] = hfm.identity(ours + (name, "weight"),
                                                                      (c.head_dim,))
        hfm.gate_up(specs, f"{hf}.mlp", ours + ("mlp",), n, d, c.mlp_bias)
        specs[f"{hf}.mlp.down_proj.weight"] = hfm.transposed(ours + ("mlp", "w_out"), (d, n))
        if c.mlp_bias:
            specs[f"{hf}.mlp.down_proj.bias"] = hfm.identity(ours + ("mlp", "b_out"), (d,))
    return specs


_LLAMA = dict(model_type="llama", hidden_act="silu", rms_norm_eps=1e-5, tie_word_embeddings=False)

FAMILY = Family(
    name="Llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    parse_config=parse_config,
    model=LlamaModel,
    param_specs=param_specs,
    param_axes={},
    positions=POSITIONS,
    bench_shapes={
        "llama-2-7b": dict(_LLAMA, vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                           num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                           max_position_embeddings=4096, rope_theta=10000.0),
        "llama-3-8b": dict(_LLAMA, vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                           num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                           max_position_embeddings=8192, rope_theta=500000.0),
        "llama-3.1-70b": dict(_LLAMA, vocab_size=128256, hidden_size=8192,
                              intermediate_size=28672, num_hidden_layers=80,
                              num_attention_heads=64, num_key_value_heads=8,
                              max_position_embeddings=131072,
                              rope_scaling=dict(rope_type="llama3", factor=8.0,
                                                low_freq_factor=1.0, high_freq_factor=4.0,
                                                original_max_position_embeddings=8192),
                              rope_theta=500000.0),
        "qwen2-7b": dict(_LLAMA, model_type="qwen2", vocab_size=152064, hidden_size=3584,
                         intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, max_position_embeddings=32768,
                         rope_theta=1000000.0, rms_norm_eps=1e-6),
        "mistral-7b": dict(_LLAMA, model_type="mistral", vocab_size=32000, hidden_size=4096,
                           intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=8, max_position_embeddings=32768,
                           sliding_window=4096, rope_theta=10000.0),
        # Qwen3-8B: head_dim 128 over 32 query and 8 KV heads, tied only in the small sizes.
        "qwen3-8b": dict(_LLAMA, model_type="qwen3", vocab_size=151936, hidden_size=4096,
                         intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                         rope_theta=1000000.0, rms_norm_eps=1e-6),
    },
)
