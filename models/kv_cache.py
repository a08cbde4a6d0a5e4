"""The KV cache: every layer's keys and values, contiguous or paged, behind one interface.

Two layouts, each a registered pytree with per-layer views that the ops call:

- `KVCache` (contiguous): per layer `k`, `v` of `[batch, kv_heads, seq, head_dim]`; a
  sequence's token i sits at `seq` position i. `generate`, `eval` and `bench decode` use it.
- `PagedKVCache`: per layer a pool of pages `k`, `v` of `[kv_heads, pages, page_size,
  head_dim]` shared by every sequence, and one block table `[batch, pages_per_seq]` (int32,
  shared by the layers): token i of sequence b sits at page `block_table[b, i // page_size]`,
  offset `i % page_size`. The server uses it: a sequence holds only the pages its tokens fill.
  With page sparsity it also keeps page summaries: per layer, page and KV head the per-channel
  min and max of the page's keys, `kmin`, `kmax` `[kv_heads, pages, head_dim]` in the cache
  dtype, updated by every write (a write at offset 0 starts the page afresh: pools reuse
  pages); the decode step's page selector (`pallas_kernels.page_selection`) reads them.

The per-layer views (`LayerKV`, `PagedLayerKV`) share what the ops need: `write_token`,
`write_chunk` (in place inside a jit), `dense()` (the keys and values as `[batch, kv_heads,
seq, head_dim]`, a gather for pages), `block_table` (None when contiguous: the decode kernel
then reads the arrays directly) and `AXES`, their leaves' logical axes for sharding
(`models.sharding`). A position outside the cache writes nothing.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.kv_write import write_kv_token, write_kv_token_reference
from pallas_kernels.sparse_attention import gather_pages


def _bytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerKV:
    """One layer's contiguous cache: k, v `[batch, kv_heads, seq, head_dim]`."""

    k: jax.Array
    v: jax.Array

    AXES: ClassVar[dict[str, tuple[str, ...]]] = {
        "k": ("batch", "kv_heads", "seq", "head_dim"),
        "v": ("batch", "kv_heads", "seq", "head_dim")}
    block_table: ClassVar[None] = None

    @property
    def length(self) -> int:
        return self.k.shape[2]

    def write_token(self, k, v, positions, *, kernel: bool = False) -> "LayerKV":
        """Each row's k, v `[B, Hkv, D]` at `positions [B]` (every group: later tokens may
        select any); `kernel`: one Pallas launch (GPU), else XLA's scatter."""
        write = write_kv_token if kernel else write_kv_token_reference
        return LayerKV(*write(self.k, self.v, k, v, positions))

    def write_chunk(self, k, v, positions, valid) -> "LayerKV":
        """k, v `[B, T, Hkv, D]` at `positions [B, T]` where `valid [B, T]`."""
        rows = jnp.arange(k.shape[0])[:, None]
        at = jnp.where(valid, positions, self.length)  # past the end: dropped
        write = lambda c, x: c.at[rows, :, at].set(x.astype(c.dtype), mode="drop")
        return LayerKV(write(self.k, k), write(self.v, v))

    def dense(self) -> tuple[jax.Array, jax.Array]:
        return self.k, self.v


SUMMARY_AXES = ("kv_heads", "pages", "head_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedLayerKV:
    """One layer's pages k, v `[kv_heads, pages, page_size, head_dim]` seen through the
    `block_table [B, pages_per_seq]` of the sequences at hand, and (page sparsity, else None)
    its page summaries kmin, kmax `[kv_heads, pages, head_dim]`."""

    k: jax.Array
    v: jax.Array
    block_table: jax.Array
    kmin: jax.Array | None = None
    kmax: jax.Array | None = None

    AXES: ClassVar[dict[str, tuple[str, ...]]] = {
        "k": ("kv_heads", "pages", "page", "head_dim"),
        "v": ("kv_heads", "pages", "page", "head_dim"),
        "block_table": ("batch", "pages_per_seq"),
        "kmin": SUMMARY_AXES,
        "kmax": SUMMARY_AXES}

    @property
    def summaries(self) -> bool:
        return self.kmin is not None

    @property
    def page_size(self) -> int:
        return self.k.shape[2]

    @property
    def length(self) -> int:
        """Positions a sequence can hold: its block table's pages."""
        return self.block_table.shape[1] * self.page_size

    def _slots(self, positions, valid):
        """(page, offset) of each position; an invalid or out-of-range one gets the page past
        the pool, which a `mode="drop"` scatter skips."""
        ok = valid & (positions >= 0) & (positions < self.length)
        index = jnp.clip(positions // self.page_size, 0, self.block_table.shape[1] - 1)
        rows = jnp.arange(positions.shape[0]).reshape((-1,) + (1,) * (positions.ndim - 1))
        page = jnp.where(ok, self.block_table[rows, index], self.k.shape[1])
        return page, positions % self.page_size

    def _write(self, k, v, page, offset) -> "PagedLayerKV":
        """k, v `[*idx, Hkv, D]` at pages and offsets of shape idx; the summaries of the pages
        written: reset where a key lands at offset 0, then min / max with the keys."""
        heads_first = lambda x: jnp.moveaxis(x, -2, 0)
        write = lambda c, x: c.at[:, page, offset].set(heads_first(x).astype(c.dtype), mode="drop")
        out = PagedLayerKV(write(self.k, k), write(self.v, v), self.block_table)
        if not self.summaries:
            return out
        keys = heads_first(k).astype(self.kmin.dtype)
        fresh = jnp.where(offset == 0, page, self.k.shape[1])  # the others: dropped
        big = jnp.finfo(self.kmin.dtype).max
        kmin = self.kmin.at[:, fresh].set(big, mode="drop").at[:, page].min(keys, mode="drop")
        kmax = self.kmax.at[:, fresh].set(-big, mode="drop").at[:, page].max(keys, mode="drop")
        return dataclasses.replace(out, kmin=kmin, kmax=kmax)

    def write_token(self, k, v, positions, *, kernel: bool = False) -> "PagedLayerKV":
        del kernel  # one XLA scatter of B rows (a page's rows are not contiguous per group)
        return self._write(k, v, *self._slots(positions, jnp.ones(positions.shape, bool)))

    def write_chunk(self, k, v, positions, valid) -> "PagedLayerKV":
        return self._write(k, v, *self._slots(positions, valid))

    def dense(self) -> tuple[jax.Array, jax.Array]:
        """k, v gathered per sequence: `[B, Hkv, pages_per_seq * page_size, D]`."""
        return gather_pages(self.k, self.block_table), gather_pages(self.v, self.block_table)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Every layer's `LayerKV`, layer by layer (separate arrays, so a layer's write updates its
    own buffer in place inside a jitted loop)."""

    layers: tuple[LayerKV, ...]

    AXES: ClassVar[tuple[str, ...]] = LayerKV.AXES["k"]

    @classmethod
    def abstract(cls, config, batch: int, length: int, dtype) -> "KVCache":
        """The cache of `config` for `batch` sequences of `length` positions, as shapes only
        (`jax.ShapeDtypeStruct`s): what memory checks and `jit(...).lower` take."""
        shape = jax.ShapeDtypeStruct((batch, config.num_kv_heads, length, config.head_dim),
                                     jnp.dtype(dtype))
        return cls(tuple(LayerKV(shape, shape) for _ in range(config.num_layers)))

    @classmethod
    def zeros(cls, config, batch: int, length: int, dtype) -> "KVCache":
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                            cls.abstract(config, batch, length, dtype))

    def layer(self, i: int) -> LayerKV:
        return self.layers[i]

    def with_layers(self, layers) -> "KVCache":
        return KVCache(tuple(layers))

    def bytes(self) -> int:
        """Bytes of every layer's keys and values (of a concrete or an abstract cache)."""
        return _bytes(self)

    @property
    def batch(self) -> int:
        return self.layers[0].k.shape[0]

    @property
    def length(self) -> int:
        return self.layers[0].k.shape[2]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    """Every layer's page pool (`pages`: (k, v) pairs of `[kv_heads, pages, page_size,
    head_dim]`) and the sequences' `block_table [batch, pages_per_seq]`, whose unused entries
    are never read (a sequence reads only below its length); with page sparsity every layer's
    page `summaries` ((kmin, kmax) pairs of `[kv_heads, pages, head_dim]`), else None."""

    pages: tuple[tuple[jax.Array, jax.Array], ...]
    block_table: jax.Array
    summaries: tuple[tuple[jax.Array, jax.Array], ...] | None = None

    @staticmethod
    def page_shape(config, num_pages: int, page_size: int, dtype) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((config.num_kv_heads, num_pages, page_size, config.head_dim),
                                    jnp.dtype(dtype))

    @staticmethod
    def summary_shape(config, num_pages: int, dtype) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((config.num_kv_heads, num_pages, config.head_dim),
                                    jnp.dtype(dtype))

    @classmethod
    def abstract(cls, config, num_pages: int, page_size: int, batch: int, pages_per_seq: int,
                 dtype, summaries: bool = False) -> "PagedKVCache":
        """Shapes only; `summaries`: with page summaries (page sparsity)."""
        shape = cls.page_shape(config, num_pages, page_size, dtype)
        summary = cls.summary_shape(config, num_pages, dtype)
        return cls(tuple((shape, shape) for _ in range(config.num_layers)),
                   jax.ShapeDtypeStruct((batch, pages_per_seq), jnp.int32),
                   tuple((summary, summary) for _ in range(config.num_layers)) if summaries
                   else None)

    @classmethod
    def page_bytes(cls, config, page_size: int, dtype, summaries: bool = False) -> int:
        """Bytes one page takes over every layer, keys and values (and its summaries)."""
        per_layer = 2 * _bytes(cls.page_shape(config, 1, page_size, dtype))
        if summaries:
            per_layer += 2 * _bytes(cls.summary_shape(config, 1, dtype))
        return config.num_layers * per_layer

    def layer(self, i: int) -> PagedLayerKV:
        return PagedLayerKV(*self.pages[i], self.block_table,
                            *(() if self.summaries is None else self.summaries[i]))

    def with_layers(self, layers) -> "PagedKVCache":
        summaries = None if self.summaries is None else tuple((l.kmin, l.kmax) for l in layers)
        return PagedKVCache(tuple((layer.k, layer.v) for layer in layers), self.block_table,
                            summaries)

    def with_block_table(self, block_table) -> "PagedKVCache":
        return dataclasses.replace(self, block_table=block_table)

    def bytes(self) -> int:
        """Bytes of the page pools and summaries (the block table excluded)."""
        return _bytes(self.pages) + _bytes(self.summaries)

    @property
    def num_pages(self) -> int:
        return self.pages[0][0].shape[1]

    @property
    def page_size(self) -> int:
        return self.pages[0][0].shape[2]
