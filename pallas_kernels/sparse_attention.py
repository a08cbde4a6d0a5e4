"""Head/group-sparse decode attention (flash-decoding) as a Pallas kernel.

One decode step: each row `b` of the batch has one query token with `Hq` heads, a KV cache
`[Hkv, S, D]` holding `lengths[b]` valid positions, and a per-row set of selected KV groups
`group_idx[b]` (Polar Sparsity's head router picks them). Query head `h` reads group `h // G`
(`G = Hq // Hkv`). Only the selected groups are computed; the other heads' outputs are zero.
The cache is contiguous (`[B, Hkv, S, D]`) or paged (a pool `[Hkv, pages, page_size, D]` read
through a block table `[B, pages_per_seq]`: position i of row b is at page
`block_table[b, i // page_size]`, offset `i % page_size`). With page lists (page sparsity,
`pallas_kernels.page_selection`), each (row, selected group slot) reads only the pages
`page_idx[b, j, :page_count[b, j]]` (a sequence's logical pages, each `page_size` positions).

Kernel layout (Triton lowering on NVIDIA GPUs, interpret mode on the CPU):

- one program per (row, selected group slot, sequence split), a 1-D grid with the splits of a
  slot adjacent;
- the program reads the group id from `group_idx` and that group's K/V blocks once, for all G
  query heads at once: the G heads are the rows of the q tile (padded to 16 rows for the
  tensor-core dot);
- online softmax in float32 (base 2) over `block_k`-token blocks; the loop runs only over the
  blocks inside `[max(0, len - window), len)`, split evenly between the splits; with a page
  list, over the blocks of the concatenation of the listed pages (`page_count x page_size`
  positions), each position masked to `[max(0, len - window), len)`;
- one split: the program normalises and writes its G output rows straight into the output
  (which starts as zeros, so unselected heads and empty rows stay exactly zero);
- several splits ("flash-decoding"): each split writes (o, m, l) partials; then either the last
  split to finish a slot (an atomic counter per slot) combines them in the same kernel, or a
  plain-JAX combine does it (`combine="xla"`).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._common import (
    FLOAT_DTYPES, LOG2E, NEG_INF, PROGRAMS_PER_SM, atomic_add, barrier, compiler_params,
    masked_load, masked_store, next_pow2, pl, resolve_interpret, sm_count,
)

__all__ = ["sparse_decode_attention", "sparse_decode_attention_reference", "attention_config"]

MIN_SPLIT_TOKENS = 256  # a split of the sequence reads at least this many cached tokens


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------

def _selected_groups_mask(group_idx, batch: int, num_kv: int):
    """[B, Hkv] bool: group h is selected for row b."""
    if group_idx is None:
        return jnp.ones((batch, num_kv), dtype=bool)
    return jnp.any(group_idx[:, :, None] == jnp.arange(num_kv, dtype=group_idx.dtype), axis=1)


def gather_pages(pages, block_table):
    """A paged pool `[Hkv, pages, page_size, D]` read through `block_table [B, n]` as a
    contiguous cache `[B, Hkv, n * page_size, D]`."""
    x = pages[:, block_table]
    hkv, b, n, p, d = x.shape
    return x.swapaxes(0, 1).reshape(b, hkv, n * p, d)


def _listed_positions(page_idx, page_count, group_idx, page_size: int, num_kv: int, seq: int):
    """[B, Hkv, S] bool: position s of row b is on a page listed for group h's slot."""
    B, K, n = page_idx.shape
    listed = jnp.arange(n) < page_count[:, :, None]  # [B, K, n]
    page = jnp.arange(seq) // page_size
    on = jnp.any((page_idx[:, :, :, None] == page) & listed[..., None], axis=2)  # [B, K, S]
    if group_idx is None:
        group_idx = jnp.broadcast_to(jnp.arange(num_kv, dtype=jnp.int32), (B, num_kv))
    slot_of = group_idx[:, :, None] == jnp.arange(num_kv)  # [B, K, Hkv]
    return jnp.any(slot_of[..., None] & on[:, :, None, :], axis=1)


def sparse_decode_attention_reference(q, k_cache, v_cache, lengths, group_idx=None, *,
                                      block_table=None, sm_scale=None, sliding_window=None,
                                      logit_softcap=None, page_idx=None, page_count=None,
                                      page_size=None):
    """Pure-`jnp` reference with the same semantics (float32 softmax, `q.dtype` output)."""
    listed = None
    if block_table is not None:
        page_size = k_cache.shape[2]
        k_cache, v_cache = gather_pages(k_cache, block_table), gather_pages(v_cache, block_table)
    if page_idx is not None:
        listed = _listed_positions(page_idx, page_count, group_idx, page_size, k_cache.shape[1],
                                   k_cache.shape[2])
    B, Hq, D = q.shape
    _, Hkv, S, _ = k_cache.shape
    G = Hq // Hkv
    scale = (1.0 / math.sqrt(D)) if sm_scale is None else float(sm_scale)
    qf = q.astype(jnp.float32).reshape(B, Hkv, G, D)
    s = jnp.einsum("bhgd,bhsd->bhgs", qf, k_cache.astype(jnp.float32),
                   precision=lax.Precision.HIGHEST) * scale
    if logit_softcap is not None:
        s = logit_softcap * jnp.tanh(s / logit_softcap)
    pos = jnp.arange(S)
    L = jnp.clip(lengths.astype(jnp.int32), 0, S)[:, None]
    lo = jnp.zeros_like(L) if sliding_window is None else jnp.maximum(L - sliding_window, 0)
    valid = ((pos[None, :] >= lo) & (pos[None, :] < L))[:, None]  # [B, 1 or Hkv, S]
    if listed is not None:
        valid = valid & listed
    s = jnp.where(valid[:, :, None, :], s, -jnp.inf)
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    v = jnp.where(valid[..., None], v_cache.astype(jnp.float32), 0.0)  # unread slots
    o = jnp.einsum("bhgs,bhsd->bhgd", p, v,
                   precision=lax.Precision.HIGHEST) / jnp.where(l > 0, l, 1.0)
    keep = _selected_groups_mask(group_idx, B, Hkv) & (L > 0)
    o = jnp.where(keep[:, :, None, None], o, 0.0)
    return o.reshape(B, Hq, D).astype(q.dtype)


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------

def attention_config(batch, num_selected, seq_len, head_dim, group_size, *, interpret=False,
                     block_k=None, num_splits=None, num_warps=None, num_stages=None,
                     combine=None, evict_first=None):
    """Tiling for one call: block_k, num_splits (a power of 2), warps, stages, combine."""
    if block_k is None:
        block_k = 16 if interpret else 64
    block_k = max(16, next_pow2(block_k))
    if num_splits is None:
        if interpret:
            num_splits = 1
        else:
            target = PROGRAMS_PER_SM * sm_count()
            num_splits = 1
            base = batch * num_selected
            # The last split combines up to num_splits partials per head: more than 32 only
            # pays when even 32 splits would leave most SMs idle (measured, see the notes).
            max_splits = 64 if base * 32 < sm_count() else 32
            while (base * num_splits < target and num_splits < max_splits
                   and seq_len // (2 * num_splits) >= max(MIN_SPLIT_TOKENS, block_k)):
                num_splits *= 2
    num_splits = next_pow2(max(1, int(num_splits)))
    if num_warps is None:
        # 2 warps measured 0.5-12% faster than 4 on every benchmark shape (H200, notes).
        num_warps = 2
    if num_stages is None:
        # One head per group (MHA): a third stage keeps more loads in flight (H200: 0.185 ->
        # 0.159 ms at B64, 10 of 32 heads, S 2048); with GQA it costs 4-10%.
        num_stages = 3 if group_size == 1 else 2
    if combine is None:
        combine = "kernel"
    if combine not in ("kernel", "xla"):
        raise ValueError(f"combine must be 'kernel' or 'xla', got {combine!r}")
    return dict(block_k=int(block_k), num_splits=int(num_splits), num_warps=int(num_warps),
                num_stages=int(num_stages), combine=combine, evict_first=bool(evict_first))


# --------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------

def _attn_kernel(len_ref, gidx_ref, bt_ref, pidx_ref, pcnt_ref, q_ref, k_ref, v_ref, *refs, K,
                 Hkv, S, PS, MP, LPS, NL, G, Gp, D, Dp, BK, NS, W, scale_log2, cap_log2, mode,
                 evict, interpret):
    if mode == "direct":
        _, o_ref = refs
    elif mode == "kernel":
        _, _, o_ref, cnt_ref, op_ref, mp_ref, lp_ref = refs
    else:  # "xla"
        op_ref, mp_ref, lp_ref = refs

    pid = pl.program_id(0)
    s = pid % NS
    bj = pid // NS
    b = bj // K
    j = bj % K
    g = jnp.clip(gidx_ref[b, j], 0, Hkv - 1)
    L = jnp.clip(len_ref[b], 0, S)
    lo = jnp.int32(0) if W is None else jnp.maximum(L - W, 0)
    if NL is None:  # every position of [lo, L)
        n_blk = (L - lo + BK - 1) // BK
    else:  # the listed pages' positions, concatenated, from `lo` where the first page holds
        # it (lists in ascending order start at the window's first page): then a full list
        # reads the blocks the unlisted path reads, in the same order
        n_listed = jnp.clip(pcnt_ref[b, j], 0, NL) * LPS
        start = pidx_ref[b, j, 0] * LPS
        v0 = jnp.where((start <= lo) & (lo < start + LPS), lo - start, 0)
        n_blk = (n_listed - v0 + BK - 1) // BK
    per = (n_blk + NS - 1) // NS
    blk0 = s * per
    blk1 = jnp.minimum(blk0 + per, n_blk)

    # float32 inputs: a true float32 dot (the Triton default for float32 is TF32).
    prec = lax.Precision.HIGHEST if q_ref.dtype == jnp.float32 else None
    rows = jnp.arange(Gp, dtype=jnp.int32)
    row_ok = rows < G
    cols = jnp.arange(Dp, dtype=jnp.int32)
    col_ok = cols < D
    tile_ok = row_ok[:, None] & col_ok[None, :]
    head_rows = g * G + rows
    q = masked_load(q_ref, (b, head_rows[:, None], cols[None, :]), tile_ok, 0.0,
                    interpret=interpret)
    offs = jnp.arange(BK, dtype=jnp.int32)

    def kv_index(pos, ok):
        """Where the cache holds positions `pos [BK]`: row b's, or (paged) its pages'."""
        if PS is None:
            return (b, g, pos[:, None], cols[None, :])
        page = masked_load(bt_ref, (b, jnp.minimum(pos // PS, MP - 1)), ok, 0,
                           interpret=interpret)
        return (g, page[:, None], (pos % PS)[:, None], cols[None, :])

    def positions(blk):
        """The positions block `blk` reads `[BK]` and which of them count."""
        if NL is None:
            pos = lo + blk * BK + offs
            return pos, pos < L
        at = v0 + blk * BK + offs
        listed = at < n_listed
        slot = jnp.minimum(at // LPS, NL - 1)
        page = masked_load(pidx_ref, (b, j, slot), listed, 0, interpret=interpret)
        pos = page * LPS + at % LPS
        return pos, listed & (pos >= lo) & (pos < L)

    def body(blk, carry):
        acc, m, l = carry
        pos, ok = positions(blk)
        kv_ok = ok[:, None] & col_ok[None, :]
        at = kv_index(pos, ok)
        kt = masked_load(k_ref, at, kv_ok, 0.0, interpret=interpret, evict_first=evict)
        sc = lax.dot_general(q, kt, (((1,), (1,)), ((), ())), precision=prec,
                             preferred_element_type=jnp.float32) * scale_log2
        if cap_log2 is not None:  # soft-capping c tanh(s / c), on the base-2 scores
            sc = cap_log2 * jnp.tanh(sc / cap_log2)
        sc = jnp.where(ok[None, :], sc, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(sc, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(sc - m_new[:, None])
        l = l * alpha + jnp.sum(p, axis=1)
        vt = masked_load(v_ref, at, kv_ok, 0.0, interpret=interpret, evict_first=evict)
        acc = acc * alpha[:, None] + lax.dot_general(
            p.astype(vt.dtype), vt, (((1,), (0,)), ((), ())), precision=prec,
            preferred_element_type=jnp.float32)
        return acc, m_new, l

    acc0 = jnp.zeros((Gp, Dp), jnp.float32)
    m0 = jnp.full((Gp,), NEG_INF, jnp.float32)
    l0 = jnp.zeros((Gp,), jnp.float32)
    acc, m, l = lax.fori_loop(blk0, blk1, body, (acc0, m0, l0))

    if mode == "direct":
        o = acc / jnp.where(l > 0, l, 1.0)[:, None]
        masked_store(o_ref, (b, head_rows[:, None], cols[None, :]), o.astype(o_ref.dtype), tile_ok)
        return

    # Partials of this split (rows >= G are never read back).
    masked_store(op_ref, (bj, s, rows[:, None], cols[None, :]), acc, tile_ok)
    masked_store(mp_ref, (bj, s, rows), m, row_ok)
    masked_store(lp_ref, (bj, s, rows), l, row_ok)
    if mode == "xla":
        return

    # The last split of slot (b, j) to arrive combines the partials of all splits. Its loads
    # come after the acquire-release atomic, which orders them after the other programs'
    # partial stores (each program's stores precede its own atomic through the barrier).
    barrier(interpret)
    arrived = atomic_add(cnt_ref, (bj,), jnp.int32(1))

    @pl.when(arrived == NS - 1)
    def _combine():
        sp = jnp.arange(NS, dtype=jnp.int32)
        every = jnp.ones((NS,), dtype=bool)

        def one_row(r):
            mr = masked_load(mp_ref, (bj, sp, r), every, 0.0, interpret=interpret)
            lr = masked_load(lp_ref, (bj, sp, r), every, 0.0, interpret=interpret)
            orow = masked_load(op_ref, (bj, sp[:, None], r, cols[None, :]),
                               every[:, None] & col_ok[None, :], 0.0, interpret=interpret)
            w = jnp.exp2(mr - jnp.max(mr))
            lsum = jnp.sum(w * lr)
            o = jnp.sum(w[:, None] * orow, axis=0) / jnp.where(lsum > 0, lsum, 1.0)
            masked_store(o_ref, (b, g * G + r, cols), o.astype(o_ref.dtype), col_ok)

        if G <= 8:
            for r in range(G):  # independent rows: their loads overlap
                one_row(r)
        else:
            lax.fori_loop(0, G, lambda r, c: (one_row(r), c)[1], 0)


@functools.partial(jax.jit, static_argnames=("sm_scale", "window", "logit_softcap", "interpret",
                                             "cfg", "page_size"))
def _sparse_attention(q, k_cache, v_cache, lengths, group_idx, block_table=None, out_init=None,
                      page_idx=None, page_count=None, *, sm_scale, window, interpret, cfg,
                      logit_softcap=None, page_size=None):
    """The kernel call. `out_init` (default zeros) is the buffer the kernel writes the selected
    heads into; tests pass a poisoned one to check what the kernel writes and what it leaves."""
    cfg = dict(cfg)
    B, Hq, D = q.shape
    if block_table is None:  # contiguous; the kernel's block-table input is a dummy
        _, Hkv, S, _ = k_cache.shape
        PS = MP = None
        block_table = jnp.zeros((B, 1), jnp.int32)
    else:
        Hkv, _, PS, _ = k_cache.shape
        MP = block_table.shape[1]
        S = MP * PS
    K = group_idx.shape[1]
    if page_idx is None:  # no page lists; the kernel's page-list inputs are dummies
        NL = None
        page_idx, page_count = jnp.zeros((B, K, 1), jnp.int32), jnp.zeros((B, K), jnp.int32)
    else:
        NL = page_idx.shape[2]
    G = Hq // Hkv
    Gp = max(16, next_pow2(G))
    Dp = max(16, next_pow2(D))
    NS = cfg["num_splits"]
    BK = cfg["block_k"]
    mode = "direct" if NS == 1 else cfg["combine"]
    kernel = functools.partial(
        _attn_kernel, K=K, Hkv=Hkv, S=S, PS=PS, MP=MP, LPS=page_size, NL=NL, G=G, Gp=Gp, D=D,
        Dp=Dp, BK=BK, NS=NS,
        W=window, scale_log2=float(sm_scale * LOG2E),
        cap_log2=None if logit_softcap is None else float(logit_softcap * LOG2E), mode=mode,
        evict=cfg["evict_first"],
        interpret=interpret)
    grid = (B * K * NS,)
    full = pl.BlockSpec()
    params = compiler_params(cfg["num_warps"], cfg["num_stages"])
    out_sds = jax.ShapeDtypeStruct((B, Hq, D), q.dtype)
    part_sds = [jax.ShapeDtypeStruct((B * K, NS, Gp, Dp), jnp.float32),
                jax.ShapeDtypeStruct((B * K, NS, Gp), jnp.float32),
                jax.ShapeDtypeStruct((B * K, NS, Gp), jnp.float32)]
    args = [lengths, group_idx, block_table, page_idx, page_count, q, k_cache, v_cache]
    zeros = jnp.zeros((B, Hq, D), q.dtype)
    if mode == "direct":
        out = pl.pallas_call(
            kernel, grid=grid, in_specs=[full] * 9, out_specs=full, out_shape=out_sds,
            input_output_aliases={8: 0}, compiler_params=params, interpret=interpret,
            name="sparse_decode_attention",
        )(*args, zeros if out_init is None else out_init)
        return out
    if mode == "kernel":
        outs = pl.pallas_call(
            kernel, grid=grid, in_specs=[full] * 10, out_specs=[full] * 5,
            out_shape=[out_sds, jax.ShapeDtypeStruct((B * K,), jnp.int32), *part_sds],
            input_output_aliases={8: 0, 9: 1}, compiler_params=params, interpret=interpret,
            name="sparse_decode_attention_splitk",
        )(*args, zeros if out_init is None else out_init, jnp.zeros((B * K,), jnp.int32))
        return outs[0]
    # mode == "xla": partials from the kernel, combine and scatter in plain JAX.
    op, mp, lp = pl.pallas_call(
        kernel, grid=grid, in_specs=[full] * 8, out_specs=[full] * 3, out_shape=part_sds,
        compiler_params=params, interpret=interpret, name="sparse_decode_attention_partials",
    )(*args)
    op = op[:, :, :G, :D].reshape(B, K, NS, G, D)
    mp = mp[:, :, :G].reshape(B, K, NS, G)
    lp = lp[:, :, :G].reshape(B, K, NS, G)
    mx = jnp.max(mp, axis=2, keepdims=True)
    w = jnp.exp2(mp - mx)
    lsum = jnp.sum(w * lp, axis=2)
    o = jnp.sum(w[..., None] * op, axis=2) / jnp.where(lsum > 0, lsum, 1.0)[..., None]
    gi = jnp.clip(group_idx, 0, Hkv - 1)
    out = (zeros if out_init is None else out_init).reshape(B, Hkv, G, D)
    out = out.at[jnp.arange(B)[:, None], gi].set(o.astype(q.dtype))
    return out.reshape(B, Hq, D)


# --------------------------------------------------------------------------------------------
# Public wrapper
# --------------------------------------------------------------------------------------------

def _check_page_list(page_idx, page_count, page_size, B: int, k: int, block_table) -> None:
    if (page_idx is None) != (page_count is None):
        raise ValueError("page_idx and page_count go together (page lists), or neither")
    if page_idx is None:
        if page_size is not None:
            raise ValueError("page_size applies only with page lists (page_idx)")
        return
    if getattr(page_idx, "ndim", None) != 3 or page_idx.shape[:2] != (B, k):
        raise ValueError(f"page_idx must have shape [B={B}, k={k}, n], got "
                         f"{getattr(page_idx, 'shape', None)}")
    if getattr(page_count, "shape", None) != (B, k):
        raise ValueError(f"page_count must have shape [B={B}, k={k}], got "
                         f"{getattr(page_count, 'shape', None)}")
    if page_idx.dtype != jnp.int32 or page_count.dtype != jnp.int32:
        raise TypeError(f"page_idx and page_count must be int32, got {page_idx.dtype}, "
                        f"{page_count.dtype}")
    if block_table is None and (isinstance(page_size, bool) or not isinstance(page_size, int)
                                or page_size < 1):
        raise ValueError(f"page lists over a contiguous cache need page_size, a positive int; "
                         f"got {page_size!r}")


def _check_args(q, k_cache, v_cache, lengths, group_idx, block_table, sliding_window,
                logit_softcap):
    for name, x, nd in (("q", q, 3), ("k_cache", k_cache, 4), ("v_cache", v_cache, 4)):
        if getattr(x, "ndim", None) != nd:
            raise ValueError(f"{name} must have {nd} dimensions, got shape {getattr(x, 'shape', None)}")
    B, Hq, D = q.shape
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {k_cache.shape} and v_cache {v_cache.shape} differ in shape")
    if block_table is None:
        Bk, Hkv, S, Dk = k_cache.shape
        if Bk != B or Dk != D:
            raise ValueError(f"cache shape {k_cache.shape} does not match q {q.shape}: expected "
                             f"[B={B}, Hkv, S, D={D}]")
    else:
        Hkv, pages, page_size, Dk = k_cache.shape
        if Dk != D:
            raise ValueError(f"page pool shape {k_cache.shape} does not match q {q.shape}: "
                             f"expected [Hkv, pages, page_size, D={D}]")
        if getattr(block_table, "ndim", None) != 2 or block_table.shape[0] != B:
            raise ValueError(f"block_table must have shape [B={B}, pages_per_seq], got "
                             f"{getattr(block_table, 'shape', None)}")
        if block_table.dtype != jnp.int32:
            raise TypeError(f"block_table must be int32, got {block_table.dtype}")
        S = block_table.shape[1] * page_size
    if Hkv < 1 or Hq % Hkv:
        raise ValueError(f"Hq={Hq} must be a multiple of Hkv={Hkv}")
    if S < 1 or D < 1 or B < 1:
        raise ValueError(f"empty shapes are not supported: q {q.shape}, cache {k_cache.shape}")
    if D > 256:
        raise ValueError(f"head dim D={D} > 256 is not supported")
    if jnp.dtype(q.dtype) not in FLOAT_DTYPES:
        raise TypeError(f"q dtype must be float32, bfloat16 or float16, got {q.dtype}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"q, k_cache, v_cache must share a dtype, got {q.dtype}, "
                        f"{k_cache.dtype}, {v_cache.dtype}")
    if getattr(lengths, "shape", None) != (B,):
        raise ValueError(f"lengths must have shape [B]=({B},), got {getattr(lengths, 'shape', None)}")
    if lengths.dtype != jnp.int32:
        raise TypeError(f"lengths must be int32, got {lengths.dtype}")
    if group_idx is not None:
        if getattr(group_idx, "ndim", None) != 2 or group_idx.shape[0] != B:
            raise ValueError(f"group_idx must have shape [B={B}, k], got "
                             f"{getattr(group_idx, 'shape', None)}")
        if group_idx.dtype != jnp.int32:
            raise TypeError(f"group_idx must be int32, got {group_idx.dtype}")
        k = group_idx.shape[1]
        if not 1 <= k <= Hkv:
            raise ValueError(f"group_idx selects k={k} groups per row; need 1 <= k <= Hkv={Hkv}")
    if sliding_window is not None:
        if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1:
            raise ValueError(f"sliding_window must be a positive int or None, got {sliding_window!r}")
    if logit_softcap is not None and (isinstance(logit_softcap, bool)
                                      or not isinstance(logit_softcap, (int, float))
                                      or not 0 < logit_softcap < math.inf):
        raise ValueError(f"logit_softcap must be a finite number > 0 or None, got {logit_softcap!r}")


def sparse_decode_attention(q, k_cache, v_cache, lengths, group_idx=None, *, block_table=None,
                            sm_scale=None, sliding_window=None, logit_softcap=None,
                            page_idx=None, page_count=None, page_size=None,
                            interpret=None, block_k=None,
                            num_splits=None, num_warps=None, num_stages=None, combine=None,
                            evict_first=None):
    """Decode attention over the selected KV groups of each row.

    Args:
      q: `[B, Hq, D]` query of the current token.
      k_cache, v_cache: `[B, Hkv, S, D]` caches (`Hq = Hkv * G`; head h reads group h // G),
        or with `block_table` page pools `[Hkv, pages, page_size, D]`.
      lengths: int32 `[B]` in `[0, S]`; row b attends to `[max(0, len - W), len)`.
      block_table: int32 `[B, pages_per_seq]` (paged: S = pages_per_seq * page_size); only
        the entries below each row's length are read (page ids are not range-checked).
      group_idx: int32 `[B, k]`, distinct KV groups per row (None: all groups). Values are
        clamped into range inside the kernel (a range check would need a host sync).
      sm_scale: softmax scale, default `1/sqrt(D)`.
      sliding_window: W, or None for no window.
      logit_softcap: c, the scores s (after the scale) become `c tanh(s / c)` before the
        softmax (Gemma 2); None: off.
      page_idx, page_count: int32 `[B, k, n]` and `[B, k]` (None: every page): slot j of row b
        reads only the positions of its logical pages `page_idx[b, j, :page_count[b, j]]`
        (page p: positions `[p * page_size, (p + 1) * page_size)`, still within the row's
        length and window); entries past the count are never read. Pages are not
        range-checked.
      page_size: the pages' size with page lists over a contiguous cache (a paged cache: its
        pool's).
      interpret: run the Pallas interpreter (None: when the default backend is the CPU).
      block_k, num_splits, num_warps, num_stages, combine, evict_first: tuning knobs, None =
        heuristic. `combine` is "kernel" (last split combines in the kernel) or "xla";
        `evict_first` marks K/V loads as first to leave the L2.

    Returns:
      `[B, Hq, D]` in `q.dtype`; exactly zero for unselected heads and rows of length 0.
    """
    _check_args(q, k_cache, v_cache, lengths, group_idx, block_table, sliding_window,
                logit_softcap)
    B, Hq, D = q.shape
    _check_page_list(page_idx, page_count, page_size, B,
                     (k_cache.shape[0 if block_table is not None else 1] if group_idx is None
                      else group_idx.shape[1]), block_table)
    if block_table is not None and page_idx is not None:
        if page_size not in (None, k_cache.shape[2]):
            raise ValueError(f"page_size {page_size} differs from the pool's {k_cache.shape[2]}")
        page_size = k_cache.shape[2]
    if block_table is None:
        Hkv, S = k_cache.shape[1], k_cache.shape[2]
    else:
        Hkv, S = k_cache.shape[0], block_table.shape[1] * k_cache.shape[2]
    if group_idx is None:
        group_idx = jnp.broadcast_to(jnp.arange(Hkv, dtype=jnp.int32), (B, Hkv))
    interpret = resolve_interpret(interpret)
    scale = (1.0 / math.sqrt(D)) if sm_scale is None else float(sm_scale)
    cfg = attention_config(B, group_idx.shape[1], S, D, Hq // Hkv, interpret=interpret,
                           block_k=block_k, num_splits=num_splits, num_warps=num_warps,
                           num_stages=num_stages, combine=combine, evict_first=evict_first)
    return _sparse_attention(q, k_cache, v_cache, lengths, group_idx, block_table, None,
                             page_idx, page_count, sm_scale=scale, window=sliding_window,
                             logit_softcap=logit_softcap, interpret=interpret,
                             cfg=tuple(sorted(cfg.items())), page_size=page_size)
