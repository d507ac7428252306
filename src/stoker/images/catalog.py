"""The image specs shipped with stoker (``stoker/images/specs/*.toml``).

``default`` is what ``stoker run`` boots when no ``--image`` is given;
``python``, ``github-runner`` and ``gitlab-runner`` are ready-made bases.
``stoker image build NAME`` finds them by name; a path to a spec file works
everywhere a name does.
"""

from __future__ import annotations

from pathlib import Path

from stoker.errors import UsageError
from stoker.images.spec import ImageSpec, load_spec_file

SPECS_DIR = Path(__file__).parent / "specs"


def shipped_specs() -> dict[str, Path]:
    """Name -> spec file of every shipped spec."""
    return {path.stem: path for path in sorted(SPECS_DIR.glob("*.toml"))}


def load_specs(ref: str) -> dict[str, ImageSpec]:
    """The images of ``ref``: a spec file path, or the name of a shipped spec.

    A path is anything containing ``/`` or ending in ``.toml`` (use ``./NAME``
    for a file in the current directory whose name is also a shipped spec's).
    Raises :class:`UsageError` naming the shipped specs when nothing matches.
    """
    if "/" in ref or ref.endswith(".toml"):
        path = Path(ref).expanduser()
        if not path.is_file():
            raise UsageError(f"spec file {ref} does not exist")
        return load_spec_file(path)
    shipped = shipped_specs()
    if ref in shipped:
        return load_spec_file(shipped[ref])
    raise UsageError(
        f"no spec file and no shipped spec called {ref!r}",
        hint=f"shipped specs: {', '.join(shipped)}; or give a path to a .toml spec",
    )
