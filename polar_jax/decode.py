"""The batched decoder: ragged prefill, per-sequence KV cache writes, sampling and stopping,
all inside one jitted program per shape bucket.

The KV cache is `[batch, kv_heads, max_len, head_dim]` per layer (head-major, the layout the
decode kernels read). Prompts are right-padded, so a sequence's token i sits at cache slot i
and its next token is written at slot `lengths[b]`. Shapes are bucketed (batch to a power of
two, lengths to a few sizes) so a new batch of a similar size reuses a compiled program;
sampling settings, the seed and the number of new tokens are traced values.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import ModelConfig
from models.layers import DenseOps, cached_attention, full_attention, init_kv_cache
from polar_jax.errors import PolarJaxError
from polar_jax.sampling import SamplingParams, next_token
from polar_jax.sparsity import SparseDecodeOps, SparsityPlan
from routers.model import Routers, load_routers

PAD_ID = -1  # in output buffers, after a sequence has finished


@dataclasses.dataclass(frozen=True)
class DecodeShape:
    """The static shape of one compiled generate program."""

    batch: int
    prompt_len: int
    max_new: int
    cache_len: int


def _pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, n - 1).bit_length())


def bucket_shape(batch: int, prompt_len: int, max_new: int) -> DecodeShape:
    """Batch to a power of two; prompt length to a power of two (>= 16) up to 512, then to a
    multiple of 512; new tokens to a power of two (>= 16); cache length to a multiple of 128."""
    prompt_bucket = _pow2(prompt_len, 16) if prompt_len <= 512 else -(-prompt_len // 512) * 512
    new_bucket = _pow2(max_new, 16)
    cache_len = -(-(prompt_bucket + new_bucket) // 128) * 128
    return DecodeShape(_pow2(batch), prompt_bucket, new_bucket, cache_len)


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


def _available_bytes(device) -> int | None:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


class Decoder:
    """A model split once into graph and state, with compiled generate programs per bucket."""

    def __init__(self, config: ModelConfig, model, tokenizer=None, eos_ids: Sequence[int] = (),
                 routers: Routers | None = None,
                 plan_for_batch: Callable[[int], SparsityPlan] | None = None):
        """With `routers`, decoding is sparse: `plan_for_batch(batch_bucket)` gives each layer's
        groups kept per sequence and MLP neurons kept for the batch. Prefill stays dense."""
        if (routers is None) != (plan_for_batch is None):
            raise ValueError("sparse decoding needs both routers and plan_for_batch")
        self.config = config
        self.tokenizer = tokenizer
        self.eos_ids = np.asarray(sorted(set(eos_ids)) or [PAD_ID], np.int32)
        self.graphdef, self.state = nnx.split(model)
        self.dtype = jax.tree.leaves(self.state)[0].dtype
        self.plan_for_batch = plan_for_batch
        self.router_state = None if routers is None else routers.unstack(self.dtype)
        self._compiled: dict[DecodeShape, jax.stages.Compiled] = {}
        self._kv_cache: dict[DecodeShape, list] = {}
        self._jitted = jax.jit(self._generate, static_argnames=("shape",),
                               donate_argnames=("kv_cache",))

    @classmethod
    def load(cls, path: str, dtype=None, routers: str | None = None, attn_topk: float = 0.5,
             dense_layers: Sequence[int] = (0,)) -> "Decoder":
        """The model at `path` (converted or Hugging Face), with the routers directory
        `routers` for sparse decoding."""
        from polar_jax.loading import load_eos_ids, load_model, load_tokenizer

        config, model = load_model(path, dtype)
        router_module = plan_for_batch = None
        if routers is not None:
            router_module, metadata = load_routers(routers, config)
            build = functools.partial(SparsityPlan.build, config, metadata, attn_topk,
                                      tuple(dense_layers))
            build(1)  # reject bad settings now, not at the first trace
            plan_for_batch = lambda batch: build(mlp_batch_size=batch)
        return cls(config, model, load_tokenizer(path), load_eos_ids(path), router_module,
                   plan_for_batch)

    @property
    def sparse(self) -> bool:
        return self.router_state is not None

    # -- the jitted program ------------------------------------------------------------------

    def _generate(self, state, router_state, kv_cache, prompt_tokens, prompt_lengths, active,
                  max_new, eos_ids, sampling: SamplingParams, key, *, shape: DecodeShape):
        """Prefill, then decode until every active row hit EOS or `max_new` tokens.

        Returns generated ids `[B, shape.max_new]` (PAD_ID after the end), their counts `[B]`
        and the cache.
        """
        model = nnx.merge(self.graphdef, state)
        plan = self.plan_for_batch(shape.batch) if router_state is not None else None
        batch, prompt_len = prompt_tokens.shape
        rows = jnp.arange(batch)
        slots = jnp.broadcast_to(jnp.arange(prompt_len), (batch, prompt_len))
        ops = DenseOps(functools.partial(full_attention, key_valid=slots < prompt_lengths[:, None]))
        x, kv_cache = model.hidden(prompt_tokens, slots, ops, kv_cache)
        logits = model.logits(x[rows, jnp.maximum(prompt_lengths - 1, 0)])
        token = next_token(logits, sampling, jax.random.fold_in(key, 0))

        finished = ~active
        out = jnp.full((batch, shape.max_new), PAD_ID, jnp.int32)
        out = out.at[:, 0].set(jnp.where(finished, PAD_ID, token))
        count = (~finished).astype(jnp.int32)
        finished = finished | jnp.isin(token, eos_ids)

        def cond(carry):
            step, _, _, finished, *_ = carry
            return (step < max_new) & ~jnp.all(finished)

        def body(carry):
            step, token, lengths, finished, out, count, kv_cache = carry
            if router_state is None:
                ops = DenseOps(functools.partial(cached_attention, positions=lengths))
            else:
                ops = SparseDecodeOps(router_state, plan, lengths, ~finished)
            x, kv_cache = model.hidden(token[:, None], lengths[:, None], ops, kv_cache)
            new = next_token(model.logits(x[:, 0]), sampling, jax.random.fold_in(key, step))
            out = out.at[:, step].set(jnp.where(finished, PAD_ID, new))
            count = count + ~finished
            lengths = lengths + ~finished
            token = jnp.where(finished, token, new)
            finished = finished | jnp.isin(new, eos_ids)
            return step + 1, token, lengths, finished, out, count, kv_cache

        carry = (jnp.int32(1), token, prompt_lengths, finished, out, count, kv_cache)
        _, _, _, _, out, count, kv_cache = jax.lax.while_loop(cond, body, carry)
        return out, count, kv_cache

    # -- host side ---------------------------------------------------------------------------

    def _check_memory(self, shape: DecodeShape) -> None:
        c = self.config
        itemsize = jnp.dtype(self.dtype).itemsize
        kv_bytes = 2 * c.num_layers * shape.batch * c.num_kv_heads * shape.cache_len * c.head_dim * itemsize
        prefill_bytes = shape.batch * c.num_heads * shape.prompt_len**2 * 4  # attention scores
        needed = kv_bytes + prefill_bytes
        device = jax.tree.leaves(self.state)[0].devices().pop()
        available = _available_bytes(device)
        if available is not None and needed > available:
            raise PolarJaxError(
                f"batch size {shape.batch} with prompts up to {shape.prompt_len} tokens and a "
                f"cache of {shape.cache_len} positions needs {needed / 2**30:.2f} GiB "
                f"(KV cache {kv_bytes / 2**30:.2f} GiB, prefill {prefill_bytes / 2**30:.2f} GiB) "
                f"but {device.platform} has {available / 2**30:.2f} GiB free; lower --batch-size "
                f"or --max-new-tokens"
            )

    def _program(self, shape: DecodeShape, args) -> jax.stages.Compiled:
        if shape not in self._compiled:
            self._check_memory(shape)
            self._kv_cache[shape] = init_kv_cache(self.config, shape.batch, shape.cache_len, self.dtype)
            self._compiled[shape] = self._jitted.lower(
                self.state, self.router_state, self._kv_cache[shape], *args, shape=shape).compile()
        return self._compiled[shape]

    def check_lengths(self, prompt_lengths: Sequence[int], max_new_tokens: int) -> None:
        limit = self.config.max_position_embeddings
        for i, n in enumerate(prompt_lengths):
            if n == 0:
                raise PolarJaxError(f"prompt {i} is empty")
            if n > limit:
                raise PolarJaxError(
                    f"prompt {i} has {n} tokens; the model's maximum is {limit} positions")
            if self.config.model_type == "opt" and n + max_new_tokens > limit:
                raise PolarJaxError(
                    f"prompt {i} ({n} tokens) plus {max_new_tokens} new tokens exceeds OPT's "
                    f"{limit} learned positions; lower --max-new-tokens")

    def generate_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                     sampling: SamplingParams = SamplingParams(), seed: int = 0
                     ) -> tuple[list[list[int]], float, float]:
        """Generated ids per prompt (one batch), seconds running, seconds compiling."""
        if max_new_tokens < 1:
            raise PolarJaxError(f"max new tokens must be at least 1, got {max_new_tokens}")
        lengths = [len(p) for p in prompts]
        self.check_lengths(lengths, max_new_tokens)
        shape = bucket_shape(len(prompts), max(lengths), max_new_tokens)
        tokens = np.zeros((shape.batch, shape.prompt_len), np.int32)
        for row, prompt in enumerate(prompts):
            tokens[row, :len(prompt)] = prompt
        prompt_lengths = np.ones(shape.batch, np.int32)
        prompt_lengths[:len(prompts)] = lengths
        active = np.arange(shape.batch) < len(prompts)
        args = (tokens, prompt_lengths, active, np.int32(max_new_tokens), self.eos_ids,
                sampling.validated(), jax.random.key(seed))
        start = time.perf_counter()
        program = self._program(shape, args)
        compile_seconds = time.perf_counter() - start
        start = time.perf_counter()
        out, count, self._kv_cache[shape] = program(self.state, self.router_state,
                                                    self._kv_cache[shape], *args)
        out, count = np.asarray(out), np.asarray(count)
        seconds = time.perf_counter() - start
        return [out[i, :count[i]].tolist() for i in range(len(prompts))], seconds, compile_seconds

    def generate(self, prompts: Sequence[str | Sequence[int]], max_new_tokens: int = 32,
                 sampling: SamplingParams = SamplingParams(), seed: int = 0,
                 batch_size: int | None = None) -> GenerationOutput:
        """Completions for `prompts` (strings, tokenized with the model's tokenizer, or ids),
        in input order, decoded `batch_size` at a time (default: all at once)."""
        if not prompts:
            raise PolarJaxError("no prompts given")
        texts = [p if isinstance(p, str) else None for p in prompts]
        if any(t is not None for t in texts) and self.tokenizer is None:
            raise PolarJaxError("text prompts need a tokenizer; pass token ids instead")
        ids = [self.tokenizer(p)["input_ids"] if isinstance(p, str) else list(p) for p in prompts]
        batch_size = batch_size or len(ids)
        completions, seconds, compile_seconds, new_tokens = [], 0.0, 0.0, 0
        for start in range(0, len(ids), batch_size):
            chunk = ids[start:start + batch_size]
            out, run_s, compile_s = self.generate_ids(chunk, max_new_tokens, sampling, seed + start)
            seconds, compile_seconds = seconds + run_s, compile_seconds + compile_s
            for offset, tokens in enumerate(out):
                new_tokens += len(tokens)
                text = None
                if self.tokenizer is not None:
                    text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                completions.append(Completion(texts[start + offset], chunk[offset], tokens, text))
        return GenerationOutput(completions, min(batch_size, len(ids)), new_tokens, seconds,
                                compile_seconds)


def generate(model: str | Decoder, prompts: Sequence[str | Sequence[int]], *,
             max_new_tokens: int = 32, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, batch_size: int | None = None,
             dtype=None, routers: str | None = None, attn_topk: float = 0.5) -> GenerationOutput:
    """Generates completions for `prompts` with the model at `model` (a converted or Hugging
    Face directory) or an existing `Decoder`. Greedy unless `temperature > 0`; sparse with a
    `routers` directory."""
    decoder = (model if isinstance(model, Decoder)
               else Decoder.load(model, dtype, routers=routers, attn_topk=attn_topk))
    return decoder.generate(prompts, max_new_tokens, SamplingParams(temperature, top_k, top_p),
                            seed, batch_size)
