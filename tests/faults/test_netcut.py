"""The cuttable TCP link the S3 drills use, without Ray: forwards, resets what is open, refuses, restores."""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
from pathlib import Path

import pytest

from pipeline.drills.head import free_ports
from pipeline.drills.netcut import CuttableLink, port_outside_ephemeral_range


class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while data := self.request.recv(1024):
            self.request.sendall(data)


@pytest.fixture
def link():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", free_ports(1)[0]), Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    link = CuttableLink(port_outside_ephemeral_range(), server.server_address[1])
    link.restore()
    yield link
    link.cut()
    server.shutdown()


def echo(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    return sock.recv(1024)


def test_a_cut_resets_open_and_new_connections_counts_them_and_restore_serves_again(link):
    kept = socket.create_connection(("127.0.0.1", link.port), timeout=5)
    assert echo(kept, b"before") == b"before"
    link.cut()
    with contextlib.suppress(ConnectionError):  # the pooled connection does not survive the cut
        assert echo(kept, b"during") == b""
    assert link.rejected == 0  # a reset open connection is not a new attempt
    for attempt in (1, 2):
        # reset as soon as made: on a busy machine the reset can even arrive before connect() returns
        with (
            contextlib.suppress(ConnectionError),
            socket.create_connection(("127.0.0.1", link.port), timeout=5) as new,
        ):
            assert echo(new, b"during") == b""  # nothing comes back
        assert link.rejected == attempt
    link.restore()
    with socket.create_connection(("127.0.0.1", link.port), timeout=5) as fresh:
        assert echo(fresh, b"after") == b"after"
    assert link.rejected == 2


def test_a_reply_is_passed_on_whole_when_the_server_closes_after_it(link):
    payload = bytes(range(256)) * 4096  # 1 MiB, more than any socket buffer between the two ends
    with socket.create_connection(("127.0.0.1", link.port), timeout=5) as sock:

        def send():  # while the echo is read: a sender that waits for its whole send could fill every buffer
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)  # the echo server ends the connection after the last byte

        sender = threading.Thread(target=send)
        sender.start()
        received = b"".join(iter(lambda: sock.recv(1 << 16), b""))
        sender.join()
    assert received == payload


def test_the_link_port_is_never_one_an_outgoing_connection_can_be_given():
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    assert not low <= port_outside_ephemeral_range() <= high
