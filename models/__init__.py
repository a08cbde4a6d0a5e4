"""Flax NNX model definitions: OPT and the Llama family (Llama 2/3, Qwen2, Mistral)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from models.config import (
    SUPPORTED_MODEL_TYPES,
    LlamaConfig,
    ModelConfig,
    OPTConfig,
    RopeConfig,
    config_from_hf,
)
from models.llama import LlamaModel
from models.opt import OPTModel


def build_model(config: ModelConfig, dtype=jnp.float32, abstract: bool = True):
    """The family's model for `config`, with parameters of `dtype`.

    `abstract=True` allocates nothing (shapes only): the usual first step before loading
    weights into it.
    """
    cls = OPTModel if isinstance(config, OPTConfig) else LlamaModel
    if abstract:
        return nnx.eval_shape(lambda: cls(config, dtype))
    return cls(config, dtype)


__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "LlamaConfig",
    "LlamaModel",
    "ModelConfig",
    "OPTConfig",
    "OPTModel",
    "RopeConfig",
    "build_model",
    "config_from_hf",
]
