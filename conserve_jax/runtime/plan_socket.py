"""The transport under the plan channel (runtime/plan_channel.py): one TCP connection from
the leader (process 0) to each follower, carrying length-prefixed frames one way only.

Start-up: the leader listens on a free port of every interface (`LeaderSockets.listen`);
`PlanChannel.connect` publishes the port once through the coordinator's key-value store, and
each follower connects to the coordinator's host at that port (`FollowerSocket.connect`) and
says which process it is (a 4-byte hello). The leader accepts lazily, at its first send, so
its start-up (weights, warmup) and the followers' overlap; the followers' sockets wait in
the listen backlog meanwhile.

Frames: a little-endian uint32 length, then the bytes. Every socket has TCP_NODELAY (a plan
is one small write that must leave at once) and TCP keepalive (a vanished host is noticed
after `timeout_s` of silence plus 3 probes).

Failures: the followers never write after their hello, so on the leader a follower socket
that polls readable is one whose process closed it (died, exited): every send checks that
first (`poll`, no wait) and raises `PlanChannelClosed` naming the process, as does a send the
kernel refuses (reset) or that cannot leave within `timeout_s` (a stopped follower whose
buffer is full). A follower's `recv` blocks until a frame arrives (the leader may idle for
hours) and raises `PlanChannelClosed` at once when the leader's socket closes.

Threads: on the leader only the step-loop thread (the runner's owner) calls `send`; on a
follower only the follower loop calls `recv`.
"""
from __future__ import annotations

import dataclasses
import logging
import select
import socket
import struct
import time
from typing import Optional

log = logging.getLogger(__name__)

FRAME = struct.Struct("<I")  # frame length
HELLO = struct.Struct("<I")  # the connecting process's id, its first write
MAX_FRAME = 1 << 30
KEEPALIVE_PROBES = 3


class PlanChannelClosed(ConnectionError):
    """The other end of the plan channel is gone (died, exited or stopped answering)."""


def _tune(sock: socket.socket, timeout_s: float) -> None:
    """TCP_NODELAY and keepalive (idle `timeout_s`, then `KEEPALIVE_PROBES` probes)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    idle = max(1, int(timeout_s))
    for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", max(1, idle // 3)),
                        ("TCP_KEEPCNT", KEEPALIVE_PROBES)):
        if hasattr(socket, name):  # Linux; elsewhere the system's defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def connect_with_hello(host: str, port: int, process_id: int, wait_s: float,
                       keepalive_s: float, what: str, peer: str) -> socket.socket:
    """Connect to `peer` at host:port, retrying for up to `wait_s` (it may not listen
    yet), tune the socket (`_tune`, keepalive `keepalive_s`), send this process's id
    (`HELLO`) and make the socket blocking (the other end may idle for hours). Raises
    `PlanChannelClosed` ("`what`: cannot connect to `peer` ...") when the wait runs out."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=max(1.0, wait_s))
            break
        except OSError as e:
            if time.monotonic() > deadline:
                raise PlanChannelClosed(f"{what}: cannot connect to {peer} at "
                                        f"{host}:{port} ({e})") from e
            time.sleep(0.2)
    _tune(sock, keepalive_s)
    sock.sendall(HELLO.pack(process_id))
    sock.settimeout(None)
    return sock


def _read_exact(sock: socket.socket, n: int, what: str) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        try:
            k = sock.recv_into(view[got:])
        except OSError as e:  # reset, or keepalive gave up (ETIMEDOUT)
            raise PlanChannelClosed(f"plan channel: the connection to {what} failed "
                                    f"({e})") from e
        if k == 0:
            raise PlanChannelClosed(f"plan channel: {what} closed the connection")
        got += k
    return bytes(buf)


@dataclasses.dataclass
class LeaderSockets:
    """The leader's end: a listening socket and, once accepted, one socket per follower
    (process id -> socket). `send` writes one frame to every follower."""

    listener: socket.socket
    followers: int  # how many connect (num_processes - 1)
    timeout_s: float  # a send that cannot leave this long fails
    accept_timeout_s: float  # how long the first send waits for the followers to connect
    peers: dict = dataclasses.field(default_factory=dict)
    _poll: Optional[select.poll] = None
    _fds: dict = dataclasses.field(default_factory=dict)  # fd -> process id

    @classmethod
    def listen(cls, followers: int, timeout_s: float, accept_timeout_s: float,
               host: str = "") -> "LeaderSockets":
        """Listen on a free port of `host` ("": every interface)."""
        if not host and socket.has_dualstack_ipv6():
            listener = socket.create_server(("", 0), family=socket.AF_INET6,
                                            dualstack_ipv6=True, backlog=max(8, followers))
        else:
            listener = socket.create_server((host, 0), backlog=max(8, followers))
        return cls(listener, followers, timeout_s, accept_timeout_s)

    @property
    def port(self) -> int:
        return self.listener.getsockname()[1]

    def accept_all(self, wait_s: float) -> None:
        """Accept followers until all have said hello; raises `PlanChannelClosed` after
        `wait_s` seconds without them. A connection that is not a follower's (a bad hello)
        is closed and skipped."""
        deadline = time.monotonic() + wait_s
        while len(self.peers) < self.followers:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PlanChannelClosed(
                    f"plan channel: only processes {sorted(self.peers)} of "
                    f"{self.followers} followers connected within {wait_s:.0f} s")
            self.listener.settimeout(left)
            try:
                sock, addr = self.listener.accept()
            except socket.timeout:
                continue
            try:
                sock.settimeout(max(1.0, min(left, self.timeout_s)))
                (pid,) = HELLO.unpack(_read_exact(sock, HELLO.size, f"a peer at {addr}"))
            except (OSError, struct.error):
                log.warning("plan channel: dropped a connection from %s without a hello",
                            addr, exc_info=True)
                sock.close()
                continue
            if not 1 <= pid <= self.followers or pid in self.peers:
                log.warning("plan channel: dropped a connection from %s claiming process %d",
                            addr, pid)
                sock.close()
                continue
            _tune(sock, self.timeout_s)
            sock.settimeout(self.timeout_s)
            self.peers[pid] = sock
            log.info("plan channel: process %d connected from %s", pid, addr)
        self._poll = select.poll()
        for pid, sock in self.peers.items():
            self._poll.register(sock, select.POLLIN | select.POLLPRI)
            self._fds[sock.fileno()] = pid

    def send(self, data: bytes, wait_s: Optional[float] = None) -> None:
        """One frame to every follower (accepting them first if they are not all connected,
        waiting up to `wait_s`, default `accept_timeout_s`); raises `PlanChannelClosed` if a
        follower has closed its socket or does not take the frame within `timeout_s`."""
        if len(self.peers) < self.followers:
            self.accept_all(self.accept_timeout_s if wait_s is None else wait_s)
        for fd, _ in self._poll.poll(0):  # followers never write: readable means closed
            raise PlanChannelClosed(f"plan channel: process {self._fds[fd]} closed its "
                                    f"connection (it died or exited)")
        if len(data) > MAX_FRAME:
            raise ValueError(f"a plan channel frame of {len(data)} bytes")
        frame = FRAME.pack(len(data)) + data
        for pid, sock in self.peers.items():
            try:
                sock.sendall(frame)
            except socket.timeout as e:
                raise PlanChannelClosed(f"plan channel: process {pid} took no data for "
                                        f"{self.timeout_s:.0f} s (stopped?)") from e
            except OSError as e:
                raise PlanChannelClosed(f"plan channel: process {pid} closed its connection "
                                        f"({e})") from e

    def close(self) -> None:
        for sock in self.peers.values():
            sock.close()
        self.listener.close()


@dataclasses.dataclass
class FollowerSocket:
    """A follower's end: its connection to the leader. `recv` returns the next frame."""

    sock: socket.socket

    @classmethod
    def connect(cls, host: str, port: int, process_id: int,
                timeout_s: float) -> "FollowerSocket":
        """Connect to the leader at host:port (retrying for up to `timeout_s`: the leader
        may not listen yet) and say hello."""
        sock = connect_with_hello(host, port, process_id, timeout_s, timeout_s,
                                  "plan channel", "the leader")
        log.info("plan channel: process %d connected to the leader at %s:%d", process_id,
                 host, port)
        return cls(sock)

    def recv(self) -> bytes:
        """The next frame; raises `PlanChannelClosed` when the leader closed its end."""
        (n,) = FRAME.unpack(_read_exact(self.sock, FRAME.size, "the leader"))
        return _read_exact(self.sock, n, "the leader")

    def close(self) -> None:
        self.sock.close()
