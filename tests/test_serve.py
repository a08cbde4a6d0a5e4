"""`polar-jax serve`: one server process on the tiny-opt fixture (float32, 4 slots of 256
positions, prefill chunks of 16, a queue of 12, an API key from the environment, a chat template
file), driven through the official `openai` client and raw HTTP. Its greedy completions equal
`Decoder.generate`'s (16 requests joining and leaving a running batch), streams join to the
same text, echo's log-probabilities equal the dense model's own log-softmax, stop strings cut
at their first occurrence, n choices each equal one request with their seed, chat goes through
the template, bad requests answer 4xx in OpenAI's format and the server keeps serving, /v1/
needs the key, a full queue answers 503, a client that disconnects frees its slot, startup
progress is on stderr, and SIGTERM ends a running stream and exits 0 (the module's last test).
A second server decodes tiny-llama with trained routers as sparse `generate` does.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import os
import re
import secrets
import select
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import fixture_path, run_cli

openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parent.parent
READY = re.compile(r"serving (\S+) \((.*)\) at (http://127\.0\.0\.1:\d+)/v1: ")
ARGS = ("--dtype", "float32", "--max-slots", 4, "--max-len", 256, "--prefill-chunk", 16,
        "--kv-pages", 40, "--max-queue", 12, "--max-body-mb", 0.25, "--max-prompt-chars", 4000,
        "--max-stops", 4, "--max-stop-chars", 40, "--max-json-depth", 32, "--head-timeout", 2,
        "--body-timeout", 2, "--max-connections", 40, "--max-n", 4, "--batch-buckets", 2)
MAX_TOKENS = 12
API_KEY = secrets.token_urlsafe(16)  # the module server's (POLAR_JAX_API_KEY)
AUTH = {"Authorization": f"Bearer {API_KEY}"}
# A chat template for tiny-opt (whose tokenizer has none), and what it makes of `CHAT`.
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "The history "},
                                     {"type": "text", "text": "of"}]}]
CHAT_TEXT = "<system>Be brief.\n<user>The history of\n<assistant>"


class Server:
    """A `polar-jax serve` process on a free port, started at once (its compilation overlaps
    the caller's work); `wait()` gives its base URL once it serves; killed by `stop()`. `env`:
    more environment variables."""

    def __init__(self, tmp_path: Path, *argv, quiet: bool = True, env: dict | None = None):
        env = {**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join(
            filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
        self.out, self.err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
        with open(self.out, "w") as stdout, open(self.err, "w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "polar_jax.cli", "serve", "--port", "0",
                 *(["--quiet"] if quiet else []), *map(str, argv)], stdout=stdout,
                stderr=stderr, stdin=subprocess.DEVNULL, env=env, cwd=ROOT)
        self.base = None

    def wait(self, timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        while self.base is None:
            if ready := READY.match(self.out.read_text()):
                assert len(self.out.read_text().splitlines()) == 1
                self.base = ready.group(3)
                assert request("GET", f"{self.base}/health")[0] == 200
                break
            assert self.process.poll() is None, (f"exit {self.process.returncode}: "
                                                 f"{self.err.read_text()[-3000:]}")
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)
        return self.base

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=60)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def request(method: str, url: str, body: bytes | dict | None = None,
            headers: dict = AUTH) -> tuple[int, dict | str]:
    """(status, the JSON answer or the text) of one HTTP request (with the module server's
    key unless `headers` say otherwise)."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=120) as answer:
            status, text = answer.status, answer.read().decode()
    except urllib.error.HTTPError as err:
        status, text = err.code, err.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def metric(base: str, name: str) -> float:
    _, text = request("GET", f"{base}/metrics")
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def wait_for(condition, timeout: float = 30, what: str = "a condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def pieces(tokenizer, ids) -> list[str]:
    """Each token's text: the growth of the decoded prefix."""
    decoded = [tokenizer.decode(ids[:i], skip_special_tokens=True) for i in range(len(ids) + 1)]
    return [b[len(a):] for a, b in zip(decoded, decoded[1:])]


@pytest.fixture(scope="module")
def opt_dir() -> Path:
    return fixture_path("fixtures", "tiny-opt")


@pytest.fixture(scope="module")
def server(opt_dir, tmp_path_factory):
    """Not --quiet: its stderr has the startup progress (and the access log)."""
    tmp = tmp_path_factory.mktemp("serve")
    (tmp / "chat.jinja").write_text(TEMPLATE)
    with Server(tmp, "--model", opt_dir, *ARGS, "--chat-template", tmp / "chat.jinja",
                quiet=False, env={"POLAR_JAX_API_KEY": API_KEY}) as started:
        yield started


@pytest.fixture(scope="module")
def base(server) -> str:
    return server.wait()


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=f"{base}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def decoder(opt_dir):
    from polar_jax.decode import Decoder

    return Decoder.load(opt_dir, "float32")


@pytest.fixture(scope="module")
def reference(decoder, prompts):
    """(the prompts' token ids, their greedy `Decoder.generate` completions)."""
    ids = [decoder.tokenizer(p)["input_ids"] for p in prompts]
    return ids, decoder.generate(ids, MAX_TOKENS).completions


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    """16 prompts of 1 to 46 words (up to 4 prefill chunks) from WikiText-2."""
    words = fixture_path("data", "wikitext2_test.txt").read_text(encoding="utf-8").split()
    return [" ".join(words[40 * i:40 * i + 3 * i + 1]) for i in range(16)]


# ---------------------------------------------------------------------------------------------
# The command line.


def test_serve_help_and_defaults_are_the_engines(capsys):
    import inspect

    from polar_jax.cli import build_parser
    from polar_jax.serve.engine import Engine

    rc, out, _ = run_cli(capsys, ["serve", "--help"])
    assert rc == 0 and "OpenAI" in out and "(default: 8000)" in out
    for needle in ("--api-key", "POLAR_JAX_API_KEY", "--chat-template FILE",
                   "a model without one answers chat requests 400"):
        assert needle in " ".join(out.split()), needle
    from polar_jax.serve.protocol import Limits

    args = build_parser().parse_args(["serve", "--model", "m"])
    engine = inspect.signature(Engine).parameters
    for name in ("max_slots", "max_len", "prefill_chunk", "max_queue"):
        assert getattr(args, name) == engine[name].default, name
    for field in dataclasses.fields(Limits):
        assert getattr(args, field.name) == field.default, field.name
        assert f"--{field.name.replace('_', '-')}" in out


def test_serve_refusals_are_one_line_before_loading(capsys, monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc, out, err = run_cli(capsys, ["serve", "--model", "/nonexistent", "--port", port])
    assert rc == 2 and out == ""
    assert err.startswith(f"polar-jax: error: cannot listen on 127.0.0.1:{port}: ")
    assert err.count("\n") == 1
    rc, _, err = run_cli(capsys, ["serve", "--model", "m", "--attn-topk", "0.5"])
    assert rc == 2 and "--attn-topk=0.5 applies only with --routers" in err
    import polar_jax.serve

    rc, _, err = run_cli(capsys, ["serve", "--model", "m", "--max-body-mb", "0"])
    assert rc == 2 and "--max-body-mb: must be a finite number > 0, got 0" in err
    # The key: the flag over the environment's (each refused when not a header's characters).
    monkeypatch.setenv("POLAR_JAX_API_KEY", "a key")
    for flag in ([], ["--api-key", ""], ["--api-key", "sécret"]):
        rc, out, err = run_cli(capsys, ["serve", "--model", "/nonexistent", "--port", 0, *flag])
        assert (rc, out) == (2, "") and err == (
            "polar-jax: error: the API key (--api-key or POLAR_JAX_API_KEY) must be one or more "
            "visible ASCII characters, no spaces\n")
    monkeypatch.delenv("POLAR_JAX_API_KEY")
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda kind: (256, 256))
    rc, _, err = run_cli(capsys, ["serve", "--model", "/nonexistent", "--port", 0])
    assert rc == 2 and err == ("polar-jax: error: --max-connections 512 needs 576 open files; "
                               "this process may open 256 (ulimit -Hn): lower --max-connections\n")
    monkeypatch.undo()
    monkeypatch.setitem(sys.modules, "fastapi", None)  # the [serve] extra missing
    for name in ("server", "api", "text", "protocol"):  # the modules that import fastapi
        monkeypatch.delitem(sys.modules, f"polar_jax.serve.{name}", raising=False)
        monkeypatch.delattr(polar_jax.serve, name, raising=False)
    rc, _, err = run_cli(capsys, ["serve", "--model", "m"])
    assert rc == 2 and err == ("polar-jax: error: polar-jax serve needs fastapi: install the serve "
                               "extra: pip install 'polar-jax[serve]'\n")


def test_a_bad_chat_template_is_refused_before_loading(capsys, monkeypatch, opt_dir, tmp_path):
    from polar_jax.loading import ModelDir

    monkeypatch.setattr(ModelDir, "load", lambda *a, **k: pytest.fail("the model loaded"))
    files = {"syntax.jinja": ("{% for m in messages %}{{ m['content'] }}",
                              "does not render a one-message chat: TemplateSyntaxError: "),
             "raises.jinja": ("{{ raise_exception('system message first') }}",
                              "does not render a one-message chat: TemplateError: system "
                              "message first"),
             "blank.jinja": ("{% if false %}x{% endif %}", "renders a one-message chat as "
                                                           "empty text"),
             "empty.jinja": ("", "is empty: give a Jinja chat template"),
             "latin1.jinja": ("\xe9".encode("latin-1"), "cannot be read as UTF-8 text")}
    for name, (content, needle) in files.items():
        path = tmp_path / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        rc, out, err = run_cli(capsys, ["serve", "--model", opt_dir, "--chat-template", path])
        assert (rc, out) == (2, "") and err.count("\n") == 1, (name, err)
        assert err.startswith(f"polar-jax: error: --chat-template {path} ") and needle in err, err
    rc, _, err = run_cli(capsys, ["serve", "--model", opt_dir, "--chat-template", tmp_path])
    assert rc == 2 and f"--chat-template {tmp_path} is not a regular file" in err, err
    rc, _, err = run_cli(capsys, ["serve", "--model", opt_dir, "--chat-template", tmp_path / "no"])
    assert rc == 2 and err == f"polar-jax: error: --chat-template {tmp_path / 'no'} does not exist\n"


# ---------------------------------------------------------------------------------------------
# Completions.


def test_concurrent_greedy_requests_equal_generate(server, decoder, reference, client, prompts):
    """16 requests (text or token ids), started 30 ms apart while earlier ones decode: each
    gets generate's tokens and text. (The fixtures in this order: the reference is computed
    while the server compiles.)"""
    tokenizer = decoder.tokenizer
    ids, reference = reference
    assert len({len(i) for i in ids}) > 8 and max(map(len, ids)) > 3 * 16

    def ask(i: int):
        time.sleep(0.03 * i)
        return client.completions.create(model="tiny-opt", prompt=prompts[i] if i % 2 else ids[i],
                                         max_tokens=MAX_TOKENS, temperature=0, logprobs=1)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    for i, (answer, ref) in enumerate(zip(answers, reference)):
        (choice,) = answer.choices
        assert choice.text == ref.text, i
        assert choice.logprobs.tokens == pieces(tokenizer, ref.tokens), i
        assert choice.finish_reason == ("stop" if ref.tokens[-1] in decoder.eos_ids else "length")
        assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (len(ids[i]),
                                                                               len(ref.tokens))
        for logprob, top in zip(choice.logprobs.token_logprobs, choice.logprobs.top_logprobs):
            assert len(top) == 1 and logprob == max(top.values())  # greedy: the best token


def test_streams_join_to_the_text(client, prompts):
    kwargs = dict(model="tiny-opt", prompt=prompts[3:6], max_tokens=20, temperature=0)
    whole = client.completions.create(**kwargs)
    texts, reasons = ["", "", ""], [None, None, None]
    for chunk in client.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            assert reasons[choice.index] is None  # nothing after the final chunk
            texts[choice.index] += choice.text
            reasons[choice.index] = choice.finish_reason
    assert texts == [c.text for c in sorted(whole.choices, key=lambda c: c.index)]
    assert reasons == [c.finish_reason for c in whole.choices]


def test_echo_logprobs_are_the_dense_models(client, decoder, prompts):
    from flax import nnx

    prompt = prompts[15]
    ids = decoder.tokenizer(prompt)["input_ids"]
    answer = client.completions.create(model="tiny-opt", prompt=prompt, max_tokens=1,
                                       temperature=0, logprobs=2, echo=True)
    (choice,) = answer.choices
    assert choice.text.startswith(prompt) and len(choice.text) > len(prompt)
    model = nnx.merge(decoder.graphdef, decoder.state)
    logp = jax.nn.log_softmax(model(jnp.asarray([ids]), jnp.ones((1, len(ids)), bool))[0], -1)
    expected = np.asarray(logp)[np.arange(len(ids) - 1), ids[1:]]
    logprobs = choice.logprobs
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    np.testing.assert_allclose(logprobs.token_logprobs[1:len(ids)], expected, atol=1e-4)
    for logprob, top in zip(logprobs.token_logprobs[1:], logprobs.top_logprobs[1:]):
        assert len(top) == 2 and max(top.values()) >= logprob - 1e-6
    assert "".join(logprobs.tokens) == choice.text
    assert [choice.text[o:] for o in logprobs.text_offset[-1:]] == [logprobs.tokens[-1]]


def test_stop_strings_and_max_tokens(client, prompts):
    kwargs = dict(model="tiny-opt", prompt=prompts[7], temperature=0)
    full = client.completions.create(max_tokens=30, **kwargs).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = full.index(stop)
    answer = client.completions.create(max_tokens=30, stop=["never there", stop], **kwargs)
    assert (answer.choices[0].text, answer.choices[0].finish_reason) == (full[:cut], "stop")
    streamed = list(client.completions.create(max_tokens=30, stop=stop, stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in streamed) == full[:cut]
    assert streamed[-1].choices[0].finish_reason == "stop"
    echoed = client.completions.create(max_tokens=30, stop=stop, echo=True, logprobs=1,
                                       **kwargs).choices[0]
    assert echoed.text == prompts[7] + full[:cut] and "".join(echoed.logprobs.tokens) == echoed.text
    assert None not in echoed.logprobs.token_logprobs[1:]  # the prompt's, though cancelled
    answer = client.completions.create(max_tokens=5, **kwargs)
    assert answer.usage.completion_tokens == 5 and answer.choices[0].finish_reason == "length"


def test_n_choices_each_equal_one_request_with_their_seed(client, prompts):
    """n = 3 at temperature 1: choice i is what one request with seed + i gets; the prompt is
    counted once in the usage."""
    seed = int(np.random.default_rng().integers(2**31))
    kwargs = dict(model="tiny-opt", prompt=prompts[9], max_tokens=MAX_TOKENS, temperature=1.0,
                  logprobs=1)
    answer = client.completions.create(n=3, seed=seed, **kwargs)
    singles = [client.completions.create(seed=seed + i, **kwargs) for i in range(3)]
    assert [c.index for c in answer.choices] == [0, 1, 2]
    for choice, single in zip(answer.choices, singles):
        (one,) = single.choices
        assert (choice.text, choice.finish_reason) == (one.text, one.finish_reason)
        assert choice.logprobs.tokens == one.logprobs.tokens
        np.testing.assert_allclose(choice.logprobs.token_logprobs, one.logprobs.token_logprobs,
                                   atol=1e-5)
    assert len({c.text for c in answer.choices}) > 1  # three seeds, not one
    assert answer.usage.prompt_tokens == singles[0].usage.prompt_tokens
    assert answer.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)


def test_n_streams_interleave_their_indexes(client, decoder, prompts):
    """Two prompts x n = 2 streamed: indexes 0 to 3 (prompt i // 2), each joining to the
    non-streamed choice with the same seed; the usage chunk counts each prompt once."""
    seed = int(np.random.default_rng().integers(2**31))
    kwargs = dict(model="tiny-opt", prompt=prompts[10:12], n=2, seed=seed, max_tokens=MAX_TOKENS,
                  temperature=1.0)
    whole = client.completions.create(**kwargs)
    texts, reasons, order = [""] * 4, [None] * 4, []
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True},
                                            **kwargs))
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        order.append(choice.index)
        texts[choice.index] += choice.text
        reasons[choice.index] = choice.finish_reason
    assert texts == [c.text for c in whole.choices] and reasons == [c.finish_reason
                                                                    for c in whole.choices]
    assert set(order) == {0, 1, 2, 3} and order != sorted(order)  # interleaved
    assert chunks[-1].usage == whole.usage
    assert whole.usage.prompt_tokens == sum(len(decoder.tokenizer(p)["input_ids"])
                                            for p in prompts[10:12])


def test_chat_goes_through_the_template_file(client, decoder):
    """The chat (text parts joined) is rendered by --chat-template: its greedy answer is the
    completion of the rendered ids; n = 2 streamed carries both indexes, each with its role."""
    ids = decoder.tokenizer(CHAT_TEXT, add_special_tokens=False)["input_ids"]
    chat = client.chat.completions.create(model="tiny-opt", messages=CHAT, max_tokens=MAX_TOKENS,
                                          temperature=0)
    completion = client.completions.create(model="tiny-opt", prompt=ids, max_tokens=MAX_TOKENS,
                                           temperature=0)
    assert chat.choices[0].message.content == completion.choices[0].text
    assert chat.usage == completion.usage and chat.usage.prompt_tokens == len(ids)
    kwargs = dict(model="tiny-opt", messages=CHAT, max_tokens=MAX_TOKENS, n=2, temperature=1.0,
                  seed=int(np.random.default_rng().integers(2**31)))
    whole = client.chat.completions.create(**kwargs)
    texts, roles = ["", ""], [None, None]
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        (choice,) = chunk.choices
        texts[choice.index] += choice.delta.content or ""
        roles[choice.index] = roles[choice.index] or choice.delta.role
    assert texts == [c.message.content for c in whole.choices] and roles == ["assistant"] * 2


def test_chat_without_a_template_answers_400():
    """A tokenizer without a template and no --chat-template: 400 (the in-process app)."""
    app, _ = _stub_app(lambda text: pytest.fail("tokenized"), None)
    status, answer = asyncio.run(_call(app, "POST", "/v1/chat/completions",
                                       {"messages": [{"role": "user", "content": "Hi"}]}))
    assert status == 400 and answer["error"]["message"].startswith(
        "this model has no chat template (none in its tokenizer_config.json, and the server was "
        "started without --chat-template)")


def test_chat_prompt_applies_the_template(opt_dir):
    from polar_jax.loading import load_tokenizer
    from polar_jax.serve.protocol import ApiError, Body, Limits
    from polar_jax.serve.text import chat_prompt

    def messages(value, max_chars: int = 4000) -> list[dict]:
        body = json.dumps({"messages": value}).encode()
        return Body(body, Limits(max_prompt_chars=max_chars), "m").messages()

    tokenizer = load_tokenizer(opt_dir)
    expected = tokenizer(CHAT_TEXT, add_special_tokens=False)["input_ids"]
    assert chat_prompt(tokenizer, messages(CHAT), TEMPLATE) == expected
    tokenizer.chat_template = TEMPLATE  # the tokenizer's own, when none is given
    assert chat_prompt(tokenizer, messages(CHAT)) == expected
    for bad in ([], [{"content": "no role"}], [{"role": "user", "content": 3}],
                [{"role": "user", "content": [{"type": "text", "text": 5}]}],
                [{"role": "user", "content": "a lone \ud800"}]):
        with pytest.raises(ApiError, match="messages") as caught:
            messages(bad)
        assert caught.value.status == 400 and "\n" not in str(caught.value)
    assert messages(CHAT, max_chars=33) == messages(CHAT)
    with pytest.raises(ApiError, match=r"the messages have 33 characters; at most 32 "
                                       r"\(--max-prompt-chars\)") as caught:
        messages(CHAT, max_chars=32)  # roles and contents
    assert caught.value.status == 413
    with pytest.raises(ApiError, match="roles must alternate"):
        chat_prompt(tokenizer, messages(CHAT), "{{ raise_exception('roles must alternate') }}")


# ---------------------------------------------------------------------------------------------
# Refusals, the queue, disconnects, metrics.


BAD_REQUESTS = [
    (b'{"prompt": "x", ', 400, "not valid JSON"),
    (b'["prompt"]', 400, "must be a JSON object"),
    ({"prompt": 3}, 400, "prompt must be a string"),
    ({"prompt": [1, "a"]}, 400, "prompt must be a string"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens must be an integer >= 1"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature must be a finite number"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p must be"),
    ({"prompt": "x", "logprobs": 6}, 400, "logprobs must be an integer in [0, 5]"),
    ({"prompt": "x", "echo": "yes"}, 400, "echo must be true or false"),
    ({"prompt": "x", "n": 5}, 400, "n must be an integer in [1, 4] (--max-n), got 5"),
    ({"prompt": "x", "n": 0}, 400, "n must be an integer in [1, 4]"),
    ({"prompt": ["x"] * 4, "n": 4}, 400, "4 prompts x n 4 = 16 choices; this server queues at "
                                         "most 12 (--max-queue)"),
    ({"prompt": "x", "stop": [""]}, 400, "stop must be"),
    ({"prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty is not supported"),
    ({"prompt": [5, 99999]}, 400, "token id 99999 is outside the vocabulary"),
    ({"prompt": ""}, 400, "the prompt is empty"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "'gpt-4' does not exist"),
    ({"prompt": [5] * 256}, 413, "the prompt has 256 tokens"),
    # The limits (ARGS), each checked before any work.
    (b"[" * 100_000, 400, "nests arrays and objects deeper than the JSON parser goes; at most "
                          "32 (--max-json-depth)"),
    (b'{"prompt": "x", "stop": ' + b"[" * 33 + b"]" * 33 + b"}", 400,
     "nests arrays and objects 34 deep; at most 32 (--max-json-depth)"),
    (b'{"prompt": "x", "stop": [[[' + b'"a", ' * 10 + b'"b"]]]}', 400, "stop must be"),
    (b'{"prompt": "ab\\ud800"}', 400, "prompt holds a lone surrogate ('\\ud800' at character 2)"),
    (b'{"prompt": ["x", "\\udfff"]}', 400, "prompt 1 holds a lone surrogate"),
    ({"prompt": "x", "stop": ["\ud800"]}, 400, "stop holds a lone surrogate"),
    ({"prompt": "x", "n": True}, 400, "n must be an integer in [1, 4] (--max-n), got True"),
    ({"prompt": ["x"] * 13}, 400, "prompt holds 13 prompts; this server queues at most 12 "
                                  "(--max-queue)"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop holds 5 strings; at most 4 "
                                                              "(--max-stops)"),
    ({"prompt": "x", "stop": "s" * 41}, 400, "a stop string has 41 characters; at most 40 "
                                             "(--max-stop-chars)"),
    ({"prompt": ["The"] * 3 + ["x" * 3998]}, 413, "the prompt has 4007 characters; at most 4000 "
                                                  "(--max-prompt-chars)"),
    (b'{"prompt": "' + b"x" * 300_000 + b'"}', 413, "the request body has 300014 bytes; at most "
                                                     "262144 bytes (--max-body-mb 0.25)"),
]


@pytest.mark.parametrize("body, status, needle", BAD_REQUESTS,
                         ids=[needle[:50] for _, _, needle in BAD_REQUESTS])
def test_bad_requests_answer_4xx_and_the_server_keeps_serving(base, body, status, needle):
    got, answer = request("POST", f"{base}/v1/completions", body)
    assert got == status, answer
    error = answer["error"]
    assert needle in error["message"] and "\n" not in error["message"]
    assert error["type"] == "invalid_request_error" and set(error) == {"message", "type", "param",
                                                                      "code"}
    got, answer = request("POST", f"{base}/v1/completions", {"prompt": "The", "max_tokens": 2})
    assert got == 200 and answer["usage"]["completion_tokens"] == 2


def test_unknown_routes_answer_in_openais_format(base):
    status, answer = request("GET", f"{base}/v1/nothing")
    assert status == 404 and "Not Found" in answer["error"]["message"]
    status, answer = request("GET", f"{base}/v1/completions")
    assert status == 405 and answer["error"]["type"] == "invalid_request_error"


def test_v1_routes_need_the_api_key(base):
    """Without the key or with a wrong one: 401 in OpenAI's format (also for an unknown /v1/
    route), counted; /health and /metrics stay open."""
    refused = 'polar_jax_requests_total{code="401",endpoint="/v1/completions"}'
    before = metric(base, refused)
    body = {"prompt": "The", "max_tokens": 2}
    for headers, reason in (({}, "no API key"), ({"Authorization": "Bearer " + API_KEY[:-1]},
                                                 "a wrong API key"),
                            ({"Authorization": API_KEY}, "a wrong API key")):
        for method, path in (("POST", "/v1/completions"), ("GET", "/v1/models"),
                             ("GET", "/v1/nothing")):
            status, answer = request(method, base + path, body if method == "POST" else None,
                                     headers)
            assert status == 401, (headers, path, answer)
            assert answer["error"]["message"].startswith(reason + ": send the header")
            assert answer["error"]["code"] == "invalid_api_key"
    assert metric(base, refused) == before + 3
    status, answer = request("POST", f"{base}/v1/completions", body)
    assert status == 200 and answer["usage"]["completion_tokens"] == 2
    for path in ("/health", "/metrics"):
        assert request("GET", base + path, headers={})[0] == 200


def test_startup_progress_on_stderr(server, base, decoder):
    """Loading (with the weights' size), each program compiled with its time, in order."""
    weights = sum(x.nbytes for x in jax.tree.leaves(decoder.state))
    progress = [line.removeprefix("polar-jax serve: ") for line in
                server.err.read_text().splitlines() if line.startswith("polar-jax serve: ")]
    assert progress[:3] == ["loading tiny-opt ...", progress[1], "compiling the programs ..."]
    assert re.fullmatch(rf"loaded in \d+\.\d s \({weights / 2**20:.1f} MiB of weights\)",
                        progress[1]), progress[1]
    compiled = [re.fullmatch(r"compiled (.+) \((\d) of 5\) in \d+\.\d s", line)
                for line in progress[3:]]
    assert all(compiled) and len(compiled) == 5, progress
    assert [(m.group(1), int(m.group(2))) for m in compiled] == [
        ("prefill", 1), ("prefill with echo", 2), ("decode step (batch 2)", 3),
        ("decode step (batch 4)", 4), ("slot edit", 5)]  # --batch-buckets 2; a CPU


def test_full_queue_answers_503_and_disconnects_free_slots(base, client):
    """4 long streams fill the slots and 12 the queue: one more is refused (503). Closing a
    running stream admits the first queued one (before any stream could have ended on its
    own); closing them all cancels every request."""
    def finished(reason: str) -> float:
        return metric(base, f'polar_jax_completions_finished_total{{reason="{reason}"}}')

    def health() -> dict:
        return request("GET", f"{base}/health")[1]

    def open_stream():
        return client.completions.create(model="tiny-opt", prompt="The", stream=True,
                                         max_tokens=250, temperature=0)

    cancelled, lengths = finished("cancelled"), finished("length")
    streams = []
    try:
        for _ in range(4):
            streams.append(open_stream())
            next(iter(streams[-1]))
        streams += [open_stream() for _ in range(12)]
        wait_for(lambda: health()["queue_length"] == 12, what="a full queue")
        with pytest.raises(openai.APIStatusError) as busy:
            client.completions.create(model="tiny-opt", prompt="The", max_tokens=1)
        assert busy.value.status_code == 503 and "queue is full" in busy.value.message
        streams[0].close()
        wait_for(lambda: health()["queue_length"] == 11, what="the freed slot")
        assert finished("length") == lengths  # no stream ended on its own
        assert next(iter(streams[4])).choices[0].text is not None
    finally:
        for stream in streams:
            stream.close()
    wait_for(lambda: health() == {"status": "ok", "active_slots": 0, "queue_length": 0},
             what="every slot free")
    assert finished("cancelled") - cancelled + finished("length") - lengths == 16
    answer = client.completions.create(model="tiny-opt", prompt="The", max_tokens=3)
    assert answer.usage.completion_tokens == 3


def test_models_health_and_metrics(base, client):
    (model,) = client.models.list().data
    assert (model.id, model.max_model_len) == ("tiny-opt", 256)
    status, text = request("GET", f"{base}/metrics")
    assert status == 200 and "# TYPE polar_jax_num_requests_running gauge" in text
    for name in ("polar_jax_prompt_tokens_total", "polar_jax_generated_tokens_total",
                 "polar_jax_step_seconds_count", "polar_jax_time_to_first_token_seconds_count",
                 "polar_jax_time_per_output_token_seconds_count"):
        assert metric(base, name) > 0, name
    assert metric(base, "polar_jax_num_requests_running") == 0
    assert metric(base, "polar_jax_num_requests_waiting") == 0
    assert metric(base, "polar_jax_kv_pages_used") == 0 < metric(base, "polar_jax_kv_pages_total")
    assert metric(base, "polar_jax_num_preemptions_total") == 0
    assert metric(base, 'polar_jax_requests_total{code="200",endpoint="/v1/completions"}') >= 16
    assert (metric(base, 'polar_jax_requests_total{code="413",endpoint="/v1/completions"}')
            == sum(status == 413 for _, status, _ in BAD_REQUESTS))
    assert request("GET", f"{base}/health")[1]["status"] == "ok"


def test_a_tiny_top_p_keeps_the_most_probable_token(client, prompts):
    """top_p below float32's normal range (1e-38 flushes to 0) samples the greedy tokens."""
    kwargs = dict(model="tiny-opt", prompt=prompts[5], max_tokens=8)
    greedy = client.completions.create(temperature=0, **kwargs).choices[0].text
    for top_p in (1e-38, 1e-45):
        answer = client.completions.create(temperature=1, top_p=top_p, **kwargs)
        assert answer.choices[0].text == greedy


def _connect(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def _answer(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """(what the server sent within `timeout` seconds, whether it closed the connection)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        return data, False
    return data, True


def test_slow_clients_are_timed_out_and_connections_capped(base):
    """45 connections that never finish their request head: past --max-connections (40) each
    is answered 503 and closed at once; the others 408 and closed after --head-timeout (2 s);
    then the server serves again."""
    sockets = []
    try:
        for _ in range(45):
            sockets.append(_connect(base))
            sockets[-1].sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        start = time.monotonic()
        answered, _, _ = select.select(sockets, [], [], 1.5)
        assert answered and time.monotonic() - start < 1.5  # a refusal, before the head timeout
        answers = [_answer(sock, 5) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
    assert all(closed for _, closed in answers)
    refused = [data for data, _ in answers if data.startswith(b"HTTP/1.1 503 ")]
    timed_out = [data for data, _ in answers if data.startswith(b"HTTP/1.1 408 ")]
    assert len(refused) >= 5 and len(timed_out) + len(refused) == 45
    assert all(b"(--max-connections)" in data for data in refused)
    assert all(b"no request head within 2 s (--head-timeout)" in data for data in timed_out)
    assert time.monotonic() - start < 6
    assert request("GET", f"{base}/health")[0] == 200


def test_slow_bodies_get_408_and_clients_gone_mid_body_log_nothing(base, server):
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n")
    with _connect(base) as sock:
        sock.sendall(head + b'{"prompt": ')
        data, _ = _answer(sock, 6)
    assert data.startswith(b"HTTP/1.1 408 ") and b"within 2 s (--body-timeout)" in data
    gone = 'polar_jax_requests_total{code="499",endpoint="/v1/completions"}'
    before = metric(base, gone)
    for _ in range(3):
        with _connect(base) as sock:
            sock.sendall(head + b'{"prompt": ')
            time.sleep(0.3)  # its handler waits for the rest of the body
    wait_for(lambda: metric(base, gone) == before + 3, what="three requests counted as 499")
    log = server.err.read_text()
    assert "Traceback" not in log and "ClientDisconnect" not in log, log[-3000:]
    assert request("GET", f"{base}/health")[0] == 200


async def _call(app, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    """(status, JSON answer) of one request to the ASGI `app`, in-process."""
    data = b"" if body is None else json.dumps(body).encode()
    pending = [{"type": "http.request", "body": data, "more_body": False}]
    sent = []

    async def receive():
        if pending:
            return pending.pop()
        await asyncio.Event().wait()  # the client stays

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "server": ("stub", 80), "client": ("127.0.0.1", 1),
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", str(len(data)).encode())]}
    await app(scope, receive, send)
    return sent[0]["status"], json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


def _stub_app(tokenizer, submit):
    """The application over a stand-in engine (no model, nothing compiled)."""
    from polar_jax.serve.metrics import Metrics
    from polar_jax.serve.api import create_app

    engine = types.SimpleNamespace(decoder=types.SimpleNamespace(tokenizer=tokenizer), max_len=64,
                                   max_queue=4, active_slots=0, queue_length=0, submit=submit)
    metrics = Metrics()
    return create_app(engine, "stub", metrics), metrics


def test_parsing_leaves_the_event_loop_free():
    """/health answers at once while a request's prompt takes a second to tokenize."""
    from polar_jax.serve.engine import EngineBusy

    started = []

    def slow(text):
        started.append(time.perf_counter())
        time.sleep(1.0)
        return {"input_ids": [1, 2]}

    def busy(request):
        raise EngineBusy("the queue is full (stand-in)")

    app, _ = _stub_app(slow, busy)

    async def scenario():
        post = asyncio.create_task(_call(app, "POST", "/v1/completions", {"prompt": "x"}))
        while not started:
            await asyncio.sleep(0.005)
        health, _ = await _call(app, "GET", "/health")
        waited = time.perf_counter() - started[0]  # /health asked while tokenizing
        return health, waited, (await post)[0]

    health, waited, posted = asyncio.run(scenario())
    assert (health, posted) == (200, 503) and waited < 0.3, waited


def test_an_exception_is_a_counted_500_and_one_log_line(caplog):
    def broken(text):
        raise RuntimeError("the tokenizer broke\non two lines")

    app, metrics = _stub_app(broken, None)
    with caplog.at_level(logging.ERROR, logger="polar_jax.serve"):
        status, answer = asyncio.run(_call(app, "POST", "/v1/completions", {"prompt": "x"}))
    assert status == 500
    assert answer["error"] == {
        "message": "internal error: RuntimeError: the tokenizer broke on two lines",
        "type": "server_error", "param": None, "code": None}
    assert metrics.registry.get_sample_value(
        "polar_jax_requests_total", {"endpoint": "/v1/completions", "code": "500"}) == 1
    (record,) = [r for r in caplog.records if r.name == "polar_jax.serve"]
    assert record.getMessage() == ("POST /v1/completions: 500 internal error: RuntimeError: the "
                                   "tokenizer broke on two lines") and not record.exc_info


def test_serve_modules_import_one_way():
    """server -> api -> protocol and text -> engine -> runner -> scheduler -> kv_pages: each
    serve module imports only those below it, none is over 400 lines, and the scheduler and
    the page pool import no JAX (unit-tested without a model)."""
    import ast

    from test_imports import project_imports

    below = {"server": {"api", "protocol", "engine", "metrics"},
             "api": {"protocol", "text", "engine", "request", "metrics"},
             "text": {"protocol", "request"}, "protocol": {"request"},
             "engine": {"runner", "scheduler", "request", "kv_pages"},
             "runner": {"scheduler", "request", "kv_pages"}, "scheduler": {"kv_pages"},
             "request": set(), "kv_pages": set(), "metrics": set()}
    assert set(below) | {"__init__"} == {p.stem for p in (ROOT / "polar_jax" / "serve").glob("*.py")}
    for name, allowed in below.items():
        source = (ROOT / "polar_jax" / "serve" / f"{name}.py").read_text()
        imported = {m.removeprefix("polar_jax.serve.") for m in
                    project_imports(source, "polar_jax.serve") if m.startswith("polar_jax.serve.")}
        assert imported <= allowed, (name, imported - allowed)
        assert len(source.splitlines()) <= 400, name
        if name in ("scheduler", "kv_pages", "request"):
            modules = {alias.name for node in ast.walk(ast.parse(source))
                       if isinstance(node, (ast.Import, ast.ImportFrom))
                       for alias in (node.names if isinstance(node, ast.Import)
                                     else [ast.alias(node.module or "")])}
            assert not {m for m in modules if m.split(".")[0] in ("jax", "flax")}, name


def test_a_port_is_bound_once():
    """Two servers starting at the same moment: the second bind fails (both bound before
    either listened used to share the port, and uvloop ignored the loser's listen)."""
    from polar_jax.errors import PolarJaxError
    from polar_jax.serve.server import _bind

    first = _bind("127.0.0.1", 0)
    try:
        port = first.getsockname()[1]
        with pytest.raises(PolarJaxError) as caught:
            _bind("127.0.0.1", port).close()
        assert str(caught.value) == f"cannot listen on 127.0.0.1:{port}: Address already in use"
    finally:
        first.close()


# ---------------------------------------------------------------------------------------------
# Sparse decoding.


@pytest.mark.routers("tiny-llama")
def test_sparse_server_equals_sparse_generate(trained_routers, tmp_path, prompts):
    from polar_jax.decode import Decoder

    model = fixture_path("fixtures", "tiny-llama")
    _, routers = trained_routers("tiny-llama")
    with Server(tmp_path, "--model", model, "--routers", routers, "--dtype", "float32",
                "--max-slots", 4, "--max-len", 128, "--prefill-chunk", 16,
                "--served-model-name", "llama") as server:
        decoder = Decoder.load(model, "float32", routers=routers)
        ids = [decoder.tokenizer(p)["input_ids"] for p in prompts[2:14:3]]
        reference = decoder.generate(ids, MAX_TOKENS).completions
        sparse = openai.OpenAI(base_url=f"{server.wait()}/v1", api_key="unused", max_retries=0,
                               timeout=120)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda p: sparse.completions.create(
                model="llama", prompt=p, max_tokens=MAX_TOKENS, temperature=0), ids))
    assert "polar-jax serve:" not in server.err.read_text()  # --quiet: no startup progress
    assert [a.choices[0].text for a in answers] == [r.text for r in reference]
    assert [a.usage.completion_tokens for a in answers] == [len(r.tokens) for r in reference]


# ---------------------------------------------------------------------------------------------
# Last: SIGTERM ends the module's server.


def test_lm_evaluation_harness_local_completions(base, decoder, opt_dir, tmp_path):
    """lm-evaluation-harness's `local-completions` model against the server, on a two-choice
    task built from the fixture text (which of two 4-word continuations follows an 8-word
    context): its accuracy equals the one the model's own log-likelihoods give."""
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed "
                                          "(pip install lm-eval)")
    from flax import nnx

    rng = np.random.default_rng()
    lines = [line.split() for line in
             fixture_path("data", "wikitext2_test.txt").read_text(encoding="utf-8").splitlines()
             if len(line.split()) >= 16 and "@" not in line][:40]
    docs = []
    for i in rng.choice(len(lines), 12, replace=False):
        other = lines[(i + 7) % len(lines)]
        right, wrong = " " + " ".join(lines[i][8:12]), " " + " ".join(other[8:12])
        label = int(rng.integers(2))
        docs.append({"context": " ".join(lines[i][:8]), "label": label,
                     "choices": [right, wrong] if label == 0 else [wrong, right]})
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "fixture_mc.yaml").write_text(
        "task: fixture_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'docs.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{label}}'\n"
        "target_delimiter: ''\nmetric_list:\n  - metric: acc\n")
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "OPENAI_API_KEY": API_KEY}  # what local-completions sends as its bearer token
    run = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
         f"model=tiny-opt,base_url={base}/v1/completions,tokenizer={opt_dir},"
         "tokenized_requests=False,max_retries=1", "--tasks", "fixture_mc", "--include_path",
         str(tmp_path), "--output_path", str(tmp_path / "out")],
        env=env, cwd=tmp_path, timeout=300, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    (results,) = (tmp_path / "out").rglob("results_*.json")
    accuracy = json.loads(results.read_text())["results"]["fixture_mc"]["acc,none"]
    model = nnx.merge(decoder.graphdef, decoder.state)

    def loglikelihood(context: str, continuation: str) -> float:
        ids = decoder.tokenizer(context + continuation)["input_ids"]
        start = len(decoder.tokenizer(context)["input_ids"])
        logp = np.asarray(jax.nn.log_softmax(model(jnp.asarray([ids]),
                                                   jnp.ones((1, len(ids)), bool))[0], -1))
        return float(logp[np.arange(start - 1, len(ids) - 1), ids[start:]].sum())

    correct = [int(np.argmax([loglikelihood(d["context"], c) for c in d["choices"]])) == d["label"]
               for d in docs]
    assert accuracy == pytest.approx(np.mean(correct))


def test_sigterm_ends_streams_and_exits_0(server, client):
    process = server.process
    stream = client.completions.create(model="tiny-opt", prompt="The", stream=True,
                                       max_tokens=250, temperature=0)
    chunks = iter(stream)
    next(chunks)
    process.send_signal(signal.SIGTERM)
    rest = list(chunks)
    assert rest and rest[-1].choices[0].finish_reason == "abort"
    assert process.wait(timeout=60) == 0
