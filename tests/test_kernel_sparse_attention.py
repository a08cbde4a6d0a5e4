"""Group-sparse decode attention kernel (Pallas interpret mode on the CPU).

Every test draws fresh random inputs (seed from os.urandom, printed on failure) and checks the
kernel against the pure-jnp reference and against an independent float64 numpy computation.
On a GPU the same tests run the compiled kernel, and the `gpu`-marked cases add real sizes.
"""

from __future__ import annotations

import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import sparse_decode_attention, sparse_decode_attention_reference

sa = sys.modules["pallas_kernels.sparse_attention"]

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2, jnp.float16: 4e-3}


@pytest.fixture
def rng():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    return np.random.default_rng(seed)


def attention_f64(q, k, v, lengths, group_idx, sm_scale=None, window=None, softcap=None):
    """float64 numpy: per row, per selected group, per query head of the group (`softcap` c:
    scores s -> c tanh(s / c))."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    out = np.zeros((B, Hq, D))
    for b in range(B):
        L = int(lengths[b])
        lo = 0 if window is None else max(0, L - window)
        if L == 0:
            continue
        groups = range(Hkv) if group_idx is None else np.asarray(group_idx[b])
        for g in groups:
            for h in range(g * G, (g + 1) * G):
                s = k[b, g, lo:L] @ q[b, h] * scale
                if softcap is not None:
                    s = softcap * np.tanh(s / softcap)
                p = np.exp(s - s.max())
                out[b, h] = p @ v[b, g, lo:L] / p.sum()
    return out


def rel_err(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def make_inputs(rng, B, Hq, Hkv, S, D, k, dtype, lengths=None):
    q = jnp.asarray(rng.standard_normal((B, Hq, D)), dtype)
    kc = jnp.asarray(rng.standard_normal((B, Hkv, S, D)), dtype)
    vc = jnp.asarray(rng.standard_normal((B, Hkv, S, D)), dtype)
    if lengths is None:
        lengths = rng.integers(1, S + 1, B)
    lengths = jnp.asarray(lengths, jnp.int32)
    gi = jnp.asarray(np.argsort(rng.random((B, Hkv)), axis=1)[:, :k], jnp.int32)
    return q, kc, vc, lengths, gi


def selected_mask(gi, lengths, B, Hkv, G):
    sel = np.zeros((B, Hkv), bool)
    sel[np.arange(B)[:, None], np.asarray(gi)] = True
    sel &= (np.asarray(lengths) > 0)[:, None]
    return np.repeat(sel, G, axis=1)  # [B, Hq]


# B, Hq, Hkv, S, D, k, dtype, lengths, window, overrides
CASES = [
    # G=1, k=1, lengths 0 / 1 / S / between, S not a multiple of the block, one split
    (4, 3, 3, 37, 64, 1, jnp.float32, [0, 1, 37, 20], None, {}),
    # G=2, k=all, several splits combined in the kernel, a window shorter than some lengths
    (3, 8, 4, 50, 64, 4, jnp.float32, [50, 7, 33], 9, dict(num_splits=4)),
    # G=4, D=80 (padded to 128 inside), bfloat16, splits combined in plain JAX
    (2, 8, 2, 45, 80, 1, jnp.bfloat16, [45, 0], None, dict(num_splits=2, combine="xla")),
    # G=8, D=128, float16, window, custom scale, 32-token blocks and 2 splits
    (2, 16, 2, 70, 128, 2, jnp.float16, [70, 19], 25, dict(num_splits=2, block_k=32)),
    # G=4 float16 with many splits (more than blocks for the short row)
    (3, 12, 3, 40, 64, 2, jnp.float16, [40, 3, 1], None, dict(num_splits=8)),
    # G=2, D=80, float32, window longer than every length
    (2, 4, 2, 30, 80, 2, jnp.float32, [30, 12], 100, {}),
    # G=1, D=128, float16, k=all, 4 splits combined in the kernel, a window of 1
    (2, 4, 4, 29, 128, 4, jnp.float16, [29, 2], 1, dict(num_splits=4)),
    # G=2, D=128, bfloat16, window, kernel combine, 32-token blocks
    (3, 6, 3, 66, 128, 2, jnp.bfloat16, [66, 65, 31], 40, dict(num_splits=2, block_k=32)),
    # G=8, D=64, float32, plain-JAX combine, window
    (2, 16, 2, 52, 64, 1, jnp.float32, [52, 18], 30, dict(num_splits=4, combine="xla")),
    # a cache of one position
    (2, 2, 1, 1, 64, 1, jnp.float32, [1, 0], None, {}),
]


# The compiled kernel at real sizes (GPU only): long caches, every dtype, splits, windows.
GPU_CASES = [pytest.param(case, marks=pytest.mark.gpu) for case in [
    (3, 8, 2, 1000, 128, 2, jnp.float16, [0, 517, 1000], None, {}),
    (3, 8, 2, 1000, 128, 1, jnp.float16, [0, 999, 1000], 300, dict(num_splits=4)),
    (3, 8, 2, 1000, 128, 2, jnp.float16, [0, 64, 1000], None, dict(num_splits=8, combine="xla")),
    (4, 32, 4, 777, 128, 3, jnp.bfloat16, [0, 1, 400, 777], 100, dict(num_splits=2, block_k=128)),
    (2, 4, 4, 513, 64, 2, jnp.float32, [513, 513], None, dict(num_splits=4)),
    (2, 16, 2, 300, 80, 1, jnp.float16, [300, 300], 50, dict(num_warps=8)),
    (5, 16, 16, 2048, 128, 8, jnp.float16, [0, 1, 1000, 1500, 2048], None, {}),
    (1, 32, 8, 8192, 128, 8, jnp.float16, [8192], None, {}),
]]


@pytest.mark.parametrize("case", CASES + GPU_CASES, ids=lambda c: f"B{c[0]}-{c[1]}/{c[2]}-S{c[3]}-D{c[4]}-k{c[5]}-"
                         f"{jnp.dtype(c[6]).name}-W{c[8]}-{'-'.join(f'{a}{b}' for a, b in c[9].items())}")
def test_matches_reference_and_float64(rng, case):
    B, Hq, Hkv, S, D, k, dtype, lengths, window, over = case
    q, kc, vc, lens, gi = make_inputs(rng, B, Hq, Hkv, S, D, k, dtype, lengths)
    scale = 0.7 / math.sqrt(D) if dtype == jnp.float16 else None
    out = sparse_decode_attention(q, kc, vc, lens, gi, sm_scale=scale, sliding_window=window,
                                  **over)
    assert out.shape == (B, Hq, D) and out.dtype == q.dtype
    o = np.asarray(out, np.float64)
    assert np.all(np.isfinite(o))
    ref = sparse_decode_attention_reference(q, kc, vc, lens, gi, sm_scale=scale,
                                            sliding_window=window)
    exact = attention_f64(q, kc, vc, np.asarray(lens), np.asarray(gi), scale, window)
    assert rel_err(out, exact) < TOL[dtype]
    assert rel_err(ref, exact) < TOL[dtype]
    assert rel_err(out, ref) < 2 * TOL[dtype]
    sel = selected_mask(gi, lens, B, Hkv, Hq // Hkv)
    assert np.all(o[~sel] == 0.0), "unselected heads and empty rows must be exactly zero"
    assert np.all(np.abs(o[sel]).sum(-1) > 0)


def test_all_groups_default_and_jit(rng):
    B, Hq, Hkv, S, D = 2, 4, 2, 33, 64
    q, kc, vc, lens, _ = make_inputs(rng, B, Hq, Hkv, S, D, Hkv, jnp.float32, [33, 5])
    out = jax.jit(lambda *a: sparse_decode_attention(*a))(q, kc, vc, lens)
    exact = attention_f64(q, kc, vc, np.asarray(lens), None)
    assert rel_err(out, exact) < TOL[jnp.float32]


@pytest.mark.parametrize("num_splits,combine", [(1, "kernel"), (4, "kernel"), (2, "xla")])
def test_writes_exactly_the_selected_heads(rng, num_splits, combine):
    """The kernel writes into a NaN-poisoned output: every selected head (rows of length 0
    included, as zeros) must be overwritten and every other head left untouched."""
    B, Hq, Hkv, S, D, k = 3, 8, 4, 40, 64, 2
    q, kc, vc, lens, gi = make_inputs(rng, B, Hq, Hkv, S, D, k, jnp.float32, [40, 0, 17])
    cfg = sa.attention_config(B, k, S, D, Hq // Hkv, interpret=True, num_splits=num_splits,
                              combine=combine)
    poison = jnp.full((B, Hq, D), jnp.nan, jnp.float32)
    out = sa._sparse_attention(q, kc, vc, lens, gi, None, poison, sm_scale=1 / math.sqrt(D),
                               window=None, interpret=True, cfg=tuple(sorted(cfg.items())))
    o = np.asarray(out)
    written = np.zeros((B, Hkv), bool)
    written[np.arange(B)[:, None], np.asarray(gi)] = True
    written = np.repeat(written, Hq // Hkv, axis=1)
    assert np.all(np.isfinite(o[written])), "a selected head was not written"
    assert np.all(np.isnan(o[~written])), "the kernel wrote outside the selected heads"
    exact = attention_f64(q, kc, vc, np.asarray(lens), np.asarray(gi))
    assert rel_err(o[written], exact[written]) < TOL[jnp.float32]
    assert np.all(o[1][written[1]] == 0.0)  # the row of length 0


def test_config_heuristic():
    # Small batch x groups: split the sequence (power of 2, at most 32), never below a block.
    c = sa.attention_config(1, 8, 32768, 128, 4)
    assert c["num_splits"] == 32 and c["block_k"] == 64
    assert sa.attention_config(256, 8, 2048, 128, 4)["num_splits"] == 1
    assert sa.attention_config(4, 1, 64, 128, 4)["num_splits"] == 1
    with pytest.raises(ValueError, match="combine"):
        sa.attention_config(1, 1, 64, 64, 1, combine="nope")


def _args(B=2, Hq=4, Hkv=2, S=16, D=64, k=1, dtype=jnp.float32):
    q = jnp.zeros((B, Hq, D), dtype)
    kc = jnp.zeros((B, Hkv, S, D), dtype)
    return q, kc, kc, jnp.full((B,), S, jnp.int32), jnp.zeros((B, k), jnp.int32)


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda a: (a[0][0],) + a[1:], ValueError, "q must have 3 dimensions"),
    (lambda a: (a[0], a[1][:, :1], a[2], a[3], a[4]), ValueError, "differ in shape"),
    (lambda a: (a[0][:, :3],) + a[1:], ValueError, "multiple of Hkv"),
    (lambda a: (a[0][:1],) + a[1:], ValueError, "does not match q"),
    (lambda a: (a[0].astype(jnp.int32),) + a[1:], TypeError, "q dtype"),
    (lambda a: (a[0], a[1].astype(jnp.float16), a[2].astype(jnp.float16), a[3], a[4]),
     TypeError, "share a dtype"),
    (lambda a: a[:3] + (a[3].astype(jnp.int64) if jax.config.jax_enable_x64 else
                        a[3].astype(jnp.float32), a[4]), TypeError, "lengths must be int32"),
    (lambda a: a[:3] + (a[3][:1], a[4]), ValueError, "lengths must have shape"),
    (lambda a: a[:4] + (a[4].astype(jnp.float32),), TypeError, "group_idx must be int32"),
    (lambda a: a[:4] + (jnp.zeros((2, 3), jnp.int32),), ValueError, "1 <= k <= Hkv"),
    (lambda a: a[:4] + (jnp.zeros((2, 0), jnp.int32),), ValueError, "1 <= k <= Hkv"),
    (lambda a: a[:4] + (jnp.zeros((3, 1), jnp.int32),), ValueError, "group_idx must have shape"),
])
def test_argument_errors(mutate, exc, match):
    with pytest.raises(exc, match=match):
        sparse_decode_attention(*mutate(_args()))


@pytest.mark.parametrize("window", [0, -3, 2.5, True])
def test_bad_window(window):
    with pytest.raises(ValueError, match="sliding_window"):
        sparse_decode_attention(*_args(), sliding_window=window)


@pytest.mark.parametrize("dtype, window, over", [
    (jnp.float32, None, {}),
    (jnp.float32, 9, dict(num_splits=4)),
    (jnp.bfloat16, None, dict(num_splits=2, combine="xla")),
])
def test_logit_softcap(rng, dtype, window, over):
    """Gemma 2's soft-capping (c tanh(s / c) of the scaled scores) in the kernel, whatever the
    splits, against the reference and float64; at c = 2 it changes the output."""
    B, Hq, Hkv, S, D, k = 3, 8, 4, 50, 64, 2
    q, kc, vc, lens, gi = make_inputs(rng, B, Hq, Hkv, S, D, k, dtype, [50, 7, 33])
    q = q * 3  # scores well past the cap
    out = sparse_decode_attention(q, kc, vc, lens, gi, sliding_window=window, logit_softcap=2.0,
                                  **over)
    ref = sparse_decode_attention_reference(q, kc, vc, lens, gi, sliding_window=window,
                                            logit_softcap=2.0)
    args = (q, kc, vc, np.asarray(lens), np.asarray(gi), None, window)
    exact = attention_f64(*args, softcap=2.0)
    assert rel_err(out, exact) < TOL[dtype]
    assert rel_err(ref, exact) < TOL[dtype]
    assert rel_err(attention_f64(*args), exact) > 0.05


@pytest.mark.parametrize("cap", [0.0, -1.0, float("inf"), True, "50"])
def test_bad_logit_softcap(cap):
    with pytest.raises(ValueError, match="logit_softcap"):
        sparse_decode_attention(*_args(), logit_softcap=cap)


def page_table(rng, B, S, page_size, spare_pages=3):
    """A block table `[B, ceil(S / page_size)]` of distinct, shuffled page ids out of a pool
    with `spare_pages` pages that no row owns: (table, pool size)."""
    per_seq = -(-S // page_size)
    pages = B * per_seq + spare_pages
    return rng.permutation(pages)[:B * per_seq].reshape(B, per_seq).astype(np.int32), pages


def to_pages(cache, table, pages, page_size):
    """A contiguous cache `[B, Hkv, S, D]` scattered into a page pool `[Hkv, pages, page_size,
    D]` through `table`; every slot no position maps to is NaN."""
    c = np.asarray(cache.astype(jnp.float32))
    B, Hkv, S, D = c.shape
    pool = np.full((Hkv, pages, page_size, D), np.nan, np.float32)
    for b in range(B):
        for i in range(S):
            pool[:, table[b, i // page_size], i % page_size] = c[b, :, i]
    return jnp.asarray(pool, cache.dtype)


# B, Hq, Hkv, S, D, k, dtype, lengths, window, page_size, overrides
PAGED_CASES = [
    (3, 8, 4, 37, 64, 2, jnp.float32, [37, 0, 16], None, 1, {}),
    (2, 8, 2, 45, 64, 1, jnp.bfloat16, [45, 3], 20, 3, dict(num_splits=2)),
    (3, 4, 4, 50, 128, 4, jnp.float16, [48, 49, 17], None, 16, dict(num_splits=4, combine="xla")),
    (2, 12, 3, 40, 64, 3, jnp.float32, [32, 33], None, 16, {}),
]
GPU_PAGED_CASES = [pytest.param(case, marks=pytest.mark.gpu) for case in [
    (4, 32, 8, 2048, 128, 4, jnp.bfloat16, [0, 1, 1000, 2048], None, 16, {}),
    (2, 32, 8, 4096, 128, 8, jnp.float16, [4096, 2049], 1000, 32, {}),
]]


@pytest.mark.parametrize("case", PAGED_CASES + GPU_PAGED_CASES,
                         ids=lambda c: f"B{c[0]}-{c[1]}/{c[2]}-S{c[3]}-k{c[5]}-"
                         f"{jnp.dtype(c[6]).name}-W{c[8]}-page{c[9]}")
def test_paged_matches_contiguous_and_float64(rng, case):
    """The kernel reading a shuffled page pool through a block table (unowned slots NaN) equals
    float64 attention over the contiguous cache, and the kernel on that cache."""
    B, Hq, Hkv, S, D, k, dtype, lengths, window, page_size, over = case
    q, kc, vc, lens, gi = make_inputs(rng, B, Hq, Hkv, S, D, k, dtype, lengths)
    table, pages = page_table(rng, B, S, page_size)
    k_pages, v_pages = (to_pages(c, table, pages, page_size) for c in (kc, vc))
    table = jnp.asarray(table)
    out = sparse_decode_attention(q, k_pages, v_pages, lens, gi, block_table=table,
                                  sliding_window=window, **over)
    o = np.asarray(out, np.float64)
    assert np.all(np.isfinite(o)), "a position past a row's length (or an unowned page) was read"
    exact = attention_f64(q, kc, vc, np.asarray(lens), np.asarray(gi), None, window)
    assert rel_err(out, exact) < TOL[dtype]
    contiguous = sparse_decode_attention(q, kc, vc, lens, gi, sliding_window=window, **over)
    assert rel_err(out, contiguous) < TOL[dtype]
    ref = sparse_decode_attention_reference(q, k_pages, v_pages, lens, gi, block_table=table,
                                            sliding_window=window)
    sel = selected_mask(gi, lens, B, Hkv, Hq // Hkv)
    assert rel_err(np.asarray(ref, np.float64)[sel], exact[sel]) < TOL[dtype]
    assert np.all(o[~sel] == 0.0)


def test_paged_argument_errors():
    q, kc, _, lens, gi = _args()
    pool = jnp.zeros((2, 5, 4, 64), jnp.float32)
    with pytest.raises(ValueError, match="block_table must have shape"):
        sparse_decode_attention(q, pool, pool, lens, gi, block_table=jnp.zeros((3, 2), jnp.int32))
    with pytest.raises(TypeError, match="block_table must be int32"):
        sparse_decode_attention(q, pool, pool, lens, gi, block_table=jnp.zeros((2, 2), jnp.float32))


# Page lists (page sparsity): B, Hq, Hkv, S, D, k, dtype, lengths, window, page_size, overrides
PAGE_LIST_CASES = [
    (3, 8, 4, 37, 64, 2, jnp.float32, [37, 0, 16], None, 1, {}),
    (2, 8, 2, 45, 64, 1, jnp.bfloat16, [45, 30], 20, 3, dict(num_splits=2)),
    (3, 4, 4, 70, 128, 4, jnp.float16, [70, 49, 17], None, 16, dict(num_splits=4, combine="xla")),
    (2, 12, 3, 64, 64, 3, jnp.float32, [64, 33], 40, 16, dict(num_splits=2, block_k=32)),
]
GPU_PAGE_LIST_CASES = [pytest.param(case, marks=pytest.mark.gpu) for case in [
    (4, 32, 8, 4096, 128, 4, jnp.bfloat16, [1, 1000, 4000, 4096], None, 16, {}),
    (2, 32, 8, 4096, 128, 8, jnp.float16, [4096, 2049], 1000, 32, {}),
]]


@pytest.mark.parametrize("case", PAGE_LIST_CASES + GPU_PAGE_LIST_CASES,
                         ids=lambda c: f"B{c[0]}-{c[1]}/{c[2]}-S{c[3]}-k{c[5]}-"
                         f"{jnp.dtype(c[6]).name}-W{c[8]}-page{c[9]}")
def test_page_lists_read_only_listed_pages(rng, case):
    """Random page lists per (row, group slot), the window's first and the current page always
    among them, in random order: the kernel (paged pool and contiguous cache) equals float64
    attention over the listed pages' positions; every page of the pool no list names is NaN,
    so reading one would show."""
    B, Hq, Hkv, S, D, k, dtype, lengths, window, page_size, over = case
    q, kc, vc, lens, gi = make_inputs(rng, B, Hq, Hkv, S, D, k, dtype, lengths)
    table, pages = page_table(rng, B, S, page_size)
    per_seq = table.shape[1]
    page_idx = np.zeros((B, k, per_seq), np.int32)
    count = np.zeros((B, k), np.int32)
    keep = np.zeros((B, Hkv, S), bool)  # which positions group h of row b reads
    for b in range(B):
        L = int(lens[b])
        if L == 0:
            continue
        lo = 0 if window is None else max(0, L - window)
        first, last = lo // page_size, (L - 1) // page_size
        for j in range(k):
            others = rng.permutation(np.arange(first + 1, last))
            chosen = np.unique(np.r_[first, last, others[:rng.integers(0, len(others) + 1)]])
            rng.shuffle(chosen)
            page_idx[b, j, :len(chosen)] = chosen
            page_idx[b, j, len(chosen):] = rng.integers(0, per_seq, per_seq - len(chosen))
            count[b, j] = len(chosen)
            for p in chosen:
                keep[b, int(gi[b, j]), p * page_size:(p + 1) * page_size] = True
    listed_pages = {int(table[b, p]) for b in range(B) for j in range(k)
                    for p in page_idx[b, j, :count[b, j]]}
    k_pages, v_pages = (to_pages(c, table, pages, page_size) for c in (kc, vc))
    unlisted = np.array([p not in listed_pages for p in range(pages)])
    k_pages, v_pages = (jnp.where(unlisted[None, :, None, None], jnp.nan, x)
                        for x in (k_pages, v_pages))
    lists = dict(page_idx=jnp.asarray(page_idx), page_count=jnp.asarray(count))
    out = sparse_decode_attention(q, k_pages, v_pages, lens, gi, block_table=jnp.asarray(table),
                                  sliding_window=window, **lists, **over)
    o = np.asarray(out, np.float64)
    assert np.all(np.isfinite(o)), "an unlisted page was read"
    # float64: the unread positions' keys far below every score (exp underflows to 0)
    masked_k = np.where(keep[..., None], np.asarray(kc, np.float64), 0.0)
    qf = np.asarray(q, np.float64)
    exact = np.zeros((B, Hq, D))
    G = Hq // Hkv
    for b in range(B):
        L = int(lens[b])
        lo = 0 if window is None else max(0, L - window)
        for g in np.asarray(gi[b]):
            at = np.flatnonzero(keep[b, g, lo:L]) + lo
            if L == 0 or len(at) == 0:
                continue
            for h in range(g * G, (g + 1) * G):
                s = masked_k[b, g, at] @ qf[b, h] / math.sqrt(D)
                p = np.exp(s - s.max())
                exact[b, h] = p @ np.asarray(vc, np.float64)[b, g, at] / p.sum()
    assert rel_err(out, exact) < TOL[dtype]
    contiguous = sparse_decode_attention(q, kc, vc, lens, gi, sliding_window=window,
                                         page_size=page_size, **lists, **over)
    assert rel_err(contiguous, exact) < TOL[dtype]
    ref = sparse_decode_attention_reference(q, k_pages, v_pages, lens, gi,
                                            block_table=jnp.asarray(table),
                                            sliding_window=window, **lists)
    sel = selected_mask(gi, lens, B, Hkv, G)
    assert rel_err(np.asarray(ref, np.float64)[sel], exact[sel]) < TOL[dtype]
    assert np.all(o[~sel] == 0.0)


def test_page_list_argument_errors():
    q, kc, vc, lens, gi = _args()
    idx, cnt = jnp.zeros((2, gi.shape[1], 3), jnp.int32), jnp.ones((2, gi.shape[1]), jnp.int32)
    with pytest.raises(ValueError, match="page_idx and page_count go together"):
        sparse_decode_attention(q, kc, vc, lens, gi, page_idx=idx)
    with pytest.raises(ValueError, match="need page_size"):
        sparse_decode_attention(q, kc, vc, lens, gi, page_idx=idx, page_count=cnt)
    with pytest.raises(ValueError, match="page_idx must have shape"):
        sparse_decode_attention(q, kc, vc, lens, gi, page_idx=idx[:1], page_count=cnt,
                                page_size=4)
    with pytest.raises(TypeError, match="must be int32"):
        sparse_decode_attention(q, kc, vc, lens, gi, page_idx=idx.astype(jnp.float32),
                                page_count=cnt, page_size=4)
    with pytest.raises(ValueError, match="page_size applies only"):
        sparse_decode_attention(q, kc, vc, lens, gi, page_size=4)
