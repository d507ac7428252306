"""Tests for the nixos image builder (stoker.images.nixos).

The builder is exercised here through its command construction (golden argv
and expressions, escaping) and the parsing of what Nix prints; packing a
stand-in store closure is in test_nixos_pack.py.  No fake ``nix``.  Builds
and boots with the real Nix (a stand-in system closure, no nixpkgs here) are
in test_nixos_standin.py.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stoker import doctor
from stoker.errors import LaunchError, ProvisionError, UsageError
from stoker.images import nixcmd, nixos
from stoker.images.nixcmd import flake_identity, flake_metadata_argv
from stoker.images.nixos import (
    BootLinks,
    NixosBuilder,
    check_nixos_spec,
    closure_argv,
    flake_url,
    local_flake_url,
    nix_build_argv,
    nix_build_expr,
    nix_string,
    nixos_attr_name,
    nixos_base_digest,
    nixos_kernel_cmdline,
    parse_closure,
    split_nixos_base,
    store_mkfs_argv,
)
from stoker.images.spec import ImageSpec
from stoker.paths import Dirs
from stoker.protocol import wire

HAVE_EROFS = all(shutil.which(t) for t in ("mkfs.erofs", "fsck.erofs", "dump.erofs"))
needs_erofs = pytest.mark.skipif(
    not HAVE_EROFS, reason="erofs-utils (mkfs/fsck/dump.erofs) missing"
)

H1 = "0" * 32
H2 = "1" * 32
H3 = "a" * 32
TOPLEVEL = f"/nix/store/{H1}-nixos-system-ci-24.05"
DIGEST = "ab" * 32


def store_hash(n: int) -> str:
    """A valid, distinct Nix base-32 hash for the stand-in store."""
    digits = nixos.NIX_BASE32
    out = ""
    for _ in range(32):
        out += digits[n % 32]
        n //= 32
    return out


# --- a Nix string-literal reader, to check escaping from the other side -------------------------


def read_nix_string(text: str, start: int) -> tuple[str, list[str], int]:
    """Read the string literal starting at ``text[start] == '"'`` as Nix's lexer does.

    Returns (value, interpolated expressions, index after the closing quote).
    """
    assert text[start] == '"'
    value: list[str] = []
    interpolations: list[str] = []
    i = start + 1
    while True:
        char = text[i]
        if char == "\\":
            nxt = text[i + 1]
            value.append({"n": "\n", "r": "\r", "t": "\t"}.get(nxt, nxt))
            i += 2
        elif char == '"':
            return "".join(value), interpolations, i + 1
        elif text.startswith("${", i):
            depth, j = 1, i + 2
            while depth:
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                j += 1
            interpolations.append(text[i + 2 : j - 1])
            value.append("\0")  # a placeholder: something is spliced in here
            i = j
        else:
            value.append(char)
            i += 1


def skeleton(expr: str) -> tuple[str, list[str]]:
    """``expr`` with every string literal replaced by ``"…"``, and the literals' values."""
    out: list[str] = []
    values: list[str] = []
    i = 0
    while i < len(expr):
        if expr[i] == '"':
            value, _interp, i = read_nix_string(expr, i)
            values.append(value)
            out.append('"…"')
        else:
            out.append(expr[i])
            i += 1
    return "".join(out), values


# --- nix_string ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "literal"),
    [
        ("ci", '"ci"'),
        ("", '""'),
        ('a"b', '"a\\"b"'),
        ("a\\b", '"a\\\\b"'),
        ("${builtins.currentTime}", '"\\${builtins.currentTime}"'),
        ("$x", '"\\$x"'),
        ("line\nnext\ttab\r", '"line\\nnext\\ttab\\r"'),
        ("trailing\\", '"trailing\\\\"'),
    ],
)
def test_nix_string_golden(value: str, literal: str) -> None:
    assert nix_string(value) == literal


@given(st.text(alphabet=st.characters(blacklist_characters="\0")))
def test_nix_string_reads_back_exactly(value: str) -> None:
    literal = nix_string(value)
    read, interpolations, end = read_nix_string(literal, 0)
    assert interpolations == []
    assert end == len(literal)  # the literal ends at its last character, nowhere earlier
    assert read == value


def test_nix_string_refuses_nul() -> None:
    with pytest.raises(ValueError, match="NUL"):
        nix_string("a\0b")


# --- base references ----------------------------------------------------------------------------


def test_split_nixos_base() -> None:
    assert split_nixos_base("/src/flake#ci") == ("/src/flake", "ci")
    assert split_nixos_base("github:o/r?dir=x#my-host") == ("github:o/r?dir=x", "my-host")


@pytest.mark.parametrize(
    "ref",
    ["/src/flake", "/src/flake#", "#ci", "/src#a b", "/src#a;b", "--impure#ci", "-x#ci", "a b#ci"],
)
def test_split_nixos_base_refuses(ref: str) -> None:
    with pytest.raises(UsageError):
        split_nixos_base(ref)


def test_attr_name_is_one_attribute() -> None:
    assert nixos_attr_name("ci") == "ci"
    assert nixos_attr_name("host.example") == "host.example"
    assert nixos_attr_name('"host.example"') == "host.example"
    for bad in ('""', "a b", "a${b}", ""):
        with pytest.raises(UsageError):
            nixos_attr_name(bad)


def test_local_flake_urls() -> None:
    assert local_flake_url(Path("/src/ci"), git_root=None) == "path:/src/ci"
    assert local_flake_url(Path("/src/repo"), git_root=Path("/src/repo")) == "git+file:///src/repo"
    assert (
        local_flake_url(Path("/src/repo/nix/ci"), git_root=Path("/src/repo"))
        == "git+file:///src/repo?dir=nix/ci"
    )
    assert (
        local_flake_url(Path("/src/repo"), git_root=Path("/src/repo"), shallow=True)
        == "git+file:///src/repo?shallow=1"
    )
    # URL syntax is escaped: a '#' or '?' in a directory name stays part of the path.
    assert local_flake_url(Path("/my src/a#b?c"), git_root=None) == "path:/my%20src/a%23b%3Fc"
    with pytest.raises(ValueError, match="absolute"):
        local_flake_url(Path("rel"), git_root=None)


def test_flake_url_finds_the_git_root_as_nix_does(tmp_path: Path) -> None:
    plain = tmp_path / "plain" / "flake"
    plain.mkdir(parents=True)
    assert flake_url(str(plain)) == f"path:{plain}"

    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    sub = repo / "nix" / "ci"
    sub.mkdir(parents=True)
    assert flake_url(str(repo)) == f"git+file://{repo}"
    assert flake_url(str(sub)) == f"git+file://{repo}?dir=nix/ci"
    (repo / ".git" / "shallow").write_text("")
    assert flake_url(str(sub)) == f"git+file://{repo}?dir=nix/ci&shallow=1"

    # A worktree or submodule has a .git file, not a directory.
    worktree = tmp_path / "worktree"
    worktree.mkdir()
    (worktree / ".git").write_text("gitdir: /elsewhere\n")
    assert flake_url(str(worktree)) == f"git+file://{worktree}"

    assert flake_url("github:NixOS/nixpkgs/nixos-24.05") == "github:NixOS/nixpkgs/nixos-24.05"
    with pytest.raises(UsageError, match="absolute"):
        flake_url("./flake")


# --- command lines ------------------------------------------------------------------------------

GOLDEN_EXPR = """\
let
  flake = builtins.getFlake "git+file:///src/repo?dir=ci";
  base = flake.nixosConfigurations."ci";
  agent = import (/. + "/work/nixos/stoker-agent.nix") {
    agentSrc = builtins.path { name = "stoker-agent"; path = /. + "/work/nixos/agent"; };
  };
  system = base.extendModules { modules = [ agent ]; };
  config = system.config;
  pkgs = system.pkgs;
  build = config.system.build;
  loader = config.system.boot.loader;
  registration = pkgs.closureInfo { rootPaths = [ build.toplevel ]; };
in
pkgs.linkFarm "stoker-nixos-boot" [
  { name = "toplevel"; path = build.toplevel; }
  { name = "kernel"; path = "${build.kernel}/${loader.kernelFile}"; }
  { name = "initrd"; path = "${build.initialRamdisk}/${loader.initrdFile}"; }
  { name = "python"; path = "${config.stoker.agent.python}/bin/python3"; }
  { name = "registration"; path = "${registration}/registration"; }
]
"""

MODULE = Path("/work/nixos/stoker-agent.nix")
AGENT_SRC = Path("/work/nixos/agent")


def test_nix_build_expr_golden() -> None:
    expr = nix_build_expr(
        "git+file:///src/repo?dir=ci", "ci", agent_module=MODULE, agent_src=AGENT_SRC
    )
    assert expr == GOLDEN_EXPR


def test_nix_build_argv_golden() -> None:
    argv = nix_build_argv(
        "path:/src/ci", "ci", agent_module=MODULE, agent_src=AGENT_SRC, out_link=Path("/work/boot")
    )
    assert argv[:-1] == [
        "nix",
        "--extra-experimental-features",
        "nix-command flakes",
        "build",
        "--impure",
        "--print-build-logs",
        "--out-link",
        "/work/boot",
        "--expr",
    ]
    assert argv[-1] == nix_build_expr(
        "path:/src/ci", "ci", agent_module=MODULE, agent_src=AGENT_SRC
    )


@pytest.mark.parametrize(
    ("flake", "attr"),
    [
        ('github:o/r"; evil = builtins.readFile "/etc/shadow"; x = "', "ci"),
        ("github:o/r${builtins.readFile /etc/shadow}", "ci"),
        ("github:o/r\\", "ci"),
        ('github:o/r\\${x}\n"', "ci"),
        ("github:o/r", 'ci"+"x'),
        ("github:o/r", "'ci'"),
        ("github:o/r", '"'),
    ],
)
def test_hostile_refs_stay_inside_their_strings(flake: str, attr: str) -> None:
    benign = nix_build_expr("github:o/r", "ci", agent_module=MODULE, agent_src=AGENT_SRC)
    hostile = nix_build_expr(flake, attr, agent_module=MODULE, agent_src=AGENT_SRC)
    benign_shape, benign_values = skeleton(benign)
    hostile_shape, hostile_values = skeleton(hostile)
    # The code around the literals is untouched: nothing broke out of a string.
    assert hostile_shape == benign_shape
    assert hostile_values[0] == flake
    assert hostile_values[1] == nixos_attr_name(attr)
    assert hostile_values[2:] == benign_values[2:]


def test_hostile_paths_stay_inside_their_strings() -> None:
    module = Path('/tmp/x"; y = "${z}\\/stoker-agent.nix')
    expr = nix_build_expr("path:/f", "ci", agent_module=module, agent_src=AGENT_SRC)
    shape, values = skeleton(expr)
    assert shape == skeleton(GOLDEN_EXPR)[0]
    assert values[2] == str(module)


def test_nix_build_expr_wants_absolute_paths() -> None:
    with pytest.raises(ValueError, match="absolute"):
        nix_build_expr("path:/f", "ci", agent_module=Path("m.nix"), agent_src=AGENT_SRC)


def test_closure_and_metadata_argv() -> None:
    assert closure_argv([TOPLEVEL, f"/nix/store/{H2}-closure-info"]) == [
        "nix-store",
        "--query",
        "--requisites",
        TOPLEVEL,
        f"/nix/store/{H2}-closure-info",
    ]
    with pytest.raises(ValueError):
        closure_argv([])
    with pytest.raises(ValueError):
        closure_argv(["--option"])
    assert flake_metadata_argv("path:/src/ci") == [
        "nix",
        "--extra-experimental-features",
        "nix-command flakes",
        "flake",
        "metadata",
        "--json",
        "--no-write-lock-file",
        "path:/src/ci",
    ]


def test_store_mkfs_argv_golden() -> None:
    assert store_mkfs_argv(
        Path("/out/rootfs.erofs"),
        Path("/work/store"),
        source_date_epoch=1,
        fs_uuid="12345678-1234-4234-8234-123456789abc",
    ) == [
        "mkfs.erofs",
        "--quiet",
        "-zlz4hc",
        "-x-1",
        "-T1",
        "-U12345678-1234-4234-8234-123456789abc",
        "--all-root",
        "/out/rootfs.erofs",
        "/work/store",
    ]


# --- kernel command line ------------------------------------------------------------------------


def test_kernel_cmdline_golden() -> None:
    cmdline = nixos_kernel_cmdline(
        TOPLEVEL,
        registration=f"/nix/store/{H2}-closure-info/registration",
        kernel_params='loglevel=4 console=tty0 foo="a b"\n',
    )
    assert cmdline == (
        'loglevel=4 console=tty0 foo="a b" '
        "console=ttyS0 panic=-1 oops=panic reboot=t i8042.noaux i8042.nokbd i8042.nopnp "
        f"boot.panic_on_fail init={TOPLEVEL}/init "
        f"regInfo=/nix/store/{H2}-closure-info/registration"
    )
    # The serial console comes after the configuration's, so it is /dev/console.
    assert cmdline.rindex("console=ttyS0") > cmdline.rindex("console=tty0")


def test_kernel_cmdline_minimal_and_extra() -> None:
    assert nixos_kernel_cmdline(TOPLEVEL, extra=["tsc_early_khz=3000000"]) == (
        "console=ttyS0 panic=-1 oops=panic reboot=t i8042.noaux i8042.nokbd i8042.nopnp "
        f"boot.panic_on_fail init={TOPLEVEL}/init tsc_early_khz=3000000"
    )


def test_kernel_cmdline_refuses() -> None:
    with pytest.raises(ProvisionError, match="not a store path"):
        nixos_kernel_cmdline("/nix/store/short-system")
    with pytest.raises(ProvisionError, match="not a store path"):
        nixos_kernel_cmdline(TOPLEVEL + "/init")
    with pytest.raises(ProvisionError, match="newline"):
        nixos_kernel_cmdline(TOPLEVEL, kernel_params="a\nb")
    with pytest.raises(ProvisionError, match="x86 allows"):
        nixos_kernel_cmdline(TOPLEVEL, kernel_params="x" * 2000)


# --- closure parsing ----------------------------------------------------------------------------


def test_parse_closure_accepts_store_paths() -> None:
    text = (
        f"/nix/store/{H2}-glibc-2.39-52\n"
        f"{TOPLEVEL}\n"
        f"/nix/store/{H3}-python3-3.11.9\n"
        f"/nix/store/{H2}-glibc-2.39-52\n"
        f"/nix/store/{H3}-a+b_c.d?e=f\n"
    )
    assert parse_closure(text) == sorted(
        {
            f"/nix/store/{H2}-glibc-2.39-52",
            TOPLEVEL,
            f"/nix/store/{H3}-python3-3.11.9",
            f"/nix/store/{H3}-a+b_c.d?e=f",
        }
    )


@pytest.mark.parametrize(
    "line",
    [
        "warning: Nix search path entry '/nix/var/nix/profiles/per-user/root/channels' missing",
        f"/nix/store/{H1}",  # no name
        f"/nix/store/{H1}-",  # empty name
        f"/nix/store/{'e' * 32}-x",  # 'e' is not in Nix's base-32
        f"/nix/store/{H1[:31]}-x",  # 31 characters
        f"/nix/store/{H1}-.hidden",
        f"/nix/store/{H1}-a b",
        f"/nix/store/{H1}-x/bin/sh",  # inside a store path
        f"/nix/store/{H1}-x/../../etc",
        f"/nix/store/../{H1}-x",
        f"/nix/store//{H1}-x",
        f"/tmp/{H1}-x",
        f"nix/store/{H1}-x",
        f"/nix/store/{H1}-x\r",
        f" /nix/store/{H1}-x",
        f"/nix/store/{H1}-x\0",
        f"/nix/store/{H1}-" + "x" * 212,
    ],
)
def test_parse_closure_refuses_anything_else(line: str) -> None:
    with pytest.raises(ProvisionError, match="not a store path"):
        parse_closure(f"{TOPLEVEL}\n{line}\n")


def test_parse_closure_refuses_empty_output() -> None:
    with pytest.raises(ProvisionError, match="empty"):
        parse_closure("\n")


def test_parse_closure_with_another_store_dir(tmp_path: Path) -> None:
    path = f"{tmp_path}/{H1}-x"
    assert parse_closure(path + "\n", store_dir=tmp_path) == [path]
    with pytest.raises(ProvisionError):
        parse_closure(TOPLEVEL, store_dir=tmp_path)


def test_boot_links_are_read_and_checked(tmp_path: Path) -> None:
    links = tmp_path / "boot"
    links.mkdir()
    targets = {
        "toplevel": TOPLEVEL,
        "kernel": f"/nix/store/{H2}-linux-6.6.30/bzImage",
        "initrd": f"/nix/store/{H3}-initrd-linux-6.6.30/initrd",
        "python": f"/nix/store/{H3}-python3-3.11.9/bin/python3",
        "registration": f"/nix/store/{H2}-closure-info/registration",
    }
    for name, target in targets.items():
        (links / name).symlink_to(target)  # dangling here: only the names matter
    assert BootLinks.read(links) == BootLinks(**targets)

    (links / "kernel").unlink()
    (links / "kernel").symlink_to("/etc/passwd")
    with pytest.raises(ProvisionError, match="not inside /nix/store"):
        BootLinks.read(links)
    (links / "kernel").unlink()
    with pytest.raises(ProvisionError, match="no kernel link"):
        BootLinks.read(links)


# --- running Nix --------------------------------------------------------------------------------


def nixos_spec(**extra: object) -> ImageSpec:
    return ImageSpec.model_validate({"name": "ci", "base": "nixos:github:example/ci#ci", **extra})


def test_build_without_nix_fails_early(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    builder = NixosBuilder(nixos_spec(), name="ci", digest=DIGEST, environ={"PATH": str(empty)})
    assert builder.spec_digest() == DIGEST
    assert builder.name == "ci"
    work = tmp_path / "work"
    work.mkdir()
    out = tmp_path / "rootfs.erofs"
    with pytest.raises(ProvisionError, match=r"need Nix on the host: apt-get install nix-bin"):
        builder.build(work, out, tmp_path / "build.log")
    assert not out.exists()
    assert list(work.iterdir()) == []


def test_base_digest_without_nix_fails(tmp_path: Path) -> None:
    with pytest.raises(ProvisionError, match="need Nix on the host"):
        nixos_base_digest("github:example/ci#ci", environ={"PATH": str(tmp_path)})


def test_run_nix_keeps_stdout_apart_from_stderr(tmp_path: Path) -> None:
    # Exercises the runner with a real program; it is not a stand-in for nix.
    log = tmp_path / "logs" / "build.log"
    env = {"PATH": os.environ["PATH"]}
    script = "echo /nix/store/x; echo 'warning: noise' >&2"
    assert nixcmd.run_nix(["sh", "-c", script], environ=env, log=log, timeout=30) == (
        "/nix/store/x\n"
    )
    # The log has the command and its standard error, not its output.
    assert log.read_text() == f"$ sh -c {script}\nwarning: noise\n"
    assert nixcmd.run_nix(["sh", "-c", script], environ=env, log=None, timeout=30) == (
        "/nix/store/x\n"
    )
    with pytest.raises(LaunchError, match="exit status: 3") as info:
        nixcmd.run_nix(["sh", "-c", "echo broken >&2; exit 3"], environ=env, log=log, timeout=30)
    assert "broken" in info.value.output
    assert info.value.hint == f"full log: {log}"


def test_flake_identity() -> None:
    metadata: dict[str, object] = {
        "locked": {
            "type": "path",
            "path": "/src/ci",
            "narHash": "sha256-AAAA",
            "lastModified": 1700000000,
        },
        "locks": {"nodes": {"root": {}}, "root": "root", "version": 7},
        "path": "/nix/store/xyz-source",
    }
    base = flake_identity(metadata)
    moved = {
        **metadata,
        "locked": {
            "type": "path",
            "path": "/elsewhere",
            "narHash": "sha256-AAAA",
            "lastModified": 1,
        },
    }
    assert flake_identity(moved) == base
    changed = {**metadata, "locked": {"narHash": "sha256-BBBB"}}
    assert flake_identity(changed) != base
    relocked = {**metadata, "locks": {"nodes": {"root": {"inputs": {"nixpkgs": "n"}}}}}
    assert flake_identity(relocked) != base
    with pytest.raises(ProvisionError, match="narHash"):
        flake_identity({"locked": {"type": "path"}})
    with pytest.raises(ProvisionError, match="locked"):
        flake_identity({})


# --- the spec, the module, the agent ------------------------------------------------------------


def test_check_nixos_spec(tmp_path: Path) -> None:
    check_nixos_spec(nixos_spec(env={"CI": "1"}, size_limit="4G", defaults={"cpus": 4}))
    spec = nixos_spec(
        users=[{"name": "ci"}],
        run=["true"],
        artifacts=[
            {
                "name": "tool",
                "url": "https://example.com/tool.tar",
                "sha256": "1" * 64,
                "dest": "/opt/tool",
            }
        ],
        agent={"python": "/usr/local/bin/python3"},
    )
    with pytest.raises(UsageError) as info:
        check_nixos_spec(spec)
    message = str(info.value)
    for key in ("users", "run", "artifacts", "agent.python"):
        assert key in message
    assert "packages" not in message
    with pytest.raises(UsageError, match="not a nixos base"):
        check_nixos_spec(ImageSpec.model_validate({"name": "d", "base": "debian:bookworm"}))


def systemd_escape_path(path: str) -> str:
    """``systemd-escape --path``, for the names used here."""
    out = []
    for i, char in enumerate(path.strip("/")):
        if char == "/":
            out.append("-")
        elif char.isalnum() or char in ":_" or (char == "." and i > 0):
            out.append(char)
        else:
            out.append(f"\\x{ord(char):02x}")
    return "".join(out)


def test_module_matches_the_agent() -> None:
    text = nixos.agent_module_text()
    assert f'ATTR{{name}}=="{wire.PORT_NAME}"' in text
    unit = systemd_escape_path(f"/dev/virtio-ports/{wire.PORT_NAME}") + ".device"
    # In a Nix string "\\" is one backslash.
    assert f'portUnit = "{unit.replace(chr(92), chr(92) * 2)}";' in text
    assert '"${cfg.python}/bin/python3 -B -S -m stoker.agent"' in text
    assert 'environment.PYTHONPATH = "${cfg.src}";' in text
    assert 'device = "/dev/vda";' in text and 'fsType = "erofs";' in text
    assert 'device = "/dev/vdb";' in text
    assert "{ agentSrc }:" in text


def test_agent_sources_are_written_for_nix(tmp_path: Path) -> None:
    module, src = nixos.write_agent_sources(tmp_path / "nixos")
    assert module.read_text() == nixos.agent_module_text()
    assert (src / "stoker" / "agent" / "__main__.py").is_file()
    assert (src / "stoker" / "protocol" / "wire.py").is_file()
    assert (src / "stoker" / "__init__.py").read_bytes() == b""
    modes = {stat.S_IMODE(p.stat().st_mode) for p in src.rglob("*") if p.is_file()}
    assert modes == {0o644}


def test_builder_version_covers_module_and_agent() -> None:
    version = nixos.nixos_builder_version()
    assert version == nixos.nixos_builder_version()
    assert re.fullmatch(rf"nixos-{nixos.BUILDER_VERSION}-[0-9a-f]{{16}}", version)


def test_filesystem_uuid_from_digest() -> None:
    assert nixos.filesystem_uuid(DIGEST) == nixos.filesystem_uuid(DIGEST)
    assert re.fullmatch(r"[0-9a-f-]{36}", nixos.filesystem_uuid(DIGEST))


# --- stoker doctor ------------------------------------------------------------------------------


def test_doctor_warns_without_nix(tmp_path: Path) -> None:
    check = doctor.nix_check(path=str(tmp_path))
    assert check.name == "nix"
    assert check.status == "warn"
    assert 'base = "nix:..." or "nixos:..."' in check.detail
    assert "apt-get install nix-bin" in check.fix and "nixos.org" in check.fix


def test_doctor_reports_nix(tmp_path: Path) -> None:
    report = doctor.run_checks(Dirs(cache=tmp_path / "cache", runtime=tmp_path / "run"))
    (check,) = [c for c in report.checks if c.name == "nix"]
    assert check.status == ("ok" if shutil.which("nix") else "warn")
