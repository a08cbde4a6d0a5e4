"""The serving engine without HTTP: continuous batching gives each request what a static batch
gives it, nothing compiles after warm-up, a cancelled request frees its slot at once, a full
queue answers busy, and echo's prompt log-probabilities are the model's."""

from __future__ import annotations

import asyncio

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import config_from_hf
from models.sharding import make_mesh
from polar_jax.bench.decode import random_state
from polar_jax.decode import Decoder
from polar_jax.errors import PolarJaxError
from polar_jax.serve.engine import Done, Engine, EngineBusy, Request, RequestError, Token
from polar_jax.sparsity import SparsityPlan
from routers.model import Routers
from test_decode import _compile_counter

LLAMA = dict(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=64,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
             max_position_embeddings=128, hidden_act="silu", rms_norm_eps=1e-5,
             tie_word_embeddings=False)


def _decoder(sparse: bool, mesh=None) -> Decoder:
    """A random Llama-shaped model (weights at a scale that makes every layer count), over
    `mesh` if given; sparse: random routers keeping half of the KV groups of layer 1 (attention
    only: a gated MLP stays dense, so a sequence's tokens do not depend on its batch)."""
    config = config_from_hf(LLAMA)
    graphdef, state = random_state(config, jnp.float32, int(np.random.default_rng().integers(1 << 30)))
    model = nnx.merge(graphdef, jax.tree.map(lambda a: a * 10, state))
    if not sparse:
        return Decoder(config, model, mesh=mesh)
    routers = Routers.for_model(config, seed=int(np.random.default_rng().integers(1 << 30)))
    plan = SparsityPlan.build(config, None, 0.5, (0,))
    assert plan.attn_groups == (None, 2)
    return Decoder(config, model, routers=routers, plan_for_batch=lambda batch: plan)


@pytest.fixture(scope="module")
def dense():
    """(decoder, started engine) shared by the tests that need no special pool: 3 slots, so
    some of 7 requests wait; a chunk of 8 tokens, so longer prompts prefill in pieces."""
    decoder = _decoder(False)
    # The decode step's tokens-only and full variants, as on a GPU (a CPU's default is one).
    engine = Engine(decoder, max_slots=3, max_len=64, prefill_chunk=8, prefill_rows=2,
                    decode_variants=True)
    engine.start()
    assert engine.runner.decode_variants == (True, False)
    yield decoder, engine
    engine.shutdown()


async def _run(engine: Engine, requests, delays, logprobs: bool = False):
    """Each request submitted after its delay; (token ids, Done) per request, with `logprobs`
    (token ids, their log-probabilities, Done)."""
    async def one(request, delay):
        await asyncio.sleep(delay)
        events = [event async for event in engine.submit(request)]
        assert all(isinstance(e, Token) for e in events[:-1]) and isinstance(events[-1], Done)
        # a log-probability exactly where asked for (the tokens-only step computes none)
        assert all((e.logprob is None) == (request.logprobs is None) for e in events[:-1])
        if logprobs:
            return [e.id for e in events[:-1]], [e.logprob for e in events[:-1]], events[-1]
        return [e.id for e in events[:-1]], events[-1]
    return await asyncio.gather(*(one(r, d) for r, d in zip(requests, delays)))


@pytest.mark.parametrize("kind", ["dense", "sparse-attention", "dense-tp2"])
def test_continuous_batching_equals_static_generate(kind, dense):
    """Seven requests of different lengths through 3 slots (so some wait), prompts longer than
    a prefill chunk (so they prefill in pieces between decode steps), staggered arrivals: each
    request's greedy tokens are those of `Decoder.generate` (on one device); and nothing
    compiles after warm-up. tp2: the engine's model and cache split over two devices."""
    if kind == "dense":
        decoder, engine = dense
    else:
        decoder = _decoder(kind == "sparse-attention")
        served = decoder
        if kind == "dense-tp2":
            served = Decoder(decoder.config, nnx.merge(decoder.graphdef, decoder.state),
                             mesh=make_mesh(2))
        engine = Engine(served, max_slots=3, max_len=64, prefill_chunk=8, prefill_rows=2)
        engine.start()
    rng = np.random.default_rng()
    prompts = [tuple(rng.integers(0, 96, n).tolist()) for n in (3, 17, 9, 30, 1, 12, 22)]
    new_tokens = [int(n) for n in rng.integers(2, 14, len(prompts))]
    expected = [c.tokens for c in decoder.generate([list(p) for p in prompts], max(new_tokens)).completions]
    compiles = _compile_counter()
    try:
        results = asyncio.run(_run(engine, [Request(p, n) for p, n in zip(prompts, new_tokens)],
                                   [0.02 * i for i in range(len(prompts))]))
    finally:
        if kind != "dense":
            engine.shutdown()
    for (tokens, done), want, n in zip(results, expected, new_tokens):
        assert tokens == want[:n] and done.reason == "length"
    assert compiles == []


def test_sampling_depends_on_the_request_only(dense):
    """A sampled request (its own seed, temperature, top-k, top-p) draws the same tokens alone
    and beside other requests; another seed draws others."""
    _, engine = dense
    prompt = tuple(np.random.default_rng().integers(0, 96, 7).tolist())
    sampled = Request(prompt, 12, temperature=1.3, top_k=40, top_p=0.95, seed=11)
    others = [Request(prompt[:3], 12, temperature=0.7, seed=5), Request(prompt, 5)]
    (alone, _), = asyncio.run(_run(engine, [sampled], [0]))
    (crowded, _), *_ = asyncio.run(_run(engine, [sampled, *others], [0.01, 0, 0]))
    (reseeded, _), = asyncio.run(_run(engine, [Request(prompt, 12, temperature=1.3, top_k=40,
                                                       top_p=0.95, seed=12)], [0]))
    assert alone == crowded and alone != reseeded


def test_cancel_frees_the_slot_a_full_queue_is_busy_and_a_failure_ends_streams():
    engine = Engine(_decoder(False), max_slots=1, max_len=128, prefill_chunk=16, max_queue=1)
    engine.start()
    prompt = (1, 2, 3)

    async def scenario():
        long = engine.submit(Request(prompt, 100))
        first = await long.__anext__()
        assert isinstance(first, Token)
        waiting = engine.submit(Request(prompt, 3))  # queued: the one slot is taken
        with pytest.raises(EngineBusy, match="queue is full"):
            engine.submit(Request(prompt, 3))
        long.cancel()
        rest = [event async for event in long]
        assert rest[-1] == Done("cancelled") and len(rest) < 99
        events = [event async for event in waiting]
        assert events[-1].reason == "length" and len(events) == 4

    async def failure():
        """A program that fails ends every stream ("error") and turns new requests away."""
        def broken(*args, **kwargs):
            raise RuntimeError("device lost")
        engine.runner.decode_program = broken
        events = [event async for event in engine.submit(Request(prompt, 5))]
        assert events[-1] == Done("error") and engine.failure == "RuntimeError: device lost"
        with pytest.raises(EngineBusy, match="engine failed"):
            engine.submit(Request(prompt, 3))

    try:
        asyncio.run(scenario())
        asyncio.run(failure())
    finally:
        engine.shutdown()


def test_bad_requests_are_refused_in_one_line():
    engine = Engine(_decoder(False), max_slots=1, max_len=32, prefill_chunk=16)
    cases = [(Request((), 4), "the prompt is empty"),
             (Request((1, 96), 4), "token id 96 is outside the vocabulary [0, 96)"),
             (Request(tuple(range(32)), 4), "the prompt has 32 tokens; this server's context is 32"),
             (Request((1,), 0), "max_tokens must be an integer"),
             (Request((1,), 4, top_p=1.5), "top_p"),
             (Request((1,), 4, logprobs=6), "logprobs must be an integer in [0, 5]"),
             (Request(prompt="abc"), "the prompt must be a sequence of token ids (tokenize text "
                                 "first), got 'abc'"),
             (Request(None, 4), "the prompt must be a sequence of token ids"),
             (Request((1, 2.0), 4), "token 1 of the prompt must be an integer id, got 2.0"),
             (Request([True, 3], 4), "token 0 of the prompt must be an integer id, got True"),
             (Request(np.array([1.5, 2.0]), 4), "token 0 of the prompt must be an integer id")]
    for request, message in cases:
        with pytest.raises(RequestError) as err:
            engine.check(request)
        assert message in str(err.value) and "\n" not in str(err.value)
        assert err.value.too_long == message.startswith("the prompt has")
    assert engine.check(Request(np.array([3, 5]), 4)).prompt == (3, 5)  # numpy ids are ints
    with pytest.raises(RequestError, match=r"^submit takes a polar_jax.serve.engine.Request, "
                                           r"got \{'prompt': \[1\]\}$"):
        engine.check({"prompt": [1]})


def test_echo_gives_the_models_prompt_logprobs(dense):
    decoder, engine = dense
    prompt = tuple(np.random.default_rng().integers(0, 96, 19).tolist())
    (tokens, done), = asyncio.run(_run(engine, [Request(prompt, 3, logprobs=5, echo=True)], [0]))
    model = nnx.merge(decoder.graphdef, decoder.state)
    logp = np.asarray(jax.nn.log_softmax(model(jnp.asarray([prompt]), jnp.ones((1, 19), jnp.int32))[0]))
    expected = logp[np.arange(18), np.asarray(prompt[1:])]
    assert done.prompt_logprobs[0] is None and len(done.prompt_logprobs) == 19
    np.testing.assert_allclose(np.asarray(done.prompt_logprobs[1:]), expected, atol=1e-4)
    assert tokens[0] == int(np.argmax(logp[-1]))


class _Counts:
    """An engine observer keeping the largest number of running requests, the preemptions and
    the prefix cache's lookups and hits."""

    def __init__(self):
        self.most_running, self.preemptions, self.pages = 0, 0, None
        self.queries = self.hits = 0

    def admitted(self, prompt_tokens): pass
    def first_token(self, seconds): pass
    def finished(self, completion_tokens, seconds_per_token): pass

    def step(self, seconds, running, waiting, pages_used):
        self.most_running = max(self.most_running, running)

    def preempted(self):
        self.preemptions += 1

    def pool(self, pages):
        self.pages = pages

    def prefix_cache(self, queries, hits):
        self.queries, self.hits = self.queries + queries, self.hits + hits


def _teacher_forced_logprobs(decoder, prompts, completions):
    """log p(token | prefix) of each completion's tokens, by one full-sequence forward pass
    over the right-padded batch (the contiguous, unchunked path)."""
    model = nnx.merge(decoder.graphdef, decoder.state)
    rows = [list(p) + list(c) for p, c in zip(prompts, completions)]
    width = max(map(len, rows))
    ids = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
    logp = np.asarray(jax.nn.log_softmax(model(jnp.asarray(ids), jnp.asarray(mask))))
    return [logp[i, np.arange(len(p) - 1, len(p) + len(c) - 1), np.asarray(c)]
            for i, (p, c) in enumerate(zip(prompts, completions))]


@pytest.mark.parametrize("sparse,page_size", [(False, 1), (True, 3), (False, 16)])
def test_paged_engine_equals_generate_at_page_boundaries(sparse, page_size):
    """Prompts that end exactly on a page boundary, one token past it and one short of it,
    through pages of 1, 3 and 16 tokens (chunks of 5, so chunks and pages never align): greedy
    tokens equal `Decoder.generate` (contiguous cache) and each token's log-probability equals
    a teacher-forced full-sequence pass (float32, 1e-5)."""
    decoder = _decoder(sparse)
    engine = Engine(decoder, max_slots=4, max_len=48, prefill_chunk=5, prefill_rows=2,
                    page_size=page_size)
    assert engine.memory.num_pages == 4 * -(-48 // page_size)  # a CPU pool: every slot at max_len
    rng = np.random.default_rng()
    lengths = sorted({max(1, n) for k in (1, 2) for n in (k * page_size - 1, k * page_size,
                                                           k * page_size + 1)})[:6]
    prompts = [tuple(rng.integers(0, 96, n).tolist()) for n in lengths]
    new_tokens = [int(n) for n in rng.integers(page_size + 1, 2 * page_size + 3, len(prompts))]
    new_tokens = [min(n, 48 - len(p) - 1) for n, p in zip(new_tokens, prompts)]
    expected = [c.tokens for c in decoder.generate([list(p) for p in prompts], max(new_tokens)).completions]
    engine.start()
    try:
        results = asyncio.run(_run(engine, [Request(p, n, logprobs=1) for p, n in zip(prompts, new_tokens)],
                                   [0.01 * i for i in range(len(prompts))], logprobs=True))
    finally:
        engine.shutdown()
    for (tokens, _, done), want, n in zip(results, expected, new_tokens):
        assert tokens == want[:n] and done.reason == "length"
    if not sparse:
        forced = _teacher_forced_logprobs(decoder, prompts, [r[0] for r in results])
        for (_, logprobs, _), want in zip(results, forced):
            np.testing.assert_allclose(logprobs, want, atol=1e-5)
    assert engine.pool.used == 0  # every page back


def test_page_pressure_preempts_and_every_request_completes_unchanged():
    """A pool that holds a third of the requests at their full length: requests wait for pages,
    the newest is preempted when the running ones need more, and each is recomputed later;
    every request completes with the tokens `Decoder.generate` gives it."""
    decoder = _decoder(False)
    counts = _Counts()
    page_size, max_len, count = 4, 40, 6
    full = -(-max_len // page_size)
    engine = Engine(decoder, max_slots=count, max_len=max_len, prefill_chunk=8, prefill_rows=3,
                    page_size=page_size, kv_pages=2 * full, observer=counts)
    assert counts.pages == 2 * full
    rng = np.random.default_rng()
    prompts = [tuple(rng.integers(0, 96, n).tolist()) for n in rng.integers(6, 14, count)]
    new_tokens = [max_len - len(p) - 1 for p in prompts]
    expected = [c.tokens for c in decoder.generate([list(p) for p in prompts], max(new_tokens)).completions]
    engine.start()
    try:
        results = asyncio.run(_run(engine, [Request(p, n) for p, n in zip(prompts, new_tokens)],
                                   [0.0] * count))
    finally:
        engine.shutdown()
    for (tokens, done), want, n in zip(results, expected, new_tokens):
        assert tokens == want[:n] and done.reason == "length"
    assert engine.preemptions > 0 and counts.preemptions == engine.preemptions
    assert engine.pool.used == 0


def test_short_requests_share_a_pool_sized_for_four_full_sequences():
    """With pages, a pool that a slot-per-sequence cache would fill with 4 sequences of
    `max_len` runs more than 8 short requests at once."""
    decoder = _decoder(False)
    counts = _Counts()
    page_size, max_len = 4, 64
    engine = Engine(decoder, max_slots=12, max_len=max_len, prefill_chunk=8, prefill_rows=12,
                    page_size=page_size, kv_pages=4 * max_len // page_size, observer=counts)
    rng = np.random.default_rng()
    prompts = [tuple(rng.integers(0, 96, n).tolist()) for n in rng.integers(3, 7, 12)]
    engine.start()
    try:
        results = asyncio.run(_run(engine, [Request(p, 6) for p in prompts], [0.0] * 12))
    finally:
        engine.shutdown()
    assert all(len(tokens) == 6 for tokens, _ in results)
    assert counts.most_running > 8 and engine.preemptions == 0


def test_a_pool_too_small_for_one_request_is_refused_with_numbers():
    decoder = _decoder(False)
    with pytest.raises(PolarJaxError) as err:
        Engine(decoder, max_slots=2, max_len=64, page_size=16, kv_pages=3)
    message = str(err.value)
    assert "holds 3 pages of 16 tokens but one request of --max-len 64 positions needs 4" in message
    assert "\n" not in message
