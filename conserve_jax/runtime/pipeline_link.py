"""The transport of a pipeline run (`EngineConfig.pp` > 1, one stage per process): a ring of
TCP connections, stage i -> stage i+1, and the last stage -> process 0 (its replies).

`StageLink` is one connection carrying length-prefixed frames (the framing of
runtime/plan_socket.py; TCP_NODELAY and keepalive). `Ring` is a process's two links:
`outbound` to the next stage (the last stage's goes to process 0) and `inbound` from the
previous one (process 0's from the last stage). For pp 2 these are two connections between
the same two processes.

Start-up: `Ring.listen` (every process, early) listens on a free port of every interface and
publishes "host:port" in the `jax.distributed` coordinator's key-value store (`ADDR_KEY`;
host: this machine's address on the route to the coordinator). `Ring.join` then connects to
the next stage's published address (waiting up to `wait_s` for it), says which process it
is (a 4-byte hello) and accepts the previous stage's connection, checking its hello. Process
0 joins lazily, at its first step, so every process loads and compiles meanwhile.

Failures: a process that dies closes its sockets; its neighbours' `recv` (or a `send` the
kernel refuses) raises `PlanChannelClosed` naming the link, and a stage loop that gets it
exits, closing its own links in turn, so process 0 sees its inbound link close. A process
that hangs keeps its sockets open: process 0's step watchdog bounds that (step_watchdog.py).

Threads: each process's ring is used by one thread (process 0: the engine's step loop; a
stage: its loop).
"""
from __future__ import annotations

import dataclasses
import logging
import socket
import struct
import time
from typing import Optional

from conserve_jax.runtime.plan_socket import (FRAME, HELLO, MAX_FRAME, PlanChannelClosed,
                                              _read_exact, _tune, connect_with_hello)

log = logging.getLogger(__name__)

ADDR_KEY = "conserve/pipeline/addr/{}"


@dataclasses.dataclass
class StageLink:
    """One TCP connection between two processes of a pipeline: frames both ways."""

    sock: socket.socket
    peer: str  # for messages: "process 1"
    sent_bytes: int = 0

    def send(self, data: bytes) -> None:
        """One frame; raises `PlanChannelClosed` if the peer is gone."""
        if len(data) > MAX_FRAME:
            raise ValueError(f"a pipeline frame of {len(data)} bytes")
        try:
            self.sock.sendall(FRAME.pack(len(data)) + data)
        except OSError as e:
            raise PlanChannelClosed(f"pipeline: the connection to {self.peer} failed "
                                    f"({e})") from e
        self.sent_bytes += FRAME.size + len(data)

    def recv(self) -> bytes:
        """The next frame, waiting as long as it takes; raises `PlanChannelClosed` when the
        peer closed the connection."""
        (n,) = FRAME.unpack(_read_exact(self.sock, FRAME.size, self.peer))
        return _read_exact(self.sock, n, self.peer)

    def close(self) -> None:
        self.sock.close()


def route_host(coordinator_host: str) -> str:
    """This machine's address on the route to `coordinator_host` (what the other stages
    connect to); the host name if there is no such route."""
    try:
        family = socket.getaddrinfo(coordinator_host, None)[0][0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((coordinator_host, 9))  # UDP: no packet is sent
            return s.getsockname()[0]
    except OSError:
        return socket.gethostname()


@dataclasses.dataclass
class Ring:
    """A process's place in the ring (module docstring). `inbound`/`outbound` are None
    until `join`."""

    process_id: int
    num_processes: int
    listener: socket.socket
    timeout_s: float  # keepalive idle time of the links
    inbound: Optional[StageLink] = None
    outbound: Optional[StageLink] = None

    @property
    def next_id(self) -> int:
        return (self.process_id + 1) % self.num_processes

    @property
    def prev_id(self) -> int:
        return (self.process_id - 1) % self.num_processes

    @classmethod
    def listen(cls, process_id: int, num_processes: int, timeout_s: float) -> "Ring":
        """Listen and publish this process's address (after `distributed.start`)."""
        from jax._src import distributed as jd

        state = jd.global_state
        if state.client is None:
            raise RuntimeError("jax.distributed is not initialized")
        host = route_host(state.coordinator_address.rsplit(":", 1)[0].strip("[]"))
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.create_server(("", 0), family=family, backlog=4)
        addr = f"{host}:{listener.getsockname()[1]}"
        state.client.key_value_set(ADDR_KEY.format(process_id), addr, allow_overwrite=True)
        log.info("pipeline: process %d listens at %s", process_id, addr)
        return cls(process_id, num_processes, listener, timeout_s)

    def join(self, wait_s: float) -> None:
        """Connect to the next stage and accept the previous one (each waiting up to
        `wait_s`); raises `PlanChannelClosed` if either does not come."""
        from jax._src import distributed as jd

        client = jd.global_state.client
        addr = client.blocking_key_value_get(ADDR_KEY.format(self.next_id), int(wait_s * 1000))
        host, port = addr.rsplit(":", 1)
        self.outbound = StageLink(self._connect(host, int(port), wait_s),
                                  f"process {self.next_id}")
        self.inbound = StageLink(self._accept(wait_s), f"process {self.prev_id}")
        log.info("pipeline: process %d linked (from process %d, to process %d)",
                 self.process_id, self.prev_id, self.next_id)

    def _connect(self, host: str, port: int, wait_s: float) -> socket.socket:
        return connect_with_hello(host, port, self.process_id, wait_s, self.timeout_s,
                                  "pipeline", f"process {self.next_id}")

    def _accept(self, wait_s: float) -> socket.socket:
        deadline = time.monotonic() + wait_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PlanChannelClosed(f"pipeline: process {self.prev_id} did not connect "
                                        f"within {wait_s:.0f} s")
            self.listener.settimeout(left)
            try:
                sock, peer = self.listener.accept()
                sock.settimeout(max(1.0, min(left, self.timeout_s)))
                (pid,) = HELLO.unpack(_read_exact(sock, HELLO.size, f"a peer at {peer}"))
            except socket.timeout:
                continue
            except (OSError, struct.error):
                log.warning("pipeline: dropped a connection without a hello", exc_info=True)
                continue
            if pid != self.prev_id:
                log.warning("pipeline: dropped a connection from %s claiming process %d "
                            "(expected %d)", peer, pid, self.prev_id)
                sock.close()
                continue
            _tune(sock, self.timeout_s)
            sock.settimeout(None)
            return sock

    def close(self) -> None:
        for link in (self.inbound, self.outbound):
            if link is not None:
                link.close()
        self.listener.close()
