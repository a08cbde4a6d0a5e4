"""Batch neuron-score kernel (Pallas interpret mode on the CPU; compiled on a GPU).

Fresh random router states and weights each run, some rows inactive; the bfloat16 scores are
checked against the pure-jnp reference, the XLA path the evaluation uses
(`batch_neuron_scores` of the logits) and float64 numpy, each to bfloat16 rounding. The output
buffer is poisoned (NaN), so a neuron the kernel does not write is caught.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import neuron_scores, neuron_scores_reference
from pallas_kernels._common import resolve_interpret
from pallas_kernels.neuron_scores import _call, _config
from pallas_kernels.selection import TIE_BREAK, batch_neuron_scores

BF16_ULP = 2.0**-7  # relative spacing of bfloat16 values: two roundings apart at most


@pytest.fixture
def rng():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    return np.random.default_rng(seed)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("B, r, N", [(1, 16, 40), (5, 100, 300), (64, 64, 257), (130, 32, 96)])
def test_scores_match_references(rng, dtype, B, r, N):
    h = jnp.asarray(rng.standard_normal((B, r)), dtype)
    w = jnp.asarray(rng.standard_normal((N, r)) / np.sqrt(r), dtype)
    active = rng.random(B) < 0.7
    active[0] = True
    poison = jnp.full((N,), jnp.nan, jnp.bfloat16)
    interpret = resolve_interpret(None)  # compiled on a GPU, interpreted on a CPU
    cfg = tuple(sorted(_config(max(16, B), interpret).items()))
    got = np.asarray(_call(h, w, jnp.asarray(active), poison, tie_break=TIE_BREAK,
                           interpret=interpret, cfg=cfg), np.float32)
    assert np.isfinite(got).all()
    ref = np.asarray(neuron_scores_reference(h, w, jnp.asarray(active), tie_break=TIE_BREAK),
                     np.float32)
    logits = jnp.einsum("br,nr->bn", h, w, preferred_element_type=jnp.float32, precision="highest")
    xla = np.asarray(batch_neuron_scores(logits[active], axis=0), np.float32)
    l64 = np.asarray(h, np.float64) @ np.asarray(w, np.float64).T
    f64 = (active[:, None] * (np.maximum(l64, 0) + TIE_BREAK / (1 + np.exp(-l64)))).sum(0)
    for other in (ref, xla, f64):
        np.testing.assert_allclose(got, other, rtol=BF16_ULP, atol=1e-6)
    np.testing.assert_array_equal(neuron_scores(h, w, jnp.asarray(active), tie_break=TIE_BREAK)
                                  .astype(jnp.float32), got)


def test_inactive_rows_add_nothing(rng):
    h = jnp.asarray(rng.standard_normal((6, 32)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((50, 32)), jnp.float32)
    mask = jnp.asarray([True, False, True, False, False, True])
    np.testing.assert_array_equal(np.asarray(neuron_scores(h, w, mask, tie_break=TIE_BREAK)),
                                  np.asarray(neuron_scores(h[mask], w, jnp.ones(3, bool),
                                                           tie_break=TIE_BREAK)))


def test_bad_arguments():
    h, w, act = jnp.ones((4, 8)), jnp.ones((16, 8)), jnp.ones(4, bool)
    with pytest.raises(ValueError, match=r"h must be \[B, r\]"):
        neuron_scores(h[0], w, act, tie_break=0.0)
    with pytest.raises(ValueError, match="do not chain"):
        neuron_scores(h, w[:, :5], act, tie_break=0.0)
    with pytest.raises(TypeError, match="share a float dtype"):
        neuron_scores(h, w.astype(jnp.bfloat16), act, tie_break=0.0)
    with pytest.raises(ValueError, match="active must have shape"):
        neuron_scores(h, w, act[:3], tie_break=0.0)
