"""Next-token selection. Settings are traced values: changing them never recompiles.

Over a vocabulary split by a mesh (the vocabulary-parallel head), the logits stay split: each
device ranks its own shard, and small gathers of per-shard candidates decide what one device
decides over the whole vocabulary, by the same rule (`_cutoff`) and the same Gumbel noise
(`jax.random.categorical`'s, of the same keys).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from models.ops import per_shard
from models.sharding import DATA, MODEL, dp_size, tp_size
from polar_jax.settings import GenerationSettings, check

# Per device, over a split vocabulary: its largest scaled logits that one all-gather brings
# together, enough to cut any top-k up to this many, and a nucleus closing within them. A
# batch with a row cut further runs the radix selects of `_split_cutoff` (eight small
# all-reduces). Not measured on GPUs: no multi-GPU machine was lent.
SAMPLE_CANDIDATES = 256


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


def _top_k_count(top_k, vocab: int):
    """How many of the ranking the top-k cut keeps (`top_k` 0: all `vocab`)."""
    return jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)


def _cutoff(ranked, k, top_p, total=None):
    """Each row's smallest kept scaled logit `[B, 1]` (the filter drops those below it), from
    `ranked [B, R]`, the row's R largest scaled logits in descending order (R = V on one
    device), the top-k count `k` and `top_p` (scalars or `[B, 1]`). `total [B, 1]`: for rows
    whose k exceeds R, the sum of exp(logit - the largest) over the whole vocabulary."""
    positions = jnp.arange(ranked.shape[-1])
    ranked = jnp.where(positions < k, ranked, -jnp.inf)
    weights = jnp.exp(ranked - ranked[:, :1])
    sums = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / (sums if total is None else jnp.where(k > ranked.shape[-1], total, sums))
    # Nucleus: the smallest prefix of the ranking whose probability reaches top_p, never empty
    # (a top_p below float32's normal range, 1e-38, flushes to 0 and would keep nothing).
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # float32 sums can pass 1: top_p 1 keeps all
    kept = ((mass_before < top_p) | (top_p >= 1.0) | (positions == 0)) & (positions < k)
    return jnp.min(jnp.where(kept, ranked, jnp.inf), axis=-1, keepdims=True)


def _filtered_logits(logits, params: SamplingParams):
    """Temperature-scaled logits `[B, V]` with tokens outside top-k / top-p set to -inf."""
    vocab = logits.shape[-1]
    logits = logits / params.temperature
    ranked = jnp.sort(logits, axis=-1)[:, ::-1]
    cutoff = _cutoff(ranked, _top_k_count(params.top_k, vocab), params.top_p)
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def split_vocab(logits, mesh: Mesh | None) -> bool:
    """Whether logits `[B, V]` are split over the mesh's `model` axis (the vocabulary-parallel
    head: `tp` divides V; else the head is replicated and so are the logits)."""
    return tp_size(mesh) > 1 and logits.shape[-1] % tp_size(mesh) == 0


def _shard_best(values):
    """`[b, 2]`: each row's first largest of this device's shard `[b, V / tp]` of a split
    vocabulary, and its id over the whole vocabulary (as float32: exact below 2**24)."""
    best = jnp.argmax(values, axis=-1)
    value = jnp.take_along_axis(values, best[:, None], axis=-1)[:, 0]
    token = best + jax.lax.axis_index(MODEL) * values.shape[-1]
    return jnp.stack([value, token.astype(jnp.float32)], axis=-1)


def _overall_best(pairs):
    """Token ids int32 `[b]` from every shard's `_shard_best` `[b, tp, 2]`: the first largest
    value's (ties to the lowest shard, so the lowest id; NaN the largest: `jnp.argmax`)."""
    winner = jnp.argmax(pairs[..., 0], axis=1)
    return jnp.take_along_axis(pairs[..., 1], winner[:, None], axis=1)[:, 0].astype(jnp.int32)


def _row_spec(logits, mesh: Mesh):
    """The mesh axis of the rows of `[B, V]`: `data` where it divides B, else none."""
    if logits.shape[-1] > 2**24:  # ids travel as float32 beside the values
        raise ValueError(f"a vocabulary of {logits.shape[-1]} ids does not fit float32's "
                         "2**24 integers")
    return DATA if logits.shape[0] % dp_size(mesh) == 0 else None


def argmax(logits, mesh: Mesh | None = None):
    """Token ids int32 `[B]`: each row's first largest logit of `[B, V]` (NaN counting as the
    largest, as `jnp.argmax`). Over a vocabulary split by `mesh`: each device its own shard's
    (value, id), then one all-gather of those pairs (left to XLA: two, values and ids apart)."""
    if not split_vocab(logits, mesh):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    rows = _row_spec(logits, mesh)
    return per_shard(mesh, lambda local: _overall_best(
        jax.lax.all_gather(_shard_best(local), MODEL, axis=1)),
        in_specs=P(rows, MODEL), out_specs=P(rows))(logits)


def _ordered_keys(x):
    """uint32 keys of float32 `x` in the order of the values (zeros of either sign alike)."""
    bits = jax.lax.bitcast_convert_type(jnp.where(x == 0, 0.0, x), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | np.uint32(1 << 31))


def _key_value(key):
    """The float32 value of `_ordered_keys`' key."""
    bits = jnp.where(key >> 31 == 1, key & np.uint32((1 << 31) - 1), ~key)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _split_cutoff(scaled, top, k, top_p):
    """Each row's cut `[b, 1]` as `_cutoff` over the whole split vocabulary, inside `shard_map`
    from this device's scaled logits `[b, V / tp]`, the row's largest `top [b, 1]`, `k` and
    `top_p` `[b, 1]`, without gathering the logits: two radix selects over the values' 32-bit
    keys, a byte at a time from the top, each round's 256-bucket histograms summed over the
    devices (eight all-reduces of `[b, 256]` or `[b, 512]`). First the k-th largest (its key,
    and how many of the tokens equal to it the top-k holds); then, over the top-k, the smallest
    value whose probability mass strictly above it is below `top_p`."""
    rows = jnp.arange(scaled.shape[0])[:, None]
    keys = _ordered_keys(scaled)
    histogram = lambda digits, weights: jnp.zeros((scaled.shape[0], 256), weights.dtype).at[
        rows, digits].add(weights)
    shifts = (24, 16, 8, 0)

    def select(eligible, choose):
        """The key chosen byte by byte: `choose(round, histogram inputs -> [b, 256] summed
        over the devices, ...)` names each round's bucket."""
        prefix = jnp.zeros(k.shape, jnp.uint32)
        for round_, shift in enumerate(shifts):
            match = eligible if round_ == 0 else eligible & (keys >> (shift + 8) == prefix)
            digits = ((keys >> shift) & 255).astype(jnp.int32)
            prefix = (prefix << 8) | choose(round_, digits, match).astype(jnp.uint32)
        return prefix

    # The k-th largest: the bucket holding it, counting from the top.
    rank = k

    def kth(round_, digits, match):
        nonlocal rank
        counts = jax.lax.psum(histogram(digits, match.astype(jnp.int32)), MODEL)
        from_top = jnp.cumsum(counts[:, ::-1], axis=1)  # tokens in this bucket or above
        bucket = 255 - jnp.argmax(from_top >= rank, axis=1, keepdims=True)
        rank = rank - (jnp.take_along_axis(from_top, 255 - bucket, axis=1)
                       - jnp.take_along_axis(counts, bucket, axis=1))
        return bucket

    kth_key = select(jnp.ones(keys.shape, bool), kth)
    kth_value = _key_value(kth_key)
    # The nucleus over the top-k: the lowest bucket whose mass strictly above is below top_p
    # (the tokens equal to the k-th count `rank` times in the total, never above another).
    weights = jnp.where(keys > kth_key, jnp.exp(scaled - top), 0.0)
    total, above = None, jnp.zeros(k.shape, jnp.float32)

    def nucleus(round_, digits, match):
        nonlocal total, above
        summed = jax.lax.psum(jnp.concatenate([histogram(digits, jnp.where(match, weights, 0.0)),
                                               histogram(digits, match.astype(jnp.float32))],
                                              axis=1), MODEL)
        mass, count = summed[:, :256], summed[:, 256:]
        if total is None:
            total = jnp.sum(mass, axis=1, keepdims=True) + rank * jnp.exp(kth_value - top)
        strictly_above = above + jnp.cumsum(mass[:, ::-1], axis=1)[:, ::-1] - mass
        kept = (count > 0) & ((strictly_above / total < top_p) | (top_p >= 1.0))
        bucket = jnp.argmax(kept, axis=1, keepdims=True)  # the lowest
        above = jnp.take_along_axis(strictly_above, bucket, axis=1)
        return bucket

    return _key_value(select(keys >= kth_key, nucleus))


def _sample_split(logits, noise, params: SamplingParams, mesh: Mesh,
                  candidates: int = SAMPLE_CANDIDATES):
    """Token ids int32 `[B]` from logits `[B, V]` split over the vocabulary by `mesh`, each row
    by its settings (`params`' fields `[B, 1]`; temperature 0: the argmax), a draw being the
    argmax of the filtered logits plus the Gumbel `noise [B, V]` (`jax.random.categorical`).

    Each device ranks its shard's `candidates` largest scaled logits; one all-gather of those
    (and of each shard's sum of exp) gives every row's ranking prefix, which decides its cut
    where the cut lies within it: a top-k of at most `candidates`, or with no top-k a nucleus
    closing within them, or no cut at all. A batch with a row cut further finds it by
    `_split_cutoff` (`lax.cond`: only then). Then each device's best (value, id), greedy and
    drawn, and one all-gather of those. The logits are never gathered whole."""
    vocab = logits.shape[-1]
    rows = _row_spec(logits, mesh)

    def shard(logits, noise, temperature, top_k, top_p):
        local = logits.shape[-1]
        drawing = temperature > 0
        scaled = logits / jnp.where(drawing, temperature, 1.0)
        count = min(candidates, local)
        best = jax.lax.top_k(scaled, count)[0]
        sums = jnp.sum(jnp.exp(scaled - best[:, :1]), axis=-1, keepdims=True)
        gathered = jax.lax.all_gather(jnp.concatenate([best, sums], axis=-1), MODEL, axis=1)
        shard_best, shard_sums = gathered[..., :count], gathered[..., count]
        known = vocab if count == local else count  # the exact prefix of the whole ranking
        ranked = jax.lax.top_k(shard_best.reshape(shard_best.shape[0], -1), known)[0]
        total = jnp.sum(shard_sums * jnp.exp(shard_best[..., 0] - ranked[:, :1]), axis=-1,
                        keepdims=True)
        k = _top_k_count(top_k, vocab)
        cutoff = _cutoff(ranked, k, top_p, total)
        no_cut = (k >= vocab) & (top_p >= 1.0)
        further = drawing & ~no_cut & (k > known) & ((k < vocab) | (cutoff <= ranked[:, -1:]))

        cutoff = jnp.where(no_cut, -jnp.inf, jax.lax.cond(
            jnp.any(further),
            lambda: jnp.where(further, _split_cutoff(scaled, ranked[:, :1], k, top_p), cutoff),
            lambda: cutoff))
        drawn = jnp.where(scaled < cutoff, -jnp.inf, scaled) + noise
        pairs = jax.lax.all_gather(jnp.concatenate([_shard_best(logits), _shard_best(drawn)],
                                                   axis=-1), MODEL, axis=1)
        return jnp.where(drawing[:, 0], _overall_best(pairs[..., 2:]),
                         _overall_best(pairs[..., :2]))

    column = P(rows, None)
    split = P(rows, MODEL)
    noise = jax.lax.with_sharding_constraint(noise, NamedSharding(mesh, split))
    batch = logits.shape[0]
    settings = [jnp.broadcast_to(jnp.asarray(x).reshape(-1, 1), (batch, 1))
                for x in (params.temperature, params.top_k, params.top_p)]
    return per_shard(mesh, shard, in_specs=(split, split, column, column, column),
                     out_specs=P(rows))(logits, noise, *settings)


def next_token(logits, params: SamplingParams, key, mesh: Mesh | None = None):
    """Token ids `[B]` from float32 logits `[B, V]`: argmax when temperature is 0, else a draw.
    With the vocabulary split over `mesh`, never gathered whole (`_sample_split`)."""
    if split_vocab(logits, mesh):
        draw = lambda: _sample_split(
            logits, jax.random.gumbel(key, logits.shape, logits.dtype), params, mesh)
    else:
        draw = lambda: jax.random.categorical(key, _filtered_logits(logits, params), axis=-1)
    return jax.lax.cond(params.temperature > 0, draw,
                        lambda: argmax(logits, mesh)).astype(jnp.int32)


def sample_rows(logits, params: SamplingParams, seeds, positions, mesh: Mesh | None = None, *,
                all_greedy: bool | None = None):
    """Token ids `[B]` from float32 logits `[B, V]`, each row by its own settings (the fields
    of `params` are `[B]`) and its own key, `fold_in(key(seeds[b]), positions[b])`: a row's
    draw depends on its request and position only, never on the rest of the batch. A batch
    with no sampled row skips the sampling (its sort over the vocabulary) altogether: decided
    on the device (a `lax.cond`, whose predicate a GPU reads on the host: the call waits for
    the logits), or by the caller with the static `all_greedy` (True: every row is greedy;
    False: some row may sample). With the vocabulary split over `mesh`, as `next_token`."""
    greedy = params.temperature <= 0

    def draw():
        column = lambda x: jnp.asarray(x)[:, None]
        keys = jax.vmap(lambda seed, position: jax.random.fold_in(jax.random.key(seed), position))(
            seeds, positions)
        if split_vocab(logits, mesh):
            noise = jax.vmap(lambda key: jax.random.gumbel(key, logits.shape[-1:], logits.dtype))(
                keys)
            return _sample_split(logits, noise, SamplingParams(
                column(jnp.where(greedy, 0.0, params.temperature)), column(params.top_k),
                column(params.top_p)), mesh)
        filtered = _filtered_logits(logits, SamplingParams(
            column(jnp.where(greedy, 1.0, params.temperature)), column(params.top_k),
            column(params.top_p)))
        drawn = jax.vmap(jax.random.categorical)(keys, filtered)
        return jnp.where(greedy, jnp.argmax(logits, axis=-1), drawn).astype(jnp.int32)

    if all_greedy is not None:
        return argmax(logits, mesh) if all_greedy else draw()
    return jax.lax.cond(jnp.all(greedy), lambda: argmax(logits, mesh), draw)
