"""Writing one decode step's K and V into the KV cache, in place, as one Pallas kernel.

Each decode step appends one token per sequence: row b's new k, v `[Hkv, D]` go to cache slot
`positions[b]` of every KV group (later tokens may select any group). XLA lowers that to two
scatters over the `[B, Hkv, S, D]` caches (about 5 us each at B = 64, for 1 MB of writes); this
kernel writes both in one launch of B programs, aliasing the caches so that nothing else moves.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels._common import (
    FLOAT_DTYPES, compiler_params, masked_load, masked_store, next_pow2, pl, resolve_interpret,
)

__all__ = ["write_kv_token", "write_kv_token_reference"]


def write_kv_token_reference(k_cache, v_cache, k, v, positions):
    """Pure-`jnp` reference: `cache[b, :, positions[b]] = new[b]` for K and V (a row whose
    position is outside `[0, S)` is left as it was)."""
    rows = jnp.arange(k.shape[0])
    S = k_cache.shape[2]
    slots = jnp.where((positions >= 0) & (positions < S), positions, S)  # S: dropped
    return tuple(c.at[rows, :, slots].set(x.astype(c.dtype), mode="drop")
                 for c, x in ((k_cache, k), (v_cache, v)))


def _kernel(pos_ref, k_ref, v_ref, kc_in, vc_in, kc_ref, vc_ref, *, H, Hp, S, D, Dp,
            interpret):
    del kc_in, vc_in  # aliased to kc_ref, vc_ref
    b = pl.program_id(0)
    pos = pos_ref[b]
    heads = jnp.arange(Hp, dtype=jnp.int32)[:, None]
    cols = jnp.arange(Dp, dtype=jnp.int32)[None, :]
    ok = (heads < H) & (cols < D)
    for new_ref, cache_ref in ((k_ref, kc_ref), (v_ref, vc_ref)):
        x = masked_load(new_ref, (b, heads, cols), ok, 0.0, interpret=interpret)
        masked_store(cache_ref, (b, heads, pos, cols), x.astype(cache_ref.dtype),
                     ok & (pos >= 0) & (pos < S))


@functools.partial(jax.jit, static_argnames=("interpret",))
def _write(k_cache, v_cache, k, v, positions, *, interpret):
    B, H, S, D = k_cache.shape
    Hp, Dp = max(2, next_pow2(H)), max(16, next_pow2(D))
    kernel = functools.partial(_kernel, H=H, Hp=Hp, S=S, D=D, Dp=Dp, interpret=interpret)
    full = pl.BlockSpec()
    sds = jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype)
    return pl.pallas_call(
        kernel, grid=(B,), in_specs=[full] * 5, out_specs=[full, full], out_shape=[sds, sds],
        input_output_aliases={3: 0, 4: 1}, compiler_params=compiler_params(min(4, max(1, Hp * Dp // 1024)), 1),
        interpret=interpret, name="write_kv_token",
    )(positions, k, v, k_cache, v_cache)


def write_kv_token(k_cache, v_cache, k, v, positions, *, interpret=None):
    """The caches with each row's new K and V written at its position (in place where the old
    caches are dead afterwards, e.g. loop state inside a jit; called eagerly, XLA copies them).

    Args:
      k_cache, v_cache: `[B, Hkv, S, D]`, one dtype.
      k, v: `[B, Hkv, D]` (cast to the cache dtype).
      positions: int32 `[B]`; a row whose position is outside `[0, S)` writes nothing.
      interpret: run the Pallas interpreter (None: when the default backend is the CPU).

    Returns:
      `(k_cache, v_cache)`.
    """
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if getattr(c, "ndim", None) != 4:
            raise ValueError(f"{name} must be [B, Hkv, S, D], got shape {getattr(c, 'shape', None)}")
    if v_cache.shape != k_cache.shape or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"k_cache {k_cache.shape} {k_cache.dtype} and v_cache {v_cache.shape} "
                         f"{v_cache.dtype} differ")
    if jnp.dtype(k_cache.dtype) not in FLOAT_DTYPES:
        raise TypeError(f"cache dtype must be float32, bfloat16 or float16, got {k_cache.dtype}")
    B, H, _, D = k_cache.shape
    for name, x in (("k", k), ("v", v)):
        if getattr(x, "shape", None) != (B, H, D):
            raise ValueError(f"{name} must be [B={B}, Hkv={H}, D={D}], got shape "
                             f"{getattr(x, 'shape', None)}")
    if getattr(positions, "shape", None) != (B,) or positions.dtype != jnp.int32:
        raise ValueError(f"positions must be int32 [B={B}], got "
                         f"{getattr(positions, 'dtype', None)} {getattr(positions, 'shape', None)}")
    return tuple(_write(k_cache, v_cache, k, v, positions,
                        interpret=resolve_interpret(interpret)))
