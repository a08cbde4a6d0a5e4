"""Llama 2/3, Qwen2 and Mistral: RMSNorm, rotary positions, grouped-query attention,
gated SiLU MLP; Qwen2's q/k/v biases and Mistral's sliding window come from the config."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from models.causal_lm import CausalLM
from models.config import LlamaConfig
from models.layers import MLP, Attention, Embedding, RMSNorm
from models.ops import Ops
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

    def __call__(self, x, rope, ops: Ops, kv):
        """x `[B, T, d]`, rope the (cos, sin) tables of the tokens' positions."""
        u = self.attn_norm(x)
        route = ops.route(layer=self.layer, u=u)
        q, k, v = self.attn.project_qkv(u, ops.matmul)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        o, kv, attn_record = ops.attention(layer=self.layer, route=route, q=q, k=k, v=v, kv=kv,
                                           window=self.sliding_window)
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
