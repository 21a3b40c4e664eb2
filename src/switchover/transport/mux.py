"""Talk to our own ssh ControlMaster over its socket (OpenSSH's PROTOCOL.mux).

A command over an existing master normally costs an `ssh` process: ~9 ms of CPU here to
start, read its config and hand its stdio to the master. Asking the master directly for a
session, with our pipes passed as file descriptors, costs none of that; the remote side
(one session channel, the login shell, the exit status) is exactly what `ssh host cmd`
gets (our environment is offered and the master forwards what its SendEnv allows). Closing
our socket ends the session, as killing that `ssh` process would.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import struct
import threading

from switchover.transport.base import StepWatch, _feed

# Message types (PROTOCOL.mux). Every message: uint32 length, uint32 type, body.
MUX_HELLO, MUX_VERSION = 0x00000001, 4
MUX_C_NEW_SESSION = 0x10000002
MUX_C_TERMINATE = 0x10000005
MUX_S_OK = 0x80000001
MUX_S_PERMISSION_DENIED = 0x80000002
MUX_S_FAILURE = 0x80000003
MUX_S_EXIT_MESSAGE = 0x80000004
MUX_S_SESSION_OPENED = 0x80000006
NO_ESCAPE_CHAR = 0xFFFFFFFF


class MuxUnavailable(Exception):
    """The master could not be reached or refused the session: the command did not run."""


def master_socket(control_dir: str) -> str:
    """The ControlPath socket in our private control dir (MuxUnavailable if there is none:
    the master has not started, or it has exited and removed it)."""
    try:
        names = os.listdir(control_dir)
    except OSError as e:
        raise MuxUnavailable(str(e)) from e
    if len(names) != 1:  # none yet, or the master is between its temp name and the real one
        raise MuxUnavailable("no master socket")
    return os.path.join(control_dir, names[0])


def run_session(control_path: str, command: str, *, watch: StepWatch,
                input: bytes | None = None) -> tuple[int | None, bytes, bytes]:
    """Run `command` as `ssh host command` would, in a new session of the master at
    control_path: (exit status, stdout, stderr); the status is None when the session ended
    without one (the link or the master went away, or a signal killed the remote shell:
    `ssh` exits 255 then). MuxUnavailable when the master cannot be reached or refuses the
    session (the host's MaxSessions, say): the command did not run, and the caller may
    run it with `ssh` instead. `watch` ends the session when the step is aborted or times
    out (its exception propagates).

    Our environment goes with the request and the master forwards what its SendEnv allows,
    as `ssh` would with the same config."""
    sock = _hello(control_path)
    fds: list[int] = []
    try:
        for _ in range(3):
            fds.extend(os.pipe())
        stdin_r, stdin_w, out_r, out_w, err_r, err_w = fds
        env = b"".join(_string(os.fsencode(f"{k}={v}")) for k, v in os.environ.items())
        try:
            _send(sock, struct.pack(">II", MUX_C_NEW_SESSION, 1) + _string(b"")
                  + struct.pack(">IIIII", 0, 0, 0, 0, NO_ESCAPE_CHAR)
                  + _string(b"") + _string(os.fsencode(command)) + env)
            for fd in (stdin_r, out_w, err_w):  # one descriptor per message, in this order
                socket.send_fds(sock, [b"\0"], [fd])
        except OSError as e:  # the master went away before it could open the session
            raise MuxUnavailable(str(e)) from e
        for fd in (stdin_r, out_w, err_w):  # the master holds its own copies now
            _close(fds, fd)
        if input:
            threading.Thread(target=_feed, args=(stdin_w, input), daemon=True).start()
            fds.remove(stdin_w)  # the feeder closes it
        else:
            _close(fds, stdin_w)
        return _collect(sock, out_r, err_r, watch)
    finally:
        sock.close()  # ends the session if it is still running (a timeout or an abort)
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def _collect(sock: socket.socket, out_r: int, err_r: int,
             watch: StepWatch) -> tuple[int | None, bytes, bytes]:
    """Read the session's output and the master's messages until both pipes end and the
    exit status came (or the master hung up)."""
    sock.setblocking(False)
    chunks: dict[int, list[bytes]] = {out_r: [], err_r: []}
    status: int | None = None
    opened = False
    pending = b""
    with selectors.DefaultSelector() as sel:
        sel.register(out_r, selectors.EVENT_READ)
        sel.register(err_r, selectors.EVENT_READ)
        sel.register(sock, selectors.EVENT_READ)
        while len(sel.get_map()) > 0:
            for key, _ in sel.select(timeout=watch.next_wait()):
                if key.fileobj is not sock:
                    data = os.read(key.fd, 65536)
                    if data:
                        chunks[key.fd].append(data)
                    else:
                        sel.unregister(key.fd)
                    continue
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(sock)
                    if not opened:
                        # Hung up before answering: whether the host ran the command is
                        # unknown, so it is not run again. A lost session, as with `ssh`.
                        return None, b"", b""
                    continue
                pending += data
                while len(pending) >= 4:
                    (size,) = struct.unpack(">I", pending[:4])
                    if len(pending) < 4 + size:
                        break
                    packet, pending = pending[4:4 + size], pending[4 + size:]
                    (kind,) = struct.unpack(">I", packet[:4])
                    if kind == MUX_S_SESSION_OPENED:
                        opened = True
                    elif kind in (MUX_S_FAILURE, MUX_S_PERMISSION_DENIED):
                        raise MuxUnavailable(_reason(packet))
                    elif kind == MUX_S_EXIT_MESSAGE:
                        status = struct.unpack(">I", packet[8:12])[0]
            # The master sends the exit status before it closes our pipes; once they are
            # closed too the session is over, whether or not the socket is.
            if status is not None and out_r not in sel.get_map() and err_r not in sel.get_map():
                break
    return status, b"".join(chunks[out_r]), b"".join(chunks[err_r])


def terminate_master(control_dir: str) -> bool:
    """Ask the ssh master in our private control dir to exit, as `ssh -O exit` does.
    False if that could not be done (the caller falls back to `ssh -O exit`)."""
    try:
        with _hello(master_socket(control_dir)) as sock:
            _send(sock, struct.pack(">II", MUX_C_TERMINATE, 1))
            # OpenSSH 9 hangs up as it exits; others answer MUX_S_OK first.
            reply = sock.recv(12)
    except (MuxUnavailable, OSError, ValueError, struct.error):
        return False
    return reply == b"" or reply[4:12] == struct.pack(">II", MUX_S_OK, 1)


def _hello(control_path: str) -> socket.socket:
    """A socket to the master at control_path past the hello exchange (the master's
    extensions, if any, are ignored); MuxUnavailable if there is no master to talk to."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(5)
        sock.connect(control_path)
        _send(sock, struct.pack(">II", MUX_HELLO, MUX_VERSION))
        (kind,) = struct.unpack(">I", _read_packet(sock)[:4])
        if kind != MUX_HELLO:
            raise ValueError("no hello from the master")
    except (OSError, ValueError, struct.error) as e:
        sock.close()
        raise MuxUnavailable(str(e)) from e
    return sock


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _send(sock: socket.socket, body: bytes) -> None:
    sock.sendall(struct.pack(">I", len(body)) + body)


def _reason(packet: bytes) -> str:
    """The message of a MUX_S_FAILURE / PERMISSION_DENIED: type, request id, string."""
    with contextlib.suppress(struct.error):
        (size,) = struct.unpack(">I", packet[8:12])
        return "the master refused the session: " + packet[12:12 + size].decode(
            "utf-8", "replace")
    return "the master refused the session"


def _read_packet(sock: socket.socket) -> bytes:
    (size,) = struct.unpack(">I", _recv_exact(sock, 4))
    if size > 65536:
        raise ValueError("unexpected mux packet")
    return _recv_exact(sock, size)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ValueError("mux socket closed")
        data += chunk
    return data


def _close(fds: list[int], fd: int) -> None:
    fds.remove(fd)
    os.close(fd)
