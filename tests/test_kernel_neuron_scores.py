"""Batch neuron-score kernel (Pallas interpret mode on the CPU; compiled on a GPU).

Fresh random router states and weights each run (in h's dtype, or int8 with a scale per
neuron), some rows inactive; the bfloat16 scores are checked against the pure-jnp reference,
the XLA path the evaluation uses (`batch_neuron_scores` of the logits) and float64 numpy, each
to bfloat16 rounding. The output
buffer is poisoned (NaN), so a neuron the kernel does not write is caught.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import neuron_scores, neuron_scores_reference
from pallas_kernels._common import resolve_interpret
from pallas_kernels.neuron_scores import _call, _config, quantize_rows
from pallas_kernels.selection import TIE_BREAK, batch_neuron_scores

BF16_ULP = 2.0**-7  # relative spacing of bfloat16 values: two roundings apart at most


@pytest.fixture
def rng():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    return np.random.default_rng(seed)


def _check_scores(rng, h, w, scale=None):
    """The kernel (poisoned output, some rows inactive) against the reference, the XLA path
    and float64 numpy, to bfloat16 rounding; int8 `w` with its per-neuron `scale`."""
    B, N = h.shape[0], w.shape[0]
    active = rng.random(B) < 0.7
    active[0] = True
    poison = jnp.full((N,), jnp.nan, jnp.bfloat16)
    interpret = resolve_interpret(None)  # compiled on a GPU, interpreted on a CPU
    cfg = tuple(sorted(_config(max(16, B), interpret).items()))
    got = np.asarray(_call(h, w, scale, jnp.asarray(active), poison, tie_break=TIE_BREAK,
                           interpret=interpret, cfg=cfg), np.float32)
    assert np.isfinite(got).all()
    ref = np.asarray(neuron_scores_reference(h, w, jnp.asarray(active), tie_break=TIE_BREAK,
                                             scale=scale), np.float32)
    logits = jnp.einsum("br,nr->bn", h, w.astype(h.dtype), preferred_element_type=jnp.float32,
                        precision="highest")
    xla = np.asarray(batch_neuron_scores(logits[active] * (1.0 if scale is None else scale),
                                         axis=0), np.float32)
    w64 = np.asarray(w, np.float64) * (1.0 if scale is None else np.asarray(scale, np.float64)[:, None])
    l64 = np.asarray(h, np.float64) @ w64.T
    f64 = (active[:, None] * (np.maximum(l64, 0) + TIE_BREAK / (1 + np.exp(-l64)))).sum(0)
    for other in (ref, xla, f64):
        np.testing.assert_allclose(got, other, rtol=BF16_ULP, atol=1e-6)
    np.testing.assert_array_equal(neuron_scores(h, w, jnp.asarray(active), tie_break=TIE_BREAK,
                                                scale=scale).astype(jnp.float32), got)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("B, r, N", [(1, 16, 40), (5, 100, 300), (64, 64, 257), (130, 32, 96)])
def test_scores_match_references(rng, dtype, B, r, N):
    h = jnp.asarray(rng.standard_normal((B, r)), dtype)
    _check_scores(rng, h, jnp.asarray(rng.standard_normal((N, r)) / np.sqrt(r), dtype))


@pytest.mark.parametrize("B, r, N, dtype", [(1, 40, 70, jnp.bfloat16), (3, 100, 300, jnp.bfloat16),
                                            (64, 48, 130, jnp.float32)])
def test_int8_scores_match_references(rng, B, r, N, dtype):
    """int8 rows with a float32 scale per neuron (`quantize_rows`), rows of very different
    magnitudes: the scale is applied to the logits before relu and the tie-break sigmoid (the
    float64 check computes with the dequantized weights)."""
    h = jnp.asarray(rng.standard_normal((B, r)), dtype)
    magnitudes = np.exp(rng.uniform(-3, 1, (N, 1))) / np.sqrt(r)
    q, scale = quantize_rows(rng.standard_normal((N, r)) * magnitudes)
    _check_scores(rng, h, q, scale)


def test_quantize_rows():
    w = np.random.default_rng(0).standard_normal((6, 50)) * np.array([[1e-3], [1], [30], [0], [1], [5]])
    q, scale = quantize_rows(w)
    assert q.dtype == jnp.int8 and scale.dtype == jnp.float32
    q, scale = np.asarray(q, np.float64), np.asarray(scale, np.float64)
    np.testing.assert_allclose(scale, np.abs(w).max(1) / 127, rtol=1e-6)
    assert (np.abs(q).max(1) == [127, 127, 127, 0, 127, 127]).all()
    assert (np.abs(q * scale[:, None] - w) <= scale[:, None] / 2 * (1 + 1e-5)).all()


@pytest.mark.parametrize("int8", [False, True])
def test_inactive_rows_add_nothing(rng, int8):
    h = jnp.asarray(rng.standard_normal((6, 32)), jnp.float32)
    w, scale = jnp.asarray(rng.standard_normal((50, 32)), jnp.float32), None
    if int8:
        w, scale = quantize_rows(w)
    mask = jnp.asarray([True, False, True, False, False, True])
    np.testing.assert_array_equal(
        np.asarray(neuron_scores(h, w, mask, tie_break=TIE_BREAK, scale=scale)),
        np.asarray(neuron_scores(h[mask], w, jnp.ones(3, bool), tie_break=TIE_BREAK, scale=scale)))


def test_bad_arguments():
    h, w, act = jnp.ones((4, 8)), jnp.ones((16, 8)), jnp.ones(4, bool)
    with pytest.raises(ValueError, match=r"h must be \[B, r\]"):
        neuron_scores(h[0], w, act, tie_break=0.0)
    with pytest.raises(ValueError, match="do not chain"):
        neuron_scores(h, w[:, :5], act, tie_break=0.0)
    with pytest.raises(TypeError, match="w_up of h's dtype or int8"):
        neuron_scores(h, w.astype(jnp.bfloat16), act, tie_break=0.0)
    q, scale = quantize_rows(w)
    with pytest.raises(TypeError, match="exactly when w_up is int8"):
        neuron_scores(h, q, act, tie_break=0.0)
    with pytest.raises(TypeError, match="exactly when w_up is int8"):
        neuron_scores(h, w, act, tie_break=0.0, scale=scale)
    with pytest.raises(TypeError, match="scale must be float32"):
        neuron_scores(h, q, act, tie_break=0.0, scale=scale.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match=r"scale must have shape \[N\]"):
        neuron_scores(h, q, act, tie_break=0.0, scale=scale[:3])
    with pytest.raises(ValueError, match="active must have shape"):
        neuron_scores(h, w, act[:3], tie_break=0.0)
