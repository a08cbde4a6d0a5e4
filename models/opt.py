"""OPT: learned positions (offset 2), LayerNorm before (pre-LN) or after (post-LN, as
opt-350m) each sublayer, optional `project_in`/`project_out` around a narrower embedding,
biases, the activation named by `activation_function`, tied `lm_head`."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from models.config import OPTConfig
from models.layers import MLP, Attention, Embedding, LayerNorm, causal_attention, positions_from_mask, _param


class OPTBlock(nnx.Module):
    def __init__(self, config: OPTConfig, dtype):
        c = config
        affine = c.layer_norm_elementwise_affine
        self.attn_norm = LayerNorm(c.hidden_size, dtype, affine)
        self.attn = Attention(c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, dtype,
                              qkv_bias=c.enable_bias, out_bias=c.enable_bias)
        self.mlp_norm = LayerNorm(c.hidden_size, dtype, affine)
        self.mlp = MLP(c.hidden_size, c.mlp_dim, dtype, c.activation, gated=False, bias=c.enable_bias)
        self.pre_ln = c.do_layer_norm_before

    def __call__(self, x, key_valid):
        h = self.attn_norm(x) if self.pre_ln else x
        q, k, v = self.attn.project_qkv(h)
        x = x + self.attn.project_out(causal_attention(q, k, v, key_valid))
        if not self.pre_ln:
            x = self.attn_norm(x)
        h = self.mlp_norm(x) if self.pre_ln else x
        x = x + self.mlp(h)
        return x if self.pre_ln else self.mlp_norm(x)


class OPTModel(nnx.Module):
    def __init__(self, config: OPTConfig, dtype=jnp.float32):
        c = config
        self.config = config
        self.embed = Embedding(c.vocab_size, c.word_embed_proj_dim, dtype)
        self.pos_embed = Embedding(c.max_position_embeddings + c.position_offset, c.hidden_size, dtype)
        projected = c.word_embed_proj_dim != c.hidden_size
        self.project_in = _param((c.word_embed_proj_dim, c.hidden_size), dtype) if projected else None
        self.project_out = _param((c.hidden_size, c.word_embed_proj_dim), dtype) if projected else None
        self.layers = nnx.List([OPTBlock(c, dtype) for _ in range(c.num_layers)])
        affine = c.layer_norm_elementwise_affine
        self.final_norm = LayerNorm(c.hidden_size, dtype, affine) if c.final_layer_norm else None

    def __call__(self, tokens, attention_mask):
        """tokens, attention_mask `[B, T]` -> float32 logits `[B, T, V]`."""
        positions = positions_from_mask(attention_mask)
        x = self.embed(tokens)
        if self.project_in is not None:
            x = jnp.einsum("...e,ed->...d", x, self.project_in[...], preferred_element_type=jnp.float32).astype(x.dtype)
        x = x + self.pos_embed(positions + self.config.position_offset)
        for block in self.layers:
            x = block(x, attention_mask)
        if self.final_norm is not None:
            x = self.final_norm(x)
        if self.project_out is not None:
            x = jnp.einsum("...d,de->...e", x, self.project_out[...], preferred_element_type=jnp.float32).astype(x.dtype)
        return self.embed.attend(x)
