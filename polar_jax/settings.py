"""What generation and evaluation take besides the model: the defaults, read by the Python API
and by the command line's options alike, and the checks of every value, shared by both (the
API calls them, the CLI's argparse types are built from them).

No JAX import: building the command line's parser (and `polar-jax --help`) stays fast.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
from typing import Any

import numpy as np

from polar_jax import validate
from polar_jax.errors import PolarJaxError

INT32_MAX = 2**31 - 1  # token counts and top-k travel as int32
# The MLP router's second projection: in the compute dtype, or int8 rows with a float32 scale
# per neuron (`Routers.unstack(int8_mlp_up=True)`); by default int8 wherever there is an MLP
# router (`SparsitySettings.router_weights_for`).
ROUTER_WEIGHTS = ("compute", "int8")
DEFAULT_ATTN_TOPK = 0.5  # of the KV groups, for routers without a calibrated per-layer budget
DEFAULT_PAGE_MIN_CONTEXT = 1024  # = pallas_kernels.page_selection.DEFAULT_MIN_CONTEXT
DEFAULT_PAGE_SIZE = 16  # tokens per KV page (evaluation's and generation's page sparsity)


def layers(name: str, value: Any) -> tuple[int, ...]:
    """`value` as a tuple of layer numbers >= 0 (the model's own range is checked on load)."""
    return tuple(validate.integer(f"{name}[{i}]", layer, low=0)
                 for i, layer in enumerate(validate.listing(name, value)))


_FRACTION = (validate.number, dict(low=0, high=1, low_open=True))
CHECKS = {  # setting: (check, limits)
    "max_new_tokens": (validate.integer, dict(low=1, high=INT32_MAX)),
    "temperature": (validate.number, dict(low=0)),
    "top_k": (validate.integer, dict(low=0, high=INT32_MAX)),
    "top_p": _FRACTION,
    "seed": (validate.integer, dict(low=0, high=2**32 - 1)),
    "batch_size": (validate.integer, dict(low=1)),
    "attn_topk": _FRACTION,
    "dense_layers": (layers, {}),
    "mlp_batch_size": (validate.integer, dict(low=1)),
    "router_weights": (validate.string, dict(choices=ROUTER_WEIGHTS)),
    "page_topk": _FRACTION,
    "page_budget": (validate.integer, dict(low=1, high=INT32_MAX)),
    "page_min_context": (validate.integer, dict(low=0, high=INT32_MAX)),
    "page_size": (validate.integer, dict(low=1, high=65536)),
    "seq_len": (validate.integer, dict(low=2)),
    "max_tokens": (validate.integer, dict(low=2)),
}


def check(name: str, value: Any):
    """`value` of the setting `name`, checked against its limits in `CHECKS`."""
    checker, limits = CHECKS[name]
    return checker(name, value, **limits)


def cli_type(name: str, parse=int):
    """The argparse `type=` of the setting `name`: the text parsed by `parse`, then `check`ed."""
    checker, limits = CHECKS[name]
    return validate.cli_type(checker, parse, **limits)


def parse_layers(text: str) -> tuple[int, ...]:
    """"0,3" -> (0, 3); "" -> () (no dense layer)."""
    return tuple(int(part) for part in text.split(",") if part.strip())


class _Checked:
    """Checks every field with `check` on construction; None passes for a field whose default
    is None (meaning unset)."""

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None or field.default is not None:
                object.__setattr__(self, field.name, check(field.name, value))


@dataclasses.dataclass(frozen=True)
class GenerationSettings(_Checked):
    """Sampling and batching of `polar_jax.generate` and `polar-jax generate`. temperature 0 is
    greedy; top_k 0 and top_p 1 cut nothing; batch_size None decodes all prompts at once."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int | None = None


@dataclasses.dataclass(frozen=True)
class SparsitySettings(_Checked):
    """Polar Sparsity with routers: the fraction of KV groups each sequence reads (None:
    `DEFAULT_ATTN_TOPK`, or the routers' own where they carry a calibrated per-layer budget),
    the layers whose attention stays dense (None: layer 0, or none with a calibrated budget),
    (evaluation) the batch size whose calibrated MLP k is used, and how the MLP router's
    second projection is stored (`ROUTER_WEIGHTS`; None: `router_weights_for`'s default)."""

    attn_topk: float | None = None
    dense_layers: tuple[int, ...] | None = None
    mlp_batch_size: int = 1
    router_weights: str | None = None

    def router_weights_for(self, has_mlp_router: bool) -> str:
        """`router_weights` as given, else int8 for routers with an MLP router (non-gated MLPs)
        and compute for the others. int8 by default, measured: opt-6.7b B 1 sparse decode
        1.28x dense against 1.23x in bfloat16 (H100, 2026-12-06; half of the router's bytes),
        and on tiny-opt the same held-out MLP recall (0.9910) and sparse perplexity (70.1638
        -> 70.1606 in float32, 65,536 tokens; docs/BENCHMARKS.md)."""
        if self.router_weights is not None:
            return self.router_weights
        return "int8" if has_mlp_router else "compute"


@dataclasses.dataclass(frozen=True)
class PageSettings(_Checked):
    """Page sparsity (inside the kept KV groups): each kept group reads a fraction
    `page_topk` of its sequence's pages, or `page_budget` tokens of them (one of the two; both
    None: off), always the first and the current page, every page below `page_min_context`
    tokens; pages of `page_size` tokens (evaluation and generation; a paged cache has its
    own)."""

    page_topk: float | None = None
    page_budget: int | None = None
    page_min_context: int | None = None
    page_size: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.page_topk is not None and self.page_budget is not None:
            raise PolarJaxError(f"page_topk={self.page_topk!r} and page_budget="
                                f"{self.page_budget!r} exclude each other; give one")
        if not self.on:
            refuse_unused({"page_min_context": self.page_min_context,
                           "page_size": self.page_size}, "with page_topk or page_budget")

    @property
    def on(self) -> bool:
        return self.page_topk is not None or self.page_budget is not None

    @property
    def size(self) -> int:
        return DEFAULT_PAGE_SIZE if self.page_size is None else self.page_size

    def rule(self):
        """The `PageRule` (None when off)."""
        if not self.on:
            return None
        from pallas_kernels.page_selection import PageRule

        return PageRule(self.page_topk, self.page_budget,
                        DEFAULT_PAGE_MIN_CONTEXT if self.page_min_context is None
                        else self.page_min_context)


@dataclasses.dataclass(frozen=True)
class EvalSettings(_Checked):
    """Perplexity windows: `seq_len` tokens each, `batch_size` per step, over the first
    `max_tokens` tokens of the text (None: all)."""

    seq_len: int = 512
    max_tokens: int | None = None
    batch_size: int = 8


def given(**values) -> dict[str, Any]:
    """The keyword arguments that were given (not None): what to pass on over the defaults."""
    return {name: value for name, value in values.items() if value is not None}


def refuse_unused(values: dict[str, Any], needs: str) -> None:
    """Refuses, in one line, the settings among `values` (name: value) that were given (neither
    None nor False) although they apply only `needs`."""
    used = [name if value is True else f"{name}={value!r}" for name, value in values.items()
            if value is not None and value is not False]
    if used:
        raise PolarJaxError(f"{' and '.join(used)} {'applies' if len(used) == 1 else 'apply'} "
                            f"only {needs}")


def path(name: str, value: Any) -> str:
    """`value` as a path string: a str or an os.PathLike (a directory or a hub id)."""
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise PolarJaxError(f"{name} must be a directory path (a str or os.PathLike), got "
                            f"{validate.describe(value)}")
    return os.fspath(value)


def compute_dtype(value: Any = None):
    """The jnp dtype for `value`: a name (bfloat16, float16, float32) or a jnp / numpy dtype;
    None: float32 on a CPU, bfloat16 on an accelerator."""
    from polar_jax.dtypes import DTYPES, default_compute_dtype

    if value is None:
        return default_compute_dtype()
    name = value
    if not isinstance(value, str):
        try:
            name = np.dtype(value).name
        except (TypeError, ValueError):
            pass
    return DTYPES[validate.string("dtype", name, tuple(DTYPES))]


def _is_token_ids(prompt: Any) -> bool:
    return (isinstance(prompt, (list, tuple))
            or isinstance(prompt, np.ndarray) and prompt.ndim == 1)


def prompts(value: Any, vocab_size: int | None = None) -> list[str] | list[list[int]]:
    """`value` as a list of prompts, all text or all token ids: a str is one prompt; a list
    holds strings, or lists (tuples, 1-D arrays) of int ids in [0, vocab_size) (the range is
    checked when `vocab_size` is given). Empty prompts and a mix of text and ids are refused."""
    allowed = "a string, a list of strings or a list of token-id lists"
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise PolarJaxError(f"prompts must be {allowed} (at least one), got {validate.describe(value)}")
    for i, prompt in enumerate(value):
        if not (isinstance(prompt, str) or _is_token_ids(prompt)):
            raise PolarJaxError(f"prompt {i} must be a string or a list of token ids, got "
                                f"{validate.describe(prompt)}")
        if len(prompt) == 0:
            raise PolarJaxError(f"prompt {i} is empty")
    kinds = [isinstance(prompt, str) for prompt in value]
    if all(kinds):
        return list(value)
    if any(kinds):
        raise PolarJaxError(f"prompts mix text (prompt {kinds.index(True)}) and token ids (prompt "
                            f"{kinds.index(False)}); give all text or all token ids")
    high = None if vocab_size is None else vocab_size - 1
    checked = []
    for i, prompt in enumerate(value):
        ids = prompt.tolist() if isinstance(prompt, np.ndarray) else list(prompt)
        bad = next((j for j, t in enumerate(ids) if not (
            isinstance(t, numbers.Integral) and not isinstance(t, bool) and t >= 0
            and (high is None or t <= high))), None)
        if bad is not None:
            validate.integer(f"token {bad} of prompt {i}", ids[bad], 0, high)
        checked.append([int(t) for t in ids])
    return checked
