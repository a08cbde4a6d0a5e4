"""`polar-jax bench decode`: decode throughput at real model shapes, dense vs Polar Sparsity
vs the memory roofline.

For each batch size and context length: random weights of the architecture's exact Hugging
Face shapes (a step's time does not depend on their values) and random routers, or with
`--model M [--routers R]` a real checkpoint and its trained routers (MLP k from their
calibration for each batch size); a KV cache filled with random values up to the context
length; then N greedy decode steps inside one jitted `fori_loop`, timed as
`(t(2N) - t(N)) / N` (median of repeats), so dispatch and the first call's compilation
cancel. One KV cache per batch size serves every context length (the attention stops at each
row's length), so contexts never recompile. The roofline is the bytes a step must read
divided by the copy bandwidth measured in the same run: all weights and the whole KV cache
for dense; the attention weights, the routers a step runs (the MLP router's second projection
in int8 with `--router-weights int8`), the selected MLP rows and the selected KV groups for
sparse. With torch importable, Hugging Face transformers decodes the same shapes in
PyTorch (static KV cache, SDPA; `--torch-compile` to compile it) as the peer column.

With `--tp N --dp M` the step runs over a mesh of M x N devices (`models.sharding`): weights,
routers and KV cache are made in their shards, the batch splits over `data`, and the sparse
plan selects per shard (`SparsityPlan.build(..., shards=N)`). Rooflines and the memory check
are per device: its shard of each split array, the replicated ones whole. The peer (one
device) runs only without a mesh. With `--collectives` nothing is timed: the dense and sparse
steps are compiled at one and two layers and their collectives counted, per layer and outside
the layers (`polar_jax.bench.collectives`; on a CPU too, at any shape).

With `--page-topk F` (or `--page-budget N`) each row also times group x page sparsity: the
same plan, each kept group reading only its selected pages of a paged cache with page
summaries (`--page-size`, default 16), in the same call as dense and group-only; its roofline
counts the kept groups' kept pages (the sink and the current page included) and the kept
groups' page summaries the selector reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import importlib.util
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.kv_cache import KVCache, PagedKVCache
from models.registry import BENCH_SHAPES as ARCHS  # the --arch shapes of every family
from models.sharding import (
    batch_sharding,
    check_split,
    dp_size,
    global_array,
    kv_cache_shardings,
    make_mesh,
    param_shardings,
    router_shardings,
    tp_size,
)

from polar_jax import bench
from polar_jax.bench import torch_peer
from polar_jax.bench.timing import copy_bandwidth, per_step_ms
from polar_jax.decode import cache_length
from polar_jax.dtypes import DTYPES, parse_dtype
from polar_jax.errors import PolarJaxError
from polar_jax.loading import ModelDir
from polar_jax.memory import check_fits
from polar_jax import validate
from polar_jax.settings import DEFAULT_PAGE_SIZE, ROUTER_WEIGHTS, SparsitySettings
from polar_jax.validate import cli_list

RANDOM_ROUTER_RANK = 1024  # of the random routers timed where no trained ones are given


def arch_hf_config(name: str, max_len: int, layers: int | None = None) -> dict:
    """The Hugging Face config of a built-in architecture, positions stretched to cover
    `max_len` (the benchmark times steps, it does not need the model to be trained there) and
    its first `layers` layers if given (1 to the architecture's layers)."""
    hf = dict(ARCHS[name])
    hf["max_position_embeddings"] = max(hf["max_position_embeddings"], max_len)
    if layers is not None:
        hf["num_hidden_layers"] = layers
    return hf


def model_hf_config(model_dir: ModelDir, max_len: int) -> dict:
    """A checkpoint's Hugging Face config, refusing contexts beyond its positions."""
    positions = model_dir.config.max_position_embeddings
    if max_len > positions:
        raise PolarJaxError(f"--context-lens up to {max_len - 1} (the longest context plus 2 x "
                            f"--steps) need {max_len} positions; {model_dir.path} has {positions}")
    return model_dir.hf_config


def with_shardings(abstract, shardings):
    """The shapes of `abstract` (a pytree of arrays or `ShapeDtypeStruct`s) placed by the
    matching pytree `shardings`, as `ShapeDtypeStruct`s."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract, shardings)


def random_arrays(abstract, seed: int, scale: float = 1.0):
    """Random-normal arrays (times `scale`) of the shapes of `abstract`, in one jitted call,
    each made directly in its shards where its `ShapeDtypeStruct` carries a sharding (else on
    the default device). XLA's RngBitGenerator (`rbg` keys), not threefry: it compiles several
    times faster (a step's time does not depend on the values)."""
    leaves, treedef = jax.tree.flatten(abstract)

    def make(key):
        keys = jax.random.split(key, len(leaves))
        return [jax.random.normal(k, x.shape, x.dtype) * scale for k, x in zip(keys, leaves)]

    shardings = [getattr(x, "sharding", None) for x in leaves]
    return treedef.unflatten(
        jax.jit(make, out_shardings=shardings)(jax.random.key(seed, impl="rbg")))


def random_state(config, dtype, seed: int = 0, mesh=None):
    """(graphdef, state) of the model with random-normal parameters made on the device, or
    with a `mesh` in their shards (`param_shardings`: no device ever holds a whole split
    parameter)."""
    from models import build_model

    graphdef, abstract = nnx.split(build_model(config, dtype))
    if mesh is not None:
        abstract = with_shardings(abstract, param_shardings(abstract, mesh))
    return graphdef, random_arrays(abstract, seed, 0.02)


def place_routers(router_state, mesh):
    """`Routers.unstack()`'s arrays placed by `router_shardings` (as they are without a mesh)."""
    return router_state if mesh is None else jax.device_put(
        router_state, router_shardings(router_state, mesh))


def kv_cache_abstract(config, batch: int, length: int, dtype, mesh=None,
                      page_size: int | None = None, summaries: bool = False
                      ) -> KVCache | PagedKVCache:
    """`KVCache.abstract`, or with a `page_size` a `PagedKVCache` of `batch` sequences of
    `length` positions (the pool exactly their pages; `summaries`: with page summaries); with
    a `mesh` each array carrying its `kv_cache_shardings`."""
    if page_size is None:
        cache = KVCache.abstract(config, batch, length, dtype)
    else:
        per_seq = -(-length // page_size)
        cache = PagedKVCache.abstract(config, batch * per_seq, page_size, batch, per_seq, dtype,
                                      summaries)
    return cache if mesh is None else with_shardings(cache, kv_cache_shardings(cache, mesh))


def random_cache(abstract, seed: int, mesh=None):
    """Random keys and values of `kv_cache_abstract`'s shapes; a paged cache's block table a
    random permutation of the pool (each sequence's pages scattered, as a server's are)."""
    if not isinstance(abstract, PagedKVCache):
        return random_arrays(abstract, seed)
    pages = random_arrays(abstract.pages, seed)
    table = np.random.default_rng(seed).permutation(abstract.pages[0][0].shape[1])
    table = table.astype(np.int32).reshape(abstract.block_table.shape)
    return PagedKVCache(pages, jnp.asarray(table) if mesh is None
                        else global_array(table, batch_sharding(mesh, 2)),
                        None if abstract.summaries is None
                        else random_arrays(abstract.summaries, seed + 1))


@dataclasses.dataclass
class Subject:
    """What a run times: the model (`graphdef`, `state`), its routers (`Routers.unstack()`),
    the routers' calibrated MLP k per batch size (None for random routers), the number of
    layers of the whole model (times are scaled to it from `config.num_layers`) and the Hugging
    Face config the PyTorch peer builds. With a mesh, state and routers are in their shards."""

    name: str
    config: object
    graphdef: object
    state: object
    router_state: tuple
    mlp_topk: dict | None
    num_layers: int
    hf_config: dict


def arch_subject(arch: str, hf: dict, dtype, mesh=None, int8_mlp_up: bool = False) -> Subject:
    """A built-in architecture (its Hugging Face config `hf`, from `arch_hf_config`) with
    random weights and random routers (`Routers.unstack(dtype, int8_mlp_up)`)."""
    from models import config_from_hf
    from routers.model import Routers

    config = config_from_hf(hf)
    graphdef, state = random_state(config, dtype, mesh=mesh)
    router_state = place_routers(
        Routers.for_model(config, RANDOM_ROUTER_RANK, seed=1).unstack(dtype, int8_mlp_up), mesh)
    return Subject(arch, config, graphdef, state, router_state, None,
                   ARCHS[arch]["num_hidden_layers"], hf)


def model_subject(model_dir: ModelDir, routers: str | None, dtype, mesh=None,
                  int8_mlp_up: bool = False) -> Subject:
    """A real checkpoint (converted or Hugging Face directory) and, if given, its
    trained routers (else random ones), as `Routers.unstack(dtype, int8_mlp_up)`."""
    from routers.model import Routers, load_routers

    config = model_dir.config
    graphdef, state = nnx.split(model_dir.load(dtype, mesh))
    if routers is None:
        trained, mlp_topk = Routers.for_model(config, RANDOM_ROUTER_RANK, seed=1), None
    else:
        trained, metadata = load_routers(routers, config)
        mlp_topk = metadata.get("mlp_topk")
    return Subject(model_dir.path.name, config, graphdef, state,
                   place_routers(trained.unstack(dtype, int8_mlp_up), mesh), mlp_topk,
                   config.num_layers,
                   model_dir.hf_config)


def _bytes(tree) -> int:
    """Bytes one device holds of `tree`'s arrays (or `ShapeDtypeStruct`s): each leaf's shard
    where it carries a sharding, else the whole leaf."""
    def one(x):
        sharding = getattr(x, "sharding", None)
        shape = x.shape if sharding is None else sharding.shard_shape(x.shape)
        return math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return sum(one(x) for x in jax.tree.leaves(tree))


@dataclasses.dataclass
class StepBytes:
    dense: int
    sparse: int
    fixed: int  # of both: the weights outside the layers (embeddings, final norm, head)
    paged: int | None = None  # sparse with the plan's page rule


def page_fractions(rule, context: int, page_size: int) -> tuple[float, float]:
    """(the share of a `context`-token sequence's KV positions the page rule keeps, its page
    summaries' bytes over its keys' and values'), for a step writing token `context + 1`."""
    from pallas_kernels.page_selection import visible_pages

    length = context + 1
    first, last = (int(x) for x in visible_pages(np.int32(length), page_size))
    kept = int(rule.pages_kept(np.array(first), np.array(last), np.array(length), page_size))
    return min(1.0, kept * page_size / length), (last + 1) / length / page_size


def step_bytes(config, state, router_state, plan, batch: int, context: int, dtype,
               mesh=None, page_size: int | None = None) -> StepBytes:
    """Bytes one device must read in a decode step, dense and sparse: its shards of the
    parameters and of the routers a sparse step runs (as placed; replicated ones whole) and,
    with a `mesh`, its shard of the KV cache. The plan's k are per shard, of the shard's groups
    and neurons. A layer's routers are read where it selects groups or neurons (the first
    projection, one matmul for both; with a local probe also every group's last positions of
    the cache), the MLP router's second projection (and its int8 scales) only where it
    selects neurons. With the plan's page rule (pages of `page_size`)
    also `paged`: a layer's kept groups read only their kept pages, and the summaries of
    their pages."""
    params = nnx.to_pure_dict(state)
    weights = _bytes(params)
    # Tables a step reads only the batch's rows of: learned positions, and the token embedding
    # when the head is a separate matrix (a tied head reads the whole table for the logits).
    for table in ("pos_embed",) + (("embed",) if params.get("lm_head") else ()):
        if table in params:
            weights -= _bytes(params[table])
    kv_layer = _bytes(kv_cache_abstract(config, batch, context, dtype, mesh)) / config.num_layers
    dense = weights + config.num_layers * kv_layer
    sparse = weights
    shards = plan.shards if plan else 1
    paged = 0.0  # the page rule's saving
    for layer in range(config.num_layers):
        groups = plan.attn_groups[layer] if plan else None
        kv_read = kv_layer * (1 if groups is None else groups * shards / config.num_kv_heads)
        sparse += kv_read
        rule = plan.page_rule(layer) if plan else None
        if rule is not None:
            kept, summaries = page_fractions(rule, context, page_size)
            paged += kv_read * (kept - 1 + summaries)
        neurons = plan.mlp_neurons[layer] if plan else None
        if router_state is not None and (groups, neurons) != (None, None):
            routers = router_state[layer]
            sparse += _bytes([routers.w_in, routers.attn_b])
            if groups is not None and routers.probe_window is not None:  # every group's window
                sparse += kv_layer * min(routers.probe_window, context) / context
            if neurons is not None:
                sparse += _bytes([routers.mlp_up, routers.mlp_up_scale])
        if neurons is not None:
            mlp = params["layers"][layer]["mlp"]
            rows = _bytes([mlp.get("w_in", mlp.get("w_gate_up")), mlp["w_out"]])
            sparse -= rows * (1 - neurons * shards / config.mlp_dim)
    return StepBytes(int(dense), int(sparse), int(weights - _bytes(params["layers"])),
                     None if plan is None or plan.pages is None else int(sparse + paged))


def whole_model(ms: float, fixed_ms: float, scale: float) -> float:
    """A step of the timed layers -> of the whole model (`scale` = its layers / those timed):
    the part outside the layers once (`fixed_ms`, estimated as its bytes at the copy
    bandwidth), the rest `scale` times."""
    return fixed_ms + (ms - fixed_ms) * scale


def make_decode_loop(graphdef, plan, mesh=None):
    """Jitted `(state, router_state, kv_cache, tokens, lengths, n) -> (tokens, kv_cache)`: n
    greedy `decode_step`s (dense when `plan` is None) in one `fori_loop`, the cache donated;
    `router_state` is `Routers.unstack()`. With a `mesh`, over its devices, the cache kept in
    its shards."""
    from polar_jax.sampling import argmax
    from polar_jax.step import DecodeState, decode_step

    greedy = functools.partial(argmax, mesh=mesh)

    @functools.partial(jax.jit, donate_argnums=(2,))
    def run(state, router_state, kv_cache, tokens, lengths, n):
        model = nnx.merge(graphdef, state)
        step = lambda _, decode: decode_step(model, decode, greedy, router_state, plan, mesh).state
        decode = DecodeState(tokens, lengths, jnp.ones(tokens.shape, bool), kv_cache)
        decode = jax.lax.fori_loop(0, n, step, decode)
        kv_cache = decode.kv_cache
        if mesh is not None:
            kv_cache = jax.lax.with_sharding_constraint(kv_cache,
                                                        kv_cache_shardings(kv_cache, mesh))
        return decode.tokens, kv_cache

    return run


def _step_inputs(rng, batch: int, context: int, mesh=None):
    """Random tokens and lengths `context`, `[batch]` each, split over `data` with a `mesh`."""
    tokens = rng.integers(0, 1000, batch).astype(np.int32)
    lengths = np.full((batch,), context, np.int32)
    if mesh is None:
        return jnp.asarray(tokens), jnp.asarray(lengths)
    return global_array(tokens, batch_sharding(mesh)), global_array(lengths, batch_sharding(mesh))


def time_steps(run, state, router_state, kv_cache, batch: int, context: int, steps: int,
               repeats: int, mesh=None):
    """(ms per step, kv_cache): `timing.per_step_ms` of the decode loop `run`."""
    rng = np.random.default_rng(0)

    def once(n):
        nonlocal kv_cache
        tokens, lengths = _step_inputs(rng, batch, context, mesh)
        start = time.perf_counter()
        out, kv_cache = run(state, router_state, kv_cache, tokens, lengths, np.int32(n))
        out.block_until_ready()
        return time.perf_counter() - start

    return per_step_ms(once, steps, repeats), kv_cache


def profile_steps(run, state, router_state, kv_cache, batch: int, context: int, steps: int,
                  num_layers: int, mesh=None):
    """(breakdown, kv_cache): one profiled run of `steps` steps (already compiled), the first
    device's time per layer split by the model's named scopes and its collectives
    (`trace.scope_breakdown`)."""
    from polar_jax.bench.trace import scope_breakdown, tracing

    tokens, lengths = _step_inputs(np.random.default_rng(1), batch, context, mesh)
    n = np.int32(steps)
    hlo = run.lower(state, router_state, kv_cache, tokens, lengths, n).compile().as_text()
    with tracing() as events:
        out, kv_cache = run(state, router_state, kv_cache, tokens, lengths, n)
        out.block_until_ready()
    return scope_breakdown(events(), hlo, steps * num_layers), kv_cache


def sparse_plan(config, attn_topk: float, batch: int, mlp_topk: dict | None = None,
                mlp_density: float | None = None, shards: int = 1, dense_layers=(0,),
                page_rule=None):
    """The `SparsityPlan` a run times: `attn_topk` of the KV groups (but in `dense_layers`);
    MLP k `mlp_density` of the neurons in every layer (a multiple of 128), else the routers'
    calibrated `mlp_topk` for this batch size, else (random routers) a dense MLP; the page
    rule `page_rule` (but in `dense_layers`)."""
    from polar_jax.sparsity import SparsityPlan, mlp_density_metadata

    metadata = ({"mlp_topk": mlp_topk} if mlp_topk else None) if mlp_density is None else (
        mlp_density_metadata(config, mlp_density))
    return SparsityPlan.per_batch(config, metadata, attn_topk, dense_layers, shards,
                                  page_rule)(batch)


def step_hlo(hf: dict, num_layers: int, sparse: bool, dtype, mesh, batch: int, cache_len: int,
             attn_topk: float, mlp_density: float | None = None, int8_mlp_up: bool = False) -> str:
    """The compiled HLO text of the greedy decode loop over `mesh` for the first `num_layers`
    of the Hugging Face config `hf`, weights, routers and cache abstract in their shards
    (nothing is allocated). Sparse: every layer selects, `attn_topk` of its groups and, for a
    non-gated MLP, `mlp_density` of its neurons (default 0.5)."""
    from models import build_model, config_from_hf
    from routers.model import Routers

    config = config_from_hf(dict(hf, num_hidden_layers=num_layers))
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_model(config, dtype)))
    state = with_shardings(abstract, param_shardings(abstract, mesh))
    routers, plan = None, None
    if sparse:
        routers = jax.eval_shape(lambda: Routers.for_model(config, RANDOM_ROUTER_RANK)
                                 .unstack(dtype, int8_mlp_up))
        routers = with_shardings(routers, router_shardings(routers, mesh))
        density = None if config.gated_mlp else mlp_density or 0.5
        plan = sparse_plan(config, attn_topk, batch, None, density, tp_size(mesh), ())
    rows = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=batch_sharding(mesh))
    cache = kv_cache_abstract(config, batch, cache_len, dtype, mesh)
    return make_decode_loop(graphdef, plan, mesh).lower(
        state, routers, cache, rows, rows, np.int32(1)).compile().as_text()


def decode_collectives(hf: dict, dtype, mesh, batch: int, cache_len: int, attn_topk: float,
                       mlp_density: float | None, int8_mlp_up: bool = False) -> dict:
    """{"dense": ..., "sparse": ...}: the `collectives.StepCollectives` of `step_hlo`'s
    program, compiled at one and two layers."""
    from polar_jax.bench import collectives

    return {mode: collectives.step_collectives(
        lambda n, sparse=mode == "sparse": step_hlo(hf, n, sparse, dtype, mesh, batch, cache_len,
                                                     attn_topk, mlp_density, int8_mlp_up))
        for mode in ("dense", "sparse")}


def _format_collectives(mode: str, found) -> str:
    """One line: a step's collectives per layer and outside the layers, with their sizes."""
    def part(items) -> str:
        kinds = sorted({c.kind for c in items})
        return ", ".join(f"{kind} {sum(c.kind == kind for c in items)} ("
                         + " + ".join(f"{c.bytes} B" for c in items if c.kind == kind) + ")"
                         for kind in kinds) or "none"
    return (f"  {mode:<6} per layer: {part(found.per_layer)}; outside the layers: "
            f"{part(found.outside)}")


def run_subject(subject: Subject, batch_sizes, context_lens, fractions,
                mlp_density: float | None, steps: int, repeats: int, dtype, bandwidth: float,
                log, breakdown: bool = False, mesh=None, page_size: int | None = None,
                page_rule=None) -> list[dict]:
    """The rows of every batch size, context and fraction of groups; with a `mesh` (on which
    `subject` was made), over its devices, times and rooflines per device. With a
    `page_size`, the cache is paged (the server's layout), else contiguous; with a
    `page_rule` (paged) each row also times the plan with page sparsity ("paged_*")."""
    config, graphdef, state = subject.config, subject.graphdef, subject.state
    router_state, name = subject.router_state, subject.name
    scale = subject.num_layers / config.num_layers
    tp, dp = tp_size(mesh), dp_size(mesh)
    rows = []
    dense_run = make_decode_loop(graphdef, None, mesh)
    sparse_runs = {}  # (fraction, batch) -> (plan, jitted loop, page-sparse loop or None)
    # One cache per batch size, long enough for the longest context: the attention kernels
    # stop at each row's length, so a context is a traced value and never recompiles.
    cache_len = cache_length(max(context_lens) + 2 * steps + 1)
    for batch in batch_sizes:
        cache = kv_cache_abstract(config, batch, cache_len, dtype, mesh, page_size,
                                  summaries=page_rule is not None)
        try:
            check_fits(f"batch size {batch}", {"KV cache per device": _bytes(cache)},
                       jax.devices()[0], "--batch-sizes")
        except PolarJaxError as err:
            for context in context_lens:
                rows.append(dict(arch=name, batch=batch, context=context, tp=tp, dp=dp,
                                 skipped=str(err)))
                log(_format(rows[-1]))
            continue
        kv_cache = random_cache(cache, batch, mesh)
        summaries = None
        if page_rule is not None:  # read and written only by the page-sparse steps
            kv_cache, summaries = PagedKVCache(kv_cache.pages, kv_cache.block_table), kv_cache.summaries

        def with_summaries(measure):
            """`measure(cache)`'s result over the cache with its page summaries (which it
            returns updated beside the result)."""
            nonlocal kv_cache, summaries
            result, cache = measure(dataclasses.replace(kv_cache, summaries=summaries))
            kv_cache, summaries = PagedKVCache(cache.pages, cache.block_table), cache.summaries
            return result

        for context in context_lens:
            base = dict(arch=name, batch=batch, context=context, tp=tp, dp=dp,
                        kv_layout="contiguous" if page_size is None else f"paged {page_size}",
                        layers_timed=config.num_layers, layers=subject.num_layers)
            dense_ms, kv_cache = time_steps(dense_run, state, None, kv_cache, batch, context,
                                            steps, repeats, mesh)
            for fraction in fractions:
                if (fraction, batch) not in sparse_runs:
                    plan = sparse_plan(config, fraction, batch, subject.mlp_topk, mlp_density, tp)
                    paged = (None if page_rule is None else
                             dataclasses.replace(plan, pages=sparse_plan(
                                 config, fraction, batch, subject.mlp_topk, mlp_density, tp,
                                 page_rule=page_rule).pages))
                    sparse_runs[fraction, batch] = plan, make_decode_loop(graphdef, plan, mesh), (
                        None if paged is None else (paged, make_decode_loop(graphdef, paged, mesh)))
                plan, run, paged = sparse_runs[fraction, batch]
                neurons = [None if k is None else k * tp for k in plan.mlp_neurons]  # all shards'
                kept = [k for k in neurons if k is not None]
                sparse_ms, kv_cache = time_steps(run, state, router_state, kv_cache, batch, context,
                                                 steps, repeats, mesh)
                nbytes = step_bytes(config, state, router_state, plan if paged is None else paged[0],
                                    batch, context, dtype, mesh, page_size)
                fixed_ms = nbytes.fixed / bandwidth * 1e3
                dense_w, sparse_w = (whole_model(t, fixed_ms, scale) for t in (dense_ms, sparse_ms))
                dense_roof, sparse_roof = (whole_model(b / bandwidth * 1e3, fixed_ms, scale)
                                           for b in (nbytes.dense, nbytes.sparse))
                row = dict(base, attn_topk=fraction,
                           mlp_neurons=round(sum(kept) / len(kept)) if kept else None,
                           mlp_neurons_per_layer=neurons,
                           dense_ms=round(dense_w, 4), sparse_ms=round(sparse_w, 4),
                           dense_tokens_per_s=round(batch / dense_w * 1e3, 1),
                           sparse_tokens_per_s=round(batch / sparse_w * 1e3, 1),
                           speedup=round(dense_w / sparse_w, 3),
                           dense_roofline_ms=round(dense_roof, 4),
                           sparse_roofline_ms=round(sparse_roof, 4),
                           fixed_ms=round(fixed_ms, 4))
                row["dense_pct_roofline"] = round(100 * dense_roof / dense_w, 1)
                row["sparse_pct_roofline"] = round(100 * sparse_roof / sparse_w, 1)
                row["roofline_speedup"] = round(dense_roof / sparse_roof, 3)
                if paged is not None:
                    paged_ms = with_summaries(lambda cache: time_steps(
                        paged[1], state, router_state, cache, batch, context, steps, repeats,
                        mesh))
                    paged_w = whole_model(paged_ms, fixed_ms, scale)
                    paged_roof = whole_model(nbytes.paged / bandwidth * 1e3, fixed_ms, scale)
                    row.update(page_topk=page_rule.topk, page_budget=page_rule.budget,
                               page_min_context=page_rule.min_context,
                               paged_ms=round(paged_w, 4),
                               paged_tokens_per_s=round(batch / paged_w * 1e3, 1),
                               paged_speedup=round(dense_w / paged_w, 3),
                               paged_roofline_ms=round(paged_roof, 4),
                               paged_roofline_speedup=round(dense_roof / paged_roof, 3),
                               paged_pct_roofline=round(100 * paged_roof / paged_w, 1))
                if breakdown and fraction == fractions[0]:
                    row["breakdown_us_per_layer"] = {}
                    modes = [("dense", dense_run, None), ("sparse", run, router_state)]
                    if paged is not None:
                        modes.append(("paged", paged[1], router_state))
                    for mode, loop, routers in modes:
                        profile = lambda cache: profile_steps(loop, state, routers, cache, batch,
                                                              context, steps, config.num_layers,
                                                              mesh)
                        if mode == "paged":
                            parts = with_summaries(profile)
                        else:
                            parts, kv_cache = profile(kv_cache)
                        row["breakdown_us_per_layer"][mode] = parts
                        log(f"  {mode} us per layer: span {parts['span']}: " + ", ".join(
                            f"{k} {v}" for k, v in parts["parts"].items()))
                        for kern in parts["top_kernels"][:6]:
                            log(f"      {kern['us']:>8.2f} us  {kern['calls']:>5} x  "
                                f"{kern['scope']:<11} {kern['kernel']}")
                rows.append(row)
                log(_format(row))
        del kv_cache
    return rows


def _format(r: dict) -> str:
    if "skipped" in r:
        return f"{r['arch']:<14} {r['batch']:>5} {r['context']:>6}  skipped: {r['skipped']}"
    line = (f"{r['arch']:<14} {r['batch']:>5} {r['context']:>6} {r['attn_topk']:>5.2f} "
            f"{str(r['mlp_neurons'] or '-'):>6} {r['dense_ms']:>8.3f} {r['sparse_ms']:>8.3f} "
            f"{r['dense_tokens_per_s']:>10.0f} {r['sparse_tokens_per_s']:>10.0f} {r['speedup']:>6.2f} "
            f"{r['roofline_speedup']:>6.2f} {r['dense_pct_roofline']:>6.1f} {r['sparse_pct_roofline']:>6.1f}")
    if "paged_ms" in r:
        line += (f"  | x pages: {r['paged_ms']:.3f} ms, {r['paged_speedup']:.2f}x (roofline "
                 f"{r['paged_roofline_speedup']:.2f}x, {r['paged_pct_roofline']:.1f}%)")
    return line


HEADER = (f"{'arch':<14} {'batch':>5} {'ctx':>6} {'attn':>5} {'mlp k':>6} {'dense ms':>8} "
          f"{'sparse ms':>8} {'dense tok/s':>10} {'sparse tok/s':>10} {'speedup':>6} {'roof x':>6} "
          f"{'dense %':>6} {'sparse %':>6}")


def plot(rows: list[dict], path: Path) -> None:
    """Speedup and % of roofline against batch size, one line per context length (and fraction)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "skipped" not in r]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    series = sorted({(r["context"], r["attn_topk"]) for r in rows})
    for context, fraction in series:
        pts = sorted((r["batch"], r) for r in rows if (r["context"], r["attn_topk"]) == (context, fraction))
        xs = [b for b, _ in pts]
        label = f"ctx {context}, {fraction:g} of groups"
        ax1.plot(xs, [r["speedup"] for _, r in pts], "o-", label=label)
        ax1.plot(xs, [r["roofline_speedup"] for _, r in pts], "--", color=ax1.lines[-1].get_color(), alpha=0.5)
        ax2.plot(xs, [r["dense_pct_roofline"] for _, r in pts], "s--", label=f"dense, ctx {context}")
        ax2.plot(xs, [r["sparse_pct_roofline"] for _, r in pts], "o-", label=f"sparse, {label}")
    arch = rows[0]["arch"] if rows else ""
    for ax, title in ((ax1, f"{arch}: sparse / dense tokens per s (dashed: roofline ratio)"),
                      (ax2, f"{arch}: % of memory roofline")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The checked arguments, with the defaults of the architecture filled in."""
    parser = bench.parser("decode", __doc__)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--arch", choices=sorted(ARCHS),
                      help="a built-in shape, random weights and random routers")
    what.add_argument("--model", help="a real checkpoint: converted or Hugging Face directory")
    parser.add_argument("--routers", help="with --model: its trained routers (MLP k from their "
                                          "calibration per batch size); default random routers")
    parser.add_argument("--batch-sizes", type=cli_list(bench.COUNT), default=None,
                        help="comma-separated, multiples of --dp (default 1,16,64,128,256; "
                             "tiny: 1,4; each times --dp)")
    parser.add_argument("--context-lens", type=cli_list(bench.COUNT), default=None,
                        help="comma-separated tokens already in the KV cache (default "
                             "1024,2048,4096; tiny: 64,256)")
    parser.add_argument("--attn-topk", type=cli_list(bench.FRACTION), default="0.5,0.3",
                        help="comma-separated fractions of KV groups a sparse step reads")
    parser.add_argument("--mlp-density", type=bench.FRACTION, default=None,
                        help="fraction of MLP neurons kept (non-gated MLPs); default: the "
                             "routers' calibrated k, or a dense MLP with random routers")
    parser.add_argument("--router-weights", choices=ROUTER_WEIGHTS, default=None,
                        help="the MLP router's second projection in --dtype, or int8 with a "
                             "float32 scale per neuron (non-gated MLPs; their default)")
    parser.add_argument("--steps", type=bench.COUNT, default=16, help="N: steps per timed loop")
    parser.add_argument("--repeats", type=bench.COUNT, default=5,
                        help="timed loops; the median is reported")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16",
                        help="weights, activations and KV cache")
    parser.add_argument("--layers", type=bench.COUNT, default=None,
                        help="time this many layers and scale to the whole model (large models): "
                             "the step outside the layers (embeddings, head; estimated as its "
                             "bytes at the copy bandwidth) counts once, the rest per layer")
    parser.add_argument("--breakdown", action="store_true",
                        help="also profile one loop of dense and sparse steps (first fraction "
                             "only): device microseconds per layer by part (norms, projections, "
                             "attention, KV write, routers, MLP, gaps) and the costliest kernels")
    parser.add_argument("--peer", choices=["auto", "off"], default="auto",
                        help="auto: time Hugging Face transformers (PyTorch, static cache, SDPA) on "
                             "the same shapes when torch imports")
    parser.add_argument("--torch-compile", action="store_true",
                        help="torch.compile the peer's forward (reduce-overhead)")
    parser.add_argument("--tp", type=bench.COUNT, default=1,
                        help="tensor parallel: split the model over N devices (KV groups with "
                             "their query heads, MLP neurons, vocabulary)")
    parser.add_argument("--dp", type=bench.COUNT, default=1,
                        help="data parallel: split each batch over N (groups of) devices")
    parser.add_argument("--page-size", type=bench.COUNT, default=None,
                        help="a paged KV cache of pages of this many tokens (the server's "
                             "layout; each sequence's pages scattered over the pool); default: "
                             "contiguous")
    pages = parser.add_mutually_exclusive_group()
    pages.add_argument("--page-topk", type=bench.FRACTION,
                       help="also time group x page sparsity: each kept group reads this fraction "
                            "of its pages (the first and the current page always), in a paged "
                            "cache with page summaries (--page-size, default 16)")
    pages.add_argument("--page-budget", type=bench.COUNT,
                       help="as --page-topk, a budget of tokens of pages per kept group")
    parser.add_argument("--page-min-context", type=validate.cli_type(validate.integer, int, low=0),
                        default=None, help="with --page-topk or --page-budget: contexts shorter "
                                           "than this read every page (default 1024)")
    parser.add_argument("--collectives", action="store_true",
                        help="with --tp or --dp: count the collectives of the compiled dense and "
                             "sparse step, per layer and outside the layers, by type and size "
                             "(compiled at one and two layers, nothing timed), and exit")
    parser.add_argument("--json", type=bench.OUTPUT_FILE, help="write the rows here")
    parser.add_argument("--plot", type=bench.OUTPUT_FILE, help="write a PNG here (needs matplotlib)")
    args = parser.parse_args(argv)
    pages_on = args.page_topk is not None or args.page_budget is not None
    if args.page_min_context is not None and not pages_on:
        parser.error("argument --page-min-context: applies only with --page-topk or --page-budget")
    if pages_on and args.collectives:
        parser.error("argument --collectives: counts the group-sparse step; drop --page-topk "
                     "and --page-budget")
    if pages_on and args.page_size is None:
        args.page_size = DEFAULT_PAGE_SIZE
    if args.model is None and args.routers is not None:
        raise PolarJaxError("--routers needs --model (built-in --arch shapes use random routers)")
    if args.model is not None and args.layers is not None:
        raise PolarJaxError("--layers applies to built-in --arch shapes only, not to --model")
    if args.layers is not None and args.layers > (most := ARCHS[args.arch]["num_hidden_layers"]):
        parser.error(f"argument --layers: must be an integer in [1, {most}] (the layers of "
                     f"--arch {args.arch}), got {args.layers}")
    tiny = args.arch == "tiny"
    args.batch_sizes = args.batch_sizes or [args.dp * b for b in
                                            ([1, 4] if tiny else [1, 16, 64, 128, 256])]
    args.context_lens = args.context_lens or ([64, 256] if tiny else [1024, 2048, 4096])
    if args.collectives and args.tp * args.dp == 1:
        parser.error("argument --collectives: counts the collectives of a step split over "
                     "devices; give --tp or --dp above 1")
    if args.collectives and args.plot:
        parser.error("argument --plot: --collectives times nothing, there is nothing to plot")
    if uneven := [b for b in args.batch_sizes if b % args.dp]:
        parser.error(f"argument --batch-sizes: each must be a multiple of --dp {args.dp}, got "
                     f"{', '.join(map(str, uneven))}")
    return args


def page_rule(args: argparse.Namespace):
    """The `PageRule` of --page-topk / --page-budget and --page-min-context (None: off)."""
    if args.page_topk is None and args.page_budget is None:
        return None
    from pallas_kernels.page_selection import DEFAULT_MIN_CONTEXT, PageRule

    return PageRule(args.page_topk, args.page_budget, DEFAULT_MIN_CONTEXT
                    if args.page_min_context is None else args.page_min_context)


def run(args: argparse.Namespace, log=print) -> dict:
    """{"meta": ..., "rows": [...]}, as `--json` writes it: the rows of `run_subject`, each with
    the PyTorch peer's time of its shape where the peer ran."""
    from models import config_from_hf

    dtype = parse_dtype(args.dtype)
    max_len = max(args.context_lens) + 2 * args.steps + 1
    model_dir = None if args.model is None else ModelDir.open(args.model)
    hf = (arch_hf_config(args.arch, max_len, args.layers) if model_dir is None
          else model_hf_config(model_dir, max_len))
    config = config_from_hf(hf) if model_dir is None else model_dir.config
    if args.router_weights == "int8" and config.gated_mlp:  # before the peer runs
        raise PolarJaxError("--router-weights int8 applies to the MLP router of a non-gated MLP; "
                            "this model's MLP is gated")
    router_weights = SparsitySettings(router_weights=args.router_weights).router_weights_for(
        not config.gated_mlp)
    int8_mlp_up = router_weights == "int8"
    mesh = None
    if args.tp * args.dp > 1:  # refused in one line before anything runs
        mesh = make_mesh(args.tp, args.dp)
        check_split(config, mesh)
    if args.collectives:
        return run_collectives(args, hf, dtype, mesh, int8_mlp_up, log)
    peer = {}
    if args.peer == "auto" and mesh is not None:
        peer = {"mode": "skipped: it runs on one device, this run on a mesh"}
        log(f"PyTorch peer: {peer['mode']}")
    elif args.peer == "auto" and importlib.util.find_spec("torch") is not None:
        # Before JAX initialises the GPU, so that the two never share its memory.
        start = time.perf_counter()
        peer = torch_peer.run("decode", torch_peer.DECODE_TIMEOUT_S, hf=hf,
                              batch_sizes=args.batch_sizes, context_lens=args.context_lens,
                              steps=args.steps, repeats=args.repeats, dtype=args.dtype,
                              compile_model=args.torch_compile)
        log(f"PyTorch peer ({peer.get('mode', 'failed')}, {time.perf_counter() - start:.0f} s)"
            + (f": {peer['error'][-300:]}" if "error" in peer else ""))
    bandwidth = copy_bandwidth()
    log(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {datetime.date.today()}, "
        f"--tp {args.tp} --dp {args.dp}: copy bandwidth {bandwidth / 1e12:.2f} TB/s per device "
        f"(read + write)")
    log(HEADER)
    subject = (arch_subject(args.arch, hf, dtype, mesh, int8_mlp_up) if model_dir is None
               else model_subject(model_dir, args.routers, dtype, mesh, int8_mlp_up))
    rows = run_subject(subject, args.batch_sizes, args.context_lens, args.attn_topk,
                       args.mlp_density, args.steps, args.repeats, dtype, bandwidth, log,
                       args.breakdown, mesh, args.page_size, page_rule(args))
    peer_rows = {(r["batch"], r["context"]): r for r in peer.get("rows", [])}
    for row in rows:
        match = peer_rows.get((row["batch"], row["context"]), {})
        if "torch_skipped" in match:
            row["torch_skipped"] = match["torch_skipped"]
        if "torch_ms" in match and "dense_ms" in row:
            scale = row["layers"] / row["layers_timed"]
            row["torch_ms"] = round(whole_model(match["torch_ms"], row["fixed_ms"], scale), 4)
            row["torch_tokens_per_s"] = round(row["batch"] / row["torch_ms"] * 1e3, 1)
            row["dense_vs_torch"] = round(row["torch_ms"] / row["dense_ms"], 3)
            if row["attn_topk"] != args.attn_topk[0]:
                continue
            log(f"{row['arch']} B={row['batch']} S={row['context']}: torch {row['torch_ms']:.3f} ms, "
                f"ours dense {row['dense_ms']:.3f} ms ({row['dense_vs_torch']:.2f}x), sparse "
                f"{row['sparse_ms']:.3f} ms")
    meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                date=str(datetime.date.today()), copy_tbps=round(bandwidth / 1e12, 3),
                dtype=args.dtype, steps=args.steps, repeats=args.repeats, mlp_density=args.mlp_density,
                tp=args.tp, dp=args.dp, router_weights=router_weights,
                page_size=args.page_size, page_topk=args.page_topk, page_budget=args.page_budget,
                page_min_context=args.page_min_context,
                peer={k: v for k, v in peer.items() if k != "rows"})
    return {"meta": meta, "rows": rows}


def run_collectives(args: argparse.Namespace, hf: dict, dtype, mesh, int8_mlp_up: bool,
                    log) -> dict:
    """{"meta": ..., "collectives": {"dense": ..., "sparse": ...}} (`decode_collectives` at the
    first batch size and fraction of groups), each step's line logged."""
    batch, fraction = args.batch_sizes[0], args.attn_topk[0]
    cache_len = cache_length(max(args.context_lens) + 2 * args.steps + 1)
    found = decode_collectives(hf, dtype, mesh, batch, cache_len, fraction, args.mlp_density,
                               int8_mlp_up)
    log(f"{args.arch or args.model}: collectives of the compiled decode step, --tp {args.tp} "
        f"--dp {args.dp}, batch {batch}, {fraction:g} of the groups (jax {jax.__version__}, "
        f"{jax.devices()[0].platform}):")
    for mode, step in found.items():
        log(_format_collectives(mode, step))
    meta = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
                date=str(datetime.date.today()), dtype=args.dtype, tp=args.tp, dp=args.dp,
                batch=batch, attn_topk=fraction, mlp_density=args.mlp_density,
                router_weights="int8" if int8_mlp_up else "compute")
    return {"meta": meta, "collectives": {mode: step.summary() for mode, step in found.items()}}


def report(result: dict, json_path: Path | None, plot_path: Path | None, log=print) -> None:
    """Writes the result to `json_path` and its plot to `plot_path` (each where given)."""
    if json_path:
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    if plot_path:
        try:
            plot(result["rows"], plot_path)
        except ImportError:
            log("matplotlib is not installed: no plot (rerun `plot` from the JSON elsewhere)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log = lambda line: print(line, flush=True)
    report(run(args, log), args.json, args.plot, log)
    return 0
