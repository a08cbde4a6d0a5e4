"""The routes of the OpenAI-compatible server over a started engine: `POST /v1/completions` and
`/v1/chat/completions` (each streamed as server-sent events or not, `n` choices per prompt),
`GET /v1/models`, `/health` and `/metrics` (Prometheus, `metrics.py`).

A request's path: its body is read (bounded in size and time), parsed into a typed request
(`protocol`) and its prompts tokenized (`text`), on one worker thread, never on the event loop;
each choice is one engine request (choice i draws with `seed + i`) whose stream a `text.Choice`
follows; the answer is built from the choices (`protocol`). A client that disconnects cancels
its requests, freeing their slots. With an API key, every /v1/ route needs `Authorization:
Bearer KEY` (`RequireKey`: 401); `Guard` is the one error path (an OpenAI-style JSON error, one
log line for a 500, every answer counted by status code; a client gone mid-body is not an error).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hmac
import logging
import time
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from polar_jax.serve import protocol
from polar_jax.serve.engine import Engine, EngineBusy, Request, RequestError
from polar_jax.serve.metrics import Metrics
from polar_jax.serve.protocol import ApiError, Body, Limits, Sampling, error_response, sse
from polar_jax.serve.text import Choice, chat_prompt, logprobs_json

LOG = logging.getLogger("polar_jax.serve")
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class ClientGone(Exception):
    """The client closed its connection before its request's body arrived (not an error)."""


class Api:
    """The endpoints over one engine; `chat_template`: a Jinja template for chat requests
    (None: the tokenizer's own)."""

    def __init__(self, engine: Engine, model_name: str, metrics: Metrics, limits: Limits,
                 chat_template: str | None = None):
        self.engine, self.model_name, self.metrics = engine, model_name, metrics
        self.limits, self.chat_template = limits, chat_template
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
        too_large = f"; at most {limit} bytes (--max-body-mb {limits.max_body_mb:g})"
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
            self._parser, lambda: parse(Body(raw, self.limits, self.model_name)))

    def _submit(self, prompts: list[list[int]], n: int, stops: list[str], param: str,
                sampling: Sampling, **fields) -> list[Choice]:
        """Submits `n` engine requests per prompt, choice i = prompt i // n drawing with seed
        `seed + i`; all or none."""
        choices = []
        try:
            for index in range(len(prompts) * n):
                prompt = prompts[index // n]
                max_tokens = sampling.max_tokens or max(1, self.engine.max_len - len(prompt))
                request = Request(tuple(prompt), **(dataclasses.asdict(sampling) | fields | dict(
                    max_tokens=max_tokens, seed=(sampling.seed + index) % 2**32)))
                choices.append(Choice(index, prompt, self.engine.submit(request),
                                      self.tokenizer, stops))
        except (RequestError, EngineBusy) as err:
            for choice in choices:
                choice.stream.cancel()
            if isinstance(err, EngineBusy):
                raise ApiError(503, str(err)) from None
            where = f"prompt {index // n}: " if len(prompts) > 1 else ""
            if err.too_long:
                raise ApiError(413, where + str(err), param, "context_length_exceeded") from None
            raise ApiError(400, where + str(err), param) from None
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

    @staticmethod
    def _usage(choices: list[Choice], n: int) -> dict:
        """Each prompt counted once (its n choices share it), every choice's tokens."""
        return protocol.usage(sum(len(c.prompt) for c in choices[::n]),
                              sum(c.generated for c in choices))

    # -- endpoints ------------------------------------------------------------------------------

    async def completions(self, request: HttpRequest) -> Response:
        def parse(body: Body):
            req = body.completion(self.engine.max_queue)
            ids = [self.tokenizer(p)["input_ids"] if isinstance(p, str) else p
                   for p in req.prompts]
            echoed = [(p if isinstance(p, str) else self.tokenizer.decode(
                p, skip_special_tokens=True)) if req.echo else "" for p in req.prompts]
            return req, ids, echoed

        req, ids, echoed = await self._parsed(request, parse)
        choices = self._submit(ids, req.n, req.stops, "prompt", req.sampling,
                               logprobs=req.logprobs, echo=req.echo)
        prefix = lambda choice: echoed[choice.index // req.n]
        head = protocol.head("cmpl", self.model_name) | {"object": "text_completion"}

        def logprobs(tokens, start: int) -> dict | None:
            return None if req.logprobs is None else logprobs_json(tokens, start)

        if req.stream:
            async def events():
                for choice in choices:
                    if prefix(choice):
                        yield sse(head | {"choices": [protocol.completion_choice(
                            choice.index, prefix(choice), None, None)]})  # no logprobs here
                async for choice, finished in self._updates(choices):
                    text, tokens = choice.release()
                    if text or tokens or finished:
                        yield sse(head | {"choices": [protocol.completion_choice(
                            choice.index, text, choice.finish_reason if finished else None,
                            logprobs(tokens, len(prefix(choice))))]})

            return _event_stream(events(), head, choices, self._usage if req.include_usage
                                 else None, req.n)
        if not await self._run(request, choices):
            return Response(status_code=499)
        out = []
        for choice in choices:
            tokens = choice.tokens
            if req.echo and req.logprobs is not None:
                tokens = choice.prompt_tokens() + [dataclasses.replace(
                    t, offset=len(prefix(choice)) + t.offset) for t in tokens]
            out.append(protocol.completion_choice(choice.index, prefix(choice) + choice.text,
                                                  choice.finish_reason, logprobs(tokens, 0)))
        return JSONResponse(head | {"choices": out, "usage": self._usage(choices, req.n)})

    async def chat(self, request: HttpRequest) -> Response:
        def parse(body: Body):
            req = body.chat(self.engine.max_queue)
            return req, chat_prompt(self.tokenizer, req.messages, self.chat_template)

        req, prompt = await self._parsed(request, parse)
        choices = self._submit([prompt], req.n, req.stops, "messages", req.sampling)
        head = protocol.head("chatcmpl", self.model_name)
        if req.stream:
            head["object"] = "chat.completion.chunk"
            chunk = lambda *delta: sse(head | {"choices": [protocol.chat_delta(*delta)]})

            async def events():
                for choice in choices:
                    yield chunk(choice.index, {"role": "assistant", "content": ""})
                async for choice, finished in self._updates(choices):
                    text, _ = choice.release()
                    if text:
                        yield chunk(choice.index, {"content": text})
                    if finished:
                        yield chunk(choice.index, {}, choice.finish_reason)

            return _event_stream(events(), head, choices, self._usage if req.include_usage
                                 else None, req.n)
        if not await self._run(request, choices):
            return Response(status_code=499)
        return JSONResponse(head | {"object": "chat.completion",
                                    "usage": self._usage(choices, req.n),
                                    "choices": [protocol.chat_choice(c.index, c.text,
                                                                     c.finish_reason)
                                                for c in choices]})

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


async def _disconnected(request: HttpRequest) -> None:
    """Returns when the client has gone (the body is read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _event_stream(events: AsyncIterator[str], head: dict, choices: list[Choice],
                  usage: Callable[[list[Choice], int], dict] | None, n: int
                  ) -> StreamingResponse:
    """Server-sent `events`, then (with `usage`) the usage chunk `usage(choices, n)`, then
    `[DONE]`; afterwards (also when the client left before they began), every request of
    `choices` still running is cancelled."""

    async def ended():
        async for event in events:
            yield event
        if usage is not None:
            yield sse(head | {"choices": [], "usage": usage(choices, n)})
        yield protocol.DONE_EVENT

    def cancel() -> None:
        for choice in choices:
            choice.stream.cancel()

    return StreamingResponse(ended(), media_type="text/event-stream",
                             background=BackgroundTask(cancel))


class RequireKey:
    """ASGI middleware: every /v1/ route needs the header `Authorization: Bearer KEY` (else
    401 in OpenAI's format); /health and /metrics stay open."""

    def __init__(self, app, api_key: str):
        self.app, self._expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                reason = "a wrong API key" if given else "no API key"
                return await error_response(
                    401, f"{reason}: send the header 'Authorization: Bearer KEY' with the "
                         "server's key (--api-key or POLAR_JAX_API_KEY)",
                    code="invalid_api_key")(scope, receive, send)
        await self.app(scope, receive, send)


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


def create_app(engine: Engine, model_name: str, metrics: Metrics, limits: Limits = Limits(),
               api_key: str | None = None, chat_template: str | None = None) -> FastAPI:
    """The FastAPI application serving `engine` (started) as `model_name`; `api_key`: the key
    /v1/ routes need (None: open); `chat_template`: Jinja (None: the tokenizer's)."""
    api = Api(engine, model_name, metrics, limits, chat_template)
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

    if api_key is not None:
        app.add_middleware(RequireKey, api_key=api_key)
    app.add_middleware(Guard, metrics=metrics)  # added last: outermost, it counts the 401s
    return app
