"""Top-k selection kernel (Pallas interpret mode on the CPU; compiled on a GPU).

Fresh random scores each run (seed printed on failure), with heavy ties, infinities, negative
values and rows of every length class; the kernel's index set is checked against `lax.top_k`
and against an independent float64 numpy stable sort. The output buffer is poisoned (-1), so
a slot the kernel does not write is caught.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import topk_indices, topk_indices_reference
from pallas_kernels.topk_select import _topk_call, row_chunk
from pallas_kernels._common import resolve_interpret


@pytest.fixture
def rng():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    return np.random.default_rng(seed)


def numpy_topk(x, k):
    """float64 stable sort: the k largest, ties to the lowest index, ascending indices."""
    order = np.argsort(-np.asarray(x, np.float64), axis=-1, kind="stable")
    return np.sort(order[..., :k], axis=-1)


def scores(rng, shape, kind):
    if kind == "ties":  # few distinct values: many ties at the k-th
        x = rng.integers(1, 6, shape) * rng.choice([-1.0, 1.0], shape)
    elif kind == "wide":  # magnitudes across the whole float range
        x = rng.standard_normal(shape) * np.exp(rng.uniform(-30, 30, shape))
    else:
        x = rng.standard_normal(shape)
    x = np.asarray(x, np.float32)
    x.flat[rng.integers(0, x.size)] = np.inf
    x.flat[rng.integers(0, x.size)] = -np.inf
    return x


KINDS = ("normal", "ties", "wide")
# Rows longer than `REGISTER_ROW_MAX` run in chunks inside loops: 33000 scores (the default
# chunks, the last one partial) and short rows in many small chunks (a partial last one, and
# one row that is a whole number of chunks).
CASES = ([(dtype, N, None) for dtype in (np.float32, "bfloat16") for N in (1, 5, 100, 1000, 16384)]
         + [(dtype, 33000, None) for dtype in (np.float32, "bfloat16")]
         + [(np.float32, 1000, 64), ("bfloat16", 1024, 128)])


@pytest.mark.parametrize("dtype, N, chunk", CASES,
                         ids=[f"{np.dtype(d).name if d != 'bfloat16' else d}-{N}"
                              + (f"-chunk{c}" if c else "") for d, N, c in CASES])
def test_topk_matches_references(rng, dtype, N, chunk):
    """float32 rows search 32-bit keys, bfloat16 rows 16-bit keys. One row of each of `KINDS`
    in one call (a compile per k and shape, ~1-3 CPU-seconds interpreted)."""
    if N == 33000 or chunk:
        assert row_chunk(N, chunk) < N  # the chunked path
    x = np.concatenate([scores(rng, (1, N), kind) for kind in KINDS])
    if dtype == "bfloat16":  # the reference sees exactly the values the kernel sees
        x = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
    for k in sorted({1, N, int(rng.integers(1, N + 1))}):
        poison = jnp.full((len(KINDS), k + 1), -1, jnp.int32)
        got = np.asarray(_topk_call(jnp.asarray(x, jnp.dtype(dtype)), poison, k=k, chunk=chunk,
                                    num_warps=4, interpret=resolve_interpret(None)))
        for row, kind in enumerate(KINDS):
            np.testing.assert_array_equal(got[row], numpy_topk(x[row], k),
                                          err_msg=f"N={N} k={k} {kind}")
        np.testing.assert_array_equal(got, np.asarray(topk_indices_reference(jnp.asarray(x), k)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_topk_public_wrapper_dtypes_and_1d(rng, dtype):
    N = int(rng.integers(50, 3000))
    k = int(rng.integers(1, N + 1))
    x = jnp.asarray(rng.standard_normal(N), dtype)
    got = topk_indices(x, k)
    assert got.shape == (k,) and got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), numpy_topk(np.asarray(x, np.float32), k))
    batch = jnp.asarray(rng.standard_normal((7, 32)), dtype)
    np.testing.assert_array_equal(np.asarray(topk_indices(batch, 10)),
                                  numpy_topk(np.asarray(batch, np.float32), 10))


@pytest.mark.parametrize("bad, match", [
    (dict(k=0), "1 <= k <= N"),
    (dict(k=9), "1 <= k <= N"),
    (dict(k=2.0), "must be an int"),
    (dict(x=np.zeros((2, 2, 8), np.float32)), r"\[N\] or \[R, N\]"),
    (dict(x=np.zeros(8, np.int32)), "float32, bfloat16 or float16"),
    (dict(chunk=24), "power of two >= 16"),
    (dict(chunk=8), "power of two >= 16"),
])
def test_topk_bad_arguments(bad, match):
    x = jnp.asarray(bad.get("x", np.zeros(8, np.float32)))
    with pytest.raises((ValueError, TypeError), match=match):
        topk_indices(x, bad.get("k", 3), chunk=bad.get("chunk"))
