"""Artifacts the spec does not pin: the host's binary, a local file, a pinned release, or none."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from stoker.errors import UsageError
from stoker.images.catalog import SPECS_DIR
from stoker.images.host_artifacts import resolve_artifacts
from stoker.images.spec import ImageSpec, load_spec_file, spec_digest


def shipped() -> ImageSpec:
    return load_spec_file(SPECS_DIR / "gitlab-runner.toml")["gitlab-runner"]


def digest(spec: ImageSpec) -> str:
    inputs = {"kernel": "sha256:" + "1" * 64}
    return spec_digest(spec, input_digests=inputs, builder_version="test")


def test_the_host_binary_is_used_and_pinned(tmp_path: Path) -> None:
    binary = tmp_path / "gitlab-runner"
    binary.write_bytes(b"host gitlab-runner v1")
    found = resolve_artifacts(shipped(), overrides={}, environ={}, which=lambda name: str(binary))
    (artifact,) = found.spec.artifacts
    assert artifact.sha256 == hashlib.sha256(b"host gitlab-runner v1").hexdigest()
    assert found.sources == {"gitlab-runner": binary} and not found.notes
    # another host binary: another image (never a stale cache hit)
    binary.write_bytes(b"host gitlab-runner v2")
    again = resolve_artifacts(shipped(), overrides={}, environ={}, which=lambda _: str(binary))
    assert digest(again.spec) != digest(found.spec)


def test_a_local_file_wins_over_the_host_binary(tmp_path: Path) -> None:
    local = tmp_path / "gitlab-runner-linux-amd64"
    local.write_bytes(b"downloaded by hand")
    via_env = resolve_artifacts(
        shipped(),
        overrides={},
        environ={"STOKER_ARTIFACT_GITLAB_RUNNER": str(local)},
        which=lambda _: "/usr/bin/should-not-be-used",
    )
    assert via_env.sources == {"gitlab-runner": local}
    via_flag = resolve_artifacts(
        shipped(), overrides={"gitlab-runner": local}, environ={}, which=lambda _: None
    )
    assert via_flag.spec == via_env.spec


def test_nothing_available_builds_without_it_and_says_so() -> None:
    found = resolve_artifacts(shipped(), overrides={}, environ={}, which=lambda _: None)
    assert found.spec.artifacts == () and not found.sources
    (note,) = found.notes
    assert "built without gitlab-runner" in note
    assert "no gitlab-runner on this host's PATH" in note
    assert "--pin gitlab-runner=VERSION:SHA256" in note


def test_a_pinned_release_is_left_to_the_download(tmp_path: Path) -> None:
    pinned = shipped().pin("gitlab-runner", "17.7.0", "a" * 64)
    found = resolve_artifacts(pinned, overrides={}, environ={}, which=lambda _: "/x")
    (artifact,) = found.spec.artifacts
    assert artifact.sha256 == "a" * 64 and "/v17.7.0/" in artifact.url
    assert found.spec is pinned and not found.sources


def test_a_required_unpinned_artifact_fails_with_the_fix(tmp_path: Path) -> None:
    spec_file = tmp_path / "tool.toml"
    spec_file.write_text(
        'name = "tool"\nbase = "debian:bookworm"\n[[artifacts]]\nname = "tool"\n'
        'url = "https://example.com/v1.0/tool"\nversion = "1.0"\nhost_binary = "tool"\n'
        'dest = "/usr/local/bin/tool"\n'
    )
    spec = load_spec_file(spec_file)["tool"]
    with pytest.raises(UsageError, match="no tool is on this host's PATH") as refused:
        resolve_artifacts(spec, overrides={}, environ={}, which=lambda _: None)
    assert refused.value.hint == "stoker image build tool --pin tool=VERSION:SHA256"
    spec_file.write_text(spec_file.read_text().replace('host_binary = "tool"\n', ""))
    with pytest.raises(
        UsageError, match=r"sha256: required key is missing \(unless the artifact is optional"
    ):
        load_spec_file(spec_file)
