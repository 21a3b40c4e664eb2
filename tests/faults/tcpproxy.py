"""A TCP proxy on loopback that cuts connections after N bytes: a link that drops mid-transfer.

`DropProxy(("127.0.0.11", 2222))` listens on 127.0.0.1:<port> and forwards each connection
to the target. With `cut_after=N`, a connection is reset once N bytes went client->server,
for the next `cuts` connections (-1: every one); later connections pass through. `rate`
throttles the upload direction (bytes/s) so a test can act while a transfer is running;
`down_rate` the other direction (a command's output).
Every loop is bounded by socket timeouts; `close()` stops everything.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from dataclasses import dataclass


@dataclass
class Conn:
    up: int = 0  # bytes client -> server
    down: int = 0
    cut: bool = False


class DropProxy:
    def __init__(self, target: tuple[str, int], host: str = "127.0.0.1") -> None:
        self.target = target
        self.cut_after: int | None = None
        self.cuts = 0
        self.rate: float | None = None
        self.down_rate: float | None = None
        self.conns: list[Conn] = []
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._closed = threading.Event()
        self.listener = socket.create_server((host, 0))
        self.listener.settimeout(0.2)
        self.address = self.listener.getsockname()[:2]
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def plan(self, cut_after: int | None = None, cuts: int = 0,
             rate: float | None = None, down_rate: float | None = None) -> None:
        with self._lock:
            self.cut_after, self.cuts, self.rate = cut_after, cuts, rate
            self.down_rate = down_rate

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            conn = Conn()
            with self._lock:
                self.conns.append(conn)
                self._socks += [client, server]
                cut_after = self.cut_after if self.cuts != 0 else None
                if cut_after is not None and self.cuts > 0:
                    self.cuts -= 1
            for a, b, up in ((client, server, True), (server, client, False)):
                threading.Thread(target=self._pump, args=(a, b, conn, up, cut_after),
                                 daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, conn: Conn, up: bool,
              cut_after: int | None) -> None:
        src.settimeout(1.0)
        try:
            while not self._closed.is_set() and not conn.cut:
                try:
                    # Output throttled: small reads, so it trickles and a cut lands midway.
                    data = src.recv(4096 if not up and self.down_rate else 65536)
                except TimeoutError:
                    continue
                if not data:
                    break
                if up:
                    if cut_after is not None and conn.up + len(data) > cut_after:
                        conn.cut = True
                        break
                    conn.up += len(data)
                    rate = self.rate
                    if rate:
                        time.sleep(len(data) / rate)
                else:
                    conn.down += len(data)
                    rate = self.down_rate
                    if rate:
                        time.sleep(len(data) / rate)
                    if conn.cut:  # cut while this chunk was held back
                        break
                self._send_all(dst, data, conn)
        except OSError:
            pass
        finally:
            if conn.cut:
                _reset(src)
                _reset(dst)
            else:
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)

    def _send_all(self, dst: socket.socket, data: bytes, conn: Conn) -> None:
        """sendall that outlasts the 1 s timeout both pumps set on the shared sockets: a
        receiver that reads nothing for a while (backpressure) is not a closed link."""
        view = memoryview(data)
        while view:
            if self._closed.is_set() or conn.cut:
                raise ConnectionAbortedError("proxy closed or link cut")
            try:
                view = view[dst.send(view):]
            except TimeoutError:
                continue

    def cut_all(self) -> int:
        """Reset every open connection now (a link that dies mid-step); returns how many."""
        with self._lock:
            live = [c for c in self.conns if not c.cut]
            for c in live:
                c.cut = True
            socks, self._socks = self._socks, []
        for s in socks:
            _reset(s)
        return len(live)

    def close(self) -> None:
        self._closed.set()
        self.listener.close()
        with self._lock:
            for s in self._socks:
                _reset(s)
        self._thread.join(timeout=5)


def _reset(s: socket.socket) -> None:
    """Close with RST, like a link that died (no orderly FIN)."""
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        s.close()
