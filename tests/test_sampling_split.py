"""Sampling over a vocabulary split by the mesh (dp 2 x tp 2 of the CPU devices) draws what
one device draws from the same logits, keys and settings: greedy rows, top-k and nuclei cut
within the gathered candidates, and cuts beyond them (radix selects over the split values)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from models.ops import per_shard
from models.sharding import DATA, MODEL, make_mesh
from polar_jax import sampling
from polar_jax.bench.collectives import Collective, collectives
from polar_jax.sampling import SamplingParams, argmax, next_token, sample_rows

RNG = np.random.default_rng()
VOCAB = 96  # 48 a device
CANDIDATES = 6  # a device's, so that some cuts lie beyond them
# Per row (temperature, top_k, top_p). Rows 0-3 (the first `data` shard) are cut within the
# candidates: greedy, a top-k of at most 6, a narrow nucleus (the distributions are peaked),
# no cut. Rows 4-7 also beyond them: top-k 30, a nucleus of nearly everything, top-k past V.
SETTINGS = [(0.0, 0, 1.0), (1.0, 5, 1.0), (0.7, 0, 0.3), (1.3, 0, 1.0),
            (1.0, 30, 1.0), (2.0, 0, 0.99), (0.9, 3, 0.8), (1.0, 500, 0.9)]


def _logits(mesh):
    logits = RNG.standard_normal((len(SETTINGS), VOCAB)).astype(np.float32)
    scales = np.linspace(0.5, 6, len(SETTINGS), dtype=np.float32)  # flat to peaked rows
    logits *= scales[RNG.permutation(len(SETTINGS))][:, None]
    return jax.device_put(logits, NamedSharding(mesh, P(DATA, MODEL))), logits


def test_split_sampling_draws_what_one_device_draws():
    mesh = make_mesh(tp=2, dp=2)
    params = SamplingParams(*(np.asarray(column, dtype) for column, dtype in
                              zip(zip(*SETTINGS), (np.float32, np.int32, np.float32))))
    column = lambda x: jnp.asarray(x)[:, None]

    @jax.jit
    def split(logits, seeds, positions):
        keys = jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(seeds, positions)
        noise = jax.vmap(lambda key: jax.random.gumbel(key, (VOCAB,), jnp.float32))(keys)
        few = sampling._sample_split(logits, noise, SamplingParams(
            column(params.temperature), column(params.top_k), column(params.top_p)), mesh,
            candidates=CANDIDATES)
        return few, sample_rows(logits, params, seeds, positions, mesh), argmax(logits, mesh)

    one = jax.jit(sample_rows)
    drawn = 0
    for _ in range(4):
        logits, host = _logits(mesh)
        seeds = RNG.integers(0, 2**31, len(SETTINGS)).astype(np.uint32)
        positions = RNG.integers(0, 1000, len(SETTINGS)).astype(np.int32)
        expected = np.asarray(one(jnp.asarray(host), params, seeds, positions))
        few, default, greedy = (np.asarray(x) for x in split(logits, seeds, positions))
        np.testing.assert_array_equal(few, expected)
        np.testing.assert_array_equal(default, expected)
        np.testing.assert_array_equal(greedy, host.argmax(axis=1))
        drawn += int((expected != host.argmax(axis=1)).sum())
    assert drawn > 0  # the settings did sample, not only take the argmax


def test_split_next_token_equals_one_devices():
    """`next_token` (one key for the batch): a nucleus with top-k, and greedy."""
    mesh = make_mesh(tp=2, dp=2)
    logits, host = _logits(mesh)
    key = jax.random.key(int(RNG.integers(1 << 30)))
    for params in (SamplingParams(1.2, 40, 0.9), SamplingParams(0.0, 0, 1.0)):
        params = params.validated()
        split = jax.jit(functools.partial(next_token, mesh=mesh))(logits, params, key)
        one = jax.jit(next_token)(jnp.asarray(host), params, key)
        np.testing.assert_array_equal(np.asarray(split), np.asarray(one))


def test_split_cutoff_equals_one_devices():
    """The radix selects over 4 shards find one device's cut (`_cutoff` over the whole sorted
    row) exactly, for any top-k and top-p, with and without ties among the values."""
    mesh = make_mesh(tp=4)
    rows, vocab = 48, 4 * 40

    def split(scaled, k, top_p):
        def shard(scaled, k, top_p):
            top = jax.lax.pmax(jnp.max(scaled, axis=1, keepdims=True), MODEL)
            return sampling._split_cutoff(scaled, top, k, top_p)
        return per_shard(mesh, shard, (P(None, MODEL), P(), P()), P())(scaled, k, top_p)

    split = jax.jit(split)
    for ties in (False, True):
        scaled = RNG.standard_normal((rows, vocab)) * RNG.uniform(0.3, 5, (rows, 1))
        scaled = scaled.astype(np.float32)
        if ties:
            scaled = np.round(scaled * 2) / 2
        k = RNG.integers(1, vocab + 1, (rows, 1)).astype(np.int32)
        top_p = RNG.uniform(0.05, 1.0, (rows, 1)).astype(np.float32)
        top_p[::6] = 1.0
        expected = sampling._cutoff(jnp.sort(jnp.asarray(scaled), axis=-1)[:, ::-1], jnp.asarray(k),
                                    jnp.asarray(top_p))
        np.testing.assert_array_equal(np.asarray(split(scaled, k, top_p)), np.asarray(expected))


def test_split_sampling_never_gathers_the_logits():
    """The collectives of `sample_rows` at tp 2 (compiled only): the argmax's (value, id) pairs
    of an all-greedy batch; else each device's `SAMPLE_CANDIDATES` best and its sum of exp,
    then (value, id) pairs greedy and drawn; and, for a cut beyond the candidates, the eight
    histograms of the radix selects. Nothing of the size of the logits."""
    mesh = make_mesh(tp=2)
    batch, vocab = 8, 2048  # 1024 a device, more than the candidates
    rows = lambda dtype: jax.ShapeDtypeStruct((batch,), dtype)
    logits = jax.ShapeDtypeStruct((batch, vocab), jnp.float32,
                                  sharding=NamedSharding(mesh, P(DATA, MODEL)))
    params = SamplingParams(rows(jnp.float32), rows(jnp.int32), rows(jnp.float32))
    hlo = jax.jit(functools.partial(sample_rows, mesh=mesh)).lower(
        logits, params, rows(jnp.uint32), rows(jnp.int32)).compile().as_text()
    f32 = 4
    expected = ([Collective("all-gather", batch * 2 * 2 * f32),
                 Collective("all-gather", batch * 2 * (sampling.SAMPLE_CANDIDATES + 1) * f32),
                 Collective("all-gather", batch * 2 * 4 * f32)]
                + [Collective("all-reduce", batch * 256 * 4)] * 4
                + [Collective("all-reduce", batch * 512 * f32)] * 4)
    assert collectives(hlo) == sorted(expected)
