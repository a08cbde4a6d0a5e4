"""The KV cache: every layer's keys and values in the layout the decode kernels read.

Each layer holds `k` and `v` of `[batch, kv_heads, seq, head_dim]` (`KVCache.AXES`, the
logical axes a sharding rule maps to mesh axes). A sequence's token i sits at `seq` position
i; a decode step writes its token at the sequence's position and reads positions below it.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerKV:
    """One layer's cache: k, v `[batch, kv_heads, seq, head_dim]`."""

    k: jax.Array
    v: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Every layer's `LayerKV`, layer by layer (separate arrays, so a layer's write updates its
    own buffer in place inside a jitted loop)."""

    layers: tuple[LayerKV, ...]

    AXES: ClassVar[tuple[str, ...]] = ("batch", "kv_heads", "seq", "head_dim")

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

    def bytes(self) -> int:
        """Bytes of every layer's keys and values (of a concrete or an abstract cache)."""
        return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(self))

    @property
    def batch(self) -> int:
        return self.layers[0].k.shape[0]

    @property
    def length(self) -> int:
        return self.layers[0].k.shape[2]
