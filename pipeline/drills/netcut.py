"""A TCP link that can be cut: the way a network outage looks to a client.

Stopping a server in-process is not an outage: an HTTP server's handler threads keep serving the
keep-alive connections the client already holds, so pooled clients (the AWS SDK's) never notice. Cutting
this link resets every open connection and refuses new ones until it is restored.
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
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._listener: socket.socket | None = None
        self._open = threading.Event()
        self._acceptor: threading.Thread | None = None

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.1)
        self._listener = listener
        self._open.set()
        self._acceptor = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        self._acceptor.start()

    def cut(self) -> None:
        """Every connection reset, the port closed (connections refused) until ``restore``."""
        self._open.clear()
        if self._listener is not None:
            # shutdown stops the listening at once; close alone waits for the accept thread's poll
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
            self._acceptor.join(5)
        with self._lock:
            sockets, self._sockets = self._sockets, set()
        for sock in sockets:
            _reset(sock)

    def _accept(self, listener: socket.socket) -> None:
        while self._open.is_set():
            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed by cut()
                return
            client.settimeout(None)
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                _reset(client)
                continue
            with self._lock:
                if not self._open.is_set():
                    _reset(client)
                    _reset(server)
                    return
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
