"""The decode step over a batch of slots and the prefill that fills them: the functions that
`Decoder.generate`, `bench decode` and a serving loop share, all pure functions of typed state
meant to run inside a jit.

A slot is one row of the KV cache. Its token i sits at cache position i; a step writes each
slot's current token at the slot's position, reads the positions up to it and yields the next
token. Inactive slots run along (the batch has a fixed shape) but neither advance nor count in
the MLP's neuron selection, and write nothing to the cache (a slot may be filling from a
prefill meanwhile).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from models.causal_lm import CausalLM
from models.kv_cache import KVCache
from models.ops import DenseDecodeOps, DenseOps
from models.sharding import tp_size
from polar_jax.sparsity import SparseDecodeOps, SparsityPlan
from routers.model import LayerRouters


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """What a decode step reads and returns, per slot: `tokens` int32 `[B]` (each slot's
    latest token, the next step's input), `positions` int32 `[B]` (where that token goes:
    the slot's length so far), `active` bool `[B]`, and the `kv_cache`."""

    tokens: jax.Array
    positions: jax.Array
    active: jax.Array
    kv_cache: KVCache

    def replace(self, **changes) -> "DecodeState":
        return dataclasses.replace(self, **changes)


def prefill(model: CausalLM, tokens, lengths, kv_cache: KVCache):
    """Dense causal pass over right-padded prompts tokens `[B, T]` of `lengths [B]`, their K/V
    written to cache positions `[0, T)`: (float32 logits `[B, V]` after each prompt's last
    token, the cache)."""
    steps = jnp.arange(tokens.shape[1])[None]
    valid = steps < lengths[:, None]
    # Padding takes its row's last position, so that a row's positions end where its prompt
    # does: longrope chooses its factors by a row's last position.
    positions = jnp.where(valid, steps, jnp.maximum(lengths[:, None] - 1, 0))
    out = model.forward(tokens, positions, DenseOps(valid), kv_cache)
    last = out.hidden_states[jnp.arange(tokens.shape[0]), jnp.maximum(lengths - 1, 0)]
    return model.logits(last), out.kv_cache


class Step(NamedTuple):
    """A decode step's results: the sampled `next_tokens` int32 `[B]`, the float32 `logits`
    `[B, V]` they were sampled from, and the `state` after the step."""

    next_tokens: jax.Array
    logits: jax.Array
    state: DecodeState


def decode_step(model: CausalLM, state: DecodeState, sample: Callable[[jax.Array], jax.Array],
                routers: Sequence[LayerRouters] | None = None, plan: SparsityPlan | None = None,
                mesh: Mesh | None = None) -> Step:
    """Feeds every slot's token at its position and samples the next by `sample(logits)`; in
    the state after it the cache holds the fed tokens and active slots hold the new token one
    position further. Dense without `plan`; with it, Polar Sparsity through the kernels,
    `routers` being `Routers.unstack()`. With a `mesh` (the model, routers and cache placed by
    `models.sharding`), the kernels run per shard."""
    if plan is not None and plan.shards != tp_size(mesh):
        raise ValueError(f"the plan selects per shard of {plan.shards}; the mesh splits the "
                         f"model over {tp_size(mesh)}")
    if plan is None:
        ops = DenseDecodeOps(state.positions, state.active, mesh=mesh)
    else:
        ops = SparseDecodeOps(state.positions, state.active, routers, plan, mesh=mesh)
    out = model.forward(state.tokens[:, None], state.positions[:, None], ops, state.kv_cache)
    logits = model.logits(out.hidden_states[:, 0])
    next_tokens = sample(logits).astype(jnp.int32)
    return Step(next_tokens, logits,
                state.replace(tokens=jnp.where(state.active, next_tokens, state.tokens),
                              positions=state.positions + state.active, kv_cache=out.kv_cache))
