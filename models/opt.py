"""OPT: learned positions (offset 2), LayerNorm before (pre-LN) or after (post-LN, as
opt-350m) each sublayer, optional `project_in`/`project_out` around a narrower embedding,
biases, the activation named by `activation_function`, tied (or untied) `lm_head`."""

from __future__ import annotations

import functools

import jax.numpy as jnp
from flax import nnx

from models.config import OPTConfig
from models.layers import (
    MLP, Attention, DenseOps, Embedding, LayerNorm, _param, full_attention, positions_from_mask,
)


class OPTBlock(nnx.Module):
    def __init__(self, config: OPTConfig, layer: int, dtype):
        c = config
        self.layer = layer
        affine = c.layer_norm_elementwise_affine
        self.attn_norm = LayerNorm(c.hidden_size, dtype, affine)
        self.attn = Attention(c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, dtype,
                              qkv_bias=c.enable_bias, out_bias=c.enable_bias)
        self.mlp_norm = LayerNorm(c.hidden_size, dtype, affine)
        self.mlp = MLP(c.hidden_size, c.mlp_dim, dtype, c.activation, gated=False, bias=c.enable_bias)
        self.pre_ln = c.do_layer_norm_before

    def __call__(self, x, ops: DenseOps, kv):
        u = self.attn_norm(x) if self.pre_ln else x
        q, k, v = self.attn.project_qkv(u)
        o, kv = ops.attention(self.layer, u, q, k, v, kv, None)
        x = x + self.attn.project_out(o)
        if not self.pre_ln:
            x = self.attn_norm(x)
        h = self.mlp_norm(x) if self.pre_ln else x
        x = x + ops.mlp(self.layer, u, h, self.mlp)
        return (x if self.pre_ln else self.mlp_norm(x)), kv


class OPTModel(nnx.Module):
    def __init__(self, config: OPTConfig, dtype=jnp.float32):
        c = config
        self.config = config
        self.embed = Embedding(c.vocab_size, c.word_embed_proj_dim, dtype)
        self.pos_embed = Embedding(c.max_position_embeddings + c.position_offset, c.hidden_size, dtype)
        projected = c.word_embed_proj_dim != c.hidden_size
        self.project_in = _param((c.word_embed_proj_dim, c.hidden_size), dtype) if projected else None
        self.project_out = _param((c.hidden_size, c.word_embed_proj_dim), dtype) if projected else None
        self.layers = nnx.List([OPTBlock(c, i, dtype) for i in range(c.num_layers)])
        affine = c.layer_norm_elementwise_affine
        self.final_norm = LayerNorm(c.hidden_size, dtype, affine) if c.final_layer_norm else None
        self.lm_head = None if c.tie_word_embeddings else Embedding(c.vocab_size, c.word_embed_proj_dim, dtype)

    def hidden(self, tokens, positions, ops: DenseOps, kv_cache=None):
        """Final hidden states `[B, T, word_embed_proj_dim]` and the updated cache."""
        x = self.embed(tokens)
        if self.project_in is not None:
            x = jnp.einsum("...e,ed->...d", x, self.project_in[...], preferred_element_type=jnp.float32).astype(x.dtype)
        x = x + self.pos_embed(positions + self.config.position_offset)
        new_cache = []
        for i, block in enumerate(self.layers):
            x, kv = block(x, ops, None if kv_cache is None else kv_cache[i])
            new_cache.append(kv)
        if self.final_norm is not None:
            x = self.final_norm(x)
        if self.project_out is not None:
            x = jnp.einsum("...d,de->...e", x, self.project_out[...], preferred_element_type=jnp.float32).astype(x.dtype)
        return x, (None if kv_cache is None else new_cache)

    def logits(self, x):
        """Final hidden states `[..., e]` -> float32 logits `[..., V]`."""
        return (self.lm_head or self.embed).attend(x)

    def __call__(self, tokens, attention_mask):
        """tokens, attention_mask `[B, T]` -> float32 logits `[B, T, V]`."""
        ops = DenseOps(functools.partial(full_attention, key_valid=attention_mask))
        return self.logits(self.hidden(tokens, positions_from_mask(attention_mask), ops)[0])
