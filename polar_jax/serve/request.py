"""What the serving engine takes and gives back: a `Request` (checked by `check_request`),
the `Stream` of its `Token`s and final `Done`, the errors a submission raises, and what the
engine reports: the `Observer` protocol (metrics) and `ProgramStats` (per kind of iteration).
No device work."""

from __future__ import annotations

import asyncio
import collections.abc
import dataclasses
import numbers
from typing import Protocol

import numpy as np

from polar_jax import settings, validate
from polar_jax.errors import PolarJaxError
from polar_jax.sampling import SamplingParams
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
    `TOP_LOGPROBS`; None: no log-probabilities, so that a step whose rows are all greedy and
    want none computes only an argmax), `echo`: also the prompt's log-probabilities."""

    prompt: tuple[int, ...]
    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    logprobs: int | None = None
    echo: bool = False


@dataclasses.dataclass(frozen=True)
class Token:
    """A new token, its log-probability (None unless the request asked for log-probabilities)
    and (if asked) the best alternatives, best first."""

    id: int
    logprob: float | None
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
    def prefix_cache(self, queries: int, hits: int) -> None: ...


@dataclasses.dataclass
class ProgramStats:
    """Totals over the engine's iterations of one kind since `start`: decode (a decode step
    alone) or prefill (prefill chunks, and a decode step when sequences decode): iterations,
    rows summed over them (decoding sequences; prefill tokens), explicit host-to-device
    transfers, the sequences decoded and their positions summed (their mean context is
    `positions / decoded`); and over the `timed` ones (those that followed another while the
    engine was busy, `timed_rows` their rows) `seconds` (from the previous iteration's results
    to this one's: the device's time per iteration when the host keeps up) and `waited` (of
    those seconds, the host's wait for the results)."""

    steps: int = 0
    rows: int = 0
    transfers: int = 0
    decoded: int = 0
    positions: int = 0
    timed: int = 0
    timed_rows: int = 0
    seconds: float = 0.0
    waited: float = 0.0

    def add(self, counts: "IterationCounts", seconds: float | None = None,
            waited: float = 0.0) -> None:
        self.steps, self.rows = self.steps + 1, self.rows + counts.rows
        self.transfers += counts.transfers
        self.decoded, self.positions = self.decoded + counts.decoded, self.positions + counts.positions
        if seconds is not None:
            self.timed, self.timed_rows = self.timed + 1, self.timed_rows + counts.rows
            self.seconds, self.waited = self.seconds + seconds, self.waited + waited


@dataclasses.dataclass(frozen=True)
class IterationCounts:
    """What an iteration adds to its `ProgramStats` besides its time."""

    rows: int
    transfers: int
    decoded: int
    positions: int


class NoObserver:
    def admitted(self, prompt_tokens): pass
    def first_token(self, seconds): pass
    def finished(self, completion_tokens, seconds_per_token): pass
    def step(self, seconds, running, waiting, pages_used): pass
    def preempted(self): pass
    def pool(self, pages): pass
    def prefix_cache(self, queries, hits): pass


class Stream:
    """The events of one request (`Token`s, then a `Done`), as an async iterator on the event
    loop that submitted it. `cancel()` (or closing the iteration early) frees its slot."""

    def __init__(self, engine: "polar_jax.serve.engine.Engine"):
        self._engine = engine
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._live: _Live | None = None
        self._done = False

    def _put(self, event) -> None:  # from the engine's thread, delivered by `Engine._flush`
        self._engine._outbox.append((self, event))

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




def check_request(request: Request, vocab_size: int, max_len: int) -> Request:
    """`request` with its values checked against a model of `vocab_size` tokens and a
    context of `max_len` positions (one-line `RequestError`s)."""
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
    bad = next((t for t in prompt if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise RequestError(f"token id {bad} is outside the vocabulary [0, {vocab_size})")
    if len(prompt) >= max_len:
        raise RequestError(f"the prompt has {len(prompt)} tokens; this server's context is "
                           f"{max_len} positions (prompt and completion together)",
                           too_long=True)
    try:
        validate.integer("max_tokens", request.max_tokens, low=1)
        sampling = SamplingParams(request.temperature, request.top_k, request.top_p).validated()
        settings.check("seed", request.seed)
        if request.logprobs is not None:
            validate.integer("logprobs", request.logprobs, low=0, high=TOP_LOGPROBS)
        validate.boolean("echo", request.echo)
    except PolarJaxError as err:
        raise RequestError(str(err)) from None
    return dataclasses.replace(request, prompt=prompt, temperature=float(sampling.temperature),
                               top_k=int(sampling.top_k), top_p=float(sampling.top_p))
