"""Pools whose image is a Nix flake, built when the service starts (real Nix, fake VMs).

The flake is ``tests/test_nixos_standin.py``'s stand-in NixOS configuration
(a toplevel's layout built by a static busybox), so ``nix build`` runs
offline in seconds; the fake backend ignores the image's contents, so no VM
boots.  The image cache is shared by the module's tests: the first start
builds, later ones find the image built.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from stoker.errors import UsageError
from stoker.images import ImageStore
from stoker.service.api import create_app
from stoker.service.auth import hash_token
from stoker.service.config import ServiceConfig, parse_config_text
from stoker.service.fake_backend import FakeBackend
from stoker.service.jobs import JobRequest, JobState
from stoker.service.service import Service
from test_nixos_standin import BUSYBOX, write_flake

ConfigFactory = Callable[..., ServiceConfig]
ServiceFactory = Callable[..., Awaitable[Service]]

needs_nix = pytest.mark.skipif(
    shutil.which("nix") is None or os.geteuid() != 0 or not BUSYBOX.is_file(),
    reason="needs nix (scripts/setup.sh), root (the local Nix store is root's) and busybox-static",
)
TOKEN = "stk_viewer_0123456789abcdef"

#: A flake whose one configuration fails to evaluate.
BROKEN_FLAKE = """{
  outputs = { self }: {
    nixosConfigurations.broken.config = throw "stoker-test: this configuration is broken";
  };
}
"""


@pytest.fixture(scope="module")
def flake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stand-in NixOS flake of tests/test_nixos_standin.py (microvm.vcpu 1, mem 768)."""
    return write_flake(tmp_path_factory.mktemp("pool-flake") / "flake")


@pytest.fixture(scope="module")
def image_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One image store for the module: the flake is built once."""
    return tmp_path_factory.mktemp("pool-image-cache")


@pytest.fixture
def offline_nix(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # No binary cache is reachable here: skip its retries.
    monkeypatch.setenv("NIX_CONFIG", "substituters =\n")
    yield


def flake_config(make_config: ConfigFactory, image_cache: Path, image: str) -> ServiceConfig:
    return make_config(
        cache_dir=str(image_cache),
        pools={
            "small": {"cpus": 1, "memory": 256, "max": 2, "labels": ["linux"]},
            "nixvm": {"image": image, "cpus": 1, "memory": 256, "max": 2},
        },
        tokens=[{"name": "viewer", "sha256": hash_token(TOKEN), "scopes": ["read"]}],
    )


@needs_nix
@pytest.mark.usefixtures("offline_nix")
async def test_flake_pool_is_built_at_start_and_runs_jobs(
    fake_service: ServiceFactory,
    make_config: ConfigFactory,
    image_cache: Path,
    flake: Path,
) -> None:
    base = f"nixos:{flake}#standin"
    config = flake_config(make_config, image_cache, base)
    assert config.pools["nixvm"].image_name == "nixos-standin"
    assert ImageStore(config.dirs).get("nixos-standin") is None
    t = time.monotonic()
    service = await fake_service(config, backend=FakeBackend())
    print(f"start with a nix build: {time.monotonic() - t:.1f}s")
    image = ImageStore(config.dirs).get("nixos-standin")
    assert image is not None and image.manifest["boot"]["kind"] == "nixos"

    job = await service.submit(JobRequest(command=("sh", "-c", "echo on nixvm"), pool="nixvm"), "b")
    assert job.image == "nixos-standin"
    done = await service.wait(job.id, timeout=20)
    assert done.state is JobState.SUCCEEDED, done.reason
    # A job names the pool's image by the name it is built under.
    by_image = await service.submit(JobRequest(command=("true",), image="nixos-standin"), "b")
    assert by_image.pool == "nixvm"

    app = create_app(service, config)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://stoker.test") as client:
        response = await client.get("/v1/pools", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200, response.text
    pools: dict[str, Any] = {p["name"]: p for p in response.json()}
    assert pools["nixvm"]["image"] == "nixos-standin"
    assert pools["nixvm"]["image_base"] == base
    # The pool's shape, not microvm.mem (768 MiB).
    assert (pools["nixvm"]["cpus"], pools["nixvm"]["memory_mb"]) == (1, 256)
    assert pools["small"]["image"] == "default" and pools["small"]["image_base"] is None

    # A second service finds the image built (the flake unchanged): no rebuild.
    await service.stop(grace=5)
    built = image.rootfs.stat().st_mtime_ns
    t = time.monotonic()
    await fake_service(flake_config(make_config, image_cache, base), backend=FakeBackend())
    print(f"start with the image built: {time.monotonic() - t:.1f}s")
    again = ImageStore(config.dirs).get("nixos-standin")
    assert again is not None and again.digest == image.digest
    assert again.rootfs.stat().st_mtime_ns == built


@needs_nix
@pytest.mark.usefixtures("offline_nix")
async def test_flake_that_fails_to_evaluate_stops_the_start(
    fake_service: ServiceFactory, make_config: ConfigFactory, image_cache: Path, tmp_path: Path
) -> None:
    flake = tmp_path / "broken"
    flake.mkdir()
    (flake / "flake.nix").write_text(BROKEN_FLAKE)
    config = flake_config(make_config, image_cache, f"nixos:{flake}#broken")
    service = Service(config, backend=FakeBackend())
    with pytest.raises(UsageError) as info:
        await service.start()
    message = str(info.value)
    assert f"pool 'nixvm': image 'nixos:{flake}#broken'" in message, message
    assert "Nix said" in message and "stoker-test: this configuration is broken" in message
    assert service.status == "stopped" and service.supervisor is None
    # The state directory is unlocked again: a fixed configuration starts.
    await fake_service(make_config(cache_dir=str(image_cache)))


def test_malformed_flake_base_is_refused_naming_the_key(tmp_path: Path) -> None:
    (tmp_path / "flake").mkdir()
    config = tmp_path / "stoker.toml"
    head = 'state_dir = "state"\n\n[pools.nixvm]\ncpus = 1\n'
    parsed = parse_config_text(head + 'image = "nixos:./flake#vm"\n', origin=config)
    # Relative to the configuration file's directory, stored absolute.
    assert parsed.pools["nixvm"].image == f"nixos:{tmp_path / 'flake'}#vm"
    assert ServiceConfig.model_validate_json(parsed.model_dump_json()) == parsed
    for image, problem in (
        ("nixos:./flake", 'expected "nixos:FLAKEREF#ATTR"'),
        ("nix:./missing#hello", "flake directory './missing' does not exist"),
        ("nixos:./flake#a b", 'expected "nixos:FLAKEREF#ATTR"'),
        ("not an image", "expected an image name"),
    ):
        with pytest.raises(UsageError) as info:
            parse_config_text(head + f'image = "{image}"\n', origin=config)
        assert str(info.value).startswith(f"{config}:5: pools.nixvm.image: "), info.value
        assert problem in str(info.value), info.value


def test_two_flakes_under_one_image_name_are_refused(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    text = (
        'state_dir = "state"\n'
        '[pools.one]\nimage = "nixos:./a#vm"\n'
        '[pools.two]\nimage = "nixos:./b#vm"\n'
        '[pools.three]\nimage = "nixos:./a#vm"\n'
    )
    with pytest.raises(UsageError, match=r"pools 'one' and 'two' both run image 'nixos-vm'"):
        parse_config_text(text, origin=tmp_path / "stoker.toml")
    same = text.replace("./b#vm", "./a#vm")
    parsed = parse_config_text(same, origin=tmp_path / "stoker.toml")
    assert {p.image_name for p in parsed.pools.values()} == {"nixos-vm"}
