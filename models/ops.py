"""How a block executes its attention and MLP: the ops protocol and its dense implementations.

A block computes its attention input u `[B, T, d]` (the output of its first norm, what the
routers read) and calls, by keyword,

    route = ops.route(layer=i, u=u)
    o, kv, attn_record = ops.attention(layer=i, route=route, q=q, k=k, v=v, kv=kv, window=w,
                                       logit_softcap=c)
    y, mlp_record = ops.mlp(layer=i, route=route, x=x, mlp=mlp)

The projections around them run through `ops.matmul` (`models.layers.xla_matmul`'s
contract). `route` is what the implementation decides from u (router scores; None for dense ops),
computed once per block and handed to both sublayers. Records are dicts of arrays, empty
except where an implementation records (router data collection); the model returns them per
layer. Implementations are frozen dataclasses of traced inputs and static choices, built
afresh for each call of the model, so nothing carries over between layers or steps. Which
kernel or backend runs is chosen here, never in the model:

- `DenseOps`: full sequences (evaluation, prefill): causal attention among the given tokens,
  their K/V written to the first T cache positions when a cache is given (a paged one: the
  valid tokens only);
- `ChunkOps`: a chunk of each sequence's prompt continuing its cache, contiguous or paged
  (the server's chunked prefill), dense: flash attention (cuDNN) on a GPU;
- `DenseDecodeOps`: one token per sequence, written at its position; attention over the
  cache by the Pallas kernel on a GPU, by XLA elsewhere; with a mesh, per shard
  (`per_shard`: the kernels only ever run inside `shard_map`); on one GPU the projections of
  at most `GEMV_ROWS` rows through `skinny_matmul`;
- elsewhere, on the same protocol: `polar_jax.sparsity.SparseDecodeOps` and `MaskedOps`,
  `routers.collect.RecordingOps`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from models import scopes
from models.kv_cache import LayerKV, PagedLayerKV
from models.layers import F32, MLP, xla_matmul
from models.sharding import DATA, MODEL, layer_kv_specs
from pallas_kernels._common import NEG_INF
from pallas_kernels.page_selection import PageRule, select_pages
from pallas_kernels.selection import shard_topk_mask
from pallas_kernels.skinny_matmul import skinny_matmul
from pallas_kernels.sparse_attention import sparse_decode_attention
from pallas_kernels.topk_select import topk_indices

Record = dict[str, jax.Array]
NO_RECORD: Record = {}
# Decode projections of at most this many rows run through `skinny_matmul` on one GPU: at one
# row it streams the weights at 3.2-4.1 TB/s where XLA's GEMV reaches 0.6-3.9 (H200, opt-6.7b
# shapes: Q/K/V 25.8 against 40.2 us, the routers' first projection 5.3 against 14.1); at 16
# rows and more the two are within 2 us.
GEMV_ROWS = 8


class Ops(Protocol):
    """The protocol every block calls (see the module docstring for shapes and order)."""

    def route(self, *, layer: int, u: jax.Array) -> Any:
        """What this layer's attention and MLP select, from its attention input u `[B, T, d]`."""

    def attention(self, *, layer: int, route: Any, q: jax.Array, k: jax.Array, v: jax.Array,
                  kv: LayerKV | PagedLayerKV | None, window: int | None,
                  logit_softcap: float | None
                  ) -> tuple[jax.Array, LayerKV | PagedLayerKV | None, Record]:
        """q `[B, T, Hq, D]`, k, v `[B, T, Hkv, D]` (rotated), the layer's cache or None ->
        (o `[B, T, Hq, D]`, the cache with k, v written, record). `window`: the sliding
        window (None: full attention); `logit_softcap` c: scores s become c tanh(s / c)
        (None: off)."""

    def mlp(self, *, layer: int, route: Any, x: jax.Array, mlp: MLP) -> tuple[jax.Array, Record]:
        """x `[B, T, d]` (the second norm's output) -> (`[B, T, d]`, record)."""

    def matmul(self, x: jax.Array, w: jax.Array, *, contract: int = 1,
               layout: str = "kn") -> jax.Array:
        """A projection, float32 (the contract of `models.layers.xla_matmul`)."""


def on_gpu() -> bool:
    """Whether the Pallas kernels run compiled (else XLA or the Pallas interpreter)."""
    return jax.default_backend() == "gpu"


def softcap(scores, logit_softcap: float | None):
    """`c tanh(s / c)` of the scaled scores (Gemma 2's attention soft-capping); None: as they are."""
    return scores if logit_softcap is None else logit_softcap * jnp.tanh(scores / logit_softcap)


def causal_attention(q, k, v, key_valid, window: int | None = None, scale: float | None = None,
                     logit_softcap: float | None = None):
    """Causal softmax attention over one sequence block, grouped-query aware (XLA).

    q `[B, T, Hq, D]`; k, v `[B, T, Hkv, D]`; key_valid `[B, T]` (False at padding).
    Query i sees key j when j <= i, key j is valid and, with a window W, i - j < W.
    Returns `[B, T, Hq, D]` in q's dtype; rows with no visible key hold unspecified values.
    """
    b, t, hq, d = q.shape
    scores, visible = causal_scores(q, k, key_valid, window, scale, logit_softcap)
    scores = jnp.where(visible[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    o = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=F32)
    return o.reshape(b, t, hq, d).astype(q.dtype)


def causal_scores(q, k, key_valid, window: int | None = None, scale: float | None = None,
                  logit_softcap: float | None = None):
    """`causal_attention`'s float32 scores `[B, Hkv, G, T, T]` (scaled, soft-capped) and which
    keys each query sees `[B, T, T]`."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    scale = d**-0.5 if scale is None else scale
    q = q.reshape(b, t, hkv, hq // hkv, d)
    scores = softcap(jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=F32) * scale,
                     logit_softcap)
    i = jnp.arange(t)[:, None]
    j = jnp.arange(t)[None, :]
    visible = j <= i
    if window is not None:
        visible = visible & (i - j < window)
    return scores, visible[None] & key_valid[:, None, :].astype(bool)


def decode_attention(q, k_cache, v_cache, lengths, window: int | None = None,
                     scale: float | None = None, logit_softcap: float | None = None):
    """One query token per sequence against its KV cache (dense, XLA).

    q `[B, Hq, D]`; k_cache, v_cache `[B, Hkv, S, D]`; row b attends to cache positions
    `[max(0, lengths[b] - window), lengths[b])`. Returns `[B, Hq, D]`, zero where lengths is 0.
    Same contract as `pallas_kernels.sparse_decode_attention` with all groups selected.
    """
    b, hq, d = q.shape
    hkv, s = k_cache.shape[1], k_cache.shape[2]
    scale = d**-0.5 if scale is None else scale
    q = q.reshape(b, hkv, hq // hkv, d)
    scores = softcap(jnp.einsum("bkgd,bksd->bkgs", q, k_cache, preferred_element_type=F32) * scale,
                     logit_softcap)
    pos = jnp.arange(s)[None, :]
    visible = pos < lengths[:, None]
    if window is not None:
        visible = visible & (pos >= lengths[:, None] - window)
    scores = jnp.where(visible[:, None, None, :], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    o = jnp.einsum("bkgs,bksd->bkgd", probs.astype(v_cache.dtype), v_cache,
                   preferred_element_type=F32)
    o = jnp.where((lengths > 0)[:, None, None, None], o, 0.0)
    return o.reshape(b, hq, d).astype(q.dtype)


def kept_pages(rule: PageRule, q, kv: PagedLayerKV, lengths, group_idx, window):
    """Each row's kept groups' pages by `select_pages` (Quest's bound from the summaries of
    the row's pages): q `[B, Hq, D]`, group_idx `[B, k]` (None: every group) -> (page_idx
    `[B, k, pages_per_seq]`, page_count `[B, k]`)."""
    b, hq, d = q.shape
    hkv = kv.k.shape[0]
    if group_idx is None:
        group_idx = jnp.broadcast_to(jnp.arange(hkv, dtype=jnp.int32), (b, hkv))
    rows = jnp.arange(b)[:, None]
    q = q.reshape(b, hkv, hq // hkv, d)[rows, group_idx]  # [B, k, G, D]
    at = (group_idx[:, :, None], kv.block_table[:, None, :])  # [B, k, pages_per_seq]
    return select_pages(rule, q, kv.kmin[at], kv.kmax[at], lengths, kv.page_size, window)


def per_shard(mesh: Mesh | None, fn, in_specs, out_specs):
    """`fn` run on each device's shards of a `data` x `model` mesh (`shard_map`; what `fn`
    returns is its shard of the result), or `fn` itself without a mesh."""
    if mesh is None:
        return fn
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def psum(x, axis: str, mesh: Mesh | None):
    """The sum of x over the mesh axis `axis` inside `per_shard` (x itself without a mesh or
    where the axis has one device: no all-reduce over a group of one)."""
    return x if mesh is None or mesh.shape[axis] == 1 else jax.lax.psum(x, axis)


def group_outputs(o, num_kv_heads: int):
    """o `[B, T, Hq, D]` -> `[B, T, Hkv, (Hq / Hkv) D]`: each KV group's query heads together."""
    b, t, hq, d = o.shape
    return o.reshape(b, t, num_kv_heads, (hq // num_kv_heads) * d)


def keep_groups(o, scores, keep, shards: int = 1):
    """Attention outputs o `[B, T, Hq, D]` with each position's KV groups outside the top
    `keep` of `scores` `[B, T, Hkv]` zeroed, the top taken within each of `shards` slices
    (`shard_topk_mask`); `keep` may be traced."""
    grouped = group_outputs(o, scores.shape[-1])
    selected = shard_topk_mask(scores, keep, shards)
    return jnp.where(selected[..., None], grouped, 0).reshape(o.shape)


def group_output_energy(o, num_kv_heads: int):
    """Each KV group's summed squared attention outputs `[B, T, Hkv]` float32 (the oracle's
    selection score), of o `[B, T, Hq, D]`."""
    return jnp.sum(jnp.square(group_outputs(o, num_kv_heads).astype(F32)), axis=-1)


PROBE_EPS = 1e-6  # inside the log of a local probe's group output norm


def probe_logits(group_logits, probe_w, probe_norm):
    """Group logits `[..., Hkv]` plus a router's local probe term: `probe_w [Hkv]` times the log
    of the groups' output norms over the probe's window, `probe_norm [..., Hkv]` (float32)."""
    return group_logits + probe_w * jnp.log(probe_norm.astype(F32) + PROBE_EPS)


def probe_window_of(window: int | None, probe_window: int) -> int:
    """The positions a router's local probe reads: its last `probe_window`, within the layer's
    own sliding `window` (None: none)."""
    return probe_window if window is None else min(window, probe_window)


def probe_norm(q, k, v, key_valid, window, logit_softcap, probe_window: int):
    """A router's local probe over full sequences (`causal_attention`'s arguments): each KV
    group's output norm `[B, T, Hkv]` float32 of the attention over only the last
    `probe_window` positions."""
    o = causal_attention(q, k, v, key_valid, probe_window_of(window, probe_window),
                         logit_softcap=logit_softcap)
    return jnp.sqrt(group_output_energy(o, k.shape[2]))


def decode_probe_norm(q, kv, lengths, window, logit_softcap, probe_window: int, kernel: bool):
    """`probe_norm` for one decode step: q `[B, Hq, D]` against the cache `kv` (the token
    written), rows of `lengths [B]` -> `[B, Hkv]`. `kernel`: the Pallas kernel over every group
    (reading only the window's blocks), else XLA."""
    window = probe_window_of(window, probe_window)
    if kernel:
        o = sparse_decode_attention(q, kv.k, kv.v, lengths, block_table=kv.block_table,
                                    sliding_window=window, logit_softcap=logit_softcap)
    else:
        o = decode_attention(q, *kv.dense(), lengths, window, logit_softcap=logit_softcap)
    num_groups = kv.k.shape[0] if isinstance(kv, PagedLayerKV) else kv.k.shape[1]
    return jnp.sqrt(group_output_energy(o[:, None], num_groups))[:, 0]


@dataclasses.dataclass(frozen=True)
class DenseOps:
    """Full sequences, dense: key_valid `[B, T]` marks real tokens (False at padding)."""

    key_valid: jax.Array
    matmul = staticmethod(xla_matmul)

    def route(self, *, layer, u):
        return None

    @jax.named_scope(scopes.ATTENTION)
    def attention(self, *, layer, route, q, k, v, kv, window, logit_softcap):
        if isinstance(kv, PagedLayerKV):  # the valid tokens only: padding would enter summaries
            positions = jnp.broadcast_to(jnp.arange(k.shape[1]), k.shape[:2])
            kv = kv.write_chunk(k, v, positions, self.key_valid.astype(bool))
        elif kv is not None:
            write = lambda c, x: jax.lax.dynamic_update_slice(
                c, x.swapaxes(1, 2).astype(c.dtype), (0, 0, 0, 0))
            kv = LayerKV(write(kv.k, k), write(kv.v, v))
        o = causal_attention(q, k, v, self.key_valid, window, logit_softcap=logit_softcap)
        return o, kv, NO_RECORD

    def mlp(self, *, layer, route, x, mlp):
        return mlp(x), NO_RECORD


def flash_attention_backend(dtype, head_dim: int) -> str:
    """The `jax.nn.dot_product_attention` implementation for chunked prefill: cuDNN's fused
    flash attention on a GPU where it takes the shapes (half precision, head dim a multiple of
    8 up to 128), XLA otherwise (which materializes the scores: fine on a CPU)."""
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if on_gpu() and half and head_dim % 8 == 0 and head_dim <= 128 else "xla"


def chunk_attention(q, k_cache, v_cache, positions, window: int | None = None,
                    scale: float | None = None, logit_softcap: float | None = None):
    """A chunk of T query tokens per sequence against its cache, which already holds them:
    query t of row b, at `positions[b, t]`, sees cache positions p <= it (and, with a window W,
    positions[b, t] - p < W). q `[B, T, Hq, D]`; caches `[B, Hkv, S, D]` (a paged cache's
    `dense()` gather). Through `jax.nn.dot_product_attention` with the causal-with-offset
    mask spelled out (`flash_attention_backend`: cuDNN's flash kernel on a GPU); with a
    `logit_softcap`, which neither takes, XLA's einsums."""
    b, t, hq, d = q.shape
    hkv, s = k_cache.shape[1], k_cache.shape[2]
    scale = d**-0.5 if scale is None else scale
    key_pos = jnp.arange(s)[None, None, :]
    query_pos = positions[:, :, None]
    visible = key_pos <= query_pos
    if window is not None:
        visible = visible & (query_pos - key_pos < window)
    if logit_softcap is None:
        keys, values = k_cache.swapaxes(1, 2), v_cache.swapaxes(1, 2)  # [B, S, Hkv, D]
        o = jax.nn.dot_product_attention(q, keys, values, mask=visible[:, None], scale=scale,
                                         implementation=flash_attention_backend(q.dtype, d))
        return o.astype(q.dtype)
    q = q.reshape(b, t, hkv, hq // hkv, d)
    scores = softcap(jnp.einsum("btkgd,bksd->bkgts", q, k_cache, preferred_element_type=F32)
                     * scale, logit_softcap)
    scores = jnp.where(visible[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1)
    o = jnp.einsum("bkgts,bksd->btkgd", probs.astype(v_cache.dtype), v_cache,
                   preferred_element_type=F32)
    return o.reshape(b, t, hq, d).astype(q.dtype)


@dataclasses.dataclass(frozen=True)
class ChunkOps:
    """A chunk of each sequence's prompt continuing its cache (chunked prefill, dense): token
    t of row b goes to cache position `positions[b, t]` where `valid[b, t]` (padding writes
    nothing; a paged cache's pages directly, no row gathered or scattered), then attends to
    the cache up to its own position."""

    positions: jax.Array
    valid: jax.Array
    matmul = staticmethod(xla_matmul)

    def route(self, *, layer, u):
        return None

    @jax.named_scope(scopes.ATTENTION)
    def attention(self, *, layer, route, q, k, v, kv, window, logit_softcap):
        with jax.named_scope(scopes.KV_WRITE):
            kv = kv.write_chunk(k, v, self.positions, self.valid)
        o = chunk_attention(q, *kv.dense(), self.positions, window, logit_softcap=logit_softcap)
        return o, kv, NO_RECORD

    def mlp(self, *, layer, route, x, mlp):
        return mlp(x), NO_RECORD


@dataclasses.dataclass(frozen=True)
class DenseDecodeOps:
    """One new token per sequence (T = 1), written at `positions [B]` for the `active [B]`
    rows, then attending to the cache up to and including it; an inactive row neither writes
    (its slot may be filling from a prefill) nor reads (its output is zeros). With a `mesh`, the cache write and the
    attention run per shard: each device its batch rows (`data`) and its KV groups with their
    query heads (`model`)."""

    positions: jax.Array
    active: jax.Array
    mesh: Mesh | None = dataclasses.field(default=None, kw_only=True)

    def route(self, *, layer, u):
        return None

    def matmul(self, x, w, *, contract=1, layout="kn"):
        """`skinny_matmul` for at most `GEMV_ROWS` rows on one GPU, else XLA (which, under a
        mesh, partitions the projections by the weights' shardings)."""
        rows = math.prod(x.shape[:-contract])
        if self.mesh is not None or not on_gpu() or rows > GEMV_ROWS:
            return xla_matmul(x, w, contract=contract, layout=layout)
        k = math.prod(x.shape[-contract:])
        out_dims = w.shape[contract:] if layout == "kn" else w.shape[:-contract]
        w2 = w.reshape(k, -1) if layout == "kn" else w.reshape(-1, k)
        y = skinny_matmul(x.reshape(rows, k), w2, layout=layout)
        return y.reshape(*x.shape[:-contract], *out_dims)

    @jax.named_scope(scopes.ATTENTION)
    def attention(self, *, layer, route, q, k, v, kv, window, logit_softcap):
        o, kv = self.attend(q, k, v, kv, window, logit_softcap, kernel=on_gpu())
        return o, kv, NO_RECORD

    def attend(self, q, k, v, kv: LayerKV | PagedLayerKV, window, logit_softcap, kernel: bool,
               group_logits=None, keep: int | None = None, pages: PageRule | None = None,
               probe_w=None, probe_window: int | None = None):
        """(o `[B, 1, Hq, D]`, the cache with the token written). With `group_logits [B, Hkv]`
        each row reads only its top-`keep` groups (per shard: its top `keep` of the shard's
        groups), the logits first completed by a local probe of `probe_window` positions
        where `probe_w [Hkv]` is given (`probe_logits`); with a page rule `pages` (a paged
        cache with summaries), each of them only the pages `select_pages` keeps. `kernel`: the
        Pallas kernel (which reads only up to each row's length, pages through the block
        table), else XLA (all groups and pages only)."""
        if pages is not None and not (isinstance(kv, PagedLayerKV) and kv.summaries):
            raise ValueError("page sparsity needs a PagedKVCache with page summaries "
                             "(PagedKVCache.abstract(..., summaries=True))")

        def shard(q, k, v, kv, positions, active, group_logits, probe_w):
            # An inactive row writes nothing (a position outside the cache) and reads nothing
            # (length 0: its output is zeros).
            writes = jnp.where(active, positions, kv.length)
            lengths = jnp.where(active, positions + 1, 0)
            with jax.named_scope(scopes.KV_WRITE):
                kv = kv.write_token(k, v, writes, kernel=on_gpu())
            if group_logits is not None or pages is not None or kernel:
                group_idx = page_idx = page_count = None
                if group_logits is not None:
                    with jax.named_scope(scopes.ATTN_ROUTER):
                        if probe_w is not None:
                            group_logits = probe_logits(group_logits, probe_w, decode_probe_norm(
                                q, kv, lengths, window, logit_softcap, probe_window, kernel))
                        group_idx = topk_indices(group_logits, keep)
                if pages is not None:
                    with jax.named_scope(scopes.PAGE_SELECT):
                        page_idx, page_count = kept_pages(pages, q, kv, lengths, group_idx,
                                                          window)
                o = sparse_decode_attention(q, kv.k, kv.v, lengths, group_idx,
                                            block_table=kv.block_table, sliding_window=window,
                                            logit_softcap=logit_softcap, page_idx=page_idx,
                                            page_count=page_count)
            else:
                o = decode_attention(q, *kv.dense(), lengths, window,
                                     logit_softcap=logit_softcap)
            return o, kv

        heads = P(DATA, MODEL, None)
        cache = None if self.mesh is None else layer_kv_specs(kv, self.mesh)
        o, kv = per_shard(
            self.mesh, shard,
            in_specs=(heads, heads, heads, cache, P(DATA), P(DATA),
                      None if group_logits is None else P(DATA, MODEL),
                      None if probe_w is None else P(MODEL)),
            out_specs=(heads, cache),
        )(q[:, 0], k[:, 0], v[:, 0], kv, self.positions, self.active, group_logits, probe_w)
        return o[:, None], kv

    def mlp(self, *, layer, route, x, mlp):
        return mlp(x, self.matmul), NO_RECORD
