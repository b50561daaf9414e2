"""The requesting end of a connection: a pipelined client.

Mental model: one connection is a pipe many requests share. Requests are
written whole under a send lock; a single reader task per connection takes
responses off the wire and wakes the waiter whose ``request_id`` matches, so
answers may come back in any order. Response payloads are received straight
into a buffer the caller supplies (``into=``), or into a fresh ``bytearray``.

``connect`` optionally wraps the connection in TLS and authenticates
(``deepfs.rpc._handshake``) before the reader task starts, so no request
ever goes out on a connection the server has not accepted.
"""

from __future__ import annotations

import errno
import itertools
import logging
import math
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from deepfs import frames
from deepfs.auth import Credential
from deepfs.errors import os_error
from deepfs.frames import FrameHeader, ProtocolError
from deepfs.rpc._handshake import client_handshake
from deepfs.rpc._pump import Buffer, FrameReader, send_frame

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    done: trio.Event = field(default_factory=trio.Event)
    into: memoryview | None = None
    header: FrameHeader | None = None
    body: Any = None
    payload: memoryview | None = None
    failure: BaseException | None = None


class FrameClient:
    """One pipelined connection to a framed server.

    Create with ``await FrameClient.connect(nursery, host, port)`` (TCP), or
    ``FrameClient.over_stream(nursery, stream, address)`` over any connected
    ``trio.abc.Stream`` (memory streams in tests). The reader task lives in
    ``nursery``. After the connection breaks every waiter gets
    ``ConnectionError`` and ``closed`` turns True; callers reconnect.
    """

    def __init__(self, stream: trio.abc.Stream, address: str, max_payload: int) -> None:
        self.address = address
        self._stream = stream
        self._send_lock = trio.Lock()
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._max_payload = max_payload
        self.closed = False

    @classmethod
    async def connect(
        cls,
        nursery: trio.Nursery,
        host: str,
        port: int,
        max_payload: int = frames.DEFAULT_MAX_PAYLOAD,
        timeout_s: float = 5.0,
        *,
        credential: Credential | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> FrameClient:
        """Connect, then TLS (``ssl_context``, checking the certificate names ``host``) and the
        handshake (``credential``), all within ``timeout_s``.

        ``AuthError`` ("authentication with H:P failed: <reason>") if the server refused the
        credential or could not prove it knows the secret; ``trio.TooSlowError`` past ``timeout_s``."""
        address = f"{host}:{port}"
        with trio.fail_after(timeout_s):
            sock_stream = await trio.open_tcp_stream(host, port)
            sock_stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small frames must not wait
            stream: trio.abc.Stream = sock_stream
            try:
                if ssl_context is not None:
                    stream = trio.SSLStream(sock_stream, ssl_context, server_hostname=host)
                    try:
                        await stream.do_handshake()
                    except trio.BrokenResourceError as exc:
                        raise ConnectionResetError(
                            errno.ECONNRESET, f"TLS handshake with {address} failed: {exc.__cause__ or exc}") from exc
                if credential is not None:
                    await client_handshake(stream, credential, address)
            except BaseException:
                with trio.CancelScope(shield=True):
                    await sock_stream.aclose()
                raise
        return cls.over_stream(nursery, stream, address, max_payload)

    @classmethod
    def over_stream(
        cls,
        nursery: trio.Nursery,
        stream: trio.abc.Stream,
        address: str,
        max_payload: int = frames.DEFAULT_MAX_PAYLOAD,
    ) -> FrameClient:
        """A client over a connected ``stream``, its reader task started in ``nursery``.

        ``address`` only names the peer in errors and logs. A
        ``trio.SocketStream`` gets the zero-copy paths; any other stream
        works through ``receive_some`` / ``send_all``."""
        client = cls(stream, address, max_payload)
        nursery.start_soon(client._read_loop)
        return client

    async def call(
        self,
        op: int,
        body: Any,
        payload: Sequence[Buffer] = (),
        into: memoryview | None = None,
        timeout_s: float = math.inf,
    ) -> tuple[Any, memoryview]:
        """Send one request and wait for its response (body, payload view).

        Raises the errno the peer answered with as an ``OSError`` subclass,
        ``ConnectionError`` if the connection broke, ``trio.TooSlowError``
        past ``timeout_s``.
        """
        if self.closed:
            raise ConnectionResetError(errno.ECONNRESET, f"connection to {self.address} is closed")
        request_id = next(self._ids)
        pending = _Pending(into=into)
        self._pending[request_id] = pending
        try:
            with trio.fail_after(timeout_s):
                try:
                    await send_frame(self._stream, self._send_lock, op, request_id, body, payload)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    await self._fail_all(exc)
                    raise ConnectionResetError(errno.ECONNRESET, f"send to {self.address} failed: {exc}") from exc
                await pending.done.wait()
        finally:
            self._pending.pop(request_id, None)
        if pending.failure is not None:
            raise ConnectionResetError(
                errno.ECONNRESET, f"connection to {self.address} broke: {pending.failure}"
            ) from pending.failure
        assert pending.header is not None and pending.payload is not None
        if pending.header.is_error:
            body = pending.body or {}
            raise _remote_error(body)
        return pending.body, pending.payload

    def _payload_buffer(self, header: FrameHeader, _body: Any) -> memoryview | None:
        pending = self._pending.get(header.request_id)
        if pending is not None and pending.into is not None and len(pending.into) >= header.payload_len:
            return pending.into[: header.payload_len]
        return None

    async def _read_loop(self) -> None:
        failure: BaseException = ConnectionResetError("closed")
        reader = FrameReader(self._stream, frames.DEFAULT_MAX_BODY, self._max_payload)
        try:
            while True:
                frame = await reader.read_frame(self._payload_buffer)
                if frame is None:
                    failure = ConnectionResetError(f"{self.address} closed the connection")
                    break
                header, body, payload = frame
                pending = self._pending.get(header.request_id)
                if pending is None:
                    continue  # the waiter timed out and left
                pending.header, pending.body, pending.payload = header, body, payload
                pending.done.set()
        except (ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            failure = exc
            if not self.closed:  # not our own aclose()
                log.warning("connection to %s failed: %s", self.address, exc)
        await self._fail_all(failure)

    async def _fail_all(self, failure: BaseException) -> None:
        self.closed = True
        for pending in list(self._pending.values()):
            if not pending.done.is_set():
                pending.failure = failure
                pending.done.set()
        with trio.CancelScope(shield=True):
            await self._stream.aclose()

    async def aclose(self) -> None:
        await self._fail_all(ConnectionResetError("closed by the client"))


def _remote_error(body: Any) -> OSError:
    """The errno a peer answered with, as the matching OSError subclass."""
    if not isinstance(body, dict):
        body = {}
    code = int(body.get("errno", errno.EIO))
    msg = str(body.get("msg") or "")
    return os_error(code, msg)
