"""A fault-injecting TCP proxy: real sockets and real threads between a client transport and a server.

``FaultyProxy(upstream_port)`` listens on ``127.0.0.1`` and forwards every connection it accepts to the
server, byte for byte, with two pump threads per connection (client -> server and server -> client; plain
blocking sockets, so neither direction can hold up the other). Nothing of kvstrata is imported or replaced:
the client under test connects to :meth:`FaultyProxy.url` as it would to the server itself.

Faults are armed explicitly, one at a time, and apply to the bytes the proxy forwards *after* arming:

- :meth:`pass_through` — forward everything (the default; disarms a pending fault).
- :meth:`drop_after` ``(n)`` — forward ``n`` more bytes server -> client, then close both sockets of the
  connection that carried them (the client sees the stream end mid-frame, as when a server dies). It
  fires once the server has sent ``n`` bytes (``n=0``: when it sends anything).
- :meth:`stall` — black-hole: every byte read from either side from now on is swallowed, nothing is
  forwarded and nothing is closed (as a hung server or a dead link whose TCP keepalive has not fired).
  Connections accepted while stalled are stalled too (a connect cannot finish its HELLO).
- :meth:`flip_byte` ``(offset, mask=0xFF)`` — XOR the byte at ``offset`` of the server -> client stream
  (counted from the moment of arming, across the proxy's connections) with ``mask``, once.
- :meth:`kill` — close the listener and every connection: new connects are refused, open ones see EOF.

Offsets count from arming, so arm a fault while the client is idle (between calls): the next byte the
server sends is offset 0, i.e. the first byte of the header of the next reply. ``events`` records what
fired (``"drop"``, ``"flip@<offset>"``) so that a test can check its fault really happened.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass

__all__ = ["FaultyProxy"]

_PIECE = 64 * 1024


@dataclass
class _Fault:
    kind: str = "pass"  # "pass", "drop", "stall", "flip"
    #: bytes server -> client forwarded since the fault was armed
    seen: int = 0
    #: drop: bytes still to forward; flip: the offset of the byte to flip
    at: int = 0
    mask: int = 0xFF


class _Link:
    """One proxied connection: the client's socket and the server's."""

    def __init__(self, client: socket.socket, server: socket.socket) -> None:
        self.client = client
        self.server = server
        self.closed = False
        self.lock = threading.Lock()

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
        for sock in (self.client, self.server):
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the pump blocked in recv on it
            except OSError:
                pass
            sock.close()


class FaultyProxy:
    """A TCP proxy in front of a server on ``127.0.0.1:upstream_port`` (see the module docstring)."""

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._fault = _Fault()
        self._links: list[_Link] = []
        self._threads: list[threading.Thread] = []
        self._killed = False
        #: faults that fired, in order
        self.events: list[str] = []
        #: connections accepted so far
        self.accepted = 0
        #: bytes forwarded per direction
        self.bytes_up = 0
        self.bytes_down = 0
        self._acceptor = threading.Thread(target=self._accept_loop, name="faulty-proxy", daemon=True)
        self._acceptor.start()

    # -- addresses ---------------------------------------------------------------------------------
    def url(self, scheme: str = "kvs") -> str:
        """The URL a client connects to instead of the server's."""
        return f"{scheme}://127.0.0.1:{self.port}"

    # -- faults ------------------------------------------------------------------------------------
    def pass_through(self) -> None:
        """Forward everything (disarms a pending fault; a stall ends, what it swallowed stays lost)."""
        with self._lock:
            self._fault = _Fault()

    def drop_after(self, nbytes: int) -> None:
        """Forward ``nbytes`` more bytes server -> client, then close that connection."""
        with self._lock:
            self._fault = _Fault("drop", at=nbytes)

    def stall(self) -> None:
        """Swallow every byte from now on, forward nothing, close nothing."""
        with self._lock:
            self._fault = _Fault("stall")

    def flip_byte(self, offset: int, mask: int = 0xFF) -> None:
        """XOR byte ``offset`` of the server -> client stream (counted from now) with ``mask``, once."""
        if not 0 < mask < 256:
            raise ValueError("mask is one non-zero byte")
        with self._lock:
            self._fault = _Fault("flip", at=offset, mask=mask)

    def fired(self, prefix: str) -> bool:
        """Whether a fault whose event starts with ``prefix`` has fired."""
        with self._lock:
            return any(event.startswith(prefix) for event in self.events)

    def kill(self) -> None:
        """Close the listener and every connection (the server looks dead; connects are refused)."""
        with self._lock:
            self._killed = True
            links = list(self._links)
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept (Linux)
        except OSError:
            pass
        self._listener.close()
        for link in links:
            link.close()

    def close(self) -> None:
        """Kill, then wait for the proxy's threads."""
        self.kill()
        self._acceptor.join(5)
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(5)

    def __enter__(self) -> FaultyProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- threads -----------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed by kill()
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            link = _Link(client, server)
            with self._lock:
                if self._killed:
                    link.close()
                    return
                self.accepted += 1
                self._links.append(link)
                pumps = [
                    threading.Thread(target=self._pump, args=(link, True), daemon=True),
                    threading.Thread(target=self._pump, args=(link, False), daemon=True),
                ]
                self._threads += pumps
            for pump in pumps:
                pump.start()

    def _pump(self, link: _Link, down: bool) -> None:
        """Forward one direction of ``link`` (``down``: server -> client) until either side closes."""
        src, dst = (link.server, link.client) if down else (link.client, link.server)
        try:
            while True:
                data = src.recv(_PIECE)
                if not data:
                    break
                out, close_after = self._apply(data, down)
                if out:
                    dst.sendall(out)
                if close_after:
                    break
        except OSError:
            pass
        finally:
            link.close()

    def _apply(self, data: bytes, down: bool) -> tuple[bytes, bool]:
        """What of ``data`` to forward under the armed fault, and whether to close the link after it."""
        with self._lock:
            fault = self._fault
            if fault.kind == "stall":
                return b"", False
            if not down:
                self.bytes_up += len(data)
                return data, False
            start = fault.seen
            fault.seen += len(data)
            if fault.kind == "drop":
                if fault.at <= len(data):
                    self.events.append("drop")
                    self._fault = _Fault()
                    out = data[: fault.at]
                    self.bytes_down += len(out)
                    return out, True
                fault.at -= len(data)
            elif fault.kind == "flip" and start <= fault.at < start + len(data):
                buf = bytearray(data)
                buf[fault.at - start] ^= fault.mask
                data = bytes(buf)
                self.events.append(f"flip@{fault.at}")
                self._fault = _Fault()
            self.bytes_down += len(data)
            return data, False
