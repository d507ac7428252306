"""The host-side egress proxy of one VM: every guest connection is checked, dialled and recorded.

In ``egress`` mode a guest has no network device.  Its programs talk to an HTTP
proxy (``http_proxy=http://127.0.0.1:3128`` in the guest); each TCP connection
they open there is carried to the host (:mod:`stoker.net.channel`) and handed to
:meth:`EgressProxy.handle`.  For tests and benchmarks the same proxy also serves
a real loopback port (:meth:`EgressProxy.serve_tcp`).

Everything the guest sends is hostile.  For each connection the proxy:

1. reads one request head, bounded in size (16 KiB) and time (``header_timeout``);
   only ``CONNECT host:port`` and absolute-URI ``http://`` requests are accepted;
2. checks the destination against the VM's :class:`~stoker.net.policy.NetworkPolicy`
   (host entries for names, IP/CIDR entries for address literals);
3. resolves the name **once**, requires every address to be publicly routable
   (or explicitly listed by an IP entry), and dials exactly one of the checked
   addresses by IP, so the guest cannot rebind the name in between;
4. on TLS ports, requires the client's first TLS record to be a ClientHello whose
   SNI names the CONNECT host (no domain fronting); other ports carry raw bytes;
5. for plain HTTP, forwards exactly one rewritten request (origin-form,
   ``Connection: close``, no proxy or hop-by-hop headers) and its response;
6. enforces the VM's limits: concurrent connections, connections per minute, a
   shared byte rate (token bucket), a total byte budget, connect and idle timeouts;
7. ends with one :class:`ConnectionRecord` (callback, :attr:`EgressProxy.records`,
   and a log line on the ``stoker.net`` logger).

Refusals are answered with an HTTP status and a short reason in the body and in an
``X-Stoker-Deny-Reason`` header, so ``curl`` and friends show the user why.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import ipaddress
import logging
import re
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from stoker.errors import StokerError
from stoker.net.policy import TLS_PORTS, AllowEntry, IPAddress, NetworkPolicy, address_problem

__all__ = [
    "ClientHello",
    "ConnectionRecord",
    "EgressProxy",
    "MappingResolver",
    "ProxyStats",
    "ResolutionError",
    "Resolver",
    "StreamWriterLike",
    "SystemResolver",
    "parse_client_hello",
]

log = logging.getLogger("stoker.net")

#: Largest request head (request line and headers) the proxy reads.
MAX_HEAD = 16 * 1024
#: Largest chunk read from either side before it is written and drained.
CHUNK = 64 * 1024
#: Largest chunk-size or trailer line of a chunked request body.
MAX_CHUNK_LINE = 4096
#: Largest TLS record payload (RFC 8446 section 5.1: TLSPlaintext.length <= 2^14).
MAX_TLS_RECORD = 16384
#: How many addresses of one name are checked and tried at most.
MAX_ADDRESSES = 16
#: After refusing a connection, how long (seconds) and how much (bytes) of what
#: the client still sends is read and discarded, so that closing does not reset
#: the connection and destroy the answer before the client has read it.
LINGER_SECONDS = 1.0
LINGER_BYTES = 64 * 1024
MAX_HEADERS = 100
#: Distinct (destination, reason) pairs counted for :meth:`EgressProxy.denied_summary`.
MAX_SUMMARY_KEYS = 1000
#: Connections refused by a limit that are logged per minute (above DEBUG).
MAX_REFUSALS_LOGGED = 10

Decision = Literal["allowed", "denied", "error"]


# ---------------------------------------------------------------------------- records


@dataclass
class ConnectionRecord:
    """What happened to one guest connection; emitted once, when it ends."""

    vm: str
    job: str | None
    #: Sequence number of the connection in its proxy (from 1).
    conn: int
    #: ``CONNECT``, ``GET``, ...; ``""`` if no request was parsed.
    method: str = ""
    host: str | None = None
    port: int | None = None
    #: The server name of the client's TLS ClientHello (TLS ports only).
    sni: str | None = None
    #: The addresses the name resolved to (the literal itself for an IP target).
    resolved: list[str] = field(default_factory=list)
    #: ``ip:port`` actually connected to, if any.
    dialled: str | None = None
    #: The allowlist entry that admitted the destination.
    rule: str | None = None
    decision: Decision = "error"
    reason: str = ""
    #: Bytes forwarded guest -> upstream and upstream -> guest.
    bytes_up: int = 0
    bytes_down: int = 0
    #: Unix time the connection was accepted; its duration in seconds.
    started: float = 0.0
    duration: float = 0.0

    @property
    def target(self) -> str | None:
        """``host:port`` (IPv6 literals bracketed), or None before a request was parsed."""
        if self.host is None:
            return None
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port is None else f"{host}:{self.port}"

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready copy (for logs, the service's API and tests)."""
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """One line for users, e.g. ``denied evil.example:443: not in allowlist``."""
        target = self.target
        if target is None:
            return f"{self.decision}: {self.reason}"
        return f"{self.decision} {target}: {self.reason}"


@dataclass
class ProxyStats:
    """Counters of one proxy, over its whole life."""

    allowed: int = 0
    denied: int = 0
    errors: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    #: Connections admitted (within the connection limit) and not yet ended.
    active: int = 0


# ---------------------------------------------------------------------------- resolvers


class ResolutionError(StokerError):
    """A name could not be resolved (unknown, no addresses, or too slow)."""


class Resolver(Protocol):
    """Turns a host name into addresses; the proxy calls it once per connection."""

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        """The addresses of ``host`` (raises :class:`ResolutionError` if there are none)."""
        ...


class SystemResolver:
    """The host's resolver (``getaddrinfo`` in the loop's executor, TCP, IPv4 and IPv6).

    ``getaddrinfo`` blocks a thread of the loop's default executor; at most
    ``max_concurrent`` lookups of this resolver run at once, so one VM's guest
    cannot occupy every thread, and each lookup is abandoned after ``timeout``
    seconds (the thread finishes on its own).
    """

    def __init__(self, *, timeout: float = 10.0, max_concurrent: int = 4) -> None:
        self.timeout = timeout
        self._slots = asyncio.Semaphore(max_concurrent)

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        """Resolve ``host`` for a TCP connection to ``port``."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.timeout), self._slots:
                infos = await loop.getaddrinfo(
                    host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
                )
        except TimeoutError:
            raise ResolutionError(f"resolving {host} timed out after {self.timeout:g}s") from None
        except OSError as exc:
            raise ResolutionError(f"cannot resolve {host}: {exc.strerror or exc}") from None
        found: list[IPAddress] = []
        for family, _type, _proto, _name, sockaddr in infos:
            if family not in (socket.AF_INET, socket.AF_INET6):
                continue
            try:
                address = ipaddress.ip_address(sockaddr[0])
            except ValueError:
                continue
            if address not in found:
                found.append(address)
        if not found:
            raise ResolutionError(f"cannot resolve {host}: no addresses")
        return found


class MappingResolver:
    """A fixed table of names and their addresses, for tests and benchmarks.

    It never touches the network: an unknown name raises :class:`ResolutionError`.
    Names are matched case-insensitively, without a trailing dot.  Every lookup is
    appended to :attr:`lookups`, so tests can check that a name is resolved once.
    """

    def __init__(self, mapping: Mapping[str, Iterable[str | IPAddress]]) -> None:
        self._table: dict[str, list[IPAddress]] = {
            _fold_name(name): [ipaddress.ip_address(a) for a in addresses]
            for name, addresses in mapping.items()
        }
        self.lookups: list[str] = []

    async def resolve(self, host: str, port: int) -> list[IPAddress]:
        """The addresses listed for ``host``."""
        self.lookups.append(host)
        addresses = self._table.get(_fold_name(host))
        if not addresses:
            raise ResolutionError(f"cannot resolve {host}: unknown name")
        return list(addresses)


def _fold_name(name: str) -> str:
    name = name.lower()
    return name[:-1] if name.endswith(".") else name


# ---------------------------------------------------------------------------- streams


class StreamWriterLike(Protocol):
    """The writing half of a guest connection (:class:`asyncio.StreamWriter` is one)."""

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def can_write_eof(self) -> bool: ...

    def write_eof(self) -> None: ...

    def close(self) -> None: ...

    def is_closing(self) -> bool: ...

    async def wait_closed(self) -> None: ...


class _Input:
    """The guest's side of a connection, with bytes read ahead but not yet consumed."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.pending = bytearray()

    async def read(self, n: int) -> bytes:
        if self.pending:
            data = bytes(self.pending[:n])
            del self.pending[:n]
            return data
        return await self.reader.read(n)

    async def more(self, limit: int) -> bool:
        """Read more into :attr:`pending` (never beyond ``limit`` bytes); False at EOF."""
        want = limit - len(self.pending)
        if want <= 0:
            return True
        data = await self.reader.read(want)
        self.pending += data
        return bool(data)

    async def fill(self, n: int) -> bool:
        """Make :attr:`pending` hold at least ``n`` bytes; False if EOF came first."""
        while len(self.pending) < n:
            if not await self.more(n):
                return False
        return True

    async def line(self, limit: int) -> bytes | None:
        """One CRLF-terminated line (without CRLF); None at EOF or beyond ``limit``."""
        start = 0
        while True:
            end = self.pending.find(b"\r\n", start)
            if end >= 0:
                data = bytes(self.pending[:end])
                del self.pending[: end + 2]
                return data
            if len(self.pending) >= limit + 2:
                return None
            start = max(0, len(self.pending) - 1)
            if not await self.more(limit + 2):
                return None


# ---------------------------------------------------------------------------- parsing


class _End(Exception):
    """Ends a connection: its decision, reason, and the HTTP status to answer (if any)."""

    def __init__(self, decision: Decision, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.decision: Decision = decision
        self.reason = reason
        self.status = status


def _bad(reason: str) -> _End:
    return _End("denied", reason, 400)


_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/1\.([01])")
_HEADER_LINE = re.compile(rb"(" + _TOKEN + rb"):[ \t]*([\t\x20-\x7e\x80-\xff]*?)[ \t]*")
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_DIGITS = re.compile(r"[0-9]{1,5}")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")

#: Headers that describe one hop, not the request (RFC 9110 section 7.6.1), and
#: those the proxy writes itself.
_HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


@dataclass
class _Request:
    method: str
    target: str
    version: str  # "0" or "1": the minor version of HTTP/1.x
    headers: list[tuple[str, str]]

    def values(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name]


def _parse_request_line(line: bytes) -> tuple[str, str, str]:
    match = _REQUEST_LINE.fullmatch(line)
    if match is None:
        raise _bad("malformed request line")
    method, target, minor = (g.decode("ascii") for g in match.groups())
    return method, target, minor


def _parse_head(head: bytes) -> _Request:
    lines = head[:-4].split(b"\r\n")
    method, target, version = _parse_request_line(lines[0])
    if len(lines) - 1 > MAX_HEADERS:
        raise _bad(f"more than {MAX_HEADERS} header fields")
    headers = []
    for raw in lines[1:]:
        match = _HEADER_LINE.fullmatch(raw)
        if match is None:
            # Also refuses obsolete line folding and bare CR/LF, which servers read differently.
            raise _bad("malformed header field")
        name, value = (g.decode("latin-1") for g in match.groups())
        headers.append((name, value))
    return _Request(method, target, version, headers)


def _valid_hostname(name: str) -> bool:
    """A DNS name of letters, digits, ``-`` and ``_``, not something that reads as a number."""
    if not name or len(name) > 253 or not name.isascii():
        return False
    labels = name.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        return False
    # "127.1", "0x7f.1" and "2130706433" are IPv4 addresses to inet_aton (and so
    # to getaddrinfo); a real top-level domain is never all digits.
    if labels[-1].isdigit():
        return False
    try:
        socket.inet_aton(name)
    except OSError:
        return True
    return False


def _parse_authority(text: str, *, default_port: int | None) -> tuple[str, IPAddress | None, int]:
    """``host[:port]`` -> (normalised host, its address if a literal, port); raises 400."""
    if "@" in text:
        raise _bad("user information in the target")
    port_text: str | None
    address: IPAddress | None
    if text.startswith("["):
        inner, bracket, rest = text[1:].partition("]")
        if not bracket or "%" in inner:
            raise _bad("malformed IPv6 address")
        try:
            address = ipaddress.IPv6Address(inner)
        except ValueError:
            raise _bad("malformed IPv6 address") from None
        host = str(address)
        if rest and not rest.startswith(":"):
            raise _bad("malformed target")
        port_text = rest[1:] if rest else None
    else:
        host, colon, after = text.partition(":")
        port_text = after if colon else None
        try:
            address = ipaddress.IPv4Address(host)
        except ValueError:
            address = None
            host = _fold_name(host)
            if not _valid_hostname(host):
                raise _bad("malformed host name") from None
        else:
            host = str(address)
    if port_text is None:
        if default_port is None:
            raise _bad("no port in the target")
        return host, address, default_port
    if not _DIGITS.fullmatch(port_text) or not 0 < int(port_text) < 65536:
        raise _bad("malformed port")
    return host, address, int(port_text)


def _authority(host: str, port: int, default_port: int) -> str:
    host = f"[{host}]" if ":" in host else host
    return host if port == default_port else f"{host}:{port}"


def _printable(text: str, limit: int = 200) -> str:
    """``text`` safe for a header line and a log line."""
    return "".join(c if " " <= c <= "~" else "?" for c in text[:limit])


_STATUS_TEXT = {
    400: "Bad Request",
    403: "Forbidden",
    408: "Request Timeout",
    429: "Too Many Requests",
    502: "Bad Gateway",
    503: "Service Unavailable",
}


def _error_response(status: int, record: ConnectionRecord) -> bytes:
    reason = _printable(record.reason)
    body = f"stoker egress proxy: {_printable(record.describe())}\n".encode()
    return (
        f"HTTP/1.1 {status} {_STATUS_TEXT.get(status, 'Error')}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"X-Stoker-Deny-Reason: {reason}\r\n"
        "Connection: close\r\n"
        "\r\n"
    ).encode("ascii") + body


# ---------------------------------------------------------------------------- TLS ClientHello


@dataclass(frozen=True)
class ClientHello:
    """What the proxy needs from a client's first TLS record."""

    #: The ``server_name`` extension's ``host_name``, lower case without a
    #: trailing dot; None if the client sent none.
    sni: str | None


class _Malformed(Exception):
    pass


class _Cursor:
    """Bounds-checked reads from a byte string; any overrun raises :class:`_Malformed`."""

    def __init__(self, data: bytes | memoryview, what: str = "ClientHello") -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.what = what

    def done(self) -> bool:
        return self.pos == len(self.data)

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> memoryview:
        if n > self.remaining():
            raise _Malformed(f"truncated {self.what}")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def uint(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def vector(self, length_size: int, what: str | None = None) -> _Cursor:
        return _Cursor(self.take(self.uint(length_size)), what or self.what)

    def rest(self) -> bytes:
        return bytes(self.take(self.remaining()))


def parse_client_hello(data: bytes) -> ClientHello | str:
    """Parse the first TLS record a client sent: a ClientHello, or why it is not one.

    ``data`` starts with the record header; bytes after the first record are
    ignored.  A ClientHello longer than its record (split over several records) is
    refused.  Never raises, whatever ``data`` holds.
    """
    try:
        return _parse_client_hello(data)
    except _Malformed as exc:
        return str(exc)


def _parse_client_hello(data: bytes) -> ClientHello:
    record = _Cursor(data, "TLS record")
    if record.uint(1) != 0x16:
        raise _Malformed("not a TLS handshake record")
    if record.uint(1) != 3:
        raise _Malformed("not a TLS record")
    record.take(1)  # minor version: any (it is legacy, even 0x01 for TLS 1.0)
    length = record.uint(2)
    if not 0 < length <= MAX_TLS_RECORD:
        raise _Malformed("TLS record length out of range")
    body = _Cursor(record.take(length))
    if body.uint(1) != 1:
        raise _Malformed("first handshake message is not a ClientHello")
    hello_length = body.uint(3)
    if hello_length > body.remaining():
        raise _Malformed("ClientHello split over several TLS records")
    hello = _Cursor(body.take(hello_length))
    if not body.done():
        raise _Malformed("data after the ClientHello in its record")
    if hello.uint(1) != 3:
        raise _Malformed("unknown ClientHello version")
    hello.take(1 + 32)  # minor version, random
    if hello.vector(1).remaining() > 32:
        raise _Malformed("session id longer than 32 bytes")
    suites = hello.vector(2).remaining()
    if suites == 0 or suites % 2:
        raise _Malformed("malformed cipher suite list")
    if hello.vector(1).remaining() == 0:
        raise _Malformed("no compression methods")
    if hello.done():
        return ClientHello(sni=None)  # no extensions at all (very old clients)
    extensions = hello.vector(2, "extensions")
    if not hello.done():
        raise _Malformed("data after the ClientHello extensions")
    seen: set[int] = set()
    sni: str | None = None
    while not extensions.done():
        kind = extensions.uint(2)
        payload = extensions.vector(2, "extension")
        if kind in seen:
            # A server may read the other copy than we did: refuse the ambiguity.
            raise _Malformed("duplicate TLS extension")
        seen.add(kind)
        if kind == 0:
            sni = _parse_server_name(payload)
    return ClientHello(sni=sni)


def _parse_server_name(ext: _Cursor) -> str | None:
    names = ext.vector(2, "server_name extension")
    if not ext.done():
        raise _Malformed("data after the server name list")
    host: str | None = None
    while not names.done():
        kind = names.uint(1)
        name = names.vector(2, "server name").rest()
        if kind != 0:
            continue
        if host is not None:
            raise _Malformed("more than one host_name in the server_name extension")
        try:
            text = _fold_name(name.decode("ascii"))
        except UnicodeDecodeError:
            raise _Malformed("invalid server name") from None
        if not _valid_hostname(text):
            raise _Malformed("invalid server name")
        host = text
    return host


# ---------------------------------------------------------------------------- limits


class _TokenBucket:
    """A shared byte rate: bursts of at most a quarter second, waiters served in turn."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.burst = max(1, min(rate // 4, CHUNK))
        self._tokens = float(self.burst)
        self._stamp = time.monotonic()
        self._turn = asyncio.Lock()

    async def take(self, n: int) -> int:
        """Wait until ``n`` bytes (at most one burst) may pass; returns how many."""
        n = min(n, self.burst)
        async with self._turn:
            while True:
                now = time.monotonic()
                self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
                self._stamp = now
                if self._tokens >= n:
                    self._tokens -= n
                    return n
                await asyncio.sleep((n - self._tokens) / self.rate)


# ---------------------------------------------------------------------------- the proxy


@dataclass(eq=False)
class _Conn:
    record: ConnectionRecord
    client: _Input
    writer: StreamWriterLike
    t0: float
    admitted: bool
    upstream: asyncio.StreamWriter | None = None
    responded: bool = False
    ended: bool = False
    last_activity: float = 0.0

    def touch(self) -> None:
        self.last_activity = time.monotonic()


class EgressProxy:
    """The egress proxy of one VM: allowlist, address checks, SNI check, limits, records.

    ``policy`` gives the allowlist and :class:`~stoker.net.policy.Limits`; every
    limit is per proxy, i.e. per VM.  ``vm`` and ``job`` label the records.
    ``resolver`` defaults to :class:`SystemResolver`; ``host_addresses`` are the
    host's own addresses, refused like private ones.  ``on_record`` is called with
    each :class:`ConnectionRecord` as its connection ends (it must not block).

    For tests: ``tls_ports`` replaces :data:`~stoker.net.policy.TLS_PORTS` (so an
    ephemeral port can be marked as TLS), and ``idle_timeout_override`` replaces
    the policy's idle timeout, which :class:`~stoker.net.policy.Limits` does not
    allow below 120 seconds.
    """

    def __init__(
        self,
        policy: NetworkPolicy,
        *,
        vm: str,
        job: str | None = None,
        resolver: Resolver | None = None,
        on_record: Callable[[ConnectionRecord], None] | None = None,
        host_addresses: frozenset[IPAddress] | None = None,
        tls_ports: frozenset[int] = TLS_PORTS,
        idle_timeout_override: float | None = None,
        max_records: int = 1000,
    ) -> None:
        self.policy = policy
        self.limits = policy.limits
        self.vm = vm
        self.job = job
        self.resolver: Resolver = (
            resolver
            if resolver is not None
            else SystemResolver(timeout=self.limits.connect_timeout)
        )
        self.on_record = on_record
        self.host_addresses = host_addresses
        self.tls_ports = tls_ports
        self.idle_timeout = (
            idle_timeout_override if idle_timeout_override is not None else self.limits.idle_timeout
        )
        self.header_timeout = self.limits.header_timeout
        #: The last ``max_records`` connection records, oldest first.
        self.records: collections.deque[ConnectionRecord] = collections.deque(maxlen=max_records)
        self.stats = ProxyStats()
        self._seq = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._admissions: collections.deque[float] = collections.deque()
        self._bucket = (
            _TokenBucket(self.limits.bytes_per_second)
            if self.limits.bytes_per_second is not None
            else None
        )
        self._bytes_total = 0
        self._exhausted = asyncio.Event()
        self._closed = False
        self._denials: collections.Counter[str] = collections.Counter()
        self._denials_dropped = 0
        self._refusals_logged_since = 0.0
        self._refusals_logged = 0
        self._log = log

    # ------------------------------------------------------------------ public

    async def handle(
        self, reader: asyncio.StreamReader, writer: StreamWriterLike
    ) -> ConnectionRecord:
        """Serve one guest connection until it ends; returns (and emits) its record.

        Never raises, except :class:`asyncio.CancelledError` when the caller is
        cancelled; ``writer`` is always closed.  The work runs in a task of its own
        that :meth:`aclose` can cancel without cancelling the caller.
        """
        self._seq += 1
        record = ConnectionRecord(vm=self.vm, job=self.job, conn=self._seq, started=time.time())
        refusal = self._admit()
        conn = _Conn(record, _Input(reader), writer, time.monotonic(), admitted=refusal is None)
        conn.touch()
        if refusal is None:
            self.stats.active += 1
        task = asyncio.get_running_loop().create_task(
            self._run(conn, refusal), name=f"egress-{self.vm}-{record.conn}"
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # A task cancelled before it started never runs _run's cleanup.
        task.add_done_callback(lambda _: self._end(conn))
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            task.cancel()
            await asyncio.wait({task})
            raise
        finally:
            if task.done() and not task.cancelled():
                task.exception()  # _run handles every error; this only marks it retrieved
        return record

    @contextlib.asynccontextmanager
    async def serve_tcp(self, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[int]:
        """Serve the proxy on a TCP port (tests, benchmarks); yields the bound port.

        On exit the server is closed and every connection it accepted is ended.
        """
        handlers: set[asyncio.Task[Any]] = set()

        async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            handlers.add(task)
            try:
                await self.handle(reader, writer)
            except asyncio.CancelledError:
                # Only our own exit cancels these tasks; ending them normally keeps
                # Python 3.11's start_server from logging the cancellation as an error.
                pass
            finally:
                handlers.discard(task)

        server = await asyncio.start_server(on_client, host, port, limit=CHUNK, backlog=1024)
        try:
            yield server.sockets[0].getsockname()[1]
        finally:
            server.close()
            for task in list(handlers):
                task.cancel()
            if handlers:
                await asyncio.wait(list(handlers))
            await server.wait_closed()

    async def aclose(self) -> None:
        """End every connection (upstream sockets closed, records emitted) and wait.

        Idempotent; later connections are refused.
        """
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    def denied_summary(self, limit: int = 10) -> list[str]:
        """The most frequent refusals and errors, most frequent first.

        One line each, e.g. ``evil.example:443: not in allowlist (3x)``.
        """
        lines = []
        for key, count in self._denials.most_common(limit):
            lines.append(key if count == 1 else f"{key} ({count}x)")
        others = sum(self._denials.values()) - sum(c for _, c in self._denials.most_common(limit))
        others += self._denials_dropped
        if others:
            lines.append(f"... and {others} more")
        return lines

    # ------------------------------------------------------------------ admission

    def _admit(self) -> tuple[int, str] | None:
        """None if a new connection may proceed, else (status, reason); cheap, no I/O."""
        if self._closed:
            return 503, "proxy closed"
        if self._exhausted.is_set():
            return 429, "total byte limit reached"
        limits = self.limits
        if self.stats.active >= limits.max_connections:
            return 429, f"connection limit ({limits.max_connections}) reached"
        now = time.monotonic()
        while self._admissions and self._admissions[0] <= now - 60.0:
            self._admissions.popleft()
        if len(self._admissions) >= limits.connections_per_minute:
            return 429, f"connection rate limit ({limits.connections_per_minute}/min) reached"
        self._admissions.append(now)
        return None

    # ------------------------------------------------------------------ one connection

    async def _run(self, conn: _Conn, refusal: tuple[int, str] | None) -> None:
        record = conn.record
        try:
            try:
                if refusal is not None:
                    raise _End("denied", refusal[1], refusal[0])
                await self._serve(conn)
            except _End as end:
                record.decision = end.decision
                record.reason = end.reason
                if end.status is not None and not conn.responded:
                    await self._answer(conn, end.status)
        except asyncio.CancelledError:
            if not record.reason or record.decision == "allowed":
                record.reason = "proxy closed"
            raise
        except Exception as exc:  # a bug must end this connection only, and be visible
            record.decision = "error"
            record.reason = f"internal error ({type(exc).__name__})"
            self._log.error(
                "egress proxy %s: connection %d failed", self.vm, record.conn, exc_info=True
            )
        finally:
            await self._finish(conn)

    async def _serve(self, conn: _Conn) -> None:
        try:
            async with asyncio.timeout(self.header_timeout):
                head = await self._read_head(conn)
        except TimeoutError:
            raise _End(
                "denied", f"request head not received within {self.header_timeout:g}s", 408
            ) from None
        request = _parse_head(head)
        conn.record.method = request.method
        if request.method == "CONNECT":
            await self._connect(conn, request)
        else:
            await self._http(conn, request)

    async def _read_head(self, conn: _Conn) -> bytes:
        client = conn.client
        checked_line = False
        while True:
            end = client.pending.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(client.pending[: end + 4])
                del client.pending[: end + 4]
                return head
            if client.pending[:1] == b"\x16":
                raise _bad("TLS sent to the proxy (it speaks plain HTTP: use an http:// proxy URL)")
            if not checked_line:
                # Refuse garbage as soon as its first line is there, not at the timeout.
                line_end = client.pending.find(b"\r\n")
                if line_end >= 0:
                    _parse_request_line(bytes(client.pending[:line_end]))
                    checked_line = True
            if len(client.pending) >= MAX_HEAD:
                raise _bad(f"request head larger than {MAX_HEAD // 1024} KiB")
            if not await client.more(MAX_HEAD):
                if client.pending:
                    raise _bad("client closed in the middle of the request head")
                raise _End("error", "client closed before sending a request")

    # ------------------------------------------------------------------ CONNECT

    async def _connect(self, conn: _Conn, request: _Request) -> None:
        record = conn.record
        host, address, port = _parse_authority(request.target, default_port=None)
        record.host, record.port = host, port
        self._check_destination(conn, host, address, port)
        reader, writer = await self._open_upstream(conn, host, address, port)
        record.decision = "allowed"
        record.reason = "closed"
        conn.responded = True
        conn.writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await conn.writer.drain()
        if port in self.tls_ports:
            await self._check_client_hello(conn, host, address, port)
        await self._relay(
            conn,
            up=self._pump(conn, conn.client.read, writer, up=True),
            down=self._pump(conn, reader.read, conn.writer, up=False),
            until_down=False,
        )

    async def _check_client_hello(
        self, conn: _Conn, host: str, address: IPAddress | None, port: int
    ) -> None:
        client = conn.client
        try:
            async with asyncio.timeout(self.header_timeout):
                if not await client.fill(5):
                    raise _End("allowed", "client closed before its TLS ClientHello")
                head = bytes(client.pending[:5])
                if head[0] != 0x16 or head[1] != 3:
                    raise _End("denied", "not TLS on a TLS port")
                length = int.from_bytes(head[3:5], "big")
                if not 0 < length <= MAX_TLS_RECORD:
                    raise _End("denied", "not TLS on a TLS port")
                if not await client.fill(5 + length):
                    raise _End("allowed", "client closed in the middle of its TLS ClientHello")
        except TimeoutError:
            raise _End(
                "denied", f"TLS ClientHello not received within {self.header_timeout:g}s"
            ) from None
        hello = parse_client_hello(bytes(client.pending[: 5 + length]))
        if isinstance(hello, str):
            raise _End("denied", f"invalid TLS ClientHello: {hello}")
        conn.record.sni = hello.sni
        if address is None:
            if hello.sni is None:
                raise _End("denied", f"no SNI in the TLS ClientHello for {host}")
            if hello.sni != host:
                raise _End("denied", f"SNI {hello.sni} does not match CONNECT host {host}")
        elif hello.sni is not None and self.policy.match_host(hello.sni, port) is None:
            # An allowed address may serve many names (a CDN): the name asked for
            # must be allowed too.
            raise _End("denied", f"SNI {hello.sni} (CONNECT to address {host}) not in allowlist")

    # ------------------------------------------------------------------ plain HTTP

    async def _http(self, conn: _Conn, request: _Request) -> None:
        record = conn.record
        target = request.target
        if target[:7].lower() != "http://":
            if target.startswith("/") or target == "*":
                raise _bad("not a proxy request (origin-form target; use an absolute http:// URI)")
            raise _bad("only http:// URIs are proxied (use CONNECT for https)")
        rest = target[7:]
        split = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
        authority, path = rest[:split], rest[split:]
        if "#" in path:
            raise _bad("fragment in the request target")
        path = path if path.startswith("/") else "/" + path
        host, address, port = _parse_authority(authority, default_port=80)
        record.host, record.port = host, port

        hosts = request.values("host")
        if len(hosts) > 1:
            raise _bad("more than one Host header")
        if hosts:
            try:
                claimed = _parse_authority(hosts[0], default_port=80)
            except _End:
                claimed = None
            if claimed is None or (claimed[0], claimed[2]) != (host, port):
                raise _End("denied", "Host header mismatch", 403)
        body = self._body_framing(request)
        if port in self.tls_ports:
            raise _End("denied", "not TLS on a TLS port", 403)
        self._check_destination(conn, host, address, port)

        drop = set(_HOP_HEADERS)
        for value in request.values("connection"):
            drop.update(token.strip().lower() for token in value.split(","))
        lines = [
            f"{request.method} {path} HTTP/1.{request.version}",
            f"Host: {_authority(host, port, 80)}",
        ]
        for name, value in request.headers:
            lowered = name.lower()
            if lowered in drop or lowered.startswith("proxy-"):
                continue
            lines.append(f"{name}: {value}")
        if body == "chunked":
            lines.append("Transfer-Encoding: chunked")
        elif body is not None:
            lines.append(f"Content-Length: {body}")
        lines += ["Connection: close", "", ""]
        head = "\r\n".join(lines).encode("latin-1")

        reader, writer = await self._open_upstream(conn, host, address, port)
        record.decision = "allowed"
        record.reason = "closed"

        async def upload() -> None:
            await self._send(conn, writer, head, up=True)
            await self._forward_body(conn, writer, body)
            # Then nothing more from the client: a pipelined second request must
            # not reach whatever else lives on this address.

        await self._relay(
            conn,
            up=upload(),
            down=self._pump(conn, reader.read, conn.writer, up=False),
            until_down=True,
        )
        await self._linger(conn)

    @staticmethod
    def _body_framing(request: _Request) -> int | Literal["chunked"] | None:
        """The request body: its length, or ``"chunked"``; refuses ambiguous framing."""
        encodings = request.values("transfer-encoding")
        lengths = request.values("content-length")
        if encodings:
            if lengths:
                raise _bad("both Transfer-Encoding and Content-Length")
            if request.version == "0":
                raise _bad("Transfer-Encoding in an HTTP/1.0 request")
            codings = [c.strip().lower() for v in encodings for c in v.split(",")]
            if codings != ["chunked"]:
                raise _bad("unsupported Transfer-Encoding")
            return "chunked"
        values = {v.strip() for value in lengths for v in value.split(",")}
        if not values:
            return None
        if len(values) > 1:
            raise _bad("conflicting Content-Length headers")
        (value,) = values
        if not re.fullmatch(r"[0-9]{1,18}", value):
            raise _bad("malformed Content-Length")
        return int(value)

    async def _forward_body(
        self, conn: _Conn, dst: StreamWriterLike, body: int | Literal["chunked"] | None
    ) -> None:
        if body == "chunked":
            await self._forward_chunked(conn, dst)
            return
        remaining = body or 0
        while remaining:
            data = await conn.client.read(min(remaining, self._chunk_size()))
            if not data:
                raise _End("allowed", "client closed in the middle of the request body")
            conn.touch()
            remaining -= len(data)
            await self._send(conn, dst, data, up=True)

    async def _forward_chunked(self, conn: _Conn, dst: StreamWriterLike) -> None:
        """Parse a chunked body and send it re-encoded (sizes only, no extensions, no trailers)."""
        client = conn.client
        while True:
            line = await client.line(MAX_CHUNK_LINE)
            if line is None:
                raise _End("denied", "malformed chunked request body")
            size_text = line.split(b";", 1)[0].strip(b" \t")
            if not _HEX.fullmatch(size_text):
                raise _End("denied", "malformed chunked request body")
            size = int(size_text, 16)
            conn.touch()
            if size == 0:
                break
            await self._send(conn, dst, b"%x\r\n" % size, up=True)
            remaining = size
            while remaining:
                data = await client.read(min(remaining, self._chunk_size()))
                if not data:
                    raise _End("allowed", "client closed in the middle of the request body")
                conn.touch()
                remaining -= len(data)
                await self._send(conn, dst, data, up=True)
            if await client.line(0) != b"":
                raise _End("denied", "malformed chunked request body")
            await self._send(conn, dst, b"\r\n", up=True)
        trailers = 0
        while True:
            line = await client.line(MAX_CHUNK_LINE)
            if line is None:
                raise _End("denied", "malformed chunked request body")
            if not line:
                break
            trailers += len(line) + 2
            if trailers > MAX_HEAD:
                raise _End("denied", "chunked request trailers too large")
        await self._send(conn, dst, b"0\r\n\r\n", up=True)

    # ------------------------------------------------------------------ destination checks

    def _check_destination(
        self, conn: _Conn, host: str, address: IPAddress | None, port: int
    ) -> AllowEntry:
        if address is not None:
            entry = self.policy.match_ip(address, port)
        else:
            entry = self.policy.match_host(host, port)
        if entry is None:
            raise _End("denied", "not in allowlist", 403)
        conn.record.rule = str(entry)
        return entry

    def _address_problem(self, address: IPAddress, port: int) -> str | None:
        """Why ``address`` may not be dialled, or None (public, or listed by an IP entry)."""
        problem = address_problem(address, host_addresses=self.host_addresses)
        if problem is not None and self.policy.match_ip(address, port) is not None:
            return None  # an IP entry is an explicit decision to allow this address
        return problem

    async def _open_upstream(
        self, conn: _Conn, host: str, address: IPAddress | None, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Resolve once, check every address, dial one of them by IP."""
        record = conn.record
        timeout = self.limits.connect_timeout
        deadline = time.monotonic() + timeout
        if address is not None:
            addresses: list[IPAddress] = [address]
        else:
            try:
                async with asyncio.timeout(timeout):
                    resolved = await self.resolver.resolve(host, port)
            except TimeoutError:
                raise _End("error", f"resolving {host} timed out after {timeout:g}s", 502) from None
            except ResolutionError as exc:
                raise _End("error", str(exc), 502) from None
            addresses = []
            for item in resolved:
                if item not in addresses:
                    addresses.append(item)
            addresses = addresses[:MAX_ADDRESSES]
            if not addresses:
                raise _End("error", f"cannot resolve {host}: no addresses", 502)
        record.resolved = [str(a) for a in addresses]
        for item in addresses:
            problem = self._address_problem(item, port)
            if problem is not None:
                raise _End("denied", f"resolves to {item} ({problem})", 403)

        failure = "upstream unreachable"
        for index, item in enumerate(addresses):
            left = deadline - time.monotonic()
            if left <= 0:
                failure = f"connect timed out after {timeout:g}s"
                break
            try:
                # Share what is left among the addresses still to try, so one
                # black hole does not use up the whole budget.
                reader, writer = await self._dial(item, port, left / (len(addresses) - index))
            except TimeoutError:
                failure = f"connect timed out after {timeout:g}s"
                continue
            except ConnectionRefusedError:
                failure = "upstream refused"
                continue
            except OSError as exc:
                failure = f"upstream unreachable ({exc.strerror or type(exc).__name__})"
                continue
            conn.upstream = writer
            record.dialled = _authority(str(item), port, -1)
            return reader, writer
        raise _End("error", failure, 502)

    async def _dial(
        self, address: IPAddress, port: int, timeout: float
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect to ``address`` itself: a socket and an address, never a name."""
        family = socket.AF_INET if address.version == 4 else socket.AF_INET6
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            async with asyncio.timeout(timeout):
                await asyncio.get_running_loop().sock_connect(sock, (str(address), port))
            return await asyncio.open_connection(sock=sock, limit=CHUNK)
        except BaseException:
            sock.close()
            raise

    # ------------------------------------------------------------------ relaying

    def _chunk_size(self) -> int:
        return CHUNK if self._bucket is None else self._bucket.burst

    async def _send(self, conn: _Conn, dst: StreamWriterLike, data: bytes, *, up: bool) -> None:
        """Forward ``data``: paced by the byte rate, cut at the total byte budget."""
        view = memoryview(data)
        while view:
            n = len(view)
            if self._bucket is not None:
                n = await self._bucket.take(n)
            total = self.limits.total_bytes
            cut = total is not None and self._bytes_total + n > total
            if total is not None and cut:
                n = max(0, total - self._bytes_total)
            if n:
                self._count(conn, n, up=up)
                dst.write(data if n == len(data) else bytes(view[:n]))
                await dst.drain()
                conn.touch()
            if cut:
                self._exhausted.set()
                raise _End("denied", "total byte limit reached")
            view = view[n:]

    def _count(self, conn: _Conn, n: int, *, up: bool) -> None:
        self._bytes_total += n
        if up:
            conn.record.bytes_up += n
            self.stats.bytes_up += n
        else:
            conn.record.bytes_down += n
            self.stats.bytes_down += n

    async def _pump(
        self,
        conn: _Conn,
        read: Callable[[int], Coroutine[Any, Any, bytes]],
        dst: StreamWriterLike,
        *,
        up: bool,
    ) -> None:
        """Copy one direction until EOF, one bounded chunk at a time, then pass the EOF on."""
        while True:
            data = await read(self._chunk_size())
            if not data:
                break
            conn.touch()
            await self._send(conn, dst, data, up=up)
        if not dst.can_write_eof():
            raise _End("allowed", "closed")
        dst.write_eof()

    async def _relay(
        self,
        conn: _Conn,
        *,
        up: Coroutine[Any, Any, None],
        down: Coroutine[Any, Any, None],
        until_down: bool,
    ) -> None:
        """Run both directions; end on idle, on the byte budget, or when they are done.

        ``until_down``: the relay ends when the upstream's side is finished (plain
        HTTP), instead of when both are.
        """
        loop = asyncio.get_running_loop()
        up_task = loop.create_task(up)
        down_task = loop.create_task(down)
        exhausted = loop.create_task(self._exhausted.wait())
        running = {up_task, down_task}
        try:
            while running:
                left = conn.last_activity + self.idle_timeout - time.monotonic()
                if left <= 0:
                    raise _End("allowed", f"idle for {self.idle_timeout:g}s")
                done, _ = await asyncio.wait(
                    {*running, exhausted}, timeout=left, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    if task is exhausted:
                        continue
                    running.discard(task)
                    exc = task.exception()
                    if isinstance(exc, _End):
                        raise exc
                    if isinstance(exc, OSError):
                        raise _End("allowed", "connection reset")
                    if exc is not None:
                        raise exc
                if exhausted in done:
                    raise _End("denied", "total byte limit reached")
                if until_down and down_task.done():
                    return
        finally:
            for task in (up_task, down_task, exhausted):
                task.cancel()
            await asyncio.wait({up_task, down_task, exhausted})
            for task in (up_task, down_task):
                if not task.cancelled():
                    task.exception()  # retrieved: a second failure is not worth a warning

    # ------------------------------------------------------------------ answering and closing

    async def _answer(self, conn: _Conn, status: int) -> None:
        """Send an error response, then close politely (bounded)."""
        conn.responded = True
        with contextlib.suppress(OSError, RuntimeError):
            conn.writer.write(_error_response(status, conn.record))
        await self._linger(conn)

    async def _linger(self, conn: _Conn) -> None:
        """Half-close towards the client, then read and drop what it still sends (bounded).

        Closing a socket with unread input resets the connection, and the client
        may then lose our answer before reading it.
        """
        conn.client.pending.clear()
        with contextlib.suppress(OSError, RuntimeError, TimeoutError):
            async with asyncio.timeout(LINGER_SECONDS):
                await conn.writer.drain()
                if not conn.writer.can_write_eof():
                    return
                conn.writer.write_eof()
                dropped = 0
                while dropped < LINGER_BYTES:
                    data = await conn.client.reader.read(CHUNK)
                    if not data:
                        break
                    dropped += len(data)

    async def _finish(self, conn: _Conn) -> None:
        self._end(conn)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(LINGER_SECONDS):
                for writer in (conn.upstream, conn.writer):
                    if writer is not None:
                        await writer.wait_closed()

    def _end(self, conn: _Conn) -> None:
        """Close both sides, release the slot, emit the record; once per connection."""
        if conn.ended:
            return
        conn.ended = True
        record = conn.record
        if not record.reason:
            record.reason = "proxy closed"
        for writer in (conn.upstream, conn.writer):
            if writer is not None:
                with contextlib.suppress(Exception):
                    writer.close()
        if conn.admitted:
            self.stats.active -= 1
        record.duration = time.monotonic() - conn.t0
        self._emit(record, refused=not conn.admitted)

    def _emit(self, record: ConnectionRecord, *, refused: bool) -> None:
        if record.decision == "allowed":
            self.stats.allowed += 1
        elif record.decision == "denied":
            self.stats.denied += 1
        else:
            self.stats.errors += 1
        if record.decision != "allowed":
            key = record.describe().partition(" ")[2] if record.host else record.reason
            key = _printable(key)
            if key in self._denials or len(self._denials) < MAX_SUMMARY_KEYS:
                self._denials[key] += 1
            else:
                self._denials_dropped += 1
        self.records.append(record)
        level = logging.INFO if record.decision == "allowed" else logging.WARNING
        if refused:
            # Connections beyond the limits cost the guest nothing to make: log the
            # first few per minute, the rest only at DEBUG (all are still recorded).
            now = time.monotonic()
            if now - self._refusals_logged_since >= 60.0:
                self._refusals_logged_since, self._refusals_logged = now, 0
            self._refusals_logged += 1
            if self._refusals_logged > MAX_REFUSALS_LOGGED:
                level = logging.DEBUG
        self._log.log(
            level,
            "egress %s #%d: %s",
            self.vm,
            record.conn,
            _printable(record.describe(), 400),
            extra={"connection": record.as_dict()},
        )
        if self.on_record is not None:
            try:
                self.on_record(record)
            except Exception:  # the caller's bug must not break the proxy
                self._log.exception("egress %s: on_record callback failed", self.vm)
