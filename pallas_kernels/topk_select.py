"""Top-k selection without sorting: the indices of each row's k largest scores, as a Pallas
kernel.

Polar Sparsity needs, every decode step and layer, the set of neurons (or KV groups) with the
highest router scores; the kernels that use the set do not care about its order. `lax.top_k`
sorts the whole row (about 52 us for 16384 scores on an H200, per layer and step); this
kernel only finds the k-th largest value and compacts. One program per row:

- the scores become int32 keys whose signed order is the scores' order (16-bit keys for
  bfloat16 scores);
- the k-th largest key is built bit by bit from the top: one counting pass over the row per
  key bit, no sort;
- the keys above it, plus the first ties at it (lowest index first, as `lax.top_k`), are
  compacted with a prefix sum and scattered to their slots.

A row of up to `REGISTER_ROW_MAX` scores (padded to a power of two) is held whole in
registers and every pass is unrolled: H200, N = 16384: 22.5 us for float32 scores, 14.5 us
for bfloat16 (`lax.top_k`: 52 us). Triton unrolls the whole register row, so its compile time
grows with it (over 60 s for rows of 65536). A longer row is processed in chunks of
`ROW_CHUNK` inside loops, so the compiled code does not grow with N: each counting pass
re-reads the row chunk by chunk (from L1/L2), and the compaction runs chunk by chunk with a
carried running offset.

The result lists each row's selected indices in ascending order.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._common import (
    FLOAT_DTYPES, cdiv, compiler_params, masked_load, masked_store, next_pow2, pl,
    resolve_interpret,
)
from pallas_kernels.selection import order_key

__all__ = ["topk_indices", "topk_indices_reference"]

INT32_MIN = -(1 << 31)
REGISTER_ROW_MAX = 16384  # rows padded to at most this many scores are held in registers
ROW_CHUNK = 8192  # longer rows: the scores one loop iteration holds


def topk_indices_reference(scores, k: int):
    """Pure-`jnp` reference: `lax.top_k`'s indices (ties: lowest index first), ascending."""
    return jnp.sort(lax.top_k(scores.astype(jnp.float32), k)[1], axis=-1).astype(jnp.int32)


def row_chunk(N: int, chunk: int | None = None) -> int:
    """The scores a program holds at once for rows of N: the row padded to a power of two
    (at least 16) if that is at most `chunk` (None: `REGISTER_ROW_MAX`), else `chunk` (None:
    `ROW_CHUNK`)."""
    Np = max(16, next_pow2(N))
    return Np if Np <= (chunk or REGISTER_ROW_MAX) else (chunk or ROW_CHUNK)


def _kth_largest_key(count_at_least, K, key_bits, unrolled):
    """(t, count(key > t)) for t the K-th largest key. The sign decides first, then each lower
    bit of t from the top is set when count(key >= t) stays >= K; the count of the last
    candidate refused is the count above t (0 if none was). `unrolled`: one pass per bit in
    the code (the register row), else a loop over the bits."""

    def decide(cand, t, above):
        n = count_at_least(cand)
        return jnp.where(n >= K, cand, t), jnp.where(n >= K, above, n)

    lowest = jnp.int32(-(1 << (key_bits - 1)))  # the smallest key: all of its low bits clear
    state = decide(jnp.int32(0), lowest, jnp.int32(0))
    set_bit = lambda bit, state: decide(state[0] | (jnp.int32(1) << bit), *state)
    if unrolled:
        for bit in range(key_bits - 2, -1, -1):
            state = set_bit(bit, state)
        return state
    return lax.fori_loop(0, key_bits - 1, lambda i, s: set_bit(key_bits - 2 - i, s), state)


def _topk_kernel(s_ref, *refs, N, C, K, key_bits, interpret):
    o_ref = refs[-1]
    row = pl.program_id(0)
    lane = jnp.arange(C, dtype=jnp.int32)
    n_chunks = cdiv(N, C)

    def load_keys(c):
        """Chunk c's indices `[C]` and keys (padding: below every score's key)."""
        idx = c * C + lane
        valid = idx < N
        x = masked_load(s_ref, (row, idx), valid, 0.0, interpret=interpret).astype(jnp.float32)
        key = order_key(x)
        if key_bits == 16:  # bfloat16 scores: the low half of the float32 bits is zero
            key = key >> 16
        return idx, jnp.where(valid, key, jnp.int32(INT32_MIN))

    if n_chunks == 1:  # the row in registers: loaded once
        whole = load_keys(0)
        chunk_keys = lambda c: whole
    else:
        chunk_keys = load_keys

    def count_at_least(t):
        # Per-lane counts summed over the chunks; one reduction per pass (each costs about
        # 0.3 us on an H200 at N = 16384; the passes' dependency costs little, so deciding
        # several bits per pass with more reductions is slower, measured).
        hits = lambda c: (chunk_keys(c)[1] >= t).astype(jnp.int32)
        if n_chunks > 1:
            return jnp.sum(lax.fori_loop(1, n_chunks, lambda c, acc: acc + hits(c), hits(0)))
        return jnp.sum(hits(0))

    t, n_above = _kth_largest_key(count_at_least, K, key_bits, unrolled=n_chunks == 1)
    need = K - n_above  # ties taken, lowest indices first

    def compact(c, before=None):
        """Scatter chunk c's selected indices; `before`: the counts above t and at t in the
        chunks before it (None: the whole row is this chunk). Returns them after it."""
        idx, key = chunk_keys(c)
        above = (key > t).astype(jnp.int32)
        tie = (key == t).astype(jnp.int32)
        if C < (1 << 15):  # one prefix sum for both ranks: above's in the low 16 bits
            ranks = jnp.cumsum(above + (tie << 16))
            above_rank, tie_rank = ranks & 0xFFFF, ranks >> 16
        else:
            above_rank, tie_rank = jnp.cumsum(above), jnp.cumsum(tie)
        if before is not None:
            above_rank, tie_rank = above_rank + before[0], tie_rank + before[1]
        take = (above == 1) | ((tie == 1) & (tie_rank <= need))
        slot = above_rank + jnp.minimum(tie_rank, need) - 1
        # Lanes not taken aim at the spare slot K (never read back) rather than a real one.
        masked_store(o_ref, (row, jnp.where(take, slot, K)), idx, take)
        if before is not None:
            return before[0] + jnp.sum(above), before[1] + jnp.sum(tie)

    if n_chunks == 1:
        compact(0)
    else:
        lax.fori_loop(0, n_chunks, compact, (jnp.int32(0), jnp.int32(0)))


@functools.partial(jax.jit, static_argnames=("k", "chunk", "num_warps", "interpret"))
def _topk_call(scores, out_init=None, *, k, chunk=None, num_warps, interpret):
    """The kernel call on `[R, N]` scores, `row_chunk(N, chunk)` of them at a time. `out_init`
    `[R, k + 1]`, if given, is the buffer it writes into (tests pass a poisoned one);
    otherwise a fresh one."""
    R, N = scores.shape
    key_bits = 16 if scores.dtype == jnp.bfloat16 else 32
    kernel = functools.partial(_topk_kernel, N=N, C=row_chunk(N, chunk), K=k,
                               key_bits=key_bits, interpret=interpret)
    full = pl.BlockSpec()
    args = [scores] if out_init is None else [scores, out_init]
    out = pl.pallas_call(
        kernel, grid=(R,), in_specs=[full] * len(args), out_specs=full,
        out_shape=jax.ShapeDtypeStruct((R, k + 1), jnp.int32),
        input_output_aliases={} if out_init is None else {1: 0},
        compiler_params=compiler_params(num_warps, 1), interpret=interpret,
        name="topk_indices",
    )(*args)
    return out[:, :k]


def topk_indices(scores, k: int, *, interpret=None, num_warps=None, chunk=None):
    """Indices of the `k` largest scores of each row, ascending.

    Args:
      scores: `[N]` or `[R, N]` float32, bfloat16 or float16, no NaN.
      k: 1 <= k <= N (static).
      interpret: run the Pallas interpreter (None: when the default backend is the CPU).
      num_warps: warps per row's program (None: by the scores it holds at once).
      chunk: a power of two >= 16: rows padded to at most this many scores are held whole in
        registers, longer ones processed in chunks of it (None: `REGISTER_ROW_MAX` and
        `ROW_CHUNK`; tuning).

    Returns:
      int32 `[k]` or `[R, k]`: the same set as `lax.top_k(scores, k)[1]` (ties at the k-th
      value go to the lowest indices), in ascending order.
    """
    if getattr(scores, "ndim", None) not in (1, 2):
        raise ValueError(f"scores must be [N] or [R, N], got shape {getattr(scores, 'shape', None)}")
    if jnp.dtype(scores.dtype) not in FLOAT_DTYPES:
        raise TypeError(f"scores must be float32, bfloat16 or float16, got {scores.dtype}")
    N = scores.shape[-1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= N:
        raise ValueError(f"k must be an int with 1 <= k <= N={N}, got {k!r}")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int)
                              or chunk < 16 or chunk != next_pow2(chunk)):
        raise ValueError(f"chunk must be a power of two >= 16, got {chunk!r}")
    if num_warps is None:
        num_warps = min(16, max(1, row_chunk(N, chunk) // 1024))
    out = _topk_call(scores.reshape(-1, N), k=k, chunk=chunk, num_warps=num_warps,
                     interpret=resolve_interpret(interpret))
    return out.reshape(scores.shape[:-1] + (k,))
