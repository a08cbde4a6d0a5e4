"""The page rule: which pages of its KV cache a sequence's kept group reads in a decode step
(page sparsity inside Polar Sparsity's kept groups, after Quest, ICML 2024).

A sequence of length L (the current token included) sees the pages `first .. last`:
`last = (L - 1) // page_size`, `first = max(0, L - W) // page_size` with a sliding window W,
else 0. Each of its kept KV groups keeps `PageRule.pages_kept` of them:

- the first visible page (attention sinks) and the last (the current, partially filled one)
  always;
- the top others by a score: Quest's upper bound of `q . k` over the page's keys, from each
  page's per-channel min and max of the keys (`quest_scores`, the max over the group's query
  heads), or, for the oracle bound, the true attention mass (evaluation);
- every page while L < `min_context` (short sequences stay dense).

Pages are ranked in one sort (`lax.top_k` over the row, ties to the lowest page; no loop of
passes, so a decode step on a GPU pays one kernel for it) and the first k kept: `select_pages`
(the decode step's selector) hands that order and k to the attention kernel as each
(sequence, group)'s page list and its length, `keep_mask` (masked evaluation) turns the same
order into a mask. A further policy
is one new score function handed to `keep_mask`. Plain `jax.numpy`, traced values only (no
host sync); imports only JAX.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jax import lax

DEFAULT_MIN_CONTEXT = 1024  # sequences shorter than this (tokens) read every page


@dataclasses.dataclass(frozen=True)
class PageRule:
    """Pages each kept group reads: a fraction `topk` of the visible pages, or a `budget` of
    tokens (ceil(budget / page_size) pages), at least the sink and the current page; every page
    below `min_context` tokens. Exactly one of `topk`, `budget`."""

    topk: float | None = None
    budget: int | None = None
    min_context: int = DEFAULT_MIN_CONTEXT

    def __post_init__(self):
        if (self.topk is None) == (self.budget is None):
            raise ValueError(f"a page rule takes one of topk and budget, got topk={self.topk}, "
                             f"budget={self.budget}")

    def pages_kept(self, first, last, lengths, page_size: int):
        """int32 pages kept of the visible `first .. last` (arrays of one shape) at `lengths`."""
        n = jnp.maximum(last - first + 1, 0)
        if self.topk is not None:
            k = jnp.ceil(self.topk * n.astype(jnp.float32)).astype(jnp.int32)
        else:
            k = jnp.full_like(n, -(-self.budget // page_size))
        k = jnp.clip(k, jnp.minimum(n, 2), n)
        return jnp.where(lengths < self.min_context, n, k).astype(jnp.int32)


def visible_pages(lengths, page_size: int, window: int | None = None):
    """(first, last) visible page of sequences of `lengths` (the current token included);
    last < first for length 0."""
    lengths = jnp.asarray(lengths, jnp.int32)
    lo = jnp.zeros_like(lengths) if window is None else jnp.maximum(lengths - window, 0)
    return lo // page_size, (lengths - 1) // page_size


def quest_scores(q, kmin, kmax):
    """Quest's bound of `q . k` over each page's keys, the max over a group's query heads:
    q `[..., T, G, D]`, kmin, kmax `[..., P, D]` (per-channel min and max of the page's keys)
    -> float32 `[..., T, P]`, sum_d max(q_d min_d, q_d max_d).

    One query (T = 1, the decode step): one elementwise product and sum, which XLA fuses with
    the summaries' gather (no gathered copy or float32 center and radius written; on an H100
    at llama-3-8b B 64 / 4096 the step time is the same as with the matmuls, 11.71 against
    11.70 ms: the pass over the summaries is the cost). Several (evaluation): q . c + |q| . r
    with the page's center c and radius r, two matmuls, without `[T, P, D]` products."""
    q = q.astype(jnp.float32)
    lo, hi = kmin.astype(jnp.float32), kmax.astype(jnp.float32)
    if q.shape[-3] == 1:
        qd = q[..., :, :, None, :]  # [..., 1, G, 1, D]
        lo, hi = lo[..., None, None, :, :], hi[..., None, None, :, :]
        bound = jnp.sum(jnp.maximum(qd * lo, qd * hi), axis=-1)  # [..., 1, G, P]
    else:
        bound = (jnp.einsum("...tgd,...pd->...tgp", q, (hi + lo) * 0.5)
                 + jnp.einsum("...tgd,...pd->...tgp", jnp.abs(q), (hi - lo) * 0.5))
    return jnp.max(bound, axis=-2)


def ranked_pages(rule: PageRule, scores, lengths, page_size: int, window: int | None = None):
    """The rule's order: scores float32 `[..., P]` of pages `0 .. P-1`, lengths `[...]`
    (broadcast against the scores' leading axes) -> (int32 `[..., P]` every page, the first
    visible and the current first, then the other visible ones by score, then the rest; int32
    `[...]` k, how many of them the rule keeps)."""
    first, last = visible_pages(lengths, page_size, window)
    first, last = first[..., None], last[..., None]
    page = jnp.arange(scores.shape[-1], dtype=jnp.int32)
    visible = (page >= first) & (page <= last)
    forced = (page == first) | (page == last)
    ranked = jnp.where(forced, jnp.inf, jnp.where(visible, scores.astype(jnp.float32), -jnp.inf))
    k = rule.pages_kept(first, last, lengths[..., None], page_size)
    shape = jnp.broadcast_shapes(ranked.shape, k.shape)
    order = lax.top_k(jnp.broadcast_to(ranked, shape), shape[-1])[1].astype(jnp.int32)
    return order, jnp.broadcast_to(k, shape[:-1] + (1,))[..., 0]


def keep_mask(rule: PageRule, scores, lengths, page_size: int, window: int | None = None):
    """The rule as a mask (`ranked_pages`' first k): bool `[..., P]`, the kept pages."""
    order, k = ranked_pages(rule, scores, lengths, page_size, window)
    rank = jnp.argsort(order, axis=-1)  # each page's place in the order
    return rank < k[..., None]


def select_pages(rule: PageRule, q, kmin, kmax, lengths, page_size: int,
                 window: int | None = None):
    """The decode step's selector: q `[B, K, G, D]` (each kept group's query heads), kmin,
    kmax `[B, K, P, D]` (that group's page summaries, the sequence's pages in order), lengths
    `[B]` -> (page_idx int32 `[B, K, P]`, page_count int32 `[B, K]`) for
    `sparse_decode_attention`: the kept pages first (the window's first page leading), in the
    rule's order."""
    scores = quest_scores(q[:, :, None], kmin, kmax)[:, :, 0]
    return ranked_pages(rule, scores, lengths[:, None], page_size, window)


def page_summaries(keys, valid, page_size: int):
    """Per page the per-channel min and max of the valid keys: keys `[..., S, D]`, valid
    `[..., S]` -> kmin, kmax `[..., ceil(S / page_size), D]` in the keys' dtype (a page without
    a valid key: +max, -max of the dtype)."""
    s = keys.shape[-2]
    pad = -s % page_size
    widths = [(0, 0)] * (keys.ndim - 2) + [(0, pad), (0, 0)]
    keys = jnp.pad(keys, widths)
    valid = jnp.pad(valid, widths[:-1])[..., None]
    big = jnp.finfo(keys.dtype).max
    pages = lambda x: x.reshape(*x.shape[:-2], (s + pad) // page_size, page_size, x.shape[-1])
    kmin = jnp.min(pages(jnp.where(valid, keys, big)), axis=-2)
    kmax = jnp.max(pages(jnp.where(valid, keys, -big)), axis=-2)
    return kmin, kmax


__all__ = ["DEFAULT_MIN_CONTEXT", "PageRule", "visible_pages", "quest_scores", "ranked_pages",
           "keep_mask", "select_pages", "page_summaries"]
