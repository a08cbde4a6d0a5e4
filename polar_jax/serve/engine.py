"""Continuous batching over a paged KV cache, with Polar Sparsity on by default when the
decoder has routers. Usable from Python without HTTP:

    engine = Engine(Decoder.load(path, routers=...), max_slots=64)
    engine.start()                                  # compiles every program, then serves
    stream = engine.submit(Request(prompt=ids, max_tokens=64))
    async for event in stream: ...                  # `Token`s, then one `Done`

Three parts, each in its module: the `Scheduler` (`scheduler.py`, pure Python) decides each
iteration's admissions, pages, prefill chunks and decode batch; the `Runner` (`runner.py`)
holds the page pool and the per-slot state on the device and dispatches the compiled
programs; the `Engine` here runs them on one background thread and streams the tokens.

The thread overlaps the host with the device: it dispatches iteration k (slot edits, prefill
chunks, one decode step), and only then reads iteration k-1's tokens, streams them and ends
the requests that stopped, while the device computes. The device stops a sequence at EOS,
`max_tokens` and the context by itself; the host, one iteration behind, frees its slot and
pages (the one token computed past an EOS is dropped: no visible token changes). A slot's
sampling settings and seed are traced values of its device row: a request's tokens depend on
it alone, never on its batch, and nothing compiles after `start`.
"""

from __future__ import annotations

import collections
import collections.abc
import dataclasses
import logging
import threading
import time
from collections.abc import Callable

import jax

from models.sharding import dp_size
from pallas_kernels.selection import CALIBRATION_BATCH_SIZES
from polar_jax import validate
from polar_jax.decode import Decoder
from polar_jax.errors import PolarJaxError
from polar_jax.serve.kv_pages import DEFAULT_GPU_MEMORY_FRACTION, DEFAULT_PAGE_SIZE, PagePool
from polar_jax.serve.request import (  # noqa: F401  (Request, Token, Done, errors: the API)
    TOP_LOGPROBS, Done, EngineBusy, IterationCounts, NoObserver, Observer, ProgramStats,
    Request, RequestError, Stream, Token, check_request,
)
from polar_jax.serve.runner import Runner, pow2_sizes, unpack_sampled
from polar_jax.serve.scheduler import Iteration, PrefillChunk, Scheduler, Sequence


@dataclasses.dataclass(eq=False)
class _Live:
    """What the engine keeps of a request beside its `Sequence`: its stream, when it was
    submitted and gave its first token, whether its consumer cancelled it, and (with `echo`)
    its prompt's log-probabilities so far."""

    request: Request
    stream: "Stream"
    submitted: float
    first_token_at: float = 0.0
    cancelled: bool = False
    prompt_logprobs: list = dataclasses.field(default_factory=list)
    prompt_top_logprobs: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Dispatched:
    """An iteration on the device, its outputs not read yet: the prefill chunks (each with
    its sequence's admission count then, and whether it samples the sequence's first token),
    the decode step's sequences by slot, and where its time is counted (None: edits alone)."""

    prefill: list[tuple[PrefillChunk, int, bool]]
    prefill_out: tuple | None
    decode: dict[int, Sequence]
    decode_out: tuple | None
    stats: ProgramStats | None
    counts: IterationCounts


def _deliver(events) -> None:
    for queue, event in events:
        queue.put_nowait(event)


class Engine:
    """A `Decoder`'s model served with continuous batching (see the module docstring)."""

    def __init__(self, decoder: Decoder, max_slots: int = 64, max_len: int | None = None,
                 prefill_chunk: int = 256, prefill_rows: int = 4, max_queue: int = 256,
                 page_size: int = DEFAULT_PAGE_SIZE, kv_pages: int | None = None,
                 gpu_memory_fraction: float = DEFAULT_GPU_MEMORY_FRACTION,
                 max_batched_tokens: int | None = None, prefix_cache: bool = True,
                 batch_buckets: collections.abc.Sequence[int] | None = None,
                 decode_variants: bool | None = None, observer: Observer | None = None):
        """`max_slots`: sequences decoded together at most; `max_len`: a sequence's positions
        (default the model's); `prefill_rows` chunks of `prefill_chunk` tokens prefilled per
        iteration at most, and `max_batched_tokens` tokens with the decoding sequences (default:
        both in full); `page_size`: tokens a KV page; `kv_pages`: the pool's pages (default: as
        many as fit, `gpu_memory_fraction` of the free memory on a CPU; on a GPU the
        allocator's limit, which `polar-jax serve` sets from the same fraction);
        `prefix_cache`: reuse the cached pages of a prompt's prefix; `batch_buckets`: the
        decode step's batch sizes (default 1, 2, 4, ... up to `max_slots`);
        `decode_variants`: `Runner`'s (default: on a GPU)."""
        config = decoder.config
        if dp_size(decoder.mesh) > 1 or jax.process_count() > 1:
            raise PolarJaxError("the engine splits the model over devices (--tp) in one process; "
                                "drop --dp and the multi-process options")
        self.decoder, self.config = decoder, config
        self.max_slots = validate.integer("--max-slots", max_slots, low=1,
                                          high=CALIBRATION_BATCH_SIZES[-1])
        # A longrope model's sequences stop before its switch (`ModelConfig.longrope_switch`).
        limit = config.longrope_switch or config.max_position_embeddings
        self.max_len = validate.integer("--max-len", limit if max_len is None else max_len,
                                        low=2, high=limit)
        prefill_chunk = validate.integer("--prefill-chunk", prefill_chunk, low=1)
        prefill_rows = validate.integer("--prefill-rows", prefill_rows, low=1)
        self.max_queue = validate.integer("--max-queue", max_queue, low=1)
        page_size = validate.integer("--page-size", page_size, low=1, high=self.max_len)
        if kv_pages is not None:
            kv_pages = validate.integer("--kv-pages", kv_pages, low=1)
        fraction = validate.number("--gpu-memory-fraction", gpu_memory_fraction, low=0.0,
                                   high=1.0, low_open=True)
        if max_batched_tokens is None:
            max_batched_tokens = prefill_rows * prefill_chunk + self.max_slots
        max_batched_tokens = validate.integer("--max-batched-tokens", max_batched_tokens,
                                              low=self.max_slots + 1)
        validate.boolean("prefix_cache", prefix_cache)
        buckets = pow2_sizes(self.max_slots)
        if batch_buckets is not None:
            buckets = tuple(sorted({validate.integer("--batch-buckets", b, low=1,
                                                     high=self.max_slots)
                                    for b in batch_buckets} | {self.max_slots}))
        self.observer = observer or NoObserver()
        self.decode_stats, self.prefill_stats = ProgramStats(), ProgramStats()
        self.eos_ids = frozenset(int(t) for t in decoder.eos_ids if t >= 0)
        self.runner = Runner(decoder, max_slots=self.max_slots, max_len=self.max_len,
                             page_size=page_size, prefill_rows=prefill_rows,
                             prefill_chunk=prefill_chunk, buckets=buckets,
                             eos_ids=tuple(sorted(self.eos_ids)),
                             decode_variants=validate.boolean("decode_variants", decode_variants)
                             if decode_variants is not None else None)
        self.memory = self.runner.plan_memory(kv_pages, fraction)
        self.pool = PagePool(self.memory.num_pages, prefix_cache)
        self.runner.allocate(self.memory.num_pages)
        self.scheduler = Scheduler(num_slots=self.max_slots, pool=self.pool,
                                   page_size=page_size, max_len=self.max_len,
                                   prefill_rows=prefill_rows, prefill_chunk=prefill_chunk,
                                   max_batched_tokens=max_batched_tokens, buckets=buckets)
        self._inbox: list[Sequence] = []  # submitted, not yet handed to the scheduler
        self._outbox: list[tuple[Stream, Token | Done]] = []  # events, not yet delivered
        self._last_ready: float | None = None  # when the last iteration's results came
        self._wake = threading.Condition()
        self._accepting = False
        self._stopping = False
        self.failure: str | None = None  # why the engine's thread stopped, if it failed
        self._thread: threading.Thread | None = None
        self.observer.pool(self.memory.num_pages)

    # -- lifecycle ---------------------------------------------------------------------------

    def warm_up(self, progress: Callable[[str], None] | None = None) -> int:
        """Compiles every program the schedule can call (`Runner.warm_up`); returns how many.
        `progress(line)` hears of each."""
        return self.runner.warm_up(progress)

    def start(self, progress: Callable[[str], None] | None = None) -> None:
        """Compiles (`warm_up`) and starts the scheduling thread."""
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
        self.runner.release()

    @property
    def preemptions(self) -> int:
        return self.scheduler.preemptions

    @property
    def active_slots(self) -> int:
        """Requests holding a slot (prefilling or decoding)."""
        return len(self.scheduler.running)

    @property
    def queue_length(self) -> int:
        return len(self._inbox) + len(self.scheduler.waiting)

    # -- requests ----------------------------------------------------------------------------

    def check(self, request: Request) -> Request:
        """The request with its values checked against the model and the pool (one-line
        `RequestError`s)."""
        return check_request(request, self.config.vocab_size, self.max_len)

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
            if self.queue_length >= self.max_queue:
                raise EngineBusy(f"the queue is full ({self.max_queue} waiting); retry later")
            live = _Live(request, stream, time.perf_counter())
            stream._live = Sequence(
                request.prompt, request.max_tokens, echo=request.echo, payload=live,
                sampling=(request.temperature, request.top_k, request.top_p, request.seed))
            self._inbox.append(stream._live)
            self._wake.notify()
        return stream

    def _cancel(self, sequence: Sequence) -> None:
        with self._wake:
            sequence.payload.cancelled = True
            self._wake.notify()

    # -- the engine's thread -----------------------------------------------------------------

    def _serve(self) -> None:
        reason = "abort"
        try:
            # Every host-to-device copy is an explicit, counted `Runner` transfer.
            with jax.transfer_guard_host_to_device("disallow"):
                self._loop()
        except Exception as err:  # a failed program: no request may wait forever
            self.failure = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
            reason = "error"
            logging.getLogger(__name__).exception("the engine's thread failed")
        finally:
            with self._wake:
                self._accepting = False
                sequences = self._inbox + list(self.scheduler.waiting) + self.scheduler.running
                self._inbox.clear()
            for sequence in sequences:
                self._finish(sequence, reason)
            self._flush()

    def _flush(self) -> None:
        """Delivers the events of the iteration to their streams: one wake-up per event loop
        (not per token)."""
        by_loop = collections.defaultdict(list)
        for stream, event in self._outbox:
            by_loop[stream._loop].append((stream._queue, event))
        self._outbox.clear()
        for loop, events in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, events)
            except RuntimeError:  # its event loop has closed: nobody is listening
                pass

    def _loop(self) -> None:
        """Until `shutdown`: schedule, dispatch, then read the previous iteration's tokens."""
        in_flight: collections.deque[_Dispatched] = collections.deque()
        while True:
            with self._wake:
                while not (self._stopping or self._inbox or self.scheduler.pending or in_flight):
                    self._last_ready = None  # idle: the next iteration's time starts afresh
                    self._wake.wait()
                if self._stopping:
                    return
                for sequence in self._inbox:
                    self.scheduler.add(sequence)
                self._inbox.clear()
            for sequence in [*self.scheduler.waiting, *self.scheduler.running]:
                if sequence.payload.cancelled:
                    self._finish(sequence, "cancelled")
            prefix = dataclasses.replace(self.scheduler.prefix)
            preemptions = self.scheduler.preemptions
            iteration = self.scheduler.schedule()
            self._report(prefix, preemptions)
            if iteration is None:  # a preemption needs every token in flight read
                while in_flight:
                    self._read(in_flight.popleft())
                continue
            if not iteration.empty:
                in_flight.append(self._dispatch(iteration))
            while len(in_flight) > (0 if iteration.empty else 1):
                self._read(in_flight.popleft())
            self._flush()
            if iteration.empty and not in_flight:  # nothing can run until a request comes
                self._last_ready = None
                with self._wake:
                    self._wake.wait(0.01)

    def _report(self, prefix, preemptions: int) -> None:
        """Tells the observer of the prefix-cache lookups and preemptions of a schedule."""
        after = self.scheduler.prefix
        if after.queries > prefix.queries:
            self.observer.prefix_cache(after.queries - prefix.queries, after.hits - prefix.hits)
        for _ in range(self.scheduler.preemptions - preemptions):
            self.observer.preempted()

    def _dispatch(self, iteration: Iteration) -> _Dispatched:
        runner = self.runner
        transfers = runner.transfers
        if iteration.edits:
            runner.edit(iteration.edits)
        prefill_out = decode_out = None
        prefill = [(c, c.sequence.admissions, c.finishes and not c.sequence.resumed)
                   for c in iteration.prefill]
        for chunk, _, first in prefill:
            if first:
                self.observer.admitted(len(chunk.sequence.prompt))
        if iteration.prefill:
            echo = any(c.sequence.echo and not c.sequence.resumed for c in iteration.prefill)
            prefill_out = runner.prefill(iteration.prefill, echo)
        if iteration.decode:
            tokens_only = all(s.sampling[0] <= 0 and s.payload.request.logprobs is None
                              for s in iteration.decode.values())
            decode_out = runner.decode(iteration.bucket, tokens_only)
        stats, rows = ((self.prefill_stats, sum(c.length for c in iteration.prefill))
                       if iteration.prefill else (self.decode_stats, len(iteration.decode)))
        counts = IterationCounts(rows, runner.transfers - transfers, len(iteration.decode),
                         sum(s.position for s in iteration.decode.values()))
        return _Dispatched(prefill, prefill_out, dict(iteration.decode), decode_out,
                           stats if iteration.prefill or iteration.decode else None, counts)

    def _read(self, dispatched: _Dispatched) -> None:
        """Streams the tokens of a dispatched iteration (waiting for them) and ends the
        requests they end."""
        waiting = time.perf_counter()
        prefill_out, decode_out = jax.device_get((dispatched.prefill_out, dispatched.decode_out))
        ready = time.perf_counter()
        seconds = None
        if dispatched.stats is not None:
            if self._last_ready is not None:
                seconds = ready - self._last_ready
            dispatched.stats.add(dispatched.counts, seconds, ready - waiting)
            self._last_ready = ready
        first_tokens = None if prefill_out is None else unpack_sampled(prefill_out[0])
        for i, (chunk, admissions, first) in enumerate(dispatched.prefill):
            sequence = chunk.sequence
            if sequence.finished or sequence.admissions != admissions:
                continue  # ended, or preempted since
            live = sequence.payload
            if sequence.echo and not sequence.resumed:
                if chunk.start == 0:  # admitted again after a preemption: computed afresh
                    live.prompt_logprobs.clear()
                    live.prompt_top_logprobs.clear()
                following = min(chunk.length, len(sequence.prompt) - 1 - chunk.start)
                chosen, ids, logps = (x[i, :following] for x in prefill_out[1])
                live.prompt_logprobs.extend(chosen.tolist())
                n = live.request.logprobs or 0
                live.prompt_top_logprobs.extend(tuple(zip(a[:n].tolist(), b[:n].tolist()))
                                                for a, b in zip(ids, logps))
            if first:
                live.first_token_at = time.perf_counter()
                self.observer.first_token(live.first_token_at - live.submitted)
                self._emit(sequence, *(x[i] for x in first_tokens))
        if decode_out is not None:
            decode_out = unpack_sampled(decode_out)
        for slot, sequence in dispatched.decode.items():
            if not sequence.finished:
                self._emit(sequence, *(x[slot] for x in decode_out))
        if seconds is not None:
            self.observer.step(seconds, len(self.scheduler.running), self.queue_length,
                               self.pool.used)

    def _emit(self, sequence: Sequence, token, logprob, top_ids, top_logp) -> None:
        """Sends a new token; ends the request at EOS, `max_tokens` or the context."""
        n, token = sequence.payload.request.logprobs, int(token)
        sequence.payload.stream._put(Token(token, None) if n is None else Token(
            token, float(logprob), tuple(zip(top_ids[:n].tolist(), top_logp[:n].tolist()))))
        sequence.generated.append(token)
        if token in self.eos_ids:
            self._finish(sequence, "stop")
        elif (len(sequence.generated) >= sequence.max_tokens
              or len(sequence.prompt) + len(sequence.generated) >= self.max_len):
            self._finish(sequence, "length")

    def _finish(self, sequence: Sequence, reason: str) -> None:
        if sequence.finished:
            return
        self.scheduler.finish(sequence)
        live = sequence.payload
        generated = len(sequence.generated)
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
