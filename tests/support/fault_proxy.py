"""A TCP proxy on loopback that makes an S3 server slow, flaky or throttled.

Between rayflow and the S3 server of the tests. By default it passes
everything through; a test sets ``latency_s`` (added to every chunk a
client sends), ``error_rate`` (a new connection answers its first request
with ``503 SlowDown`` and closes), ``drop_rate`` (a new connection is cut
after its first bytes), ``down`` (connections are closed at once) or
``lose_answers(n)`` (the next n connections pass their request on and lose
its answer: the server acted, the client never hears). Every
listener binds 127.0.0.1 only; it runs in threads of the test process.
"""

from __future__ import annotations

import random
import socket
import threading
import time

SLOW_DOWN = (
    b"<?xml version='1.0' encoding='UTF-8'?>\n<Error><Code>SlowDown</Code>"
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class FaultProxy:
    def __init__(self, upstream_port: int, *, port: int = 0, seed: int = 7):
        self.upstream = ("127.0.0.1", upstream_port)
        self.latency_s = 0.0
        self.error_rate = 0.0
        self.drop_rate = 0.0
        self.down = False
        self.lost_answers = 0  # connections still to lose their answer
        self.counts = {"connections": 0, "errors": 0, "drops": 0, "refused": 0, "lost": 0}
        self._rng = random.Random(seed)
        self._server = socket.create_server(("127.0.0.1", port))
        self.port = self._server.getsockname()[1]
        self._stop = threading.Event()
        self._open: set[socket.socket] = set()
        self._thread = threading.Thread(target=self._accept, daemon=True, name="fault-proxy")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._server.close()

    def clear(self) -> None:
        self.latency_s = self.error_rate = self.drop_rate = 0.0
        self.down = False
        self.lost_answers = 0

    def lose_answers(self, n: int) -> None:
        """The next ``n`` connections reach the server and lose its answer; open ones
        are cut, so that the next requests open new connections."""
        self.lost_answers = n
        for sock in list(self._open):
            _cut(sock)

    def faults(
        self, *, latency_s: float = 0.0, error_rate: float = 0.0, drop_rate: float = 0.0
    ) -> None:
        """Turn faults on; connections open now are cut, so that they apply at once."""
        self.latency_s, self.error_rate, self.drop_rate = latency_s, error_rate, drop_rate
        for sock in list(self._open):
            _cut(sock)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        self.counts["connections"] += 1
        self._open.add(client)
        roll = self._rng.random()
        try:
            if self.down:
                self.counts["refused"] += 1
                return
            if self.lost_answers > 0:
                self.lost_answers -= 1
                self.counts["lost"] += 1
                upstream = socket.create_connection(self.upstream, timeout=5)
                threading.Thread(
                    target=self._pipe, args=(client, upstream, 0.0), daemon=True
                ).start()
                upstream.recv(65536)  # the server answered ... and the answer is lost
                _cut(client, upstream)
                upstream.close()
                return
            if roll < self.error_rate:
                self.counts["errors"] += 1
                _read_request(client)
                client.sendall(
                    b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\n"
                    + f"Content-Length: {len(SLOW_DOWN)}\r\nConnection: close\r\n\r\n".encode()
                    + SLOW_DOWN
                )
                return
            if roll < self.error_rate + self.drop_rate:
                self.counts["drops"] += 1
                client.settimeout(5)
                client.recv(1024)  # the request starts ... and the line goes dead
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                return  # the server is down: the client sees the connection close
            upstream.settimeout(None)
            if self.error_rate or self.drop_rate:
                # Clients keep connections alive: while faults are on, cut every one
                # after a moment, so that each new connection rolls the dice again.
                timer = threading.Timer(0.5, _cut, args=(client, upstream))
                timer.daemon = True
                timer.start()
            relay = threading.Thread(target=self._pipe, args=(upstream, client, 0.0), daemon=True)
            relay.start()
            self._pipe(client, upstream, self.latency_s)
            relay.join(60)
        except OSError:
            pass
        finally:
            self._open.discard(client)
            client.close()

    def _pipe(self, source: socket.socket, target: socket.socket, latency: float) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if self.latency_s:
                    time.sleep(self.latency_s)
                target.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, target):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def _read_request(sock: socket.socket) -> None:
    """Read one HTTP request (headers, and a Content-Length body) so that it can be answered."""
    sock.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip() or 0)
        if name.strip().lower() == b"expect" and b"100-continue" in value.lower():
            return  # answer before the body comes
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            return
        body += chunk


def _cut(*sockets: socket.socket) -> None:
    for s in sockets:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
