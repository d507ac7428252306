"""The vendored API specifications match ../shared/reference where that exists."""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
SHARED = TESTS.parents[1] / "shared" / "reference"


@pytest.mark.parametrize(
    "rel", ["firecracker/firecracker.yaml", "cloud-hypervisor/cloud-hypervisor.yaml"]
)
def test_vendored_copy_is_unmodified(rel: str) -> None:
    vendored = TESTS / "reference" / rel
    assert vendored.is_file()
    upstream = SHARED / rel
    if not upstream.is_file():
        pytest.skip(f"{upstream} is not beside this checkout; nothing to compare with")
    assert vendored.read_bytes() == upstream.read_bytes()
