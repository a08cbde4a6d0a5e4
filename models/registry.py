"""The model families, one record each (`models.family.Family`), and what dispatches on them:
parsing a `config.json`, building the model, its Hugging Face weight mapping, its sharding
axes and its benchmark shapes. Adding a family is a module with its `FAMILY` record, listed
in `FAMILIES` (docs/ARCHITECTURE.md, "Adding a family")."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from models import gemma, llama, opt, phi3
from models.config import Fields, ModelConfig
from models.family import Family
from models.hf_mapping import IGNORED, Specs
from polar_jax import validate

FAMILIES: tuple[Family, ...] = (opt.FAMILY, llama.FAMILY, phi3.FAMILY, gemma.FAMILY)
BY_MODEL_TYPE: dict[str, Family] = {t: f for f in FAMILIES for t in f.model_types}
SUPPORTED_MODEL_TYPES = tuple(sorted(BY_MODEL_TYPE))
# `bench decode --arch` name -> a Hugging Face config at the real shapes, from every family.
BENCH_SHAPES: dict[str, dict] = {name: hf for f in FAMILIES for name, hf in f.bench_shapes.items()}
# The families' own parameters' logical axes (`models.sharding.param_axes` reads them).
FAMILY_PARAM_AXES: dict[str, tuple[str, ...]] = {
    name: axes for f in FAMILIES for name, axes in f.param_axes.items()}


def family(model_type: Any) -> Family:
    """The family of a Hugging Face `model_type`, refused in one line naming the supported ones."""
    return BY_MODEL_TYPE[validate.string("config.json: 'model_type'", model_type,
                                         SUPPORTED_MODEL_TYPES)]


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Parses a Hugging Face `config.json` dict into its family's frozen config, checking the
    type and range of every field it reads."""
    validate.mapping("config.json", hf)
    model_type = hf.get("model_type")
    return family(model_type).parse_config(Fields(hf, model_type))


def build_model(config: ModelConfig, dtype=jnp.float32, abstract: bool = True):
    """The family's model for `config`, with parameters of `dtype`.

    `abstract=True` allocates nothing (shapes only): the usual first step before loading
    weights into it.
    """
    cls = family(config.model_type).model
    if abstract:
        return nnx.eval_shape(lambda: cls(config, dtype))
    return cls(config, dtype)


def param_specs(config: ModelConfig) -> Specs:
    """HF tensor name -> where and how it is stored, for every tensor the model needs."""
    return family(config.model_type).param_specs(config)


def canonical_name(name: str, config: ModelConfig) -> str | None:
    """Maps checkpoint names of base-model saves (`decoder.…`, `layers.…`) onto the
    causal-LM names `param_specs` uses; None for tensors that are safely ignored (rotary
    caches, a tied `lm_head` saved next to the embedding it equals)."""
    if IGNORED.match(name):
        return None
    if name == "lm_head.weight" and config.tie_word_embeddings:
        return None
    if not name.startswith(("model.", "lm_head.")):
        return "model." + name
    return name


def learned_positions(config: ModelConfig) -> bool:
    """Whether positions are a learned table (no position past `max_position_embeddings`)."""
    return family(config.model_type).positions.learned_offset is not None

