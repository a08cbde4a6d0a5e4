"""The batched decoder: ragged prefill, per-sequence KV cache writes, sampling and stopping,
all inside one jitted program per shape bucket.

The KV cache is `[batch, kv_heads, max_len, head_dim]` per layer (head-major, the layout the
decode kernels read); with page sparsity a `PagedKVCache` with page summaries, each row owning
its own run of pages (an identity block table). Prompts are right-padded, so a sequence's token i sits at cache slot i
and its next token is written at slot `lengths[b]`. Shapes are bucketed (batch to a power of
two, lengths to a few sizes) so a new batch of a similar size reuses a compiled program;
sampling settings, the seed and the number of new tokens are traced values.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from models import ModelConfig
from models.kv_cache import KVCache, PagedKVCache
from models.registry import learned_positions
from models.sharding import (
    batch_sharding, check_split, dp_size, global_array, kv_cache_shardings, param_shardings,
    replicated, router_shardings, to_host, tp_size,
)
from polar_jax import settings, validate
from polar_jax.errors import PolarJaxError
from polar_jax.loading import ModelDir
from polar_jax.memory import check_fits
from polar_jax.sampling import SamplingParams, next_token
from polar_jax.settings import GenerationSettings, PageSettings, SparsitySettings
from polar_jax.sparsity import SparsityPlan
from polar_jax.step import DecodeState, decode_step, prefill
from routers.model import Routers, load_routers

PAD_ID = -1  # in output buffers, after a sequence has finished


@dataclasses.dataclass(frozen=True)
class DecodeShape:
    """The static shape of one compiled generate program."""

    batch: int
    prompt_len: int
    max_new: int
    cache_len: int


# Shape buckets: a new batch of a similar size reuses a compiled program.
MIN_PROMPT_BUCKET = 16  # prompts: powers of two from 16 ...
PROMPT_BUCKET_STEP = 512  # ... up to 512, then multiples of 512
MIN_NEW_TOKENS_BUCKET = 16  # new tokens: powers of two from 16
CACHE_LEN_STEP = 128  # the cache: whole blocks of 128 positions (of the attention kernel's tiles)


def _pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, n - 1).bit_length())


def _round_up(n: int, step: int) -> int:
    return -(-n // step) * step


def cache_length(positions: int) -> int:
    """The KV cache length that holds `positions`: whole steps of `CACHE_LEN_STEP`."""
    return _round_up(positions, CACHE_LEN_STEP)


def bucket_shape(batch: int, prompt_len: int, max_new: int, data: int = 1) -> DecodeShape:
    """The bucketed shape: batch to a power of two (and a multiple of the `data` shards), the
    prompt and new-token lengths and the cache length as the constants above say."""
    prompt_bucket = (_pow2(prompt_len, MIN_PROMPT_BUCKET) if prompt_len <= PROMPT_BUCKET_STEP
                     else _round_up(prompt_len, PROMPT_BUCKET_STEP))
    new_bucket = _pow2(max_new, MIN_NEW_TOKENS_BUCKET)
    return DecodeShape(_round_up(_pow2(batch), data), prompt_bucket, new_bucket,
                       cache_length(prompt_bucket + new_bucket))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GenerateLoop:
    """The generate loop's carry: the next output column `step`, the slots' `DecodeState`
    (active: not finished), the generated ids `out [B, max_new]` and their counts `[B]`."""

    step: jax.Array
    decode: DecodeState
    out: jax.Array
    count: jax.Array


@dataclasses.dataclass
class Completion:
    prompt: str | None
    prompt_tokens: list[int]
    tokens: list[int]  # generated ids, up to and including EOS if produced
    text: str | None


@dataclasses.dataclass
class GenerationOutput:
    completions: list[Completion]
    batch_size: int
    new_tokens: int
    seconds: float  # generation time, compilation excluded
    compile_seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")


class Decoder:
    """A model split once into graph and state, with compiled generate programs per bucket."""

    def __init__(self, config: ModelConfig, model, tokenizer=None, eos_ids: Sequence[int] = (),
                 routers: Routers | None = None,
                 plan_for_batch: Callable[[int], SparsityPlan] | None = None,
                 mesh: Mesh | None = None, router_weights: str | None = None,
                 page_size: int = settings.DEFAULT_PAGE_SIZE):
        """With `routers`, decoding is sparse: `plan_for_batch(batch_bucket)` gives each layer's
        groups kept per sequence and MLP neurons kept for the batch (per shard, with a mesh),
        the MLP router's second projection stored as `router_weights` says (None: int8 where
        there is an MLP router; `SparsitySettings.router_weights_for`, resolved in
        `self.router_weights`).
        A plan with a page rule (page sparsity; without routers where it selects no groups or
        neurons) decodes from a paged cache of `page_size`-token pages with summaries.
        Prefill stays dense. With a `mesh` (`models.sharding.make_mesh`), the model, routers
        and KV cache are split over it: batch over `data`, groups and neurons over `model`."""
        plan = None if plan_for_batch is None else plan_for_batch(1)
        if (plan is None and routers is not None) or (plan is not None and routers is None
                                                      and plan.needs_routers):
            raise ValueError("sparse decoding needs both routers and plan_for_batch")
        self.page_size = None if plan is None or plan.pages is None else page_size
        if self.page_size is not None and dp_size(mesh) > 1:
            raise PolarJaxError("page sparsity in generate runs with --dp 1 (the page pool is "
                                "not split over data)")
        if mesh is not None:
            check_split(config, mesh)
        self.config = config
        self.mesh = mesh
        self.tokenizer = tokenizer
        self.eos_ids = np.asarray(sorted(set(eos_ids)) or [PAD_ID], np.int32)
        self.graphdef, self.state = nnx.split(model)
        self.dtype = jax.tree.leaves(self.state)[0].dtype
        self.plan_for_batch = plan_for_batch
        self.router_weights = None if routers is None else SparsitySettings(
            router_weights=router_weights).router_weights_for(routers.has_mlp)
        self.router_state = None if routers is None else routers.unstack(
            self.dtype, self.router_weights == "int8")
        if mesh is not None:
            self.state = jax.device_put(self.state, param_shardings(self.state, mesh))
            if self.router_state is not None:
                self.router_state = jax.device_put(self.router_state,
                                                   router_shardings(self.router_state, mesh))
        self._compiled: dict[DecodeShape, jax.stages.Compiled] = {}
        self._kv_cache: dict[DecodeShape, KVCache] = {}

    @classmethod
    def load(cls, directory: str | os.PathLike | ModelDir, dtype=None,
             routers: str | os.PathLike | None = None, attn_topk: float | None = None,
             dense_layers: Sequence[int] | None = None, mesh: Mesh | None = None,
             router_weights: str | None = None, page_topk: float | None = None,
             page_budget: int | None = None, page_min_context: int | None = None,
             page_size: int | None = None) -> "Decoder":
        """The model of `directory` (converted or Hugging Face, a path or opened already)
        computing in `dtype` (a name or a jnp dtype; default: float32 on CPU, bfloat16 on an
        accelerator); with the routers directory `routers`, sparse decoding at `attn_topk` and
        `dense_layers`, the MLP router's second projection as `router_weights`
        (`SparsitySettings`); with `page_topk` or `page_budget`, page sparsity inside the
        kept groups (`PageSettings`; `dense_layers` keep every page too); split over `mesh` if
        given, each parameter loaded straight into its shards. Every value is checked before
        the model loads."""
        if not isinstance(directory, ModelDir):
            directory = settings.path("model", directory)
        dtype = settings.compute_dtype(dtype)
        pages = PageSettings(**settings.given(page_topk=page_topk, page_budget=page_budget,
                                              page_min_context=page_min_context,
                                              page_size=page_size))
        if routers is None:
            settings.refuse_unused({"attn_topk": attn_topk, "router_weights": router_weights,
                                    **({} if pages.on else {"dense_layers": dense_layers})},
                                   "with routers (sparse decoding)")
            sparsity = SparsitySettings(**settings.given(dense_layers=dense_layers))
        else:
            routers = settings.path("routers", routers)
            sparsity = SparsitySettings(**settings.given(attn_topk=attn_topk,
                                                         dense_layers=dense_layers,
                                                         router_weights=router_weights))
        model_dir = directory if isinstance(directory, ModelDir) else ModelDir.open(directory)
        config = model_dir.config
        router_module = plan_for_batch = metadata = None
        if routers is not None:
            router_module, metadata = load_routers(routers, config)
            if sparsity.router_weights == "int8":
                router_module.check_int8_mlp_up()
        if routers is not None or pages.on:
            plan_for_batch = SparsityPlan.per_batch(
                config, metadata, 1.0 if routers is None else sparsity.attn_topk,
                sparsity.dense_layers, tp_size(mesh), pages.rule())
        return cls(config, model_dir.load(dtype, mesh), model_dir.tokenizer, model_dir.eos_ids,
                   router_module, plan_for_batch, mesh, sparsity.router_weights, pages.size)

    @property
    def sparse(self) -> bool:
        return self.router_state is not None

    @property
    def page_sparse(self) -> bool:
        return self.page_size is not None

    def _abstract_cache(self, shape: DecodeShape) -> KVCache | PagedKVCache:
        """The cache of one program: contiguous, or (page sparsity) each row's own pages."""
        if not self.page_sparse:
            return KVCache.abstract(self.config, shape.batch, shape.cache_len, self.dtype)
        per_row = -(-shape.cache_len // self.page_size)
        return PagedKVCache.abstract(self.config, shape.batch * per_row, self.page_size,
                                     shape.batch, per_row, self.dtype, summaries=True)

    def _zero_cache(self, abstract):
        """Zeros of the abstract cache; a paged one's block table gives row b pages
        `[b * per_row, (b + 1) * per_row)`."""
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract)
        if isinstance(zeros, PagedKVCache):
            table = zeros.block_table
            zeros = zeros.with_block_table(jnp.arange(table.size, dtype=jnp.int32
                                                      ).reshape(table.shape))
        return zeros

    # -- the jitted program ------------------------------------------------------------------

    def _generate(self, state, router_state, kv_cache, prompt_tokens, prompt_lengths, active,
                  max_new, eos_ids, sampling: SamplingParams, seed, *, shape: DecodeShape):
        """Prefill, then decode until every active row hit EOS or `max_new` tokens.

        Returns generated ids `[B, shape.max_new]` (PAD_ID after the end), their counts `[B]`
        and the cache.
        """
        model = nnx.merge(self.graphdef, state)
        plan = self.plan_for_batch(shape.batch) if self.plan_for_batch is not None else None
        key = jax.random.key(seed)
        logits, kv_cache = prefill(model, prompt_tokens, prompt_lengths, kv_cache)
        token = next_token(logits, sampling, jax.random.fold_in(key, 0), self.mesh)
        out = jnp.full((shape.batch, shape.max_new), PAD_ID, jnp.int32)
        loop = GenerateLoop(
            step=jnp.int32(1),
            decode=DecodeState(token, prompt_lengths, active & ~jnp.isin(token, eos_ids), kv_cache),
            out=out.at[:, 0].set(jnp.where(active, token, PAD_ID)),
            count=active.astype(jnp.int32))

        def cond(loop: GenerateLoop):
            return (loop.step < max_new) & jnp.any(loop.decode.active)

        def body(loop: GenerateLoop) -> GenerateLoop:
            sample = lambda logits: next_token(logits, sampling,
                                               jax.random.fold_in(key, loop.step), self.mesh)
            running = loop.decode.active
            new, _, decode = decode_step(model, loop.decode, sample, router_state, plan, self.mesh)
            return GenerateLoop(
                step=loop.step + 1,
                decode=decode.replace(active=running & ~jnp.isin(new, eos_ids)),
                out=loop.out.at[:, loop.step].set(jnp.where(running, new, PAD_ID)),
                count=loop.count + running)

        loop = jax.lax.while_loop(cond, body, loop)
        return loop.out, loop.count, loop.decode.kv_cache

    # -- host side ---------------------------------------------------------------------------

    def _check_memory(self, shape: DecodeShape) -> None:
        """Per device: its shard of the KV cache and of prefill's attention scores."""
        kv_bytes = self._abstract_cache(shape).bytes() // (dp_size(self.mesh) * tp_size(self.mesh))
        prefill_bytes = (shape.batch // dp_size(self.mesh) * self.config.num_heads
                         // tp_size(self.mesh) * shape.prompt_len**2 * 4)
        check_fits(f"batch size {shape.batch} with prompts up to {shape.prompt_len} tokens and a "
                   f"cache of {shape.cache_len} positions",
                   {"KV cache": kv_bytes, "prefill": prefill_bytes},
                   jax.local_devices()[0],
                   "--batch-size or --max-new-tokens")

    def _shape(self, prompt_lengths: Sequence[int], max_new_tokens: int) -> DecodeShape:
        """The bucketed shape of one batch, after checking its lengths, its sparsity plan (the
        routers' calibration must cover the batch) and its memory."""
        self.check_lengths(prompt_lengths, max_new_tokens)
        shape = bucket_shape(len(prompt_lengths), max(prompt_lengths), max_new_tokens,
                             dp_size(self.mesh))
        if shape not in self._compiled:
            if self.plan_for_batch is not None:
                self.plan_for_batch(shape.batch)
            self._check_memory(shape)
        return shape

    def _place(self, args):
        """The program's inputs on the mesh: per-row arrays split over `data`, the rest
        replicated (host values, the same on every process)."""
        if self.mesh is None:
            return args
        rows = batch_sharding(self.mesh)
        everywhere = replicated(self.mesh)
        return tuple(jax.tree.map(lambda x: global_array(x, rows if i < 3 else everywhere), a)
                     for i, a in enumerate(args))

    def _program(self, shape: DecodeShape, args, status: Callable[[str], Any]) -> jax.stages.Compiled:
        if shape not in self._compiled:
            status(f"compiling (batch {shape.batch}, prompts {shape.prompt_len}, "
                   f"new tokens {shape.max_new})")
            abstract = self._abstract_cache(shape)
            if self.mesh is None:
                jitted = jax.jit(self._generate, static_argnames=("shape",),
                                 donate_argnames=("kv_cache",))
                self._kv_cache[shape] = self._zero_cache(abstract)
            else:
                cache = kv_cache_shardings(abstract, self.mesh)
                everywhere = replicated(self.mesh)
                jitted = jax.jit(self._generate, static_argnames=("shape",),
                                 donate_argnames=("kv_cache",),
                                 out_shardings=(everywhere, everywhere, cache))
                self._kv_cache[shape] = jax.jit(lambda: self._zero_cache(abstract),
                                                out_shardings=cache)()
            self._compiled[shape] = jitted.lower(
                self.state, self.router_state, self._kv_cache[shape], *args, shape=shape).compile()
            status("decoding")
        return self._compiled[shape]

    def check_lengths(self, prompt_lengths: Sequence[int], max_new_tokens: int) -> None:
        limit = self.config.max_position_embeddings
        switch = self.config.longrope_switch
        for i, n in enumerate(prompt_lengths):
            if n == 0:
                raise PolarJaxError(f"prompt {i} is empty")
            if n > limit:
                raise PolarJaxError(
                    f"prompt {i} has {n} tokens; the model's maximum is {limit} positions")
            if learned_positions(self.config) and n + max_new_tokens > limit:
                raise PolarJaxError(
                    f"prompt {i} ({n} tokens) plus {max_new_tokens} new tokens exceeds the "
                    f"model's {limit} learned positions; lower --max-new-tokens")
            if switch is not None and n <= switch < n + max_new_tokens:
                raise PolarJaxError(
                    f"prompt {i} ({n} tokens) plus {max_new_tokens} new tokens crosses the "
                    f"model's longrope switch at {switch} positions, which needs the cache "
                    f"recomputed with the long factors (not supported); lower --max-new-tokens "
                    f"to {switch - n} or give a prompt longer than {switch} tokens")

    def generate_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                     sampling: SamplingParams = SamplingParams(), seed: int = 0,
                     status: Callable[[str], Any] = lambda message: None
                     ) -> tuple[list[list[int]], float, float]:
        """Generated ids per prompt of one batch, seconds running, seconds compiling. The ids
        are taken as valid (`generate` checks them); `status` hears when compiling starts."""
        max_new_tokens = settings.check("max_new_tokens", max_new_tokens)
        lengths = [len(p) for p in prompts]
        shape = self._shape(lengths, max_new_tokens)
        tokens = np.zeros((shape.batch, shape.prompt_len), np.int32)
        for row, prompt in enumerate(prompts):
            tokens[row, :len(prompt)] = prompt
        prompt_lengths = np.ones(shape.batch, np.int32)
        prompt_lengths[:len(prompts)] = lengths
        active = np.arange(shape.batch) < len(prompts)
        args = self._place((tokens, prompt_lengths, active, np.int32(max_new_tokens),
                            self.eos_ids, sampling.validated(), np.uint32(seed % 2**32)))
        start = time.perf_counter()
        program = self._program(shape, args, status)
        compile_seconds = time.perf_counter() - start
        start = time.perf_counter()
        out, count, self._kv_cache[shape] = program(self.state, self.router_state,
                                                    self._kv_cache[shape], *args)
        out, count = to_host(out), to_host(count)
        seconds = time.perf_counter() - start
        return [out[i, :count[i]].tolist() for i in range(len(prompts))], seconds, compile_seconds

    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                 max_new_tokens: int = GenerationSettings.max_new_tokens,
                 sampling: SamplingParams = SamplingParams(),
                 seed: int = GenerationSettings.seed, batch_size: int | None = None,
                 progress: bool = False) -> GenerationOutput:
        """Completions for `prompts` (one string, strings tokenized with the model's tokenizer,
        or lists of token ids; `settings.prompts`), in input order, decoded `batch_size` at a
        time (default: all at once). Every batch's lengths and memory are checked before the
        first runs. `progress`: a bar on stderr, per batch, saying when it compiles."""
        if not isinstance(sampling, SamplingParams):
            raise PolarJaxError(f"sampling must be a polar_jax.sampling.SamplingParams, got "
                                f"{type(sampling).__name__}")
        run = GenerationSettings(max_new_tokens, sampling.temperature, sampling.top_k,
                                 sampling.top_p, seed, batch_size)
        prompts = settings.prompts(prompts, self.config.vocab_size)
        texts = [p if isinstance(p, str) else None for p in prompts]
        if texts[0] is not None and self.tokenizer is None:
            raise PolarJaxError("text prompts need a tokenizer; pass token ids instead")
        ids = [self.tokenizer(p)["input_ids"] for p in prompts] if texts[0] is not None else prompts
        batch_size = min(run.batch_size or len(ids), len(ids))
        starts = range(0, len(ids), batch_size)
        for start in starts:
            self._shape([len(p) for p in ids[start:start + batch_size]], run.max_new_tokens)
        completions, seconds, compile_seconds = [], 0.0, 0.0
        with tqdm(total=len(ids), desc="generating", unit="prompt", disable=not progress) as bar:
            for start in starts:
                chunk = ids[start:start + batch_size]
                out, run_s, compile_s = self.generate_ids(chunk, run.max_new_tokens, sampling,
                                                          run.seed + start, bar.set_postfix_str)
                seconds, compile_seconds = seconds + run_s, compile_seconds + compile_s
                for offset, tokens in enumerate(out):
                    text = None
                    if self.tokenizer is not None:
                        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                    completions.append(Completion(texts[start + offset], chunk[offset], tokens, text))
                bar.update(len(chunk))
        return GenerationOutput(completions, batch_size, sum(len(c.tokens) for c in completions),
                                seconds, compile_seconds)


def generate(model: str | os.PathLike | Decoder,
             prompts: str | Sequence[str] | Sequence[Sequence[int]], *,
             max_new_tokens: int = GenerationSettings.max_new_tokens,
             temperature: float = GenerationSettings.temperature,
             top_k: int = GenerationSettings.top_k, top_p: float = GenerationSettings.top_p,
             seed: int = GenerationSettings.seed, batch_size: int | None = None, dtype=None,
             routers: str | os.PathLike | None = None, attn_topk: float | None = None,
             dense_layers: Sequence[int] | None = None, router_weights: str | None = None,
             page_topk: float | None = None, page_budget: int | None = None,
             page_min_context: int | None = None, page_size: int | None = None,
             progress: bool = False) -> GenerationOutput:
    """Completions for `prompts` (a string, a list of strings or a list of token-id lists) by
    the model at `model` (a converted or Hugging Face directory) or an existing `Decoder`.
    Greedy unless `temperature > 0`; sparse with a `routers` directory, page-sparse with
    `page_topk` or `page_budget` (`Decoder.load` takes `dtype`, `routers`, `attn_topk`,
    `dense_layers`, `router_weights` and the page settings, so a `Decoder` refuses them).
    Every value is checked (`polar_jax.settings`) before the model loads."""
    run = GenerationSettings(max_new_tokens, temperature, top_k, top_p, seed, batch_size)
    settings.prompts(prompts)
    load_settings = {"dtype": dtype, "routers": routers, "attn_topk": attn_topk,
                     "dense_layers": dense_layers, "router_weights": router_weights,
                     "page_topk": page_topk, "page_budget": page_budget,
                     "page_min_context": page_min_context, "page_size": page_size}
    if isinstance(model, Decoder):
        settings.refuse_unused(load_settings, "when model is a path (a Decoder is loaded already)")
        decoder = model
    elif isinstance(model, (str, os.PathLike)):
        decoder = Decoder.load(model, mesh=None, **load_settings)
    else:
        raise PolarJaxError(f"model must be a directory path (a str or os.PathLike) or a "
                            f"polar_jax.decode.Decoder, got {validate.describe(model)}")
    return decoder.generate(prompts, run.max_new_tokens,
                            SamplingParams(run.temperature, run.top_k, run.top_p), run.seed,
                            run.batch_size, progress)
