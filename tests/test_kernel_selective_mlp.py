"""Selective MLP kernels (Pallas interpret mode on the CPU).

Fresh random inputs each run (seed from os.urandom, printed on failure); the kernel is checked
against the pure-jnp reference and against an independent float64 numpy computation. Outputs
the kernels do not write stay NaN in interpret mode (uninitialised buffers are NaN-filled), so
`isfinite` on the whole output checks that every element was written. On a GPU the same tests
run the compiled kernels, and the `gpu`-marked cases add real sizes.
"""

from __future__ import annotations

import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import ACTIVATIONS, selective_mlp, selective_mlp_reference

sm = sys.modules["pallas_kernels.selective_mlp"]
common = sys.modules["pallas_kernels._common"]

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2, jnp.float16: 4e-3}

ACT_F64 = {
    "relu": lambda x: np.maximum(x, 0.0),
    "gelu": lambda x: 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0))),
    "gelu_new": lambda x: 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3))),
    "silu": lambda x: x / (1.0 + np.exp(-x)),
}


@pytest.fixture
def rng():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    return np.random.default_rng(seed)


def mlp_f64(x, w_in, b_in, w_out, b_out, idx, act):
    f = lambda a: None if a is None else np.asarray(a, np.float64)
    x, w_in, b_in, w_out, b_out = map(f, (x, w_in, b_in, w_out, b_out))
    idx = np.asarray(idx)
    h = ACT_F64[act](x @ w_in[idx].T + (0.0 if b_in is None else b_in[idx]))
    return h @ w_out[idx] + (0.0 if b_out is None else b_out)


def rel_err(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def make(rng, B, d, N, k, dtype, bias):
    arr = lambda shape, s=1.0: jnp.asarray(rng.standard_normal(shape) * s, dtype)
    x = arr((B, d))
    w_in = arr((N, d), 1 / math.sqrt(d))
    w_out = arr((N, d), 1 / math.sqrt(k))
    b_in = arr((N,)) if bias else None
    b_out = arr((d,)) if bias else None
    idx = jnp.asarray(rng.permutation(N)[:k], jnp.int32)  # distinct, unsorted
    return x, w_in, b_in, w_out, b_out, idx


# B, d, N, k, dtype, activation, bias, up_config, down_config
CASES = [
    # odd sizes (d, N, k not multiples of the tiles), k=1
    (3, 70, 50, 1, jnp.float32, "relu", True, None, None),
    # k = N, d-split and k-split partials combined by the last program (atomics)
    (5, 70, 40, 40, jnp.float32, "gelu", True, dict(splits=2), dict(splits=4)),
    (17, 48, 33, 20, jnp.float32, "gelu_new", False, dict(splits=4), None),
    (2, 64, 64, 37, jnp.float32, "silu", True, None, dict(splits=2, prefetch=True)),
    # half precision
    (8, 128, 96, 48, jnp.bfloat16, "relu", True, dict(splits=2), dict(splits=2)),
    (9, 80, 70, 35, jnp.float16, "gelu", True, None, None),
    (33, 40, 30, 30, jnp.bfloat16, "gelu_new", True, dict(block_m=16), dict(block_m=16)),
]


# The compiled kernels at real sizes (GPU only): B up to 256, d up to 4096, k = 1 to N.
GPU_CASES = [pytest.param(case, marks=pytest.mark.gpu) for case in [
    (1, 1000, 3000, 300, jnp.float16, "relu", True, None, None),
    (5, 4096, 16384, 1638, jnp.float16, "relu", True, None, None),
    (16, 1000, 3000, 3000, jnp.bfloat16, "gelu", True, None, None),
    (64, 512, 2000, 1, jnp.float16, "gelu_new", True, None, None),
    (256, 1024, 4096, 2048, jnp.float16, "relu", True, None, None),
]]


@pytest.mark.parametrize("case", CASES + GPU_CASES, ids=lambda c: f"B{c[0]}-d{c[1]}-N{c[2]}-k{c[3]}-{jnp.dtype(c[4]).name}"
                         f"-{c[5]}{'-bias' if c[6] else ''}"
                         f"-up{(c[7] or {}).get('splits', 1)}-down{(c[8] or {}).get('splits', 1)}")
def test_matches_reference_and_float64(rng, case):
    B, d, N, k, dtype, act, bias, up, down = case
    x, w_in, b_in, w_out, b_out, idx = make(rng, B, d, N, k, dtype, bias)
    out = selective_mlp(x, w_in, b_in, w_out, b_out, idx, activation=act, up_config=up,
                        down_config=down)
    assert out.shape == (B, d) and out.dtype == x.dtype
    assert np.all(np.isfinite(np.asarray(out, np.float64))), "an output element was not written"
    ref = selective_mlp_reference(x, w_in, b_in, w_out, b_out, idx, activation=act)
    exact = mlp_f64(x, w_in, b_in, w_out, b_out, idx, act)
    assert rel_err(out, exact) < TOL[dtype]
    assert rel_err(ref, exact) < TOL[dtype]
    assert rel_err(out, ref) < 2 * TOL[dtype]


def test_order_of_indices_does_not_matter_and_jit(rng):
    x, w_in, b_in, w_out, b_out, idx = make(rng, 4, 48, 40, 24, jnp.float32, True)
    f = jax.jit(lambda i: selective_mlp(x, w_in, b_in, w_out, b_out, i))
    a = f(idx)
    b = f(idx[::-1])
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    exact = mlp_f64(x, w_in, b_in, w_out, b_out, idx, "relu")
    assert rel_err(a, exact) < TOL[jnp.float32]


def test_kernel_gelu_matches_erf():
    x = np.linspace(-12, 12, 20001)
    got = np.asarray(common.gelu_erf_kernel(jnp.asarray(x, jnp.float32)), np.float64)
    want = ACT_F64["gelu"](x)
    assert np.max(np.abs(got - want)) < 2e-6
    assert np.max(np.abs(got - want) / np.maximum(np.abs(want), 1e-3)) < 1e-5


def test_activation_table_covered():
    for name in ("relu", "gelu", "gelu_new", "silu"):
        assert name in ACTIVATIONS
        sm._kernel_activation(name)


def test_config_heuristic():
    u, dn = sm.mlp_config(16, 8192, 3277)
    assert u["splits"] > 1 and dn["splits"] > 1  # small batch: split to fill the GPU
    u, dn = sm.mlp_config(256, 8192, 16384)
    assert (u["block_m"], u["block_n"]) == (128, 128)
    u, dn = sm.mlp_config(3, 64, 64, interpret=True)
    assert u["splits"] == dn["splits"] == 1
    u, dn = sm.mlp_config(3, 64, 64, interpret=True, up=dict(splits=3), down=dict(block_k=20))
    assert u["splits"] == 4 and dn["block_k"] == 32  # powers of two


def _args(B=2, d=16, N=8, k=4, dtype=jnp.float32):
    x = jnp.zeros((B, d), dtype)
    w = jnp.zeros((N, d), dtype)
    return [x, w, jnp.zeros((N,), dtype), w, jnp.zeros((d,), dtype), jnp.arange(k, dtype=jnp.int32)]


def _with(i, v):
    a = _args()
    a[i] = v
    return a


@pytest.mark.parametrize("args,kw,exc,match", [
    (_with(0, jnp.zeros((2, 16, 1))), {}, ValueError, "x must be"),
    (_with(0, jnp.zeros((2, 16), jnp.int32)), {}, TypeError, "x dtype"),
    (_with(1, jnp.zeros((8, 15))), {}, ValueError, "w_in must be"),
    (_with(3, jnp.zeros((16, 8))), {}, ValueError, "w_out must be"),
    (_with(1, jnp.zeros((8, 16), jnp.float16)), {}, TypeError, "w_in dtype"),
    (_with(2, jnp.zeros((7,))), {}, ValueError, "b_in must have shape"),
    (_with(4, jnp.zeros((8,))), {}, ValueError, "b_out must have shape"),
    (_with(5, jnp.arange(4, dtype=jnp.float32)), {}, TypeError, "neuron_idx must be int32"),
    (_with(5, jnp.zeros((2, 2), jnp.int32)), {}, ValueError, "1-D int32"),
    (_with(5, jnp.zeros((0,), jnp.int32)), {}, ValueError, "1 <= k <= N"),
    (_with(5, jnp.zeros((9,), jnp.int32)), {}, ValueError, "1 <= k <= N"),
    (_args(), dict(activation="tanh"), ValueError, "unsupported activation"),
])
def test_argument_errors(args, kw, exc, match):
    with pytest.raises(exc, match=match):
        selective_mlp(*args, **kw)
