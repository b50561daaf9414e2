"""trio shell around ``deepfs.frames``: a pipelined client and a frame server.

Mental model: one TCP connection is a pipe many requests share. Requests are
written whole under a send lock; a single reader task per connection takes
responses off the wire and wakes the waiter whose ``request_id`` matches, so
answers may come back in any order. Response payloads are received straight
into a buffer the caller supplies (``into=``), or into a fresh ``bytearray``.

The server side runs each request of a connection as its own task (bounded
by ``max_in_flight``) so one slow disk read does not hold back the others.
A frame that fails validation closes that connection and is logged; the
listener keeps serving everybody else.
"""

from __future__ import annotations

import errno
import itertools
import logging
import math
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from deepfs import frames
from deepfs.errors import os_error
from deepfs.frames import FLAG_ERROR, FLAG_RESPONSE, HEADER_SIZE, FrameHeader, ProtocolError

log = logging.getLogger(__name__)

Buffer = bytes | bytearray | memoryview


@dataclass(frozen=True)
class FileRange:
    """A payload piece sent straight from a file (``sendfile``: page cache to
    socket, never through user space). The sender owns ``fd`` only for the
    send; whoever made the piece closes it (``FrameServer(payload_sent=...)``)."""

    fd: int
    offset: int
    length: int

    def __len__(self) -> int:
        return self.length


Piece = Buffer | FileRange


READ_BUFFER_SIZE = 256 << 10
"""Bytes a connection's reader asks the kernel for at once: many small frames per recv."""


class FrameReader:
    """Reads frames off one connection with as few system calls as possible.

    Small frames (headers, bodies, small payloads) are parsed out of one
    buffer filled by a single ``recv_into`` each time it runs dry, so a burst
    of pipelined requests costs one system call, not three per frame. A large
    payload is copied from the buffer only for the bytes already there; the
    rest is received straight into its destination (zero-copy). Sockets are
    read before waiting for readiness: waiting first costs an epoll round
    trip per call even when data is already queued.
    """

    def __init__(self, stream: trio.abc.ReceiveStream, max_body: int, max_payload: int,
                 buffer_size: int = READ_BUFFER_SIZE) -> None:
        self._stream = stream
        self._sock = stream.socket if isinstance(stream, trio.SocketStream) else None
        self._max_body = max_body
        self._max_payload = max_payload
        self._buf = bytearray(buffer_size)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0

    async def _recv_into(self, view: memoryview) -> int:
        if self._sock is None:
            chunk = await self._stream.receive_some(len(view))
            view[: len(chunk)] = chunk
            return len(chunk)
        raw = self._sock._sock  # noqa: SLF001 - zero-copy receive on trio's socket
        while True:
            try:
                return raw.recv_into(view)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._sock)

    async def _fill(self, need: int) -> bool:
        """Buffer at least ``need`` bytes; False on EOF before any byte of them."""
        if self._end - self._start >= need:
            return True
        if len(self._buf) - self._start < need:  # make room at the end
            held = self._end - self._start
            self._buf[:held] = self._view[self._start : self._end]
            self._start, self._end = 0, held
        while self._end - self._start < need:
            got = await self._recv_into(self._view[self._end :])
            if got == 0:
                if self._end == self._start:
                    return False
                raise ProtocolError(f"connection closed after {self._end - self._start} of {need} bytes")
            self._end += got
        return True

    async def _read_into(self, dest: memoryview) -> None:
        """Fill ``dest``: first from the buffer, then straight from the socket."""
        take = min(len(dest), self._end - self._start)
        dest[:take] = self._view[self._start : self._start + take]
        self._start += take
        got = take
        while got < len(dest):
            n = await self._recv_into(dest[got:])
            if n == 0:
                raise ProtocolError(f"connection closed after {got} of {len(dest)} bytes")
            got += n

    async def read_frame(
        self, payload_buffer: Callable[[FrameHeader, Any], memoryview | None] | None = None
    ) -> tuple[FrameHeader, Any, memoryview] | None:
        """One frame; None on a clean EOF between frames.

        ``payload_buffer(header, body)`` may return a memoryview of exactly
        ``payload_len`` bytes to receive the payload into; otherwise a
        bytearray is allocated.
        """
        await trio.lowlevel.checkpoint()  # a steady stream of frames must not starve other tasks
        if not await self._fill(HEADER_SIZE):
            return None
        head = bytes(self._view[self._start : self._start + HEADER_SIZE])
        header = frames.parse_header(head, self._max_body, self._max_payload)
        self._start += HEADER_SIZE
        if header.body_len <= len(self._buf):
            await self._fill(header.body_len)
            body_bytes = bytes(self._view[self._start : self._start + header.body_len])
            self._start += header.body_len
        else:
            big = bytearray(header.body_len)
            await self._read_into(memoryview(big))
            body_bytes = bytes(big)
        body = frames.decode_body(head, header, body_bytes)
        if not header.payload_len:
            return header, body, memoryview(b"")
        payload = payload_buffer(header, body) if payload_buffer is not None else None
        if payload is None or len(payload) != header.payload_len:
            payload = memoryview(bytearray(header.payload_len))
        await self._read_into(payload)
        return header, body, payload


async def send_frame(
    stream: trio.abc.SendStream,
    lock: trio.Lock,
    op: int,
    request_id: int,
    body: Any,
    payload: Sequence[Piece] = (),
    flags: int = 0,
) -> None:
    """Send header, body and payload pieces as one frame (no joining of payloads)."""
    payload_len = sum(len(p) for p in payload)
    head = frames.encode_frame(op, request_id, body, payload_len, flags)
    async with lock:
        if isinstance(stream, trio.SocketStream):
            pending: list[Buffer] = [head]
            for piece in payload:
                if isinstance(piece, FileRange):
                    await _send_vectored(stream, pending)
                    pending = []
                    await _send_file(stream, piece)
                else:
                    pending.append(piece)
            await _send_vectored(stream, pending)
        else:
            await stream.send_all(head)
            for piece in payload:
                if isinstance(piece, FileRange):
                    data = os.pread(piece.fd, piece.length, piece.offset)
                    if len(data) != piece.length:
                        raise OSError(errno.EIO, "file ended before the range sent")
                    piece = data
                await stream.send_all(piece)


async def _send_file(stream: trio.SocketStream, piece: FileRange) -> None:
    """sendfile() the range; try before waiting, like ``_send_vectored``."""
    sock = stream.socket
    offset, left = piece.offset, piece.length
    while left:
        try:
            sent = os.sendfile(sock.fileno(), piece.fd, offset, left)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        if sent == 0:  # the file is shorter than it said: the frame cannot be completed
            raise OSError(errno.EIO, f"file ended {left} bytes before the range sent")
        offset += sent
        left -= sent


async def _send_vectored(stream: trio.SocketStream, pieces: list[Buffer]) -> None:
    """sendmsg() the pieces without copying them together; try before waiting."""
    sock = stream.socket
    raw = sock._sock  # noqa: SLF001 - vectored send on trio's socket
    views = [memoryview(p).cast("B") for p in pieces if len(p)]
    while views:
        try:
            sent = raw.sendmsg(views[:64])
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        while sent:
            if sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0


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

    Create with ``await FrameClient.connect(nursery, host, port)``; the reader
    task lives in ``nursery``. After the connection breaks every waiter gets
    ``ConnectionError`` and ``closed`` turns True; callers reconnect.
    """

    def __init__(self, stream: trio.SocketStream, address: str, max_payload: int) -> None:
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
    ) -> FrameClient:
        with trio.fail_after(timeout_s):
            stream = await trio.open_tcp_stream(host, port)
        stream.setsockopt(6, 1, 1)  # TCP_NODELAY: small metadata frames must not wait
        client = cls(stream, f"{host}:{port}", max_payload)
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
            raise _remote_error(body, self.address)
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


def _remote_error(body: dict, address: str) -> OSError:
    """The errno a peer answered with, as the matching OSError subclass."""
    if not isinstance(body, dict):
        body = {}
    code = int(body.get("errno", errno.EIO))
    msg = str(body.get("msg") or "")
    return os_error(code, msg)


Handler = Callable[[int, Any, memoryview], Awaitable[tuple[Any, Sequence[Piece]]]]
"""``handler(op, body, payload) -> (response_body, response_payload_pieces)``.

Raise OSError to answer with its errno; raise ProtocolError to close the
connection (the peer sent something no valid client sends)."""


@dataclass
class ServerLimits:
    max_body: int = frames.DEFAULT_MAX_BODY
    max_payload: int = frames.DEFAULT_MAX_PAYLOAD
    max_in_flight: int = 64


PayloadSent = Callable[[Sequence[Piece]], None]
"""``payload_sent(pieces)``: the server is done with a response's payload pieces."""


class FrameServer:
    """Serve a handler over the framed protocol; one task per request.

    Buffers have a life cycle on both sides of a request:

    - ``payload_buffer(header, body)`` may supply the memory a request's
      payload is received into (see ``FrameReader.read_frame``);
    - ``payload_sent(pieces)`` is called with the payload pieces of each
      response that had any, once the server is done with them: after the
      last byte went to the kernel, or after the send failed or was
      cancelled (the peer vanished). A handler may thus answer from pooled
      buffers and have them given back here, never while they are still
      being sent. It is called exactly once per such response, on the event
      loop; it must be quick and must not raise (an exception is logged).
    """

    def __init__(
        self,
        handler: Handler,
        limits: ServerLimits | None = None,
        name: str = "server",
        payload_buffer: Callable[[FrameHeader, Any], memoryview | None] | None = None,
        payload_sent: PayloadSent | None = None,
    ) -> None:
        self.handler = handler
        self.limits = limits or ServerLimits()
        self.name = name
        self.payload_buffer = payload_buffer
        self.payload_sent = payload_sent
        self.connections_rejected = 0

    async def serve(self, host: str, port: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self.serve_connection, listeners)

    async def serve_connection(self, stream: trio.SocketStream) -> None:
        peer = _peer_name(stream)
        send_lock = trio.Lock()
        # A Semaphore, not a CapacityLimiter: tokens are taken by this reader task
        # and given back by the request's own task, which a limiter refuses.
        in_flight = trio.Semaphore(self.limits.max_in_flight)
        try:
            async with trio.open_nursery() as nursery:
                # Connection errors are handled inside the nursery: trio wraps what
                # escapes a nursery in an ExceptionGroup, which no ``except`` here
                # would match, and the listener (every connection) would die.
                try:
                    await self._read_requests(stream, nursery, send_lock, in_flight, peer)
                except ProtocolError as exc:
                    self.connections_rejected += 1
                    log.warning("%s: closing connection from %s: %s", self.name, peer, exc)
                    nursery.cancel_scope.cancel()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    # OSError, not just ConnectionError: the zero-copy receive sees raw
                    # socket errors (ETIMEDOUT, EHOSTUNREACH, …) that trio does not translate.
                    log.debug("%s: connection from %s ended: %s", self.name, peer, exc)
                    nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _read_requests(
        self,
        stream: trio.SocketStream,
        nursery: trio.Nursery,
        send_lock: trio.Lock,
        in_flight: trio.Semaphore,
        peer: str,
    ) -> None:
        """Start one task per request until a clean EOF."""
        reader = FrameReader(stream, self.limits.max_body, self.limits.max_payload)
        while True:
            await in_flight.acquire()
            try:
                frame = await reader.read_frame(self.payload_buffer)
            except BaseException:
                in_flight.release()
                raise
            if frame is None:
                in_flight.release()
                return
            header, body, payload = frame
            if header.is_response:
                in_flight.release()
                raise ProtocolError("a client sent a response frame")
            nursery.start_soon(self._answer, stream, send_lock, in_flight, header, body, payload, peer)

    async def _answer(
        self,
        stream: trio.SocketStream,
        send_lock: trio.Lock,
        in_flight: trio.Semaphore,
        header: FrameHeader,
        body: Any,
        payload: memoryview,
        peer: str,
    ) -> None:
        try:
            try:
                out_body, out_payload = await self.handler(header.op, body, payload)
                flags = FLAG_RESPONSE
            except ProtocolError:
                raise
            except OSError as exc:
                code = exc.errno or errno.EIO
                out_body, out_payload = {"errno": code, "msg": exc.strerror or str(exc)}, ()
                flags = FLAG_RESPONSE | FLAG_ERROR
            except Exception as exc:  # a bug in a handler must not take the server down
                log.exception("%s: op %s from %s failed", self.name, header.op, peer)
                out_body, out_payload = {"errno": errno.EIO, "msg": f"internal error: {exc}"}, ()
                flags = FLAG_RESPONSE | FLAG_ERROR
            try:
                await send_frame(stream, send_lock, header.op, header.request_id, out_body, out_payload, flags)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            finally:
                # sendmsg copies into the socket buffer, so once send_frame has
                # returned or raised nothing refers to the pieces any more.
                if out_payload and self.payload_sent is not None:
                    self._release(out_payload)
        except ProtocolError as exc:
            self.connections_rejected += 1
            log.warning("%s: closing connection from %s: %s", self.name, peer, exc)
            await stream.aclose()
        finally:
            in_flight.release()

    def _release(self, pieces: Sequence[Piece]) -> None:
        assert self.payload_sent is not None
        try:
            self.payload_sent(pieces)
        except Exception:  # a bug here must not take the connection (or the listener) down
            log.exception("%s: payload_sent failed", self.name)


def _peer_name(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "?"


def parse_address(address: str, default_port: int | None = None) -> tuple[str, int]:
    """'host:port' → (host, port), with a clear error for anything else."""
    host, sep, port = address.rpartition(":")
    if not sep:
        if default_port is None:
            raise ValueError(f"address {address!r} must be HOST:PORT")
        return address, default_port
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise ValueError(f"address {address!r} must be HOST:PORT") from None
