"""The dtypes parameters are stored and computed in, by name: one registry for the converter,
the loader, the Python API and every command's `--dtype` choices. A leaf module (numpy and
ml_dtypes only; JAX is imported where the default needs the backend)."""

import ml_dtypes
import numpy as np

from polar_jax.errors import PolarJaxError

DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16),
          "float32": np.dtype(np.float32)}


def parse_dtype(name: str) -> np.dtype:
    """The dtype called `name` (bfloat16, float16 or float32)."""
    try:
        return DTYPES[name]
    except KeyError:
        raise PolarJaxError(f"unsupported dtype {name!r}; choose one of {', '.join(DTYPES)}") from None


def default_compute_dtype() -> np.dtype:
    """float32 on a CPU (exact evaluation), bfloat16 on an accelerator."""
    import jax

    return DTYPES["float32" if jax.default_backend() == "cpu" else "bfloat16"]
