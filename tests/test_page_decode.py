"""Page-sparse decoding end to end on random models: teacher-forced decode through the kernel
(page lists from the cache's summaries) against the masked evaluation, every page kept against
group-sparse decode and the dense model, and generation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.kv_cache import PagedKVCache
from models.ops import ChunkOps
from models.sharding import kv_cache_shardings, make_mesh, param_shardings, router_shardings
from pallas_kernels.page_selection import PageRule
from polar_jax.sparsity import MaskedOps, SparsityPlan
from polar_jax.step import DecodeState, decode_step
from routers.model import Routers
from test_model_parity import VARIANTS, random_hf_model


WINDOW = 24  # the models' sliding window, cut so that short sequences cross it


@pytest.fixture(scope="module")
def random_models(tmp_path_factory):
    """`get(name)` -> (config, model, routers): a VARIANTS model with a sliding window of
    `WINDOW`, built once per module."""
    built = {}

    def get(name: str):
        if name not in built:
            config_cls, model_cls, fields = VARIANTS[name]
            _, _, config, model = random_hf_model((config_cls, model_cls,
                                                   dict(fields, sliding_window=WINDOW)),
                                                  tmp_path_factory.mktemp(name))
            routers = Routers.for_model(config, mlp_rank=32,
                                        seed=int(np.random.default_rng().integers(1 << 30)))
            built[name] = config, model, routers
        return built[name]

    return get


def paged_cache(config, length: int, page_size: int, dtype=jnp.float32):
    """A paged cache with summaries for one sequence of `length` positions, its pages shuffled
    in a pool whose pages it does not own are NaN (never read)."""
    per_seq = -(-length // page_size)
    pool = per_seq + 5
    table = np.random.default_rng().permutation(pool)[:per_seq].astype(np.int32)
    owned = jnp.zeros(pool, bool).at[table].set(True)
    poison = lambda x: jnp.where(owned.reshape(1, pool, *[1] * (len(x.shape) - 2)),
                                 jnp.zeros(x.shape, x.dtype), jnp.nan)
    abstract = PagedKVCache.abstract(config, pool, page_size, 1, per_seq, dtype, summaries=True)
    return PagedKVCache(jax.tree.map(poison, abstract.pages), jnp.asarray(table[None]),
                        jax.tree.map(poison, abstract.summaries))


def teacher_forced(model, config, tokens, cache, router_state, plan, prompt: int = 0,
                   mesh=None):
    """Log-probabilities `[T, V]` of one sequence: its first `prompt` tokens prefilled in one
    chunk (`ChunkOps`), then decoded one token at a time by `decode_step` (over `mesh` if
    given), the true next token fed at each step."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, router_state, decode):
        _, logits, decode = decode_step(nnx.merge(graphdef, state), decode,
                                        lambda l: jnp.argmax(l, -1), router_state, plan, mesh)
        return jax.nn.log_softmax(logits[0]), decode.kv_cache

    if mesh is None:
        cache = jax.device_put(cache, jax.devices()[0])  # committed, as the step returns it
    else:
        state = jax.device_put(state, param_shardings(state, mesh))
        cache = jax.device_put(cache, kv_cache_shardings(cache, mesh))
        if router_state is not None:
            router_state = jax.device_put(router_state, router_shardings(router_state, mesh))
    out = []
    if prompt:
        pos = jnp.arange(prompt)[None]
        fwd = nnx.merge(graphdef, state).forward(jnp.asarray(tokens[:prompt])[None], pos,
                                                 ChunkOps(pos, jnp.ones_like(pos, bool)), cache)
        cache = fwd.kv_cache
        out = list(np.asarray(jax.nn.log_softmax(model.logits(fwd.hidden_states[0]))))
    for position in range(prompt, len(tokens)):
        decode = DecodeState(jnp.full(1, tokens[position], jnp.int32),
                             jnp.full(1, position, jnp.int32), jnp.ones(1, bool), cache)
        logp, cache = step(state, router_state, decode)
        out.append(np.asarray(logp))
    return np.stack(out)


def masked(model, config, tokens, plan, router_state, page_size, mode="sparse"):
    """Log-probabilities `[T, V]` of the masked evaluation (`MaskedOps`)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, router_state, tokens):
        model = nnx.merge(graphdef, state)
        mask = jnp.ones(tokens.shape, jnp.int32)
        ops = MaskedOps(mask, mode, plan, config.num_kv_heads, router_state, page_size)
        out = model.forward(tokens, jnp.arange(tokens.shape[1])[None], ops)
        return jax.nn.log_softmax(model.logits(out.hidden_states[0]))

    return np.asarray(run(state, router_state, jnp.asarray(tokens)[None]))


@pytest.mark.parametrize("name, page_size, groups, tp", [("mistral-sliding-window", 1, False, 1),
                                                         ("gemma2-gqa", 3, True, 1),
                                                         ("mistral-sliding-window", 16, True, 1),
                                                         ("llama-2-mha", 4, True, 2)])
def test_teacher_forced_page_sparse_decode_equals_masked_evaluation(random_models, name,
                                                                    page_size, groups, tp):
    """The kernel path (group top-k by the routers, then each kept group's pages by the
    selector from the cache's summaries) gives the next-token log-probabilities the masked
    evaluation gives, within 1e-4 (float32). Page sparsity alone: the first tokens are
    prefilled in one chunk (dense, as below min_context), so the summaries come from chunk and
    token writes; with groups every token is decoded (prefill keeps every group). Sequences
    cross the models' sliding window (Gemma 2: every other layer); unowned pages are NaN. At
    tp 2 each device selects the pages of its own groups (summaries split with them)."""
    config, model, routers = random_models(name)
    T = 2 * WINDOW + 9
    prompt = 0 if groups else 9
    rule = PageRule(topk=0.3, min_context=max(prompt + 1, 2 * page_size))
    metadata = {"mlp_topk": {"1": [config.mlp_dim // 4] * config.num_layers}}
    plan = SparsityPlan.build(config, metadata if groups else None, 0.5 if groups else 1.0,
                              dense_layers=(), page_rule=rule, shards=tp)
    assert plan.needs_routers == groups
    router_state = routers.unstack() if groups else None
    tokens = np.random.default_rng().integers(0, config.vocab_size, size=T)
    decoded = teacher_forced(model, config, tokens, paged_cache(config, T, page_size),
                             router_state, plan, prompt, make_mesh(tp) if tp > 1 else None)
    evaluated = masked(model, config, tokens, plan, router_state, page_size)
    np.testing.assert_allclose(decoded, evaluated, atol=1e-4, rtol=0)
    dense = np.asarray(jax.nn.log_softmax(model(jnp.asarray(tokens)[None],
                                                jnp.ones((1, T), jnp.int32))[0]))
    assert np.abs(dense - evaluated).max() > 1e-2  # the sparsity did change something


def test_every_page_kept_equals_group_sparse_decode_exactly(random_models):
    """`--page-topk 1`: page-sparse decode is group-sparse decode (the same paged cache, with
    and without summaries). The kernel is bit-exact (`test_full_page_lists_are_bit_exact`);
    around it XLA on the CPU fuses the two programs differently (last-bit differences)."""
    config, model, routers = random_models("gemma2-gqa")
    T, page_size = 40, 3
    metadata = {"mlp_topk": {"1": [config.mlp_dim // 4] * config.num_layers}}
    plan = SparsityPlan.build(config, metadata, 0.5, dense_layers=())
    paged = SparsityPlan.build(config, metadata, 0.5, dense_layers=(),
                               page_rule=PageRule(topk=1.0, min_context=0))
    tokens = np.random.default_rng().integers(0, config.vocab_size, size=T)
    with_pages = teacher_forced(model, config, tokens, paged_cache(config, T, page_size),
                                routers.unstack(), paged)
    cache = paged_cache(config, T, page_size)
    without = teacher_forced(model, config, tokens, PagedKVCache(cache.pages, cache.block_table),
                             routers.unstack(), plan)
    np.testing.assert_allclose(with_pages, without, atol=1e-6 * np.abs(without).max(), rtol=0)


def test_every_page_evaluated_is_dense(random_models):
    """`topk` 1 evaluation (bound and oracle) equals the dense model."""
    config, model, _ = random_models("mistral-sliding-window")
    T, page_size = 64, 4
    tokens = np.random.default_rng().integers(0, config.vocab_size, size=T)
    dense = np.asarray(jax.nn.log_softmax(model(jnp.asarray(tokens)[None],
                                                jnp.ones((1, T), jnp.int32))[0]))
    plan = SparsityPlan.build(config, None, 1.0, dense_layers=(),
                              page_rule=PageRule(topk=1.0, min_context=0))
    for mode in ("sparse", "oracle"):
        everything = masked(model, config, tokens, plan, None, page_size, mode)
        np.testing.assert_allclose(everything, dense, atol=1e-5, rtol=1e-5)


def test_generate_with_every_page_kept_follows_dense(random_models):
    """The decoder's page-sparse path (a paged cache of its own, prefill writing the prompts'
    valid tokens and their summaries, then page-sparse steps) with every page kept generates
    the dense decoder's greedy tokens; with a quarter of the pages it runs and differs."""
    from polar_jax.decode import Decoder

    config, model, _ = random_models("mistral-sliding-window")
    prompts = [np.random.default_rng().integers(0, config.vocab_size, size=n).tolist()
               for n in (5, 30, 2)]
    plain = Decoder(config, model).generate(prompts, 24)
    plan = lambda topk: SparsityPlan.build(config, None, 1.0, dense_layers=(),
                                           page_rule=PageRule(topk=topk, min_context=0))
    every = Decoder(config, model, plan_for_batch=lambda batch: plan(1.0), page_size=3)
    assert every.page_sparse and not every.sparse
    assert ([c.tokens for c in every.generate(prompts, 24).completions]
            == [c.tokens for c in plain.completions])
    quarter = Decoder(config, model, plan_for_batch=lambda batch: plan(0.25), page_size=3)
    assert all(len(c.tokens) == 24 for c in quarter.generate(prompts, 24).completions)
