"""The engine's overlapped schedule, batch buckets and prefix caching, against `generate`:
the host reads each iteration's tokens one iteration late, so stops (EOS, `max_tokens`) at
every offset of that lag must still end each request at the same token; a steady decode step
copies nothing to the device; shared prompt prefixes are computed once and give the same
tokens."""

from __future__ import annotations

import asyncio
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import fixture_path
from models import config_from_hf
from polar_jax.bench.decode import random_state
from polar_jax.decode import Decoder
from polar_jax.loading import ModelDir
from polar_jax.serve.engine import Engine, Request
from polar_jax.sparsity import SparsityPlan
from routers.model import Routers
from test_engine import LLAMA, _Counts, _run


@functools.cache
def _fixture(name: str):
    """(config, model) of a fixture, float32."""
    model_dir = ModelDir.open(fixture_path("fixtures", name))
    return model_dir.config, model_dir.load(jnp.float32)


def _routers(config, sparse: bool) -> Routers | None:
    """Random routers (sparse), else None."""
    return Routers.for_model(config, seed=int(np.random.default_rng().integers(1 << 30))) if sparse else None


def _with(config, model, routers: Routers | None, eos_ids=()) -> Decoder:
    """A decoder of `model`; with `routers`, keeping half of the KV groups past layer 0
    (attention only: a sequence's tokens then do not depend on its batch)."""
    if routers is None:
        return Decoder(config, model, eos_ids=eos_ids)
    plan = SparsityPlan.build(config, None, 0.5, (0,))
    return Decoder(config, model, eos_ids=eos_ids, routers=routers,
                   plan_for_batch=lambda batch: plan)


# Each family and each decode program once (the lag's bookkeeping is the host's, the same for
# both): the other two pairs cost the suite 29 CPU-s and covered no other line.
@pytest.mark.parametrize("name, sparse", [("tiny-llama", True), ("tiny-opt", False)],
                         ids=["tiny-llama-sparse", "tiny-opt-dense"])
def test_stops_at_every_offset_of_the_lag_end_where_generate_does(name, sparse):
    """16 staggered greedy requests through 8 slots: EOS is the token that greedy decoding
    first reaches at the most different offsets, and `max_tokens` runs over 1..12, so requests
    end at EOS and at their length at every offset of the host's one-iteration lag, in the
    prefill's iteration and in later ones. Each request's tokens are `generate`'s up to its
    first EOS (included) or its length, with the matching reason."""
    config, model = _fixture(name)
    rng = np.random.default_rng()
    prompts = [rng.integers(3, config.vocab_size, n).tolist() for n in rng.integers(2, 40, 16)]
    routers = _routers(config, sparse)
    greedy = [c.tokens for c in _with(config, model, routers).generate(prompts, 12).completions]
    first_offsets = {}
    for tokens in greedy:
        for token in set(tokens):
            first_offsets.setdefault(token, set()).add(tokens.index(token))
    eos = max(first_offsets, key=lambda t: len(first_offsets[t]))
    assert len(first_offsets[eos]) >= 2
    decoder = _with(config, model, routers, eos_ids=(eos,))
    max_tokens = [1 + i % 12 for i in range(16)]
    engine = Engine(decoder, max_slots=8, max_len=64, prefill_chunk=16, prefill_rows=2,
                    page_size=4, batch_buckets=(2,))
    engine.start()
    try:
        results = asyncio.run(_run(engine, [Request(tuple(p), n) for p, n in zip(prompts, max_tokens)],
                                   [0.01 * i for i in range(16)]))
    finally:
        engine.shutdown()
    for (tokens, done), want, n in zip(results, greedy, max_tokens):
        want = want[:n]
        if eos in want:
            want = want[:want.index(eos) + 1]
        assert tokens == want
        assert done.reason == ("stop" if tokens[-1] == eos else "length")
    assert engine.pool.used == 0 and engine.active_slots == 0


def _long_decoder(sparse: bool = False) -> Decoder:
    config = config_from_hf(dict(LLAMA, max_position_embeddings=512))
    graphdef, state = random_state(config, jnp.float32, int(np.random.default_rng().integers(1 << 30)))
    return _with(config, nnx.merge(graphdef, jax.tree.map(lambda a: a * 10, state)),
                 _routers(config, sparse))


def test_a_steady_decode_step_copies_nothing_to_the_device_and_a_lone_request_runs_alone():
    """Pages of 64 tokens (no page is added while decoding) and requests that start and end
    together: the iterations that only decode copy nothing to the device (the engine's thread
    also forbids implicit copies), while admissions do; a request alone decodes in the
    batch-1 program."""
    decoder = _long_decoder()
    engine = Engine(decoder, max_slots=4, max_len=128, prefill_chunk=16, page_size=64,
                    batch_buckets=(1,))
    engine.start()
    prompts = [tuple(np.random.default_rng().integers(0, 96, 5).tolist()) for _ in range(4)]
    try:
        (lone, _), = asyncio.run(_run(engine, [Request(prompts[0], 3)], [0]))
        assert len(lone) == 3 and engine.runner.decode_calls == {1: 2}
        results = asyncio.run(_run(engine, [Request(p, 50) for p in prompts], [0] * 4))
    finally:
        engine.shutdown()
    assert all(len(tokens) == 50 for tokens, _ in results)
    assert engine.decode_stats.steps >= 45 and engine.decode_stats.transfers == 0
    assert engine.prefill_stats.transfers >= 2 * engine.prefill_stats.steps  # edits, chunks


def test_a_shared_prefix_is_computed_once_and_gives_the_same_tokens():
    """Requests sharing a 300-token prefix: with the prefix cache they give the tokens of
    `--no-prefix-cache` (and of `generate`, sparse), and the cache's hits are every shared
    full page but the first request's; in a pool too small for them all, cached pages are
    evicted and requests wait or are preempted, and every token is still the same."""
    decoder = _long_decoder(sparse=True)
    rng = np.random.default_rng()
    shared = tuple(rng.integers(0, 96, 300).tolist())
    prompts = [shared + tuple(rng.integers(0, 96, n).tolist()) for n in (1, 7, 20, 33, 16)]
    expected = [c.tokens for c in decoder.generate([list(p) for p in prompts], 8).completions]
    page_size, max_len = 16, 360
    full = -(-max_len // page_size)
    for kv_pages, prefix_cache in ((None, True), (None, False), (full + 4, True)):
        counts = _Counts()
        engine = Engine(decoder, max_slots=4, max_len=max_len, prefill_chunk=64, prefill_rows=2,
                        page_size=page_size, kv_pages=kv_pages, prefix_cache=prefix_cache,
                        batch_buckets=(4,), observer=counts)
        engine.start()
        try:
            # The first alone, the others together once its prefix is cached.
            results = asyncio.run(_run(engine, [Request(p, 8) for p in prompts],
                                       [0] + [0.5] * 4))
        finally:
            engine.shutdown()
        assert [tokens for tokens, _ in results] == expected
        assert counts.queries >= sum(map(len, prompts))
        if kv_pages is None:  # the others wait for the first's prefix pages, then share them
            assert counts.hits == prefix_cache * 4 * (300 // page_size) * page_size
        assert engine.pool.used == 0


@pytest.mark.parametrize("groups", [False, True], ids=["pages", "groups-and-pages"])
def test_page_sparse_serving_equals_page_sparse_generate(groups):
    """Page sparsity in the engine (a quarter of the pages past 16 tokens, pages of 4 tokens,
    with or without half of the KV groups): staggered requests whose contexts grow past the
    threshold give `generate`'s greedy tokens under the same rule, and the pool keeps the
    pages' key summaries (they equal the min and max of the keys written)."""
    from pallas_kernels.page_selection import PageRule

    config = config_from_hf(dict(LLAMA, max_position_embeddings=512))
    graphdef, state = random_state(config, jnp.float32, int(np.random.default_rng().integers(1 << 30)))
    model = nnx.merge(graphdef, jax.tree.map(lambda a: a * 10, state))
    rule = PageRule(topk=0.25, min_context=16)
    plan = SparsityPlan.build(config, None, 0.5 if groups else 1.0, (0,), page_rule=rule)
    decoder = Decoder(config, model, routers=_routers(config, groups),
                      plan_for_batch=lambda batch: plan, page_size=4)
    rng = np.random.default_rng()
    prompts = [rng.integers(0, 96, n).tolist() for n in (9, 30, 47, 18)]
    expected = [c.tokens for c in decoder.generate(prompts, 16).completions]
    engine = Engine(decoder, max_slots=4, max_len=80, prefill_chunk=16, page_size=4,
                    batch_buckets=(4,))
    assert engine.runner.summaries
    engine.start()
    try:
        results = asyncio.run(_run(engine, [Request(tuple(p), 16) for p in prompts],
                                   [0.02 * i for i in range(4)]))
        kmin, kmax = engine.runner.pool[1][1]  # layer 1's summaries
        k = engine.runner.pool[0][1][0]
        pages = [p for p in range(k.shape[1]) if engine.pool._refs[p] or p in engine.pool._hash_of]
    finally:
        engine.shutdown()
    assert [tokens for tokens, _ in results] == expected
    assert pages  # prompt pages stay cached: their summaries are the min and max of their keys
    for page in pages:
        np.testing.assert_allclose(np.asarray(kmin[:, page]), np.asarray(k[:, page]).min(1), rtol=1e-6)
        np.testing.assert_allclose(np.asarray(kmax[:, page]), np.asarray(k[:, page]).max(1), rtol=1e-6)
