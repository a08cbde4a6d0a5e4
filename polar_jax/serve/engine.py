"""Continuous batching over a fixed pool of KV-cache slots, with Polar Sparsity on by default
when the decoder has routers. Usable from Python without HTTP:

    engine = Engine(Decoder.load(path, routers=...), max_slots=64)
    engine.start()                                  # compiles every program, then serves
    stream = engine.submit(Request(prompt=ids, max_tokens=64))
    async for event in stream: ...                  # `Token`s, then one `Done`

One background thread runs the schedule: each iteration admits waiting requests into free
slots, prefills up to `prefill_rows` prompt chunks of `prefill_chunk` tokens (a long prompt
over several iterations, so the running sequences' decode stalls for one chunk at most), then
runs one decode step over all slots, inactive ones masked. Every shape is fixed (the pool, the
chunk), so nothing compiles after `start`: one prefill program (two: with the prompt's
log-probabilities for `echo`) and one decode program per distinct MLP k of the routers'
calibration for the number of active slots (`SparsityPlan.build`). A decoder over a mesh
of `--tp` devices (one process) serves split over them. Sampling settings and
seeds are per slot traced arrays; a slot is freed the moment its request ends (EOS,
`max_tokens`, the context) or its consumer cancels.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.kv_cache import KVCache
from models.ops import ChunkOps
from models.sharding import dp_size, kv_cache_shardings
from pallas_kernels.selection import CALIBRATION_BATCH_SIZES
from polar_jax import settings, validate
from polar_jax.decode import Decoder, cache_length
from polar_jax.errors import PolarJaxError
from polar_jax.sampling import SamplingParams, sample_rows
from polar_jax.step import DecodeState, decode_step

TOP_LOGPROBS = 5  # alternatives computed per token (the OpenAI completions API's maximum)


class RequestError(PolarJaxError):
    """A request the engine cannot serve as asked (the HTTP server answers 400 or 413)."""

    def __init__(self, message: str, too_long: bool = False):
        super().__init__(message)
        self.too_long = too_long


class EngineBusy(PolarJaxError):
    """The queue is full or the engine is shutting down (the server answers 503)."""


@dataclasses.dataclass(frozen=True)
class Request:
    """One completion: prompt token ids, at most `max_tokens` new ones, sampling settings
    (temperature 0: greedy), `logprobs` alternatives per new token (0 to `TOP_LOGPROBS`),
    `echo`: also the prompt's log-probabilities."""

    prompt: tuple[int, ...]
    max_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    logprobs: int = 0
    echo: bool = False


@dataclasses.dataclass(frozen=True)
class Token:
    """A new token, its log-probability and (if asked) the best alternatives, best first."""

    id: int
    logprob: float
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclasses.dataclass(frozen=True)
class Done:
    """The last event of a stream. reason: "stop" (EOS), "length" (`max_tokens` or the
    context), "cancelled" (by its consumer), "abort" (the engine shut down), "error" (the
    engine failed: `Engine.failure` says how). With `echo`, the prompt's log-probabilities and
    (as `Token.top_logprobs`) its `logprobs` best alternatives per position (None for its
    first token)."""

    reason: str
    prompt_logprobs: tuple[float | None, ...] | None = None
    prompt_top_logprobs: tuple[tuple[tuple[int, float], ...] | None, ...] | None = None


class Observer(Protocol):
    """What the engine reports, for metrics (the server's are Prometheus')."""

    def admitted(self, prompt_tokens: int) -> None: ...
    def first_token(self, seconds: float) -> None: ...
    def finished(self, completion_tokens: int, seconds_per_token: float | None) -> None: ...
    def step(self, seconds: float, active: int, waiting: int) -> None: ...


@dataclasses.dataclass
class DecodeStats:
    """Totals over the decode steps served since `start` (warm-up excluded): steps, active
    slots summed over them, and seconds in the step's program (inputs to results on the host)."""

    steps: int = 0
    rows: int = 0
    seconds: float = 0.0


class _NoObserver:
    def admitted(self, prompt_tokens): pass
    def first_token(self, seconds): pass
    def finished(self, completion_tokens, seconds_per_token): pass
    def step(self, seconds, active, waiting): pass


@dataclasses.dataclass(eq=False)
class _Live:
    """A request's progress: prompt tokens prefilled, tokens generated, its slot."""

    request: Request
    stream: "Stream"
    submitted: float
    slot: int = -1
    prefilled: int = 0
    generated: int = 0
    first_token_at: float = 0.0
    cancelled: bool = False
    prompt_logprobs: list = dataclasses.field(default_factory=list)
    prompt_top_logprobs: list = dataclasses.field(default_factory=list)


class Stream:
    """The events of one request (`Token`s, then a `Done`), as an async iterator on the event
    loop that submitted it. `cancel()` (or closing the iteration early) frees its slot."""

    def __init__(self, engine: "Engine"):
        self._engine = engine
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._live: _Live | None = None
        self._done = False

    def _put(self, event) -> None:  # from the engine's thread
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, event)
        except RuntimeError:  # its event loop has closed: nobody is listening
            pass

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._done:
            raise StopAsyncIteration
        event = await self._queue.get()
        self._done = isinstance(event, Done)
        return event

    def cancel(self) -> None:
        if not self._done and self._live is not None:
            self._engine._cancel(self._live)


class Engine:
    """A `Decoder`'s model served with continuous batching (see the module docstring)."""

    def __init__(self, decoder: Decoder, max_slots: int = 64, max_len: int | None = None,
                 prefill_chunk: int = 256, prefill_rows: int = 4, max_queue: int = 256,
                 observer: Observer | None = None):
        config = decoder.config
        if dp_size(decoder.mesh) > 1 or jax.process_count() > 1:
            raise PolarJaxError("the engine splits the model over devices (--tp) in one process; "
                                "drop --dp and the multi-process options")
        self.decoder, self.config = decoder, config
        self.max_slots = validate.integer("--max-slots", max_slots, low=1,
                                          high=CALIBRATION_BATCH_SIZES[-1])
        # A longrope model's sequences stop before its switch (`ModelConfig.longrope_switch`).
        limit = config.longrope_switch or config.max_position_embeddings
        max_len = validate.integer("--max-len", limit if max_len is None else max_len, low=2,
                                   high=limit)
        self.max_len = max_len  # a sequence's positions, prompt and completion together
        self.prefill_chunk = validate.integer("--prefill-chunk", prefill_chunk, low=1)
        self.prefill_rows = validate.integer("--prefill-rows", prefill_rows, low=1)
        self.max_queue = validate.integer("--max-queue", max_queue, low=1)
        self.observer = observer or _NoObserver()
        self.decode_stats = DecodeStats()
        self.eos_ids = set(int(t) for t in decoder.eos_ids if t >= 0)
        cache_len = cache_length(max_len)
        cache = KVCache.zeros(config, self.max_slots, cache_len, decoder.dtype)
        # Placed as every program's output cache is (an uncommitted first cache would make
        # warm-up compile a variant that serving never calls): on the weights' device, or by KV
        # group over the model's devices (`models.sharding`).
        self._kv_cache = jax.device_put(cache, jax.tree.leaves(decoder.state)[0].sharding
                                        if decoder.mesh is None
                                        else kv_cache_shardings(cache, decoder.mesh))
        # Per slot, on the host: the decode step's inputs.
        self._tokens = np.zeros(self.max_slots, np.int32)
        self._positions = np.zeros(self.max_slots, np.int32)
        self._active = np.zeros(self.max_slots, bool)
        self._temperature = np.zeros(self.max_slots, np.float32)
        self._top_k = np.zeros(self.max_slots, np.int32)
        self._top_p = np.ones(self.max_slots, np.float32)
        self._seeds = np.zeros(self.max_slots, np.uint32)
        self._slots: list[_Live | None] = [None] * self.max_slots
        self._waiting: collections.deque[_Live] = collections.deque()
        self._wake = threading.Condition()
        self._accepting = False
        self._stopping = False
        self.failure: str | None = None  # why the engine's thread stopped, if it failed
        self._thread: threading.Thread | None = None
        # The plan per number of active slots: the calibration size at or above it.
        self._plans = {}
        if decoder.sparse:
            for size in CALIBRATION_BATCH_SIZES:
                self._plans[size] = decoder.plan_for_batch(size)
                if size >= self.max_slots:
                    break
        self._prefill = jax.jit(self._prefill_program, static_argnames=("echo",),
                                donate_argnames=("kv_cache",))
        self._decode = jax.jit(self._decode_program, static_argnames=("plan",),
                               donate_argnames=("kv_cache",))

    # -- the programs ----------------------------------------------------------------------

    @staticmethod
    def _choose(logits, next_tokens):
        """(log-probability of each row's `next_tokens`, the `TOP_LOGPROBS` best ids and
        their log-probabilities) of float32 logits `[B, V]`."""
        logp = jax.nn.log_softmax(logits, axis=-1)
        chosen = jnp.take_along_axis(logp, next_tokens[:, None], axis=-1)[:, 0]
        top_logp, top_ids = jax.lax.top_k(logp, min(TOP_LOGPROBS, logp.shape[-1]))
        return chosen, top_ids, top_logp

    def _prefill_program(self, state, kv_cache, tokens, positions, valid, slot_idx, last,
                         next_ids, sampling, seeds, *, echo: bool):
        """A chunk of up to `prefill_rows` prompts into their slots: tokens, positions, valid,
        next_ids (the following prompt token, -1 where none) `[P, C]`; slot_idx `[P]` (the
        pool size for padding rows, which write nothing); last `[P]`: each row's last valid
        index. Returns the token sampled after each row's last one, its log-probabilities,
        (with `echo`) each position's log-probability of its next prompt token and the best
        alternatives, the cache."""
        model = nnx.merge(self.decoder.graphdef, state)
        rows = jax.tree.map(lambda c: c.at[slot_idx].get(mode="fill", fill_value=0), kv_cache)
        out = model.forward(tokens, positions, ChunkOps(positions, valid), rows)
        kv_cache = jax.tree.map(lambda c, r: c.at[slot_idx].set(r, mode="drop"), kv_cache,
                                out.kv_cache)
        index = jnp.arange(tokens.shape[0])
        logits = model.logits(out.hidden_states[index, last])
        first = sample_rows(logits, sampling, seeds, positions[index, last] + 1)
        chosen, top_ids, top_logp = self._choose(logits, first)
        prompt_logp = None
        if echo:
            logp = jax.nn.log_softmax(model.logits(out.hidden_states), axis=-1)
            chosen_logp = jnp.take_along_axis(logp, jnp.maximum(next_ids, 0)[..., None], -1)[..., 0]
            top_logp_all, top_ids_all = jax.lax.top_k(logp, min(TOP_LOGPROBS, logp.shape[-1]))
            prompt_logp = chosen_logp, top_ids_all, top_logp_all
        return first, chosen, top_ids, top_logp, prompt_logp, kv_cache

    def _decode_program(self, state, router_state, kv_cache, tokens, positions, active,
                        sampling, seeds, *, plan):
        """One `decode_step` over every slot: the next tokens `[S]`, their log-probabilities
        and alternatives, the cache."""
        model = nnx.merge(self.decoder.graphdef, state)
        sample = lambda logits: sample_rows(logits, sampling, seeds, positions + 1)
        step = decode_step(model, DecodeState(tokens, positions, active, kv_cache), sample,
                           router_state, plan, self.decoder.mesh)
        chosen, top_ids, top_logp = self._choose(step.logits, step.next_tokens)
        return step.next_tokens, chosen, top_ids, top_logp, step.state.kv_cache

    def _plan(self, active: int):
        """The sparsity plan for `active` slots (None: dense)."""
        if not self._plans:
            return None
        return self._plans[next(b for b in self._plans if b >= max(active, 1))]

    # -- lifecycle ---------------------------------------------------------------------------

    def warm_up(self) -> int:
        """Compiles every program the schedule can call (each prefill variant, the decode
        step for each distinct plan) by running it once on empty slots; returns how many."""
        plans = list(dict.fromkeys(self._plans.values())) or [None]
        for echo in (False, True):
            self._run_prefill([], echo=echo)
        for plan in plans:
            self._run_decode(plan)
        return 2 + len(plans)

    def start(self) -> None:
        """Compiles (`warm_up`) and starts the scheduling thread."""
        self.warm_up()
        self._accepting = True
        self._thread = threading.Thread(target=self._serve, name="polar-jax-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Stops admitting; every waiting and running request ends with `Done("abort")`; the
        thread exits."""
        with self._wake:
            self._accepting = False
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    # -- requests ----------------------------------------------------------------------------

    def check(self, request: Request) -> Request:
        """The request with its values checked against the model and the pool (one-line
        `RequestError`s)."""
        prompt = tuple(request.prompt)
        if not prompt:
            raise RequestError("the prompt is empty")
        bad = next((t for t in prompt if not 0 <= t < self.config.vocab_size), None)
        if bad is not None:
            raise RequestError(f"token id {bad} is outside the vocabulary [0, {self.config.vocab_size})")
        if len(prompt) >= self.max_len:
            raise RequestError(f"the prompt has {len(prompt)} tokens; this server's context is "
                               f"{self.max_len} positions (prompt and completion together)",
                               too_long=True)
        try:
            validate.integer("max_tokens", request.max_tokens, low=1)
            sampling = SamplingParams(request.temperature, request.top_k, request.top_p).validated()
            settings.check("seed", request.seed)
            validate.integer("logprobs", request.logprobs, low=0, high=TOP_LOGPROBS)
            validate.boolean("echo", request.echo)
        except PolarJaxError as err:
            raise RequestError(str(err)) from None
        return dataclasses.replace(request, prompt=prompt, temperature=float(sampling.temperature),
                                   top_k=int(sampling.top_k), top_p=float(sampling.top_p))

    def submit(self, request: Request) -> Stream:
        """Queues `request` (checked first) and returns its stream; call from a running event
        loop. Raises `RequestError` for a bad request, `EngineBusy` when the queue is full or
        the engine is not serving."""
        request = self.check(request)
        stream = Stream(self)
        with self._wake:
            if self.failure is not None:
                raise EngineBusy(f"the engine failed ({self.failure}); restart the server")
            if not self._accepting:
                raise EngineBusy("the server is not accepting requests (starting or shutting down)")
            if len(self._waiting) >= self.max_queue:
                raise EngineBusy(f"the queue is full ({self.max_queue} waiting); retry later")
            stream._live = _Live(request, stream, time.perf_counter())
            self._waiting.append(stream._live)
            self._wake.notify()
        return stream

    @property
    def active_slots(self) -> int:
        return sum(live is not None for live in self._slots)

    @property
    def queue_length(self) -> int:
        return len(self._waiting)

    def _cancel(self, live: _Live) -> None:
        with self._wake:
            live.cancelled = True
            self._wake.notify()

    # -- the schedule (the engine's thread) --------------------------------------------------

    def _serve(self) -> None:
        reason = "abort"
        try:
            self._schedule()
        except Exception as err:  # a failed program: no request may wait forever
            self.failure = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
            reason = "error"
            logging.getLogger(__name__).exception("the engine's thread failed")
        finally:
            with self._wake:
                self._accepting = False
                for live in list(self._waiting) + [s for s in self._slots if s is not None]:
                    self._finish(live, reason)
                self._waiting.clear()

    def _schedule(self) -> None:
        """The loop of the engine's thread, until `shutdown`."""
        while True:
            with self._wake:
                while not (self._stopping or self._waiting or any(self._slots)):
                    self._wake.wait()
                if self._stopping:
                    return
                self._reap_cancelled()
                self._admit()
            start = time.perf_counter()
            prefilling = [live for live in self._slots
                          if live is not None and live.prefilled < len(live.request.prompt)]
            if prefilling:
                self._prefill_step(prefilling[:self.prefill_rows])
            if self._active.any():
                self._decode_step()
            self.observer.step(time.perf_counter() - start, self.active_slots, len(self._waiting))

    def _reap_cancelled(self) -> None:
        for live in [s for s in self._slots if s is not None and s.cancelled]:
            self._finish(live, "cancelled")
        for live in [w for w in self._waiting if w.cancelled]:
            self._waiting.remove(live)
            self._finish(live, "cancelled")

    def _admit(self) -> None:
        for slot in range(self.max_slots):
            if not self._waiting:
                return
            if self._slots[slot] is None:
                live = self._waiting.popleft()
                live.slot = slot
                self._slots[slot] = live
                r = live.request
                self._temperature[slot], self._top_k[slot] = r.temperature, r.top_k
                self._top_p[slot], self._seeds[slot] = r.top_p, r.seed
                self.observer.admitted(len(r.prompt))

    def _sampling(self, index):
        return SamplingParams(self._temperature[index], self._top_k[index], self._top_p[index])

    def _run_prefill(self, rows: list[_Live], echo: bool):
        """One prefill call for the next chunk of each of `rows` (padded to `prefill_rows`)."""
        P, C = self.prefill_rows, self.prefill_chunk
        tokens = np.zeros((P, C), np.int32)
        next_ids = np.full((P, C), -1, np.int32)
        valid = np.zeros((P, C), bool)
        positions = np.tile(np.arange(C, dtype=np.int32), (P, 1))
        slot_idx = np.full(P, self.max_slots, np.int32)
        last = np.zeros(P, np.int32)
        for i, live in enumerate(rows):
            prompt, start = live.request.prompt, live.prefilled
            chunk = prompt[start:start + C]
            tokens[i, :len(chunk)] = chunk
            following = prompt[start + 1:start + C + 1]
            next_ids[i, :len(following)] = following
            valid[i, :len(chunk)] = True
            positions[i] += start
            slot_idx[i], last[i] = live.slot, len(chunk) - 1
        index = np.minimum(slot_idx, self.max_slots - 1)
        out = self._prefill(self.decoder.state, self._kv_cache, tokens, positions, valid,
                            slot_idx, last, next_ids, self._sampling(index), self._seeds[index],
                            echo=echo)
        self._kv_cache = out[-1]
        return jax.device_get(out[:-1]), valid

    def _prefill_step(self, rows: list[_Live]) -> None:
        echo = any(live.request.echo for live in rows)
        (first, chosen, top_ids, top_logp, prompt_logp), valid = self._run_prefill(rows, echo)
        for i, live in enumerate(rows):
            prompt = live.request.prompt
            count = int(valid[i].sum())
            if live.request.echo:
                following = min(count, len(prompt) - 1 - live.prefilled)
                prompt_chosen, prompt_ids, prompt_top = (x[i, :following] for x in prompt_logp)
                live.prompt_logprobs.extend(prompt_chosen.tolist())
                n = live.request.logprobs
                live.prompt_top_logprobs.extend(tuple(zip(ids[:n].tolist(), logps[:n].tolist()))
                                                for ids, logps in zip(prompt_ids, prompt_top))
            live.prefilled += count
            if live.prefilled < len(prompt):
                continue
            slot = live.slot
            self._tokens[slot], self._positions[slot] = first[i], len(prompt)
            self._active[slot] = True
            live.first_token_at = time.perf_counter()
            self.observer.first_token(live.first_token_at - live.submitted)
            self._emit(live, int(first[i]), chosen[i], top_ids[i], top_logp[i])

    def _run_decode(self, plan):
        out = self._decode(self.decoder.state, self.decoder.router_state, self._kv_cache,
                           self._tokens, self._positions, self._active, self._sampling(slice(None)),
                           self._seeds, plan=plan)
        self._kv_cache = out[-1]
        return jax.device_get(out[:-1])

    def _decode_step(self) -> None:
        running = np.flatnonzero(self._active)
        start = time.perf_counter()
        next_tokens, chosen, top_ids, top_logp = self._run_decode(self._plan(len(running)))
        stats = self.decode_stats
        stats.steps, stats.rows = stats.steps + 1, stats.rows + len(running)
        stats.seconds += time.perf_counter() - start
        for slot in running:
            live = self._slots[slot]
            self._tokens[slot] = next_tokens[slot]
            self._positions[slot] += 1
            self._emit(live, int(next_tokens[slot]), chosen[slot], top_ids[slot], top_logp[slot])

    def _emit(self, live: _Live, token: int, logprob, top_ids, top_logp) -> None:
        """Sends a new token; ends the request at EOS, `max_tokens` or the context."""
        top = tuple(zip(top_ids[:live.request.logprobs].tolist(),
                        top_logp[:live.request.logprobs].tolist()))
        live.stream._put(Token(token, float(logprob), top))
        live.generated += 1
        if token in self.eos_ids:
            self._finish(live, "stop")
        elif (live.generated >= live.request.max_tokens
              or len(live.request.prompt) + live.generated >= self.max_len):
            self._finish(live, "length")

    def _finish(self, live: _Live, reason: str) -> None:
        if live.slot >= 0 and self._slots[live.slot] is live:
            self._slots[live.slot] = None
            self._active[live.slot] = False
        if live.generated:
            per_token = None
            if live.generated > 1:
                per_token = (time.perf_counter() - live.first_token_at) / (live.generated - 1)
            self.observer.finished(live.generated, per_token)
        prompt_logprobs = prompt_top_logprobs = None
        if live.request.echo:
            prompt_logprobs = (None, *live.prompt_logprobs)
            prompt_top_logprobs = (None, *live.prompt_top_logprobs)
        live.stream._put(Done(reason, prompt_logprobs, prompt_top_logprobs))
