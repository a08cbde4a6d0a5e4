"""Page sparsity end to end: page summaries kept by the cache writes, the page selector, and
teacher-forced page-sparse decode (the kernel path) against the masked evaluation."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.kv_cache import PagedKVCache
from models.sharding import kv_cache_shardings, make_mesh, param_shardings, router_shardings
from models.ops import ChunkOps
from pallas_kernels import sparse_decode_attention
from pallas_kernels.page_selection import PageRule, keep_mask, select_pages, visible_pages
from polar_jax.sparsity import MaskedOps, SparsityPlan
from polar_jax.step import DecodeState, decode_step
from test_model_parity import VARIANTS, random_hf_model
from routers.model import Routers


@pytest.fixture
def rng():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    return np.random.default_rng(seed)


# --- summaries --------------------------------------------------------------------------------

class _Config:
    num_kv_heads, head_dim, num_layers = 2, 8, 1


def _check_summaries(layer, written: dict, page_size: int):
    """Every page holding tokens: its kmin / kmax equal the min / max of its written keys."""
    k, kmin, kmax = (np.asarray(x) for x in (layer.k, layer.kmin, layer.kmax))
    assert written, "nothing written"
    for page, offsets in written.items():
        keys = k[:, page, sorted(offsets)]  # [Hkv, n, D]
        np.testing.assert_array_equal(kmin[:, page], keys.min(axis=1))
        np.testing.assert_array_equal(kmax[:, page], keys.max(axis=1))


@pytest.mark.parametrize("page_size", [1, 3, 16])
def test_summaries_follow_token_and_chunk_writes_and_reused_pages(rng, page_size):
    """A mix of chunk writes (prefill) and token writes (decode) into shuffled pages, then the
    pages handed to another sequence and written afresh: the summaries are the min and max of
    exactly the keys each page holds (bfloat16, the cache dtype)."""
    B = 2
    pages_per_seq = -(-(4 * page_size + 2) // page_size)  # room for every write below
    pool = B * pages_per_seq + 3
    config, dtype = _Config(), jnp.bfloat16
    cache = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype),
                         PagedKVCache.abstract(config, pool, page_size, B, pages_per_seq, dtype,
                                               summaries=True))  # garbage everywhere
    table = rng.permutation(pool)[:B * pages_per_seq].reshape(B, pages_per_seq).astype(np.int32)
    layer = cache.with_block_table(jnp.asarray(table)).layer(0)
    hkv, d = config.num_kv_heads, config.head_dim
    chunk = jax.jit(lambda layer, k, pos, valid: layer.write_chunk(k, k, pos, valid))
    token = jax.jit(lambda layer, k, pos: layer.write_token(k, k, pos))

    def run(layer, table, lengths):
        written = {}
        T = max(lengths)
        pos = np.broadcast_to(np.arange(T), (B, T))
        valid = pos < np.asarray(lengths)[:, None]
        layer = chunk(layer, jnp.asarray(rng.standard_normal((B, T, hkv, d)), dtype),
                      jnp.asarray(pos, jnp.int32), jnp.asarray(valid))
        n = list(lengths)
        for _ in range(2 * page_size + 1):
            layer = token(layer, jnp.asarray(rng.standard_normal((B, hkv, d)), dtype),
                          jnp.asarray(n, jnp.int32))
            n = [x + 1 for x in n]
        for b in range(B):
            for i in range(n[b]):
                written.setdefault(int(table[b, i // page_size]), set()).add(i % page_size)
        return layer, written

    lengths = [rng.integers(1, page_size + 2), rng.integers(page_size, 2 * page_size)]
    layer, written = run(layer, table, lengths)
    _check_summaries(layer, written, page_size)
    # The rows' pages swapped (a pool reuses pages): shorter sequences now, fresh summaries.
    table = table[::-1].copy()
    layer = PagedKVCache(((layer.k, layer.v),), jnp.asarray(table), ((layer.kmin, layer.kmax),)
                         ).layer(0)
    layer, written = run(layer, table, [1, 2])
    _check_summaries(layer, written, page_size)


# --- the selector ----------------------------------------------------------------------------

def test_selector_keeps_the_top_bound_pages_and_never_drops_sink_or_current():
    """Hand-made summaries: q = (1, -1); page p's keys lie in a box whose bound is known."""
    P, page_size = 8, 4
    q = jnp.array([[[[1.0, -1.0]]]])  # [B=1, K=1, G=1, D=2]
    # bound = max over the box of q . k = kmax_0 - kmin_1
    kmax0 = jnp.array([9.0, 1.0, 5.0, 7.0, 2.0, 8.0, 3.0, 0.0])
    kmin = jnp.stack([jnp.zeros(P), jnp.zeros(P)], -1)[None, None]
    kmax = jnp.stack([kmax0, jnp.ones(P)], -1)[None, None]
    rule = PageRule(topk=0.5, min_context=0)
    length = jnp.array([7 * page_size + 1], jnp.int32)  # 8 pages, the last holds 1 token
    idx, count = select_pages(rule, q, kmin, kmax, length, page_size)
    kept = sorted(np.asarray(idx)[0, 0, :int(count[0, 0])].tolist())
    # 4 of 8: sink 0 and current 7, then the best bounds among 1..6: 5 (8) and 3 (7)
    assert kept == [0, 3, 5, 7]
    # A token budget of 12 tokens: 3 pages (sink, current and the best other).
    idx, count = select_pages(PageRule(budget=12, min_context=0), q, kmin, kmax, length, page_size)
    assert sorted(np.asarray(idx)[0, 0, :int(count[0, 0])].tolist()) == [0, 5, 7]
    # Shorter than min_context: dense; the rule never keeps fewer than sink and current.
    idx, count = select_pages(PageRule(topk=0.5, min_context=33), q, kmin, kmax, length, page_size)
    assert int(count[0, 0]) == 8
    idx, count = select_pages(PageRule(topk=0.01, min_context=0), q, kmin, kmax, length, page_size)
    assert sorted(np.asarray(idx)[0, 0, :int(count[0, 0])].tolist()) == [0, 7]
    # A window: pages before it are never kept; its first page is the sink.
    mask = keep_mask(PageRule(topk=0.75, min_context=0), jnp.asarray(kmax0)[None], length,
                     page_size, window=13)  # positions 16 .. 28: pages 4 .. 7
    assert np.flatnonzero(np.asarray(mask)[0]).tolist() == [4, 5, 7]


def test_selector_random_never_drops_sink_or_current(rng):
    B, K, P, page_size = 6, 3, 20, 3
    scores = jnp.asarray(rng.standard_normal((B, K, P)) * 10, jnp.float32)
    lengths = jnp.asarray(rng.integers(1, P * page_size + 1, B), jnp.int32)
    window = 17
    for w in (None, window):
        mask = np.asarray(keep_mask(PageRule(topk=0.2, min_context=0), scores,
                                    lengths[:, None], page_size, w))
        for b in range(B):
            L = int(lengths[b])
            first = (0 if w is None else max(0, L - w)) // page_size
            last = (L - 1) // page_size
            n = last - first + 1
            for j in range(K):
                kept = np.flatnonzero(mask[b, j])
                assert first in kept and last in kept
                assert kept.min() >= first and kept.max() <= last
                assert len(kept) == min(n, max(2, int(np.ceil(0.2 * n))))
                others = [p for p in range(first + 1, last) if p not in kept]
                inner = [p for p in kept if p not in (first, last)]
                if others and inner:  # every kept page outranks every dropped one
                    assert min(scores[b, j, inner]) >= max(scores[b, j, others])


# --- decode against evaluation ----------------------------------------------------------------

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


@pytest.mark.parametrize("window", [None, 10])
def test_full_page_lists_are_bit_exact(rng, window):
    """Every visible page listed: the kernel reads the blocks it reads without lists, in the
    same order, so its output is identical."""
    B, Hq, Hkv, S, D, page_size = 2, 8, 4, 40, 16, 3
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32)
               for s in ((B, Hq, D), (B, Hkv, S, D), (B, Hkv, S, D)))
    lengths = np.array([S, rng.integers(12, S)], np.int32)
    group_idx = jnp.asarray(np.stack([rng.permutation(Hkv)[:2] for _ in range(B)]), jnp.int32)
    first, last = visible_pages(lengths, page_size, window)
    pages = np.zeros((B, 2, -(-S // page_size)), np.int32)
    count = np.zeros((B, 2), np.int32)
    for b in range(B):
        n = int(last[b] - first[b] + 1)
        pages[b, :, :n], count[b] = np.arange(first[b], last[b] + 1), n
    listed = sparse_decode_attention(q, k, v, jnp.asarray(lengths), group_idx,
                                     sliding_window=window, page_idx=jnp.asarray(pages),
                                     page_count=jnp.asarray(count), page_size=page_size)
    plain = sparse_decode_attention(q, k, v, jnp.asarray(lengths), group_idx,
                                    sliding_window=window)
    np.testing.assert_array_equal(np.asarray(listed), np.asarray(plain))


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


def page_attention_f64(q, k, v, rule: PageRule, page_size, window, oracle):
    """float64 numpy: per query t and KV group, the visible pages ranked (Quest's bound as
    max over the box, or the group's attention mass), the rule's count kept (first and last
    visible forced, ties to the lowest page), softmax over the kept visible keys."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    _, T, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    out = np.zeros(q.shape[1:])
    for t in range(T):
        L = t + 1
        lo = 0 if window is None else max(0, L - window)
        first, last = lo // page_size, (L - 1) // page_size
        n = last - first + 1
        keep = n if L < rule.min_context else min(n, max(min(n, 2), int(np.ceil(rule.topk * n))))
        for h in range(Hkv):
            heads = range(h * G, (h + 1) * G)
            s = np.stack([k[0, lo:L, h] @ q[0, t, i] / np.sqrt(D) for i in heads])  # [G, n]
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            score = {}
            for page in range(first, last + 1):
                keys = k[0, page * page_size:min((page + 1) * page_size, L), h]
                if oracle:
                    at = np.arange(lo, L) // page_size == page
                    score[page] = p[:, at].sum()
                else:
                    score[page] = max(np.maximum(q[0, t, i] * keys.min(0),
                                                 q[0, t, i] * keys.max(0)).sum() for i in heads)
            others = sorted((p for p in score if p not in (first, last)),
                            key=lambda p: (-score[p], p))
            kept = {first, last} | set(others[:keep - len({first, last})])
            at = np.isin(np.arange(lo, L) // page_size, list(kept))
            for i, head in enumerate(heads):
                w = np.exp(s[i, at] - s[i, at].max())
                out[t, head] = w @ v[0, lo:L, h][at] / w.sum()
    return out


@pytest.mark.parametrize("oracle, window", [(False, None), (False, 13), (True, 13)])
def test_masked_page_attention_equals_float64(rng, oracle, window):
    """The masked evaluation's attention (Quest's bound, or the oracle's true mass) against a
    float64 loop over queries, groups and pages."""
    from polar_jax.sparsity import page_masked_attention

    T, Hq, Hkv, D, page_size = 30, 4, 2, 8, 4
    q, k, v = (jnp.asarray(rng.standard_normal((1, T, h, D)), jnp.float32)
               for h in (Hq, Hkv, Hkv))
    rule = PageRule(topk=0.3, min_context=9)
    out = page_masked_attention(q, k, v, jnp.ones((1, T), jnp.int32), window, None, rule,
                                page_size, oracle=oracle)
    np.testing.assert_allclose(np.asarray(out[0]), page_attention_f64(q, k, v, rule, page_size,
                                                                      window, oracle),
                               atol=2e-5, rtol=0)


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
        np.testing.assert_allclose(everything, dense, atol=1e-5, rtol=0)


# --- bad values -------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, needles", [
    (["--page-topk", "0"], ("argument --page-topk: must be a finite number in (0, 1], got 0.0",)),
    (["--page-topk", "1.5"], ("argument --page-topk",)),
    (["--page-budget", "0"], ("argument --page-budget: must be an integer in [1, ",)),
    (["--page-topk", "0.5", "--page-budget", "64"],
     ("argument --page-budget: not allowed with argument --page-topk",)),
    (["--page-min-context", "-1", "--page-topk", "0.5"], ("argument --page-min-context",)),
    (["--page-size", "0", "--page-topk", "0.5"], ("argument --page-size",)),
    (["--page-min-context", "64"],
     ("--page-min-context=64 applies only with --page-topk or --page-budget",)),
    (["--page-size", "8"], ("--page-size=8 applies only with --page-topk or --page-budget",)),
    (["--page-topk", "0.5", "--attn-topk", "0.5"],
     ("--attn-topk=0.5 applies only with --mode sparse or oracle",)),
])
@pytest.mark.parametrize("command", [["eval", "perplexity"], ["eval", "retrieval"]])
def test_bad_page_values_are_refused_in_one_line(capsys, command, extra, needles):
    from conftest import run_cli

    rc, out, err = run_cli(capsys, [*command, "--model", "m", "--text", "t", *extra])
    assert rc == 2 and out == "" and "Traceback" not in err, (rc, out, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("polar-jax: error: "), err
    assert all(needle in lines[0] for needle in needles), lines[0]


def test_page_rule_and_settings_refuse_bad_values():
    from polar_jax.errors import PolarJaxError
    from polar_jax.settings import PageSettings

    with pytest.raises(ValueError, match="one of topk and budget"):
        PageRule(topk=0.5, budget=64)
    with pytest.raises(PolarJaxError, match="exclude each other"):
        PageSettings(page_topk=0.5, page_budget=64)
    with pytest.raises(PolarJaxError, match=r"page_topk must be a finite number in \(0, 1\]"):
        PageSettings(page_topk=2.0)
    with pytest.raises(PolarJaxError, match="page_size=8 applies only"):
        PageSettings(page_size=8)
    assert PageSettings(page_budget=64, page_min_context=0).rule() == PageRule(None, 64, 0)


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


def test_bench_decode_times_group_by_page_and_counts_its_bytes(tmp_path):
    """`bench decode --page-topk`: each row times dense, group-only and group x page in one
    call; the page rule's bytes: at 4096 positions of 16-token pages, 25% keeps 64 of 256
    pages and the summaries add 1/16 of a page's bytes per page."""
    import json

    from polar_jax.bench.decode import main, page_fractions

    assert page_fractions(PageRule(topk=0.25), 4095, 16) == (0.25, 1 / 256)
    assert page_fractions(PageRule(budget=64), 4095, 16) == (64 / 4096, 1 / 256)
    assert page_fractions(PageRule(topk=0.25), 1000, 16) == (1.0, 63 / 1001 / 16)  # < 1024
    out = tmp_path / "rows.json"
    assert main(["--arch", "tiny", "--batch-sizes", "2", "--context-lens", "200",
                 "--attn-topk", "0.5", "--page-topk", "0.25", "--page-min-context", "64",
                 "--steps", "2", "--repeats", "1", "--peer", "off", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["kv_layout"] == "paged 16" and row["page_topk"] == 0.25
    assert row["paged_ms"] > 0 and row["paged_roofline_ms"] < row["sparse_roofline_ms"]
