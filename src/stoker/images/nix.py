"""Nix bases: a flake's derivation, with its closure, as the packages of an image.

A spec with ``base = "nix:FLAKEREF#ATTR"`` names a derivation (``nix build
FLAKEREF#ATTR`` must build it: ``ATTR`` is resolved as Nix resolves
installables, ``packages.<system>.ATTR`` first).  The image is a Debian
bookworm userland (:data:`~stoker.images.spec.NIX_BASE_SUITE`, which brings the
guest agent's python3 and the spec's ``packages``) with

* the derivation's closure, exactly the paths ``nix-store --query
  --requisites`` lists, under ``/nix/store``;
* a profile: every ``bin/`` entry of the output linked from
  :data:`PROFILE_BIN` and, so commands find them on the default ``PATH``,
  from ``/usr/local/bin``.

At boot the initramfs bind-mounts the image's ``/nix/store`` over the writable
overlay's, so the store is read-only in the guest as on NixOS (``init.sh``).

Why on top of Debian and not the closure alone: the agent needs a Python with
its standard library in the root, and a flake with no nixpkgs has none to give.
A derivation whose output is itself a root filesystem is still packed as
packages: using it as the root is left for when such closures carry a Python.

The image digest covers the flake's identity (its source's ``narHash`` and
locked inputs, :func:`~stoker.images.nixcmd.flake_identity`) and the output's
store path (which changes with the derivation), so a changed lock or
derivation rebuilds the image.  Evaluating needs no build (``nix eval``);
building happens when the image is built.  As with ``nixos:`` bases, a flake's
Nix code runs on the host with the user's privileges: use flakes you would
``nix build`` yourself.

Nix's own settings apply (``NIX_CONFIG``, ``nix.conf``); where the binary
cache is unreachable, set ``substituters =`` to skip its retries.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from stoker.errors import LaunchError, ProvisionError, UsageError
from stoker.images.base import canonical_digest, log_line
from stoker.images.nixcmd import (
    NIX_BUILD_TIMEOUT,
    NIX_FEATURES,
    NIX_METADATA_TIMEOUT,
    NIX_QUERY_TIMEOUT,
    flake_identity,
    flake_metadata_argv,
    nix_user_error,
    require_nix,
    run_nix,
)
from stoker.images.nixos import (
    NIX_STORE,
    check_store_path,
    closure_argv,
    copy_store_entry,
    flake_url,
    parse_closure,
    split_nixos_base,
)

if TYPE_CHECKING:
    from stoker.paths import Dirs

#: Bump whenever a change here alters the image for the same flake and spec.
BUILDER_VERSION = 1
#: The profile whose ``bin`` holds links to the output's commands.
PROFILE_BIN = PurePosixPath("/nix/var/nix/profiles/stoker/bin")
#: Where commands are linked again, for the default ``PATH`` of every command.
PATH_LINKS = PurePosixPath("/usr/local/bin")

# What `nix eval --apply` makes of the attribute: a small JSON document, never
# the value itself (a derivation would print as its bare output path, and an
# attribute set could be huge).  Keys avoid `outPath`: Nix prints any set with
# one as that string.
_DESCRIBE = (
    'x: if builtins.isAttrs x && (x.type or null) == "derivation" '
    'then { kind = "derivation"; name = x.name; out = x.outPath; } '
    'else if builtins.isAttrs x && (x._type or null) == "configuration" '
    'then { kind = "nixosConfiguration"; } '
    "else { kind = builtins.typeOf x; }"
)


def installable(flake_url_: str, attr: str) -> str:
    """``FLAKEURL#ATTR``, as the ``nix`` command takes it."""
    return f"{flake_url_}#{attr}"


def nix_eval_argv(target: str) -> list[str]:
    """``nix eval`` describing the installable ``target`` (kind, name, output path) as JSON."""
    return ["nix", *NIX_FEATURES, "eval", "--json", target, "--apply", _DESCRIBE]


def nix_build_argv(target: str, *, out_link: Path) -> list[str]:
    """``nix build`` of ``target``; ``out_link`` is a GC root while the closure is copied."""
    # fmt: off
    return [
        "nix", *NIX_FEATURES,
        "build",
        "--print-build-logs",
        "--json",
        "--out-link", str(out_link),
        target,
    ]
    # fmt: on


@dataclass(frozen=True)
class NixOutput:
    """What ``nix eval`` says of a ``nix:`` base: the derivation and its output path."""

    #: The flake URL (a local checkout as ``path:`` or ``git+file:``).
    flake: str
    attr: str
    #: The derivation's ``name``.
    name: str
    #: Its (default) output's store path, known before it is built.
    out_path: str
    #: :func:`~stoker.images.nixcmd.flake_identity` of the flake.
    flake_identity: str

    def digest(self) -> str:
        """The base digest: the flake's locked identity and the output path."""
        return canonical_digest(
            {"builder_version": BUILDER_VERSION, "flake": self.flake_identity, "out": self.out_path}
        )

    def to_json(self) -> dict[str, object]:
        """The manifest's record of the base."""
        return {
            "kind": "nix",
            "flake": self.flake,
            "attr": self.attr,
            "name": self.name,
            "out_path": self.out_path,
            "flake_identity": self.flake_identity,
        }


def parse_description(output: str, target: str) -> tuple[str, str]:
    """``(name, output path)`` from :func:`nix_eval_argv`'s output; refuses non-derivations."""
    try:
        doc = json.loads(output)
    except json.JSONDecodeError as exc:
        raise ProvisionError(f"nix eval printed invalid JSON: {exc}") from None
    kind = doc.get("kind") if isinstance(doc, dict) else None
    if kind == "nixosConfiguration":
        raise UsageError(
            f"{target} is a nixosConfiguration, not a derivation",
            hint='use base = "nixos:FLAKEREF#NAME" for a NixOS configuration',
        )
    if kind != "derivation":
        raise UsageError(
            f"{target} is not a derivation (it is a {kind}); a nix: base needs something "
            "`nix build` can build",
            hint="name a package, e.g. nix:./flake#hello for packages.x86_64-linux.hello",
        )
    name, out = doc.get("name"), doc.get("out")
    if not isinstance(name, str) or not isinstance(out, str):
        raise ProvisionError(f"nix eval described {target} without a name or output path")
    return name, check_store_path(out, NIX_STORE, what="output")


def describe_nix_base(base_ref: str, *, environ: Mapping[str, str] | None = None) -> NixOutput:
    """Evaluate a ``nix:`` base (``FLAKEREF#ATTR``): its flake identity and output path.

    Runs ``nix flake metadata`` and ``nix eval`` (no build).  A flake that
    fails to evaluate raises :class:`UsageError` with Nix's message; so does an
    attribute that is not a derivation.
    """
    env = dict(os.environ if environ is None else environ)
    require_nix(env)
    flake, attr = split_nixos_base(base_ref)
    url = flake_url(flake)
    target = installable(url, attr)
    try:
        metadata = run_nix(
            flake_metadata_argv(url), environ=env, log=None, timeout=NIX_METADATA_TIMEOUT
        )
        described = run_nix(nix_eval_argv(target), environ=env, log=None, timeout=NIX_QUERY_TIMEOUT)
    except LaunchError as exc:
        raise nix_user_error(f"evaluating {target}", exc) from None
    try:
        identity = flake_identity(json.loads(metadata))
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ProvisionError(f"nix flake metadata printed unusable JSON: {exc}") from None
    name, out = parse_description(described, target)
    return NixOutput(flake=url, attr=attr, name=name, out_path=out, flake_identity=identity)


def build_output(
    base: NixOutput, *, workdir: Path, environ: Mapping[str, str], log: Path
) -> list[str]:
    """``nix build`` the base, return its closure (sorted store paths).

    The out-link in ``workdir`` keeps the closure alive until ``workdir`` goes.
    A failed build raises :class:`UsageError` with Nix's message.
    """
    target = installable(base.flake, base.attr)
    log_line(log, f"building {target}")
    try:
        built = run_nix(
            nix_build_argv(target, out_link=workdir / "nix-result"),
            environ=environ,
            log=log,
            timeout=NIX_BUILD_TIMEOUT,
        )
        outputs = [
            out for entry in json.loads(built) for out in dict(entry.get("outputs", {})).values()
        ]
        if base.out_path not in outputs:
            raise ProvisionError(
                f"nix build of {target} gave {outputs}, not the evaluated {base.out_path}"
            )
        closure = run_nix(
            closure_argv([base.out_path]), environ=environ, log=log, timeout=NIX_QUERY_TIMEOUT
        )
    except LaunchError as exc:
        raise nix_user_error(f"building {target}", exc) from None
    except (json.JSONDecodeError, AttributeError, TypeError) as exc:
        raise ProvisionError(f"nix build printed unusable JSON: {exc}") from None
    return parse_closure(closure)


def closure_bytes(paths: Sequence[str]) -> int:
    """The size of the regular files in ``paths`` (store paths), symlinks not followed."""
    total = 0
    for path in paths:
        top = Path(path)
        if stat.S_ISREG(top.lstat().st_mode):
            total += top.lstat().st_size
        for root, _dirs, files in os.walk(top):
            for name in files:
                st = (Path(root) / name).lstat()
                if stat.S_ISREG(st.st_mode):
                    total += st.st_size
    return total


def check_closure_size(paths: Sequence[str], *, image: str, limit_mb: int | None) -> int:
    """The closure's size; :class:`UsageError` when it alone exceeds the image's size limit."""
    size = closure_bytes(paths)
    if limit_mb is not None and size > limit_mb * 1024 * 1024:
        raise UsageError(
            f"image {image!r}: the Nix closure is {size / 2**20:.1f} MiB in {len(paths)} store "
            f"paths, over the image's size_limit of {limit_mb} MiB",
            hint="raise size_limit or trim the derivation's dependencies",
        )
    return size


def install_closure(tree: Path, paths: Sequence[str], out_path: str) -> list[str]:
    """Copy ``paths`` into ``tree/nix/store`` and link the output's commands; returns them.

    The commands (entries of ``OUT/bin``) are linked from :data:`PROFILE_BIN`
    and :data:`PATH_LINKS`; a name already in ``/usr/local/bin`` of the tree
    raises :class:`ProvisionError` rather than shadowing it silently.
    """
    store = tree / "nix" / "store"
    store.mkdir(parents=True, exist_ok=True)
    for path in sorted(paths):
        source = Path(check_store_path(path, NIX_STORE, what="closure"))
        copy_store_entry(source, store / source.name)
    bin_dir = store / Path(out_path).name / "bin"
    commands = sorted(entry.name for entry in bin_dir.iterdir()) if bin_dir.is_dir() else []
    profile = tree / PROFILE_BIN.relative_to("/")
    links = tree / PATH_LINKS.relative_to("/")
    profile.mkdir(parents=True, exist_ok=True)
    links.mkdir(parents=True, exist_ok=True)
    for command in commands:
        if (links / command).exists() or (links / command).is_symlink():
            raise ProvisionError(f"{PATH_LINKS / command} exists; the Nix output would shadow it")
        (profile / command).symlink_to(f"{out_path}/bin/{command}")
        (links / command).symlink_to(str(PROFILE_BIN / command))
    return commands


#: The base kinds ``stoker run --image`` builds on the fly.
FLAKE_KINDS = ("nix", "nixos")


def flake_image_name(base: str) -> str:
    """The image name ``stoker run --image nixos:FLAKE#ATTR`` builds under: ``nixos-ATTR``.

    Characters an image name cannot hold become ``-``; the name points at the
    last flake built for that attribute (the digest still decides the content).
    """
    kind, _, ref = base.partition(":")
    attr = ref.rpartition("#")[2].strip('"')
    cleaned = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "-" for c in attr)
    return f"{kind}-{cleaned}"[:128]


def is_flake_base(image: str) -> bool:
    """Whether ``image`` (an ``--image`` value) is a ``nix:``/``nixos:`` base, not a name."""
    return image.partition(":")[0] in FLAKE_KINDS and ":" in image


def ensure_flake_image(
    base: str,
    *,
    dirs: Dirs,
    cwd: Path,
    environ: Mapping[str, str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> str:
    """Build (or find built) the image of ``base`` (``nix:``/``nixos:FLAKE#ATTR``); its name.

    A relative flake path is taken from ``cwd``.  Raises :class:`UsageError`
    for a malformed base, with the spec's own message.
    """
    import pydantic

    from stoker.images.builder import builder_for
    from stoker.images.spec import ImageSpec
    from stoker.images.store import ImageStore

    name = flake_image_name(base)
    try:
        spec = ImageSpec.model_validate({"name": name, "base": base}, context={"base_dir": cwd})
    except pydantic.ValidationError as exc:
        problems = "; ".join(str(e["msg"]) for e in exc.errors())
        raise UsageError(f"--image {base!r}: {problems}") from None
    builder = builder_for(spec, dirs=dirs, environ=environ, progress=progress)
    ImageStore(dirs).ensure(builder, progress=progress)
    return name
