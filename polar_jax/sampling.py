"""Next-token selection. Settings are traced values: changing them never recompiles."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from models.ops import per_shard
from models.sharding import DATA, MODEL, dp_size, tp_size
from polar_jax.settings import GenerationSettings, check


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy; top_k 0 = no top-k cut; top_p 1 = no nucleus cut."""

    temperature: jax.Array | float = GenerationSettings.temperature
    top_k: jax.Array | int = GenerationSettings.top_k
    top_p: jax.Array | float = GenerationSettings.top_p

    def validated(self) -> "SamplingParams":
        """The same settings as arrays, after checking them (`polar_jax.settings.check`)."""
        temperature, top_k, top_p = (check(field.name, getattr(self, field.name))
                                     for field in dataclasses.fields(self))
        return SamplingParams(np.float32(temperature), np.int32(top_k), np.float32(top_p))


def _filtered_logits(logits, params: SamplingParams):
    """Temperature-scaled logits `[B, V]` with tokens outside top-k / top-p set to -inf."""
    vocab = logits.shape[-1]
    logits = logits / params.temperature
    ranked = jnp.sort(logits, axis=-1)[:, ::-1]
    k = jnp.where(params.top_k > 0, jnp.minimum(params.top_k, vocab), vocab)
    ranked = jnp.where(jnp.arange(vocab) < k, ranked, -jnp.inf)
    probs = jax.nn.softmax(ranked, axis=-1)
    # Nucleus: the smallest prefix of the ranking whose probability reaches top_p.
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # float32 sums can pass 1: top_p 1 keeps all
    kept = ((mass_before < params.top_p) | (params.top_p >= 1.0)) & (jnp.arange(vocab) < k)
    cutoff = jnp.min(jnp.where(kept, ranked, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def split_vocab(logits, mesh: Mesh | None) -> bool:
    """Whether logits `[B, V]` are split over the mesh's `model` axis (the vocabulary-parallel
    head: `tp` divides V; else the head is replicated and so are the logits)."""
    return tp_size(mesh) > 1 and logits.shape[-1] % tp_size(mesh) == 0


def argmax(logits, mesh: Mesh | None = None):
    """Token ids int32 `[B]`: each row's first largest logit of `[B, V]` (NaN counting as the
    largest, as `jnp.argmax`). Over a vocabulary split by `mesh`: each device its own shard's
    (value, id), then one all-gather of those pairs (left to XLA: two, values and ids apart),
    the best taken, ties to the lowest shard, so the lowest id, as on one device."""
    if not split_vocab(logits, mesh):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    vocab = logits.shape[-1]
    if vocab > 2**24:  # ids travel as float32 beside the values
        raise ValueError(f"a vocabulary of {vocab} ids does not fit float32's 2**24 integers")
    rows = DATA if logits.shape[0] % dp_size(mesh) == 0 else None

    def shard(local):
        best = jnp.argmax(local, axis=-1)
        value = jnp.take_along_axis(local, best[:, None], axis=-1)[:, 0]
        token = best + jax.lax.axis_index(MODEL) * local.shape[-1]
        pairs = jax.lax.all_gather(jnp.stack([value, token.astype(jnp.float32)], axis=-1),
                                   MODEL, axis=1)  # [b, tp, 2]
        winner = jnp.argmax(pairs[..., 0], axis=1)
        return jnp.take_along_axis(pairs[..., 1], winner[:, None], axis=1)[:, 0].astype(jnp.int32)

    return per_shard(mesh, shard, in_specs=P(rows, MODEL), out_specs=P(rows))(logits)


def next_token(logits, params: SamplingParams, key, mesh: Mesh | None = None):
    """Token ids `[B]` from float32 logits `[B, V]`: argmax when temperature is 0, else a draw.
    With the vocabulary split over `mesh`, the argmax without gathering the logits."""
    return jax.lax.cond(
        params.temperature > 0,
        lambda: jax.random.categorical(key, _filtered_logits(logits, params), axis=-1),
        lambda: argmax(logits, mesh),
    ).astype(jnp.int32)


def sample_rows(logits, params: SamplingParams, seeds, positions):
    """Token ids `[B]` from float32 logits `[B, V]`, each row by its own settings (the fields
    of `params` are `[B]`) and its own key, `fold_in(key(seeds[b]), positions[b])`: a row's
    draw depends on its request and position only, never on the rest of the batch. A batch
    with no sampled row skips the sampling (its sort over the vocabulary) altogether."""
    greedy = params.temperature <= 0

    def draw():
        column = lambda x: jnp.asarray(x)[:, None]
        filtered = _filtered_logits(logits, SamplingParams(
            column(jnp.where(greedy, 1.0, params.temperature)), column(params.top_k),
            column(params.top_p)))
        keys = jax.vmap(lambda seed, position: jax.random.fold_in(jax.random.key(seed), position))(
            seeds, positions)
        drawn = jax.vmap(jax.random.categorical)(keys, filtered)
        return jnp.where(greedy, jnp.argmax(logits, axis=-1), drawn).astype(jnp.int32)

    return jax.lax.cond(jnp.all(greedy), lambda: jnp.argmax(logits, axis=-1).astype(jnp.int32),
                        draw)
