"""Llama 2/3, Qwen2 and Mistral: RMSNorm, rotary positions, grouped-query attention,
gated SiLU MLP; Qwen2's q/k/v biases and Mistral's sliding window come from the config."""

from __future__ import annotations

import functools

import jax.numpy as jnp
from flax import nnx

from models.config import LlamaConfig
from models.layers import (
    MLP, Attention, DenseOps, Embedding, RMSNorm, full_attention, positions_from_mask,
)
from models.rope import apply_rope, rope_cos_sin


class LlamaBlock(nnx.Module):
    def __init__(self, config: LlamaConfig, layer: int, dtype):
        c = config
        self.layer = layer
        self.attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        self.attn = Attention(c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, dtype,
                              qkv_bias=c.attention_bias, out_bias=c.out_proj_bias)
        self.mlp_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        self.mlp = MLP(c.hidden_size, c.mlp_dim, dtype, c.activation, gated=True, bias=c.mlp_bias)
        self.sliding_window = c.sliding_windows[layer]

    def __call__(self, x, cos, sin, ops: DenseOps, kv):
        u = self.attn_norm(x)
        q, k, v = self.attn.project_qkv(u)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o, kv = ops.attention(self.layer, u, q, k, v, kv, self.sliding_window)
        x = x + self.attn.project_out(o)
        return x + ops.mlp(self.layer, u, self.mlp_norm(x), self.mlp), kv


class LlamaModel(nnx.Module):
    def __init__(self, config: LlamaConfig, dtype=jnp.float32):
        c = config
        self.config = config
        self.embed = Embedding(c.vocab_size, c.hidden_size, dtype)
        self.layers = nnx.List([LlamaBlock(c, i, dtype) for i in range(c.num_layers)])
        self.final_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        self.lm_head = None if c.tie_word_embeddings else Embedding(c.vocab_size, c.hidden_size, dtype)

    def hidden(self, tokens, positions, ops: DenseOps, kv_cache=None):
        """Final hidden states `[B, T, d]` and the updated cache; `ops` runs each sublayer."""
        c = self.config
        cos, sin = rope_cos_sin(positions, c.rope, c.head_dim, c.max_position_embeddings)
        x = self.embed(tokens)
        new_cache = []
        for i, block in enumerate(self.layers):
            x, kv = block(x, cos, sin, ops, None if kv_cache is None else kv_cache[i])
            new_cache.append(kv)
        return self.final_norm(x), (None if kv_cache is None else new_cache)

    def logits(self, x):
        """Final hidden states `[..., d]` -> float32 logits `[..., V]`."""
        return (self.lm_head or self.embed).attend(x)

    def __call__(self, tokens, attention_mask):
        """tokens, attention_mask `[B, T]` -> float32 logits `[B, T, V]`."""
        ops = DenseOps(functools.partial(full_attention, key_valid=attention_mask))
        return self.logits(self.hidden(tokens, positions_from_mask(attention_mask), ops)[0])
