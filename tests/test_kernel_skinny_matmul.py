"""Skinny decode matmul kernel (Pallas interpret mode on the CPU; compiled on a GPU).

Fresh random inputs each run (seed printed on failure): both weight layouts, rows from 1 to
`MAX_ROWS` that are not powers of two, K and N that no tile divides, several K-splits; checked
against a float64 numpy product. The output buffer is poisoned (NaN), so a partial the kernel
does not write is caught.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.skinny_matmul import (
    MAX_ROWS, _call, skinny_config, skinny_matmul, skinny_matmul_reference,
)
from pallas_kernels._common import resolve_interpret


@pytest.fixture
def rng():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    return np.random.default_rng(seed)


def _inputs(rng, M, K, N, layout, dtype):
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((K, N) if layout == "kn" else (N, K)).astype(np.float32)
    x, w = jnp.asarray(x, dtype), jnp.asarray(w, dtype)
    # The float64 product of exactly the values the kernel reads.
    w64 = np.asarray(w.astype(jnp.float32), np.float64)
    ref = np.asarray(x.astype(jnp.float32), np.float64) @ (w64 if layout == "kn" else w64.T)
    return x, w, ref


def _check(y, ref, K):
    # float32 accumulation over K products of O(1) terms: error grows like sqrt(K).
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=0, atol=1e-5 * np.sqrt(K) * 4)


@pytest.mark.parametrize("layout", ["kn", "nk"])
@pytest.mark.parametrize("M, K, N, splits", [(1, 96, 80, 1), (3, 200, 50, 2), (17, 64, 33, 4),
                                             (MAX_ROWS, 40, 70, 1)])
def test_skinny_matmul_matches_float64(rng, layout, M, K, N, splits):
    """Every partial of every split is written (poisoned buffer) and their sum is x @ w."""
    x, w, ref = _inputs(rng, M, K, N, layout, jnp.float32)
    cfg = skinny_config(M, K, N, layout=layout, interpret=resolve_interpret(None),
                        overrides=dict(splits=splits, block_k=16, block_n=16))
    poison = jnp.full((splits, M, N), jnp.nan, jnp.float32)
    y = _call(x, w, poison, layout=layout, interpret=resolve_interpret(None),
              cfg=tuple(sorted(cfg.items())))
    assert y.shape == (M, N) and y.dtype == jnp.float32
    _check(y, ref, K)
    np.testing.assert_allclose(np.asarray(skinny_matmul_reference(x, w, layout=layout)), ref,
                               rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_skinny_matmul_half_precision_accumulates_in_float32(rng, dtype):
    x, w, ref = _inputs(rng, 5, 300, 90, "nk", dtype)
    _check(skinny_matmul(x, w, layout="nk"), ref, 300)


@pytest.mark.gpu
@pytest.mark.parametrize("M", [1, 5, 16, 64])
@pytest.mark.parametrize("K, N, layout", [(4096, 12288, "kn"), (4096, 4096, "kn"),
                                          (4096, 1056, "kn"), (16384, 4096, "kn"),
                                          (4096, 16384, "nk")])
def test_skinny_matmul_compiled_at_decode_shapes(rng, M, K, N, layout):
    """The compiled kernel with its own tiles and splits at opt-6.7b's decode shapes."""
    x, w, ref = _inputs(rng, M, K, N, layout, jnp.bfloat16)
    _check(skinny_matmul(x, w, layout=layout), ref, K)


@pytest.mark.parametrize("x_shape, w_shape, layout, dtypes, message", [
    ((2, 8), (8, 4), "mk", (jnp.float32, jnp.float32), "layout must be one of"),
    ((2, 8), (9, 4), "kn", (jnp.float32, jnp.float32), "do not chain"),
    ((2, 8), (4, 9), "nk", (jnp.float32, jnp.float32), "do not chain"),
    ((2, 8, 1), (8, 4), "kn", (jnp.float32, jnp.float32), "must be 2-D"),
    ((MAX_ROWS + 1, 8), (8, 4), "kn", (jnp.float32, jnp.float32), "at most"),
    ((2, 8), (8, 4), "kn", (jnp.float32, jnp.bfloat16), "share a float dtype"),
    ((2, 8), (8, 4), "kn", (jnp.int32, jnp.int32), "share a float dtype"),
])
def test_skinny_matmul_refuses_bad_arguments(x_shape, w_shape, layout, dtypes, message):
    x, w = jnp.zeros(x_shape, dtypes[0]), jnp.zeros(w_shape, dtypes[1])
    with pytest.raises((ValueError, TypeError), match=message):
        skinny_matmul(x, w, layout=layout)
