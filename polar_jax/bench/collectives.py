"""The collectives of a compiled program, read from its HLO text: by type, with their sizes,
and per layer.

A layer's collectives are the difference between the programs of the same model at one and
at two layers (every layer alike: no dense first layer), so nothing depends on XLA keeping
names or scopes; what the one-layer program has beyond its layer is the step's own (the
embedding, the sampling). Only compiled, never run: `bench decode --collectives` counts the
step at any model shape on a CPU.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from collections.abc import Callable

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
# `%name = shape opcode(`: a collective, synchronous or the start of an asynchronous one (its
# `-done` is the same collective's end, not counted).
_COLLECTIVE = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (\(.*?\)|\S+) (" + "|".join(KINDS)
                         + r")(-start)?\(")
_ARRAY = re.compile(r"(\w+)\[([\d,]*)\]")
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
             "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}


@dataclasses.dataclass(frozen=True, order=True)
class Collective:
    """One collective instruction: its `kind` (`KINDS`) and the `bytes` of its result (for an
    asynchronous start, of the arrays it sends)."""

    kind: str
    bytes: int


def _bytes(shape: str, start: bool) -> int:
    """Bytes of an HLO result shape, `f32[2,64]{1,0}` or a tuple of them (several arrays
    reduced at once: their sum); of an asynchronous `-start`, whose tuple holds its operand,
    its result and context scalars, the largest."""
    sizes = [_ITEMSIZE[dtype] * math.prod(int(d) for d in dims.split(",") if d)
             for dtype, dims in _ARRAY.findall(shape) if dtype in _ITEMSIZE]
    return max(sizes) if start else sum(sizes)


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective of a compiled HLO module's text (`Compiled.as_text()`), sorted."""
    found = []
    for line in hlo_text.splitlines():
        match = _COLLECTIVE.match(line)
        if match:
            found.append(Collective(match.group(2), _bytes(match.group(1), bool(match.group(3)))))
    return sorted(found)


def counts(found: list[Collective]) -> dict[str, int]:
    """{kind: how many}, the kinds that occur."""
    return dict(sorted(collections.Counter(c.kind for c in found).items()))


@dataclasses.dataclass(frozen=True)
class StepCollectives:
    """A step's collectives: `per_layer` (each layer's), `outside` (the step's own: the rest of
    the one-layer program)."""

    per_layer: list[Collective]
    outside: list[Collective]

    def summary(self) -> dict:
        """What `bench decode --json` writes: counts and sizes, per layer and outside."""
        return {part: {"counts": counts(found), "bytes": [[c.kind, c.bytes] for c in found]}
                for part, found in (("per_layer", self.per_layer), ("outside", self.outside))}


def step_collectives(compiled_hlo: Callable[[int], str]) -> StepCollectives:
    """Per layer and outside, from `compiled_hlo(num_layers)`, the compiled HLO text of the
    same step at 1 and at 2 layers."""
    one, two = (collections.Counter(collectives(compiled_hlo(n))) for n in (1, 2))
    layer = two - one
    if one - two or layer - one:
        raise ValueError("the one- and two-layer programs differ by more than one layer's "
                         "collectives: their layers do not repeat the same collectives")
    return StepCollectives(sorted(layer.elements()), sorted((one - layer).elements()))
