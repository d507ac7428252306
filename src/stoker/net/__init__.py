"""Guest networking: the egress policy, the host-side proxy, and its wiring to VMs.

A VM gets one of three network modes (:data:`stoker.net.policy.NetworkMode`):

* ``none`` (the default): no path out of the guest at all;
* ``egress``: the guest has no network device; the agent offers an HTTP proxy on
  the guest's loopback whose connections travel over the agent channel to a
  host-side :class:`stoker.net.proxy.EgressProxy`, which enforces the allowlist;
* ``nat``: a real NIC with full outbound access (unsafe for untrusted code).

Modules:

* :mod:`stoker.net.policy`: allowlist entries, presets, limits, address checks;
* :mod:`stoker.net.proxy`: the per-VM asyncio proxy (resolve once, check, dial
  exactly the checked address, SNI check, limits, one record per connection);
* :mod:`stoker.net.channel`: guest connections multiplexed over the agent channel
  (flow-controlled streams), for every backend.
"""
