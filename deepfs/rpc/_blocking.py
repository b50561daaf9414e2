"""A blocking frame connection, for a thread that wants one answer without an event loop.

The problem: ``deepfs.Client`` runs its requests in a trio loop on a thread of
its own, and a call from the user's thread hops into that loop and back
(two thread wake-ups, the loop's epoll, a lock): at queue depth 1 that hop
costs more than the request itself. A thread that needs a single small
answer (``deepfs.client._direct``: a small read of one stripe's fragments) can
instead send it on a plain blocking socket of its own and wait for the answer
there. ``call`` is ``send_request`` then ``receive_answer``; a thread asking
several peers sends every request before it waits for the first answer, so
the peers work at the same time.

Rules: one request at a time per connection, so the answer that comes back
is the one asked for (anything else is the peer's error: ``ProtocolError``).
The connection authenticates like ``FrameClient.connect`` (TLS first when
given a context, then ``deepfs.auth``'s handshake) before any request goes
out. A request runs under one deadline; past it, or on any error, the
connection is closed (a frame cut short would leave the stream mid-frame)
and the caller opens another. Payloads are received straight into the
caller's buffer.

Timeouts are the kernel's (``SO_RCVTIMEO`` / ``SO_SNDTIMEO`` on a blocking
socket), set to the request's whole timeout before its first send and
shortened to what is left before a receive only when that is clearly less
(``TIMEOUT_SLACK_S``): a request answered in one receive costs one ``send``
and one ``recv``, with no ``poll`` and no timeout change around them.
"""

from __future__ import annotations

import errno
import math
import socket
import ssl
import struct
import time
from typing import Any

from deepfs import frames
from deepfs.auth import AuthError, ClientHandshake, Credential
from deepfs.errors import os_error
from deepfs.frames import Op, ProtocolError
from deepfs.rpc._buffer import FrameBuffer
from deepfs.rpc._handshake import TlsRefused, tls_failure_is_permanent

RECEIVE_BUFFER_SIZE = 64 << 10
"""A blocking connection's receive buffer: its answers are one small frame at a time."""
TIMEOUT_SLACK_S = 0.01
"""How far past its deadline a receive may wait: kernel timeouts are only shortened to the
time left when they are longer than that by more than this (each change is two syscalls)."""


class BlockingFrameClient:
    """One authenticated connection, used by one thread at a time; see the module docstring.

    ``call`` and ``receive_answer`` raise the errno the peer answered with as an ``OSError``,
    ``TimeoutError`` past the deadline, ``ConnectionError`` or ``ProtocolError`` if the
    connection broke (``closed`` is then True); ``send_request`` the last three."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.address = address
        self._sock = sock
        self._frames = FrameBuffer(size=RECEIVE_BUFFER_SIZE)
        self._next_id = 1
        self._timeout_s = -1.0  # what the kernel timeouts are set to now
        self._asked: tuple[int, int] | None = None  # (op, request id) sent and not yet answered
        self._deadline = math.inf  # of that request
        self.closed = False

    @classmethod
    def connect(cls, host: str, port: int, timeout_s: float, *, credential: Credential | None = None,
                ssl_context: ssl.SSLContext | None = None) -> BlockingFrameClient:
        """Connect, then TLS and the handshake, all within ``timeout_s`` (``TimeoutError`` past it,
        ``AuthError`` if the peer refused ``credential``, ``TlsRefused`` if TLS failed for good)."""
        deadline = time.monotonic() + timeout_s
        address = f"{host}:{port}"
        sock = socket.create_connection((host, port), timeout=timeout_s)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if ssl_context is not None:
                try:
                    sock = ssl_context.wrap_socket(sock, server_hostname=host)
                except ssl.SSLError as exc:
                    if tls_failure_is_permanent(exc):
                        raise TlsRefused(address, exc) from None
                    raise
            sock.settimeout(None)  # blocking: the kernel keeps the time (module docstring)
            client = cls(sock, address)
            if credential is not None:
                client._handshake(credential, deadline)
        except BaseException:
            sock.close()
            raise
        return client

    def _handshake(self, credential: Credential, deadline: float) -> None:
        handshake = ClientHandshake(credential)
        body: dict[str, Any] = handshake.hello()
        for _ in range(2):
            try:
                reply, _ = self.call(Op.AUTH, body, None, deadline - time.monotonic())
            except OSError as exc:
                if isinstance(exc, ConnectionError | TimeoutError) or exc.errno != errno.EACCES:
                    raise
                raise AuthError(f"authentication with {self.address} failed: {exc.strerror or 'refused'}") from None
            except AuthError as exc:
                raise AuthError(f"authentication with {self.address} failed: {exc}") from None
            if body.get("proof") is None:
                body = handshake.answer(reply)
        if self._frames.buffered:
            self.close()
            raise ConnectionResetError(errno.ECONNRESET, f"{self.address} sent frames before the handshake finished")

    def call(self, op: int, body: Any, into: memoryview | None, timeout_s: float) -> tuple[Any, memoryview]:
        """Send one request (no payload) and wait up to ``timeout_s`` for its answer: (body,
        payload). The payload lands in ``into`` when it fits, else in a fresh buffer; the view
        returned says which."""
        self.send_request(op, body, timeout_s)
        return self.receive_answer(into)

    def send_request(self, op: int, body: Any, timeout_s: float) -> None:
        """The first half of ``call``: send the request, whose answer ``receive_answer`` waits
        for, within ``timeout_s`` from now. In between, a thread can send requests on other
        connections, so that their peers work at the same time."""
        if self.closed:
            raise ConnectionResetError(errno.ECONNRESET, f"connection to {self.address} is closed")
        if self._asked is not None:
            raise RuntimeError(f"a request to {self.address} is still unanswered")
        request_id = self._next_id
        self._next_id += 1
        self._deadline = time.monotonic() + timeout_s
        try:
            self._set_timeout(timeout_s)
            self._send(frames.encode_frame(op, request_id, body))
        except BaseException:
            self.close()
            raise
        self._asked = (op, request_id)

    def receive_answer(self, into: memoryview | None) -> tuple[Any, memoryview]:
        """The second half of ``call``: the answer to the request ``send_request`` sent."""
        if self._asked is None:
            raise RuntimeError(f"no request to {self.address} awaits an answer")
        op, request_id = self._asked
        self._asked = None
        try:
            header, reply, payload = self._receive(into, self._deadline)
        except BaseException:
            self.close()
            raise
        if header.request_id != request_id or header.op != op or not header.is_response:
            self.close()
            raise ProtocolError(f"{self.address} answered request {header.request_id} (op {header.op}); "
                                f"asked {request_id} (op {op})")
        if header.is_error:
            if not isinstance(reply, dict):
                reply = {}
            raise os_error(int(reply.get("errno", errno.EIO)), str(reply.get("msg") or ""))
        return reply, payload

    @property
    def answer_pending(self) -> bool:
        """A request was sent and its answer not received: the connection is mid-exchange, so
        only its sender may use it (or close it)."""
        return self._asked is not None

    def _set_timeout(self, timeout_s: float) -> None:
        """Kernel timeouts of ``timeout_s`` (``math.inf``: none) on sends and receives."""
        if timeout_s <= 0:
            raise TimeoutError(f"request to {self.address} timed out")
        if timeout_s != self._timeout_s:
            if timeout_s == math.inf:
                seconds, micros = 0, 0  # a zero timeval: no timeout
            else:
                seconds = int(timeout_s)
                micros = max(1, int((timeout_s - seconds) * 1e6)) if seconds == 0 else int((timeout_s - seconds) * 1e6)
            value = struct.pack("@ll", seconds, micros)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
            self._timeout_s = timeout_s

    def _shorten_timeout(self, deadline: float) -> None:
        """Before a receive: the kernel timeouts cut to the time left when it is shorter by more
        than ``TIMEOUT_SLACK_S`` (so the first receive right after a send changes nothing)."""
        left = deadline - time.monotonic()
        if left < self._timeout_s - TIMEOUT_SLACK_S:
            self._set_timeout(left)

    def _send(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except _TIMED_OUT as exc:
            raise TimeoutError(f"send to {self.address} timed out") from exc
        except OSError as exc:
            raise ConnectionResetError(errno.ECONNRESET, f"send to {self.address} failed: {exc}") from exc

    def _receive(self, into: memoryview | None, deadline: float) -> tuple[frames.FrameHeader, Any, memoryview]:
        buf = self._frames
        frame = buf.next_frame()
        while frame is None:
            self._shorten_timeout(deadline)
            count = self._recv_into(buf.receive_space())
            if not count:
                buf.closed()  # inside a frame: ProtocolError
                raise ConnectionResetError(errno.ECONNRESET, f"{self.address} closed the connection")
            buf.received(count)
            frame = buf.next_frame()
        header, reply = frame
        size = header.payload_len
        if not size:
            return header, reply, memoryview(b"")
        dest = into[:size] if into is not None and len(into) >= size else memoryview(bytearray(size))
        got = buf.take_payload(dest)
        while got < size:
            self._shorten_timeout(deadline)
            count = self._recv_into(dest[got:])
            if not count:
                raise ProtocolError(f"connection closed after {got} of {size} payload bytes")
            got += count
        return header, reply, dest

    def _recv_into(self, view: memoryview) -> int:
        try:
            return self._sock.recv_into(view)
        except _TIMED_OUT as exc:
            raise TimeoutError(f"{self.address} did not answer in time") from exc
        except OSError as exc:
            raise ConnectionResetError(errno.ECONNRESET, f"receive from {self.address} failed: {exc}") from exc

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._sock.close()


_TIMED_OUT = (BlockingIOError, TimeoutError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
"""What a blocking socket raises when its kernel timeout ends a send or receive (TLS: want-read/write)."""
