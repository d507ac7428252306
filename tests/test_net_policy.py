"""Network policy: entry syntax and errors, globs, presets, address checks, the model.

Pure and fast: no network, no VM.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterator
from ipaddress import ip_address, ip_network
from typing import Any

import pydantic
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stoker.errors import UsageError
from stoker.net import policy
from stoker.net.policy import (
    DEFAULT_PORTS,
    AllowEntry,
    Limits,
    NetworkPolicy,
    PolicyError,
    address_problem,
    host_addresses,
    image_network_policy,
    load_presets,
    parse_entry,
)

NO_HOST: frozenset[policy.IPAddress] = frozenset()


def one(text: str) -> AllowEntry:
    entries = parse_entry(text)
    assert len(entries) == 1
    return entries[0]


def refused(text: str) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        parse_entry(text)
    assert repr(text) in str(info.value), "the error must name the entry as written"
    return info.value


def errors(exc: pydantic.ValidationError) -> list[tuple[tuple[int | str, ...], str]]:
    return [(tuple(error["loc"]), error["msg"]) for error in exc.errors()]


# ---------------------------------------------------------------------------- syntax


@pytest.mark.parametrize(
    ("text", "host", "network", "ports"),
    [
        ("github.com", "github.com", None, {80, 443}),
        ("github.com:443", "github.com", None, {443}),
        ("github.com:80,443", "github.com", None, {80, 443}),
        ("github.com:8443,22,22", "github.com", None, {22, 8443}),
        ("GitHub.COM", "github.com", None, {80, 443}),
        ("github.com.", "github.com", None, {80, 443}),
        ("github.com.:443", "github.com", None, {443}),
        ("localhost:8080", "localhost", None, {8080}),
        ("a_b.example.com", "a_b.example.com", None, {80, 443}),
        ("*.actions.githubusercontent.com", "*.actions.githubusercontent.com", None, {80, 443}),
        (
            "productionresultssa*.blob.core.windows.net:443",
            "productionresultssa*.blob.core.windows.net",
            None,
            {443},
        ),
        ("*.*.example.com", "*.*.example.com", None, {80, 443}),
        ("*", "*", None, {80, 443}),
        ("*:443", "*", None, {443}),
        ("bücher.example", "xn--bcher-kva.example", None, {80, 443}),
        ("BÜCHER.example:443", "xn--bcher-kva.example", None, {443}),
        ("xn--bcher-kva.example", "xn--bcher-kva.example", None, {80, 443}),
        ("例え.テスト", "xn--r8jz45g.xn--zckzah", None, {80, 443}),
        ("a.b\u3002com", "a.b.com", None, {80, 443}),
        ("10.1.2.3:8443", None, "10.1.2.3/32", {8443}),
        ("127.0.0.1:5000", None, "127.0.0.1/32", {5000}),
        ("10.1.2.3", None, "10.1.2.3/32", {80, 443}),
        ("10.0.0.0/8:443", None, "10.0.0.0/8", {443}),
        ("192.168.0.0/255.255.0.0", None, "192.168.0.0/16", {80, 443}),
        ("[2001:db8::1]:443", None, "2001:db8::1/128", {443}),
        ("[2001:db8::1]", None, "2001:db8::1/128", {80, 443}),
        ("[2001:db8::/32]:443", None, "2001:db8::/32", {443}),
        ("[::1]:5000", None, "::1/128", {5000}),
        ("2001:db8::1", None, "2001:db8::1/128", {80, 443}),
        ("2001:DB8::/32", None, "2001:db8::/32", {80, 443}),
    ],
)
def test_valid_entries(text: str, host: str | None, network: str | None, ports: set[int]) -> None:
    entry = one(text)
    assert entry.text == text
    assert entry.host == host
    assert entry.network == (None if network is None else ip_network(network))
    assert entry.ports == frozenset(ports)
    assert entry.preset is None


def test_default_ports() -> None:
    assert one("example.com").ports == DEFAULT_PORTS == frozenset({80, 443})


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("github.com", "github.com:80,443"),
        ("GitHub.com.:443", "github.com:443"),
        ("10.1.2.3:8443", "10.1.2.3:8443"),
        ("10.0.0.0/8:443", "10.0.0.0/8:443"),
        ("2001:db8::1", "[2001:db8::1]:80,443"),
        ("[2001:db8::/32]:443", "[2001:db8::/32]:443"),
        ("bücher.example", "xn--bcher-kva.example:80,443"),
    ],
)
def test_str_is_canonical(text: str, shown: str) -> None:
    assert str(one(text)) == shown


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("github.com ", "whitespace"),
        (" github.com", "whitespace"),
        ("git hub.com", "whitespace"),
        ("github.com\t", "whitespace"),
        ("github.com\x00", "non-printable"),
        ("https://github.com", "not a URL"),
        ("http://github.com:8080/path", "not a URL"),
        ("github.com/foo", "path"),
        ("github.com:443/foo", "path"),
        ("[2001:db8::1]/foo", "path"),
        ("github.com?tab=1", "query"),
        ("github.com#top", "fragment"),
        ("user@github.com", "user-info"),
        ("user:secret@github.com:443", "user-info"),
        ("github.com%2f", "'%'"),
        ("[fe80::1%eth0]:443", "'%'"),
        ("a..b.com", "empty label"),
        (".github.com", "empty label"),
        ("github.com..", "empty label"),
        ("-github.com", "'-'"),
        ("github-.com", "'-'"),
        ("git!hub.com", "invalid character '!'"),
        ("git[hub.com", "invalid character '['"),
        ("x" * 64 + ".com", "longer than 63"),
        (".".join(["a" * 63] * 4) + ".com", "longer than 253"),
        ("example.123", "all digits"),
        ("*.com", "too broad"),
        ("github.*", "too broad"),
        ("foo*.com", "too broad"),
        ("*.*", "too broad"),
        ("a.*.com", "too broad"),
        ("ex*", "too broad"),
        ("bü*cher.example.com", "non-ASCII"),
        ("10.0.0.*", "'*' is not allowed in an address"),
        ("10.*.0.0/16:443", "'*' is not allowed in an address"),
        ("2001:db8::*", "'*' is not allowed in an address"),
        ("[2001:db8::*]:443", "'*' is not allowed in an address"),
        ("1.2.3", "not a valid IPv4 address"),
        ("1.2.3.4.5", "not a valid IPv4 address"),
        ("256.1.1.1", "not a valid IPv4 address"),
        ("010.0.0.1", "not a valid IPv4 address"),
        ("10.0.0.0/33", "not a valid IPv4 network"),
        ("10.0.0.1/8", "host bits set"),
        ("0.0.0.0/0", "too broad"),
        ("0.0.0.0/7:443", "too broad"),
        ("[::/0]:443", "too broad"),
        ("2000::/3", "too broad"),
        ("[10.0.0.1]:443", "only for IPv6"),
        ("[2001:db8::1", "missing ']'"),
        ("[2001:db8::1]x", "unexpected"),
        ("[github.com]:443", "IPv6"),
        ("2001:db8::g", "IPv6"),
        ("github.com:443:80", "too many ':'"),
        (":443", "no host"),
        ("github.com:", "empty port"),
        ("[2001:db8::1]:", "empty port"),
        ("github.com:0", "out of range"),
        ("github.com:65536", "out of range"),
        ("github.com:99999999999999999999999999", "out of range"),
        ("github.com:http", "not a number"),
        ("github.com:-1", "not a number"),
        ("github.com:+443", "not a number"),
        ("github.com:80,,443", "empty port"),
        ("github.com:80,", "empty port"),
        ("github.com:*", "no any-port form"),
        ("github.com:\uff14\uff14\uff13", "not a number"),  # fullwidth digits
        ("@", "unknown preset"),
        ("@nope", "unknown preset"),
        ("@github-actions:443", "unknown preset"),
    ],
)
def test_invalid_entries(text: str, problem: str) -> None:
    exc = refused(text)
    assert isinstance(exc, UsageError)
    assert problem in str(exc)


def test_empty_entry() -> None:
    with pytest.raises(PolicyError, match="empty allowlist entry"):
        parse_entry("")


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("https://github.com", "write 'github.com'"),
        ("https://user@github.com:8443/org/repo?x=1", "write 'github.com:8443'"),
        ("github.com/org/repo", "write 'github.com'"),
        ("token@github.com", "write 'github.com'"),
        ("10.0.0.1/8", "10.0.0.0/8"),
        ("[10.0.0.1]:443", "write 10.0.0.1:443"),
        ("*.com", "'*'"),
        ("github.com:*", "HOST:22,443"),
    ],
)
def test_errors_give_hints(text: str, hint: str) -> None:
    exc = refused(text)
    assert exc.hint is not None and hint in exc.hint


def test_long_entries_are_shortened_in_messages() -> None:
    text = "a" * 10_000 + ".com/"
    with pytest.raises(PolicyError) as info:
        parse_entry(text)
    assert len(str(info.value)) < 400


def test_unknown_preset_lists_the_known_ones() -> None:
    message = str(refused("@nope"))
    for name in load_presets():
        assert f"@{name}" in message
    assert refused("@github").hint == "did you mean @github-actions?"


# ---------------------------------------------------------------------------- matching


@pytest.mark.parametrize(
    ("pattern", "host", "expected"),
    [
        ("github.com", "github.com", True),
        ("github.com", "api.github.com", False),
        ("github.com", "github.co", False),
        ("github.com", "xgithub.com", False),
        ("*.example.com", "a.example.com", True),
        ("*.example.com", "a-b_c.example.com", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", "a.b.example.com", False),
        ("*.example.com", ".example.com", False),
        ("*.example.com", "a.example.com.evil.test", False),
        ("*.example.com", "aexample.com", False),
        (
            "productionresultssa*.blob.core.windows.net",
            "productionresultssa0.blob.core.windows.net",
            True,
        ),
        (
            "productionresultssa*.blob.core.windows.net",
            "productionresultssa.blob.core.windows.net",
            True,
        ),
        ("productionresultssa*.blob.core.windows.net", "evil.blob.core.windows.net", False),
        (
            "productionresultssa*.blob.core.windows.net",
            "productionresultssa1.x.blob.core.windows.net",
            False,
        ),
        ("a*b.example.com", "ab.example.com", True),
        ("a*b.example.com", "axxb.example.com", True),
        ("a*b.example.com", "axxc.example.com", False),
        ("*.*.example.com", "a.b.example.com", True),
        ("*.*.example.com", "a.example.com", False),
        ("*", "anything.example", True),
        ("*", "localhost", True),
        ("*", "", False),
        ("*", "a..b", False),
        ("*", "bücher.example", False),
        ("*", "a b", False),
        # re special characters in the pattern are literal
        ("a.example.com", "abexample.com", False),
    ],
)
def test_glob_semantics(pattern: str, host: str, expected: bool) -> None:
    assert one(f"{pattern}:443").matches_host(host, 443) is expected


@pytest.mark.parametrize("host", ["GitHub.COM", "github.com.", "GITHUB.COM.", "api.GitHub.com"])
def test_matching_ignores_case_and_one_trailing_dot(host: str) -> None:
    entry = one("*.github.com:443") if host.lower().startswith("api.") else one("github.com:443")
    assert entry.matches_host(host, 443)
    assert not entry.matches_host(host.rstrip(".") + "..", 443)  # only one trailing dot


def test_matching_checks_ports() -> None:
    entry = one("github.com:443")
    assert entry.matches_host("github.com", 443)
    assert not entry.matches_host("github.com", 80)
    both = one("github.com")
    assert both.matches_host("github.com", 80) and both.matches_host("github.com", 443)
    assert not both.matches_host("github.com", 22)


def test_idn_entries_match_their_punycode() -> None:
    entry = one("Bücher.example:443")
    assert entry.matches_host("xn--bcher-kva.example", 443)
    assert entry.matches_host("XN--BCHER-KVA.EXAMPLE.", 443)


def test_host_and_ip_entries_match_only_their_kind() -> None:
    host = one("*:443")
    address = one("10.0.0.0/8:443")
    assert not host.matches_ip(ip_address("10.1.2.3"), 443)
    assert not address.matches_host("10.1.2.3", 443)
    assert address.matches_ip(ip_address("10.1.2.3"), 443)
    assert not address.matches_ip(ip_address("10.1.2.3"), 80)
    assert not address.matches_ip(ip_address("11.0.0.1"), 443)
    # An IPv4 entry is not an IPv6 one: mapped addresses are the proxy's to unwrap.
    assert not address.matches_ip(ip_address("::ffff:10.1.2.3"), 443)
    v6 = one("[2001:db8::/32]:443")
    assert v6.matches_ip(ip_address("2001:db8:1::5"), 443)
    assert not v6.matches_ip(ip_address("2001:db9::5"), 443)


def test_allow_entry_invariants() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        AllowEntry(text="x", host=None, network=None, ports=DEFAULT_PORTS)
    with pytest.raises(ValueError, match="ports"):
        AllowEntry(text="x", host="x.com", network=None, ports=frozenset({0}))
    with pytest.raises(ValueError, match="ports"):
        AllowEntry(text="x", host="x.com", network=None, ports=frozenset())


# ---------------------------------------------------------------------------- presets


def test_presets_load() -> None:
    presets = load_presets()
    assert {"github-actions", "gitlab.com", "pypi", "npm", "debian"} <= set(presets)
    for name, preset in presets.items():
        assert preset.name == name
        assert preset.description
        assert preset.docs.startswith("https://")
        assert preset.entries
    assert load_presets() == presets
    load_presets().clear()  # a caller's copy: the cache is unaffected
    assert load_presets() == presets


@pytest.mark.parametrize("name", sorted(load_presets()))
def test_every_preset_entry_parses(name: str) -> None:
    preset = load_presets()[name]
    for text in preset.entries:
        entry = one(text)
        assert entry.host is not None or entry.network is not None
    expanded = parse_entry(f"@{name}")
    assert [entry.text for entry in expanded] == list(preset.entries)
    assert all(entry.preset == name for entry in expanded)
    assert all(str(entry).endswith(f" (preset {name})") for entry in expanded)


@pytest.mark.parametrize(
    ("preset", "host", "port"),
    [
        ("github-actions", "github.com", 443),
        ("github-actions", "api.github.com", 443),
        ("github-actions", "pipelines.actions.githubusercontent.com", 443),
        ("github-actions", "results-receiver.actions.githubusercontent.com", 443),
        ("github-actions", "productionresultssa7.blob.core.windows.net", 443),
        ("github-actions", "codeload.github.com", 443),
        ("github-actions", "ghcr.io", 443),
        ("github-actions", "npm.pkg.github.com", 443),
        ("github-actions", "objects.githubusercontent.com", 443),
        ("gitlab.com", "gitlab.com", 443),
        ("gitlab.com", "registry.gitlab.com", 443),
        ("pypi", "pypi.org", 443),
        ("pypi", "files.pythonhosted.org", 443),
        ("npm", "registry.npmjs.org", 443),
        ("debian", "deb.debian.org", 80),
        ("debian", "security.debian.org", 443),
    ],
)
def test_presets_cover_their_services(preset: str, host: str, port: int) -> None:
    allowed = NetworkPolicy(mode="egress", allow=(f"@{preset}",))
    entry = allowed.match_host(host, port)
    assert entry is not None and entry.preset == preset


def test_presets_stay_on_their_services() -> None:
    allowed = NetworkPolicy(mode="egress", allow=("@github-actions",))
    assert allowed.match_host("github.com", 80) is None  # HTTPS only
    assert allowed.match_host("evil.blob.core.windows.net", 443) is None
    assert allowed.match_host("gist.githubusercontent.com", 443) is None


# ---------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.1.2.3", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.1", "private"),
        ("10.255.255.255", "private"),
        ("172.16.0.1", "private"),
        ("172.31.255.1", "private"),
        ("192.168.1.1", "private"),
        ("169.254.169.254", "metadata"),
        ("169.254.1.1", "link-local"),
        ("fd00::1", "private"),
        ("fd00:ec2::254", "metadata"),
        ("fe80::1", "link-local"),
        ("100.64.0.1", "carrier-grade NAT"),
        ("::ffff:10.0.0.1", "IPv4-mapped IPv6"),
        ("::ffff:8.8.8.8", "IPv4-mapped IPv6"),
        ("::ffff:127.0.0.1", "IPv4-mapped IPv6"),
        ("64:ff9b::a00:1", "NAT64"),
        ("64:ff9b::a9fe:a9fe", "metadata"),
        ("64:ff9b:1::1", "NAT64"),
        ("2002:a00:1::", "6to4"),
        ("2002:808:808::", "6to4"),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo"),
        ("::a00:1", "IPv4-compatible"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("0.1.2.3", "reserved"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("ff02::1", "multicast"),
        ("255.255.255.255", "broadcast"),
        ("192.0.2.1", "documentation"),
        ("198.51.100.1", "documentation"),
        ("203.0.113.1", "documentation"),
        ("2001:db8::1", "documentation"),
        ("198.18.0.1", "benchmarking"),
        ("198.19.255.1", "benchmarking"),
        ("2001:2::1", "benchmarking"),
        ("240.0.0.1", "reserved"),
        ("192.0.0.1", "reserved"),
        ("100::1", "reserved"),
        ("fec0::1", "reserved"),
        ("5f00::1", "reserved"),
    ],
)
def test_address_problems(address: str, reason: str) -> None:
    problem = address_problem(ip_address(address), host_addresses=NO_HOST)
    assert problem is not None and reason in problem


def test_embedded_ipv4_is_named() -> None:
    problem = address_problem(ip_address("2002:a00:1::"), host_addresses=NO_HOST)
    assert problem is not None and "10.0.0.1" in problem
    problem = address_problem(ip_address("64:ff9b::a00:1"), host_addresses=NO_HOST)
    assert problem is not None and "10.0.0.1" in problem and "private" in problem


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "1.1.1.1",
        "140.82.112.3",
        "2606:4700::1111",
        "2001:4860:4860::8888",
        "64:ff9b::808:808",
    ],
)
def test_global_addresses_are_fine(address: str) -> None:
    assert address_problem(ip_address(address), host_addresses=NO_HOST) is None


def test_own_addresses_are_refused() -> None:
    public = ip_address("8.8.8.8")
    assert address_problem(public, host_addresses=frozenset({public})) == "this host's own address"
    scoped = ipaddress.IPv6Address("2606:4700::1111%eth0")
    own = frozenset({ip_address("2606:4700::1111")})
    assert address_problem(scoped, host_addresses=own) == "this host's own address"


def test_host_addresses_are_read() -> None:
    policy._HOST_ADDRESSES.clear()
    found = host_addresses()
    assert ip_address("127.0.0.1") in found
    assert address_problem(ip_address("127.0.0.1")) == "loopback"
    others = sorted((a for a in found if not a.is_loopback), key=str)
    if others:
        # Whatever kind of address it is, what matters is that it is ours.
        assert address_problem(others[0]) == "this host's own address"


def test_host_addresses_never_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> Iterator[policy.IPAddress]:
        raise OSError("no /proc here")

    for name in ("_ipv4_from_fib_trie", "_ipv4_from_ioctl", "_ipv6_from_if_inet6"):
        monkeypatch.setattr(policy, name, broken)
    policy._HOST_ADDRESSES.clear()
    try:
        assert host_addresses() == frozenset()
    finally:
        policy._HOST_ADDRESSES.clear()


def test_host_addresses_are_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[int] = []

    def counting() -> frozenset[policy.IPAddress]:
        reads.append(1)
        return frozenset({ip_address("192.0.2.7")})

    monkeypatch.setattr(policy, "_read_host_addresses", counting)
    policy._HOST_ADDRESSES.clear()
    try:
        assert host_addresses() == host_addresses() == frozenset({ip_address("192.0.2.7")})
        assert len(reads) == 1
        monkeypatch.setattr(policy, "HOST_ADDRESSES_TTL", 0.0)
        policy._HOST_ADDRESSES.clear()
        host_addresses()
        host_addresses()
        assert len(reads) == 3
    finally:
        policy._HOST_ADDRESSES.clear()


FIB_TRIE = """\
Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
        +-- 127.0.0.0/31 1 0 0
           |-- 127.0.0.0
              /8 host LOCAL
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     +-- 203.0.113.0/24 2 0 2
           |-- 203.0.113.0
              /24 link UNICAST
           |-- 203.0.113.9
              /24 link UNICAST
              /32 host LOCAL
        |-- 203.0.113.255
           /32 link BROADCAST
"""


def test_fib_trie_local_addresses() -> None:
    found = set(policy._parse_fib_trie(FIB_TRIE.splitlines()))
    assert found == {ip_address("127.0.0.1"), ip_address("203.0.113.9")}


# ---------------------------------------------------------------------------- the model


def test_policy_defaults() -> None:
    network = NetworkPolicy()
    assert network.mode == "none"
    assert network.allow == ()
    assert network.limits == Limits()
    assert network.entries() == ()
    assert network.match_host("github.com", 443) is None


def test_policy_from_a_toml_table() -> None:
    network = NetworkPolicy.model_validate(
        {
            "mode": "egress",
            "allow": ["github.com", "@pypi", "10.0.0.0/8:443"],
            "limits": {"max_connections": 8, "bytes_per_second": 1_000_000, "idle_timeout": 600},
        }
    )
    assert network.allow == ("github.com", "@pypi", "10.0.0.0/8:443")
    assert network.limits == Limits(max_connections=8, bytes_per_second=1_000_000, idle_timeout=600)
    assert [entry.preset for entry in network.entries()] == [None, "pypi", "pypi", None]
    assert network.match_host("files.pythonhosted.org", 443) is not None
    assert network.match_ip(ip_address("10.9.9.9"), 443) == network.entries()[-1]
    assert network.match_ip(ip_address("10.9.9.9"), 80) is None


def test_first_matching_entry_wins() -> None:
    network = NetworkPolicy(mode="egress", allow=("api.github.com:443", "*.github.com", "*"))
    assert network.match_host("api.github.com", 443) == network.entries()[0]
    assert network.match_host("api.github.com", 80) == network.entries()[1]
    assert network.match_host("example.org", 80) == network.entries()[2]
    assert network.match_host("example.org", 22) is None


def test_egress_with_no_entries_denies_everything() -> None:
    network = NetworkPolicy(mode="egress")
    assert network.match_host("github.com", 443) is None
    assert network.match_ip(ip_address("8.8.8.8"), 443) is None


@pytest.mark.parametrize(
    ("data", "loc", "message"),
    [
        ({"mode": "open"}, ("mode",), "'none', 'egress' or 'nat'"),
        ({"mode": "none", "allow": ["github.com"]}, ("allow",), "only apply to --network egress"),
        ({"mode": "nat", "allow": ["github.com"]}, ("allow",), "mode is 'nat'"),
        ({"allow": ["github.com"]}, ("allow",), "only apply to --network egress"),
        ({"mode": "egress", "allow": ["ok.com", "https://x.com"]}, ("allow", 1), "'https://x.com'"),
        ({"mode": "egress", "allow": ["https://x.com"]}, ("allow", 0), "write 'x.com'"),
        ({"mode": "egress", "allow": "github.com"}, ("allow",), "tuple"),
        ({"limits": {"idle_timeout": 60}}, ("limits", "idle_timeout"), "at least 120"),
        ({"limits": {"idle_timeout": 119.9}}, ("limits", "idle_timeout"), "at least 120"),
        ({"limits": {"max_connections": 0}}, ("limits", "max_connections"), "greater than"),
        ({"limits": {"connections_per_minute": -1}}, ("limits", "connections_per_minute"), ""),
        ({"limits": {"bytes_per_second": 0}}, ("limits", "bytes_per_second"), "greater than"),
        ({"limits": {"total_bytes": -5}}, ("limits", "total_bytes"), "greater than"),
        ({"limits": {"connect_timeout": 0}}, ("limits", "connect_timeout"), "greater than"),
        ({"limits": {"header_timeout": -1.0}}, ("limits", "header_timeout"), "greater than"),
        ({"limits": {"connect_timeout": float("inf")}}, ("limits", "connect_timeout"), "finite"),
        ({"limits": {"max_connections": True}}, ("limits", "max_connections"), "integer"),
        ({"limits": {"max_connections": "64"}}, ("limits", "max_connections"), "integer"),
        ({"limits": {"max_connections": 6.5}}, ("limits", "max_connections"), "integer"),
        ({"limits": {"idle_timeout": "300"}}, ("limits", "idle_timeout"), "number"),
        ({"limits": {"max_conections": 5}}, ("limits", "max_conections"), ""),
        ({"modes": "egress"}, ("modes",), "Extra inputs"),
    ],
)
def test_policy_validation_names_the_field(
    data: dict[str, Any], loc: tuple[int | str, ...], message: str
) -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        NetworkPolicy.model_validate(data)
    problems = errors(info.value)
    assert any(where == loc and message in text for where, text in problems), problems


def test_limits_are_validated_when_constructed_directly() -> None:
    with pytest.raises(pydantic.ValidationError, match="idle_timeout"):
        Limits(idle_timeout=10)
    assert Limits(idle_timeout=120).idle_timeout == 120


def test_policy_is_frozen_and_hashable() -> None:
    network = NetworkPolicy(mode="egress", allow=("github.com",))
    with pytest.raises(pydantic.ValidationError):
        network.mode = "nat"
    with pytest.raises(AttributeError):
        network.limits.max_connections = 1  # type: ignore[misc]
    same = NetworkPolicy(mode="egress", allow=("github.com",))
    assert network == same and hash(network) == hash(same)
    assert len({network, same, NetworkPolicy()}) == 2


def test_summary_is_json_and_round_trips() -> None:
    network = NetworkPolicy(
        mode="egress",
        allow=("@npm", "github.com:443"),
        limits=Limits(total_bytes=10**9, connect_timeout=5),
    )
    summary = json.loads(json.dumps(network.summary()))
    assert summary == {
        "mode": "egress",
        "allow": ["@npm", "github.com:443"],
        "limits": {
            "max_connections": 64,
            "connections_per_minute": 600,
            "bytes_per_second": None,
            "total_bytes": 10**9,
            "connect_timeout": 5.0,
            "idle_timeout": 300.0,
            "header_timeout": 30.0,
        },
    }
    assert NetworkPolicy.model_validate(summary) == network
    assert NetworkPolicy.model_validate_json(network.model_dump_json()) == network


EGRESS = NetworkPolicy(
    mode="egress", allow=("github.com",), limits=Limits(max_connections=3, idle_timeout=150)
)


@pytest.mark.parametrize(
    ("mode", "allow", "base", "expected_mode", "expected_allow"),
    [
        (None, [], None, "none", ()),
        (None, [], EGRESS, "egress", ("github.com",)),
        (None, ["pypi.org"], None, "egress", ("pypi.org",)),
        (None, ["pypi.org", "@npm"], EGRESS, "egress", ("pypi.org", "@npm")),
        ("egress", [], None, "egress", ()),
        ("egress", [], EGRESS, "egress", ("github.com",)),
        ("egress", ["pypi.org"], EGRESS, "egress", ("pypi.org",)),
        ("none", [], EGRESS, "none", ()),
        ("nat", [], EGRESS, "nat", ()),
        ("nat", [], None, "nat", ()),
        ("none", [], None, "none", ()),
    ],
)
def test_from_options(
    mode: str | None,
    allow: list[str],
    base: NetworkPolicy | None,
    expected_mode: str,
    expected_allow: tuple[str, ...],
) -> None:
    network = NetworkPolicy.from_options(mode=mode, allow=allow, base=base)
    assert (network.mode, network.allow) == (expected_mode, expected_allow)
    assert network.limits == (base.limits if base is not None else Limits())


def test_from_options_without_anything_is_the_base_itself() -> None:
    assert NetworkPolicy.from_options(mode=None, allow=[], base=EGRESS) is EGRESS


@pytest.mark.parametrize(
    ("mode", "allow", "message"),
    [
        ("none", ["github.com"], "only apply to --network egress"),
        ("nat", ["github.com"], "only apply to --network egress"),
        ("open", [], "unknown network mode 'open'"),
        (None, ["https://github.com"], "'https://github.com'"),
        ("egress", ["github.com", "@pypy"], "'@pypy'"),
    ],
)
def test_from_options_errors(mode: str | None, allow: list[str], message: str) -> None:
    with pytest.raises(PolicyError) as info:
        NetworkPolicy.from_options(mode=mode, allow=allow, base=EGRESS)
    assert message in str(info.value)
    assert info.value.hint


def test_image_network_policy() -> None:
    assert image_network_policy({}) == NetworkPolicy()
    assert image_network_policy({"network": None}) == NetworkPolicy()
    assert image_network_policy({"network": EGRESS.model_dump(mode="json")}) == EGRESS
    with pytest.raises(PolicyError, match=r"allow\.0.*'@gone'") as info:
        image_network_policy({"network": {"mode": "egress", "allow": ["@gone"]}})
    assert info.value.hint


# ---------------------------------------------------------------------------- properties

ENTRY_ALPHABET = "abcxyz019-_.*:/[]@%?#,ü ABCf"


@given(st.text())
def test_parse_entry_raises_only_policy_error(text: str) -> None:
    _parse_or_refuse(text)


@given(st.text(alphabet=ENTRY_ALPHABET, max_size=40))
def test_parse_entry_raises_only_policy_error_on_entry_like_text(text: str) -> None:
    _parse_or_refuse(text)


def _parse_or_refuse(text: str) -> None:
    try:
        entries = parse_entry(text)
    except PolicyError:
        return
    for entry in entries:
        again = one(entry.canonical)
        assert (again.host, again.network, again.ports) == (entry.host, entry.network, entry.ports)
        if entry.preset is None:
            assert str(again) == str(entry)


LABEL = st.from_regex(r"[a-z0-9]([a-z0-9_-]{0,8}[a-z0-9])?", fullmatch=True)
GLOB_LABEL = st.one_of(LABEL, st.just("*"), LABEL.map(lambda label: label + "*"))
PORTS = st.frozensets(st.integers(1, 65535), min_size=1, max_size=3)


@st.composite
def entries(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["host", "v4", "v6"]))
    ports = draw(st.none() | PORTS)
    suffix = "" if ports is None else ":" + ",".join(str(port) for port in sorted(ports))
    if kind == "host":
        head = draw(st.lists(GLOB_LABEL, max_size=3))
        tail = [draw(LABEL), draw(LABEL.filter(lambda label: not label.isdigit()))]
        host = ".".join([*head, *tail])
        return draw(st.sampled_from([host, host.upper(), host + "."])) + suffix
    if kind == "v4":
        network4 = ipaddress.IPv4Network(
            (draw(st.integers(0, 2**32 - 1)), draw(st.integers(8, 32))), strict=False
        )
        return f"{network4}{suffix}"
    network6 = ipaddress.IPv6Network(
        (draw(st.integers(0, 2**128 - 1)), draw(st.integers(16, 128))), strict=False
    )
    return f"[{network6}]{suffix}" if suffix or draw(st.booleans()) else str(network6)


@given(entries())
def test_generated_entries_parse_and_round_trip(text: str) -> None:
    entry = one(text)
    again = one(str(entry))
    assert again == AllowEntry(
        text=str(entry), host=entry.host, network=entry.network, ports=entry.ports
    )
