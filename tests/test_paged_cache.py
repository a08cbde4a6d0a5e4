"""The paged KV cache: its writes land where the block table says, chunked prefill into pages
equals a one-shot prefill into a contiguous cache, the chunk attention equals float64
attention (GQA, sliding windows, offsets), and the memory plan refuses what cannot fit."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import config_from_hf
from models.kv_cache import KVCache, LayerKV, PagedKVCache
from models.ops import ChunkOps, chunk_attention
from polar_jax.bench.decode import random_state
from polar_jax.errors import PolarJaxError
from polar_jax.serve.kv_pages import PagePool, pages_for, plan_pages
from polar_jax.step import prefill

OPT = config_from_hf(dict(
    model_type="opt", vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=64, activation_function="relu",
    do_layer_norm_before=True))
MISTRAL = config_from_hf(dict(
    model_type="mistral", vocab_size=96, hidden_size=32, intermediate_size=64,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=64, hidden_act="silu", rms_norm_eps=1e-5, sliding_window=7,
    tie_word_embeddings=False))


def _f64_chunk_attention(q, k, v, positions, window):
    """float64 numpy: query t of row b at positions[b, t] over keys p <= it (within window)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, T, Hq, D = q.shape
    Hkv = k.shape[1]
    out = np.zeros(q.shape)
    for b in range(B):
        for t in range(T):
            p = int(positions[b, t])
            lo = 0 if window is None else max(0, p - window + 1)
            for h in range(Hq):
                g = h // (Hq // Hkv)
                s = k[b, g, lo:p + 1] @ q[b, t, h] / math.sqrt(D)
                w = np.exp(s - s.max())
                out[b, t, h] = w @ v[b, g, lo:p + 1] / w.sum()
    return out


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (8, 2)], ids=["mha", "gqa"])
def test_chunk_attention_equals_float64(hq, hkv, window):
    """A chunk of 6 queries per row at its own offset (0, 9, 17) into a cache of 32."""
    rng = np.random.default_rng()
    B, T, S, D = 3, 6, 32, 16
    q = rng.standard_normal((B, T, hq, D)).astype(np.float32)
    k = rng.standard_normal((B, hkv, S, D)).astype(np.float32)
    v = rng.standard_normal((B, hkv, S, D)).astype(np.float32)
    positions = np.asarray([0, 9, 17])[:, None] + np.arange(T)[None, :]
    out = chunk_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                          jnp.asarray(positions, jnp.int32), window)
    np.testing.assert_allclose(np.asarray(out), _f64_chunk_attention(q, k, v, positions, window),
                               rtol=2e-5, atol=2e-5)


def test_paged_writes_land_where_the_block_table_says():
    """Token and chunk writes into a shuffled pool equal the same writes into a contiguous
    cache read back through the block table; positions outside the table and invalid tokens
    write nothing."""
    rng = np.random.default_rng()
    B, Hkv, D, page, per_seq = 3, 2, 8, 3, 4
    pages = B * per_seq + 2
    table = rng.permutation(pages)[:B * per_seq].reshape(B, per_seq).astype(np.int32)
    pool = jnp.full((Hkv, pages, page, D), 7.0)
    paged = PagedKVCache(((pool, pool),), jnp.asarray(table)).layer(0)
    dense = LayerKV(*(jnp.full((B, Hkv, page * per_seq, D), 7.0),) * 2)
    k = jnp.asarray(rng.standard_normal((B, 5, Hkv, D)), jnp.float32)
    positions = jnp.asarray([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [8, 9, 10, 11, 12]], jnp.int32)
    valid = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]], bool)  # 12: outside
    paged, dense = paged.write_chunk(k, -k, positions, valid), dense.write_chunk(k, -k, positions, valid)
    token = jnp.asarray(rng.standard_normal((B, Hkv, D)), jnp.float32)
    at = jnp.asarray([3, 12, 11], jnp.int32)  # row 1: past its pages, dropped
    paged, dense = paged.write_token(token, 2 * token, at), dense.write_token(token, 2 * token, at)
    for got, want in zip(paged.dense(), dense.dense()):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    owned = np.zeros(pages, bool)
    owned[table.ravel()] = True
    assert np.all(np.asarray(paged.k)[:, ~owned] == 7.0)  # unowned pages untouched


@pytest.mark.parametrize("config", [OPT, MISTRAL], ids=["opt-learned-positions", "mistral-window"])
def test_chunked_prefill_into_pages_equals_one_shot_prefill(config):
    """Prompts of 1 to 3 chunks (of 5 tokens), prefilled chunk by chunk into a shuffled pool
    of 3-token pages through `ChunkOps`: every chunk's last logits and, at the end, the keys
    and values equal a one-shot prefill into a contiguous cache."""
    rng = np.random.default_rng()
    graphdef, state = random_state(config, jnp.float32, int(rng.integers(1 << 30)))
    model = nnx.merge(graphdef, jax.tree.map(lambda a: a * 5, state))
    lengths = np.asarray([4, 5, 11, 15], np.int32)
    B, C, page, length = len(lengths), 5, 3, 16
    tokens = np.zeros((B, length), np.int32)
    for b, n in enumerate(lengths):
        tokens[b, :n] = rng.integers(0, config.vocab_size, n)
    logits, contiguous = prefill(model, jnp.asarray(tokens), jnp.asarray(lengths),
                                 KVCache.zeros(config, B, length, jnp.float32))
    per_seq = pages_for(length, page)
    table = rng.permutation(B * per_seq).reshape(B, per_seq).astype(np.int32)
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         PagedKVCache.abstract(config, B * per_seq, page, B, per_seq, jnp.float32))
    cache = cache.with_block_table(jnp.asarray(table))
    forward = jax.jit(lambda c, t, p, v: model.forward(t, p, ChunkOps(p, v), c))
    last = np.zeros((B, config.vocab_size), np.float32)
    for start in range(0, length, C):
        positions = np.broadcast_to(np.arange(start, start + C, dtype=np.int32), (B, C))
        valid = positions < lengths[:, None]
        out = forward(cache, jnp.asarray(tokens[:, start:start + C]), jnp.asarray(positions),
                      jnp.asarray(valid))
        cache = out.kv_cache
        ends = (lengths > start) & (lengths <= start + C)
        hidden = out.hidden_states[np.arange(B), np.clip(lengths - 1 - start, 0, C - 1)]
        last[ends] = np.asarray(model.logits(hidden))[ends]
    np.testing.assert_allclose(last, np.asarray(logits), rtol=1e-5, atol=1e-5)
    for i in range(config.num_layers):
        for got, want in zip(cache.layer(i).dense(), contiguous.layer(i).dense()):
            for b, n in enumerate(lengths):
                np.testing.assert_allclose(np.asarray(got)[b, :, :n], np.asarray(want)[b, :, :n],
                                           rtol=1e-5, atol=1e-5)


def test_page_pool_hands_out_and_takes_back():
    pool = PagePool(5)
    first = pool.allocate(3)
    assert first == [0, 1, 2] and (pool.free, pool.used) == (2, 3)
    with pytest.raises(PolarJaxError, match="3 KV pages asked, 2 free"):
        pool.allocate(3)
    assert pool.free == 2  # nothing taken by the refusal
    pool.release(first[:2])
    assert sorted(pool.allocate(4)) == [0, 1, 3, 4] and pool.free == 0


def test_memory_plan_sizes_the_pool_and_refuses_with_numbers():
    mib = 2**20
    plan = plan_pages(budget=1000 * mib, transient=200 * mib, page_bytes=mib, page_size=16,
                      max_len=256, max_pages=10_000)
    assert plan.num_pages == 800  # what fits beside the buffers
    capped = plan_pages(budget=1000 * mib, transient=200 * mib, page_bytes=mib, page_size=16,
                        max_len=256, max_pages=64)
    assert capped.num_pages == 64  # every slot at max_len: no use for more
    with pytest.raises(PolarJaxError) as err:
        plan_pages(budget=210 * mib, transient=200 * mib, page_bytes=mib, page_size=16,
                   max_len=256, max_pages=64)
    assert "holds 10 pages of 16 tokens but one request of --max-len 256 positions needs 16" \
        in str(err.value)
    with pytest.raises(PolarJaxError, match=r"--kv-pages 900 needs 0.88 GiB .*\(room for 800 pages\)"):
        plan_pages(budget=1000 * mib, transient=200 * mib, page_bytes=mib, page_size=16,
                   max_len=256, max_pages=64, kv_pages=900)
