"""Giving a started VM the network its policy allows (every backend).

``none``: nothing to do, the guest has no device.  ``nat``: the device came up
in the guest's init (``stoker.nic=1``); the agent only learns its nameserver.
``egress``: the guest has no network device; the agent offers a proxy on its
loopback and carries each connection over the agent channel to the VM's own
:class:`~stoker.net.proxy.EgressProxy`, which enforces the allowlist, so there
is no other way out.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from stoker.net.channel import GuestNetwork, proxy_env
from stoker.net.policy import NetworkPolicy
from stoker.net.proxy import ConnectionRecord, EgressProxy, Resolver
from stoker.protocol.client import AgentClient

T = TypeVar("T")


class Guard(Protocol):
    """Awaits ``aw``, or raises if the VM died meanwhile (``VM._guarded``)."""

    async def __call__(self, aw: Awaitable[T], /) -> T: ...


#: QEMU user-mode networking's DNS forwarder, as seen from a nat-mode guest.
NAT_DNS = "10.0.2.3"


@dataclass
class StartedNetwork:
    """What a VM holds once its network is up."""

    #: The egress proxy (``egress`` mode), whose records and counters say what
    #: the guest connected to and what was denied.
    proxy: EgressProxy | None = None
    #: Environment pointing the guest's tools at its proxy (``egress`` mode).
    env: dict[str, str] = field(default_factory=dict)


async def start_network(
    policy: NetworkPolicy,
    client: AgentClient,
    *,
    stack: AsyncExitStack,
    guarded: Guard,
    proxy_port: int,
    vm: str,
    job: str | None = None,
    resolver: Resolver | None = None,
    on_record: Callable[[ConnectionRecord], None] | None = None,
) -> StartedNetwork:
    """Start ``policy``'s network for the guest behind ``client``.

    What it starts is torn down by ``stack``; every wait on the guest goes
    through ``guarded`` (the VM's race against its VMM dying).  ``proxy_port``
    is the guest port the backend wants the proxy on (0: any).
    """
    if policy.mode == "none":
        return StartedNetwork()
    if policy.mode == "nat":
        await guarded(client.net_start(0, {}, mode="nat", nameserver=NAT_DNS))
        return StartedNetwork()
    proxy = EgressProxy(policy, vm=vm, job=job, resolver=resolver, on_record=on_record)
    stack.push_async_callback(proxy.aclose)
    net = GuestNetwork(
        client,
        proxy,
        # Beyond the proxy's own limit (which answers with a reason), streams
        # are refused silently: a flood costs the host nothing.
        max_streams=2 * policy.limits.max_connections + 16,
        name=vm,
    )
    stack.push_async_callback(net.aclose)
    port = await guarded(net.start(proxy_env(proxy_port), port=proxy_port))
    return StartedNetwork(proxy=proxy, env=proxy_env(port))
