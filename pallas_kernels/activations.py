"""Activation functions by their Hugging Face names, shared by the models and the kernels.

Every function is plain `jax.numpy`, so it lowers inside Pallas kernels as well as in XLA.
"""

import math

import jax
import jax.numpy as jnp


def _gelu_erf(x):
    return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def _silu(x):
    return x * jax.nn.sigmoid(x)


ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": _gelu_erf,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "silu": _silu,
    "swish": _silu,
}


def get_activation(name: str):
    """The activation called `name` (a Hugging Face `hidden_act` / `activation_function` value)."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unsupported activation {name!r}; supported: {', '.join(sorted(ACTIVATIONS))}"
        ) from None
