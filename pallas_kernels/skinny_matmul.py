"""The skinny matmuls of batched decoding, `x [M, K] @ w` for M of 1 to 128 rows, as one
Pallas kernel that streams the weights once.

At decode's batch sizes every projection (Q/K/V, output, MLP, the routers' first projection)
reads far more weight bytes than it computes: it is a memory stream, and what matters is
keeping enough bytes in flight on every SM. The kernel:

- one program per (block of `block_n` output columns, K-split): the program streams its
  `[block_k, block_n]` weight tiles (or `[block_n, block_k]` for neuron-major weights, whose
  rows are contiguous along K) through a float32 tensor-core dot against the matching `[M, block_k]`
  tile of x (the batch padded to at least 16 rows, masked);
- the split count is chosen so that the launch has enough programs to fill the GPU while the
  float32 partials stay small beside the weights; each split writes its partial `[M, N]` and
  the wrapper sums them (XLA fuses the sum into whatever consumes the result: bias, cast);
- either weight layout: "kn" (`w [K, N]`: Q/K/V `[d, Hkv (G + 2) D]`, output `[Hq D, d]`, the
  MLP's down projection) or "nk" (`w [N, K]`: a neuron-major MLP's up projection).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels._common import (
    FLOAT_DTYPES, PROGRAMS_PER_SM, cdiv, compiler_params, masked_load, masked_store, next_pow2,
    pl, resolve_interpret, sm_count,
)

__all__ = ["skinny_matmul", "skinny_matmul_reference", "skinny_config", "MAX_ROWS", "LAYOUTS"]

MAX_ROWS = 128  # beyond this a decode matmul is a GEMM: XLA's
LAYOUTS = ("kn", "nk")
PARTIAL_SHARE = 1 / 16  # the split partials' bytes at most this share of the weights'


def skinny_matmul_reference(x, w, *, layout: str = "kn"):
    """Pure-`jnp` reference: `x @ w` (layout "kn") or `x @ w.T` ("nk") in float32."""
    w = w if layout == "kn" else w.T
    return jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32), precision=lax.Precision.HIGHEST)


def skinny_config(M: int, K: int, N: int, *, layout: str, interpret: bool = False,
                  overrides: dict | None = None) -> dict:
    """Tiles and the K-split count for `x [M, K] @ w` (any key may be overridden)."""
    if interpret:
        cfg = dict(block_n=32, block_k=32, splits=1, num_warps=4, num_stages=1)
    else:
        # H200, bfloat16, one row, best of a sweep (XLA's einsum in brackets): neuron-major
        # 16384 x 4096 33.7 us (39.3); [4096, 12288] 25.8 (40.2); [4096, 4096] 10.6 (12.3);
        # [16384, 4096] 32.6 (34.1); [4096, 1056] 5.3 (14.1). At 16 and 64 rows within 2 us of XLA.
        if layout == "nk":
            cfg = dict(block_n=64, block_k=128, num_warps=4, num_stages=4)
        elif N >= 8192:
            cfg = dict(block_n=128, block_k=128, num_warps=8, num_stages=4)
        else:
            cfg = dict(block_n=64 if N >= 2048 else 32, block_k=64, num_warps=4, num_stages=6)
        cfg.update(overrides or {})
        # Fewer column blocks than half the SMs: K-splits, up to two programs per SM, each split
        # at least 4 K tiles, the float32 partials (splits x M x N x 4 bytes) a small share of
        # the weights' bytes. (Measured: [4096, 12288], 96 blocks, is fastest unsplit.)
        programs = cdiv(N, cfg["block_n"])
        most = max(1, int(PARTIAL_SHARE * K * 2 / (max(16, M) * 4)))
        splits = 1
        while (2 * programs < sm_count() and 2 * programs * splits <= PROGRAMS_PER_SM * sm_count()
               and 2 * splits <= most and K // (2 * splits) >= 4 * cfg["block_k"]):
            splits *= 2
        cfg["splits"] = splits
    cfg.update(overrides or {})
    return cfg


def _kernel(x_ref, w_ref, o_ref, *, M, K, N, BM, BN, BK, S, layout, interpret):
    pid = pl.program_id(0)
    nb, s = pid // S, pid % S
    rows = jnp.arange(BM, dtype=jnp.int32)
    row_ok = rows < M
    cols = nb * BN + jnp.arange(BN, dtype=jnp.int32)
    col_ok = cols < N
    k_per = cdiv(cdiv(K, S), BK) * BK
    k0 = s * k_per
    n_chunks = (jnp.clip(K - k0, 0, k_per) + BK - 1) // BK
    offs = jnp.arange(BK, dtype=jnp.int32)
    prec = lax.Precision.HIGHEST if x_ref.dtype == jnp.float32 else None

    def body(c, acc):
        ks = k0 + c * BK + offs
        k_ok = ks < K
        xt = masked_load(x_ref, (rows[:, None], ks[None, :]), row_ok[:, None] & k_ok[None, :],
                         0.0, interpret=interpret)
        if layout == "kn":
            wt = masked_load(w_ref, (ks[:, None], cols[None, :]), k_ok[:, None] & col_ok[None, :],
                             0.0, interpret=interpret)
            dims = (((1,), (0,)), ((), ()))
        else:
            wt = masked_load(w_ref, (cols[:, None], ks[None, :]), col_ok[:, None] & k_ok[None, :],
                             0.0, interpret=interpret)
            dims = (((1,), (1,)), ((), ()))
        return acc + lax.dot_general(xt, wt, dims, precision=prec,
                                     preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, n_chunks, body, jnp.zeros((BM, BN), jnp.float32))
    masked_store(o_ref, (s, rows[:, None], cols[None, :]), acc, row_ok[:, None] & col_ok[None, :])


@functools.partial(jax.jit, static_argnames=("layout", "interpret", "cfg"))
def _call(x, w, out_init=None, *, layout, interpret, cfg):
    cfg = dict(cfg)
    M, K = x.shape
    N = w.shape[1] if layout == "kn" else w.shape[0]
    BN, BK, S = cfg["block_n"], cfg["block_k"], cfg["splits"]
    kernel = functools.partial(_kernel, M=M, K=K, N=N, BM=max(16, next_pow2(M)), BN=BN, BK=BK,
                               S=S, layout=layout, interpret=interpret)
    full = pl.BlockSpec()
    args = [x, w] if out_init is None else [x, w, out_init]
    partials = pl.pallas_call(
        kernel if out_init is None else (lambda x_ref, w_ref, _, o_ref: kernel(x_ref, w_ref, o_ref)),
        grid=(cdiv(N, BN) * S,), in_specs=[full] * len(args), out_specs=full,
        out_shape=jax.ShapeDtypeStruct((S, M, N), jnp.float32),
        input_output_aliases={} if out_init is None else {2: 0},
        compiler_params=compiler_params(cfg["num_warps"], cfg["num_stages"]),
        interpret=interpret, name="skinny_matmul",
    )(*args)
    return partials[0] if S == 1 else jnp.sum(partials, axis=0)


def skinny_matmul(x, w, *, layout: str = "kn", interpret=None, config: dict | None = None):
    """`x @ w` (layout "kn", `w [K, N]`) or `x @ w.T` ("nk", `w [N, K]`), float32.

    Args:
      x: `[M, K]`, 1 <= M <= `MAX_ROWS`.
      w: `[K, N]` or `[N, K]` by `layout`; x's dtype (float32, bfloat16 or float16).
      interpret: run the Pallas interpreter (None: when the default backend is the CPU).
      config: overrides of `skinny_config`'s tiles and splits (tuning).

    Returns:
      float32 `[M, N]`, accumulated in float32.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if getattr(x, "ndim", None) != 2 or getattr(w, "ndim", None) != 2:
        raise ValueError(f"x and w must be 2-D, got shapes {getattr(x, 'shape', None)} and "
                         f"{getattr(w, 'shape', None)}")
    M, K = x.shape
    wk = w.shape[0] if layout == "kn" else w.shape[1]
    if wk != K or min(M, K, *w.shape) < 1:
        raise ValueError(f"x {x.shape} and w {w.shape} (layout {layout!r}) do not chain")
    if M > MAX_ROWS:
        raise ValueError(f"x has {M} rows; skinny_matmul takes at most {MAX_ROWS}")
    if jnp.dtype(x.dtype) not in FLOAT_DTYPES or w.dtype != x.dtype:
        raise TypeError(f"x and w must share a float dtype (float32, bfloat16, float16), got "
                        f"{x.dtype} and {w.dtype}")
    interpret = resolve_interpret(interpret)
    N = w.shape[1] if layout == "kn" else w.shape[0]
    cfg = skinny_config(M, K, N, layout=layout, interpret=interpret, overrides=config)
    return _call(x, w, layout=layout, interpret=interpret, cfg=tuple(sorted(cfg.items())))
