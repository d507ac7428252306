"""Fixtures of the FakeGitHub contract tests (helpers: ``fake_support``)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from fake_support import PAT, Receiver, bearer, make_fake, until

from stoker.ci.github.fake_github import FakeGitHub


@pytest.fixture(scope="module")
def app_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def no_threads_left() -> Iterator[None]:
    """Each test stops every thread it started (the fake's, receivers', proxies')."""
    before = set(threading.enumerate())
    yield
    # Request-handler threads may still be closing their sockets: a short grace.
    until(lambda: not set(threading.enumerate()) - before, 5, "the test's threads to end")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


@pytest.fixture
def gh(app_key: rsa.RSAPrivateKey, receiver: Receiver) -> Iterator[FakeGitHub]:
    with make_fake(app_key, receiver) as fake:
        yield fake


@pytest.fixture
def api(gh: FakeGitHub) -> Iterator[httpx.Client]:
    """A client with a static token; never through a proxy of the environment."""
    with httpx.Client(base_url=gh.url, headers=bearer(PAT), trust_env=False, timeout=10) as c:
        yield c
