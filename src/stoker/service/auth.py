"""Bearer tokens for the ``stoker serve`` API.

Tokens are random strings handed to users once (``stoker token new``); the
service only keeps their SHA-256 (hex) in its config, with a name and a set
of scopes:

* ``submit``: create and cancel jobs;
* ``read``: look at jobs, logs, artifacts, pools, VMs, hosts and metrics;
* ``admin``: everything (it implies the two others).

A presented token is hashed and compared with every configured hash using
:func:`hmac.compare_digest`, so neither the comparison nor which entry
matched leaks through timing.  Tokens themselves are never logged or stored.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol, get_args

from stoker.fields import NAME_RE, Scope

__all__ = [
    "SCOPES",
    "Principal",
    "Scope",
    "TokenEntry",
    "TokenTable",
    "config_snippet",
    "hash_token",
    "new_token",
    "parse_scopes",
]

#: Every scope, in the order they are documented.
SCOPES: Final[tuple[Scope, ...]] = get_args(Scope)

#: Prefix of tokens made by :func:`new_token`: recognisable in leaked-secret scanners.
TOKEN_PREFIX: Final = "stk_"  # noqa: S105 - a prefix, not a secret


class TokenEntry(Protocol):
    """A configured token, as ``[[tokens]]`` in the service config holds it."""

    @property
    def name(self) -> str: ...

    @property
    def sha256(self) -> str: ...

    @property
    def scopes(self) -> Sequence[str]: ...


@dataclass(frozen=True)
class Principal:
    """Who made a request: the token's name (the job's submitter) and its scopes."""

    name: str
    scopes: frozenset[str]

    def allows(self, scope: Scope) -> bool:
        """True when this principal may use endpoints that require ``scope``."""
        return scope in self.scopes or "admin" in self.scopes


def hash_token(token: str) -> str:
    """The lowercase hex SHA-256 of ``token`` (UTF-8), as stored in the config."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh random token (256 bits of entropy)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def parse_scopes(text: str | Iterable[str]) -> tuple[Scope, ...]:
    """``"submit,read"`` (or a list) -> validated scopes; raises ``ValueError`` on unknown ones."""
    items = text.split(",") if isinstance(text, str) else list(text)
    scopes: list[Scope] = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        if item not in SCOPES:
            raise ValueError(f"unknown scope {item!r} (known: {', '.join(SCOPES)})")
        if item not in scopes:
            scopes.append(item)
    if not scopes:
        raise ValueError(f"no scopes given (known: {', '.join(SCOPES)})")
    return tuple(scopes)


class TokenTable:
    """The configured tokens; :meth:`authenticate` maps a presented token to a principal."""

    def __init__(self, entries: Iterable[TokenEntry]) -> None:
        self._entries: list[tuple[bytes, Principal]] = []
        for entry in entries:
            digest = entry.sha256.strip().lower()
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"token {entry.name!r}: sha256 must be 64 hex digits")
            self._entries.append(
                (digest.encode(), Principal(entry.name, frozenset(parse_scopes(entry.scopes))))
            )

    def __len__(self) -> int:
        return len(self._entries)

    def authenticate(self, token: str) -> Principal | None:
        """The principal ``token`` belongs to, or ``None``.

        Every entry is compared (no early exit), each in constant time.
        """
        presented = hash_token(token).encode()
        found: Principal | None = None
        for digest, principal in self._entries:
            if hmac.compare_digest(presented, digest) and found is None:
                found = principal
        return found


def config_snippet(name: str, scopes: Sequence[str], token: str) -> str:
    """The ``[[tokens]]`` TOML block that makes ``token`` valid (only its hash appears).

    Raises ``ValueError`` for a name the service config would refuse.
    """
    if not NAME_RE.fullmatch(name):
        raise ValueError(
            f"token name {name!r}: use letters, digits, '.', '_' and '-' "
            "(not starting with a symbol, at most 64 characters)"
        )
    scope_list = ", ".join(f'"{s}"' for s in scopes)
    return f'[[tokens]]\nname = "{name}"\nsha256 = "{hash_token(token)}"\nscopes = [{scope_list}]\n'
