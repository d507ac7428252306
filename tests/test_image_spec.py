"""Tests for stoker.images.spec: parsing, validation with positions, digests, examples.

Pure and fast: no network, no building.  Every rejection asserts the file, the
line, the image, the key path and what was expected.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from stoker.errors import UsageError
from stoker.images.catalog import SPECS_DIR
from stoker.images.debian import DEFAULT_PACKAGES, DebianSpec
from stoker.images.spec import (
    IMAGE_NAME_RE,
    Artifact,
    ImageSpec,
    collect_input_digests,
    digest_document,
    load_spec_file,
    parse_spec_text,
    required_inputs,
    spec_digest,
    to_debian_spec,
)
from stoker.images.store import _NAME_RE as store_name_re

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = SPECS_DIR
KERNEL = "k" * 64
SHA = "ab" * 32


def write(directory: Path, text: str, name: str = "spec.toml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def load(directory: Path, text: str, name: str = "spec.toml") -> dict[str, ImageSpec]:
    return load_spec_file(write(directory, text, name))


def rejection(directory: Path, text: str, name: str = "spec.toml") -> str:
    path = write(directory, text, name)
    with pytest.raises(UsageError) as info:
        load_spec_file(path)
    return str(info.value)


def one(directory: Path, text: str) -> ImageSpec:
    (spec,) = load(directory, text).values()
    return spec


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "ci").mkdir()
    (tmp_path / "ci" / "gitconfig").write_text("[user]\n  name = ci\n")
    (tmp_path / "motd").write_text("hello\n")
    return tmp_path


# --- the model ----------------------------------------------------------------------------------

FULL = f"""
[image.ci]
base = "debian:trixie"
packages = ["make", "git", "curl", "git"]
env = {{ CI = "true", LANG = "C.UTF-8" }}
run = ["git --version", "make --version"]
size_limit = "2G"
kernel = "stoker-microvm"

[[image.ci.files]]
src = "ci/gitconfig"
dest = "/etc/gitconfig"
mode = "600"

[[image.ci.users]]
name = "ci"
uid = 1001
groups = ["sudo", "adm", "sudo"]

[image.ci.defaults]
cpus = 4
memory = "2G"
disk = 8192

[image.ci.agent]
python = "/usr/bin/python3.12"

[[image.ci.artifacts]]
name = "node.js"
url = "https://nodejs.org/dist/v20.0.0/node-v20.0.0-linux-x64.tar.xz"
sha256 = "{SHA.upper()}"
dest = "/opt/node"
extract = true

[image.docs]
base = "ubuntu:noble"
"""


def test_multi_image_project_file(project: Path) -> None:
    specs = load(project, FULL)
    assert list(specs) == ["ci", "docs"]
    ci, docs = specs["ci"], specs["docs"]
    assert ci.name == "ci" and ci.base_kind == "debian" and ci.base_ref == "trixie"
    assert ci.packages == ("curl", "git", "make")  # sorted, de-duplicated
    assert ci.run == ("git --version", "make --version")  # order kept
    assert ci.size_limit == 2048
    assert ci.defaults.memory == 2048 and ci.defaults.disk == 8192 and ci.defaults.cpus == 4
    (file,) = ci.files
    assert file.src == str((project / "ci" / "gitconfig").resolve())
    assert file.mode == "0600"
    assert ci.users[0].groups == ("adm", "sudo")
    assert ci.users[0].shell == "/bin/bash"
    (artifact,) = ci.artifacts
    assert artifact.sha256 == SHA  # lower-cased
    assert artifact.override_env == "STOKER_ARTIFACT_NODE_JS"
    assert docs.base == "ubuntu:noble" and docs.kernel == "debian-cloud"
    assert docs.defaults.memory == 1024 and docs.defaults.disk == 4096
    assert docs.agent.python == "/usr/bin/python3"


def test_json_round_trip(project: Path) -> None:
    for spec in load(project, FULL).values():
        data = spec.model_dump(mode="json")
        assert ImageSpec.model_validate(data) == spec
        assert ImageSpec.model_validate(json.loads(json.dumps(data))) == spec
        assert ImageSpec.model_validate_json(spec.model_dump_json()) == spec


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.name)
def test_examples_round_trip(path: Path) -> None:
    for spec in load_spec_file(path).values():
        assert ImageSpec.model_validate(spec.model_dump(mode="json")) == spec


def test_specs_are_frozen(project: Path) -> None:
    spec = load(project, FULL)["ci"]
    with pytest.raises(ValidationError):
        spec.base = "debian:bookworm"


def test_direct_validation_needs_absolute_paths() -> None:
    with pytest.raises(ValidationError, match="needs a spec file"):
        ImageSpec.model_validate(
            {"name": "x", "base": "debian:bookworm", "files": [{"src": "a", "dest": "/a"}]}
        )


def test_strict_types_are_not_coerced() -> None:
    with pytest.raises(ValidationError):
        ImageSpec.model_validate({"name": "x", "base": "debian:bookworm", "packages": "git"})
    with pytest.raises(ValidationError):
        ImageSpec.model_validate(
            {"name": "x", "base": "debian:bookworm", "defaults": {"cpus": "2"}}
        )


def test_bases(project: Path) -> None:
    (project / "app.tar").write_bytes(b"")
    (project / "flake").mkdir()
    specs = load(
        project,
        """
        [image.oci]
        base = "oci:app.tar"

        [image.nix]
        base = "nixos:./flake#ci"

        [image.remote]
        base = "nixos:github:owner/repo#nixosConfigurations.ci"
        """,
    )
    assert specs["oci"].base == f"oci:{(project / 'app.tar').resolve()}"
    assert specs["nix"].base == f"nixos:{(project / 'flake').resolve()}#ci"
    assert specs["remote"].base_ref == "github:owner/repo#nixosConfigurations.ci"


def test_kernel_path_is_relative_to_the_spec(project: Path) -> None:
    (project / "vmlinuz").write_bytes(b"kernel")
    spec = one(project, '[image.k]\nbase = "debian:bookworm"\nkernel = "./vmlinuz"\n')
    assert spec.kernel == str((project / "vmlinuz").resolve())


def test_artifact_override(tmp_path: Path) -> None:
    artifact = Artifact.model_validate(
        {"name": "actions-runner", "url": "https://x.org/a", "sha256": SHA, "dest": "/opt/a"}
    )
    assert artifact.env_var == "STOKER_ARTIFACT_ACTIONS_RUNNER"
    assert artifact.local_override({}) is None
    local = tmp_path / "a.tar.gz"
    local.write_bytes(b"x")
    assert artifact.local_override({"STOKER_ARTIFACT_ACTIONS_RUNNER": str(local)}) == local
    with pytest.raises(UsageError, match="no such file"):
        artifact.local_override({"STOKER_ARTIFACT_ACTIONS_RUNNER": str(tmp_path / "gone")})
    custom = artifact.model_copy(update={"override_env": "RUNNER_TARBALL"})
    assert custom.env_var == "RUNNER_TARBALL"


# --- digests ------------------------------------------------------------------------------------


def digest(spec: ImageSpec) -> str:
    return spec_digest(
        spec, input_digests=collect_input_digests(spec, kernel=KERNEL), builder_version="1"
    )


def simple(directory: Path, body: str) -> ImageSpec:
    return one(directory, f'name = "x"\nbase = "debian:bookworm"\n{body}\n')


def test_digest_is_stable(project: Path) -> None:
    a = load(project, FULL)["ci"]
    b = load(project, FULL)["ci"]
    assert digest(a) == digest(b)
    assert len(digest(a)) == 64
    int(digest(a), 16)


def test_digest_ignores_package_order_and_duplicates(project: Path) -> None:
    a = simple(project, 'packages = ["git", "curl"]')
    b = simple(project, 'packages = ["curl", "git", "curl"]')
    c = simple(project, 'packages = ["curl"]')
    assert digest(a) == digest(b) != digest(c)


def test_digest_depends_on_run_order(project: Path) -> None:
    a = simple(project, 'run = ["one", "two"]')
    b = simple(project, 'run = ["two", "one"]')
    assert digest(a) != digest(b)


def test_digest_follows_file_contents_through_input_digests(project: Path) -> None:
    body = '[[files]]\nsrc = "motd"\ndest = "/etc/motd"'
    before = simple(project, body)
    first = digest(before)
    (project / "motd").write_text("changed\n")
    after = simple(project, body)
    assert after == before  # the spec itself did not change...
    assert digest(after) != first  # ...but the content did
    assert required_inputs(after) == {"kernel", "files[0]"}


def test_digest_ignores_name_and_location(
    project: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    (elsewhere / "motd").write_text((project / "motd").read_text())
    body = '[[files]]\nsrc = "motd"\ndest = "/etc/motd"'
    a = simple(project, body)
    b = one(elsewhere, f'name = "y"\nbase = "debian:bookworm"\n{body}\n')
    assert a.files[0].src != b.files[0].src
    assert digest(a) == digest(b)


def test_digest_depends_on_builder_version_kernel_and_defaults(project: Path) -> None:
    spec = simple(project, "")
    inputs = {"kernel": KERNEL}
    base = spec_digest(spec, input_digests=inputs, builder_version="1")
    assert spec_digest(spec, input_digests=inputs, builder_version="2") != base
    assert spec_digest(spec, input_digests={"kernel": "f" * 64}, builder_version="1") != base
    bigger = simple(project, "[defaults]\nmemory = 2048")
    assert spec_digest(bigger, input_digests=inputs, builder_version="1") != base
    same = simple(project, '[defaults]\nmemory = "1G"\ndisk = "4096M"')
    assert spec_digest(same, input_digests=inputs, builder_version="1") == base


def test_job_limits_in_defaults(project: Path) -> None:
    spec = simple(project, '[defaults]\njob_pids_limit = 256\njob_memory_limit = "512M"')
    assert (spec.defaults.job_pids_limit, spec.defaults.job_memory_limit) == (256, 512)
    plain = simple(project, "")
    assert (plain.defaults.job_pids_limit, plain.defaults.job_memory_limit) == (None, None)
    # Images that set no limits keep the digests they had; a limit is part of the image.
    assert "job_pids_limit" not in digest_document(plain)["defaults"]
    assert digest(spec) != digest(plain)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("job_pids_limit = 0", "defaults.job_pids_limit: expected a number >= 1"),
        ('job_pids_limit = "lots"', "defaults.job_pids_limit: expected an integer"),
        ('job_memory_limit = "8M"', "job_memory_limit must be at least 16 MiB"),
    ],
)
def test_bad_job_limits(project: Path, body: str, expected: str) -> None:
    text = f'name = "x"\nbase = "debian:bookworm"\n[defaults]\n{body}\n'
    assert expected in rejection(project, text)


def test_digest_document_has_defaults_and_no_host_paths(project: Path) -> None:
    spec = load(project, FULL)["ci"]
    document = digest_document(spec)
    assert "name" not in document
    assert document["defaults"] == {"cpus": 4, "memory": 2048, "disk": 8192}
    assert document["files"] == [{"dest": "/etc/gitconfig", "mode": "0600"}]
    assert "override_env" not in document["artifacts"][0]
    assert str(project) not in json.dumps(document)


def test_digest_requires_exactly_the_inputs(project: Path) -> None:
    spec = simple(project, '[[files]]\nsrc = "motd"\ndest = "/etc/motd"')
    with pytest.raises(ValueError, match=r"missing \['files\[0\]'\]"):
        spec_digest(spec, input_digests={"kernel": KERNEL}, builder_version="1")
    with pytest.raises(ValueError, match=r"unexpected \['kernal'\]"):
        spec_digest(
            spec,
            input_digests={"kernel": KERNEL, "files[0]": SHA, "kernal": KERNEL},
            builder_version="1",
        )
    (project / "app.tar").write_bytes(b"")
    oci = one(project, 'name = "o"\nbase = "oci:app.tar"\n')
    assert required_inputs(oci) == {"kernel", "base"}
    with pytest.raises(ValueError, match="pass its digest"):
        collect_input_digests(oci, kernel=KERNEL)
    assert collect_input_digests(oci, kernel=KERNEL, base=SHA) == {"kernel": KERNEL, "base": SHA}


# --- Debian mapping -----------------------------------------------------------------------------


def test_to_debian_spec_keeps_default_packages(project: Path) -> None:
    spec = simple(project, 'packages = ["curl", "git=1:2.39.5-0+deb12u1"]')
    debian = to_debian_spec(spec)
    assert debian.suite == "bookworm"
    assert "python3" in debian.packages and "curl" in debian.packages
    # a pinned default package replaces the unpinned one
    assert "git=1:2.39.5-0+deb12u1" in debian.packages and "git" not in debian.packages
    assert set(DEFAULT_PACKAGES) - {"git"} <= set(debian.packages)


def test_to_debian_spec_maps_suite(project: Path) -> None:
    spec = one(project, '[image.t]\nbase = "debian:trixie"\nagent.python = "/usr/bin/python3.13"\n')
    debian = to_debian_spec(spec)
    assert debian.suite == "trixie"


def test_to_debian_spec_maps_ubuntu(project: Path) -> None:
    spec = one(project, '[image.u]\nbase = "ubuntu:noble"\n')
    assert to_debian_spec(spec).suite == "noble"


def test_to_debian_spec_refuses_other_bases(project: Path) -> None:
    (project / "layout").mkdir()
    spec = one(project, '[image.o]\nbase = "oci:layout"\n')
    with pytest.raises(UsageError, match="not a Debian or Ubuntu base"):
        to_debian_spec(spec)


# --- shipped examples ---------------------------------------------------------------------------


def examples() -> dict[str, ImageSpec]:
    found: dict[str, ImageSpec] = {}
    for path in sorted(EXAMPLES.glob("*.toml")):
        found.update(load_spec_file(path))
    return found


def test_shipped_examples_load() -> None:
    specs = examples()
    assert set(specs) >= {"default", "python", "github-runner", "gitlab-runner"}
    for name, spec in specs.items():
        assert spec.name == name
        value = spec_digest(
            spec, input_digests=collect_input_digests(spec, kernel=KERNEL), builder_version="2"
        )
        assert len(value) == 64


def test_default_example_is_the_embedded_default() -> None:
    spec = examples()["default"]
    # The shipped file is the default image: nothing but the default packages.
    assert to_debian_spec(spec) == DebianSpec()
    assert (spec.users, spec.files, spec.run, spec.artifacts, spec.env) == ((), (), (), (), {})


def test_python_example() -> None:
    packages = set(to_debian_spec(examples()["python"]).packages)
    assert {"python3", "python3-pip", "python3-venv", "build-essential"} <= packages


def test_github_runner_example_is_pinned() -> None:
    spec = examples()["github-runner"]
    (runner,) = spec.artifacts
    assert runner.url.startswith("https://github.com/actions/runner/releases/download/v2.")
    assert runner.url.endswith("-linux-x64-2.321.0.tar.gz")
    assert not runner.is_placeholder
    assert runner.extract
    assert runner.env_var == "STOKER_ARTIFACT_ACTIONS_RUNNER"
    wanted = {"libicu72", "libssl3", "libkrb5-3", "zlib1g", "liblttng-ust1", "git", "curl"}
    assert wanted | {"ca-certificates"} <= set(spec.packages)
    assert "docker.io" not in spec.packages
    assert [u.name for u in spec.users] == ["runner"]


def test_gitlab_runner_example() -> None:
    spec = examples()["gitlab-runner"]
    (runner,) = spec.artifacts
    assert runner.url.endswith("/binaries/gitlab-runner-linux-amd64")
    assert "/v" in runner.url and "/latest/" not in runner.url  # a release to --pin
    # No checksum in the spec: the host's gitlab-runner, a pinned release or nothing.
    assert runner.sha256 is None and not runner.is_placeholder
    assert runner.optional and runner.host_binary == "gitlab-runner"
    assert runner.version is not None and runner.version in runner.url
    assert {"git", "curl"} <= set(spec.packages)


def test_image_names_follow_the_store_rule() -> None:
    assert IMAGE_NAME_RE.pattern == store_name_re.pattern


def test_parse_spec_text_resolves_against_origin(project: Path) -> None:
    specs = parse_spec_text(
        'name = "x"\nbase = "debian:bookworm"\nfiles = [{src = "motd", dest = "/m"}]\n',
        origin=project / "virtual.toml",
    )
    assert specs["x"].files[0].src == str((project / "motd").resolve())


# --- pinning an artifact to another release ----------------------------------------------------


def test_the_github_runner_can_be_pinned_to_another_release() -> None:
    from stoker.images.catalog import load_specs
    from stoker.images.spec import digest_document

    spec = load_specs("github-runner")["github-runner"]
    (runner,) = spec.artifacts
    assert runner.version == "2.321.0"
    pinned = spec.pin("actions-runner", "2.330.0", "a" * 64)
    (new,) = pinned.artifacts
    assert new.url == (
        "https://github.com/actions/runner/releases/download/v2.330.0/"
        "actions-runner-linux-x64-2.330.0.tar.gz"
    )
    assert (new.version, new.sha256, new.dest) == ("2.330.0", "a" * 64, runner.dest)
    assert digest_document(pinned) != digest_document(spec)
    assert spec.artifacts[0].version == "2.321.0"  # the original is unchanged


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("nope", "2.330.0", "a" * 64), "has no artifact of that name"),
        (("actions-runner", "2.330.0", "xyz"), "sha256"),
        (("actions-runner", "../../evil", "a" * 64), "version"),
    ],
)
def test_bad_pins_are_refused(args: tuple[str, str, str], message: str) -> None:
    from stoker.images.catalog import load_specs

    spec = load_specs("github-runner")["github-runner"]
    with pytest.raises(UsageError, match=message):
        spec.pin(*args)


def test_a_version_must_appear_in_the_url() -> None:
    with pytest.raises(ValidationError, match="does not appear in the url"):
        Artifact.model_validate(
            {
                "name": "x",
                "url": "https://example.com/x-1.0.tar.gz",
                "sha256": "a" * 64,
                "dest": "/opt/x",
                "version": "2.0",
            }
        )
