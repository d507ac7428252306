"""The per-VM egress proxy (stoker.net.proxy), against real servers on 127.0.0.1.

Every server here listens on 127.0.0.1 port 0 and every name is resolved by a
MappingResolver (no DNS): ``allowed.test``, ``other.test``, ``denied.test`` and
``rebind.test`` all map to 127.0.0.1.  A loopback address is refused unless an
IP entry lists it with the port, so each test's policy lists ``127.0.0.1:PORT``
for the servers it means to reach; ``rebind.test`` is allowed by name only and
must be refused as loopback.  TLS servers use certificates from a throw-away
trustme CA; the proxy is told (``tls_ports``) that their ephemeral ports are TLS
ports.  Well-behaved clients are httpx; hostile ones are raw sockets.

The policy's ``Limits`` refuses idle timeouts below 120 s, so the idle timeout
test shortens it through ``EgressProxy(idle_timeout_override=...)``, which exists
for tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Address, ip_address
from typing import Any

import httpx
import pytest
import trustme
from hypothesis import given, settings
from hypothesis import strategies as st

from stoker.net.policy import IPAddress, Limits, NetworkPolicy
from stoker.net.proxy import (
    ClientHello,
    ConnectionRecord,
    EgressProxy,
    MappingResolver,
    ResolutionError,
    SystemResolver,
    parse_client_hello,
)

LOOPBACK = "127.0.0.1"
NAMES = ("allowed.test", "other.test", "denied.test", "rebind.test")
BODY = b"hello through the egress proxy\n"

# ---------------------------------------------------------------------------- servers


@contextlib.asynccontextmanager
async def serve(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    *,
    tls: ssl.SSLContext | None = None,
) -> AsyncIterator[int]:
    """A server on 127.0.0.1:0; on exit it is closed and its connections ended."""
    tasks: set[asyncio.Task[Any]] = set()

    async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handler(reader, writer)
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # a cancelled handler ends normally: Python 3.11's start_server logs it otherwise
        finally:
            writer.close()
            tasks.discard(task)

    server = await asyncio.start_server(on_client, LOOPBACK, 0, ssl=tls)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        if tasks:
            await asyncio.wait(list(tasks))
        await server.wait_closed()


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


@dataclass
class Origin:
    """A plain HTTP origin: records what each connection sent, answers once, closes."""

    #: After the request, how long to keep reading (to catch pipelined bytes).
    linger: float = 0.0
    received: list[bytes] = field(default_factory=list)
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = bytearray(await read_head(reader))
        head = data.decode("latin-1").lower()
        if "transfer-encoding: chunked" in head:
            while not data.endswith(b"0\r\n\r\n"):
                chunk = await reader.read(65536)
                if not chunk:
                    break
                data += chunk
        elif "content-length:" in head:
            length = int(head.split("content-length:")[1].split("\r\n")[0])
            data += await reader.readexactly(length)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.linger):
                while chunk := await reader.read(65536):
                    data += chunk
        self.received.append(bytes(data))
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (len(BODY), BODY)
        )
        await writer.drain()


@dataclass
class Tcp:
    """A raw TCP service: echoes, or first sends ``source`` bytes and closes."""

    source: int = 0
    connections: int = 0
    closed: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            if self.source:
                block = b"x" * 65536
                left = self.source
                while left:
                    writer.write(block[:left])
                    left -= min(left, len(block))
                    await writer.drain()
                return
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            self.closed += 1


async def tls_hello(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_head(reader)
    writer.write(
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(BODY), BODY)
    )
    await writer.drain()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(ctx)
    return ctx


@pytest.fixture
async def tls_port(ca: trustme.CA) -> AsyncIterator[int]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("allowed.test", "other.test").configure_cert(ctx)
    async with serve(tls_hello, tls=ctx) as port:
        yield port


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    server = Origin()
    async with serve(server.handle) as port:
        server.port = port
        yield server


@pytest.fixture
async def echo() -> AsyncIterator[tuple[Tcp, int]]:
    service = Tcp()
    async with serve(service.handle) as port:
        yield service, port


@pytest.fixture
def resolver() -> MappingResolver:
    return MappingResolver({name: [LOOPBACK] for name in NAMES})


ProxyFactory = Callable[..., Awaitable[tuple[EgressProxy, int]]]


@pytest.fixture
async def make_proxy(resolver: MappingResolver) -> AsyncIterator[ProxyFactory]:
    """Builds proxies served on 127.0.0.1:0; each is closed (aclose, server) at teardown."""
    async with contextlib.AsyncExitStack() as stack:

        async def factory(
            allow: Iterable[str], *, limits: Limits | None = None, **kwargs: Any
        ) -> tuple[EgressProxy, int]:
            policy = NetworkPolicy(mode="egress", allow=tuple(allow), limits=limits or Limits())
            kwargs.setdefault("resolver", resolver)
            proxy = EgressProxy(policy, vm="test-vm", job="job-1", **kwargs)
            port = await stack.enter_async_context(proxy.serve_tcp())
            stack.push_async_callback(proxy.aclose)
            return proxy, port

        yield factory


# ---------------------------------------------------------------------------- clients


@contextlib.asynccontextmanager
async def connect(port: int) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def read_all(reader: asyncio.StreamReader, timeout: float = 10) -> bytes:
    """Everything until EOF (a reset counts as EOF)."""
    data = bytearray()
    async with asyncio.timeout(timeout):
        with contextlib.suppress(ConnectionResetError):
            while chunk := await reader.read(65536):
                data += chunk
    return bytes(data)


async def exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` to the proxy and return its whole answer."""
    async with connect(port) as (reader, writer):
        writer.write(request)
        await writer.drain()
        return await read_all(reader)


async def tunnel(
    port: int, target: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """Open a CONNECT tunnel; returns the streams and the proxy's response head."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    await writer.drain()
    async with asyncio.timeout(10):
        head = await read_head(reader)
    return reader, writer, head


def status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def header(response: bytes, name: str) -> str | None:
    head = response.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    for line in head.split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.lower() == name.lower():
            return value.strip()
    return None


async def record_for(proxy: EgressProxy, count: int = 1, timeout: float = 10) -> ConnectionRecord:
    """Wait until ``count`` records exist; returns the last."""
    async with asyncio.timeout(timeout):
        while len(proxy.records) < count:
            await asyncio.sleep(0.01)
    return proxy.records[-1]


def client_hello(server_name: str | None) -> bytes:
    """The first flight of a real TLS client (Python's ssl) for ``server_name``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if server_name is None:
        ctx.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


# ---------------------------------------------------------------------------- CONNECT


async def test_allowed_https_works_end_to_end(
    make_proxy: ProxyFactory,
    tls_port: int,
    client_tls: ssl.SSLContext,
    resolver: MappingResolver,
) -> None:
    seen: list[ConnectionRecord] = []
    proxy, port = await make_proxy(
        [f"allowed.test:{tls_port}", f"{LOOPBACK}:{tls_port}"],
        tls_ports=frozenset({tls_port}),
        on_record=seen.append,
    )
    async with httpx.AsyncClient(
        proxy=f"http://127.0.0.1:{port}", verify=client_tls, trust_env=False
    ) as client:
        response = await client.get(f"https://allowed.test:{tls_port}/hello")
    assert response.status_code == 200
    assert response.content == BODY
    record = await record_for(proxy)
    assert seen == [record]
    assert record.decision == "allowed"
    assert (record.method, record.host, record.port) == ("CONNECT", "allowed.test", tls_port)
    assert record.sni == "allowed.test"
    assert record.resolved == [LOOPBACK]
    assert record.dialled == f"{LOOPBACK}:{tls_port}"
    assert record.rule == f"allowed.test:{tls_port}"
    assert record.bytes_up > 0
    assert record.bytes_down > len(BODY)
    assert (record.vm, record.job, record.conn) == ("test-vm", "job-1", 1)
    # Resolved once, and the connection went to that address (never re-resolved).
    assert resolver.lookups == ["allowed.test"]
    assert proxy.stats.allowed == 1
    assert proxy.stats.active == 0
    assert record.as_dict()["decision"] == "allowed"


async def test_denied_name_gets_403_with_reason(
    make_proxy: ProxyFactory, tls_port: int, resolver: MappingResolver
) -> None:
    proxy, port = await make_proxy([f"allowed.test:{tls_port}", f"{LOOPBACK}:{tls_port}"])
    response = await exchange(port, f"CONNECT denied.test:{tls_port} HTTP/1.1\r\n\r\n".encode())
    assert status(response) == 403
    assert header(response, "X-Stoker-Deny-Reason") == "not in allowlist"
    assert f"denied.test:{tls_port}: not in allowlist".encode() in response
    record = await record_for(proxy)
    assert record.decision == "denied"
    assert record.describe() == f"denied denied.test:{tls_port}: not in allowlist"
    assert record.dialled is None
    assert resolver.lookups == []  # refused before any lookup


async def test_bare_ip_not_listed_is_denied(
    make_proxy: ProxyFactory, echo: tuple[Tcp, int]
) -> None:
    service, echo_port = echo
    proxy, port = await make_proxy([f"allowed.test:{echo_port}"])
    response = await exchange(port, f"CONNECT {LOOPBACK}:{echo_port} HTTP/1.1\r\n\r\n".encode())
    assert status(response) == 403
    record = await record_for(proxy)
    assert (record.decision, record.reason) == ("denied", "not in allowlist")
    assert service.connections == 0


async def test_listed_ip_is_allowed(make_proxy: ProxyFactory, echo: tuple[Tcp, int]) -> None:
    _, echo_port = echo
    proxy, port = await make_proxy([f"{LOOPBACK}:{echo_port}"])
    reader, writer, head = await tunnel(port, f"{LOOPBACK}:{echo_port}")
    try:
        assert status(head) == 200
        writer.write(b"ping")
        await writer.drain()
        assert await reader.readexactly(4) == b"ping"
    finally:
        writer.close()
    record = await record_for(proxy)
    assert record.decision == "allowed"
    assert record.dialled == f"{LOOPBACK}:{echo_port}"
    assert (record.bytes_up, record.bytes_down) == (4, 4)


async def test_name_resolving_to_loopback_is_denied(
    make_proxy: ProxyFactory, echo: tuple[Tcp, int]
) -> None:
    service, echo_port = echo
    # Allowed by name, but no IP entry covers what it resolves to.
    proxy, port = await make_proxy([f"rebind.test:{echo_port}"])
    response = await exchange(port, f"CONNECT rebind.test:{echo_port} HTTP/1.1\r\n\r\n".encode())
    assert status(response) == 403
    record = await record_for(proxy)
    assert record.decision == "denied"
    assert record.reason.startswith(f"resolves to {LOOPBACK} (")
    assert "loopback" in record.reason
    assert record.resolved == [LOOPBACK]
    assert record.dialled is None
    assert service.connections == 0


async def test_every_resolved_address_must_pass(
    make_proxy: ProxyFactory, echo: tuple[Tcp, int]
) -> None:
    service, echo_port = echo
    resolver = MappingResolver({"mixed.test": [LOOPBACK, "10.0.0.5"]})
    proxy, port = await make_proxy(
        [f"mixed.test:{echo_port}", f"{LOOPBACK}:{echo_port}"], resolver=resolver
    )
    response = await exchange(port, f"CONNECT mixed.test:{echo_port} HTTP/1.1\r\n\r\n".encode())
    assert status(response) == 403
    record = await record_for(proxy)
    assert record.reason.startswith("resolves to 10.0.0.5 (")
    assert service.connections == 0


class RefusingFirst(EgressProxy):
    """Refuses dials to TEST-NET-1 without sending a packet; records every attempt."""

    attempts: list[str]

    async def _dial(
        self, address: IPAddress, port: int, timeout: float
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        self.attempts.append(str(address))
        if address == IPv4Address("192.0.2.1"):
            raise ConnectionRefusedError
        return await super()._dial(address, port, timeout)


async def test_dials_next_checked_address_on_failure(
    echo: tuple[Tcp, int], resolver: MappingResolver
) -> None:
    _, echo_port = echo
    names = MappingResolver({"two.test": ["192.0.2.1", LOOPBACK]})
    policy = NetworkPolicy(
        mode="egress",
        allow=(f"two.test:{echo_port}", f"{LOOPBACK}:{echo_port}", f"192.0.2.1:{echo_port}"),
    )
    proxy = RefusingFirst(policy, vm="t", resolver=names)
    proxy.attempts = []
    try:
        async with proxy.serve_tcp() as port:
            reader, writer, head = await tunnel(port, f"two.test:{echo_port}")
            assert status(head) == 200
            writer.close()
            record = await record_for(proxy)
    finally:
        await proxy.aclose()
    assert proxy.attempts == ["192.0.2.1", LOOPBACK]
    assert record.dialled == f"{LOOPBACK}:{echo_port}"
    assert names.lookups == ["two.test"]


async def test_unresolvable_and_refused_upstreams_get_502(make_proxy: ProxyFactory) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind((LOOPBACK, 0))
        closed_port = sock.getsockname()[1]
    proxy, port = await make_proxy(
        [f"unknown.test:{closed_port}", f"allowed.test:{closed_port}", f"{LOOPBACK}:{closed_port}"]
    )
    response = await exchange(port, f"CONNECT unknown.test:{closed_port} HTTP/1.1\r\n\r\n".encode())
    assert status(response) == 502
    record = await record_for(proxy)
    assert record.decision == "error"
    assert "unknown name" in record.reason
    response = await exchange(port, f"CONNECT allowed.test:{closed_port} HTTP/1.1\r\n\r\n".encode())
    assert status(response) == 502
    record = await record_for(proxy, 2)
    assert (record.decision, record.reason) == ("error", "upstream refused")
    assert proxy.stats.errors == 2


async def test_sni_must_match_connect_host(make_proxy: ProxyFactory, tls_port: int) -> None:
    proxy, port = await make_proxy(
        [f"allowed.test:{tls_port}", f"other.test:{tls_port}", f"{LOOPBACK}:{tls_port}"],
        tls_ports=frozenset({tls_port}),
    )
    reader, writer, head = await tunnel(port, f"allowed.test:{tls_port}")
    try:
        assert status(head) == 200
        writer.write(client_hello("other.test"))
        await writer.drain()
        assert await read_all(reader) == b""
    finally:
        writer.close()
    record = await record_for(proxy)
    assert record.decision == "denied"
    assert record.reason == "SNI other.test does not match CONNECT host allowed.test"
    assert record.sni == "other.test"
    assert record.bytes_up == 0  # the ClientHello never reached the server


async def test_sni_on_ip_connect_must_be_allowed(make_proxy: ProxyFactory, tls_port: int) -> None:
    proxy, port = await make_proxy([f"{LOOPBACK}:{tls_port}"], tls_ports=frozenset({tls_port}))
    reader, writer, head = await tunnel(port, f"{LOOPBACK}:{tls_port}")
    assert status(head) == 200
    writer.write(client_hello("other.test"))
    assert await read_all(reader) == b""
    writer.close()
    record = await record_for(proxy)
    assert record.decision == "denied"
    assert record.reason == f"SNI other.test (CONNECT to address {LOOPBACK}) not in allowlist"
    # Without SNI, an address allowed by an IP entry is enough.
    reader, writer, head = await tunnel(port, f"{LOOPBACK}:{tls_port}")
    writer.write(client_hello(None))
    await writer.drain()
    assert (await reader.read(5))[:1] == b"\x16"  # the server's handshake reply
    writer.close()
    assert (await record_for(proxy, 2)).decision == "allowed"


async def test_tls_port_needs_sni(make_proxy: ProxyFactory, tls_port: int) -> None:
    proxy, port = await make_proxy(
        [f"allowed.test:{tls_port}", f"{LOOPBACK}:{tls_port}"], tls_ports=frozenset({tls_port})
    )
    reader, writer, head = await tunnel(port, f"allowed.test:{tls_port}")
    writer.write(client_hello(None))
    assert await read_all(reader) == b""
    writer.close()
    record = await record_for(proxy)
    assert record.decision == "denied"
    assert record.reason == "no SNI in the TLS ClientHello for allowed.test"


async def test_plain_bytes_on_tls_port_are_refused(make_proxy: ProxyFactory, tls_port: int) -> None:
    proxy, port = await make_proxy(
        [f"allowed.test:{tls_port}", f"{LOOPBACK}:{tls_port}"], tls_ports=frozenset({tls_port})
    )
    reader, writer, head = await tunnel(port, f"allowed.test:{tls_port}")
    assert status(head) == 200
    writer.write(b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n")
    assert await read_all(reader) == b""
    writer.close()
    record = await record_for(proxy)
    assert (record.decision, record.reason) == ("denied", "not TLS on a TLS port")
    assert record.bytes_up == 0
    # And plain HTTP may not be sent to a TLS port either.
    response = await exchange(
        port, f"GET http://allowed.test:{tls_port}/ HTTP/1.1\r\n\r\n".encode()
    )
    assert status(response) == 403
    assert (await record_for(proxy, 2)).reason == "not TLS on a TLS port"


async def test_clienthello_sent_with_connect_is_checked_and_forwarded(
    make_proxy: ProxyFactory, tls_port: int, client_tls: ssl.SSLContext
) -> None:
    """A client may send its ClientHello right behind the CONNECT head."""
    proxy, port = await make_proxy(
        [f"allowed.test:{tls_port}", f"{LOOPBACK}:{tls_port}"], tls_ports=frozenset({tls_port})
    )
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_tls.wrap_bio(incoming, outgoing, server_hostname="allowed.test")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    writer.write(f"CONNECT allowed.test:{tls_port} HTTP/1.1\r\n\r\n".encode() + outgoing.read())
    await writer.drain()
    assert status(await read_head(reader)) == 200
    # Finish the handshake over the tunnel: the hello reached the server intact.
    async with asyncio.timeout(10):
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                writer.write(outgoing.read())
                data = await reader.read(65536)
                assert data
                incoming.write(data)
    writer.close()
    record = await record_for(proxy)
    assert record.decision == "allowed"
    assert record.sni == "allowed.test"


# ---------------------------------------------------------------------------- plain HTTP


async def test_plain_http_is_rewritten(make_proxy: ProxyFactory, origin: Origin) -> None:
    proxy, port = await make_proxy([f"allowed.test:{origin.port}", f"{LOOPBACK}:{origin.port}"])
    async with httpx.AsyncClient(
        proxy=f"http://user:secret@127.0.0.1:{port}", trust_env=False
    ) as client:
        response = await client.get(
            f"http://allowed.test:{origin.port}/path?q=1",
            headers={"X-Custom": "kept", "Keep-Alive": "timeout=5", "Proxy-Connection": "x"},
        )
    assert response.status_code == 200
    assert response.content == BODY
    (sent,) = origin.received
    lines = sent.decode("latin-1").split("\r\n")
    assert lines[0] == "GET /path?q=1 HTTP/1.1"
    names = [line.split(":", 1)[0].lower() for line in lines[1:] if line]
    assert f"Host: allowed.test:{origin.port}" in lines
    assert "Connection: close" in lines
    assert "X-Custom: kept" in lines
    assert "proxy-authorization" not in names
    assert "proxy-connection" not in names
    assert "keep-alive" not in names
    assert names.count("connection") == names.count("host") == 1
    record = await record_for(proxy)
    assert (record.decision, record.method, record.host) == ("allowed", "GET", "allowed.test")
    assert record.dialled == f"{LOOPBACK}:{origin.port}"


async def test_plain_http_drops_headers_named_by_connection(
    make_proxy: ProxyFactory, origin: Origin
) -> None:
    proxy, port = await make_proxy([f"allowed.test:{origin.port}", f"{LOOPBACK}:{origin.port}"])
    response = await exchange(
        port,
        (
            f"GET http://ALLOWED.test:{origin.port} HTTP/1.1\r\n"
            f"Host: allowed.test:{origin.port}\r\n"
            "Connection: keep-alive, X-Secret\r\nX-Secret: 1\r\n"
            "Proxy-Authorization: Basic dTpw\r\n\r\n"
        ).encode(),
    )
    assert status(response) == 200
    (sent,) = origin.received
    assert sent.startswith(b"GET / HTTP/1.1\r\n")
    assert b"X-Secret" not in sent
    assert b"Proxy-Authorization" not in sent
    assert b"keep-alive" not in sent


async def test_plain_http_forwards_one_body(make_proxy: ProxyFactory, origin: Origin) -> None:
    proxy, port = await make_proxy([f"allowed.test:{origin.port}", f"{LOOPBACK}:{origin.port}"])
    target = f"http://allowed.test:{origin.port}/upload"
    response = await exchange(
        port,
        f"POST {target} HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello".encode(),
    )
    assert status(response) == 200
    chunked = (
        f"POST {target} HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        "5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
    ).encode()
    response = await exchange(port, chunked)
    assert status(response) == 200
    first, second = origin.received
    assert first.endswith(b"Content-Length: 5\r\nConnection: close\r\n\r\nhello")
    assert second.endswith(
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    await record_for(proxy, 2)
    assert proxy.stats.allowed == 2


@pytest.mark.parametrize(
    "request_head",
    [
        "POST {url} HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        "POST {url} HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        "POST {url} HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        "POST {url} HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n",
        "GET {url} HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        "GET {url} HTTP/1.1\r\n X-Folded: 1\r\n\r\n",
        "GET {url} HTTP/1.1\r\nX-Space : 1\r\n\r\n",
        "GET {url}#frag HTTP/1.1\r\n\r\n",
    ],
)
async def test_ambiguous_requests_are_refused(
    make_proxy: ProxyFactory, origin: Origin, request_head: str
) -> None:
    proxy, port = await make_proxy([f"allowed.test:{origin.port}", f"{LOOPBACK}:{origin.port}"])
    url = f"http://allowed.test:{origin.port}/"
    response = await exchange(port, request_head.format(url=url).encode("latin-1"))
    assert status(response) == 400
    assert (await record_for(proxy)).decision == "denied"
    assert origin.received == []


async def test_host_header_mismatch_is_denied(make_proxy: ProxyFactory, origin: Origin) -> None:
    proxy, port = await make_proxy(
        [f"allowed.test:{origin.port}", f"other.test:{origin.port}", f"{LOOPBACK}:{origin.port}"]
    )
    response = await exchange(
        port,
        (
            f"GET http://allowed.test:{origin.port}/ HTTP/1.1\r\n"
            f"Host: other.test:{origin.port}\r\n\r\n"
        ).encode(),
    )
    assert status(response) == 403
    assert header(response, "X-Stoker-Deny-Reason") == "Host header mismatch"
    assert (await record_for(proxy)).reason == "Host header mismatch"
    assert origin.received == []
    # The same authority, spelt with its default port or in another case, matches.
    response = await exchange(
        port,
        b"GET http://allowed.test:%d/ HTTP/1.1\r\nHost: ALLOWED.test:%d\r\n\r\n"
        % (origin.port, origin.port),
    )
    assert status(response) == 200


async def test_pipelined_second_request_is_not_forwarded(
    make_proxy: ProxyFactory, origin: Origin
) -> None:
    origin.linger = 0.3
    proxy, port = await make_proxy(
        [f"allowed.test:{origin.port}", f"other.test:{origin.port}", f"{LOOPBACK}:{origin.port}"]
    )
    response = await exchange(
        port,
        (
            f"GET http://allowed.test:{origin.port}/one HTTP/1.1\r\n"
            f"Host: allowed.test:{origin.port}\r\n\r\n"
            f"GET http://other.test:{origin.port}/two HTTP/1.1\r\n"
            f"Host: other.test:{origin.port}\r\n\r\n"
        ).encode(),
    )
    assert response.count(b"HTTP/1.1 200") == 1
    assert response.endswith(BODY)
    (sent,) = origin.received
    assert sent.startswith(b"GET /one HTTP/1.1\r\n")
    assert b"/two" not in sent
    assert sent.count(b"GET") == 1
    assert (await record_for(proxy)).decision == "allowed"


@pytest.mark.parametrize(
    ("request_bytes", "reason"),
    [
        (b"garbage\r\n\r\n", "malformed request line"),
        (b"\x00\x01\x02\x03\r\n", "malformed request line"),
        (b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n", "not a proxy request"),
        (b"GET https://allowed.test/ HTTP/1.1\r\n\r\n", "only http:// URIs"),
        (b"CONNECT allowed.test HTTP/1.1\r\n\r\n", "no port in the target"),
        (b"CONNECT user@allowed.test:443 HTTP/1.1\r\n\r\n", "user information"),
        (b"CONNECT 127.1:443 HTTP/1.1\r\n\r\n", "malformed host name"),
        (b"CONNECT allowed.test:99999 HTTP/1.1\r\n\r\n", "malformed port"),
        (b"CONNECT [::1%eth0]:443 HTTP/1.1\r\n\r\n", "malformed IPv6"),
        (b"CONNECT allowed.test:443 HTTP/2.0\r\n\r\n", "malformed request line"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "TLS sent to the proxy"),
    ],
)
async def test_bad_requests_get_400(
    make_proxy: ProxyFactory, request_bytes: bytes, reason: str
) -> None:
    proxy, port = await make_proxy(["allowed.test:443"])
    response = await exchange(port, request_bytes)
    assert status(response) == 400
    record = await record_for(proxy)
    assert record.decision == "denied"
    assert record.reason.startswith(reason)
    assert record.dialled is None


async def test_oversized_head_is_refused(make_proxy: ProxyFactory) -> None:
    proxy, port = await make_proxy(["allowed.test:443"])
    request = b"CONNECT allowed.test:443 HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
    response = await exchange(port, request)
    assert status(response) == 400
    assert (await record_for(proxy)).reason == "request head larger than 16 KiB"


async def test_slow_head_times_out(make_proxy: ProxyFactory) -> None:
    proxy, port = await make_proxy(["allowed.test:443"], limits=Limits(header_timeout=0.3))
    async with connect(port) as (reader, writer):
        writer.write(b"CONNECT allowed.test:443 HTTP/1.1\r\n")  # and never the blank line
        started = time.monotonic()
        response = await read_all(reader)
    assert status(response) == 408
    assert time.monotonic() - started < 5
    record = await record_for(proxy)
    assert (record.decision, record.reason) == ("denied", "request head not received within 0.3s")


async def test_silent_client_is_recorded(make_proxy: ProxyFactory) -> None:
    proxy, port = await make_proxy(["allowed.test:443"])
    async with connect(port):
        pass
    record = await record_for(proxy)
    assert (record.method, record.decision) == ("", "error")
    assert record.describe() == "error: client closed before sending a request"


# ---------------------------------------------------------------------------- limits


async def test_connection_limit(make_proxy: ProxyFactory, echo: tuple[Tcp, int]) -> None:
    service, echo_port = echo
    proxy, port = await make_proxy([f"{LOOPBACK}:{echo_port}"], limits=Limits(max_connections=2))
    target = f"{LOOPBACK}:{echo_port}"
    held = [await tunnel(port, target) for _ in range(2)]
    try:
        assert [status(head) for _, _, head in held] == [200, 200]
        assert proxy.stats.active == 2
        response = await exchange(port, f"CONNECT {target} HTTP/1.1\r\n\r\n".encode())
        assert status(response) == 429
        assert header(response, "X-Stoker-Deny-Reason") == "connection limit (2) reached"
        record = await record_for(proxy)
        assert (record.decision, record.reason) == ("denied", "connection limit (2) reached")
        assert service.connections == 2  # the refused one was never dialled
        # The held tunnels still work.
        for reader, writer, _ in held:
            writer.write(b"still here")
            assert await reader.readexactly(10) == b"still here"
    finally:
        for _, writer, _ in held:
            writer.close()
    async with asyncio.timeout(10):
        while proxy.stats.active:
            await asyncio.sleep(0.01)
    reader, writer, head = await tunnel(port, target)
    writer.close()
    assert status(head) == 200


async def test_connection_rate_limit(make_proxy: ProxyFactory) -> None:
    proxy, port = await make_proxy(["allowed.test:443"], limits=Limits(connections_per_minute=3))
    statuses = [
        status(await exchange(port, b"CONNECT denied.test:443 HTTP/1.1\r\n\r\n")) for _ in range(4)
    ]
    assert statuses == [403, 403, 403, 429]
    record = await record_for(proxy, 4)
    assert record.reason == "connection rate limit (3/min) reached"


async def test_total_bytes_cut(make_proxy: ProxyFactory) -> None:
    source = Tcp(source=1_000_000)
    async with serve(source.handle) as source_port:
        proxy, port = await make_proxy(
            [f"{LOOPBACK}:{source_port}"], limits=Limits(total_bytes=100_000)
        )
        reader, writer, head = await tunnel(port, f"{LOOPBACK}:{source_port}")
        assert status(head) == 200
        data = await read_all(reader)
        writer.close()
        assert len(data) == 100_000
        record = await record_for(proxy)
        assert (record.decision, record.reason) == ("denied", "total byte limit reached")
        assert record.bytes_down == 100_000
        # The budget is the VM's: later connections are refused too.
        response = await exchange(
            port, f"CONNECT {LOOPBACK}:{source_port} HTTP/1.1\r\n\r\n".encode()
        )
        assert status(response) == 429
        assert source.connections == 1


async def test_bytes_per_second_slows_transfers(make_proxy: ProxyFactory) -> None:
    size, rate = 400_000, 200_000
    source = Tcp(source=size)
    async with serve(source.handle) as source_port:
        proxy, port = await make_proxy(
            [f"{LOOPBACK}:{source_port}"], limits=Limits(bytes_per_second=rate)
        )
        started = time.monotonic()
        reader, writer, head = await tunnel(port, f"{LOOPBACK}:{source_port}")
        data = await read_all(reader, timeout=30)
        elapsed = time.monotonic() - started
        writer.close()
    assert len(data) == size
    assert elapsed >= size / rate * 0.8


async def test_idle_connections_are_closed(make_proxy: ProxyFactory, echo: tuple[Tcp, int]) -> None:
    service, echo_port = echo
    proxy, port = await make_proxy([f"{LOOPBACK}:{echo_port}"], idle_timeout_override=0.3)
    reader, writer, head = await tunnel(port, f"{LOOPBACK}:{echo_port}")
    assert status(head) == 200
    writer.write(b"x")
    assert await reader.readexactly(1) == b"x"
    started = time.monotonic()
    assert await read_all(reader) == b""
    assert 0.2 < time.monotonic() - started < 5
    writer.close()
    record = await record_for(proxy)
    assert (record.decision, record.reason) == ("allowed", "idle for 0.3s")


async def test_many_connections_beyond_the_limit(
    make_proxy: ProxyFactory, echo: tuple[Tcp, int]
) -> None:
    service, echo_port = echo
    proxy, port = await make_proxy(
        [f"{LOOPBACK}:{echo_port}", f"allowed.test:{echo_port}"],
        limits=Limits(max_connections=8),
    )
    request = f"CONNECT {LOOPBACK}:{echo_port} HTTP/1.1\r\n\r\n".encode()
    opened: list[asyncio.StreamWriter] = []

    async def one() -> int:
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        opened.append(writer)
        writer.write(request)
        await writer.drain()
        return status(await read_head(reader))

    try:
        async with asyncio.timeout(60):
            results = await asyncio.gather(*(one() for _ in range(500)))
        assert results.count(200) == 8
        assert results.count(429) == 492
        assert service.connections == 8
    finally:
        for writer in opened:
            writer.close()
    async with asyncio.timeout(20):
        while proxy.stats.active or len(proxy.records) < 500:
            await asyncio.sleep(0.02)
    assert proxy.stats.active == 0
    # Still serving.
    reader, writer, head = await tunnel(port, f"allowed.test:{echo_port}")
    writer.close()
    assert status(head) == 200
    assert proxy.denied_summary() == ["connection limit (8) reached (492x)"]


async def test_aclose_ends_every_connection(
    make_proxy: ProxyFactory, echo: tuple[Tcp, int]
) -> None:
    service, echo_port = echo
    proxy, port = await make_proxy([f"{LOOPBACK}:{echo_port}"])
    tunnels = [await tunnel(port, f"{LOOPBACK}:{echo_port}") for _ in range(3)]
    slow_reader, slow_writer = await asyncio.open_connection(LOOPBACK, port)
    slow_writer.write(b"CONNECT ")
    async with asyncio.timeout(10):
        while proxy.stats.active < 4:
            await asyncio.sleep(0.01)
    await proxy.aclose()
    await proxy.aclose()  # idempotent
    assert proxy.stats.active == 0
    assert len(proxy.records) == 4
    assert all(r.reason == "proxy closed" for r in proxy.records)
    for reader, writer, _ in tunnels:
        assert await read_all(reader) == b""
        writer.close()
    assert await read_all(slow_reader) == b""
    slow_writer.close()
    async with asyncio.timeout(10):
        while service.closed < 3:  # the upstream sockets were closed too
            await asyncio.sleep(0.01)
    response = await exchange(port, f"CONNECT {LOOPBACK}:{echo_port} HTTP/1.1\r\n\r\n".encode())
    assert status(response) == 503


# ---------------------------------------------------------------------------- handle() itself


class MemoryWriter:
    """A StreamWriterLike that keeps what was written (no half-close)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise AssertionError("cannot write EOF")

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    async def wait_closed(self) -> None:
        pass


async def test_handle_answers_on_any_writer(resolver: MappingResolver) -> None:
    proxy = EgressProxy(NetworkPolicy(mode="egress", allow=()), vm="v", resolver=resolver)
    reader = asyncio.StreamReader()
    reader.feed_data(b"CONNECT evil.test:443 HTTP/1.1\r\n\r\n")
    reader.feed_eof()
    writer = MemoryWriter()
    record = await proxy.handle(reader, writer)
    assert writer.closed
    assert status(bytes(writer.data)) == 403
    assert record.describe() == "denied evil.test:443: not in allowlist"
    await proxy.aclose()


async def test_cancelled_caller_still_gets_a_record(resolver: MappingResolver) -> None:
    proxy = EgressProxy(NetworkPolicy(mode="egress", allow=()), vm="v", resolver=resolver)
    reader = asyncio.StreamReader()
    reader.feed_data(b"CONNECT evil")  # then nothing
    writer = MemoryWriter()
    task = asyncio.create_task(proxy.handle(reader, writer))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert writer.closed
    assert proxy.records[-1].reason == "proxy closed"
    assert proxy.stats.active == 0


async def test_records_are_logged_and_summarised(
    make_proxy: ProxyFactory, caplog: pytest.LogCaptureFixture, echo: tuple[Tcp, int]
) -> None:
    _, echo_port = echo
    proxy, port = await make_proxy([f"{LOOPBACK}:{echo_port}"])
    with caplog.at_level(logging.INFO, logger="stoker.net"):
        for _ in range(3):
            await exchange(port, b"CONNECT evil.test:443 HTTP/1.1\r\n\r\n")
        await exchange(port, b"CONNECT other.test:443 HTTP/1.1\r\n\r\n")
        reader, writer, head = await tunnel(port, f"{LOOPBACK}:{echo_port}")
        writer.close()
        await record_for(proxy, 5)
    assert proxy.denied_summary() == [
        "evil.test:443: not in allowlist (3x)",
        "other.test:443: not in allowlist",
    ]
    assert proxy.denied_summary(1) == ["evil.test:443: not in allowlist (3x)", "... and 1 more"]
    logged = [r for r in caplog.records if r.name == "stoker.net"]
    assert [r.levelno for r in logged] == [logging.WARNING] * 4 + [logging.INFO]
    connection = logged[0].connection  # type: ignore[attr-defined]
    assert connection["decision"] == "denied"
    assert connection["host"] == "evil.test"
    assert "not in allowlist" in logged[0].getMessage()
    assert (proxy.stats.denied, proxy.stats.allowed) == (4, 1)


async def test_mapping_resolver() -> None:
    names = MappingResolver({"Known.Test": ["192.0.2.7", ip_address("2001:db8::1")]})
    assert await names.resolve("known.test.", 443) == [
        ip_address("192.0.2.7"),
        ip_address("2001:db8::1"),
    ]
    with pytest.raises(ResolutionError):
        await names.resolve("unknown.test", 443)


async def test_system_resolver_on_a_literal() -> None:
    # A numeric host never reaches DNS.
    assert await SystemResolver(timeout=5).resolve(LOOPBACK, 80) == [IPv4Address(LOOPBACK)]


# ---------------------------------------------------------------------------- ClientHello parser


def test_parses_real_client_hellos() -> None:
    assert parse_client_hello(client_hello("allowed.test")) == ClientHello(sni="allowed.test")
    assert parse_client_hello(client_hello(None)) == ClientHello(sni=None)
    hello = client_hello("Allowed.Test")
    assert parse_client_hello(hello) == ClientHello(sni="allowed.test")
    assert parse_client_hello(hello[:100]) == "truncated TLS record"
    assert parse_client_hello(b"GET / HTTP/1.1\r\n") == "not a TLS handshake record"
    # The same hello announced as longer than its record: split over records.
    split = hello[:3] + (len(hello) - 5 - 10).to_bytes(2, "big") + hello[5:-10]
    assert parse_client_hello(split) == "ClientHello split over several TLS records"


_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
_hostnames = st.builds(
    lambda labels, tld: ".".join([*labels, tld]),
    st.lists(_label, min_size=1, max_size=4),
    st.from_regex(r"[a-z]{2,10}", fullmatch=True),
)


@settings(max_examples=50, deadline=None)
@given(_hostnames)
def test_sni_of_real_client_hellos(name: str) -> None:
    assert parse_client_hello(client_hello(name)) == ClientHello(sni=name)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2048))
def test_parser_never_raises_on_garbage(data: bytes) -> None:
    result = parse_client_hello(data)
    assert isinstance(result, (ClientHello, str))
    result = parse_client_hello(b"\x16\x03\x01" + len(data).to_bytes(2, "big") + data)
    assert isinstance(result, (ClientHello, str))


_HELLO = client_hello("mutated.test")


@settings(max_examples=500, deadline=None)
@given(
    st.integers(0, len(_HELLO)),
    st.lists(st.tuples(st.integers(0, len(_HELLO) - 1), st.integers(0, 255)), max_size=4),
)
def test_parser_never_raises_on_damaged_hellos(cut: int, flips: list[tuple[int, int]]) -> None:
    data = bytearray(_HELLO)
    for index, value in flips:
        data[index] = value
    result = parse_client_hello(bytes(data[:cut]))
    assert isinstance(result, (ClientHello, str))
