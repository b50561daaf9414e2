"""The socket pump: moves frames between a ``FrameBuffer`` and a trio stream.

Mental model: the only module that touches sockets. Receiving reads as many
bytes as the kernel holds into the connection's ``FrameBuffer`` (one
``recv_into`` for a burst of frames) and large payloads straight into their
destination; sending writes header, body and payload pieces with one
``sendmsg`` (no joining of payloads) and file ranges with ``sendfile``
(page cache to socket, never through user space).

Sockets are tried before waiting for readiness: waiting first costs an
epoll round trip per call even when data is already queued. Any other
``trio.abc.Stream`` (a memory stream in tests, a ``trio.SSLStream``) works too,
through its ``receive_some`` / ``send_all``, with a copy where the zero-copy
paths would have none.
"""

from __future__ import annotations

import errno
import math
import mmap
import os
import select
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from deepfs import frames
from deepfs.frames import FrameHeader, ProtocolError
from deepfs.rpc._buffer import READ_BUFFER_SIZE, FrameBuffer

Buffer = bytes | bytearray | memoryview

_NO_PAYLOAD = memoryview(b"")
_MAX_IOV = 64  # pieces per sendmsg, well below any IOV_MAX
WAIT_SLICE_S = 0.25
"""The blocking functions (``next_frame_blocking``, ``send_frame_blocking``) wake at least this
often while they wait, to ask ``on_wait`` whether to stop (a thread cannot be cancelled)."""


class ConnectionIdle(Exception):
    """``FrameReader.next_frame_blocking``: no frame started within the idle timeout."""


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

PayloadBuffer = Callable[[FrameHeader, Any], memoryview | None]
"""``payload_buffer(header, body)``: memory of exactly ``payload_len`` bytes to receive
a frame's payload into, or None for a fresh bytearray."""


LAZY_PAYLOAD_BYTES = 1 << 20
"""With ``lazy_payloads``, payloads from this size up are received into a fresh
anonymous mapping when the caller supplies no memory: its pages are committed only as bytes arrive, so a
peer that announces a large payload and stalls pins only what it sent."""


class FrameReader:
    """Reads frames off one stream with as few system calls as possible.

    ``payload_limits`` (see ``FrameBuffer``) refuses, on the header, a payload
    its op cannot carry; ``lazy_payloads`` (servers) receives large payloads
    into memory committed as it fills (``LAZY_PAYLOAD_BYTES``)."""

    def __init__(self, stream: trio.abc.ReceiveStream, max_body: int, max_payload: int,
                 buffer_size: int = READ_BUFFER_SIZE, payload_limits: Mapping[int, int] | None = None,
                 lazy_payloads: bool = False) -> None:
        self._stream = stream
        self._lazy = lazy_payloads
        self._sock = stream.socket if isinstance(stream, trio.SocketStream) else None
        self._waited = False  # this frame has passed a schedule point (see read_frame)
        self._poller: select.poll | None = None  # next_frame_blocking's, made on its first call
        self._frames = FrameBuffer(max_body, max_payload, buffer_size, payload_limits)

    @property
    def in_frame(self) -> bool:
        """Part of a frame has been received (the frame timeout runs)."""
        return self._frames.in_frame

    @property
    def buffered(self) -> int:
        """Received bytes not taken yet."""
        return self._frames.buffered

    async def _recv_into(self, view: memoryview) -> int:
        if self._sock is None:
            chunk = await self._stream.receive_some(len(view))
            view[: len(chunk)] = chunk
            return len(chunk)
        raw = self._sock._sock  # noqa: SLF001 - zero-copy receive on trio's socket
        while True:
            try:
                got = raw.recv_into(view)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._sock)
                self._waited = True
            else:
                if not self._waited:  # bytes were there at once: let other tasks run first (fairness)
                    await trio.lowlevel.checkpoint()
                    self._waited = True
                return got

    async def read_frame(
            self, payload_buffer: PayloadBuffer | None = None,
            frame_timeout_s: float = math.inf) -> tuple[FrameHeader, Any, memoryview] | None:
        """One frame (header, body, payload); None on a clean EOF between frames.

        ``payload_buffer`` may supply the memory the payload is received into.
        Waiting for a frame's first byte is not bounded here (the caller's idle
        timeout); once it came, the rest must arrive within ``frame_timeout_s``
        or ``ProtocolError`` is raised. Frames that arrive whole cost no timer."""
        # A steady stream of frames must not starve other tasks: every frame costs a schedule
        # point, the wait for its bytes where there was one, else a checkpoint.
        self._waited = self._sock is None  # receive_some is a checkpoint itself
        buf = self._frames
        frame = buf.next_frame()
        if frame is not None:
            await trio.lowlevel.checkpoint()
            self._waited = True
        if frame is None and not buf.in_frame:
            got = await self._recv_into(buf.receive_space())
            if got == 0:
                buf.closed()
                return None
            buf.received(got)
            frame = buf.next_frame()
        payload = _NO_PAYLOAD
        got = 0
        if frame is not None:
            header, body = frame
            if not header.payload_len:
                return header, body, _NO_PAYLOAD
            payload = _payload_memory(header, body, payload_buffer, self._lazy)
            got = buf.take_payload(payload)
            if got == len(payload):
                return header, body, payload
        with trio.move_on_after(frame_timeout_s):
            if frame is None:
                header, body = await self._rest_of_frame()
                if not header.payload_len:
                    return header, body, _NO_PAYLOAD
                payload = _payload_memory(header, body, payload_buffer, self._lazy)
                got = buf.take_payload(payload)
            await self._rest_of_payload(payload, got)
            return header, body, payload
        raise ProtocolError(f"frame not completed within {frame_timeout_s:g} s")

    async def finish_frame(self, header: FrameHeader, body: Any, payload_buffer: PayloadBuffer | None,
                           frame_left_s: float) -> memoryview:
        """The payload of a frame whose header and body ``next_frame_blocking`` returned; the rest
        must arrive within ``frame_left_s`` (what its frame timeout left), else ``ProtocolError``."""
        if not header.payload_len:
            return _NO_PAYLOAD
        payload = _payload_memory(header, body, payload_buffer, self._lazy)
        got = self._frames.take_payload(payload)
        if got == len(payload):
            return payload
        self._waited = self._sock is None
        with trio.move_on_after(frame_left_s):
            await self._rest_of_payload(payload, got)
            return payload
        raise ProtocolError("frame not completed within its frame timeout")

    def next_frame_blocking(self, idle_timeout_s: float, frame_timeout_s: float,
                            on_wait: Callable[[], None]) -> tuple[FrameHeader, Any, float] | None:
        """``read_frame`` for a thread of its own on a socket stream, without its payload: header,
        body and the seconds its frame timeout leaves for the payload (``finish_frame``); None on
        a clean EOF between frames. Waits in ``poll`` (no event loop): ``ConnectionIdle`` when no
        frame started within ``idle_timeout_s``, ``ProtocolError`` when one started and was not
        complete within ``frame_timeout_s``; ``on_wait()`` is called at least every
        ``WAIT_SLICE_S`` while waiting (it may raise to stop, e.g. ``trio.from_thread.check_cancelled``)."""
        assert self._sock is not None, "next_frame_blocking needs a socket stream"
        buf = self._frames
        started = time.monotonic()
        frame = buf.next_frame()
        if frame is not None:
            return frame[0], frame[1], frame_timeout_s
        raw = self._sock._sock  # noqa: SLF001 - the socket itself: this thread is its only user meanwhile
        poller = self._poller
        if poller is None:
            poller = self._poller = select.poll()
            poller.register(raw.fileno(), select.POLLIN)
        while True:
            deadline = started + (frame_timeout_s if buf.in_frame else idle_timeout_s)
            left_s = deadline - time.monotonic()
            if left_s <= 0:
                if buf.in_frame:
                    raise ProtocolError(f"frame not completed within {frame_timeout_s:g} s")
                raise ConnectionIdle(f"no request for {idle_timeout_s:g} s")
            if not poller.poll(math.ceil(min(left_s, WAIT_SLICE_S) * 1000)):
                on_wait()
                continue
            try:
                got = raw.recv_into(buf.receive_space())
            except BlockingIOError:  # a wake-up without bytes after all
                continue
            if got == 0:
                buf.closed()  # inside a frame: raises
                return None
            if not buf.in_frame:
                started = time.monotonic()  # the first bytes of a frame: its frame timeout runs from here
            buf.received(got)
            frame = buf.next_frame()
            if frame is not None:
                return frame[0], frame[1], max(0.0, started + frame_timeout_s - time.monotonic())

    async def _rest_of_frame(self) -> tuple[FrameHeader, Any]:
        buf = self._frames
        while (frame := buf.next_frame()) is None:
            got = await self._recv_into(buf.receive_space())
            if got == 0:
                buf.closed()  # inside a frame: raises
                raise ProtocolError("connection closed inside a frame")
            buf.received(got)
        return frame

    async def _rest_of_payload(self, payload: memoryview, got: int) -> None:
        while got < len(payload):
            n = await self._recv_into(payload[got:])
            if n == 0:
                raise ProtocolError(f"connection closed after {got} of {len(payload)} payload bytes")
            got += n


def _payload_memory(header: FrameHeader, body: Any, payload_buffer: PayloadBuffer | None, lazy: bool) -> memoryview:
    payload = payload_buffer(header, body) if payload_buffer is not None else None
    if payload is not None and len(payload) == header.payload_len:
        return payload
    if lazy and header.payload_len >= LAZY_PAYLOAD_BYTES:
        return memoryview(mmap.mmap(-1, header.payload_len, flags=mmap.MAP_PRIVATE))
    return memoryview(bytearray(header.payload_len))


async def send_frame(
    stream: trio.abc.SendStream,
    lock: trio.Lock,
    op: int,
    request_id: int,
    body: Any,
    payload: Sequence[Piece] = (),
    flags: int = 0,
) -> None:
    """Send header, body and payload pieces as one frame (no joining of payloads).

    A frame cut short (a timeout or cancellation mid-send, a failed read of a
    file range) leaves the peer inside it: whatever followed on that
    connection would be parsed as the rest of this frame. So the stream is
    closed before the error goes on, and both ends see a broken connection
    instead of garbage."""
    payload_len = sum(map(len, payload)) if payload else 0
    head: Buffer = frames.encode_frame(op, request_id, body, payload_len, flags)
    if not lock.locked() and isinstance(stream, trio.SocketStream):
        # Nobody is sending on this connection: hand the whole frame to the kernel with one
        # sendmsg before taking the lock (taking a trio Lock costs more than sending a small
        # reply). Nothing awaits between the check and the send, so no other frame can start
        # meanwhile; what the kernel did not take goes out under the lock as usual.
        try:
            rest = _send_at_once(stream, head, payload)
        except BaseException:
            with trio.CancelScope(shield=True):
                await stream.aclose()
            raise
        if rest is not None:
            if not rest:
                return
            head, payload = rest[0], rest[1:]
    # An uncontended send takes the lock without a schedule point, so a frame the kernel
    # takes at once costs no trip through the scheduler (the reply of a small request).
    try:
        lock.acquire_nowait()
    except trio.WouldBlock:
        await lock.acquire()
    try:
        await _send_pieces(stream, head, payload)
    except BaseException:
        with trio.CancelScope(shield=True):
            await stream.aclose()
        raise
    finally:
        lock.release()


def _send_at_once(stream: trio.SocketStream, head: Buffer, payload: Sequence[Piece]) -> list[Buffer] | None:
    """One non-blocking sendmsg of the whole frame: the pieces the kernel did not take (all of
    them if it took nothing), or None, untried, when the frame has a file range or many pieces."""
    pieces: list[Buffer] = [head]
    for piece in payload:
        if isinstance(piece, FileRange):
            return None
        pieces.append(piece)
    if len(pieces) > _MAX_IOV:
        return None
    try:
        sent = stream.socket._sock.sendmsg(pieces)  # noqa: SLF001 - vectored send on trio's socket
    except BlockingIOError:
        return pieces
    while pieces and sent >= len(pieces[0]):
        sent -= len(pieces.pop(0))
    if sent:
        pieces[0] = memoryview(pieces[0]).cast("B")[sent:]
    return pieces


def send_frame_blocking(stream: trio.SocketStream, op: int, request_id: int, body: Any,
                        payload: Sequence[Piece] = (), flags: int = 0,
                        on_wait: Callable[[], None] = lambda: None) -> None:
    """``send_frame`` from a thread of its own, the only sender on the connection meanwhile (so no
    lock); waits for the socket in ``poll``, calling ``on_wait`` every ``WAIT_SLICE_S`` (it may raise).
    A frame cut short raises with the stream left to its owner to close (``send_frame``'s reason)."""
    pieces: list[Buffer] = []
    for piece in payload:
        if isinstance(piece, FileRange):  # not worth a sendfile here: read it
            data = os.pread(piece.fd, piece.length, piece.offset)
            if len(data) != piece.length:
                raise OSError(errno.EIO, "file ended before the range sent")
            piece = data
        pieces.append(piece)
    head = frames.encode_frame(op, request_id, body, sum(map(len, pieces)), flags)
    raw = stream.socket._sock  # noqa: SLF001 - vectored send on trio's socket
    views: list[Buffer] = [head, *pieces]
    poller: select.poll | None = None
    while views:
        try:
            sent = raw.sendmsg(views[:_MAX_IOV])
        except BlockingIOError:
            if poller is None:
                poller = select.poll()
                poller.register(raw.fileno(), select.POLLOUT)
            if not poller.poll(WAIT_SLICE_S * 1000):
                on_wait()
            continue
        while views and sent >= len(views[0]):
            sent -= len(views.pop(0))
        if sent:
            views[0] = memoryview(views[0]).cast("B")[sent:]


async def _send_pieces(stream: trio.abc.SendStream, head: Buffer, payload: Sequence[Piece]) -> None:
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
            sent = raw.sendmsg(views[:_MAX_IOV])
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
