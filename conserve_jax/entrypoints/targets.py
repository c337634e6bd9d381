"""Client targets: one server, or several replicas behind gRPC's client-side load balancing.

`channel_target(target)` turns what a user passes to `Client` into a gRPC target and the
channel options that go with it:

- one address "host:port" (or any gRPC target such as "unix:..."): as before, one server;
- several addresses, as a list or one comma-separated string ("h1:50051,h2:50051"): their
  host names are resolved now and joined into one `ipv4:` / `ipv6:` target;
- a "dns:///name:port" target: every address the name resolves to (re-resolved by gRPC).

With several addresses (and for dns:/// targets) the channel gets a service config with the
`round_robin` policy (calls spread over every ready replica) and client-side health
checking on "conserve.v1.CoServe": a replica that is down or draining (NOT_SERVING) is
skipped until it is serving again. Each balanced channel holds one grpc.health.v1 Watch per
replica (servers cap them: `serve --max-health-watches`).

Pure functions; no gRPC calls. Raises ValueError naming the bad address.
"""
from __future__ import annotations

import ipaddress
import json
import socket
from typing import Sequence, Union

HEALTH_SERVICE = "conserve.v1.CoServe"
TargetsT = Union[str, Sequence[str]]


def _split(addr: str) -> tuple[str, str]:
    addr = addr.strip()
    if addr.startswith("["):  # [v6]:port
        host, _, port = addr[1:].partition("]:")
    else:
        host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"target {addr!r} must be HOST:PORT")
    return host, port


def _resolve(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror as e:
        raise ValueError(f"target host {host!r} does not resolve: {e}") from None
    v4 = [i[4][0] for i in infos if i[0] == socket.AF_INET]
    return v4[0] if v4 else infos[0][4][0]


def service_config() -> str:
    return json.dumps({"loadBalancingConfig": [{"round_robin": {}}],
                       "healthCheckConfig": {"serviceName": HEALTH_SERVICE}})


def channel_target(target: TargetsT) -> tuple[str, list[tuple[str, object]]]:
    """(gRPC target, extra channel options); see the module docstring."""
    if isinstance(target, str):
        if target.startswith("dns:"):
            return target, [("grpc.service_config", service_config())]
        parts = [t for t in target.split(",") if t.strip()] if "," in target else [target]
    else:
        parts = list(target)
    if not parts:
        raise ValueError("target: give at least one HOST:PORT")
    if len(parts) == 1:
        return parts[0].strip(), []
    hosts, addrs = [], []
    for p in parts:
        host, port = _split(p)
        ip = _resolve(host)
        hosts.append(host)
        addrs.append((ipaddress.ip_address(ip), port))
    families = {a.version for a, _ in addrs}
    if len(families) > 1:
        raise ValueError(f"targets {parts} mix IPv4 and IPv6 addresses; use one family")
    if families == {4}:
        joined = "ipv4:" + ",".join(f"{a}:{port}" for a, port in addrs)
    else:
        joined = "ipv6:" + ",".join(f"[{a}]:{port}" for a, port in addrs)
    options: list[tuple[str, object]] = [("grpc.service_config", service_config())]
    named = [h for h in hosts if not _is_ip(h)]
    if named:  # TLS checks the certificate against this name, not the resolved address
        options.append(("grpc.ssl_target_name_override", named[0]))
        options.append(("grpc.default_authority", named[0]))
    return joined, options


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False
