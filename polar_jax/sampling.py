"""Next-token selection. Settings are traced values: changing them never recompiles."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

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
    rank = jnp.arange(vocab)
    k = jnp.where(params.top_k > 0, jnp.minimum(params.top_k, vocab), vocab)
    ranked = jnp.where(rank < k, ranked, -jnp.inf)
    probs = jax.nn.softmax(ranked, axis=-1)
    # Nucleus: the smallest prefix of the ranking whose probability reaches top_p, never empty
    # (a top_p below float32's normal range, 1e-38, flushes to 0 and would keep nothing).
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # float32 sums can pass 1: top_p 1 keeps all
    kept = ((mass_before < params.top_p) | (params.top_p >= 1.0) | (rank == 0)) & (rank < k)
    cutoff = jnp.min(jnp.where(kept, ranked, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def next_token(logits, params: SamplingParams, key):
    """Token ids `[B]` from float32 logits `[B, V]`: argmax when temperature is 0, else a draw."""
    return jax.lax.cond(
        params.temperature > 0,
        lambda: jax.random.categorical(key, _filtered_logits(logits, params), axis=-1),
        lambda: jnp.argmax(logits, axis=-1),
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
