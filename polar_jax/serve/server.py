"""The OpenAI-compatible HTTP server over the engine (FastAPI and uvicorn, the `[serve]` extra):
`POST /v1/completions` and `/v1/chat/completions`, each streamed as server-sent events or not;
`GET /v1/models`, `/health` and `/metrics` (Prometheus, `metrics.py`).

Text comes from incremental detokenization (`Detokenizer`). A stop string ends its completion
at its first occurrence (the text cut there, the request cancelled, finish_reason "stop"); a
stream holds back text that could begin one. Bad fields answer 400 in OpenAI's error format,
naming the field; an unknown model 404; a prompt beyond the context 413; a full queue 503. A
client that disconnects cancels its requests, freeing their slots. On SIGTERM (or SIGINT) the
engine stops admitting (503), in-flight requests end with finish_reason "abort", uvicorn
finishes its responses and the process exits.

What one client may take is bounded (`Limits`, the serve flags): the body's size (413) and JSON
depth, the prompts' characters (413), prompts per request (at most --max-queue) and stop
strings (400), all checked before the work starts; bodies are parsed and prompts tokenized on a
worker thread, so the event loop (and /health) never waits on them. A connection must send its
request head within --head-timeout and its body within --body-timeout (408); connections past
--max-connections are answered 503 and closed at once, before the process meets its file
limit. Every exception of a handler ends in `Guard`: an OpenAI-style JSON error, one log line
for a 500, every answer counted by status code; a client gone mid-body is not an error.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import functools
import json
import logging
import resource
import secrets
import signal
import socket
import threading
import time
import uuid
from typing import Any, AsyncIterator, Callable, Sequence

import jinja2
import uvicorn
from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from polar_jax import settings, validate
from polar_jax.decode import Decoder
from polar_jax.errors import PolarJaxError
from polar_jax.serve.engine import Done, Engine, EngineBusy, Request, RequestError, Token
from polar_jax.serve.metrics import Metrics

DETOKENIZE_CONTEXT = 6  # prompt tokens decoded before a completion's first (spaces, merges)
GRACEFUL_SHUTDOWN_S = 30
FILES_RESERVED = 64  # open files the process keeps beside its connections (model, logs, pipes)
LOG = logging.getLogger("polar_jax.serve")
MAX_JSON_DEPTH = 500  # below where Python's JSON parser raises RecursionError (about 1,000)
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
# Fields of OpenAI's requests served only at their default (null is always accepted).
UNSUPPORTED = {"best_of": 1, "frequency_penalty": 0, "presence_penalty": 0, "logit_bias": None,
               "suffix": None, "tools": None, "functions": None}


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may hold and how long its client may take (the serve flags of the same
    names). Prompts per request are bounded by the engine's queue (--max-queue) and prompt
    tokens by its context (--max-len)."""

    max_body_mb: float = 16.0  # the request body (413)
    max_prompt_chars: int = 1_000_000  # the characters of a request's prompts or messages (413)
    max_stops: int = 16  # stop strings per request (400)
    max_stop_chars: int = 1000  # characters per stop string (400)
    max_json_depth: int = 64  # arrays and objects nested in the body (400)
    head_timeout: float = 10.0  # seconds from a connection (or its last answer) to a request head
    body_timeout: float = 60.0  # seconds to receive a request's body (408)
    max_connections: int = 512  # open at once; more are answered 503 and closed

    def check(self) -> "Limits":
        """These limits, refused in one line naming the flag when out of range."""
        flag = lambda name: f"--{name.replace('_', '-')}"
        for name in ("max_prompt_chars", "max_stops", "max_stop_chars", "max_connections"):
            validate.integer(flag(name), getattr(self, name), low=1)
        validate.integer("--max-json-depth", self.max_json_depth, low=2, high=MAX_JSON_DEPTH)
        for name in ("max_body_mb", "head_timeout", "body_timeout"):
            validate.number(flag(name), getattr(self, name), low=0, low_open=True)
        return self

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)


class ApiError(Exception):
    """A request refused with an HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def error_response(status: int, message: str, param: str | None = None,
                   code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                   "code": code}}, status_code=status,
                        headers={"connection": "close"} if status == 408 else None)


# -- text ----------------------------------------------------------------------------------------


class Detokenizer:
    """The text of token ids as they arrive. Each id's text is the growth of a small window's
    decoding, released only once complete (not ending in an unfinished UTF-8 character), so
    the pieces join to the decoding of all the ids, special tokens skipped."""

    def __init__(self, tokenizer, context: Sequence[int] = ()):
        self._tokenizer = tokenizer
        self._ids = list(context)
        self._start = 0  # the window decoded: ids[start:]
        self._read = len(self._ids)  # ids before `read` are out as text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def _new_text(self) -> str:
        before = self._decode(self._ids[self._start:self._read])
        after = self._decode(self._ids[self._start:])
        return after[len(before):] if len(after) > len(before) else ""

    def add(self, token_id: int) -> str:
        """The text that `token_id` completes (empty while a character is unfinished)."""
        self._ids.append(token_id)
        text = self._new_text()
        if not text or text.endswith("\ufffd"):
            return ""
        self._start, self._read = self._read, len(self._ids)
        return text

    def flush(self) -> str:
        """What is held back (an unfinished character at the end), as it decodes."""
        text = self._new_text()
        self._start = self._read = len(self._ids)
        return text


@dataclasses.dataclass
class TokenText:
    """A token as OpenAI's legacy logprobs show it: its text, where that starts in the
    completion, its log-probability and the best alternatives (None: a prompt's first token)."""

    text: str
    offset: int
    logprob: float | None
    top: dict[str, float] | None


def logprobs_json(tokens: Sequence[TokenText], start: int) -> dict:
    """OpenAI's legacy logprobs object, offsets counted from `start`."""
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [t.top for t in tokens],
            "text_offset": [start + t.offset for t in tokens]}


class Choice:
    """One prompt's completion as its events arrive: the text (cut at the first stop string),
    its tokens, the finish reason, and how much has been released to a stream."""

    def __init__(self, index: int, prompt: Sequence[int], stream, tokenizer,
                 stops: Sequence[str]):
        self.index, self.prompt, self.stream = index, prompt, stream
        self._tokenizer = tokenizer
        self._detokenizer = Detokenizer(tokenizer, prompt[-DETOKENIZE_CONTEXT:])
        self._stops = tuple(stops)
        self._longest_stop = max(map(len, self._stops), default=0)
        self.text = ""
        self.tokens: list[TokenText] = []
        self.generated = 0
        self.finish_reason: str | None = None
        self.done: Done | None = None
        self._sent_text = self._sent_tokens = 0

    def alternatives(self, top: Sequence[tuple[int, float]]) -> dict[str, float]:
        return {self._tokenizer.decode([i]): logprob for i, logprob in top}

    def consume(self, event: Token | Done) -> None:
        """Takes the stream's next event (tokens after a stop string are dropped)."""
        if isinstance(event, Token):
            if self.finish_reason is not None:
                return
            self.generated += 1
            self.tokens.append(TokenText("", len(self.text), event.logprob,
                                         self.alternatives(event.top_logprobs)))
            self._extend(self._detokenizer.add(event.id))
        else:
            self.done = event
            self._extend(self._detokenizer.flush())
            self.finish_reason = self.finish_reason or event.reason

    def _extend(self, piece: str) -> None:
        if not piece:
            return
        search_from = max(0, len(self.text) - self._longest_stop + 1)
        self.text += piece
        self.tokens[-1].text += piece
        hits = [i for i in (self.text.find(s, search_from) for s in self._stops) if i >= 0]
        if hits:
            cut = min(hits)
            self.text = self.text[:cut]
            self.tokens = [t for t in self.tokens if t.offset < cut]
            for t in self.tokens:
                t.text = t.text[:max(0, cut - t.offset)]
            self.finish_reason = "stop"

    def _held(self) -> int:
        """The length of the longest end of the text that could begin a stop string."""
        for n in range(min(len(self.text), self._longest_stop - 1), 0, -1):
            if any(stop.startswith(self.text[-n:]) for stop in self._stops):
                return n
        return 0

    def release(self) -> tuple[str, list[TokenText]]:
        """The text and tokens not yet released that may go out now: all once finished, else
        all but a possible beginning of a stop string."""
        end, count = len(self.text), len(self.tokens)
        if self.finish_reason is None:
            end -= self._held()
            count = next((i for i, t in enumerate(self.tokens) if t.offset + len(t.text) > end),
                         count)
        text, tokens = self.text[self._sent_text:end], self.tokens[self._sent_tokens:count]
        self._sent_text, self._sent_tokens = end, count
        return text, tokens


# -- requests ------------------------------------------------------------------------------------


def json_depth(value) -> int:
    """How deep arrays and objects nest in the parsed JSON `value` (a scalar: 0), counted
    without recursion."""
    depth, level = 0, [(value, 1)]
    while level:
        item, at = level.pop()
        if isinstance(item, (dict, list)):
            depth = max(depth, at)
            level.extend((child, at + 1) for child in
                         (item.values() if isinstance(item, dict) else item))
    return depth


def unicode_text(name: str, text: str, param: str) -> str:
    """`text`, refused (400) if it holds a lone surrogate (JSON's "\\ud800"), which no
    tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ApiError(400, f"{name} holds a lone surrogate ({text[err.start]!r} at character "
                            f"{err.start}), which is not valid Unicode", param) from None
    return text


class Body:
    """A request's JSON object and its fields, each checked (a bad one: 400 naming it)."""

    def __init__(self, raw: bytes, limits: Limits):
        self.limits = limits
        too_deep = f"; at most {limits.max_json_depth} (--max-json-depth)"
        try:
            self.data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as err:
            raise ApiError(400, f"the request body is not valid JSON: {err}") from None
        except RecursionError:  # past about 1,000 levels
            raise ApiError(400, "the request body nests arrays and objects deeper than the JSON "
                                "parser goes" + too_deep) from None
        depth = json_depth(self.data)
        if depth > limits.max_json_depth:
            raise ApiError(400, f"the request body nests arrays and objects {depth} deep"
                           + too_deep)
        if not isinstance(self.data, dict):
            raise ApiError(400, f"the request body must be a JSON object, got "
                                f"{validate.describe(self.data)}")
        for name, default in UNSUPPORTED.items():
            if self.data.get(name) not in (None, default):
                raise ApiError(400, f"{name} is not supported (only {json.dumps(default)})", name)
        n = self.data.get("n")
        if n is not None and (type(n) is not int or n != 1):  # true == 1 in Python
            raise ApiError(400, f"n must be 1 (one choice per prompt: send several prompts), got "
                                f"{validate.describe(n)}", "n")

    def get(self, name: str, check: Callable[..., Any], default=None, **limits):
        """The field `name` checked by `check(name, value, **limits)`; absent or null: `default`."""
        value = self.data.get(name)
        if value is None:
            return default
        try:
            return check(name, value, **limits)
        except PolarJaxError as err:
            raise ApiError(400, str(err), name) from None

    def stops(self) -> list[str]:
        stop = self.data.get("stop")
        stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise ApiError(400, f"stop must be a non-empty string or a list of them, got "
                                f"{validate.describe(stop)}", "stop")
        limits = self.limits
        if len(stops) > limits.max_stops:
            raise ApiError(400, f"stop holds {len(stops)} strings; at most {limits.max_stops} "
                                "(--max-stops)", "stop")
        longest = max(stops, key=len, default="")
        if len(longest) > limits.max_stop_chars:
            raise ApiError(400, f"a stop string has {len(longest)} characters; at most "
                                f"{limits.max_stop_chars} (--max-stop-chars)", "stop")
        return [unicode_text("stop", s, "stop") for s in stops]


def _is_ids(value) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(isinstance(t, int) and not isinstance(t, bool) for t in value))


def chat_prompt(tokenizer, messages, max_chars: int = Limits.max_prompt_chars) -> list[int]:
    """The token ids of `messages` (OpenAI's chat format; content a string or text parts, at
    most `max_chars` characters in all) through the tokenizer's chat template, with the
    generation prompt."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ApiError(400, "this model has no chat template (none in its tokenizer_config.json): "
                            "use /v1/completions", "messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, f"messages must be a non-empty list, got "
                            f"{validate.describe(messages)}", "messages")
    conversation = []
    for i, message in enumerate(messages):
        role, content = (message.get("role"), message.get("content")) \
            if isinstance(message, dict) else (None, None)
        if isinstance(content, list):
            parts = [p.get("text") if isinstance(p, dict) and p.get("type") == "text" else None
                     for p in content]
            content = "".join(parts) if all(isinstance(p, str) for p in parts) else None
        if not isinstance(role, str) or not isinstance(content, str):
            raise ApiError(400, f"messages[{i}] must be an object with a string role and a string "
                                f"content (or text parts), got {validate.describe(message)}",
                           "messages")
        conversation.append({"role": unicode_text(f"messages[{i}].role", role, "messages"),
                             "content": unicode_text(f"messages[{i}].content", content,
                                                     "messages")})
    chars = sum(len(m["role"]) + len(m["content"]) for m in conversation)
    if chars > max_chars:
        raise ApiError(413, f"the messages have {chars} characters; at most {max_chars} "
                            "(--max-prompt-chars)", "messages", "context_length_exceeded")
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False,
                                             add_generation_prompt=True)
    except jinja2.TemplateError as err:
        raise ApiError(400, f"the chat template refused the messages: {err}", "messages") from None
    return tokenizer(text, add_special_tokens=False)["input_ids"]


async def _disconnected(request: HttpRequest) -> None:
    """Returns when the client has gone (the body is read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(payload) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _event_stream(events: AsyncIterator[str], choices: list[Choice]) -> StreamingResponse:
    """Server-sent `events`; afterwards (also when the client left before they began), every
    request of `choices` still running is cancelled."""

    def cancel() -> None:
        for choice in choices:
            choice.stream.cancel()

    return StreamingResponse(events, media_type="text/event-stream",
                             background=BackgroundTask(cancel))


class ClientGone(Exception):
    """The client closed its connection before its request's body arrived (not an error)."""


class Api:
    """The endpoints over one engine."""

    def __init__(self, engine: Engine, model_name: str, metrics: Metrics, limits: Limits):
        self.engine, self.model_name, self.metrics = engine, model_name, metrics
        self.limits = limits
        self.tokenizer = engine.decoder.tokenizer
        self.created = int(time.time())
        # Bodies are parsed and prompts tokenized here, one at a time (a tokenizer is not
        # safe to share between threads), never on the event loop.
        self._parser = concurrent.futures.ThreadPoolExecutor(1, "polar-jax-parse")

    # -- shared ---------------------------------------------------------------------------------

    async def _read(self, request: HttpRequest) -> bytes:
        """The request's body: 413 past --max-body-mb (by its declared length, before reading
        it), 408 past --body-timeout, `ClientGone` if the client leaves meanwhile."""
        limits, limit = self.limits, self.limits.max_body_bytes
        too_large = (f"; at most {limit} bytes (--max-body-mb {limits.max_body_mb:g})")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request body has {int(declared)} bytes" + too_large)

        async def read() -> bytes:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ApiError(413, f"the request body has more than {limit} bytes"
                                   + too_large)
                chunks.append(chunk)
            return b"".join(chunks)

        try:
            return await asyncio.wait_for(read(), limits.body_timeout)
        except TimeoutError:
            raise ApiError(408, f"the request body did not arrive within "
                                f"{limits.body_timeout:g} s (--body-timeout)") from None
        except ClientDisconnect:
            raise ClientGone from None

    async def _parsed(self, request: HttpRequest, parse: Callable[[Body], Any]):
        """`parse(body)` of the request's checked body, on the parsing thread."""
        raw = await self._read(request)
        return await asyncio.get_running_loop().run_in_executor(
            self._parser, lambda: parse(self._body(raw)))

    def _body(self, raw: bytes) -> Body:
        body = Body(raw, self.limits)
        model = body.get("model", validate.string)
        if model is not None and model != self.model_name:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves "
                                f"{self.model_name!r}", "model", "model_not_found")
        return body

    def _sampling(self, body: Body, max_tokens: int | None) -> dict:
        """The engine's sampling fields of `body` (temperature 1 and a random seed by default,
        as OpenAI's)."""
        return dict(max_tokens=max_tokens, temperature=body.get("temperature", settings.check, 1.0),
                    top_p=body.get("top_p", settings.check, 1.0),
                    top_k=body.get("top_k", settings.check, 0),
                    seed=body.get("seed", settings.check, secrets.randbits(32)))

    def _submit(self, prompts: list[list[int]], stops: list[str], param: str, **fields
                ) -> list[Choice]:
        """Submits one request per prompt (seeds `seed + index`); all or none."""
        choices = []
        try:
            for index, prompt in enumerate(prompts):
                max_tokens = fields["max_tokens"] or max(1, self.engine.max_len - len(prompt))
                request = Request(tuple(prompt), **(fields | dict(
                    max_tokens=max_tokens, seed=(fields["seed"] + index) % 2**32)))
                choices.append(Choice(index, prompt, self.engine.submit(request),
                                      self.tokenizer, stops))
        except RequestError as err:
            for choice in choices:
                choice.stream.cancel()
            where = f"prompt {index}: " if len(prompts) > 1 else ""
            if err.too_long:
                raise ApiError(413, where + str(err), param, "context_length_exceeded") from None
            raise ApiError(400, where + str(err), param) from None
        except EngineBusy as err:
            for choice in choices:
                choice.stream.cancel()
            raise ApiError(503, str(err)) from None
        return choices

    async def _updates(self, choices: list[Choice]) -> AsyncIterator[tuple[Choice, bool]]:
        """(a choice, whether it has ended) whenever a choice has news (a token or its end),
        the choices decoding together, until all have ended. On exit, every request still
        running is cancelled."""
        news: asyncio.Queue[tuple[Choice, bool]] = asyncio.Queue()

        async def follow(choice: Choice) -> None:
            try:
                async for event in choice.stream:  # to its `Done`, which has echo's logprobs
                    choice.consume(event)
                    if choice.finish_reason is not None:
                        choice.stream.cancel()  # a stop string: frees the slot now
                    news.put_nowait((choice, choice.done is not None))
            finally:
                choice.stream.cancel()  # the client left
                self.metrics.finished_requests.labels(choice.finish_reason or "cancelled").inc()

        tasks = [asyncio.create_task(follow(choice)) for choice in choices]
        try:
            running = len(choices)
            while running:
                choice, finished = await news.get()
                running -= finished
                yield choice, finished
        finally:
            for task in tasks:
                task.cancel()

    async def _run(self, request: HttpRequest, choices: list[Choice]) -> bool:
        """Runs `choices` to their end; False if the client left first (their requests are
        cancelled)."""

        async def run():
            async for _ in self._updates(choices):
                pass

        work, gone = asyncio.ensure_future(run()), asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            work.cancel()
        if work in done:
            work.result()
            return True
        return False

    def _usage(self, choices: list[Choice]) -> dict:
        prompt = sum(len(c.prompt) for c in choices)
        completion = sum(c.generated for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def _stream_options(self, body: Body) -> bool:
        options = body.get("stream_options", validate.mapping, {})
        try:
            return validate.boolean("stream_options.include_usage",
                                    options.get("include_usage", False))
        except PolarJaxError as err:
            raise ApiError(400, str(err), "stream_options") from None

    # -- endpoints ------------------------------------------------------------------------------

    async def completions(self, request: HttpRequest) -> Response:
        def parse(body: Body):
            texts, prompts = self._prompts(body.data.get("prompt"))
            logprobs = body.get("logprobs", validate.integer, None, low=0, high=5)
            echo = body.get("echo", validate.boolean, False)
            stream = body.get("stream", validate.boolean, False)
            if stream and echo and logprobs is not None:
                raise ApiError(400, "echo with logprobs cannot be streamed (the prompt's "
                                    "log-probabilities come at the end): set stream false",
                               "stream")
            include_usage = self._stream_options(body)
            max_tokens = body.get("max_tokens", validate.integer, Request.max_tokens, low=1)
            fields = dict(logprobs=logprobs or 0, echo=echo, **self._sampling(body, max_tokens))
            echoed = [(t if t is not None else self.tokenizer.decode(p, skip_special_tokens=True))
                      if echo else "" for t, p in zip(texts, prompts)]
            return prompts, body.stops(), fields, echoed, logprobs, stream, include_usage

        prompts, stops, fields, echoed, logprobs, stream, include_usage = await self._parsed(
            request, parse)
        echo = fields["echo"]
        choices = self._submit(prompts, stops, "prompt", **fields)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": self.model_name}

        def choice_json(choice: Choice, text: str, tokens: list[TokenText], start: int,
                        finished: bool = True) -> dict:
            return {"index": choice.index, "text": text,
                    "finish_reason": choice.finish_reason if finished else None,
                    "logprobs": None if logprobs is None else logprobs_json(tokens, start)}

        if stream:
            async def events():
                for choice, prefix in zip(choices, echoed):
                    if prefix:
                        yield _sse(head | {"choices": [choice_json(choice, prefix, [], 0, False)]})
                async for choice, finished in self._updates(choices):
                    text, tokens = choice.release()
                    if text or tokens or finished:
                        yield _sse(head | {"choices": [choice_json(
                            choice, text, tokens, len(echoed[choice.index]), finished)]})

            return _event_stream(self._ended(events(), head, choices, include_usage), choices)
        if not await self._run(request, choices):
            return Response(status_code=499)
        out = []
        for choice, prefix in zip(choices, echoed):
            tokens = choice.tokens
            if echo and logprobs is not None:
                tokens = self._prompt_tokens(choice) + [
                    dataclasses.replace(t, offset=len(prefix) + t.offset) for t in tokens]
            out.append(choice_json(choice, prefix + choice.text, tokens, 0))
        return JSONResponse(head | {"choices": out, "usage": self._usage(choices)})

    async def _ended(self, events: AsyncIterator[str], head: dict, choices: list[Choice],
                     include_usage: bool) -> AsyncIterator[str]:
        """A stream's `events`, then (when asked) the usage chunk, then `[DONE]`."""
        async for event in events:
            yield event
        if include_usage:
            yield _sse(head | {"choices": [], "usage": self._usage(choices)})
        yield "data: [DONE]\n\n"

    def _prompts(self, prompt) -> tuple[list[str | None], list[list[int]]]:
        """(the text of each prompt given as text, else None; each prompt's token ids): a
        string, a list of strings, a list of ids or a list of such lists; at most --max-queue
        prompts (all are queued at once) of --max-prompt-chars characters in all."""
        items = [prompt] if isinstance(prompt, str) or _is_ids(prompt) else prompt
        if not isinstance(items, list) or not items or not all(
                isinstance(p, str) or _is_ids(p) for p in items):
            raise ApiError(400, "prompt must be a string, a list of strings, a list of token ids "
                                f"or a list of such lists, got {validate.describe(prompt)}",
                           "prompt")
        if len(items) > self.engine.max_queue:
            raise ApiError(400, f"prompt holds {len(items)} prompts; this server queues at most "
                                f"{self.engine.max_queue} (--max-queue): send fewer per request",
                           "prompt")
        chars = sum(len(p) for p in items if isinstance(p, str))
        if chars > self.limits.max_prompt_chars:
            raise ApiError(413, f"the prompt has {chars} characters; at most "
                                f"{self.limits.max_prompt_chars} (--max-prompt-chars)", "prompt",
                           "context_length_exceeded")
        texts = [unicode_text("prompt" if len(items) == 1 else f"prompt {i}", p, "prompt")
                 if isinstance(p, str) else None for i, p in enumerate(items)]
        return texts, [self.tokenizer(p)["input_ids"] if isinstance(p, str) else p for p in items]

    def _prompt_tokens(self, choice: Choice) -> list[TokenText]:
        """The echoed prompt's tokens with their log-probabilities (`Done`'s)."""
        detokenizer, tokens, offset = Detokenizer(self.tokenizer), [], 0
        logps, tops = choice.done.prompt_logprobs, choice.done.prompt_top_logprobs
        for i, (token_id, logp, top) in enumerate(zip(choice.prompt, logps, tops)):
            text = detokenizer.add(token_id)
            if i == len(choice.prompt) - 1:
                text += detokenizer.flush()
            tokens.append(TokenText(text, offset, logp,
                                    None if top is None else choice.alternatives(top)))
            offset += len(text)
        return tokens

    async def chat(self, request: HttpRequest) -> Response:
        def parse(body: Body):
            if body.data.get("logprobs") not in (None, False):
                raise ApiError(400, "logprobs are not supported for chat completions (use "
                                    "/v1/completions)", "logprobs")
            prompt = chat_prompt(self.tokenizer, body.data.get("messages"),
                                 self.limits.max_prompt_chars)
            stream = body.get("stream", validate.boolean, False)
            include_usage = self._stream_options(body)
            max_tokens = body.get("max_completion_tokens", validate.integer, None, low=1)
            max_tokens = body.get("max_tokens", validate.integer, max_tokens, low=1)
            return prompt, body.stops(), self._sampling(body, max_tokens), stream, include_usage

        prompt, stops, fields, stream, include_usage = await self._parsed(request, parse)
        (choice,) = choices = self._submit([prompt], stops, "messages", **fields)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": self.model_name}
        if stream:
            head["object"] = "chat.completion.chunk"

            def chunk(delta: dict, finish_reason=None) -> str:
                return _sse(head | {"choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                 "finish_reason": finish_reason}]})

            async def events():
                yield chunk({"role": "assistant", "content": ""})
                async for _, finished in self._updates(choices):
                    text, _ = choice.release()
                    if text:
                        yield chunk({"content": text})
                    if finished:
                        yield chunk({}, choice.finish_reason)

            return _event_stream(self._ended(events(), head, choices, include_usage), choices)
        if not await self._run(request, choices):
            return Response(status_code=499)
        return JSONResponse(head | {"object": "chat.completion", "usage": self._usage(choices),
                                    "choices": [{"index": 0, "logprobs": None,
                                                 "finish_reason": choice.finish_reason,
                                                 "message": {"role": "assistant",
                                                             "content": choice.text}}]})

    async def models(self, request: HttpRequest) -> Response:
        return JSONResponse({"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": self.created,
            "owned_by": "polar-jax", "max_model_len": self.engine.max_len}]})

    async def health(self, request: HttpRequest) -> Response:
        return JSONResponse({"status": "ok", "active_slots": self.engine.active_slots,
                             "queue_length": self.engine.queue_length})

    async def prometheus(self, request: HttpRequest) -> Response:
        text, content_type = self.metrics.render()
        return Response(text, media_type=content_type)


class Guard:
    """ASGI middleware, the one error path: every answer is counted by endpoint and status
    code; an exception that escapes a handler becomes a 500 in OpenAI's format (if nothing was
    sent yet) and one log line; a client gone before its body arrived is counted as 499, quietly."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        started = False

        async def counted(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        try:
            await self.app(scope, receive, counted)
        except ClientGone:
            self.metrics.requests.labels(endpoint, "499").inc()
        except Exception as err:  # a bug: the client and the log learn of it in one line
            reason = " ".join(f"{type(err).__name__}: {err}".split())[:300]
            LOG.error("%s %s: 500 internal error: %s", scope["method"], scope["path"], reason)
            if not started:
                await error_response(500, f"internal error: {reason}")(scope, receive, counted)


def create_app(engine: Engine, model_name: str, metrics: Metrics,
               limits: Limits = Limits()) -> FastAPI:
    """The FastAPI application serving `engine` (started) as `model_name`."""
    api = Api(engine, model_name, metrics, limits)
    app = FastAPI(title="polar-jax", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_api_route("/v1/completions", api.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", api.chat, methods=["POST"])
    app.add_api_route("/v1/models", api.models, methods=["GET"])
    app.add_api_route("/health", api.health, methods=["GET"])
    app.add_api_route("/metrics", api.prometheus, methods=["GET"])

    @app.exception_handler(ApiError)
    async def api_error(request, err: ApiError):
        return error_response(err.status, str(err), err.param, err.code)

    @app.exception_handler(HTTPException)
    async def http_error(request, err: HTTPException):
        return error_response(err.status_code, f"{request.method} {request.url.path}: "
                                               f"{err.detail}")

    app.add_middleware(Guard, metrics=metrics)
    return app


# -- the process ---------------------------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn's server that prints `ready` once it listens and, on SIGTERM or SIGINT, also
    shuts the engine down, so that in-flight requests end ("abort") and the graceful shutdown
    can finish."""

    def __init__(self, config: uvicorn.Config, engine: Engine, ready: str):
        super().__init__(config)
        self._engine, self._ready = engine, ready

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started:
            print(self._ready, flush=True)

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        threading.Thread(target=self._engine.shutdown, daemon=True).start()  # not under a lock


class _Connection(AutoHTTPProtocol):
    """uvicorn's HTTP protocol, bounded: past `max_connections` open ones a new connection is
    answered 503 and closed at once (its file freed); a request head that has not arrived
    `head_timeout` seconds after the connection opened (or after the data that began it) is
    answered 408 and the connection closed."""

    def __init__(self, *args, limits: Limits, **kwargs):
        super().__init__(*args, **kwargs)
        self._limits = limits
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self._limits.max_connections:
            self._refuse(503, f"the server has {self._limits.max_connections} connections "
                              "open (--max-connections); retry later")
        else:
            self._await_head()

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._head_timer is None and (self.cycle is None or self.cycle.response_complete):
            self._await_head()  # a new request begins
        super().data_received(data)

    def connection_lost(self, exc) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def _await_head(self) -> None:
        self._head_timer = self.loop.call_later(self._limits.head_timeout, self._head_overdue,
                                                self.cycle)

    def _head_overdue(self, cycle) -> None:
        self._head_timer = None
        if self.cycle is cycle and not self.transport.is_closing():  # no request head since
            self._refuse(408, f"no request head within {self._limits.head_timeout:g} s "
                              "(--head-timeout)")

    def _refuse(self, status: int, message: str) -> None:
        response = error_response(status, message)
        phrase = {408: "Request Timeout", 503: "Service Unavailable"}[status]
        self.transport.write(f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\n"
                             f"content-length: {len(response.body)}\r\nconnection: close\r\n\r\n"
                             .encode() + response.body)
        # Closed once the client closes (EOF), else after a second; meanwhile what it sends is
        # read and dropped: a socket closed with unread data resets the connection, and the
        # client would lose the answer.
        self._refused = True
        self.transport.write_eof()
        self.loop.call_later(1.0, self.transport.close)


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port and listening: bound once, so that a second server on the
    port fails here, also when both start at the same moment (two bound sockets that do not
    listen yet may share a port with SO_REUSEADDR, and uvloop ignores the loser's failure to
    listen later)."""
    sock = None
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(socket.SOMAXCONN)
    except OSError as err:
        if sock is not None:
            sock.close()
        raise PolarJaxError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


def _reserve_files(max_connections: int) -> None:
    """Raises this process's open-file limit to what --max-connections needs, within the hard
    limit; refuses in one line when it cannot."""
    needed = max_connections + FILES_RESERVED
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            raise PolarJaxError(f"--max-connections {max_connections} needs {needed} open files; "
                                f"this process may open {hard} (ulimit -Hn): lower "
                                "--max-connections")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def _log_to_stderr(access_log: bool) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    for name, level in (("uvicorn.error", logging.WARNING), (LOG.name, logging.WARNING),
                        ("uvicorn.access", logging.INFO if access_log else logging.WARNING)):
        logger = logging.getLogger(name)
        logger.setLevel(level)
        logger.addHandler(handler)
        logger.propagate = False


def serve(load: Callable[[], Decoder], *, host: str, port: int, model_name: str, mode: str,
          engine_options: dict, limits: Limits = Limits(), access_log: bool = True) -> None:
    """Binds host:port (first: a taken port fails before the model loads), loads the decoder
    (`load()`), plans its memory and compiles the engine (`Engine(decoder, **engine_options)`),
    prints one line once serving and serves until SIGTERM or SIGINT (then returns after the
    graceful shutdown; SIGINT raises KeyboardInterrupt)."""
    limits.check()
    _reserve_files(limits.max_connections)
    sock = _bind(host, port)
    try:
        metrics = Metrics()
        engine = Engine(load(), observer=metrics, **engine_options)
        start = time.perf_counter()
        engine.start()
        address = sock.getsockname()
        where = f"[{address[0]}]" if ":" in address[0] else address[0]
        ready = (f"serving {model_name} ({mode}) at http://{where}:{address[1]}/v1: "
                 f"up to {engine.max_slots} sequences of {engine.max_len} positions, "
                 f"{engine.memory.describe()} (compiled in "
                 f"{time.perf_counter() - start:.1f} s)")
        config = uvicorn.Config(create_app(engine, model_name, metrics, limits), lifespan="off",
                                log_config=None, access_log=access_log,
                                http=functools.partial(_Connection, limits=limits),
                                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
        _log_to_stderr(access_log)
        # uvicorn raises SIGTERM again after its graceful shutdown: that shutdown is the exit.
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
        try:
            _Server(config, engine, ready).run(sockets=[sock])
        finally:
            signal.signal(signal.SIGTERM, previous)
            engine.shutdown()
    finally:
        sock.close()
