"""Flax NNX model definitions, one module per family (`models.registry` lists them): OPT,
the Llama family (Llama 2/3, Mistral, Qwen2, Qwen3), Phi-3, Gemma 2 and Gemma 3."""

from __future__ import annotations

from models.config import ModelConfig, RopeConfig
from models.registry import SUPPORTED_MODEL_TYPES, build_model, config_from_hf

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "ModelConfig",
    "RopeConfig",
    "build_model",
    "config_from_hf",
]
