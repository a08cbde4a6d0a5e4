"""OPT: learned positions (offset 2), LayerNorm before (pre-LN) or after (post-LN, as
opt-350m) each sublayer, optional `project_in`/`project_out` around a narrower embedding,
biases, the activation named by `activation_function`, tied (or untied) `lm_head`."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from models.causal_lm import CausalLM
from models.config import OPTConfig
from models.layers import F32, MLP, Attention, Embedding, LayerNorm, _param
from models.ops import Ops


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

    def __call__(self, x, shared, ops: Ops, kv):
        """x `[B, T, d]`; OPT's blocks share nothing beyond it (`shared` is None)."""
        u = self.attn_norm(x) if self.pre_ln else x
        route = ops.route(layer=self.layer, u=u)
        q, k, v = self.attn.project_qkv(u, ops.matmul)
        o, kv, attn_record = ops.attention(layer=self.layer, route=route, q=q, k=k, v=v, kv=kv,
                                           window=None)
        x = x + self.attn.project_out(o, ops.matmul)
        if not self.pre_ln:
            x = self.attn_norm(x)
        y, mlp_record = ops.mlp(layer=self.layer, route=route,
                                x=self.mlp_norm(x) if self.pre_ln else x, mlp=self.mlp)
        x = x + y
        return (x if self.pre_ln else self.mlp_norm(x)), kv, attn_record | mlp_record


def _project(x, w):
    """x `[..., a]` @ w `[a, b]`, accumulated in float32, in x's dtype."""
    return jnp.einsum("...a,ab->...b", x, w[...], preferred_element_type=F32).astype(x.dtype)


class OPTModel(CausalLM):
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

    def embed_inputs(self, tokens, positions):
        x = self.embed(tokens)
        if self.project_in is not None:
            x = _project(x, self.project_in)
        return x + self.pos_embed(positions + self.config.position_offset), None

    def final(self, x):
        """`[B, T, d]` -> the final hidden states `[B, T, word_embed_proj_dim]`."""
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x if self.project_out is None else _project(x, self.project_out)
