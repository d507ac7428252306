"""Accounts inside a guest: run a command as a user of the image (CI runners, service jobs)."""

from __future__ import annotations

from dataclasses import dataclass

from stoker.errors import ProvisionError
from stoker.vm import VM

#: Output of looking up a user is tiny; anything bigger is not an answer.
_MAX_ID_OUTPUT = 4096


@dataclass(frozen=True)
class GuestUser:
    """An account inside the guest."""

    name: str
    uid: int
    gid: int
    home: str


async def guest_user(vm: VM, name: str) -> GuestUser:
    """Look ``name`` up in the guest's passwd database (``getent passwd``).

    Raises :class:`ProvisionError` when the image has no such user: the image
    is not a runner image (or was built from a different spec).
    """
    result = await vm.exec(["getent", "passwd", name], max_capture=_MAX_ID_OUTPUT, timeout=30)
    fields = result.stdout.decode(errors="replace").strip().split(":")
    if not result.ok or len(fields) != 7 or fields[0] != name:
        raise ProvisionError(
            f"image {vm.image!r} has no user {name!r}; is it a runner image?",
            hint="build it from the shipped runner spec (`stoker image build github-runner`)",
        )
    try:
        uid, gid = int(fields[2]), int(fields[3])
    except ValueError:
        raise ProvisionError(f"the guest's passwd entry for {name!r} is malformed") from None
    return GuestUser(name=name, uid=uid, gid=gid, home=fields[5])
