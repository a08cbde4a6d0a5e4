"""Parameter and compute dtypes by name."""

import jax
import jax.numpy as jnp

from polar_jax.errors import PolarJaxError

DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}


def parse_dtype(name: str):
    """The jnp dtype called `name` (bfloat16, float16 or float32)."""
    try:
        return DTYPES[name]
    except KeyError:
        raise PolarJaxError(f"unsupported dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


def default_compute_dtype():
    """float32 on a CPU (exact evaluation), bfloat16 on an accelerator."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
