"""What every family shares: the layer loop over the ops, the logits, and the Hugging Face
style call `model(tokens, attention_mask) -> logits`."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from models.kv_cache import KVCache, PagedKVCache
from models.layers import positions_from_mask
from models.ops import DenseOps, Ops, Record


class Forward(NamedTuple):
    """A forward pass's results: the final hidden states `[B, T, d_out]` (after the final norm
    and any output projection, what the head reads), the updated cache (None without one) and
    each layer's record (`Ops`; empty dicts unless the ops record)."""

    hidden_states: jax.Array
    kv_cache: KVCache | PagedKVCache | None
    records: tuple[Record, ...]


class CausalLM(nnx.Module):
    """A decoder-only model. A family defines `embed_inputs` (token and position
    embeddings), `final` (what follows the last block), `layers` (blocks called as
    `block(x, shared, ops, kv) -> (x, kv, record)`), and the token embedding `embed` and
    `lm_head` (None: tied) the logits read."""

    embed: Any
    layers: nnx.List
    lm_head: Any

    def embed_inputs(self, tokens, positions) -> tuple[jax.Array, Any]:
        """(x `[B, T, d]`, what every block also takes, e.g. the rotary tables)."""
        raise NotImplementedError

    def final(self, x):
        """The last block's output -> the final hidden states."""
        raise NotImplementedError

    def forward(self, tokens, positions, ops: Ops,
                kv_cache: KVCache | PagedKVCache | None = None) -> Forward:
        """tokens, positions `[B, T]` through every block, each sublayer run by `ops`."""
        x, shared = self.embed_inputs(tokens, positions)
        layers_kv, records = [], []
        for i, block in enumerate(self.layers):
            x, kv, record = block(x, shared, ops, None if kv_cache is None else kv_cache.layer(i))
            layers_kv.append(kv)
            records.append(record)
        return Forward(self.final(x), None if kv_cache is None else kv_cache.with_layers(layers_kv),
                       tuple(records))

    def logits(self, hidden_states):
        """Final hidden states `[..., d_out]` -> float32 logits `[..., V]`."""
        return (self.lm_head or self.embed).attend(hidden_states)

    def nll(self, tokens, mask, ops: Ops):
        """(summed negative log-likelihood float32, count) of every token after the first of
        each row of tokens `[B, T]` whose mask `[B, T]` is set, the blocks run by `ops`."""
        hidden_states = self.forward(tokens, positions_from_mask(mask), ops).hidden_states
        logits = self.logits(hidden_states[:, :-1])
        scored = mask[:, 1:].astype(bool)
        logp = jnp.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
        token_nll = jax.nn.logsumexp(logits, axis=-1) - logp
        return jnp.sum(jnp.where(scored, token_nll, 0.0)), jnp.sum(scored)

    def __call__(self, tokens, attention_mask):
        """tokens, attention_mask `[B, T]` -> float32 logits `[B, T, V]`."""
        out = self.forward(tokens, positions_from_mask(attention_mask), DenseOps(attention_mask))
        return self.logits(out.hidden_states)
