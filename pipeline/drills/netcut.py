"""A TCP link that can be cut: the way a network outage looks to a client.

Stopping a server in-process is not an outage: an HTTP server's handler threads keep serving the
keep-alive connections the client already holds, so pooled clients (the AWS SDK's) never notice. Cutting
this link resets every open connection, and every new one as soon as it is made, until it is restored;
it counts those (``rejected``), the proof that a client tried to get through the outage.
"""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import threading
from pathlib import Path


def port_outside_ephemeral_range() -> int:
    """A free port that no outgoing connection can be given. While the link is cut, clients retrying a
    connection to an ephemeral-range port on 127.0.0.1 can be handed that very port as their source and
    connect to themselves (TCP simultaneous open): the port is then taken and the client waits on itself."""
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    candidates = [p for p in range(10000, 30000) if not low <= p <= high]
    random.shuffle(candidates)
    for port in candidates:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port outside the ephemeral range")


class CuttableLink:
    """Forwards ``127.0.0.1:port`` to ``127.0.0.1:target_port`` while open."""

    def __init__(self, port: int, target_port: int):
        self.port, self.target_port = port, target_port
        self.rejected = 0  # connections made while cut (each reset at once)
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._open = threading.Event()
        self._listener: socket.socket | None = None

    def restore(self) -> None:
        """Forwards new connections again (the first call starts listening, for the link's lifetime)."""
        if self._listener is None:
            self._listener = socket.socket()
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind(("127.0.0.1", self.port))
            self._listener.listen(64)
            threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()
        self._open.set()

    def cut(self) -> None:
        """Every open connection reset, and every new one as soon as it is made, until ``restore``."""
        with self._lock:
            self._open.clear()
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            _reset(sock)

    def _reject(self, client: socket.socket) -> None:
        self.rejected += 1
        _reset(client)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            client, _ = listener.accept()
            if not self._open.is_set():
                self._reject(client)
                continue
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                _reset(client)
                continue
            with self._lock:
                if not self._open.is_set():
                    self._reject(client)
                    _reset(server)
                    continue
                self._sockets.update((client, server))
            done = threading.Barrier(2, action=lambda c=client, s=server: self._closed(c, s))
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst, done), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, done: threading.Barrier) -> None:
        """One direction; its end of stream is passed on as such (a FIN), so no reply is cut short."""
        try:
            while data := src.recv(1 << 16):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:  # reset by cut(), or by an endpoint
            pass
        with contextlib.suppress(threading.BrokenBarrierError):
            done.wait(timeout=600)

    def _closed(self, *sockets: socket.socket) -> None:
        with self._lock:
            self._sockets.difference_update(sockets)
        for sock in sockets:
            sock.close()


def _reset(sock: socket.socket) -> None:
    """Closed with an RST (linger 0), as a dropped network path leaves it, not a polite FIN; SHUT_RD first
    wakes a pump thread blocked reading it (close alone would not)."""
    for op in (
        lambda: sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)),
        lambda: sock.shutdown(socket.SHUT_RD),
        sock.close,
    ):
        with contextlib.suppress(OSError):
            op()
