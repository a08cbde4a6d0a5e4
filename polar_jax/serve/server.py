"""The server process: binds the port before anything loads, loads the model and compiles the
engine with progress on stderr, then serves `api.create_app` with uvicorn until SIGTERM or
SIGINT (the engine stops admitting, 503; in-flight requests end with finish_reason "abort";
uvicorn finishes its responses and the process exits 0).

A connection must send its request head within --head-timeout (408); connections past
--max-connections are answered 503 and closed at once, before the process meets its file limit
(`_Connection`, uvicorn's protocol).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import resource
import signal
import socket
import sys
import threading
import time
from typing import Callable

import jax
import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from polar_jax.decode import Decoder
from polar_jax.errors import PolarJaxError
from polar_jax.memory import GiB
from polar_jax.serve.api import LOG, create_app
from polar_jax.serve.engine import Engine
from polar_jax.serve.metrics import Metrics
from polar_jax.serve.protocol import Limits, error_response

GRACEFUL_SHUTDOWN_S = 30
FILES_RESERVED = 64  # open files the process keeps beside its connections (model, logs, pipes)



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


def check_api_key(key: str) -> str:
    """`key` (never echoed): visible ASCII, as an HTTP header carries it."""
    if not key or not all("!" <= c <= "~" for c in key):
        raise PolarJaxError("the API key (--api-key or POLAR_JAX_API_KEY) must be one or more "
                            "visible ASCII characters, no spaces")
    return key


def _progress(text: str) -> None:
    print(f"polar-jax serve: {text}", file=sys.stderr, flush=True)


def serve(load: Callable[[], Decoder], *, host: str, port: int, model_name: str, mode: str,
          engine_options: dict, limits: Limits = Limits(), access_log: bool = True,
          api_key: str | None = None, chat_template: str | None = None,
          progress: bool = True) -> None:
    """Binds host:port (first: a taken port fails before the model loads), loads the decoder
    (`load()`), plans its memory and compiles the engine (`Engine(decoder, **engine_options)`),
    each step on stderr with `progress`, prints one line once serving and serves until SIGTERM
    or SIGINT (then returns after the graceful shutdown; SIGINT raises KeyboardInterrupt).
    `api_key`: what /v1/ routes need (None: open); `chat_template`: Jinja (None: the
    tokenizer's own)."""
    limits.check()
    if api_key is not None:
        check_api_key(api_key)
    say = _progress if progress else lambda text: None
    _reserve_files(limits.max_connections)
    sock = _bind(host, port)
    try:
        metrics = Metrics()
        say(f"loading {model_name} ...")
        start = time.perf_counter()
        decoder = load()
        weights = sum(x.nbytes for x in jax.tree.leaves((decoder.state, decoder.router_state)))
        size = f"{weights / GiB:.2f} GiB" if weights >= GiB else f"{weights / 2**20:.1f} MiB"
        say(f"loaded in {time.perf_counter() - start:.1f} s ({size} of weights)")
        engine = Engine(decoder, observer=metrics, **engine_options)
        say("compiling the programs ...")
        start = time.perf_counter()
        engine.start(progress=lambda text: say(f"compiled {text}"))
        address = sock.getsockname()
        where = f"[{address[0]}]" if ":" in address[0] else address[0]
        if decoder.router_weights == "int8":
            mode += ", int8 MLP router"
        ready = (f"serving {model_name} ({mode}) at http://{where}:{address[1]}/v1: "
                 f"up to {engine.max_slots} sequences of {engine.max_len} positions, "
                 f"{engine.memory.describe()} (compiled in "
                 f"{time.perf_counter() - start:.1f} s)")
        app = create_app(engine, model_name, metrics, limits, api_key, chat_template)
        config = uvicorn.Config(app, lifespan="off", log_config=None, access_log=access_log,
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
