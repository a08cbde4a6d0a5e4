"""Polar Sparsity execution: routers choose, per layer, the KV groups each sequence reads and
the MLP neurons the batch computes.

Two executions of the same selection rule:
- `SparseDecodeOps`: the decode step, through the Pallas kernels (`sparse_decode_attention`,
  `selective_mlp`); prefill stays dense.
- `MaskedOps`: full-sequence evaluation (`mode="sparse"` with the routers, `mode="oracle"` with
  the true top-k groups and the true active neurons): unselected groups' attention outputs are
  zeroed and unselected neurons' activations dropped, which computes exactly what the kernels
  compute, so perplexity measured here is the decode path's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from models import ModelConfig, scopes
from models.layers import F32, MLP, DenseOps, write_token
from pallas_kernels import neuron_scores, selective_mlp, sparse_decode_attention, topk_indices
from pallas_kernels.selection import (
    DENSE_MLP_FRACTION,
    TIE_BREAK,
    batch_neuron_scores,
    groups_to_keep,
    topk_mask,
)
from polar_jax import validate
from polar_jax.errors import PolarJaxError
from routers.model import LayerRouters, Routers


@dataclasses.dataclass(frozen=True)
class SparsityPlan:
    """Static per-layer choices: groups kept per sequence (None: all) and MLP neurons kept
    (None: dense MLP)."""

    attn_groups: tuple[int | None, ...]
    mlp_neurons: tuple[int | None, ...]

    @classmethod
    def build(cls, config: ModelConfig, metadata: dict | None, attn_topk: float,
              dense_layers=(0,), mlp_batch_size: int | None = 1) -> "SparsityPlan":
        """From a routers directory's metadata (as `read_metadata` checked it): k groups per
        layer from `attn_topk`, and the MLP k calibrated for `mlp_batch_size` (the nearest
        calibrated size at or above it; a size beyond the largest calibrated one is refused)."""
        if not 0 < attn_topk <= 1:
            raise PolarJaxError(f"--attn-topk must be in (0, 1], got {attn_topk}")
        if mlp_batch_size is not None:
            validate.integer("the MLP batch size", mlp_batch_size, low=1)
        bad = [i for i in dense_layers if not 0 <= i < config.num_layers]
        if bad:
            raise PolarJaxError(f"dense layers {bad} out of range: the model has {config.num_layers} layers")
        k = groups_to_keep(attn_topk, config.num_kv_heads)
        attn = tuple(None if i in dense_layers or k == config.num_kv_heads else k
                     for i in range(config.num_layers))
        mlp: tuple[int | None, ...] = (None,) * config.num_layers
        table = (metadata or {}).get("mlp_topk")
        if table and mlp_batch_size is not None and not config.gated_mlp:
            sizes = sorted(int(b) for b in table)
            if mlp_batch_size > sizes[-1]:
                raise PolarJaxError(f"the routers' MLP k is calibrated for batch sizes up to "
                                    f"{sizes[-1]}; got {mlp_batch_size}")
            size = next(b for b in sizes if b >= mlp_batch_size)
            mlp = tuple(None if n >= DENSE_MLP_FRACTION * config.mlp_dim else n
                        for n in table[str(size)])
        return cls(attn, mlp)


class SparseDecodeOps(DenseOps):
    """One decode step (T = 1) with the sparse kernels. Every group's K/V is written to the
    cache (later tokens may select any group); each row then reads only its selected groups.
    `routers`: every layer's `LayerRouters` (from `Routers.unstack`). Make one per step: it
    keeps each layer's router outputs between the attention and the MLP."""

    def __init__(self, routers: Sequence[LayerRouters], plan: SparsityPlan, positions, active):
        super().__init__(None)
        self.routers, self.plan = routers, plan
        self.positions, self.active = positions, active
        self._outputs: dict[int, tuple] = {}

    def router_outputs(self, layer: int, u):
        """(group logits `[B, Hkv]`, the MLP router's hidden state `[B, r]` or None) of layer
        `layer`, computed once (both routers read the attention input u `[B, d]`)."""
        if layer not in self._outputs:
            with jax.named_scope(scopes.ROUTERS):
                # The barrier keeps XLA from merging the router matmul with the QKV projection
                # (same input): that concatenates both weights every step (measured on an H200,
                # opt-6.7b: 62 us per layer), as the concatenation is not hoisted out of the loop.
                self._outputs[layer] = self.routers[layer].project(jax.lax.optimization_barrier(u))
        return self._outputs[layer]

    @jax.named_scope(scopes.ATTENTION)
    def attention(self, layer, u, q, k, v, kv, window):
        kv = write_token(kv, k, v, self.positions)
        group_idx = None
        if self.plan.attn_groups[layer] is not None:
            group_idx = self.select_groups(layer, u[:, 0], self.plan.attn_groups[layer])
        o = sparse_decode_attention(q[:, 0], kv[0], kv[1], self.positions + 1, group_idx,
                                    sliding_window=window)
        return o[:, None], kv

    @jax.named_scope(scopes.ATTN_ROUTER)
    def select_groups(self, layer: int, u, keep: int):
        """int32 `[B, keep]`: each row's top-`keep` KV groups by its router scores."""
        return topk_indices(self.router_outputs(layer, u)[0], keep)

    @jax.named_scope(scopes.MLP_ROUTER)
    def select_neurons(self, layer: int, u, keep: int):
        """int32 `[keep]`: the batch's top-`keep` neurons by their `batch_neuron_scores`
        (computed by the `neuron_scores` kernel, without materialising the logits), ascending."""
        hidden = self.router_outputs(layer, u)[1]
        scores = neuron_scores(hidden, self.routers[layer].mlp_up.astype(hidden.dtype),
                               self.active, tie_break=TIE_BREAK)
        return topk_indices(scores, keep)

    @jax.named_scope(scopes.MLP)
    def mlp(self, layer, u, x, mlp: MLP):
        keep = self.plan.mlp_neurons[layer]
        if keep is None:
            return mlp(x)
        neuron_idx = self.select_neurons(layer, u[:, 0], keep)
        param = lambda p: None if p is None else p[...]
        y = selective_mlp(x[:, 0], param(mlp.w_in), param(mlp.b_in), param(mlp.w_out),
                          param(mlp.b_out), neuron_idx, activation=mlp.activation)
        return y[:, None]


class MaskedOps(DenseOps):
    """Full-sequence evaluation that zeroes what the sparse decode path would not compute.

    mode "sparse": each position keeps its router's top-k groups and (non-gated MLPs) the top-k
    neurons of its own router scores, k calibrated for the plan's batch size. mode "oracle":
    the top-k groups by true attention-output norm and the truly active neurons.
    """

    def __init__(self, attend, mode: str, plan: SparsityPlan, num_kv_heads: int,
                 routers: Routers | None = None):
        super().__init__(attend)
        if mode not in ("sparse", "oracle"):
            raise PolarJaxError(f"unknown sparsity mode {mode!r}; choose dense, sparse or oracle")
        if mode == "sparse" and routers is None:
            raise PolarJaxError("--mode sparse needs --routers")
        self.mode, self.plan, self.routers, self.num_kv_heads = mode, plan, routers, num_kv_heads

    def attention(self, layer, u, q, k, v, kv, window):
        o, kv = self.attend(q, k, v, kv, window)
        keep = self.plan.attn_groups[layer]
        if keep is None:
            return o, kv
        b, t, hq, d = o.shape
        grouped = o.reshape(b, t, self.num_kv_heads, (hq // self.num_kv_heads) * d)
        if self.mode == "sparse":
            scores = self.routers.attn_scores(u, layer)
        else:
            scores = jnp.sum(jnp.square(grouped.astype(F32)), axis=-1)
        selected = topk_mask(scores, keep)  # [B, T, Hkv]
        o = jnp.where(selected[..., None], grouped, 0).reshape(b, t, hq, d)
        return o, kv

    def mlp(self, layer, u, x, mlp: MLP):
        keep = self.plan.mlp_neurons[layer]
        if keep is None:
            return mlp(x)
        if self.mode == "oracle":
            h = mlp.hidden(x)
            return mlp.project_out(jnp.where(h > 0, h, 0.0), x.dtype)
        scores = batch_neuron_scores(self.routers.mlp_scores(u, layer)[..., None, :], axis=-2)
        h = mlp.hidden(x)
        return mlp.project_out(jnp.where(topk_mask(scores, keep), h, 0.0), x.dtype)
