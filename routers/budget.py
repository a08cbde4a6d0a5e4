"""The adaptive attention budget: how many KV groups each layer keeps, calibrated on held-out
tokens so that the average over layers is `attn_topk` of the groups.

Each layer's cost of keeping k groups is the increase of the held-out mean negative
log-likelihood when that layer alone keeps the oracle's top k groups (by attention-output
norm) and every other layer stays dense; the costs are taken to add over layers, and the
counts minimizing their sum at the given total are found exactly by dynamic programming. A
layer may go dense (k = Hkv). Under tensor parallelism over `shards` devices every count is a
multiple of `shards` (each device keeps the same number of its own groups).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from models import ModelConfig
from models.ops import NO_RECORD, DenseOps, group_output_energy, keep_groups
from polar_jax.errors import PolarJaxError
from polar_jax.windows import stream_windows


@dataclasses.dataclass(frozen=True)
class _OracleLayerOps(DenseOps):
    """Dense, except that each layer keeps its oracle top `keep[layer]` groups per shard
    (`keep [L]` int32, traced: one compiled program for every allocation)."""

    num_kv_heads: int
    keep: jax.Array
    shards: int

    def attention(self, *, layer, route, q, k, v, kv, window, logit_softcap):
        o, kv, _ = super().attention(layer=layer, route=route, q=q, k=k, v=v, kv=kv, window=window,
                                     logit_softcap=logit_softcap)
        energy = group_output_energy(o, self.num_kv_heads)
        return keep_groups(o, energy, self.keep[layer], self.shards), kv, NO_RECORD


def allocate(costs: np.ndarray, total: int, step: int) -> tuple[int, ...]:
    """The per-layer counts (multiples of `step` in [step, Hkv]) summing to `total` that
    minimize the summed cost; `costs [L, Hkv + 1]`, costs[l, k] the cost of layer l keeping k
    groups (read at multiples of `step` only). Exact: dynamic programming over the layers."""
    num_layers, num_groups = costs.shape[0], costs.shape[1] - 1
    choices = np.arange(step, num_groups + 1, step)
    units = total // step
    best = np.full(units + 1, np.inf)
    best[0] = 0.0
    picks = []
    for layer in range(num_layers):
        new, pick = np.full(units + 1, np.inf), np.zeros(units + 1, int)
        for k in choices[choices <= total]:
            u = k // step
            cand = np.full(units + 1, np.inf)
            cand[u:] = best[:units + 1 - u] + costs[layer, k]
            better = cand < new
            new[better], pick[better] = cand[better], k
        best = new
        picks.append(pick)
    counts, left = [], units
    for pick in reversed(picks):
        counts.append(int(pick[left]))
        left -= pick[left] // step
    return tuple(reversed(counts))


def budget_total(config: ModelConfig, attn_topk: float, shards: int) -> int:
    """The groups kept summed over layers: `attn_topk` of all layers' groups, rounded to a
    multiple of `shards`, at least `shards` per layer."""
    total = round(attn_topk * config.num_kv_heads * config.num_layers / shards) * shards
    return max(total, shards * config.num_layers)


def calibrate_attn_budget(model, config: ModelConfig, ids: np.ndarray | list[np.ndarray],
                          attn_topk: float, shards: int = 1, seq_len: int = 512,
                          batch_size: int = 8, progress: bool = False) -> tuple[tuple[int, ...], np.ndarray]:
    """(groups kept per layer, the costs `[L, Hkv + 1]`: mean NLL increases, NaN where not
    measured) on the held-out token ids `ids` (one stream or several), cut into windows of
    `seq_len`."""
    groups = config.num_kv_heads
    if groups % shards:
        raise PolarJaxError(f"--tp {shards} must divide the model's {groups} KV groups")
    tokens, mask = stream_windows(ids, seq_len)
    if len(tokens) == 0:
        raise PolarJaxError("the adaptive attention budget needs at least 2 held-out tokens")
    batch_size = min(batch_size, len(tokens))
    pad = -len(tokens) % batch_size
    tokens, mask = (np.concatenate([a, np.zeros((pad, seq_len), np.int32)]) for a in (tokens, mask))
    graphdef, state = nnx.split(model)

    @jax.jit
    def nll(state, keep, tokens, mask):
        ops = _OracleLayerOps(mask, groups, keep, shards)
        return nnx.merge(graphdef, state).nll(tokens, mask, ops)

    def mean_nll(keep_per_shard: np.ndarray) -> float:
        total = count = 0.0
        for start in range(0, len(tokens), batch_size):
            batch_nll, batch_count = nll(state, jnp.asarray(keep_per_shard, jnp.int32),
                                         tokens[start:start + batch_size],
                                         mask[start:start + batch_size])
            total, count = total + float(batch_nll), count + float(batch_count)
        return total / count

    L, per_shard = config.num_layers, groups // shards
    dense = np.full(L, per_shard)
    base = mean_nll(dense)
    costs = np.full((L, groups + 1), np.nan)
    costs[:, groups] = 0.0
    runs = [(layer, k) for layer in range(L) for k in range(1, per_shard)]
    for layer, k in tqdm(runs, desc="budget", unit="run", disable=not progress):
        keep = dense.copy()
        keep[layer] = k
        costs[layer, k * shards] = mean_nll(keep) - base
    counts = allocate(np.nan_to_num(costs, nan=np.inf), budget_total(config, attn_topk, shards),
                      shards)
    return counts, costs
