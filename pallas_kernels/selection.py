"""The selection rule of Polar Sparsity: which KV groups and MLP neurons a decode step keeps.

- attention: each sequence keeps its top `groups_to_keep(attn_topk, Hkv)` KV groups by its
  router's group logits;
- under tensor parallelism over `shards` devices, each device keeps the top
  `groups_to_keep(attn_topk, Hkv / shards)` of its own groups and the top `per_shard_k(k,
  shards)` of its own neurons (`shard_topk_mask`), so that no shape depends on data;
- MLP (non-gated models): the batch keeps one set of neurons, the top k by
  `batch_neuron_scores`, k calibrated per batch size (`CALIBRATION_BATCH_SIZES`) as the
  smallest multiple of `mlp_topk_step` whose top k covers `COVERAGE_TARGET` of the batch's
  truly active neurons; a layer whose k reaches `DENSE_MLP_FRACTION` of N runs dense.

Ties at the k-th value go to the lowest indices, the set `lax.top_k` chooses. The kernels'
references, the routers' training and calibration, and the sparse ops all import this module;
it imports only JAX.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

TIE_BREAK = 1e-3  # weight of the summed sigmoid in `batch_neuron_scores`
DENSE_MLP_FRACTION = 0.8  # at k >= 0.8 N the dense MLP is as fast; use it
CALIBRATION_BATCH_SIZES = tuple(2**i for i in range(10))  # 1 ... 512
COVERAGE_TARGET = 0.99  # calibrated MLP k: the share of a batch's active neurons it covers


def groups_to_keep(fraction: float, num_groups: int) -> int:
    """k = round(fraction x Hkv), at least 1."""
    return max(1, min(num_groups, round(fraction * num_groups)))


def mlp_topk_step(num_neurons: int) -> int:
    """The granularity of calibrated MLP k: 128, or 8 for MLPs under 2048 neurons."""
    return 8 if num_neurons < 2048 else 128


def order_key(x):
    """int32 keys of x's float32 values whose signed order is the values' order (-0.0 just
    below +0.0). Plain `jax.numpy`: it lowers inside Pallas kernels."""
    bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return bits ^ ((bits >> 31) & jnp.int32(0x7FFFFFFF))


def topk_mask(scores, k: int):
    """Boolean mask of exactly the k largest entries along the last axis, ties at the k-th
    value to the lowest indices (the set `lax.top_k` and `topk_indices` choose). The k-th value
    is found by bisection on the values' bit patterns: 32 counting passes, far cheaper than
    `lax.top_k`'s sort for wide rows on a CPU."""
    # The sign bit flipped: the same order on uint32, so the bounds 0 .. 2^32 - 1 cannot overflow.
    key = lax.bitcast_convert_type(order_key(scores), jnp.uint32) ^ jnp.uint32(1 << 31)

    def halve(_, bounds):  # invariant: count(key >= lo) >= k > count(key > hi)
        lo, hi = bounds
        mid = lo + (hi - lo) // 2 + (hi - lo) % 2
        enough = jnp.sum(key >= mid, axis=-1, keepdims=True) >= k
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid - 1)

    shape = key.shape[:-1] + (1,)
    lo, _ = lax.fori_loop(0, 32, halve, (jnp.zeros(shape, jnp.uint32),
                                         jnp.full(shape, 0xFFFFFFFF, jnp.uint32)))
    above = key > lo
    tie = key == lo
    need = k - jnp.sum(above, axis=-1, keepdims=True)
    return above | (tie & (jnp.cumsum(tie, axis=-1) <= need))


def shard_topk_mask(scores, k: int, shards: int = 1):
    """`topk_mask` within each of `shards` equal, contiguous slices of the last axis: the rule
    of tensor-parallel decode, where each device keeps the top k of its own groups or neurons
    (so every device reads the same bytes). `shards=1` is `topk_mask`."""
    sliced = scores.reshape(*scores.shape[:-1], shards, scores.shape[-1] // shards)
    return topk_mask(sliced, k).reshape(scores.shape)


def per_shard_k(k: int, shards: int) -> int:
    """A global k split over `shards` devices: ceil(k / shards) each."""
    return -(-k // shards)


def neuron_score(logits, tie_break: float = TIE_BREAK):
    """One token's need of each neuron: relu(logits) + tie_break x sigmoid(logits). Plain
    `jax.nn`: it lowers inside Pallas kernels (sigmoid as 1 / (1 + exp(-x)))."""
    return jax.nn.relu(logits) + tie_break * jax.nn.sigmoid(logits)


def batch_neuron_scores(logits, axis: int = -2):
    """How much a batch needs each neuron: the sum over the batch (`axis`) of relu(logits), the
    original's rule, plus `TIE_BREAK` x the summed sigmoid (`neuron_score`). Without the second
    term every neuron that no token scores positive ties at zero and a top-k reaching into them
    picks arbitrarily; with it they are ranked by probability (for one token the order is that
    of the logits). Rounded to bfloat16: three significant digits rank neurons as well as
    seven, and the top-k kernel then searches 16-bit keys, half the passes (exact ties go to
    the lowest index)."""
    return jnp.sum(neuron_score(logits), axis=axis).astype(jnp.bfloat16)
