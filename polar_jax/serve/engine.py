"""Continuous batching over a paged KV cache, with Polar Sparsity on by default when the
decoder has routers. Usable from Python without HTTP:

    engine = Engine(Decoder.load(path, routers=...), max_slots=64)
    engine.start()                                  # compiles every program, then serves
    stream = engine.submit(Request(prompt=ids, max_tokens=64))
    async for event in stream: ...                  # `Token`s, then one `Done`

The cache is one pool of pages per layer (`models.kv_cache.PagedKVCache`, `page_size` tokens
a page), sized at start by a memory plan (`kv_pages.plan_pages`: the device's free memory
after the weights and the programs' buffers, or `kv_pages`); a sequence holds only the pages
its tokens fill, listed in its row of the block table. One background thread runs the
schedule: each iteration admits waiting requests, first come first served, into free slots
while the pool has the pages of their prompts (and one more); prefills up to `prefill_rows`
prompt chunks of `prefill_chunk` tokens straight into their pages (a long prompt over several
iterations, so the running sequences' decode stalls for one chunk at most); gives every
running sequence whose next token starts a page a new one, preempting the newest request when
none is free (its pages freed, its prompt and tokens so far recomputed when it is admitted
again: no token changes); then runs one decode step over all slots, inactive ones masked.
Every shape is fixed (the slots, the pool, the chunk), so nothing compiles after `start`:
one prefill program (two: with the prompt's log-probabilities for `echo`) and one decode
program per distinct MLP k of the routers' calibration for the number of active slots
(`SparsityPlan.build`). A decoder over a mesh of `--tp` devices (one process) serves split
over them (the pool by KV group). Sampling settings and seeds are per slot traced arrays; a
slot and its pages are freed the moment its request ends (EOS, `max_tokens`, the context) or
its consumer cancels.
"""

from __future__ import annotations

import asyncio
import collections
import collections.abc
import dataclasses
import functools
import logging
import numbers
import threading
import time
from typing import Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.kv_cache import PagedKVCache
from models.ops import ChunkOps
from models.sharding import dp_size, kv_cache_shardings, tp_size
from pallas_kernels.selection import CALIBRATION_BATCH_SIZES
from polar_jax import settings, validate
from polar_jax.decode import Decoder
from polar_jax.errors import PolarJaxError
from polar_jax.memory import GiB, available_bytes
from polar_jax.sampling import SamplingParams, sample_rows
from polar_jax.serve.kv_pages import (
    DEFAULT_GPU_MEMORY_FRACTION, DEFAULT_PAGE_SIZE, MemoryPlan, PagePool, pages_for, plan_pages,
)
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
    """One completion: prompt token ids, at most `max_tokens` new ones (OpenAI's default 16),
    sampling settings (temperature 0: greedy), `logprobs` alternatives per new token (0 to
    `TOP_LOGPROBS`), `echo`: also the prompt's log-probabilities."""

    prompt: tuple[int, ...]
    max_tokens: int = 16
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
    def step(self, seconds: float, running: int, waiting: int, pages_used: int) -> None: ...
    def preempted(self) -> None: ...
    def pool(self, pages: int) -> None: ...


@dataclasses.dataclass
class ProgramStats:
    """Totals over one program's calls since `start` (warm-up excluded): calls, rows summed
    over them (decode: active slots; prefill: prompt tokens), and seconds in the program
    (inputs to results on the host)."""

    steps: int = 0
    rows: int = 0
    seconds: float = 0.0


class _NoObserver:
    def admitted(self, prompt_tokens): pass
    def first_token(self, seconds): pass
    def finished(self, completion_tokens, seconds_per_token): pass
    def step(self, seconds, running, waiting, pages_used): pass
    def preempted(self): pass
    def pool(self, pages): pass


@dataclasses.dataclass(eq=False)
class _Live:
    """A request's progress: its slot and pages, the tokens of its prefill (the prompt; after a
    preemption, the prompt and every generated token but the last) and how many are in the
    cache, the tokens generated."""

    request: Request
    stream: "Stream"
    submitted: float
    slot: int = -1
    pages: list = dataclasses.field(default_factory=list)
    prefill_ids: tuple[int, ...] = ()
    prefilled: int = 0
    generated: list = dataclasses.field(default_factory=list)
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
                 page_size: int = DEFAULT_PAGE_SIZE, kv_pages: int | None = None,
                 gpu_memory_fraction: float = DEFAULT_GPU_MEMORY_FRACTION,
                 observer: Observer | None = None):
        """`max_slots`: sequences decoded together at most; `max_len`: a sequence's positions
        (default the model's); `page_size`: tokens a KV page; `kv_pages`: the pool's pages
        (default: as many as fit, `gpu_memory_fraction` of the free memory on a CPU; on a GPU
        the allocator's limit, which `polar-jax serve` sets from the same fraction)."""
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
        self.page_size = validate.integer("--page-size", page_size, low=1, high=max_len)
        if kv_pages is not None:
            kv_pages = validate.integer("--kv-pages", kv_pages, low=1)
        fraction = validate.number("--gpu-memory-fraction", gpu_memory_fraction, low=0.0,
                                   high=1.0, low_open=True)
        self.observer = observer or _NoObserver()
        self.decode_stats, self.prefill_stats = ProgramStats(), ProgramStats()
        self.eos_ids = set(int(t) for t in decoder.eos_ids if t >= 0)
        self.pages_per_seq = pages_for(max_len, self.page_size)
        self.memory = self._plan_memory(kv_pages, fraction)
        self.pool = PagePool(self.memory.num_pages)
        abstract = PagedKVCache.abstract(config, self.memory.num_pages, self.page_size,
                                         self.max_slots, self.pages_per_seq, decoder.dtype)
        # Placed as every program's output pool is (an uncommitted first pool would make
        # warm-up compile a variant that serving never calls): on the weights' device, or by KV
        # group over the model's devices (`models.sharding`).
        placement = (jax.tree.leaves(decoder.state)[0].sharding if decoder.mesh is None
                     else kv_cache_shardings(abstract, decoder.mesh).pages)
        # The pool's arrays: per layer (k, v) `[kv_heads, pages, page_size, head_dim]`.
        self.pages = jax.jit(lambda: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                                                   abstract.pages), out_shardings=placement)()
        # Per slot, on the host: the decode step's inputs. Block-table entries past a
        # sequence's pages hold the pool size: writes there are dropped, reads never reach them.
        self._block_table = np.full((self.max_slots, self.pages_per_seq), self.memory.num_pages,
                                    np.int32)
        self._tokens = np.zeros(self.max_slots, np.int32)
        self._positions = np.zeros(self.max_slots, np.int32)
        self._active = np.zeros(self.max_slots, bool)
        self._temperature = np.zeros(self.max_slots, np.float32)
        self._top_k = np.zeros(self.max_slots, np.int32)
        self._top_p = np.ones(self.max_slots, np.float32)
        self._seeds = np.zeros(self.max_slots, np.uint32)
        self._slots: list[_Live | None] = [None] * self.max_slots
        self._running: list[_Live] = []  # in admission order: the last is preempted first
        self._waiting: collections.deque[_Live] = collections.deque()
        self._wake = threading.Condition()
        self._accepting = False
        self._stopping = False
        self.failure: str | None = None  # why the engine's thread stopped, if it failed
        self.preemptions = 0
        self._thread: threading.Thread | None = None
        # The plan per number of active slots: the calibration size at or above it.
        self._plans = {}
        if decoder.sparse:
            for size in CALIBRATION_BATCH_SIZES:
                self._plans[size] = decoder.plan_for_batch(size)
                if size >= self.max_slots:
                    break
        # The programs: jitted once, each compiled at `start` for its static arguments.
        self.prefill_program = jax.jit(self._prefill_program, static_argnames=("echo",),
                                       donate_argnames=("pages",))
        self._decode = jax.jit(self._decode_program, static_argnames=("plan",),
                               donate_argnames=("pages",))
        self.observer.pool(self.memory.num_pages)

    def _transient_bytes(self) -> int:
        """An upper estimate of the largest program's buffers besides the weights and the pool,
        per device: prefill's activations over `prefill_rows` x `prefill_chunk` tokens (float32
        projections and MLP, a layer's keys and values gathered per row, the attention mask and
        its bias, the logits, all positions' with `echo`), or the decode step's over the slots
        (the XLA attention's gathered cache where no kernel runs)."""
        c, tp = self.config, tp_size(self.decoder.mesh)
        item = jnp.dtype(self.decoder.dtype).itemsize
        span = self.pages_per_seq * self.page_size
        width = 4 * (8 * c.hidden_size + (3 * c.mlp_dim + (c.num_heads + 2 * c.num_kv_heads)
                                          * c.head_dim) // tp)
        rows, tokens = self.prefill_rows, self.prefill_rows * self.prefill_chunk
        gathered = 2 * c.num_kv_heads // tp * span * c.head_dim * item
        prefill = (tokens * width + 2 * rows * gathered + tokens * span * (1 + 4 * c.num_heads
                                                                            // tp)
                   + 3 * tokens * c.vocab_size * 4)
        decode = self.max_slots * (width + 4 * 4 * c.vocab_size + 2 * gathered)
        return int(1.25 * max(prefill, decode)) + 256 * 2**20

    def _plan_memory(self, kv_pages: int | None, fraction: float) -> MemoryPlan:
        """The pool's pages from what this device has free now (the weights loaded): on a GPU
        the allocator's limit less what is in use, on a CPU `fraction` of the free memory."""
        device = min(jax.tree.leaves(self.decoder.state)[0].devices(), key=lambda d: d.id)
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        if stats and "bytes_limit" in stats:
            budget = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        else:
            budget = int(fraction * (available_bytes(device) or 0))
        page_bytes = PagedKVCache.page_bytes(self.config, self.page_size, self.decoder.dtype)
        return plan_pages(budget=budget, transient=self._transient_bytes(),
                          page_bytes=page_bytes // tp_size(self.decoder.mesh),
                          page_size=self.page_size, max_len=self.max_len,
                          max_pages=self.max_slots * self.pages_per_seq, kv_pages=kv_pages)

    # -- the programs ----------------------------------------------------------------------

    @staticmethod
    def _choose(logits, next_tokens):
        """(log-probability of each row's `next_tokens`, the `TOP_LOGPROBS` best ids and
        their log-probabilities) of float32 logits `[B, V]`."""
        logp = jax.nn.log_softmax(logits, axis=-1)
        chosen = jnp.take_along_axis(logp, next_tokens[:, None], axis=-1)[:, 0]
        top_logp, top_ids = jax.lax.top_k(logp, min(TOP_LOGPROBS, logp.shape[-1]))
        return chosen, top_ids, top_logp

    def _prefill_program(self, state, pages, block_table, tokens, positions, valid, last,
                         next_ids, sampling, seeds, *, echo: bool):
        """A chunk of up to `prefill_rows` prompts written into their pages: tokens,
        positions, valid, next_ids (the following prompt token, -1 where none) `[P, C]`;
        block_table `[P, pages_per_seq]` (the pool size throughout for padding rows, which
        write nothing); last `[P]`: each row's last valid index. Returns the token sampled
        after each row's last one, its log-probabilities, (with `echo`) each position's
        log-probability of its next prompt token and the best alternatives, the pool."""
        model = nnx.merge(self.decoder.graphdef, state)
        cache = PagedKVCache(pages, block_table)
        out = model.forward(tokens, positions, ChunkOps(positions, valid), cache)
        index = jnp.arange(tokens.shape[0])
        logits = model.logits(out.hidden_states[index, last])
        first = sample_rows(logits, sampling, seeds, positions[index, last] + 1,
                            self.decoder.mesh)
        chosen, top_ids, top_logp = self._choose(logits, first)
        prompt_logp = None
        if echo:
            logp = jax.nn.log_softmax(model.logits(out.hidden_states), axis=-1)
            chosen_logp = jnp.take_along_axis(logp, jnp.maximum(next_ids, 0)[..., None], -1)[..., 0]
            top_logp_all, top_ids_all = jax.lax.top_k(logp, min(TOP_LOGPROBS, logp.shape[-1]))
            prompt_logp = chosen_logp, top_ids_all, top_logp_all
        return first, chosen, top_ids, top_logp, prompt_logp, out.kv_cache.pages

    def _decode_program(self, state, router_state, pages, block_table, tokens, positions,
                        active, sampling, seeds, *, plan):
        """One `decode_step` over every slot: the next tokens `[S]`, their log-probabilities
        and alternatives, the pool."""
        model = nnx.merge(self.decoder.graphdef, state)
        sample = lambda logits: sample_rows(logits, sampling, seeds, positions + 1,
                                             self.decoder.mesh)
        cache = PagedKVCache(pages, block_table)
        step = decode_step(model, DecodeState(tokens, positions, active, cache), sample,
                           router_state, plan, self.decoder.mesh)
        chosen, top_ids, top_logp = self._choose(step.logits, step.next_tokens)
        return step.next_tokens, chosen, top_ids, top_logp, step.state.kv_cache.pages

    def _plan(self, active: int):
        """The sparsity plan for `active` slots (None: dense)."""
        if not self._plans:
            return None
        return self._plans[next(b for b in self._plans if b >= max(active, 1))]

    # -- lifecycle ---------------------------------------------------------------------------

    def warm_up(self, progress: Callable[[str], None] | None = None) -> int:
        """Compiles every program the schedule can call (each prefill variant, the decode
        step for each distinct plan) by running it once on empty slots; returns how many.
        `progress` hears of each, e.g. "prefill (1 of 3) in 2.1 s"."""
        largest = {plan: min(size, self.max_slots) for size, plan in self._plans.items()}
        programs = [(f"prefill{' with echo' * echo}", functools.partial(
            self._run_prefill, [], echo=echo)) for echo in (False, True)]
        programs += [("decode step" + (f" (MLP k for up to {largest[plan]} sequences)"
                                       if plan is not None else ""),
                      functools.partial(self._run_decode, plan))
                     for plan in list(largest) or [None]]
        for i, (name, run) in enumerate(programs):
            start = time.perf_counter()
            run()
            if progress is not None:
                progress(f"{name} ({i + 1} of {len(programs)}) in "
                         f"{time.perf_counter() - start:.1f} s")
        return len(programs)

    def start(self, progress: Callable[[str], None] | None = None) -> None:
        """Compiles (`warm_up`, telling `progress`) and starts the scheduling thread."""
        self.warm_up(progress)
        self._accepting = True
        self._thread = threading.Thread(target=self._serve, name="polar-jax-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Stops admitting; every waiting and running request ends with `Done("abort")`; the
        thread exits and the page pool is freed (the engine does not start again)."""
        with self._wake:
            self._accepting = False
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
        self.pages = None

    # -- requests ----------------------------------------------------------------------------

    def check(self, request: Request) -> Request:
        """The request with its values checked against the model and the pool (one-line
        `RequestError`s)."""
        if not isinstance(request, Request):
            raise RequestError(f"submit takes a polar_jax.serve.engine.Request, got "
                               f"{validate.describe(request)}")
        if isinstance(request.prompt, (str, bytes)) or not isinstance(
                request.prompt, (collections.abc.Sequence, np.ndarray)):
            raise RequestError(f"the prompt must be a sequence of token ids (tokenize text "
                               f"first), got {validate.describe(request.prompt)}")
        prompt = tuple(request.prompt)
        if not prompt:
            raise RequestError("the prompt is empty")
        bad = next((i for i, t in enumerate(prompt) if not isinstance(t, numbers.Integral)
                    or isinstance(t, (bool, np.bool_))), None)
        if bad is not None:
            raise RequestError(f"token {bad} of the prompt must be an integer id, got "
                               f"{validate.describe(prompt[bad])}")
        prompt = tuple(map(int, prompt))
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
        """Requests holding a slot (prefilling or decoding)."""
        return len(self._running)

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
                while not (self._stopping or self._waiting or self._running):
                    self._wake.wait()
                if self._stopping:
                    return
                self._reap_cancelled()
                self._admit()
            start = time.perf_counter()
            prefilling = [live for live in self._running
                          if live.prefilled < len(live.prefill_ids)]
            if prefilling:
                self._prefill_step(prefilling[:self.prefill_rows])
            if self._active.any():
                self._grow_pages()
            if self._active.any():
                self._decode_step()
            self.observer.step(time.perf_counter() - start, len(self._running),
                               len(self._waiting), self.pool.used)

    def _reap_cancelled(self) -> None:
        for live in [s for s in self._running if s.cancelled]:
            self._finish(live, "cancelled")
        for live in [w for w in self._waiting if w.cancelled]:
            self._waiting.remove(live)
            self._finish(live, "cancelled")

    def _admit(self) -> None:
        """First come, first served: the head of the queue takes a free slot and the pages of
        its prefill and its next token, while both are there."""
        while self._waiting:
            live = self._waiting[0]
            slot = next((i for i, s in enumerate(self._slots) if s is None), None)
            # A preempted request recomputes its prompt and every token but its last.
            prefill_ids = live.request.prompt + tuple(live.generated[:-1])
            need = pages_for(len(prefill_ids) + 1, self.page_size)
            if slot is None or need > self.pool.free:
                return
            self._waiting.popleft()
            live.slot, live.prefill_ids, live.prefilled = slot, prefill_ids, 0
            live.pages = self.pool.allocate(need)
            self._block_table[slot, :need] = live.pages
            self._slots[slot] = live
            self._running.append(live)
            r = live.request
            self._temperature[slot], self._top_k[slot] = r.temperature, r.top_k
            self._top_p[slot], self._seeds[slot] = r.top_p, r.seed
            if not live.generated:
                self.observer.admitted(len(r.prompt))

    def _grow_pages(self) -> None:
        """Every decoding sequence whose next token starts a page gets one, oldest first; when
        none is free, the newest running request is preempted (`_preempt`) until one is."""
        for live in list(self._running):
            if live.slot < 0 or not self._active[live.slot]:
                continue
            if self._positions[live.slot] < len(live.pages) * self.page_size:
                continue
            while self.pool.free == 0 and live.slot >= 0:
                self._preempt(self._running[-1])
            if live.slot < 0:  # it was the newest itself
                continue
            page = self.pool.allocate(1)[0]
            self._block_table[live.slot, len(live.pages)] = page
            live.pages.append(page)

    def _release(self, live: _Live) -> None:
        """Frees `live`'s slot and pages."""
        if live.slot >= 0 and self._slots[live.slot] is live:
            self._slots[live.slot] = None
            self._active[live.slot] = False
            self._block_table[live.slot] = self.pool.num_pages
            self._running.remove(live)
        self.pool.release(live.pages)
        live.pages, live.slot = [], -1

    def _preempt(self, live: _Live) -> None:
        """Frees `live`'s pages and puts it first in the queue: admitted again, it prefills its
        prompt and tokens so far (the same keys and values) and resumes where it stopped."""
        self._release(live)
        live.prefilled = 0
        if not live.generated:  # its prompt's log-probabilities come again
            live.prompt_logprobs.clear()
            live.prompt_top_logprobs.clear()
        with self._wake:
            self._waiting.appendleft(live)
        self.preemptions += 1
        self.observer.preempted()

    def _sampling(self, index):
        return SamplingParams(self._temperature[index], self._top_k[index], self._top_p[index])

    def _run_prefill(self, rows: list[_Live], echo: bool):
        """One prefill call for the next chunk of each of `rows` (padded to `prefill_rows`)."""
        P, C = self.prefill_rows, self.prefill_chunk
        tokens = np.zeros((P, C), np.int32)
        next_ids = np.full((P, C), -1, np.int32)
        valid = np.zeros((P, C), bool)
        positions = np.tile(np.arange(C, dtype=np.int32), (P, 1))
        block_table = np.full((P, self.pages_per_seq), self.pool.num_pages, np.int32)
        index = np.zeros(P, np.int32)
        last = np.zeros(P, np.int32)
        for i, live in enumerate(rows):
            ids, start = live.prefill_ids, live.prefilled
            chunk = ids[start:start + C]
            tokens[i, :len(chunk)] = chunk
            following = live.request.prompt[start + 1:start + C + 1]
            next_ids[i, :len(following)] = following
            valid[i, :len(chunk)] = True
            positions[i] += start
            block_table[i] = self._block_table[live.slot]
            index[i], last[i] = live.slot, len(chunk) - 1
        out = self.prefill_program(self.decoder.state, self.pages, block_table, tokens, positions,
                            valid, last, next_ids, self._sampling(index), self._seeds[index],
                            echo=echo)
        self.pages = out[-1]
        return jax.device_get(out[:-1]), valid

    def _prefill_step(self, rows: list[_Live]) -> None:
        echo = any(live.request.echo and not live.generated for live in rows)
        start = time.perf_counter()
        (first, chosen, top_ids, top_logp, prompt_logp), valid = self._run_prefill(rows, echo)
        stats = self.prefill_stats
        stats.steps, stats.rows = stats.steps + 1, stats.rows + int(valid.sum())
        stats.seconds += time.perf_counter() - start
        for i, live in enumerate(rows):
            prompt = live.request.prompt
            count = int(valid[i].sum())
            if live.request.echo and not live.generated:
                following = min(count, len(prompt) - 1 - live.prefilled)
                prompt_chosen, prompt_ids, prompt_top = (x[i, :following] for x in prompt_logp)
                live.prompt_logprobs.extend(prompt_chosen.tolist())
                n = live.request.logprobs
                live.prompt_top_logprobs.extend(tuple(zip(ids[:n].tolist(), logps[:n].tolist()))
                                                for ids, logps in zip(prompt_ids, prompt_top))
            live.prefilled += count
            if live.prefilled < len(live.prefill_ids):
                continue
            slot = live.slot
            self._positions[slot] = len(live.prefill_ids)
            self._active[slot] = True
            if live.generated:  # resumed after a preemption: its last token is the next input
                self._tokens[slot] = live.generated[-1]
                continue
            self._tokens[slot] = first[i]
            live.first_token_at = time.perf_counter()
            self.observer.first_token(live.first_token_at - live.submitted)
            self._emit(live, int(first[i]), chosen[i], top_ids[i], top_logp[i])

    def _run_decode(self, plan):
        out = self._decode(self.decoder.state, self.decoder.router_state, self.pages,
                           self._block_table, self._tokens, self._positions, self._active,
                           self._sampling(slice(None)), self._seeds, plan=plan)
        self.pages = out[-1]
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
        live.generated.append(token)
        if token in self.eos_ids:
            self._finish(live, "stop")
        elif (len(live.generated) >= live.request.max_tokens
              or len(live.request.prompt) + len(live.generated) >= self.max_len):
            self._finish(live, "length")

    def _finish(self, live: _Live, reason: str) -> None:
        self._release(live)
        generated = len(live.generated)
        if generated:
            per_token = None
            if generated > 1:
                per_token = (time.perf_counter() - live.first_token_at) / (generated - 1)
            self.observer.finished(generated, per_token)
        prompt_logprobs = prompt_top_logprobs = None
        if live.request.echo:
            prompt_logprobs = (None, *live.prompt_logprobs)
            prompt_top_logprobs = (None, *live.prompt_top_logprobs)
        live.stream._put(Done(reason, prompt_logprobs, prompt_top_logprobs))
