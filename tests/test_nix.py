"""``nix:`` bases with the real Nix: flakes built by ``nix build``, images booted.

This machine reaches neither nixpkgs nor cache.nixos.org, so the flakes here
need no network: their one derivation is built by a static busybox that the
flake carries in its own source (``bb/bin/busybox``, copied from Debian's
busybox-static), so Nix adds it to the store as the flake's input.  Builds run
with the host's Nix as it is set up (Debian's nix-bin as root: a local store,
no daemon, ``sandbox = false`` as Debian ships it); ``NIX_CONFIG`` empties
``substituters`` only to skip the unreachable cache's retries.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from stoker.errors import ProvisionError, UsageError
from stoker.images import ImageStore
from stoker.images.builder import builder_for
from stoker.images.nix import (
    PATH_LINKS,
    PROFILE_BIN,
    build_output,
    check_closure_size,
    describe_nix_base,
    install_closure,
    nix_build_argv,
    nix_eval_argv,
)
from stoker.images.spec import ImageSpec, load_spec_file
from stoker.paths import Dirs
from stoker.vm import VM

NIX = shutil.which("nix")
BUSYBOX = Path("/bin/busybox")
pytestmark = [
    pytest.mark.skipif(NIX is None, reason="nix not installed (scripts/setup.sh: nix-bin)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the local Nix store is root's"),
    pytest.mark.skipif(not BUSYBOX.is_file(), reason="busybox-static missing (/bin/busybox)"),
]
STOKER = [sys.executable, "-m", "stoker.cli"]
NIX_ENV = {**os.environ, "NIX_CONFIG": "substituters =\n"}

FLAKE = """{
  inputs = { INPUTS };
  outputs = { self, ... }: let
    bb = builtins.path { path = ./bb; name = "busybox-static"; };
  in {
    packages.x86_64-linux.hello = derivation {
      name = "stoker-nix-hello"; system = "x86_64-linux"; builder = "${bb}/bin/sh";
      PATH = "${bb}/bin";
      args = [ "-c" ''
        mkdir -p $out/bin $out/share
        printf '#!${bb}/bin/sh\\necho "hello from nix: $0"\\n' > $out/bin/nix-hello
        chmod +x $out/bin/nix-hello
        echo MARK > $out/share/marker
      '' ];
    };
    packages.x86_64-linux.broken = derivation {
      name = "broken"; system = "x86_64-linux"; builder = "${bb}/bin/sh";
      args = [ "-c" "echo the build step failed on purpose >&2; exit 3" ];
    };
    notADerivation = { answer = 42; };
    nixosConfigurations.sys = { _type = "configuration"; config = { }; };
  };
}
"""


def write_flake(directory: Path, *, mark: str = "MARK", inputs: str = "") -> Path:
    """A flake needing no network: busybox in its source builds its packages."""
    (directory / "bb" / "bin").mkdir(parents=True)
    shutil.copy(BUSYBOX, directory / "bb" / "bin" / "busybox")
    (directory / "bb" / "bin" / "sh").symlink_to("busybox")
    text = FLAKE.replace("MARK", mark).replace("INPUTS", inputs)
    (directory / "flake.nix").write_text(text)
    return directory


def spec_for(tmp: Path, body: str) -> ImageSpec:
    path = tmp / "nix.toml"
    path.write_text(body)
    (spec,) = load_spec_file(path).values()
    return spec


@pytest.fixture(scope="module")
def flake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_flake(tmp_path_factory.mktemp("flake") / "f")


def test_command_lines() -> None:
    """The golden argv of the two Nix commands a nix: base runs."""
    assert nix_build_argv("path:/f#hello", out_link=Path("/w/nix-result")) == [
        "nix", "--extra-experimental-features", "nix-command flakes", "build",
        "--print-build-logs", "--json", "--out-link", "/w/nix-result", "path:/f#hello",
    ]  # fmt: skip
    argv = nix_eval_argv("path:/f#hello")
    assert argv[:6] == [
        "nix", "--extra-experimental-features", "nix-command flakes", "eval", "--json",
        "path:/f#hello",
    ]  # fmt: skip
    assert argv[6] == "--apply" and "derivation" in argv[7]


def test_describe_build_and_install(flake: Path, tmp_path: Path) -> None:
    """nix eval's output path is what nix build makes; its closure and commands go in a tree."""
    t = time.monotonic()
    base = describe_nix_base(f"{flake}#hello", environ=NIX_ENV)
    assert base.name == "stoker-nix-hello" and base.flake == f"path:{flake}"
    closure = build_output(base, workdir=tmp_path, environ=NIX_ENV, log=tmp_path / "log")
    print(f"nix eval + build: {time.monotonic() - t:.2f}s")
    assert base.out_path in closure and len(closure) == 2
    assert any(p.endswith("-busybox-static") for p in closure)
    tree = tmp_path / "tree"
    assert install_closure(tree, closure, base.out_path) == ["nix-hello"]
    store_copy = tree / "nix" / "store" / Path(base.out_path).name
    assert (store_copy / "share" / "marker").read_text() == "MARK\n"
    assert os.readlink(tree / "usr/local/bin/nix-hello") == str(PROFILE_BIN / "nix-hello")
    assert (
        os.readlink(tree / str(PROFILE_BIN)[1:] / "nix-hello") == f"{base.out_path}/bin/nix-hello"
    )
    # A command the Debian userland has already is not shadowed silently.
    other = tmp_path / "other"
    (other / "usr/local/bin").mkdir(parents=True)
    (other / "usr/local/bin/nix-hello").write_text("#!/bin/sh\n")
    with pytest.raises(ProvisionError, match=f"{PATH_LINKS}/nix-hello exists"):
        install_closure(other, closure, base.out_path)


def test_a_non_derivation_is_refused_by_name(flake: Path) -> None:
    with pytest.raises(UsageError, match=r"#notADerivation is not a derivation \(it is a set\)"):
        describe_nix_base(f"{flake}#notADerivation", environ=NIX_ENV)
    with pytest.raises(UsageError, match="is a nixosConfiguration") as info:
        describe_nix_base(f"{flake}#nixosConfigurations.sys", environ=NIX_ENV)
    assert "nixos:FLAKEREF#NAME" in (info.value.hint or "")


def test_evaluation_errors_are_nix_s_own(tmp_path: Path) -> None:
    flake = write_flake(tmp_path / "bad")
    (flake / "flake.nix").write_text("{ outputs = { self }: { packages = undefinedThing; }; }\n")
    with pytest.raises(UsageError) as info:
        describe_nix_base(f"{flake}#hello", environ=NIX_ENV)
    message = str(info.value)
    assert "Nix said:" in message and "undefined variable 'undefinedThing'" in message


def test_build_errors_are_nix_s_own(flake: Path, tmp_path: Path) -> None:
    base = describe_nix_base(f"{flake}#broken", environ=NIX_ENV)
    with pytest.raises(UsageError) as info:
        build_output(base, workdir=tmp_path, environ=NIX_ENV, log=tmp_path / "log")
    assert "the build step failed on purpose" in str(info.value)


def test_a_closure_over_the_size_limit_is_refused(flake: Path, tmp_path: Path) -> None:
    """busybox alone is ~2 MiB: over a 1 MiB limit, refused before any bootstrap."""
    spec = spec_for(
        tmp_path, f'name = "test-nix-big"\nbase = "nix:{flake}#hello"\nsize_limit = "1M"\n'
    )
    dirs = Dirs(cache=tmp_path / "cache", runtime=tmp_path / "run")
    builder = builder_for(spec, dirs=dirs, environ=NIX_ENV)
    # The store wraps every build failure, keeping its message.
    with pytest.raises(
        ProvisionError, match=r"the Nix closure is 1\.\d MiB in 2 store paths, over"
    ):
        ImageStore(dirs).ensure(builder)
    base = describe_nix_base(f"{flake}#hello", environ=NIX_ENV)
    closure = build_output(base, workdir=tmp_path, environ=NIX_ENV, log=tmp_path / "log")
    assert check_closure_size(closure, image="x", limit_mb=3) > 1024 * 1024


def test_the_digest_follows_the_lock_and_the_derivation(tmp_path: Path) -> None:
    """A changed flake.lock (an input updated) or derivation changes the image digest."""
    dep = tmp_path / "dep"
    dep.mkdir()
    (dep / "data").write_text("one\n")
    inputs = f'dep = {{ url = "path:{dep}"; flake = false; }};'
    flake = write_flake(tmp_path / "locked", inputs=inputs)
    subprocess.run([NIX, "--extra-experimental-features", "nix-command flakes", "flake", "lock",
                    f"path:{flake}"], env=NIX_ENV, check=True, capture_output=True)  # fmt: skip
    body = f'name = "test-nix-lock"\nbase = "nix:{flake}#hello"\n'
    dirs = Dirs(cache=tmp_path / "cache", runtime=tmp_path / "run")

    def digest() -> tuple[str, str]:
        builder = builder_for(spec_for(tmp_path, body), dirs=dirs, environ=NIX_ENV)
        return builder.spec_digest(), describe_nix_base(f"{flake}#hello", environ=NIX_ENV).out_path

    first, out = digest()
    assert digest() == (first, out)  # stable
    lock = (flake / "flake.lock").read_text()
    (dep / "data").write_text("two\n")
    subprocess.run([NIX, "--extra-experimental-features", "nix-command flakes", "flake", "update",
                    f"path:{flake}"], env=NIX_ENV, check=True, capture_output=True)  # fmt: skip
    assert (flake / "flake.lock").read_text() != lock
    relocked, same_out = digest()
    assert same_out == out and relocked != first  # only the lock changed
    (flake / "flake.nix").write_text((flake / "flake.nix").read_text().replace("MARK", "MARK2"))
    rebuilt, new_out = digest()
    assert new_out != out and rebuilt not in (first, relocked)


def test_cli_shows_nix_s_error_without_a_traceback(tmp_path: Path) -> None:
    flake = write_flake(tmp_path / "bad")
    (flake / "flake.nix").write_text("{ outputs = { self }: { packages = ; }; }\n")
    spec = tmp_path / "bad.toml"
    spec.write_text('name = "test-nix-bad"\nbase = "nix:./bad#hello"\n')
    proc = subprocess.run(
        [*STOKER, "image", "build", str(spec)],
        capture_output=True,
        text=True,
        env={**NIX_ENV, "STOKER_CACHE_DIR": str(tmp_path / "cache")},
        timeout=300,
        check=False,
    )
    assert proc.returncode != 0
    assert "Nix said:" in proc.stderr and "syntax error" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.vm
@pytest.mark.timeout(1200)
@pytest.mark.skipif(shutil.which("mmdebstrap") is None, reason="mmdebstrap missing")
async def test_nix_image_boots_reproducibly(flake: Path, dirs: Dirs, tmp_path: Path) -> None:
    """Built twice (same bytes), booted: the closure's command runs, /nix/store is read-only."""
    spec = spec_for(tmp_path, f'name = "test-nix"\nbase = "nix:{flake}#hello"\n')
    t = time.monotonic()
    image = ImageStore(dirs).ensure(builder_for(spec, dirs=dirs, environ=NIX_ENV), progress=print)
    print(f"image build: {time.monotonic() - t:.1f}s")
    base = image.manifest["base"]
    assert isinstance(base, dict) and base["kind"] == "nix" and base["commands"] == ["nix-hello"]
    assert base["out_path"] in base["store_paths"]
    # A second store where apt's _apt user can reach it (pytest's tmp_path is 0700).
    open_dir = Path(tempfile.mkdtemp(prefix="stoker-nix-repro-", dir="/tmp"))
    open_dir.chmod(0o755)
    try:
        private = Dirs(cache=open_dir, runtime=tmp_path / "run")
        again = ImageStore(private).ensure(builder_for(spec, dirs=private, environ=NIX_ENV))
        assert again.digest == image.digest
        if again.manifest["packages"] != image.manifest["packages"]:
            pytest.skip("the Debian mirror changed between the two builds")
        assert again.rootfs.read_bytes() == image.rootfs.read_bytes()
    finally:
        shutil.rmtree(open_dir)
    t = time.monotonic()
    async with VM("test-nix", dirs=dirs) as vm:
        booted = time.monotonic() - t
        hello = await vm.exec(["nix-hello"], check=True)
        print(f"boot: {booted:.1f}s, to the command's end: {time.monotonic() - t:.1f}s")
        write = await vm.exec(
            ["sh", "-c", f"touch {base['out_path']}/new; echo rc=$?; touch /nix/store/new; "
             "echo rc=$?; grep ' /nix/store ' /proc/mounts; touch /etc/writable && echo root-rw"]
        )  # fmt: skip
    assert hello.stdout.decode() == "hello from nix: /usr/local/bin/nix-hello\n"
    text = write.stdout.decode() + write.stderr.decode()
    assert "rc=1" in text and "rc=0" not in text, text
    assert "Read-only file system" in text and " erofs ro" in text and "root-rw" in text, text
