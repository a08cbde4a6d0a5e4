"""The KV cache: every layer's keys and values, contiguous or paged, behind one interface.

Two layouts, each a registered pytree with per-layer views that the ops call:

- `KVCache` (contiguous): per layer `k`, `v` of `[batch, kv_heads, seq, head_dim]`; a
  sequence's token i sits at `seq` position i. `generate`, `eval` and `bench decode` use it.
- `PagedKVCache`: per layer a pool of pages `k`, `v` of `[kv_heads, pages, page_size,
  head_dim]` shared by every sequence, and one block table `[batch, pages_per_seq]` (int32,
  shared by the layers): token i of sequence b sits at page `block_table[b, i // page_size]`,
  offset `i % page_size`. The server uses it: a sequence holds only the pages its tokens fill.

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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedLayerKV:
    """One layer's pages k, v `[kv_heads, pages, page_size, head_dim]` seen through the
    `block_table [B, pages_per_seq]` of the sequences at hand."""

    k: jax.Array
    v: jax.Array
    block_table: jax.Array

    AXES: ClassVar[dict[str, tuple[str, ...]]] = {
        "k": ("kv_heads", "pages", "page", "head_dim"),
        "v": ("kv_heads", "pages", "page", "head_dim"),
        "block_table": ("batch", "pages_per_seq")}

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
        """k, v `[*idx, Hkv, D]` at pages and offsets of shape idx."""
        heads_first = lambda x: jnp.moveaxis(x, -2, 0)
        write = lambda c, x: c.at[:, page, offset].set(heads_first(x).astype(c.dtype), mode="drop")
        return PagedLayerKV(write(self.k, k), write(self.v, v), self.block_table)

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
    are never read (a sequence reads only below its length)."""

    pages: tuple[tuple[jax.Array, jax.Array], ...]
    block_table: jax.Array

    @staticmethod
    def page_shape(config, num_pages: int, page_size: int, dtype) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((config.num_kv_heads, num_pages, page_size, config.head_dim),
                                    jnp.dtype(dtype))

    @classmethod
    def abstract(cls, config, num_pages: int, page_size: int, batch: int, pages_per_seq: int,
                 dtype) -> "PagedKVCache":
        shape = cls.page_shape(config, num_pages, page_size, dtype)
        return cls(tuple((shape, shape) for _ in range(config.num_layers)),
                   jax.ShapeDtypeStruct((batch, pages_per_seq), jnp.int32))

    @classmethod
    def page_bytes(cls, config, page_size: int, dtype) -> int:
        """Bytes one page takes over every layer, keys and values."""
        return 2 * config.num_layers * _bytes(cls.page_shape(config, 1, page_size, dtype))

    def layer(self, i: int) -> PagedLayerKV:
        return PagedLayerKV(*self.pages[i], self.block_table)

    def with_layers(self, layers) -> "PagedKVCache":
        return PagedKVCache(tuple((layer.k, layer.v) for layer in layers), self.block_table)

    def with_block_table(self, block_table) -> "PagedKVCache":
        return PagedKVCache(self.pages, block_table)

    def bytes(self) -> int:
        """Bytes of the page pools (the block table excluded)."""
        return _bytes(self.pages)

    @property
    def num_pages(self) -> int:
        return self.pages[0][0].shape[1]

    @property
    def page_size(self) -> int:
        return self.pages[0][0].shape[2]
