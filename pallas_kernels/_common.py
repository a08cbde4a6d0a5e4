"""Helpers shared by the Pallas kernels: backend choice, Triton compiler params, small maths."""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

with warnings.catch_warnings():
    # `jax.experimental.pallas.triton` is deprecated in newer JAX but still the only
    # lowering that gathers rows with an integer vector index inside a kernel.
    warnings.simplefilter("ignore", DeprecationWarning)
    from jax.experimental.pallas import triton as plgpu

FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
LOG2E = 1.4426950408889634
NEG_INF = -1e30  # finite "minus infinity" for running maxima (keeps exp2(m - m') finite)
FALLBACK_SM_COUNT = 132  # an H100/H200 SXM: assumed when the device reports no core count
PROGRAMS_PER_SM = 2  # the split heuristics add splits until a launch has this many per SM


def resolve_interpret(interpret: bool | None) -> bool:
    """`None` means: interpret when the default backend is the CPU."""
    if interpret is None:
        return jax.default_backend() == "cpu"
    return bool(interpret)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.lru_cache(maxsize=None)
def sm_count() -> int:
    """Streaming multiprocessors of the default GPU (`FALLBACK_SM_COUNT` if it reports none)."""
    try:
        dev = jax.devices()[0]
        n = getattr(dev, "core_count", None)
        if n:
            return int(n)
    except Exception:  # pragma: no cover - no device
        pass
    return FALLBACK_SM_COUNT


def compiler_params(num_warps: int, num_stages: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def masked_load(ref, idx, mask, other, *, interpret: bool, volatile: bool = False,
                evict_first: bool = False):
    """`plgpu.load(ref.at[idx], mask=..., other=...)`.

    `volatile` (GPU only) reads around the L1 cache: for data other programs of the same launch
    wrote. `evict_first` marks streamed data as the first to leave the L2.
    """
    kwargs = {}
    if not interpret:
        if volatile:
            kwargs["volatile"] = True
        if evict_first:
            kwargs["eviction_policy"] = "evict_first"
    return plgpu.load(ref.at[idx], mask=mask, other=other, **kwargs)


def masked_store(ref, idx, val, mask):
    plgpu.store(ref.at[idx], val, mask=mask)


def barrier(interpret: bool):
    """CTA-wide barrier on the GPU; a no-op in interpret mode (programs run one at a time)."""
    if not interpret:
        plgpu.debug_barrier()


def atomic_add(ref, idx, val):
    return plgpu.atomic_add(ref, idx, val)


def erfc_nonneg(z):
    """erfc(z) for z >= 0 with fractional error < 1.2e-7 (Numerical Recipes' erfcc).

    `lax.erf` has no Triton lowering, so GELU with the exact erf uses this inside kernels.
    """
    t = 1.0 / (1.0 + 0.5 * z)
    poly = -z * z - 1.26551223 + t * (
        1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806 + t * (
            0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))))
    return t * jnp.exp(poly)


def gelu_erf_kernel(x):
    """0.5 * x * (1 + erf(x / sqrt(2))) written with erfc so that no cancellation occurs."""
    z = jnp.abs(x) * (1.0 / math.sqrt(2.0))
    e = erfc_nonneg(z)
    return 0.5 * x * jnp.where(x < 0, e, 2.0 - e)


__all__ = [
    "FLOAT_DTYPES", "LOG2E", "NEG_INF", "PROGRAMS_PER_SM", "resolve_interpret", "next_pow2",
    "cdiv", "sm_count",
    "compiler_params", "masked_load", "masked_store", "barrier", "atomic_add", "gelu_erf_kernel",
    "pl", "plgpu",
]
