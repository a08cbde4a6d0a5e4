"""Page sparsity's parts: page summaries kept by the cache writes, the page selector, the
kernel's page lists, the masked evaluation's attention against float64, bench decode's bytes,
and bad values refused in one line (decoding end to end: test_page_decode.py)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.kv_cache import PagedKVCache
from pallas_kernels import sparse_decode_attention
from pallas_kernels.page_selection import (PageRule, keep_mask, quest_scores, select_pages,
                                           visible_pages)
from polar_jax.sparsity import page_masked_attention


@pytest.fixture
def rng():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    return np.random.default_rng(seed)


# --- summaries --------------------------------------------------------------------------------

class _Config:
    num_kv_heads, head_dim, num_layers = 2, 8, 1


def _check_summaries(layer, written: dict, page_size: int):
    """Every page holding tokens: its kmin / kmax equal the min / max of its written keys."""
    k, kmin, kmax = (np.asarray(x) for x in (layer.k, layer.kmin, layer.kmax))
    assert written, "nothing written"
    for page, offsets in written.items():
        keys = k[:, page, sorted(offsets)]  # [Hkv, n, D]
        np.testing.assert_array_equal(kmin[:, page], keys.min(axis=1))
        np.testing.assert_array_equal(kmax[:, page], keys.max(axis=1))


@pytest.mark.parametrize("page_size", [1, 3, 16])
def test_summaries_follow_token_and_chunk_writes_and_reused_pages(rng, page_size):
    """A mix of chunk writes (prefill) and token writes (decode) into shuffled pages, then the
    pages handed to another sequence and written afresh: the summaries are the min and max of
    exactly the keys each page holds (bfloat16, the cache dtype)."""
    B = 2
    pages_per_seq = -(-(4 * page_size + 2) // page_size)  # room for every write below
    pool = B * pages_per_seq + 3
    config, dtype = _Config(), jnp.bfloat16
    cache = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype),
                         PagedKVCache.abstract(config, pool, page_size, B, pages_per_seq, dtype,
                                               summaries=True))  # garbage everywhere
    table = rng.permutation(pool)[:B * pages_per_seq].reshape(B, pages_per_seq).astype(np.int32)
    layer = cache.with_block_table(jnp.asarray(table)).layer(0)
    hkv, d = config.num_kv_heads, config.head_dim
    chunk = jax.jit(lambda layer, k, pos, valid: layer.write_chunk(k, k, pos, valid))
    token = jax.jit(lambda layer, k, pos: layer.write_token(k, k, pos))

    def run(layer, table, lengths):
        written = {}
        T = max(lengths)
        pos = np.broadcast_to(np.arange(T), (B, T))
        valid = pos < np.asarray(lengths)[:, None]
        layer = chunk(layer, jnp.asarray(rng.standard_normal((B, T, hkv, d)), dtype),
                      jnp.asarray(pos, jnp.int32), jnp.asarray(valid))
        n = list(lengths)
        for _ in range(2 * page_size + 1):
            layer = token(layer, jnp.asarray(rng.standard_normal((B, hkv, d)), dtype),
                          jnp.asarray(n, jnp.int32))
            n = [x + 1 for x in n]
        for b in range(B):
            for i in range(n[b]):
                written.setdefault(int(table[b, i // page_size]), set()).add(i % page_size)
        return layer, written

    lengths = [rng.integers(1, page_size + 2), rng.integers(page_size, 2 * page_size)]
    layer, written = run(layer, table, lengths)
    _check_summaries(layer, written, page_size)
    # The rows' pages swapped (a pool reuses pages): shorter sequences now, fresh summaries.
    table = table[::-1].copy()
    layer = PagedKVCache(((layer.k, layer.v),), jnp.asarray(table), ((layer.kmin, layer.kmax),)
                         ).layer(0)
    layer, written = run(layer, table, [1, 2])
    _check_summaries(layer, written, page_size)


# --- the selector ----------------------------------------------------------------------------

@pytest.mark.parametrize("queries", [1, 3])  # the decode step's fused form; evaluation's matmuls
def test_quest_scores_against_float64(rng, queries):
    """Quest's bound, max over the group's query heads of sum_d max(q_d kmin_d, q_d kmax_d),
    from bfloat16 summaries, against float64 numpy."""
    B, K, G, P, D = 3, 2, 4, 11, 16
    q = rng.standard_normal((B, K, queries, G, D)).astype(np.float32)
    a, b = (rng.standard_normal((B, K, P, D)) for _ in range(2))
    kmin = jnp.asarray(np.minimum(a, b), jnp.bfloat16)
    kmax = jnp.asarray(np.maximum(a, b), jnp.bfloat16)
    lo, hi = (np.asarray(x, np.float64)[:, :, None, None] for x in (kmin, kmax))
    q64 = np.asarray(q, np.float64)[..., None, :]
    want = np.maximum(q64 * lo, q64 * hi).sum(-1).max(-2)  # [B, K, T, P]
    got = quest_scores(jnp.asarray(q), kmin, kmax)
    assert got.shape == (B, K, queries, P) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_selector_keeps_the_top_bound_pages_and_never_drops_sink_or_current():
    """Hand-made summaries: q = (1, -1); page p's keys lie in a box whose bound is known."""
    P, page_size = 8, 4
    q = jnp.array([[[[1.0, -1.0]]]])  # [B=1, K=1, G=1, D=2]
    # bound = max over the box of q . k = kmax_0 - kmin_1
    kmax0 = jnp.array([9.0, 1.0, 5.0, 7.0, 2.0, 8.0, 3.0, 0.0])
    kmin = jnp.stack([jnp.zeros(P), jnp.zeros(P)], -1)[None, None]
    kmax = jnp.stack([kmax0, jnp.ones(P)], -1)[None, None]
    rule = PageRule(topk=0.5, min_context=0)
    length = jnp.array([7 * page_size + 1], jnp.int32)  # 8 pages, the last holds 1 token
    idx, count = select_pages(rule, q, kmin, kmax, length, page_size)
    kept = sorted(np.asarray(idx)[0, 0, :int(count[0, 0])].tolist())
    # 4 of 8: sink 0 and current 7, then the best bounds among 1..6: 5 (8) and 3 (7)
    assert kept == [0, 3, 5, 7]
    # A token budget of 12 tokens: 3 pages (sink, current and the best other).
    idx, count = select_pages(PageRule(budget=12, min_context=0), q, kmin, kmax, length, page_size)
    assert sorted(np.asarray(idx)[0, 0, :int(count[0, 0])].tolist()) == [0, 5, 7]
    # Shorter than min_context: dense; the rule never keeps fewer than sink and current.
    idx, count = select_pages(PageRule(topk=0.5, min_context=33), q, kmin, kmax, length, page_size)
    assert int(count[0, 0]) == 8
    idx, count = select_pages(PageRule(topk=0.01, min_context=0), q, kmin, kmax, length, page_size)
    assert sorted(np.asarray(idx)[0, 0, :int(count[0, 0])].tolist()) == [0, 7]
    # A window: pages before it are never kept; its first page is the sink.
    mask = keep_mask(PageRule(topk=0.75, min_context=0), jnp.asarray(kmax0)[None], length,
                     page_size, window=13)  # positions 16 .. 28: pages 4 .. 7
    assert np.flatnonzero(np.asarray(mask)[0]).tolist() == [4, 5, 7]


def test_selector_random_never_drops_sink_or_current(rng):
    B, K, P, page_size = 6, 3, 20, 3
    scores = jnp.asarray(rng.standard_normal((B, K, P)) * 10, jnp.float32)
    lengths = jnp.asarray(rng.integers(1, P * page_size + 1, B), jnp.int32)
    window = 17
    for w in (None, window):
        mask = np.asarray(keep_mask(PageRule(topk=0.2, min_context=0), scores,
                                    lengths[:, None], page_size, w))
        for b in range(B):
            L = int(lengths[b])
            first = (0 if w is None else max(0, L - w)) // page_size
            last = (L - 1) // page_size
            n = last - first + 1
            for j in range(K):
                kept = np.flatnonzero(mask[b, j])
                assert first in kept and last in kept
                assert kept.min() >= first and kept.max() <= last
                assert len(kept) == min(n, max(2, int(np.ceil(0.2 * n))))
                others = [p for p in range(first + 1, last) if p not in kept]
                inner = [p for p in kept if p not in (first, last)]
                if others and inner:  # every kept page outranks every dropped one
                    assert min(scores[b, j, inner]) >= max(scores[b, j, others])


def page_attention_f64(q, k, v, rule: PageRule, page_size, window, oracle):
    """float64 numpy: per query t and KV group, the visible pages ranked (Quest's bound as
    max over the box, or the group's attention mass), the rule's count kept (first and last
    visible forced, ties to the lowest page), softmax over the kept visible keys."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    _, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    out = np.zeros(q.shape[1:])
    for t in range(T):
        L = t + 1
        lo = 0 if window is None else max(0, L - window)
        first, last = lo // page_size, (L - 1) // page_size
        n = last - first + 1
        keep = n if L < rule.min_context else min(n, max(min(n, 2), int(np.ceil(rule.topk * n))))
        for h in range(Hkv):
            heads = range(h * G, (h + 1) * G)
            s = np.stack([k[0, lo:L, h] @ q[0, t, i] / np.sqrt(D) for i in heads])  # [G, n]
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            score = {}
            for page in range(first, last + 1):
                keys = k[0, page * page_size:min((page + 1) * page_size, L), h]
                if oracle:
                    at = np.arange(lo, L) // page_size == page
                    score[page] = p[:, at].sum()
                else:
                    score[page] = max(np.maximum(q[0, t, i] * keys.min(0),
                                                 q[0, t, i] * keys.max(0)).sum() for i in heads)
            others = sorted((p for p in score if p not in (first, last)),
                            key=lambda p: (-score[p], p))
            kept = {first, last} | set(others[:keep - len({first, last})])
            at = np.isin(np.arange(lo, L) // page_size, list(kept))
            for i, head in enumerate(heads):
                w = np.exp(s[i, at] - s[i, at].max())
                out[t, head] = w @ v[0, lo:L, h][at] / w.sum()
    return out


@pytest.mark.parametrize("oracle, window", [(False, None), (False, 13), (True, 13)])
def test_masked_page_attention_equals_float64(rng, oracle, window):
    """The masked evaluation's attention (Quest's bound, or the oracle's true mass) against a
    float64 loop over queries, groups and pages."""
    T, Hq, Hkv, D, page_size = 30, 4, 2, 8, 4
    q, k, v = (jnp.asarray(rng.standard_normal((1, T, h, D)), jnp.float32)
               for h in (Hq, Hkv, Hkv))
    rule = PageRule(topk=0.3, min_context=9)
    out = page_masked_attention(q, k, v, jnp.ones((1, T), jnp.int32), window, None, rule,
                                page_size, oracle=oracle)
    np.testing.assert_allclose(np.asarray(out[0]), page_attention_f64(q, k, v, rule, page_size,
                                                                      window, oracle),
                               atol=2e-5, rtol=0)


def test_page_rule_and_settings_refuse_bad_values():
    from polar_jax.errors import PolarJaxError
    from polar_jax.settings import PageSettings

    with pytest.raises(ValueError, match="one of topk and budget"):
        PageRule(topk=0.5, budget=64)
    with pytest.raises(PolarJaxError, match="exclude each other"):
        PageSettings(page_topk=0.5, page_budget=64)
    with pytest.raises(PolarJaxError, match=r"page_topk must be a finite number in \(0, 1\]"):
        PageSettings(page_topk=2.0)
    with pytest.raises(PolarJaxError, match="page_size=8 applies only"):
        PageSettings(page_size=8)
    assert PageSettings(page_budget=64, page_min_context=0).rule() == PageRule(None, 64, 0)


def test_bench_decode_times_group_by_page_and_counts_its_bytes(tmp_path):
    """`bench decode --page-topk`: each row times dense, group-only and group x page in one
    call (`--breakdown` profiles all three); the page rule's bytes: at 4096 positions of
    16-token pages, 25% keeps 64 of 256 pages and the summaries add 1/16 of a page's bytes per
    page."""
    import json

    from polar_jax.bench.decode import main, page_fractions

    assert page_fractions(PageRule(topk=0.25), 4095, 16) == (0.25, 1 / 256)
    assert page_fractions(PageRule(budget=64), 4095, 16) == (64 / 4096, 1 / 256)
    assert page_fractions(PageRule(topk=0.25), 1000, 16) == (1.0, 63 / 1001 / 16)  # < 1024
    out = tmp_path / "rows.json"
    assert main(["--arch", "tiny", "--batch-sizes", "2", "--context-lens", "200",
                 "--attn-topk", "0.5", "--page-topk", "0.25", "--page-min-context", "64",
                 "--steps", "2", "--repeats", "1", "--peer", "off", "--breakdown",
                 "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["kv_layout"] == "paged 16" and row["page_topk"] == 0.25
    breakdown = row["breakdown_us_per_layer"]
    assert set(breakdown) == {"dense", "sparse", "paged"}
    assert "page_select" in breakdown["paged"]["parts"] and "page_select" not in breakdown["sparse"]["parts"]
    # a CPU's time per step is a difference of two noisy runs (once -7.9 ms): finite, unsigned
    assert np.isfinite(row["paged_ms"]) and row["paged_roofline_ms"] < row["sparse_roofline_ms"]


@pytest.mark.parametrize("window", [None, 10])
def test_full_page_lists_are_bit_exact(rng, window):
    """Every visible page listed: the kernel reads the blocks it reads without lists, in the
    same order, so its output is identical."""
    B, Hq, Hkv, S, D, page_size = 2, 8, 4, 40, 16, 3
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32)
               for s in ((B, Hq, D), (B, Hkv, S, D), (B, Hkv, S, D)))
    lengths = np.array([S, rng.integers(12, S)], np.int32)
    group_idx = jnp.asarray(np.stack([rng.permutation(Hkv)[:2] for _ in range(B)]), jnp.int32)
    first, last = visible_pages(lengths, page_size, window)
    pages = np.zeros((B, 2, -(-S // page_size)), np.int32)
    count = np.zeros((B, 2), np.int32)
    for b in range(B):
        n = int(last[b] - first[b] + 1)
        pages[b, :, :n], count[b] = np.arange(first[b], last[b] + 1), n
    listed = sparse_decode_attention(q, k, v, jnp.asarray(lengths), group_idx,
                                     sliding_window=window, page_idx=jnp.asarray(pages),
                                     page_count=jnp.asarray(count), page_size=page_size)
    plain = sparse_decode_attention(q, k, v, jnp.asarray(lengths), group_idx,
                                    sliding_window=window)
    np.testing.assert_array_equal(np.asarray(listed), np.asarray(plain))


# --- bad values -------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, needles", [
    (["--page-topk", "0"], ("argument --page-topk: must be a finite number in (0, 1], got 0.0",)),
    (["--page-topk", "1.5"], ("argument --page-topk",)),
    (["--page-budget", "0"], ("argument --page-budget: must be an integer in [1, ",)),
    (["--page-topk", "0.5", "--page-budget", "64"],
     ("argument --page-budget: not allowed with argument --page-topk",)),
    (["--page-min-context", "-1", "--page-topk", "0.5"], ("argument --page-min-context",)),
    (["--page-size", "0", "--page-topk", "0.5"], ("argument --page-size",)),
    (["--page-min-context", "64"],
     ("--page-min-context=64 applies only with --page-topk or --page-budget",)),
    (["--page-size", "8"], ("--page-size=8 applies only with --page-topk or --page-budget",)),
    (["--page-topk", "0.5", "--attn-topk", "0.5"],
     ("--attn-topk=0.5 applies only with --mode sparse or oracle",)),
])
@pytest.mark.parametrize("command", [["eval", "perplexity"], ["eval", "retrieval"]])
def test_bad_page_values_are_refused_in_one_line(capsys, command, extra, needles):
    from conftest import run_cli

    rc, out, err = run_cli(capsys, [*command, "--model", "m", "--text", "t", *extra])
    assert rc == 2 and out == "" and "Traceback" not in err, (rc, out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("polar-jax: error: "), err
    assert all(needle in lines[0] for needle in needles), lines[0]
