"""Tests for how stoker.images.spec rejects a file: the file, the line, the image, the key
path and what was expected (``stoker.images.spec_errors``), and the locator behind them.

Pure and fast: no network, no building.  The helpers and the ``project``
fixture are ``test_image_spec``'s.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from stoker.errors import UsageError
from stoker.images.spec import load_spec_file
from stoker.images.spec_errors import _Locator
from test_image_spec import SHA, project, rejection, write

__all__ = ["project"]  # the fixture, imported for these tests


# --- rejections: file, line, image, key path, expectation ---------------------------------------

# Each case: TOML text (a project file with image "ci"), line, key path, expected text.
REJECTIONS = {
    "unknown key": (
        """
        [image.ci]
        base = "debian:bookworm"
        pakages = ["git"]
        """,
        3,
        "image.ci.pakages",
        "unknown key 'pakages' (did you mean 'packages'?); expected one of: agent, artifacts,",
    ),
    "unknown nested key": (
        """
        [image.ci]
        base = "debian:bookworm"

        [image.ci.defaults]
        cpus = 2
        ram = "2G"
        """,
        6,
        "image.ci.defaults.ram",
        "unknown key 'ram'; expected one of: cpus, disk, job_memory_limit, job_pids_limit, memory",
    ),
    "wrong type": (
        """
        [image.ci]
        base = "debian:bookworm"
        packages = "git"
        """,
        3,
        "image.ci.packages",
        "expected an array, got a string",
    ),
    "wrong type in an array": (
        """
        [image.ci]
        base = "debian:bookworm"
        run = [
            "make",
            42,
        ]
        """,
        5,
        "image.ci.run[1]",
        "expected a string, got an integer",
    ),
    "wrong type of a table": (
        """
        [image.ci]
        base = "debian:bookworm"
        defaults = 4
        """,
        3,
        "image.ci.defaults",
        "expected a table, got an integer",
    ),
    "bool is not an integer": (
        """
        [image.ci]
        base = "debian:bookworm"
        defaults = { cpus = true }
        """,
        3,
        "image.ci.defaults.cpus",
        "expected an integer, got a boolean",
    ),
    "missing base": (
        """
        # no base
        [image.ci]
        packages = ["git"]
        """,
        2,
        "image.ci.base",
        "required key is missing",
    ),
    "unknown base": (
        """
        [image.ci]
        base = "alpine:3.20"
        """,
        2,
        "image.ci.base",
        'unknown base \'alpine:3.20\'; expected "debian:bookworm", "debian:trixie"',
    ),
    "unknown suite": (
        """
        [image.ci]
        base = "debian:buster"
        """,
        2,
        "image.ci.base",
        "unknown Debian suite 'buster'; expected one of: bookworm, trixie",
    ),
    "bad nixos base": (
        """
        [image.ci]
        base = "nixos:./flake"
        """,
        2,
        "image.ci.base",
        'expected "nixos:FLAKEREF#ATTR"',
    ),
    "missing oci base": (
        """
        [image.ci]
        base = "oci:images/app.tar"
        """,
        2,
        "image.ci.base",
        "OCI base 'images/app.tar' does not exist",
    ),
    "missing file src": (
        """
        [image.ci]
        base = "debian:bookworm"

        [[image.ci.files]]
        src = "motd"
        dest = "/etc/motd"

        [[image.ci.files]]
        src = "ci/missing.conf"
        dest = "/etc/missing.conf"
        """,
        9,
        "image.ci.files[1].src",
        "'ci/missing.conf' does not exist",
    ),
    "file src outside the spec directory": (
        """
        [image.ci]
        base = "debian:bookworm"
        files = [{ src = "../../etc/passwd", dest = "/etc/p" }]
        """,
        3,
        "image.ci.files[0].src",
        "leads outside the spec file's directory",
    ),
    "absolute file src": (
        """
        [image.ci]
        base = "debian:bookworm"
        files = [{ src = "/etc/hostname", dest = "/etc/h" }]
        """,
        3,
        "image.ci.files[0].src",
        "expected a path relative to the spec file, got '/etc/hostname'",
    ),
    "file src is a directory": (
        """
        [image.ci]
        base = "debian:bookworm"
        files = [{ src = "ci", dest = "/etc/ci" }]
        """,
        3,
        "image.ci.files[0].src",
        "'ci' is not a regular file",
    ),
    "mode not octal, third file": (
        """
        [image.ci]
        base = "debian:bookworm"

        [[image.ci.files]]
        src = "motd"
        dest = "/etc/motd"

        [[image.ci.files]]
        src = "motd"
        dest = "/etc/motd2"

        [[image.ci.files]]
        src = "ci/gitconfig"
        dest = "/etc/gitconfig"
        mode = "0999"
        """,
        15,
        "image.ci.files[2].mode",
        'expected an octal file mode like "0644" or "0755", got \'0999\'',
    ),
    "mode as a number": (
        """
        [image.ci]
        base = "debian:bookworm"
        files = [
            { src = "motd", dest = "/etc/motd" },
            { src = "motd", dest = "/etc/motd2", mode = 644 },
        ]
        """,
        5,
        "image.ci.files[1].mode",
        'expected the mode as a quoted octal string like "0644", got 644',
    ),
    "relative dest": (
        """
        [image.ci]
        base = "debian:bookworm"
        files = [{ src = "motd", dest = "etc/motd" }]
        """,
        3,
        "image.ci.files[0].dest",
        "expected an absolute guest path like \"/etc/motd\", got 'etc/motd'",
    ),
    "dest with ..": (
        """
        [image.ci]
        base = "debian:bookworm"
        files = [{ src = "motd", dest = "/etc/../../root/x" }]
        """,
        3,
        "image.ci.files[0].dest",
        "must not contain '..'",
    ),
    "duplicate dest": (
        """
        [image.ci]
        base = "debian:bookworm"
        files = [{ src = "motd", dest = "/etc/motd" }, { src = "motd", dest = "/etc//motd" }]
        """,
        3,
        "image.ci.files",
        "files[0] and files[1] have the same dest '/etc/motd'",
    ),
    "bad package name": (
        """
        [image.ci]
        base = "debian:bookworm"
        packages = [
            "git",
            "curl",
            "Bad_Name",
        ]
        """,
        6,
        "image.ci.packages[2]",
        "expected a Debian package name",
    ),
    "bad env name": (
        """
        [image.ci]
        base = "debian:bookworm"

        [image.ci.env]
        GOOD = "1"
        "BAD KEY" = "x"
        """,
        6,
        'image.ci.env."BAD KEY"',
        "expected a variable name of letters, digits and '_' (not starting with a digit)",
    ),
    "env value not a string": (
        """
        [image.ci]
        base = "debian:bookworm"
        env = { DEBUG = 1 }
        """,
        3,
        "image.ci.env.DEBUG",
        "expected a string, got an integer",
    ),
    "sha256 too short": (
        """
        [image.ci]
        base = "debian:bookworm"

        [[image.ci.artifacts]]
        name = "tool"
        url = "https://example.org/tool.tar.gz"
        sha256 = "abc123"
        dest = "/opt/tool"
        """,
        7,
        "image.ci.artifacts[0].sha256",
        "expected a SHA-256 of exactly 64 hex digits, got 'abc123'",
    ),
    "sha256 not hex": (
        """
        [image.ci]
        base = "debian:bookworm"
        artifacts = [
            { name = "tool", url = "https://example.org/t", dest = "/opt/t", sha256 = "%s" },
        ]
        """
        % ("g" * 64),
        4,
        "image.ci.artifacts[0].sha256",
        "expected a SHA-256 of exactly 64 hex digits",
    ),
    "artifact without sha256": (
        """
        [image.ci]
        base = "debian:bookworm"

        [[image.ci.artifacts]]
        name = "tool"
        url = "https://example.org/tool.tar.gz"
        dest = "/opt/tool"
        """,
        4,
        "image.ci.artifacts[0].sha256",
        "required key is missing",
    ),
    "artifact without url": (
        f"""
        [image.ci]
        base = "debian:bookworm"

        [[image.ci.artifacts]]
        name = "one"
        url = "https://example.org/one"
        sha256 = "{SHA}"
        dest = "/opt/one"

        [[image.ci.artifacts]]
        name = "two"
        sha256 = "{SHA}"
        dest = "/opt/two"
        """,
        10,
        "image.ci.artifacts[1].url",
        "required key is missing",
    ),
    "artifact url not http": (
        f"""
        [image.ci]
        base = "debian:bookworm"

        [[image.ci.artifacts]]
        name = "tool"
        url = "file:///etc/shadow"
        sha256 = "{SHA}"
        dest = "/opt/tool"
        """,
        6,
        "image.ci.artifacts[0].url",
        "expected an http:// or https:// URL, got 'file:///etc/shadow'",
    ),
    "unknown kernel": (
        """
        [image.ci]
        base = "debian:bookworm"
        kernel = "linux-latest"
        """,
        3,
        "image.ci.kernel",
        "unknown kernel 'linux-latest'; expected 'debian-cloud', 'stoker-microvm', 'auto' "
        "or a path",
    ),
    "bad size": (
        """
        [image.ci]
        base = "debian:bookworm"
        size_limit = "huge"
        """,
        3,
        "image.ci.size_limit",
        "cannot read size 'huge' (expected e.g. 512M, 2G)",
    ),
    "memory too small": (
        """
        [image.ci]
        base = "debian:bookworm"

        [image.ci.defaults]
        memory = "64M"
        """,
        5,
        "image.ci.defaults.memory",
        "memory must be at least 128 MiB",
    ),
    "cpus out of range": (
        """
        [image.ci]
        base = "debian:bookworm"
        defaults.cpus = 0
        """,
        3,
        "image.ci.defaults.cpus",
        "expected a number >= 1, got 0",
    ),
    "duplicate user": (
        """
        [image.ci]
        base = "debian:bookworm"

        [[image.ci.users]]
        name = "ci"

        [[image.ci.users]]
        name = "ci"
        """,
        4,
        "image.ci.users",
        "users[0] and users[1] have the same name 'ci'",
    ),
    "bad user name": (
        """
        [image.ci]
        base = "debian:bookworm"

        [[image.ci.users]]
        name = "Runner"
        """,
        5,
        "image.ci.users[0].name",
        "expected a user or group name",
    ),
    "name inside a project table": (
        """
        [image.ci]
        name = "other"
        base = "debian:bookworm"
        """,
        2,
        "image.ci.name",
        "given by its table header [image.ci]; remove this key",
    ),
    "bad image name": (
        """
        [image."c i"]
        base = "debian:bookworm"
        """,
        1,
        'image."c i".name',
        "expected an image name",
    ),
}


@pytest.mark.parametrize("case", sorted(REJECTIONS))
def test_rejections_name_file_line_image_key_and_expectation(project: Path, case: str) -> None:
    text, line, key, expected = REJECTIONS[case]
    message = rejection(project, text)
    image = "c i" if case == "bad image name" else "ci"
    prefix = f"{project / 'spec.toml'}:{line}: image {image!r}: {key}: "
    assert message.startswith(prefix), message
    assert expected in message, message


def test_single_image_file_reports_key_paths_without_image_prefix(project: Path) -> None:
    message = rejection(
        project,
        """
        name = "ci"
        base = "debian:bookworm"

        [[files]]
        src = "motd"
        dest = "/etc/motd"
        mode = "rw-r--r--"
        """,
    )
    assert message.startswith(f"{project / 'spec.toml'}:7: image 'ci': files[0].mode: expected")


def test_single_image_file_needs_a_name(project: Path) -> None:
    message = rejection(project, 'base = "debian:bookworm"\n')
    assert message.startswith(f"{project / 'spec.toml'}: name: required key is missing")
    assert "[image.NAME]" in message


def test_top_level_keys_next_to_image_tables_are_rejected(project: Path) -> None:
    message = rejection(
        project,
        """
        packages = ["git"]

        [image.ci]
        base = "debian:bookworm"
        """,
    )
    assert message.startswith(f"{project / 'spec.toml'}:1: packages: unexpected top-level key")


def test_empty_image_table_is_rejected(project: Path) -> None:
    message = rejection(project, "[image]\n")
    assert message.startswith(f"{project / 'spec.toml'}:1: image: no images defined")


def test_image_that_is_not_a_table_is_rejected(project: Path) -> None:
    message = rejection(project, "image.ci = 3\n")
    assert message.startswith(f"{project / 'spec.toml'}:1: image 'ci': image.ci: expected a table")


def test_toml_syntax_error_keeps_line_and_column(project: Path) -> None:
    message = rejection(
        project,
        """
        [image.ci]
        base = "debian:bookworm"
        packages = ["git",
        run = 3
        """,
    )
    assert message.startswith(f"{project / 'spec.toml'}: invalid TOML: ")
    assert "(at line 4, column" in message


def test_every_problem_is_reported_sorted_by_line(project: Path) -> None:
    message = rejection(
        project,
        """
        [image.b]
        base = "debian:bookworm"
        packages = ["Bad"]

        [image.a]
        base = "nope"
        colour = "blue"
        """,
    )
    lines = message.splitlines()
    assert lines[0] == f"{project / 'spec.toml'}: 3 problems"
    assert lines[1].startswith(f"  {project / 'spec.toml'}:3: image 'b': image.b.packages[0]:")
    assert lines[2].startswith(f"  {project / 'spec.toml'}:6: image 'a': image.a.base: unknown")
    assert lines[3].startswith(f"  {project / 'spec.toml'}:7: image 'a': image.a.colour: unknown")


def test_missing_spec_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        load_spec_file(tmp_path / "nope.toml")


def test_errors_carry_a_hint(project: Path) -> None:
    path = write(project, '[image.ci]\nbase = "x"\n')
    with pytest.raises(UsageError) as info:
        load_spec_file(path)
    assert info.value.hint is not None and "images/" in info.value.hint


# --- the locator --------------------------------------------------------------------------------


def test_locator_finds_tables_arrays_inline_tables_and_dotted_keys() -> None:
    text = textwrap.dedent(
        """\
        title = "a ] tricky # string"  # comment with [brackets]
        multi = '''
        [not.a.table]
        '''
        [image.ci]
        defaults.cpus = 2
        files = [
          { src = "a", dest = "/a" },  # first
          {
            src = "b", dest = "/b",
            mode = "0600" },
        ]
        "quoted key" = { "inner.key" = [1, [2, 3]] }

        [[image.ci.artifacts]]
        name = "one"

        [[image.ci.artifacts]]
        name = "two"

        [image.ci.artifacts.extra]
        x = 1
        """
    )
    lines = _Locator(text).lines
    assert lines[("title",)] == 1
    assert lines[("multi",)] == 2
    assert ("not",) not in lines
    assert lines[("image", "ci")] == 5
    assert lines[("image", "ci", "defaults", "cpus")] == 6
    assert lines[("image", "ci", "files", 0, "dest")] == 8
    assert lines[("image", "ci", "files", 1)] == 9
    assert lines[("image", "ci", "files", 1, "mode")] == 11
    assert lines[("image", "ci", "quoted key", "inner.key", 1, 0)] == 13
    assert lines[("image", "ci", "artifacts", 0, "name")] == 16
    assert lines[("image", "ci", "artifacts", 1)] == 18
    assert lines[("image", "ci", "artifacts", 1, "extra", "x")] == 22


def test_locator_falls_back_to_the_nearest_ancestor() -> None:
    locator = _Locator('[image.ci]\nbase = "x"\n\n[image.ci.defaults]\ncpus = 1\n')
    assert locator.line_of(("image", "ci", "defaults", "memory")) == 4
    assert locator.line_of(("image", "ci", "users", 0, "name")) == 1
    assert locator.line_of(("nothing",)) is None
