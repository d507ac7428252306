"""``stoker serve`` as a process: logging, the listening socket, serving until told to stop.

:func:`serve` runs the service with its REST API (what ``stoker serve``
does); :func:`serve_headless` and :func:`main` (``python -m stoker.service``)
run it without the API.  Both start the CI integrations the configuration
asks for.
"""

from __future__ import annotations

import argparse
import asyncio
import builtins
import contextlib
import json
import logging
import socket
import sys
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import uvicorn

from stoker.ci import integrations_for
from stoker.errors import StokerError, UsageError
from stoker.service import early_signals
from stoker.service.api import create_app
from stoker.service.config import ServiceConfig, load_config
from stoker.service.metrics import Metrics
from stoker.service.service import Observer, Service

log = logging.getLogger("stoker.service.service")


_LOG_FIELDS = ("job", "pool", "vm", "host", "state", "connection")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and known context fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created).astimezone().isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in _LOG_FIELDS:
            if key in record.__dict__:
                entry[key] = record.__dict__[key]
        connection = entry.get("connection")
        if isinstance(connection, dict):
            # An egress proxy's record (logger stoker.net): its job and VM at the top
            # level too, so that one filter finds everything about a job.
            for key in ("job", "vm"):
                if key not in entry and connection.get(key) is not None:
                    entry[key] = connection[key]
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(fmt: Literal["text", "json"] = "text", level: str = "info") -> None:
    """Structured (``json``) or human (``text``) logs on stderr, for the daemon."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


async def serve_headless(config: ServiceConfig, *, observer: Observer | None = None) -> None:
    """Run the scheduler and supervisor (no REST API) until SIGTERM or SIGINT, then stop."""
    service = Service(config, observer=observer, integrations=integrations_for(config))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in early_signals.STOP_SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    if early_signals.received():
        # Asked to stop while starting: finish starting (reconcile), then stop cleanly.
        log.info("a stop signal came during start-up: stopping once started")
        stop.set()
    await service.start()
    try:
        await stop.wait()
        log.info("signal received: stopping (grace %.0fs)", config.shutdown_grace_seconds)
    finally:
        await service.stop()


def main(argv: builtins.list[str] | None = None) -> int:
    """``python -m stoker.service --config FILE``: the service without the REST API."""
    parser = argparse.ArgumentParser(prog="python -m stoker.service", description=main.__doc__)
    parser.add_argument("--config", required=True, type=Path, help="the TOML configuration")
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    configure_logging(args.log_format, args.log_level)
    try:
        config = load_config(args.config)
        asyncio.run(serve_headless(config))
    except StokerError as exc:
        print(f"stoker: {exc}", file=sys.stderr)
        if exc.hint:
            print(f"  hint: {exc.hint}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 125
    return 0


class _Server(uvicorn.Server):
    """uvicorn, minus its signal handling: the caller decides when to stop (``stop``)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket for the API (bound here, so errors are ours to explain)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family = infos[0][0]
        listener = socket.create_server((host, port), family=family, backlog=512)
        # Accepted connections inherit it.  asyncio sets TCP_NODELAY only on sockets made
        # with proto=IPPROTO_TCP (these have 0): without it, a response that uvicorn writes
        # in two parts (head, body) on a kept-alive connection waits for the client's
        # delayed ACK, 40 ms per request.
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return listener
    except OSError as exc:
        raise UsageError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}",
            hint="change [listen] in the configuration, or stop what uses the port",
        ) from None


async def serve(
    config: ServiceConfig,
    *,
    stop: asyncio.Event,
    sock: socket.socket | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Run the service and its REST API in this event loop until ``stop`` is set.

    Then: no new connections, open log streams end (clients resume
    elsewhere or later), requests in flight get a few seconds, and the
    service stops gracefully (running jobs get ``shutdown_grace_seconds``).
    ``on_ready`` is called with the base URL once connections are accepted.
    """
    listener = sock or listen_socket(config.listen.host, config.listen.port)
    metrics = Metrics()
    service = Service(config, observer=metrics, integrations=integrations_for(config))
    stopper: asyncio.Task[bool] | None = None
    try:
        await service.start()
        app = create_app(service, config)
        server = _Server(
            uvicorn.Config(
                app,
                lifespan="off",
                log_config=None,
                timeout_graceful_shutdown=5,
                server_header=False,
            )
        )
        serving = asyncio.create_task(server.serve(sockets=[listener]))
        stopper = asyncio.create_task(stop.wait())
        if on_ready is not None:
            # The socket listens already: connections wait in its backlog until uvicorn runs.
            host, port = listener.getsockname()[:2]
            on_ready(f"http://{host if ':' not in host else f'[{host}]'}:{port}")
        await asyncio.wait({serving, stopper}, return_when=asyncio.FIRST_COMPLETED)
        app.state.closing.set()
        server.should_exit = True
        await serving
    finally:
        if stopper is not None:
            stopper.cancel()
        await service.stop()
        listener.close()
