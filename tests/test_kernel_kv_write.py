"""KV-cache write kernel (Pallas interpret mode on the CPU; compiled on a GPU).

Random caches (every slot holds a value, so an unintended write shows), random new K/V and
positions including the first and last slots and out-of-range ones; checked against the XLA
reference and an independent numpy loop, slot by slot.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import write_kv_token, write_kv_token_reference


@pytest.fixture
def rng():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    return np.random.default_rng(seed)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("B, H, S, D", [(1, 1, 1, 8), (3, 5, 17, 24), (4, 8, 64, 128), (2, 32, 9, 64)])
def test_write_matches_references(rng, dtype, B, H, S, D):
    kc, vc = (jnp.asarray(rng.standard_normal((B, H, S, D)), dtype) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((B, H, D)), jnp.float32) for _ in range(2))
    positions = rng.integers(0, S, B)
    positions[0] = S - 1
    if B > 2:
        positions[1], positions[2] = S, -1  # out of range: nothing written
    positions = jnp.asarray(positions, jnp.int32)
    got = write_kv_token(kc, vc, k, v, positions)  # compiled on a GPU, interpreted on a CPU
    ref = write_kv_token_reference(kc, vc, k, v, positions)
    for cache, new, g, r in zip((kc, vc), (k, v), got, ref):
        assert g.dtype == cache.dtype and g.shape == cache.shape
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(r, np.float32))
        expect = np.asarray(cache, np.float32).copy()
        for b, p in enumerate(np.asarray(positions)):
            if 0 <= p < S:
                expect[b, :, p] = np.asarray(new[b].astype(dtype), np.float32)
        np.testing.assert_array_equal(np.asarray(g, np.float32), expect)


def test_bad_arguments():
    kc = jnp.zeros((2, 4, 8, 16))
    k = jnp.ones((2, 4, 16))
    pos = jnp.zeros((2,), jnp.int32)
    with pytest.raises(ValueError, match="k_cache must be"):
        write_kv_token(kc[0], kc[0], k, k, pos)
    with pytest.raises(ValueError, match="differ"):
        write_kv_token(kc, kc[:, :2], k, k, pos)
    with pytest.raises(ValueError, match=r"k must be \[B=2, Hkv=4, D=16\]"):
        write_kv_token(kc, kc, k[:, :3], k, pos)
    with pytest.raises(ValueError, match="positions must be int32"):
        write_kv_token(kc, kc, k, k, pos.astype(jnp.float32))
    with pytest.raises(TypeError, match="cache dtype"):
        write_kv_token(kc.astype(jnp.int32), kc.astype(jnp.int32), k, k, pos)
