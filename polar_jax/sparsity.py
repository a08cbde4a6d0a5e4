"""Polar Sparsity execution: routers choose, per layer, the KV groups each sequence reads and
the MLP neurons the batch computes; a page rule (`PageRule`, page sparsity) the pages of its
KV cache each kept group reads.

Two executions of the same selection rule:
- `SparseDecodeOps`: the decode step, through the Pallas kernels (`sparse_decode_attention`,
  `selective_mlp`); prefill stays dense.
- `MaskedOps`: full-sequence evaluation (`mode="sparse"` with the routers, `mode="oracle"` with
  the true top-k groups and the true active neurons): unselected groups' attention outputs are
  zeroed and unselected neurons' activations dropped, which computes exactly what the kernels
  compute, so perplexity measured here is the decode path's. With a page rule, attention keeps
  per position and group the pages the rule keeps (`page_selection.keep_mask`: Quest's bound
  from the pages' key summaries, or for the oracle the true attention mass), what the decode
  step's selector hands the kernel.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from models import ModelConfig, scopes
from models.layers import F32
from pallas_kernels._common import NEG_INF
from jax.sharding import PartitionSpec as P

from models.ops import (
    NO_RECORD,
    causal_scores,
    DenseDecodeOps,
    DenseOps,
    group_output_energy,
    keep_groups,
    per_shard,
    probe_norm,
    psum,
)
from models.sharding import DATA, MODEL
from pallas_kernels import neuron_scores, selective_mlp, topk_indices
from pallas_kernels.page_selection import PageRule, keep_mask, page_summaries, quest_scores
from pallas_kernels.selection import (
    DENSE_MLP_FRACTION,
    TIE_BREAK,
    CALIBRATION_BATCH_SIZES,
    batch_neuron_scores,
    groups_to_keep,
    per_shard_k,
    shard_topk_mask,
)
from polar_jax import validate
from polar_jax.settings import DEFAULT_ATTN_TOPK
from polar_jax.errors import PolarJaxError
from routers.model import LayerRouters


def attn_topk_of(metadata: dict | None, attn_topk: float | None) -> float:
    """The fraction of KV groups kept: `attn_topk` as given, else the routers' own where they
    carry a calibrated per-layer budget, else `DEFAULT_ATTN_TOPK`."""
    if attn_topk is not None:
        return attn_topk
    if (metadata or {}).get("attn_groups_per_layer") is not None:
        return metadata["attn_topk"]
    return DEFAULT_ATTN_TOPK


@dataclasses.dataclass(frozen=True)
class SparsityPlan:
    """Static per-layer choices, per shard of a tensor-parallel split over `shards` devices
    (1: no split): groups kept per sequence (None: all) and MLP neurons kept (None: dense
    MLP), each out of the shard's own; `pages`: per layer the page rule inside the kept
    groups (None: every page; the tuple None: no page sparsity)."""

    attn_groups: tuple[int | None, ...]
    mlp_neurons: tuple[int | None, ...]
    shards: int = 1
    pages: tuple[PageRule | None, ...] | None = None

    def page_rule(self, layer: int) -> PageRule | None:
        return None if self.pages is None else self.pages[layer]

    @property
    def needs_routers(self) -> bool:
        """Whether any layer selects groups or neurons (a page-only plan needs no routers)."""
        return any(k is not None for k in self.attn_groups + self.mlp_neurons)

    @classmethod
    def build(cls, config: ModelConfig, metadata: dict | None, attn_topk: float | None = None,
              dense_layers=None, mlp_batch_size: int | None = 1, shards: int = 1,
              page_rule: PageRule | None = None) -> "SparsityPlan":
        """From a routers directory's metadata (as `read_metadata` checked it): k groups per
        layer from `attn_topk` (`attn_topk_of`), or the routers' calibrated per-layer budget
        (`attn_groups_per_layer`, for their own `attn_topk` only), and the MLP k calibrated for
        `mlp_batch_size` (the nearest calibrated size at or above it; a size beyond the largest
        calibrated one is refused), each split over `shards` (`selection.per_shard_k`; `shards`
        divides the groups). `dense_layers` stay dense (None: layer 0 for a uniform budget,
        none for a calibrated one), pages included: `page_rule` applies to the others.
        Without routers (`metadata` None), `attn_topk` 1 gives a page-only plan."""
        attn_topk = attn_topk_of(metadata, attn_topk)
        if not 0 < attn_topk <= 1:
            raise PolarJaxError(f"--attn-topk must be in (0, 1], got {attn_topk}")
        if mlp_batch_size is not None:
            validate.integer("the MLP batch size", mlp_batch_size, low=1)
        budget = (metadata or {}).get("attn_groups_per_layer")
        if budget is not None and attn_topk != metadata["attn_topk"]:
            raise PolarJaxError(f"these routers' per-layer attention budget is calibrated for "
                                f"--attn-topk {metadata['attn_topk']:g}, got {attn_topk:g}: use "
                                f"{metadata['attn_topk']:g} or train routers for {attn_topk:g}")
        if dense_layers is None:
            dense_layers = () if budget is not None else (0,)
        bad = [i for i in dense_layers if not 0 <= i < config.num_layers]
        if bad:
            raise PolarJaxError(f"dense layers {bad} out of range: the model has {config.num_layers} layers")
        groups = config.num_kv_heads // shards
        counts = budget or [groups_to_keep(attn_topk, groups) * shards] * config.num_layers
        per_shard = [min(groups, per_shard_k(n, shards)) for n in counts]
        attn = tuple(None if i in dense_layers or k == groups else k
                     for i, k in enumerate(per_shard))
        mlp: tuple[int | None, ...] = (None,) * config.num_layers
        table = (metadata or {}).get("mlp_topk")
        if table and mlp_batch_size is not None and not config.gated_mlp:
            sizes = sorted(int(b) for b in table)
            if mlp_batch_size > sizes[-1]:
                raise PolarJaxError(f"the routers' MLP k is calibrated for batch sizes up to "
                                    f"{sizes[-1]}; got {mlp_batch_size}")
            size = next(b for b in sizes if b >= mlp_batch_size)
            mlp = tuple(None if n >= DENSE_MLP_FRACTION * config.mlp_dim else per_shard_k(n, shards)
                        for n in table[str(size)])
        pages = None if page_rule is None else tuple(
            None if i in dense_layers else page_rule for i in range(config.num_layers))
        return cls(attn, mlp, shards, pages)

    @classmethod
    def per_batch(cls, config: ModelConfig, metadata: dict | None, attn_topk: float | None = None,
                  dense_layers=None, shards: int = 1, page_rule: PageRule | None = None
                  ) -> Callable[[int], "SparsityPlan"]:
        """`build` as a function of the batch size, the one source of every decode program's
        plan (`generate`'s per shape bucket, the engine's per batch bucket, `bench decode`'s
        per row): the MLP's k is calibrated per batch size, the rest is fixed. The settings are
        checked now (at batch 1), not at the first trace; plans are memoized."""
        plan = functools.cache(lambda batch: cls.build(config, metadata, attn_topk, dense_layers,
                                                       batch, shards, page_rule))
        plan(1)
        return plan


def mlp_density_metadata(config: ModelConfig, density: float) -> dict:
    """Routers' metadata keeping `density` of every layer's MLP neurons (rounded to a multiple
    of 128, at least 128) at every calibrated batch size: benchmarks of a given MLP sparsity
    without calibrated routers."""
    k = min(config.mlp_dim, max(128, round(density * config.mlp_dim / 128) * 128))
    return {"mlp_topk": {str(CALIBRATION_BATCH_SIZES[-1]): [k] * config.num_layers}}


class DecodeRoute(NamedTuple):
    """A decode step's router outputs for one layer (each None where the plan does not need
    it): group logits `[B, Hkv]` (float32), the MLP router's low-rank projection `[B, r]`."""

    group_logits: jax.Array | None
    mlp_latent: jax.Array | None


@dataclasses.dataclass(frozen=True)
class SparseDecodeOps(DenseDecodeOps):
    """One decode step (T = 1) with the sparse kernels. Every group's K/V is written to the
    cache (later tokens may select any group); each row then reads only its selected groups
    and the batch's MLP only its selected neurons. `routers`: every layer's `LayerRouters`
    (`Routers.unstack`); `active [B]`: the rows whose scores count in the MLP selection.
    With a `mesh`, the plan's k are per shard (`SparsityPlan.shards` = the mesh's `model`
    size): each device selects among its own groups and neurons, the neuron scores summed
    over the batch's shards first."""

    routers: Sequence[LayerRouters]
    plan: SparsityPlan

    def route(self, *, layer, u):
        if self.plan.attn_groups[layer] is None and self.plan.mlp_neurons[layer] is None:
            return DecodeRoute(None, None)
        routers, mesh = self.routers[layer], self.mesh

        def shard(u, w_in, attn_b):
            """Each device runs the whole projection (the group columns are a sliver beside
            the MLP router's) and keeps its own groups' logits: nothing is exchanged. Left to
            XLA, the split of the logits flowed back into the replicated projection: two
            collective-permutes and an all-gather a layer."""
            group_logits, mlp_latent = dataclasses.replace(routers, w_in=w_in, attn_b=attn_b
                                                           ).project(u, self.matmul)
            if mesh is not None:
                groups = group_logits.shape[-1] // mesh.shape[MODEL]
                group_logits = jax.lax.dynamic_slice_in_dim(
                    group_logits, jax.lax.axis_index(MODEL) * groups, groups, axis=-1)
            return group_logits, mlp_latent

        with jax.named_scope(scopes.ROUTERS):
            # The barrier keeps XLA from merging the router matmul with the QKV projection
            # (same input): that concatenates both weights every step (measured on an H200,
            # opt-6.7b: 62 us per layer), as the concatenation is not hoisted out of the loop.
            return DecodeRoute(*per_shard(mesh, shard, in_specs=(P(DATA, None), P(), P()),
                                          out_specs=(P(DATA, MODEL), None if routers.mlp_up is None
                                                      else P(DATA, None)))(
                jax.lax.optimization_barrier(u[:, 0]), routers.w_in, routers.attn_b))

    @jax.named_scope(scopes.ATTENTION)
    def attention(self, *, layer, route, q, k, v, kv, window, logit_softcap):
        keep = self.plan.attn_groups[layer]
        routers = None if keep is None else self.routers[layer]
        o, kv = self.attend(q, k, v, kv, window, logit_softcap, kernel=True,
                            group_logits=None if keep is None else route.group_logits, keep=keep,
                            pages=self.plan.page_rule(layer),
                            probe_w=None if routers is None else routers.probe_w,
                            probe_window=None if routers is None else routers.probe_window)
        return o, kv, NO_RECORD

    @jax.named_scope(scopes.MLP)
    def mlp(self, *, layer, route, x, mlp):
        keep = self.plan.mlp_neurons[layer]
        if keep is None:
            return mlp(x, self.matmul), NO_RECORD
        mesh, param = self.mesh, (lambda p: None if p is None else p[...])
        b_out = param(mlp.b_out)

        def shard(x, mlp_latent, mlp_up, mlp_up_scale, active, w_in, b_in, w_out):
            """The batch's top-`keep` neurons of this shard's, by their `batch_neuron_scores`
            (summed over the batch's shards; the `neuron_scores` kernel never materialises
            the logits), then the selective MLP over them (summed over the neuron shards)."""
            with jax.named_scope(scopes.MLP_ROUTER):
                if mlp_up_scale is None:  # else int8 rows, read as they are
                    mlp_up = mlp_up.astype(mlp_latent.dtype)
                scores = neuron_scores(mlp_latent, mlp_up, active, tie_break=TIE_BREAK,
                                       scale=mlp_up_scale)
                neuron_idx = topk_indices(psum(scores, DATA, mesh), keep)
            y = selective_mlp(x, w_in, b_in, w_out, b_out if mesh is None else None, neuron_idx,
                              activation=mlp.activation)
            return psum(y, MODEL, mesh)

        rows, routers = P(MODEL, None), self.routers[layer]
        y = per_shard(mesh, shard,
                      in_specs=(P(DATA, None), P(DATA, None), rows,
                                None if routers.mlp_up_scale is None else P(MODEL), P(DATA), rows,
                                None if mlp.b_in is None else P(MODEL), rows),
                      out_specs=P(DATA, None),
                      )(x[:, 0], route.mlp_latent, routers.mlp_up, routers.mlp_up_scale,
                        self.active, param(mlp.w_in), param(mlp.b_in), param(mlp.w_out))
        if mesh is not None and b_out is not None:
            y = (y.astype(F32) + b_out.astype(F32)).astype(y.dtype)
        return y[:, None], NO_RECORD


@dataclasses.dataclass(frozen=True)
class MaskedOps(DenseOps):
    """Full-sequence evaluation that zeroes what the sparse decode path would not compute.

    mode "sparse": each position keeps its router's top-k groups and (non-gated MLPs) the top-k
    neurons of its own router scores, k calibrated for the plan's batch size. mode "oracle":
    the top-k groups by true attention-output norm and the truly active neurons. With a plan
    split over shards, each shard's top k of its own (`shard_topk_mask`), as tensor-parallel
    decode selects. The route is
    the routers' (group logits `[B, T, Hkv]`, neuron logits `[B, T, N]` or None), or None for
    the oracle and for a plan that selects no groups or neurons (page sparsity only).
    `routers`: every layer's `LayerRouters` (`Routers.unstack`), as the decode path reads
    them (an int8 second projection included). `page_size`: the pages of the plan's page rule.
    """

    mode: str
    plan: SparsityPlan
    num_kv_heads: int
    routers: Sequence[LayerRouters] | None = None
    page_size: int = 16

    def __post_init__(self):
        if self.mode not in ("sparse", "oracle"):
            raise PolarJaxError(f"unknown sparsity mode {self.mode!r}; choose dense, sparse or oracle")
        if self.mode == "sparse" and self.routers is None and self.plan.needs_routers:
            raise PolarJaxError("--mode sparse needs --routers")

    def route(self, *, layer, u):
        if self.mode == "oracle" or self.routers is None:
            return None
        return self.routers[layer].scores(u)

    def attention(self, *, layer, route, q, k, v, kv, window, logit_softcap):
        rule = self.plan.page_rule(layer)
        if rule is None:
            o, kv, _ = super().attention(layer=layer, route=route, q=q, k=k, v=v, kv=kv,
                                         window=window, logit_softcap=logit_softcap)
        else:
            o = page_masked_attention(q, k, v, self.key_valid, window, logit_softcap, rule,
                                      self.page_size, oracle=self.mode == "oracle")
        keep = self.plan.attn_groups[layer]
        if keep is None:
            return o, kv, NO_RECORD
        if self.mode == "oracle":
            scores = group_output_energy(o, self.num_kv_heads)
        else:
            routers = self.routers[layer]
            scores = route[0] if routers.probe_w is None else routers.with_probe(
                route[0], probe_norm(q, k, v, self.key_valid, window, logit_softcap,
                                     routers.probe_window))
        return keep_groups(o, scores, keep, self.plan.shards), kv, NO_RECORD

    def mlp(self, *, layer, route, x, mlp):
        keep = self.plan.mlp_neurons[layer]
        if keep is None:
            return mlp(x), NO_RECORD
        h = mlp.activations(x)
        if self.mode == "oracle":
            kept = h > 0
        else:
            scores = batch_neuron_scores(route[1][..., None, :], axis=-2)
            kept = shard_topk_mask(scores, keep, self.plan.shards)
        return mlp.project_out(jnp.where(kept, h, 0.0), x.dtype), NO_RECORD


def page_masked_attention(q, k, v, key_valid, window, logit_softcap, rule: PageRule,
                          page_size: int, oracle: bool = False):
    """Causal attention (`models.ops.causal_attention`'s contract: q `[B, T, Hq, D]`, k, v
    `[B, T, Hkv, D]` -> `[B, T, Hq, D]`) where query t of group h sees only the pages the page
    rule keeps for a sequence of length t + 1: ranked by Quest's bound from the page summaries
    (full pages before t's hold the same keys as the decode step's cache), or with `oracle` by
    the true attention mass of the group's heads."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    scores, visible = causal_scores(q, k, key_valid, window, logit_softcap=logit_softcap)
    if oracle:  # [B, Hkv, G, T, S] -> the group's summed mass per page [B, Hkv, T, P]
        mass = jax.nn.softmax(jnp.where(visible[:, None, None], scores, NEG_INF), axis=-1)
        mass = jnp.pad(mass, [(0, 0)] * 4 + [(0, -t % page_size)])
        page_scores = jnp.sum(mass.reshape(*mass.shape[:-1], -1, page_size), axis=(2, -1))
    else:
        kmin, kmax = page_summaries(k.swapaxes(1, 2), key_valid[:, None].astype(bool), page_size)
        grouped = q.reshape(b, t, hkv, hq // hkv, d).swapaxes(1, 2)  # [B, Hkv, T, G, D]
        page_scores = quest_scores(grouped, kmin, kmax)
    lengths = jnp.arange(1, t + 1, dtype=jnp.int32)
    kept = keep_mask(rule, page_scores, lengths, page_size, window)  # [B, Hkv, T, P]
    kept = kept[..., jnp.arange(t) // page_size]  # [B, Hkv, T, S]
    scores = jnp.where(visible[:, None, None] & kept[:, :, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    o = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=F32)
    return o.reshape(b, t, hq, d).astype(q.dtype)
