"""The batch's neuron scores from the MLP router's hidden state, as one Pallas kernel.

Polar Sparsity picks one set of MLP neurons for the whole batch from the router's logits
`h @ w_up.T` (`[B, N]`): each neuron's score is the sum over the batch of
`relu(logit) + tie_break * sigmoid(logit)`. In XLA that is a GEMM writing `[B, N]` float32
logits and a reduction reading them back; this kernel streams `w_up` once and reduces each
neuron block over the batch in registers, writing only the `[N]` scores:

- `w_up` is neuron-major `[N, r]` (a neuron's router weights are one contiguous row), so a
  program streams one contiguous slab; in h's dtype, or int8 with a float32 `scale [N]` per
  neuron (`quantize_rows`: half the bytes of bfloat16; each tile converted to h's dtype,
  exactly, before the dot, the scale applied to the float32 logits);
- one program per block of `block_n` neurons: the float32 tensor-core dot of the whole batch
  `h [B, r]` with the block's `[block_n, r]` rows, in chunks of `block_k` columns;
- the epilogue applies the selection rule's `neuron_score` (relu + tie_break * sigmoid),
  zeroes inactive rows, sums over the batch and rounds to bfloat16 (the dtype `topk_indices`
  searches fastest).
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
from pallas_kernels.selection import neuron_score

__all__ = ["neuron_scores", "neuron_scores_reference", "quantize_rows"]

INT8_MAX = 127


@jax.jit
def quantize_rows(w):
    """(int8 `[N, r]`, float32 scale `[N]`) of `w [N, r]`: symmetric, per row, the row's largest
    magnitude mapped to 127 (`w ~ q * scale[:, None]`, error at most scale / 2; a row of zeros
    gets scale 0)."""
    w = jnp.asarray(w, jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=1) / INT8_MAX
    q = jnp.round(w / jnp.where(scale > 0, scale, 1.0)[:, None])
    return jnp.clip(q, -INT8_MAX, INT8_MAX).astype(jnp.int8), scale


def neuron_scores_reference(h, w_up, active, *, tie_break: float, scale=None):
    """Pure-`jnp` reference: `sum_b active[b] * (relu(l) + tie_break * sigmoid(l))` of the
    float32 logits `l = (h @ w_up.T) * scale` (no scale: 1), rounded to bfloat16."""
    logits = jnp.dot(h.astype(jnp.float32), w_up.astype(jnp.float32).T,
                     precision=lax.Precision.HIGHEST)
    if scale is not None:
        logits = logits * scale
    per_row = jnp.where(active[:, None], neuron_score(logits, tie_break), 0.0)
    return jnp.sum(per_row, axis=0).astype(jnp.bfloat16)


def _kernel(*refs, B, Bp, r, N, BN, BK, tie_break, interpret):
    """refs: h, w_up, [scale,] active, out."""
    h_ref, w_ref, act_ref, o_ref = refs[0], refs[1], refs[-2], refs[-1]
    scale_ref = refs[2] if len(refs) == 5 else None
    j = pl.program_id(0)
    cols = j * BN + jnp.arange(BN, dtype=jnp.int32)
    col_ok = cols < N
    rows = jnp.arange(Bp, dtype=jnp.int32)
    row_ok = rows < B
    live = masked_load(act_ref, (rows,), row_ok, 0, interpret=interpret) != 0
    prec = lax.Precision.HIGHEST if h_ref.dtype == jnp.float32 else None
    offs = jnp.arange(BK, dtype=jnp.int32)

    def body(c, acc):
        ks = c * BK + offs
        k_ok = ks < r
        ht = masked_load(h_ref, (rows[:, None], ks[None, :]), row_ok[:, None] & k_ok[None, :],
                         0.0, interpret=interpret)
        wt = masked_load(w_ref, (cols[:, None], ks[None, :]), col_ok[:, None] & k_ok[None, :],
                         jnp.zeros((), w_ref.dtype), interpret=interpret).astype(ht.dtype)
        return acc + lax.dot_general(ht, wt, (((1,), (1,)), ((), ())), precision=prec,
                                     preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, cdiv(r, BK), body, jnp.zeros((Bp, BN), jnp.float32))
    if scale_ref is not None:
        acc = acc * masked_load(scale_ref, (cols,), col_ok, 0.0, interpret=interpret)[None, :]
    per_row = jnp.where((row_ok & live)[:, None], neuron_score(acc, tie_break), 0.0)
    masked_store(o_ref, (cols,), jnp.sum(per_row, axis=0).astype(o_ref.dtype), col_ok)


def _config(Bp: int, interpret: bool) -> dict:
    if interpret:
        return dict(block_n=32, block_k=32, num_warps=4, num_stages=1)
    # Whole-batch tiles: [Bp, block_n] float32 accumulators. H200, N = 16384, r = 1024 (33.5 MB):
    # 11.2 / 11.1 / 12.7 / 15.1 us at B = 1 / 16 / 64 / 128 (XLA's GEMM + reduction: 14.3 /
    # 12.3 / 12.9 / 19.3 us).
    if Bp <= 64:
        return dict(block_n=64, block_k=128, num_warps=4, num_stages=3)
    return dict(block_n=64 if Bp <= 128 else 32, block_k=64, num_warps=8, num_stages=4)


@functools.partial(jax.jit, static_argnames=("tie_break", "interpret", "cfg"))
def _call(h, w_up, scale, active, out_init=None, *, tie_break, interpret, cfg):
    cfg = dict(cfg)
    B, r = h.shape
    N = w_up.shape[0]
    Bp = max(16, next_pow2(B))
    BN, BK = cfg["block_n"], cfg["block_k"]
    kernel = functools.partial(_kernel, B=B, Bp=Bp, r=r, N=N, BN=BN, BK=BK,
                               tie_break=float(tie_break), interpret=interpret)
    full = pl.BlockSpec()
    args = [h, w_up] + ([] if scale is None else [scale]) + [active.astype(jnp.int32)]
    inputs = len(args)
    if out_init is not None:  # tests pass a poisoned buffer
        args.append(out_init)
    return pl.pallas_call(
        kernel if out_init is None else (lambda *refs: kernel(*refs[:inputs], refs[-1])),
        grid=(cdiv(N, BN),), in_specs=[full] * len(args), out_specs=full,
        out_shape=jax.ShapeDtypeStruct((N,), jnp.bfloat16),
        input_output_aliases={} if out_init is None else {inputs: 0},
        compiler_params=compiler_params(cfg["num_warps"], cfg["num_stages"]),
        interpret=interpret, name="neuron_scores",
    )(*args)


def neuron_scores(h, w_up, active, *, tie_break: float, scale=None, interpret=None):
    """Each neuron's score for the batch: `sum_b active[b] * (relu(l[b, n]) + tie_break *
    sigmoid(l[b, n]))` with `l = (h @ w_up.T) * scale` accumulated in float32.

    Args:
      h: `[B, r]`, the MLP router's hidden state (its first projection), one row per sequence.
      w_up: `[N, r]`, the router's second projection, neuron-major; h's dtype, or int8 with
        `scale` (`quantize_rows`).
      active: bool `[B]`; inactive rows (finished sequences) add nothing.
      tie_break: the weight of the summed sigmoid (ranks neurons no row scores positive).
      scale: float32 `[N]`, each neuron's scale; given exactly when w_up is int8.
      interpret: run the Pallas interpreter (None: when the default backend is the CPU).

    Returns:
      bfloat16 `[N]`.
    """
    if getattr(h, "ndim", None) != 2 or getattr(w_up, "ndim", None) != 2:
        raise ValueError(f"h must be [B, r] and w_up [N, r], got shapes "
                         f"{getattr(h, 'shape', None)} and {getattr(w_up, 'shape', None)}")
    B, r = h.shape
    if w_up.shape[1] != r or B < 1 or r < 1 or w_up.shape[0] < 1:
        raise ValueError(f"h {h.shape} and w_up {w_up.shape} do not chain: need [B, r] and [N, r]")
    if jnp.dtype(h.dtype) not in FLOAT_DTYPES or w_up.dtype not in (h.dtype, jnp.int8):
        raise TypeError(f"h must be float32, bfloat16 or float16 and w_up of h's dtype or int8, "
                        f"got {h.dtype} and {w_up.dtype}")
    if (scale is None) != (w_up.dtype != jnp.int8):
        raise TypeError(f"scale must be given exactly when w_up is int8; w_up is {w_up.dtype}, "
                        f"scale {None if scale is None else scale.dtype}")
    if scale is not None and scale.dtype != jnp.float32:
        raise TypeError(f"scale must be float32, got {scale.dtype}")
    if scale is not None and scale.shape != (w_up.shape[0],):
        raise ValueError(f"scale must have shape [N]=({w_up.shape[0]},), got {scale.shape}")
    if getattr(active, "shape", None) != (B,):
        raise ValueError(f"active must have shape [B]=({B},), got {getattr(active, 'shape', None)}")
    interpret = resolve_interpret(interpret)
    cfg = _config(max(16, next_pow2(B)), interpret)
    return _call(h, w_up, scale, active, tie_break=tie_break, interpret=interpret,
                 cfg=tuple(sorted(cfg.items())))
