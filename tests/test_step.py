"""The typed decode state: the KV cache's shapes and bytes, and one `decode_step` over slots
that each keep their own position and active flag, checked against the full-sequence forward
pass of the same model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import config_from_hf, ops
from models.kv_cache import KVCache
from models.layers import ONE_PASS_NORM_ROWS, LayerNorm
from pallas_kernels.skinny_matmul import skinny_matmul
from polar_jax.bench.decode import random_state
from polar_jax.sparsity import SparsityPlan
from polar_jax.step import DecodeState, decode_step, prefill
from routers.model import Routers

CONFIG = config_from_hf(dict(
    model_type="opt", vocab_size=128, hidden_size=64, ffn_dim=256, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=64, activation_function="relu",
    do_layer_norm_before=True))
GQA_CONFIG = config_from_hf(dict(
    model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, hidden_act="silu",
    rms_norm_eps=1e-5, tie_word_embeddings=False))

# Gemma 2: soft-capped scores and logits, a window of 4 on its sliding layers, pre- and
# post-norms, scaled embeddings.
GEMMA2_CONFIG = config_from_hf(dict(
    model_type="gemma2", vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=20,
    max_position_embeddings=64, sliding_window=4, attn_logit_softcapping=3.0,
    final_logit_softcapping=8.0))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_kv_cache_shapes_and_bytes(dtype):
    abstract = KVCache.abstract(GQA_CONFIG, 3, 40, dtype)
    zeros = KVCache.zeros(GQA_CONFIG, 3, 40, dtype)
    shape = (3, GQA_CONFIG.num_kv_heads, 40, GQA_CONFIG.head_dim)
    assert len(zeros.layers) == GQA_CONFIG.num_layers
    assert all(x.shape == shape and x.dtype == dtype for x in jax.tree.leaves(zeros))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), abstract) == \
        jax.tree.map(lambda a: (a.shape, a.dtype), zeros)
    expected = 2 * GQA_CONFIG.num_layers * int(np.prod(shape)) * jnp.dtype(dtype).itemsize
    assert abstract.bytes() == zeros.bytes() == expected == \
        sum(x.nbytes for x in jax.tree.leaves(zeros))
    assert (zeros.batch, zeros.length) == (3, 40)
    assert len(KVCache.AXES) == len(shape)


def _model(config, seed):
    """(graphdef, state) of random weights 5x the bench's scale, so that every layer visibly
    moves the logits."""
    graphdef, state = random_state(config, jnp.float32, seed)
    return graphdef, jax.tree.map(lambda a: a * 5, state)


@pytest.mark.parametrize("kernels", [False, True], ids=["xla", "kernels"])
@pytest.mark.parametrize("config", [CONFIG, GQA_CONFIG, GEMMA2_CONFIG],
                         ids=["opt", "llama-gqa", "gemma2"])
def test_prefill_and_decode_step_over_slots_equal_the_full_forward(config, kernels, monkeypatch):
    """Three slots with ragged prompts; the middle one inactive. Prefill's logits and the
    active slots' next-token logits equal the full-sequence forward pass of prompt + fed
    token; the inactive slot neither advances nor changes its token. `kernels`: the step
    takes the GPU's path (the KV-write and attention kernels, the projections through
    `skinny_matmul`), interpreted."""
    calls = []
    if kernels:
        monkeypatch.setattr(ops, "on_gpu", lambda: True)
        monkeypatch.setattr(ops, "skinny_matmul",
                            lambda *a, **kw: calls.append(1) or skinny_matmul(*a, **kw))
    rng = np.random.default_rng()
    graphdef, params = _model(config, int(rng.integers(1 << 30)))
    lengths = np.array([5, 11, 2], np.int32)
    prompts = [rng.integers(0, config.vocab_size, n) for n in lengths]
    tokens = np.zeros((3, 16), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, :len(prompt)] = prompt
    fed = rng.integers(0, config.vocab_size, 3).astype(np.int32)
    active = np.array([True, False, True])

    @jax.jit
    def run(params):
        model = nnx.merge(graphdef, params)
        logits, kv_cache = prefill(model, tokens, lengths, KVCache.zeros(config, 3, 32, jnp.float32))
        state = DecodeState(jnp.asarray(fed), jnp.asarray(lengths), jnp.asarray(active), kv_cache)
        return logits, decode_step(model, state, lambda x: jnp.argmax(x, axis=-1))

    logits, step = run(params)
    # The reference: one full-sequence pass over each prompt + its fed token, right-padded.
    full_tokens = np.zeros((3, 12), np.int32)
    for row, prompt in enumerate(prompts):
        full_tokens[row, :len(prompt) + 1] = np.append(prompt, fed[row])
    mask = (np.arange(12) < lengths[:, None] + 1).astype(np.int32)
    full = np.asarray(nnx.merge(graphdef, params)(jnp.asarray(full_tokens), jnp.asarray(mask)))
    for row, n in enumerate(lengths):
        scale = np.abs(full[row, :n + 1]).max()
        np.testing.assert_allclose(logits[row], full[row, n - 1], atol=2e-5 * scale, rtol=0)
        if active[row]:
            np.testing.assert_allclose(step.logits[row], full[row, n], atol=2e-5 * scale, rtol=0)
    assert np.array_equal(step.state.positions, lengths + active)
    assert np.array_equal(step.state.tokens, np.where(active, step.next_tokens, fed))
    assert np.array_equal(step.next_tokens, np.argmax(step.logits, axis=-1))
    # Q/K/V, output and the MLP's two projections of every layer (traced once).
    assert len(calls) == (4 * config.num_layers if kernels else 0)


def test_inactive_slots_do_not_change_the_sparse_step_of_active_ones():
    """Polar Sparsity's MLP selection sums scores over the batch: only active slots count, so
    what an inactive slot holds cannot change an active slot's logits (while the same change
    in an active slot does: the control)."""
    rng = np.random.default_rng()
    graphdef, params = _model(CONFIG, int(rng.integers(1 << 30)))
    routers = Routers.for_model(CONFIG, mlp_rank=16, seed=int(rng.integers(1 << 30))).unstack()
    plan = SparsityPlan.build(CONFIG, {"mlp_topk": {"4": [16] * CONFIG.num_layers}}, 0.5, (),
                              mlp_batch_size=4)
    assert plan.mlp_neurons == (16, 16) and plan.attn_groups == (2, 2)
    keys = iter(jax.random.split(jax.random.key(int(rng.integers(1 << 30))), 8))
    kv_cache = jax.tree.map(lambda s: jax.random.normal(next(keys), s.shape, s.dtype),
                            KVCache.abstract(CONFIG, 4, 32, jnp.float32))

    @jax.jit
    def run(tokens, positions, active):
        state = DecodeState(tokens, positions, active, kv_cache)
        return decode_step(nnx.merge(graphdef, params), state, lambda x: jnp.argmax(x, axis=-1),
                           routers, plan).logits

    some = jnp.array([True, False, True, False])
    tokens = jnp.asarray(rng.integers(0, CONFIG.vocab_size, 4), jnp.int32)
    positions = jnp.array([7, 3, 20, 12], jnp.int32)
    other_tokens = jnp.where(some, tokens, (tokens + 1) % CONFIG.vocab_size)
    other_positions = jnp.where(some, positions, jnp.array([0, 25, 0, 1]))
    base = np.asarray(run(tokens, positions, some))[np.asarray(some)]
    other = np.asarray(run(other_tokens, other_positions, some))[np.asarray(some)]
    np.testing.assert_array_equal(other, base)
    every = jnp.ones(4, bool)
    assert np.abs(np.asarray(run(other_tokens, other_positions, every))
                  - np.asarray(run(tokens, positions, every)))[np.asarray(some)].max() > 1e-4


@pytest.mark.parametrize("rows", [1, 5, ONE_PASS_NORM_ROWS, ONE_PASS_NORM_ROWS + 1, 40])
def test_layer_norm_one_and_two_pass_equal_float64(rows):
    """Up to `ONE_PASS_NORM_ROWS` rows the variance comes from the mean square, beyond from
    the squared deviations; both equal float64 on rows shaped like a residual stream (a few
    outlier features 50x the rest, a small mean)."""
    rng = np.random.default_rng()
    d = 512
    x = rng.standard_normal((rows, d)) + 0.3
    x[:, rng.choice(d, 4, replace=False)] *= 50
    weight, bias = rng.standard_normal(d), rng.standard_normal(d)
    norm = LayerNorm(d, jnp.float32)
    norm.weight[...] = jnp.asarray(weight, jnp.float32)
    norm.bias[...] = jnp.asarray(bias, jnp.float32)
    x32 = np.asarray(x, np.float32).astype(np.float64)  # what the norm reads
    mean = x32.mean(-1, keepdims=True)
    want = (x32 - mean) / np.sqrt(x32.var(-1, keepdims=True) + norm.eps) * weight.astype(
        np.float32) + bias.astype(np.float32)
    got = np.asarray(norm(jnp.asarray(x, jnp.float32)), np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


@pytest.mark.parametrize("window", [None, 5])
def test_xla_attention_functions_soft_cap_as_float64(window):
    """`causal_attention` (a whole sequence), `chunk_attention` (its last 4 tokens against a
    cache holding it) and `decode_attention` (its last token) with Gemma 2's soft-capping,
    against float64 numpy: c tanh(s / c) of the scaled scores before the softmax."""
    rng = np.random.default_rng()
    b, t, hq, hkv, d, cap = 2, 12, 4, 2, 8, 2.0
    q = rng.standard_normal((b, t, hq, d)) * 3
    k, v = rng.standard_normal((2, b, t, hkv, d))
    s = np.einsum("btkgd,bskd->bkgts", q.reshape(b, t, hkv, hq // hkv, d), k) / np.sqrt(d)
    s = cap * np.tanh(s / cap)
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    s = np.where((j <= i) & (window is None or i - j < (window or 0)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    exact = np.einsum("bkgts,bskd->btkgd", p / p.sum(-1, keepdims=True), v).reshape(b, t, hq, d)
    q, k, v = (jnp.asarray(x, jnp.float32) for x in (q, k, v))
    cache = lambda x: x.swapaxes(1, 2)  # [B, Hkv, S, D]
    full = ops.causal_attention(q, k, v, jnp.ones((b, t), bool), window, logit_softcap=cap)
    chunk = ops.chunk_attention(q[:, -4:], cache(k), cache(v), jnp.tile(jnp.arange(t - 4, t), (b, 1)),
                                window, logit_softcap=cap)
    last = ops.decode_attention(q[:, -1], cache(k), cache(v), jnp.full(b, t, jnp.int32), window,
                                logit_softcap=cap)
    np.testing.assert_allclose(full, exact, atol=1e-5)
    np.testing.assert_allclose(chunk, exact[:, -4:], atol=1e-5)
    np.testing.assert_allclose(last, exact[:, -1], atol=1e-5)
