"""Running Nix's commands (errors kept apart from output) and a flake's identity.

Shared by the ``nix:`` and ``nixos:`` builders (:mod:`stoker.images.nix`,
:mod:`stoker.images.nixos`) and the microvm.nix reader
(:mod:`stoker.images.microvm`).  Nix's settings are the host's (``nix.conf``,
``NIX_CONFIG``): a root user without a daemon uses the local store directly,
others go through ``nix-daemon``; nothing here changes the sandbox or the
substituters.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from stoker.errors import LaunchError, ProvisionError, UsageError
from stoker.images.base import canonical_digest
from stoker.procs import DIE_WITH_PARENT

#: The flags that make flakes and the ``nix`` command usable on any Nix >= 2.4.
NIX_FEATURES: tuple[str, ...] = ("--extra-experimental-features", "nix-command flakes")
NIX_BUILD_TIMEOUT = 6 * 3600.0
NIX_QUERY_TIMEOUT = 600.0
NIX_METADATA_TIMEOUT = 1800.0
NIX_HINT = (
    "Nix images need Nix on the host: apt-get install nix-bin (Debian, Ubuntu) "
    "or https://nixos.org/download"
)


def require_nix(environ: Mapping[str, str]) -> None:
    """Raise :class:`ProvisionError` unless ``nix`` and ``nix-store`` are on ``environ``'s PATH."""
    search = environ.get("PATH", os.defpath)
    missing = [tool for tool in ("nix", "nix-store") if shutil.which(tool, path=search) is None]
    if missing:
        raise ProvisionError(
            f"{NIX_HINT} ({', '.join(missing)} not found on PATH)",
            hint="install Nix, then `stoker doctor` shows its version",
        )


def _command_name(argv: Sequence[str]) -> str:
    """``"nix build"``, ``"nix flake metadata"``, ``"nix-store"``: for messages."""
    words = [Path(argv[0]).name]
    rest = list(argv[1:])
    if rest[: len(NIX_FEATURES)] == list(NIX_FEATURES):
        rest = rest[len(NIX_FEATURES) :]
    for word in rest:
        if word.startswith("-"):
            break
        words.append(word)
    return " ".join(words)


def _log_tail(log: Path, offset: int) -> str:
    """What was appended to ``log`` after ``offset`` (at most its last 16 KiB)."""
    with log.open("rb") as fh:
        fh.seek(max(offset, log.stat().st_size - 16384))
        return fh.read().decode(errors="replace")


def run_nix(
    argv: Sequence[str],
    *,
    environ: Mapping[str, str],
    log: Path | None,
    timeout: float,
) -> str:
    """Run a Nix command with exactly ``environ``; return its standard output.

    Standard error (progress, warnings, build logs) goes to ``log`` as it
    happens, so a long build can be followed there, and never into the returned
    text, which callers parse (``run_checked`` merges the two).  Failures raise
    :class:`LaunchError` with the end of standard error.
    """
    name = _command_name(argv)
    start = 0
    with contextlib.ExitStack() as stack:
        stderr: int | IO[bytes] = subprocess.PIPE
        if log is not None:
            log.parent.mkdir(parents=True, exist_ok=True)
            fh = stack.enter_context(log.open("ab"))
            fh.write(f"$ {' '.join(argv)}\n".encode())
            fh.flush()
            start = fh.tell()
            stderr = fh
        try:
            proc = subprocess.run(
                list(argv),
                env=dict(environ),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=stderr,
                timeout=timeout,
                check=False,
                # As every helper stoker starts: a build does not outlive a killed stoker.
                preexec_fn=DIE_WITH_PARENT,
            )
        except FileNotFoundError as exc:
            raise LaunchError(f"{argv[0]} is not installed", argv=argv, hint=NIX_HINT) from exc
        except subprocess.TimeoutExpired as exc:
            partial = (exc.stderr or b"").decode(errors="replace")
            raise LaunchError(
                f"{name} timed out after {timeout:.0f}s",
                argv=argv,
                output=partial if log is None else _log_tail(log, start),
            ) from exc
    if log is None:
        errors, hint = proc.stderr.decode(errors="replace"), None
    else:
        errors, hint = _log_tail(log, start), f"full log: {log}"
    if proc.returncode != 0:
        raise LaunchError(
            f"{name} failed", argv=argv, returncode=proc.returncode, output=errors, hint=hint
        )
    return proc.stdout.decode(errors="replace")


def nix_user_error(what: str, exc: LaunchError) -> UsageError:
    """A failed Nix command as the user's error: Nix's own message, no traceback."""
    lines = exc.output.strip().splitlines()[-30:]
    shown = "\n".join(f"  {line}" for line in lines) if lines else "  (no output)"
    return UsageError(f"{what} failed; Nix said:\n{shown}", hint=exc.hint)


def flake_metadata_argv(flake: str) -> list[str]:
    """``nix flake metadata --json`` of ``flake`` (a URL), never writing its lock file."""
    # --no-write-lock-file: asking for an identity must not edit the user's checkout.
    return ["nix", *NIX_FEATURES, "flake", "metadata", "--json", "--no-write-lock-file", flake]


def flake_identity(metadata: Mapping[str, object]) -> str:
    """Hex sha256 of what a flake evaluates from, given ``nix flake metadata --json`` output.

    The source's ``narHash`` (content, not location), its subdirectory and the
    locked inputs; ``lastModified`` and the checkout's path are left out, so a
    moved or touched checkout keeps its identity.
    """
    locked = metadata.get("locked")
    if not isinstance(locked, Mapping):
        raise ProvisionError("nix flake metadata reported no locked source")
    nar_hash = locked.get("narHash")
    if not isinstance(nar_hash, str) or not nar_hash:
        raise ProvisionError("nix flake metadata reported no narHash for the flake's source")
    return canonical_digest(
        {
            "narHash": nar_hash,
            "dir": locked.get("dir", ""),
            "locks": metadata.get("locks"),
        }
    )
