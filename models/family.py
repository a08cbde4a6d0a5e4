"""The record a model family registers (`models.registry` holds them, one per family).

A family module (`models/opt.py`, `models/llama.py`, ...) holds its config parser, its Flax
model and its Hugging Face weight mapping side by side, and ends with its `FAMILY` record.
A record missing a field fails when its module is imported, naming the family and the field.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

_MISSING: Any = object()


@dataclasses.dataclass(frozen=True)
class Positions:
    """How a family encodes positions: a learned table stored shifted by `learned_offset`
    (None: rotary, which runs past `max_position_embeddings`), and the rope types
    (`rope_parameters.rope_type`) its parser accepts (`rope_aliases`: older spellings)."""

    learned_offset: int | None = None
    rope_types: tuple[str, ...] = ()
    rope_aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family.

    name: what the README and errors call it.
    model_types: the Hugging Face `model_type`s it accepts.
    parse_config: `(models.config.Fields) -> ModelConfig`, every field checked.
    model: the Flax module, `model(config, dtype)`.
    param_specs: `(config) -> {HF tensor name: models.hf_mapping.ParamSpec}`.
    param_axes: the logical axes (`models.sharding.RULES`) of the parameters only this family
      has, by name as in `models.sharding.PARAM_AXES` ({} where it has none).
    positions: its `Positions`.
    bench_shapes: `bench decode --arch` name -> a Hugging Face config at the real shapes.
    """

    name: str = _MISSING
    model_types: tuple[str, ...] = _MISSING
    parse_config: Callable = _MISSING
    model: type = _MISSING
    param_specs: Callable = _MISSING
    param_axes: Mapping[str, tuple[str, ...]] = _MISSING
    positions: Positions = _MISSING
    bench_shapes: Mapping[str, dict] = _MISSING

    def __post_init__(self):
        missing = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is _MISSING]
        if missing:
            name = "?" if self.name is _MISSING else self.name
            raise TypeError(f"model family {name!r} is missing registry field(s) "
                            f"{', '.join(missing)}")
