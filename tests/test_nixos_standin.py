"""``nixos:`` bases and microvm.nix settings with the real Nix, on a stand-in system.

No nixpkgs (and so no real NixOS or microvm.nix) is reachable here.  The
flakes below define ``nixosConfigurations`` by hand: ``config.system.build.
toplevel`` is a **stand-in system closure** with a NixOS toplevel's layout
(``init``, ``kernel``, ``initrd``, ``kernel-params``, ``sw/bin``) built by a
static busybox, and ``config.microvm`` a **stand-in for microvm.nix's module**:
the plain values its options evaluate to.  The stand-in ``init`` does what
NixOS's stage 2 and the ``stoker-agent`` unit would: it makes ``/bin`` and
``/usr/bin`` links to its ``sw/bin`` and starts the agent, on a stand-in Python (the host's
python3 with its libraries, run through their own ``ld.so``) since there is no
nixpkgs python either.  Booting a real NixOS system is not tested here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from stoker.artifacts import BootArtifacts
from stoker.errors import ProvisionError, UsageError
from stoker.images import Image, ImageBuilder, ImageStore
from stoker.images.builder import builder_for
from stoker.images.microvm import (
    MicrovmShape,
    microvm_eval_argv,
    microvm_shape,
    read_microvm_shape,
)
from stoker.images.spec import load_spec_file
from stoker.paths import Dirs
from stoker.vm import VM

BUSYBOX = Path("/bin/busybox")
HOST_PYTHON = Path("/usr/bin/python3.11")
pytestmark = [
    pytest.mark.skipif(shutil.which("nix") is None, reason="nix not installed (scripts/setup.sh)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the local Nix store is root's"),
    pytest.mark.skipif(not BUSYBOX.is_file(), reason="busybox-static missing (/bin/busybox)"),
]
STOKER = [sys.executable, "-m", "stoker.cli"]
NIX_ENV = {**os.environ, "NIX_CONFIG": "substituters =\n"}
FEATURES = ("--extra-experimental-features", "nix-command flakes")

FLAKE = r"""{
  outputs = { self }: let
    bb = builtins.path { path = ./bb; name = "busybox-static"; };
    py = builtins.path { path = ./python; name = "stand-in-python"; };
    boot = builtins.path { path = ./boot; name = "stand-in-boot-files"; };
    hello = derivation {
      name = "nix-hello"; system = "x86_64-linux"; builder = "${bb}/bin/sh";
      PATH = "${bb}/bin";
      args = [ "-c" ''
        mkdir -p $out/bin
        printf '#!${bb}/bin/sh\necho "hello from the stand-in system"\n' > $out/bin/nix-hello
        chmod +x $out/bin/nix-hello
      '' ];
    };
    # A stand-in NixOS toplevel: the layout of one, none of its contents.
    toplevel = derivation {
      name = "nixos-system-stand-in"; system = "x86_64-linux"; builder = "${bb}/bin/sh";
      PATH = "${bb}/bin";
      args = [ "-c" ''
        mkdir -p $out/sw/bin
        ln -s ${boot}/kernel $out/kernel
        ln -s ${boot}/initrd $out/initrd
        printf 'stoker.standin=1' > $out/kernel-params
        ln -s ${hello}/bin/nix-hello $out/sw/bin/nix-hello
        cat > $out/init <<EOF
        #!${bb}/bin/sh
        # Stand-in stage 2: what NixOS's activation and the stoker-agent unit do.
        export PATH=${bb}/bin
        mkdir -p /bin /usr/bin /tmp /etc
        ${bb}/bin/busybox --install -s /bin
        # No GNU tar, as on NixOS: the agent unpacks with Python's tarfile.
        rm /bin/tar
        # The system's packages on PATH (the agent, as PID 1, mounts a tmpfs on /run).
        ln -s $out/sw/bin/* /usr/bin/
        export PYTHONHOME=${py}
        exec ${py}/lib/ld-linux-x86-64.so.2 --library-path ${py}/lib \\
          ${py}/bin/python3 -B -S -m stoker.agent
        EOF
        sed -i 's/^ *//' $out/init
        chmod +x $out/init
      '' ];
    };
  in {
    nixosConfigurations.standin.config = {
      system.build.toplevel = toplevel;
      # Stand-in for microvm.nix's module: the values its options evaluate to.
      microvm = {
        vcpu = 1; mem = 768; hypervisor = "qemu";
        volumes = [ { mountPoint = "/"; image = "root.img"; size = 1024; } ];
        shares = [ { proto = "virtiofs"; tag = "ro-store"; source = "/nix/store";
                     mountPoint = "/nix/.ro-store"; } ];
        interfaces = [ ];
        kernelParams = [ "stoker.microvm=yes" ];
        socket = "standin.sock";
      };
    };
    nixosConfigurations.unsupported.config = {
      system.build.toplevel = toplevel;
      microvm = {
        hypervisor = "crosvm";
        volumes = [ { mountPoint = "/var"; image = "var.img"; size = 256; } ];
        shares = [ { proto = "9p"; tag = "home"; source = "/home"; mountPoint = "/home"; } ];
        interfaces = [ { type = "tap"; id = "vm-a"; mac = "02:00:00:00:00:01"; } ];
        writableStoreOverlay = "/nix/.rw-store";
      };
    };
    nixosConfigurations.plain.config.system.build.toplevel = toplevel;
    # Stand-in for what nixpkgs' lib.nixosSystem returns: the attributes stoker's
    # build expression uses (extendModules ignores the agent module: no module system).
    nixosConfigurations.extensible = let
      system = {
        config = {
          system.build = { inherit toplevel; kernel = boot; initialRamdisk = boot; };
          system.boot.loader = { kernelFile = "kernel"; initrdFile = "initrd"; };
          stoker.agent.python = py;
        };
        pkgs = {
          linkFarm = name: entries: derivation {
            inherit name; system = "x86_64-linux"; builder = "${bb}/bin/sh";
            PATH = "${bb}/bin";
            args = [ "-c" ("mkdir $out\n" + builtins.concatStringsSep "\n"
              (map (e: "ln -s ${e.path} $out/${e.name}") entries)) ];
          };
          closureInfo = { rootPaths }: derivation {
            name = "closure-info"; system = "x86_64-linux"; builder = "${bb}/bin/sh";
            PATH = "${bb}/bin";
            args = [ "-c" "mkdir $out; echo stand-in registration > $out/registration" ];
          };
        };
      };
    in system // { extendModules = { modules }: system; };
    nixosConfigurations.notASystem.config.system.build.toplevel = hello;
  };
}
"""


def stand_in_python(dest: Path) -> None:
    """The host's python3.11, its standard library and libraries, as a store-ready tree."""
    (dest / "bin").mkdir(parents=True)
    lib = dest / "lib"
    shutil.copy(HOST_PYTHON, dest / "bin" / "python3")
    shutil.copytree(
        "/usr/lib/python3.11",
        lib / "python3.11",
        symlinks=True,
        ignore=shutil.ignore_patterns(
            "test", "idlelib", "tkinter", "ensurepip", "lib2to3", "turtledemo", "pydoc_data",
            "dist-packages", "site-packages", "__pycache__", "config-3.11-*",
        ),
    )  # fmt: skip
    binaries = [HOST_PYTHON, *(lib / "python3.11" / "lib-dynload").glob("*.so")]
    needed: set[str] = set()
    for binary in binaries:
        out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True)
        for line in out.stdout.splitlines():
            words = line.split()
            if "=>" in words and len(words) > words.index("=>") + 1:
                needed.add(words[words.index("=>") + 1])
            elif words and words[0].startswith("/"):
                needed.add(words[0])  # the dynamic loader itself
    for path in sorted(needed):
        shutil.copy(path, lib / Path(path).name)


def write_flake(directory: Path, *, kernel: Path | None = None, initrd: Path | None = None) -> Path:
    """The stand-in flake; boot files default to small placeholders (not booted then)."""
    (directory / "bb" / "bin").mkdir(parents=True)
    shutil.copy(BUSYBOX, directory / "bb" / "bin" / "busybox")
    (directory / "bb" / "bin" / "sh").symlink_to("busybox")
    (directory / "boot").mkdir()
    for name, source in (("kernel", kernel), ("initrd", initrd)):
        if source is None:
            (directory / "boot" / name).write_text(f"stand-in {name}, never booted\n")
        else:
            shutil.copy(source, directory / "boot" / name)
    if kernel is None:
        (directory / "python" / "bin").mkdir(parents=True)
        (directory / "python" / "bin" / "python3").write_text("stand-in, never run\n")
    else:
        stand_in_python(directory / "python")
    (directory / "flake.nix").write_text(FLAKE)
    return directory


@pytest.fixture(scope="module")
def flake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_flake(tmp_path_factory.mktemp("nixos") / "f")


def test_microvm_mapping() -> None:
    """The documented table, as a pure function of nix eval's JSON."""
    shape = microvm_shape(
        {
            "vcpu": 3, "mem": 2048, "hypervisor": "firecracker",
            "volumes": [{"mountPoint": "/", "image": "r.img", "size": 8192}],
            "shares": [{"source": "/nix/store", "tag": "ro-store", "proto": "virtiofs"}],
            "interfaces": [{"type": "user", "id": "eth0"}],
            "kernelParams": ["quiet"], "writableStoreOverlay": None,
            "forwardPorts": [], "devices": [], "graphics": False,
        }
    )  # fmt: skip
    assert shape == MicrovmShape(
        cpus=3, memory_mb=2048, disk_mb=8192, vmm="firecracker", network="nat",
        kernel_params=("quiet",),
    )  # fmt: skip
    assert shape.defaults() == {"cpus": 3, "memory": 2048, "disk": 8192}
    assert microvm_shape({}) == MicrovmShape() and MicrovmShape().defaults() == {}
    with pytest.raises(UsageError) as info:
        microvm_shape(
            {"vcpu": 0, "mem": 64, "forwardPorts": [{"from": "host"}], "devices": [{"bus": "pci"}],
             "graphics": True, "interfaces": [{"type": "user"}, {"type": "user"}]}
        )  # fmt: skip
    message = str(info.value)
    for named in (
        "microvm.vcpu = 0",
        "microvm.mem = 64",
        "microvm.forwardPorts",
        "microvm.devices",
        "microvm.graphics.enable",
        "more than one interface",
    ):
        assert named in message


def test_microvm_eval_argv() -> None:
    argv = microvm_eval_argv("path:/f", 'my"vm', features=FEATURES)
    assert argv[:5] == ["nix", *FEATURES, "eval", "--json"]
    assert argv[5] == 'path:/f#nixosConfigurations."my\\"vm".config.microvm'
    assert argv[6] == "--apply" and "m.vcpu or null" in argv[7]


def test_microvm_settings_read_with_nix_eval(flake: Path) -> None:
    shape = read_microvm_shape(f"path:{flake}", "standin", environ=NIX_ENV)
    assert shape == MicrovmShape(
        cpus=1, memory_mb=768, disk_mb=1024, vmm="qemu", network=None,
        kernel_params=("stoker.microvm=yes",),
    )  # fmt: skip
    assert read_microvm_shape(f"path:{flake}", "plain", environ=NIX_ENV) == MicrovmShape()


def test_unsupported_microvm_settings_are_named(flake: Path) -> None:
    with pytest.raises(UsageError) as info:
        read_microvm_shape(f"path:{flake}", "unsupported", environ=NIX_ENV)
    message = str(info.value)
    for named in (
        "microvm.hypervisor = 'crosvm'",
        "microvm.volumes[0] (mountPoint '/var')",
        "microvm.shares[0] (source '/home')",
        "microvm.interfaces[0] (type 'tap')",
        "microvm.writableStoreOverlay",
    ):
        assert named in message, message


def _builder(flake: Path, tmp: Path, dirs: Dirs, attr: str, name: str) -> ImageBuilder:
    spec_file = tmp / f"{name}.toml"
    spec_file.write_text(f'name = "{name}"\nbase = "nixos:{flake}#{attr}"\n')
    (spec,) = load_spec_file(spec_file).values()
    return builder_for(spec, dirs=dirs, environ=NIX_ENV)


def _build(flake: Path, tmp: Path, dirs: Dirs, attr: str, name: str) -> Image:
    builder = _builder(flake, tmp, dirs, attr, name)
    return ImageStore(dirs).ensure(builder, progress=print)


def test_stand_in_system_builds_with_its_microvm_shape(flake: Path, tmp_path: Path) -> None:
    dirs = Dirs(cache=tmp_path / "cache", runtime=tmp_path / "run")
    t = time.monotonic()
    image = _build(flake, tmp_path, dirs, "standin", "test-nixos-standin-unit")
    print(f"nix build + pack: {time.monotonic() - t:.1f}s")
    manifest: dict[str, Any] = image.manifest
    boot = manifest["boot"]
    assert boot["kind"] == "nixos" and boot["stage1"] == "stoker"
    assert boot["init"] == boot["toplevel"] + "/init"
    assert boot["params"] == ["stoker.standin=1", "stoker.microvm=yes"]
    assert boot["toplevel"] in manifest["store_paths"] and len(manifest["store_paths"]) == 5
    assert manifest["defaults"] == {"cpus": 1, "memory": 768, "disk": 1024}
    assert manifest["microvm"]["vmm"] == "qemu"
    with pytest.raises(ProvisionError, match=r"is not a NixOS system: it has no init, kernel"):
        _build(flake, tmp_path, dirs, "notASystem", "test-nixos-not-a-system")


def test_stand_in_image_is_reproducible_and_follows_the_flake(tmp_path: Path) -> None:
    """Two stores, the same bytes; an edited flake (its narHash) changes the digest."""
    flake = write_flake(tmp_path / "f")
    images = [
        _build(flake, tmp_path, Dirs(cache=tmp_path / c, runtime=tmp_path / "run"), "standin", "x")
        for c in ("a", "b")
    ]
    assert images[0].digest == images[1].digest
    assert images[0].rootfs.read_bytes() == images[1].rootfs.read_bytes()
    dirs = Dirs(cache=tmp_path / "a", runtime=tmp_path / "run")
    (flake / "flake.nix").write_text(FLAKE.replace("stoker.standin=1", "stoker.standin=2"))
    edited = _builder(flake, tmp_path, dirs, "standin", "x").spec_digest()
    assert edited != images[0].digest


@pytest.mark.vm
@pytest.mark.timeout(900)
async def test_stand_in_system_boots(
    dirs: Dirs, boot_artifacts: BootArtifacts, tmp_path: Path
) -> None:
    """stoker's initramfs mounts the store image and runs the system's init; the agent answers."""
    kernel = next((boot_artifacts.kernel.root / "boot").glob("vmlinuz-*"))
    flake = write_flake(tmp_path / "f", kernel=kernel, initrd=boot_artifacts.initrd)
    t = time.monotonic()
    _build(flake, tmp_path, dirs, "standin", "test-nixos-standin")
    print(f"image build: {time.monotonic() - t:.1f}s")
    t = time.monotonic()
    async with VM("test-nixos-standin", dirs=dirs) as vm:
        booted = time.monotonic() - t
        assert (vm.cpus, vm.memory_mb) == (1, 768)
        hello = await vm.exec(["sh", "-c", "nix-hello; readlink -f /usr/bin/nix-hello"], check=True)
        print(f"boot: {booted:.1f}s, to the command's end: {time.monotonic() - t:.1f}s")
        probe = await vm.exec(
            ["sh", "-c", "cat /proc/cmdline; grep ' /nix/store ' /proc/mounts; "
             "touch /nix/store/new; echo rc=$?; touch /written && echo root-rw; echo PATH=$PATH"]
        )  # fmt: skip
    said, where = hello.stdout.decode().splitlines()
    assert said == "hello from the stand-in system" and where.endswith("-nix-hello/bin/nix-hello")
    assert where.startswith("/nix/store/")
    text = probe.stdout.decode() + probe.stderr.decode()
    assert "stoker.init=/nix/store/" in text and "-nixos-system-stand-in/init" in text, text
    assert "stoker.standin=1 stoker.microvm=yes" in text, text
    assert "PATH=/run/wrappers/bin:/run/current-system/sw/bin:/usr/local/sbin:" in text, text
    assert "rc=1" in text and "Read-only file system" in text and "root-rw" in text, text

    # The CLI takes the base itself (built already: the same digest, a new name) ...
    src = tmp_path / "project"
    src.mkdir()
    (src / "input.txt").write_text("from the host\n")
    env = {**NIX_ENV, "STOKER_CACHE_DIR": str(dirs.cache)}
    run = subprocess.run(
        [*STOKER, "run", "--image", "nixos:./f#standin", "--snapshot", "never", str(src), "--",
         "sh", "-c", "nix-hello; cat input.txt; nproc"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout == "hello from the stand-in system\nfrom the host\n1\n", run.stderr
    # ... and `stoker image inspect` shows the store paths the image holds.
    inspect = subprocess.run(
        [*STOKER, "image", "inspect", "nixos-standin"],
        capture_output=True, text=True, env=env, timeout=60, check=True,
    )  # fmt: skip
    manifest = json.loads(inspect.stdout)
    assert manifest["boot"]["toplevel"] in manifest["store_paths"]
    assert any(p.endswith("-stand-in-python") for p in manifest["store_paths"])


def test_extensible_configuration_goes_through_stoker_s_build_expression(
    flake: Path, tmp_path: Path
) -> None:
    """nix_build_expr's extendModules/linkFarm/closureInfo route, on a stand-in nixosSystem."""
    dirs = Dirs(cache=tmp_path / "cache", runtime=tmp_path / "run")
    manifest: dict[str, Any] = _build(flake, tmp_path, dirs, "extensible", "x").manifest
    boot = manifest["boot"]
    toplevel = boot["toplevel"]
    assert toplevel.endswith("-nixos-system-stand-in") and boot["init"] == f"{toplevel}/init"
    assert boot["kernel"].endswith("-stand-in-boot-files/kernel")
    assert manifest["python"].endswith("-stand-in-python/bin/python3")
    registration = next(p for p in boot["params"] if p.startswith("regInfo="))
    assert registration.endswith("-closure-info/registration")
    assert f"init={toplevel}/init" in boot["cmdline"] and registration in boot["cmdline"]
    assert any(p.endswith("-closure-info") for p in manifest["store_paths"])
