"""Network policies: modes, allowlist entries, presets, limits and address checks.

A VM's :class:`NetworkPolicy` has a :data:`NetworkMode`:

* ``none`` (the default): no network at all;
* ``egress``: outbound connections only to destinations on the allowlist, made by
  the host-side proxy (:mod:`stoker.net.proxy`), which enforces this module's
  rules and :class:`Limits`; an empty allowlist denies everything;
* ``nat``: full outbound access through a real NIC.  Unsafe for untrusted code,
  so it is never implied: it must be asked for by name.

Allowlist entries
-----------------

Each entry is one string, written as on the command line (``--allow``) or in an
image spec's ``[network] allow = [...]``:

``HOST[:PORTS]``
    A host name: ``github.com``, ``github.com:443``.  Case does not matter and
    one trailing dot is ignored.  Internationalised names are accepted and kept in
    their ASCII (punycode) form: ``bücher.example`` is ``xn--bcher-kva.example``.
    A ``*`` matches any run of characters *within one label*, never a dot, and
    may sit inside a label: ``*.actions.githubusercontent.com``,
    ``productionresultssa*.blob.core.windows.net``.  So ``*.example.com``
    matches ``a.example.com`` but neither ``example.com`` nor
    ``a.b.example.com``.  The two last labels must be literal (``*.com`` and
    ``github.*`` are refused as too broad).  A lone ``*`` means *any host name*;
    the proxy still refuses names that resolve to loopback, private, link-local
    or other non-public addresses (see :func:`address_problem`).
``IP[:PORTS]``, ``NETWORK/BITS[:PORTS]``
    An IPv4 address or network: ``10.1.2.3:8443``, ``127.0.0.1:5000``,
    ``10.0.0.0/8:443``.  IPv6 goes in brackets when a port follows:
    ``[2001:db8::1]:443``, ``[2001:db8::/32]:443``; without a port the brackets
    may be left out: ``2001:db8::1``.  An address entry is an explicit decision,
    so it allows that address even if it is private or loopback; networks wider
    than /8 (IPv4) or /16 (IPv6) are refused, since they would switch those
    checks off wholesale.  A name that resolves to an address is only checked
    against host entries, never against address entries.
``@NAME``
    A preset: a vendor's documented host list (``@github-actions``,
    ``@gitlab.com``, ``@pypi``, ``@npm``, ``@debian``), kept in ``presets.toml``
    next to this module (:func:`load_presets`).

``PORTS`` is one port or a comma-separated list (``github.com:80,443``), each
1-65535; without ports an entry allows 80 and 443 (:data:`DEFAULT_PORTS`).
There is no "any port" form: list the ports.  Entries are not URLs: a scheme,
user-info, path, query or fragment is an error, as are whitespace, empty labels,
labels longer than 63 characters and names longer than 253.

Errors are :class:`PolicyError` (a :class:`~stoker.errors.UsageError`) naming the
entry as written; inside a pydantic model (an image spec, a REST request) they
surface as validation errors located at the offending field.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import fcntl
import functools
import ipaddress
import itertools
import re
import socket
import struct
import threading
import time
import tomllib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from encodings import idna
from importlib import resources
from typing import Annotated, Literal, cast, get_args

import pydantic
from pydantic import AfterValidator, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from stoker.errors import UsageError

NetworkMode = Literal["none", "egress", "nat"]
NETWORK_MODES: tuple[str, ...] = get_args(NetworkMode)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Ports an entry allows when it names none.
DEFAULT_PORTS: frozenset[int] = frozenset({80, 443})
#: Ports on which the proxy requires TLS with a matching SNI.
TLS_PORTS: frozenset[int] = frozenset({443})

#: Shortest prefix an address entry may have: wider networks would switch the
#: private/loopback address checks off for whole swathes of the address space.
MIN_PREFIX = {4: 8, 6: 16}

MAX_NAME_LENGTH = 253
MAX_LABEL_LENGTH = 63

_PRESET_FILE = "presets.toml"
_PRESET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]*$")
_PORTS = re.compile(r"^[0-9]+(?:,[0-9]+)*$")
# After IDNA conversion: letters, digits, '-', '_' (seen in real host names) and '*'.
_LABEL = re.compile(r"^[a-z0-9_*-]+$")
_HOST_LABEL = re.compile(r"^[a-z0-9_-]+$")
# Dots that IDNA (and browsers) treat as label separators.
_UNICODE_DOTS = str.maketrans({"\u3002": ".", "\uff0e": ".", "\uff61": "."})


class PolicyError(UsageError):
    """A network policy or allowlist entry is invalid; the message names it."""


def _show(text: str, limit: int = 300) -> str:
    """``text`` quoted for an error message; shortened past any real entry's length,
    since entries can be arbitrary input (a pasted file, a hostile request)."""
    if len(text) > limit:
        return repr(text[:limit] + "...")
    return repr(text)


def _entry_error(text: str, problem: str, hint: str | None = None) -> PolicyError:
    return PolicyError(f"allowlist entry {_show(text)}: {problem}", hint=hint)


# ---------------------------------------------------------------------------- entries


@dataclasses.dataclass(frozen=True)
class AllowEntry:
    """One parsed allowlist entry: a host glob or an IP network, and its ports."""

    #: The entry as written (or as listed in its preset).
    text: str
    #: Lower-case host glob in ASCII (IDNA) form; None for IP/CIDR entries.
    host: str | None
    #: The addresses an IP/CIDR entry allows; None for host entries.
    network: IPNetwork | None
    #: The ports allowed: the entry's own, or :data:`DEFAULT_PORTS`.
    ports: frozenset[int]
    #: The preset the entry came from, if any.
    preset: str | None = None

    def __post_init__(self) -> None:
        if (self.host is None) == (self.network is None):
            raise ValueError("an AllowEntry has exactly one of host and network")
        if not self.ports or not all(1 <= port <= 65535 for port in self.ports):
            raise ValueError(f"invalid ports {sorted(self.ports)}")

    def matches_host(self, host: str, port: int) -> bool:
        """Whether this host entry allows ``host:port`` (never true for IP entries).

        ``host`` is compared case-insensitively, without one trailing dot; names
        that are not valid ASCII host names match nothing.
        """
        if self.host is None or port not in self.ports:
            return False
        name = _normalise_host(host)
        return name is not None and _host_matches(self.host, name)

    def matches_ip(self, address: IPAddress, port: int) -> bool:
        """Whether this IP/CIDR entry allows ``address:port`` (never true for host entries)."""
        return self.network is not None and port in self.ports and address in self.network

    @property
    def canonical(self) -> str:
        """The entry in normal form, without its preset: parsing it gives the same entry."""
        ports = ",".join(str(port) for port in sorted(self.ports))
        if self.host is not None:
            return f"{self.host}:{ports}"
        assert self.network is not None
        single = self.network.prefixlen == self.network.max_prefixlen
        where = str(self.network.network_address) if single else str(self.network)
        if self.network.version == 6:
            where = f"[{where}]"
        return f"{where}:{ports}"

    def __str__(self) -> str:
        if self.preset is None:
            return self.canonical
        return f"{self.canonical} (preset {self.preset})"


def _normalise_host(host: str) -> str | None:
    """``host`` lower-cased without one trailing dot, or None if it is no valid ASCII name."""
    name = host.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name or len(name) > MAX_NAME_LENGTH or not name.isascii():
        return None
    labels = name.split(".")
    if not all(len(label) <= MAX_LABEL_LENGTH and _HOST_LABEL.match(label) for label in labels):
        return None
    return name


@functools.lru_cache(maxsize=1024)
def _glob_regex(pattern: str) -> re.Pattern[str]:
    # '*' never crosses a dot; host names are validated first, so labels are
    # never empty and "[^.]*" cannot match an empty label.
    return re.compile("[^.]*".join(re.escape(part) for part in pattern.split("*")))


def _host_matches(pattern: str, name: str) -> bool:
    if pattern == "*":
        return True
    if "*" not in pattern:
        return pattern == name
    return _glob_regex(pattern).fullmatch(name) is not None


@functools.lru_cache(maxsize=4096)
def parse_entry(text: str) -> tuple[AllowEntry, ...]:
    """Parse one allowlist entry (syntax in the module docstring).

    Returns one entry, or a preset's entries for ``@NAME``.  Raises
    :class:`PolicyError` naming ``text`` and saying what is wrong.
    """
    if not text:
        raise PolicyError("empty allowlist entry", hint="write a host, an address or @PRESET")
    if any(ch.isspace() for ch in text):
        raise _entry_error(text, "contains whitespace", hint="give one entry per --allow option")
    if not text.isprintable():
        raise _entry_error(text, "contains a control or other non-printable character")
    if text.startswith("@"):
        return _expand_preset(text)
    return (_parse_single(text),)


def _expand_preset(text: str) -> tuple[AllowEntry, ...]:
    name = text[1:]
    presets = load_presets()
    preset = presets.get(name)
    if preset is None:
        known = ", ".join(f"@{key}" for key in sorted(presets))
        close = difflib.get_close_matches(name, presets, n=1)
        raise _entry_error(
            text,
            f"unknown preset {_show(name)} (known presets: {known})",
            hint=f"did you mean @{close[0]}?" if close else None,
        )
    return tuple(
        dataclasses.replace(_parse_single(entry), preset=preset.name) for entry in preset.entries
    )


def _parse_single(text: str) -> AllowEntry:
    """Parse a host or address entry (not a preset)."""
    if "://" in text:
        rest = text.split("://", 1)[1].rpartition("@")[2]
        rest = re.split(r"[/?#]", rest, maxsplit=1)[0]
        raise _entry_error(
            text,
            "an entry is a host, not a URL: no scheme",
            hint=f"write {rest!r}" if rest else "write HOST[:PORT]",
        )
    if "@" in text:
        host = re.split(r"[/?#]", text.rpartition("@")[2], maxsplit=1)[0]
        raise _entry_error(
            text,
            "user-info ('@') is not allowed in an entry (presets are written @NAME alone)",
            hint=f"write {host!r}" if host else None,
        )
    for char, what in (("?", "a query"), ("#", "a fragment")):
        if char in text:
            raise _entry_error(text, f"{what} ({char!r}) is not allowed: entries are not URLs")
    if "%" in text:
        raise _entry_error(text, "'%' is not allowed (no percent-encoding or IPv6 zone IDs)")

    if text.startswith("["):
        return _parse_bracketed(text)
    if text.count(":") >= 2:
        return _parse_bare_ipv6(text)

    where, colon, port_text = text.partition(":")
    if not where:
        raise _entry_error(text, "no host before the port")
    if "/" in port_text:
        raise _entry_error(text, "a path is not allowed: entries name hosts, not URLs")
    ports = _parse_ports(text, port_text) if colon else DEFAULT_PORTS
    if _looks_ipv4(where.partition("/")[0]):
        return _address_entry(text, where, ports, version=4)
    if "/" in where:
        raise _entry_error(
            text,
            "a path is not allowed: entries name hosts, not URLs",
            hint=f"write {where.partition('/')[0]!r}",
        )
    return AllowEntry(text=text, host=_parse_host(text, where), network=None, ports=ports)


def _parse_ports(text: str, port_text: str) -> frozenset[int]:
    if not port_text:
        raise _entry_error(text, "empty port after ':'", hint="write HOST or HOST:PORT")
    if port_text == "*":
        raise _entry_error(
            text, "'*' is not a port: there is no any-port form", hint="list the ports: HOST:22,443"
        )
    if not _PORTS.match(port_text):
        bad = next((part for part in port_text.split(",") if not part.isdecimal()), port_text)
        problem = "empty port in the list" if not bad else f"port {_show(bad)} is not a number"
        raise _entry_error(text, problem)
    ports: set[int] = set()
    for part in port_text.split(","):
        # Bounded before int(): a huge digit string must not cost anything.
        port = int(part) if len(part) <= 5 else 0
        if not 1 <= port <= 65535:
            raise _entry_error(text, f"port {_show(part)} is out of range 1-65535")
        ports.add(port)
    return frozenset(ports)


def _looks_ipv4(text: str) -> bool:
    """All digits, dots (and '*'): meant as an IPv4 address, never a host name."""
    return any(ch.isdigit() for ch in text) and all(ch in "0123456789.*" for ch in text)


def _parse_bracketed(text: str) -> AllowEntry:
    close = text.find("]")
    if close < 0:
        raise _entry_error(text, "missing ']' after an IPv6 address")
    inside, after = text[1:close], text[close + 1 :]
    if after.startswith(":"):
        ports = _parse_ports(text, after[1:])
    elif not after:
        ports = DEFAULT_PORTS
    elif after.startswith("/"):
        raise _entry_error(text, "a path is not allowed: entries name hosts, not URLs")
    else:
        raise _entry_error(text, f"unexpected {_show(after)} after ']' (expected :PORT)")
    if _looks_ipv4(inside.partition("/")[0]):
        raise _entry_error(
            text,
            "brackets are only for IPv6 addresses",
            hint=f"write {inside}:{after[1:]}" if after else f"write {inside}",
        )
    return _address_entry(text, inside, ports, version=6)


def _parse_bare_ipv6(text: str) -> AllowEntry:
    if "*" in text:
        raise _entry_error(
            text, "'*' is not allowed in an address", hint="use a network: [2001:db8::/32]:443"
        )
    if not all(ch in "0123456789abcdefABCDEF:./" for ch in text):
        raise _entry_error(
            text,
            "too many ':' (an IPv6 address with a port is written [ADDRESS]:PORT)",
        )
    return _address_entry(text, text, DEFAULT_PORTS, version=6)


def _address_entry(text: str, where: str, ports: frozenset[int], *, version: int) -> AllowEntry:
    """An entry for the address or network ``where`` (IPv``version``)."""
    if "*" in where:
        example = "10.1.2.0/24:443" if version == 4 else "[2001:db8::/32]:443"
        raise _entry_error(
            text, "'*' is not allowed in an address", hint=f"use a network: {example}"
        )
    kind = f"IPv{version}"
    try:
        if "/" in where:
            network = ipaddress.ip_network(where, strict=True)
        else:
            network = ipaddress.ip_network(ipaddress.ip_address(where))
    except ValueError as exc:
        hint = None
        if "host bits set" in str(exc):
            with contextlib.suppress(ValueError):
                hint = f"did you mean {ipaddress.ip_network(where, strict=False)}?"
        what = "network" if "/" in where else "address"
        raise _entry_error(text, f"not a valid {kind} {what} ({exc})", hint=hint) from None
    if network.version != version:
        raise _entry_error(text, f"not a valid {kind} address")
    if network.prefixlen < MIN_PREFIX[version]:
        raise _entry_error(
            text,
            f"network {network} is too broad (at most /{MIN_PREFIX[version]} for {kind}): "
            "an address entry allows private and loopback addresses too",
            hint="allow host names instead ('*' allows any name that resolves to a public address)",
        )
    return AllowEntry(text=text, host=None, network=network, ports=ports)


def _parse_host(text: str, where: str) -> str:
    """The lower-case ASCII glob for the host name ``where``, or PolicyError."""
    name = where.translate(_UNICODE_DOTS)
    if name.endswith("."):
        name = name[:-1]
    if name == "*":
        return name
    labels = name.split(".")
    ascii_labels: list[str] = []
    for label in labels:
        if not label:
            raise _entry_error(text, "empty label (two dots in a row, or a leading dot)")
        if not label.isascii():
            if "*" in label:
                raise _entry_error(text, "a '*' cannot share a label with non-ASCII characters")
            try:
                label = idna.ToASCII(label).decode("ascii")
            except UnicodeError as exc:
                raise _entry_error(text, f"invalid internationalised label ({exc})") from None
        label = label.lower()
        if len(label) > MAX_LABEL_LENGTH:
            raise _entry_error(text, f"label {_show(label)} is longer than 63 characters")
        if not _LABEL.match(label):
            bad = next(ch for ch in label if not _LABEL.match(ch))
            raise _entry_error(text, f"invalid character {bad!r} in a host name")
        if label.startswith("-") or label.endswith("-"):
            raise _entry_error(text, f"label {_show(label)} starts or ends with '-'")
        ascii_labels.append(label)
    host = ".".join(ascii_labels)
    if len(host) > MAX_NAME_LENGTH:
        raise _entry_error(text, "host name is longer than 253 characters")
    if ascii_labels[-1].isdigit():
        raise _entry_error(text, "a host name's last label cannot be all digits")
    if "*" in host and (len(ascii_labels) < 3 or "*" in "".join(ascii_labels[-2:])):
        # Without a public-suffix list, two literal labels is the line between
        # "the hosts of one domain" and "a whole top-level domain".
        raise _entry_error(
            text,
            "too broad: a '*' must be followed by two literal labels (like *.example.com)",
            hint="write '*' alone to allow any host name",
        )
    return host


# ---------------------------------------------------------------------------- presets


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named list of allowlist entries for one service (from ``presets.toml``)."""

    name: str
    #: One line saying what the preset allows.
    description: str
    #: URL of the vendor's documentation of the hosts.
    docs: str
    #: The entries, as written in ``presets.toml``.
    entries: tuple[str, ...]


class _PresetTable(pydantic.BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    description: str = Field(min_length=1)
    docs: str = Field(pattern=r"^https://")
    allow: list[str] = Field(min_length=1)


@functools.cache
def _load_presets() -> tuple[Preset, ...]:
    text = resources.files("stoker.net").joinpath(_PRESET_FILE).read_text(encoding="utf-8")
    presets = []
    for name, table in tomllib.loads(text).items():
        if not _PRESET_NAME.match(name):
            raise ValueError(f"{_PRESET_FILE}: invalid preset name {name!r}")
        parsed = _PresetTable.model_validate(table)
        presets.append(Preset(name, parsed.description, parsed.docs, tuple(parsed.allow)))
    return tuple(presets)


def load_presets() -> dict[str, Preset]:
    """The allowlist presets shipped with stoker, by name (read once, then cached)."""
    return {preset.name: preset for preset in _load_presets()}


# ---------------------------------------------------------------------------- limits


@pydantic.dataclasses.dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class Limits:
    """Resource limits of one VM's egress proxy.

    Validated by pydantic (from a TOML table or JSON object too): counts and
    sizes are positive integers, times positive finite seconds.
    """

    #: Connections open at once.
    max_connections: Annotated[int, Field(strict=True, ge=1)] = 64
    #: New connections per rolling minute.
    connections_per_minute: Annotated[int, Field(strict=True, ge=1)] = 600
    #: Bytes per second, both directions together; None: unlimited.
    bytes_per_second: Annotated[int, Field(strict=True, ge=1)] | None = None
    #: Bytes over the VM's life, both directions; None: unlimited.
    total_bytes: Annotated[int, Field(strict=True, ge=1)] | None = None
    #: Seconds to resolve a name and connect upstream.
    connect_timeout: Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False)] = 10.0
    #: Seconds a connection may pass no byte either way (at least 120).
    idle_timeout: Annotated[float, Field(strict=True, allow_inf_nan=False)] = 300.0
    #: Seconds a client has to send its request head (against slow-loris clients).
    header_timeout: Annotated[float, Field(strict=True, gt=0, allow_inf_nan=False)] = 30.0

    @field_validator("idle_timeout")
    @classmethod
    def _check_idle_timeout(cls, value: float) -> float:
        if value < 120:
            # CI runners long-poll their server for 50-60 s without a byte.
            raise ValueError(
                "must be at least 120 seconds (CI runners long-poll for about a minute)"
            )
        return value


# ---------------------------------------------------------------------------- the policy


def _check_allow_entry(text: str) -> str:
    try:
        parse_entry(text)
    except PolicyError as exc:
        # A pydantic error keeps the field's location (file and line in a spec);
        # the hint would otherwise be lost with the exception.
        message = str(exc) if exc.hint is None else f"{exc} ({exc.hint})"
        raise PydanticCustomError("allow_entry", "{message}", {"message": message}) from None
    return text


AllowText = Annotated[str, AfterValidator(_check_allow_entry)]


@functools.lru_cache(maxsize=256)
def _parse_all(allow: tuple[str, ...]) -> tuple[AllowEntry, ...]:
    return tuple(entry for text in allow for entry in parse_entry(text))


class NetworkPolicy(pydantic.BaseModel):
    """The network a VM gets: its mode, allowlist (``egress``) and proxy limits.

    Frozen and validated on construction: every allowlist entry is parsed, and
    allow entries are refused outside ``egress`` mode.  Constructed from data
    (a spec's ``[network]`` table, a REST request) errors are pydantic
    ``ValidationError`` located at the field; :meth:`from_options` raises
    :class:`PolicyError`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: NetworkMode = "none"
    #: Entries as written; presets as ``"@name"``.
    allow: tuple[AllowText, ...] = ()
    limits: Limits = Limits()

    @field_validator("allow")
    @classmethod
    def _check_mode(cls, allow: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        # ``mode`` is declared first, so it is validated (or missing: invalid) by now.
        mode = info.data.get("mode")
        if allow and mode is not None and mode != "egress":
            raise PydanticCustomError(
                "allow_needs_egress",
                "allow entries only apply to --network egress (mode is {mode})",
                {"mode": repr(mode)},
            )
        return allow

    def entries(self) -> tuple[AllowEntry, ...]:
        """The parsed allowlist, presets expanded, in order."""
        return _parse_all(self.allow)

    def match_host(self, host: str, port: int) -> AllowEntry | None:
        """The first host entry allowing ``host:port``, or None."""
        return next((e for e in self.entries() if e.matches_host(host, port)), None)

    def match_ip(self, address: IPAddress, port: int) -> AllowEntry | None:
        """The first IP/CIDR entry allowing ``address:port``, or None."""
        return next((e for e in self.entries() if e.matches_ip(address, port)), None)

    def summary(self) -> dict[str, object]:
        """JSON-able description: mode, allow (as written) and limits."""
        return {
            "mode": self.mode,
            "allow": list(self.allow),
            "limits": dataclasses.asdict(self.limits),
        }

    @classmethod
    def from_options(
        cls, *, mode: str | None, allow: Sequence[str], base: NetworkPolicy | None = None
    ) -> NetworkPolicy:
        """The policy command-line or request options ask for, on top of ``base``.

        ``allow`` without ``mode`` means ``egress``; neither means ``base`` (or
        ``none``).  Given ``allow`` entries replace ``base``'s; an explicit
        ``egress`` without entries keeps them.  ``base``'s limits are kept.
        Raises :class:`PolicyError`.
        """
        if mode is not None and mode not in NETWORK_MODES:
            raise PolicyError(
                f"unknown network mode {mode!r}", hint="use --network none, egress or nat"
            )
        for text in allow:
            parse_entry(text)
        if mode is None and not allow:
            return base if base is not None else cls()
        chosen = cast(NetworkMode, mode or "egress")
        if allow and chosen != "egress":
            raise PolicyError(
                f"allow entries only apply to --network egress, not --network {chosen}",
                hint=f"drop --allow, or use --network egress (entries: {', '.join(allow)})",
            )
        if allow:
            entries = tuple(allow)
        elif chosen == "egress" and base is not None and base.mode == "egress":
            entries = base.allow
        else:
            entries = ()
        limits = base.limits if base is not None else Limits()
        try:
            return cls(mode=chosen, allow=entries, limits=limits)
        except pydantic.ValidationError as exc:  # not expected: everything was checked
            raise PolicyError(f"invalid network policy: {exc}") from None


def image_network_policy(manifest: Mapping[str, object]) -> NetworkPolicy:
    """The network policy an image's manifest asks for (its spec's ``[network]``).

    An image without one gets ``none``.  A manifest whose policy no longer
    validates (edited by hand, or a preset renamed since) is a
    :class:`PolicyError`: silently running without the network it asked for, or
    with more, would both be wrong.
    """
    data = manifest.get("network")
    if data is None:
        return NetworkPolicy()
    try:
        return NetworkPolicy.model_validate(data)
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'network'}: {error['msg']}"
            for error in exc.errors()
        )
        raise PolicyError(
            f"the image's network policy is invalid: {problems}",
            hint="rebuild the image, or choose the network with --network/--allow",
        ) from None


# ---------------------------------------------------------------------------- addresses

_V4 = ipaddress.IPv4Network
_V6 = ipaddress.IPv6Network

# Checked in order, first match wins: specific reasons before general ones.
_IPV4_PROBLEMS: tuple[tuple[ipaddress.IPv4Network, str], ...] = (
    (_V4("0.0.0.0/32"), "unspecified"),
    (_V4("0.0.0.0/8"), "reserved ('this network')"),
    (_V4("10.0.0.0/8"), "private"),
    (_V4("100.64.0.0/10"), "carrier-grade NAT"),
    # Every cloud serves instance metadata (and credentials) on link-local addresses.
    (_V4("169.254.0.0/16"), "link-local (cloud metadata)"),
    (_V4("172.16.0.0/12"), "private"),
    (_V4("192.0.0.0/24"), "reserved (IETF protocol assignments)"),
    (_V4("192.0.2.0/24"), "documentation"),
    (_V4("192.88.99.0/24"), "reserved (6to4 relay anycast)"),
    (_V4("192.168.0.0/16"), "private"),
    (_V4("198.18.0.0/15"), "benchmarking"),
    (_V4("198.51.100.0/24"), "documentation"),
    (_V4("203.0.113.0/24"), "documentation"),
    (_V4("224.0.0.0/4"), "multicast"),
    (_V4("255.255.255.255/32"), "broadcast"),
    (_V4("240.0.0.0/4"), "reserved"),
)

_IPV6_PROBLEMS: tuple[tuple[ipaddress.IPv6Network, str], ...] = (
    (_V6("::/128"), "unspecified"),
    (_V6("::ffff:0:0/96"), "IPv4-mapped IPv6"),
    (_V6("::ffff:0:0:0/96"), "IPv4-translated IPv6"),
    (_V6("::/96"), "IPv4-compatible IPv6 (deprecated)"),
    (_V6("64:ff9b:1::/48"), "NAT64 (local-use)"),
    (_V6("100::/64"), "reserved (discard-only)"),
    # Transition mechanisms whose relays would forward to the embedded IPv4
    # address; both are deprecated and nothing legitimate needs them here.
    (_V6("2001::/32"), "Teredo"),
    (_V6("2002::/16"), "6to4"),
    (_V6("2001:2::/48"), "benchmarking"),
    (_V6("2001:db8::/32"), "documentation"),
    (_V6("3fff::/20"), "documentation"),
    (_V6("2001::/23"), "reserved (IETF protocol assignments)"),
    (_V6("fd00:ec2::254/128"), "private (cloud metadata)"),
    (_V6("fc00::/7"), "private (unique local)"),
    (_V6("fe80::/10"), "link-local"),
    (_V6("fec0::/10"), "reserved (site-local)"),
    (_V6("ff00::/8"), "multicast"),
)
_NAT64 = _V6("64:ff9b::/96")
_GLOBAL_UNICAST = _V6("2000::/3")


def address_problem(
    address: IPAddress, *, host_addresses: frozenset[IPAddress] | None = None
) -> str | None:
    """Why the proxy must not connect to ``address``, or None if it may.

    None only for globally routable unicast addresses that are not this host's
    own; otherwise a short reason such as ``"loopback"``, ``"private"``,
    ``"link-local (cloud metadata)"`` or ``"this host's own address"``.
    Addresses embedding IPv4 (mapped, Teredo, 6to4) are refused; NAT64 ones
    (``64:ff9b::/96``) are judged by the IPv4 address they embed.
    ``host_addresses`` defaults to :func:`host_addresses`.
    """
    if address.is_loopback:
        return "loopback"
    own = host_addresses if host_addresses is not None else _HOST_ADDRESSES.get()
    if _without_scope(address) in own:
        return "this host's own address"
    if isinstance(address, ipaddress.IPv4Address):
        for network4, reason in _IPV4_PROBLEMS:
            if address in network4:
                return reason
        return None if address.is_global else "not globally routable"
    for network6, reason in _IPV6_PROBLEMS:
        if address in network6:
            return _with_embedded(address, reason)
    if address in _NAT64:
        embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        problem = address_problem(embedded, host_addresses=own)
        return None if problem is None else f"NAT64 of {embedded} ({problem})"
    if address not in _GLOBAL_UNICAST:
        return "reserved"
    return None if address.is_global else "not globally routable"


def _with_embedded(address: ipaddress.IPv6Address, reason: str) -> str:
    """``reason``, naming the IPv4 address ``address`` embeds, if any."""
    embedded: ipaddress.IPv4Address | None = address.ipv4_mapped or address.sixtofour
    if embedded is None and address.teredo is not None:
        embedded = address.teredo[1]
    return reason if embedded is None else f"{reason}, embeds {embedded}"


def _without_scope(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        return ipaddress.IPv6Address(int(address))
    return address


# How long host_addresses() trusts what it read: addresses come and go (DHCP,
# VPNs, containers), but the proxy asks for every connection.
HOST_ADDRESSES_TTL = 5.0
# /proc/net/fib_trie holds the whole routing table: on a router with a full
# Internet table it is huge, and then the per-interface ioctl has to do.
_FIB_TRIE_MAX_LINES = 200_000
_SIOCGIFADDR = 0x8915


class _HostAddressCache:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._value: frozenset[IPAddress] = frozenset()
        self._expires = 0.0

    def get(self) -> frozenset[IPAddress]:
        with self._lock:
            now = time.monotonic()
            if now >= self._expires:
                self._value = _read_host_addresses()
                self._expires = now + HOST_ADDRESSES_TTL
            return self._value

    def clear(self) -> None:
        with self._lock:
            self._expires = 0.0


_HOST_ADDRESSES = _HostAddressCache()


def host_addresses() -> frozenset[IPAddress]:
    """This host's own interface addresses, IPv4 and IPv6 (cached for a few seconds).

    Never raises: what cannot be read is left out (an empty set at worst).
    """
    return _HOST_ADDRESSES.get()


def _read_host_addresses() -> frozenset[IPAddress]:
    found: set[IPAddress] = set()
    for reader in (_ipv4_from_fib_trie, _ipv4_from_ioctl, _ipv6_from_if_inet6):
        # Each source is best effort: a missing /proc or an odd line loses only it.
        with contextlib.suppress(OSError, ValueError):
            found.update(reader())
    return frozenset(found)


def _ipv4_from_fib_trie() -> Iterator[ipaddress.IPv4Address]:
    with open("/proc/net/fib_trie", encoding="ascii") as lines:
        yield from _parse_fib_trie(itertools.islice(lines, _FIB_TRIE_MAX_LINES))


def _parse_fib_trie(lines: Iterable[str]) -> Iterator[ipaddress.IPv4Address]:
    """Addresses with a ``/32 host LOCAL`` route: those the kernel answers for itself."""
    leaf: str | None = None
    for line in lines:
        text = line.strip()
        if text.startswith("|--"):
            leaf = text[3:].strip()
        elif text.startswith("/32 host LOCAL") and leaf is not None:
            yield ipaddress.IPv4Address(leaf)


def _ipv4_from_ioctl() -> Iterator[ipaddress.IPv4Address]:
    """Each interface's primary IPv4 address (SIOCGIFADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            try:
                reply = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, request)
            except OSError:
                continue  # no IPv4 address on this interface
            yield ipaddress.IPv4Address(reply[20:24])


def _ipv6_from_if_inet6() -> Iterator[ipaddress.IPv6Address]:
    with open("/proc/net/if_inet6", encoding="ascii") as lines:
        for line in lines:
            fields = line.split()
            if fields and len(fields[0]) == 32:
                yield ipaddress.IPv6Address(int(fields[0], 16))
