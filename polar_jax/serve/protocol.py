"""OpenAI's wire format: a request body parsed and checked into a typed request
(`CompletionRequest`, `ChatRequest`; a bad field answers 400 naming it, as an `ApiError`), the
bounds on what one request may hold (`Limits`), and the JSON of the answers (errors, choices,
usage, server-sent events).
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
import uuid
from typing import Any, Callable

from fastapi.responses import JSONResponse

from polar_jax import settings, validate
from polar_jax.errors import PolarJaxError
from polar_jax.serve.request import Request

MAX_JSON_DEPTH = 500  # below where Python's JSON parser raises RecursionError (about 1,000)
# Fields of OpenAI's requests served only at their default (null is always accepted).
UNSUPPORTED = {"best_of": 1, "frequency_penalty": 0, "presence_penalty": 0, "logit_bias": None,
               "suffix": None, "tools": None, "functions": None}
DONE_EVENT = "data: [DONE]\n\n"


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may hold and how long its client may take (the serve flags of the same
    names). Choices per request (prompts times n) are bounded by the engine's queue
    (--max-queue) and prompt tokens by its context (--max-len)."""

    max_body_mb: float = 16.0  # the request body (413)
    max_prompt_chars: int = 1_000_000  # the characters of a request's prompts or messages (413)
    max_stops: int = 16  # stop strings per request (400)
    max_stop_chars: int = 1000  # characters per stop string (400)
    max_n: int = 16  # choices per prompt, `n` (400)
    max_json_depth: int = 64  # arrays and objects nested in the body (400)
    head_timeout: float = 10.0  # seconds from a connection (or its last answer) to a request head
    body_timeout: float = 60.0  # seconds to receive a request's body (408)
    max_connections: int = 512  # open at once; more are answered 503 and closed

    def check(self) -> "Limits":
        """These limits, refused in one line naming the flag when out of range."""
        flag = lambda name: f"--{name.replace('_', '-')}"
        for name in ("max_prompt_chars", "max_stops", "max_stop_chars", "max_n",
                     "max_connections"):
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


def is_ids(value) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(isinstance(t, int) and not isinstance(t, bool) for t in value))


@dataclasses.dataclass(frozen=True)
class Sampling:
    """A request's engine fields (`engine.Request`'s): `max_tokens` None is the rest of the
    context; choice i of a request draws with `seed + i`."""

    max_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int


@dataclasses.dataclass(frozen=True)
class CompletionRequest:
    """/v1/completions: `prompts`, each a string or token ids; `n` choices per prompt."""

    prompts: list[str | list[int]]
    n: int
    sampling: Sampling
    stops: list[str]
    logprobs: int | None  # alternatives per token; None: no logprobs object
    echo: bool
    stream: bool
    include_usage: bool


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    """/v1/chat/completions: `messages` as {"role", "content"} strings; `n` choices."""

    messages: list[dict[str, str]]
    n: int
    sampling: Sampling
    stops: list[str]
    stream: bool
    include_usage: bool


class Body:
    """A request's JSON object for the model `model_name`, its fields each checked (a bad one:
    400 naming it; another model: 404)."""

    def __init__(self, raw: bytes, limits: Limits, model_name: str):
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
        model = self.get("model", validate.string)
        if model is not None and model != model_name:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves "
                                f"{model_name!r}", "model", "model_not_found")

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

    def n(self, prompts: int, max_queue: int) -> int:
        """Choices per prompt (1 to --max-n), all `prompts` x n of them queued at once."""
        value = self.data.get("n")
        limit = self.limits.max_n
        if value is not None and (type(value) is not int or not 1 <= value <= limit):
            raise ApiError(400, f"n must be an integer in [1, {limit}] (--max-n), got "
                                f"{validate.describe(value)}", "n")
        n = value or 1
        if prompts * n > max_queue:
            asked = f"{prompts} prompts x n {n} = {prompts * n}" if prompts > 1 else f"n {n}"
            raise ApiError(400, f"{asked} choices; this server queues at most {max_queue} "
                                "(--max-queue): ask for fewer", "n")
        return n

    def sampling(self, max_tokens: int | None) -> Sampling:
        """Temperature 1 and a random seed by default, as OpenAI's."""
        return Sampling(max_tokens, temperature=self.get("temperature", settings.check, 1.0),
                        top_p=self.get("top_p", settings.check, 1.0),
                        top_k=self.get("top_k", settings.check, 0),
                        seed=self.get("seed", settings.check, secrets.randbits(32)))

    def include_usage(self) -> bool:
        options = self.get("stream_options", validate.mapping, {})
        try:
            return validate.boolean("stream_options.include_usage",
                                    options.get("include_usage", False))
        except PolarJaxError as err:
            raise ApiError(400, str(err), "stream_options") from None

    def prompts(self, max_queue: int) -> list[str | list[int]]:
        """A string, a list of strings, a list of ids or a list of such lists: at most
        --max-queue prompts (all are queued at once) of --max-prompt-chars characters in all."""
        prompt = self.data.get("prompt")
        items = [prompt] if isinstance(prompt, str) or is_ids(prompt) else prompt
        if not isinstance(items, list) or not items or not all(
                isinstance(p, str) or is_ids(p) for p in items):
            raise ApiError(400, "prompt must be a string, a list of strings, a list of token ids "
                                f"or a list of such lists, got {validate.describe(prompt)}",
                           "prompt")
        if len(items) > max_queue:
            raise ApiError(400, f"prompt holds {len(items)} prompts; this server queues at most "
                                f"{max_queue} (--max-queue): send fewer per request", "prompt")
        chars = sum(len(p) for p in items if isinstance(p, str))
        if chars > self.limits.max_prompt_chars:
            raise ApiError(413, f"the prompt has {chars} characters; at most "
                                f"{self.limits.max_prompt_chars} (--max-prompt-chars)", "prompt",
                           "context_length_exceeded")
        return [unicode_text("prompt" if len(items) == 1 else f"prompt {i}", p, "prompt")
                if isinstance(p, str) else p for i, p in enumerate(items)]

    def messages(self) -> list[dict[str, str]]:
        """OpenAI's chat messages as {"role", "content"} strings (content: a string or text
        parts), at most --max-prompt-chars characters in all."""
        messages = self.data.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, f"messages must be a non-empty list, got "
                                f"{validate.describe(messages)}", "messages")
        conversation = []
        for i, message in enumerate(messages):
            role, content = (message.get("role"), message.get("content")) \
                if isinstance(message, dict) else (None, None)
            if isinstance(content, list):
                parts = [p.get("text") if isinstance(p, dict) and p.get("type") == "text"
                         else None for p in content]
                content = "".join(parts) if all(isinstance(p, str) for p in parts) else None
            if not isinstance(role, str) or not isinstance(content, str):
                raise ApiError(400, f"messages[{i}] must be an object with a string role and a "
                                    f"string content (or text parts), got "
                                    f"{validate.describe(message)}", "messages")
            conversation.append({"role": unicode_text(f"messages[{i}].role", role, "messages"),
                                 "content": unicode_text(f"messages[{i}].content", content,
                                                         "messages")})
        chars = sum(len(m["role"]) + len(m["content"]) for m in conversation)
        if chars > self.limits.max_prompt_chars:
            raise ApiError(413, f"the messages have {chars} characters; at most "
                                f"{self.limits.max_prompt_chars} (--max-prompt-chars)",
                           "messages", "context_length_exceeded")
        return conversation

    def completion(self, max_queue: int) -> CompletionRequest:
        prompts = self.prompts(max_queue)
        logprobs = self.get("logprobs", validate.integer, None, low=0, high=5)
        echo = self.get("echo", validate.boolean, False)
        stream = self.get("stream", validate.boolean, False)
        if stream and echo and logprobs is not None:
            raise ApiError(400, "echo with logprobs cannot be streamed (the prompt's "
                                "log-probabilities come at the end): set stream false", "stream")
        max_tokens = self.get("max_tokens", validate.integer, Request.max_tokens, low=1)
        return CompletionRequest(prompts, self.n(len(prompts), max_queue),
                                 self.sampling(max_tokens), self.stops(), logprobs, echo, stream,
                                 self.include_usage())

    def chat(self, max_queue: int) -> ChatRequest:
        if self.data.get("logprobs") not in (None, False):
            raise ApiError(400, "logprobs are not supported for chat completions (use "
                                "/v1/completions)", "logprobs")
        messages = self.messages()
        stream = self.get("stream", validate.boolean, False)
        max_tokens = self.get("max_completion_tokens", validate.integer, None, low=1)
        max_tokens = self.get("max_tokens", validate.integer, max_tokens, low=1)
        return ChatRequest(messages, self.n(1, max_queue), self.sampling(max_tokens),
                           self.stops(), stream, self.include_usage())


# -- answers -------------------------------------------------------------------------------------


def head(kind: str, model_name: str) -> dict:
    """The fields every answer and chunk of one request share; `kind`: "cmpl" or "chatcmpl"."""
    return {"id": f"{kind}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}


def completion_choice(index: int, text: str, finish_reason: str | None,
                      logprobs: dict | None) -> dict:
    return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}


def chat_choice(index: int, content: str, finish_reason: str | None) -> dict:
    return {"index": index, "logprobs": None, "finish_reason": finish_reason,
            "message": {"role": "assistant", "content": content}}


def chat_delta(index: int, delta: dict, finish_reason: str | None = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(payload: dict) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(payload)}\n\n"
