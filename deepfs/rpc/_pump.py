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
paths would have none. A connection served by a thread of its own is put
in blocking mode instead (``FrameReader.blocking``): its thread waits in
``recv`` and ``sendmsg`` themselves, and answers to pipelined requests go
out together (``BlockingSender``).
"""

from __future__ import annotations

import contextlib
import errno
import math
import mmap
import os
import socket
import struct
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
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
"""In blocking mode (``FrameReader.blocking``) waits for the socket end at least this often, to
ask ``on_wait`` whether to stop (a thread cannot be cancelled)."""


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
        self._recv_wait_s: float | None = None  # the socket's SO_RCVTIMEO once set (``blocking``)
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

    @contextlib.contextmanager
    def blocking(self, on_wait: Callable[[], None]) -> Iterator[BlockingSender]:
        """The connection in blocking mode, for a thread of its own that is its only user meanwhile:
        frames come from ``next_frame_blocking``, answers go out through the ``BlockingSender``
        yielded. Non-blocking again (as trio needs it) on exit.

        Why blocking: a blocking ``recv``/``sendmsg`` waits in the kernel, one system call per
        frame where a non-blocking socket needs a ``poll`` first. Waits still end every
        ``WAIT_SLICE_S`` (the socket's ``SO_RCVTIMEO``/``SO_SNDTIMEO``) so that ``on_wait`` is
        called (it may raise to stop, e.g. ``trio.from_thread.check_cancelled``)."""
        assert self._sock is not None, "blocking mode needs a socket stream"
        raw = self._sock._sock  # noqa: SLF001 - the socket itself: this thread is its only user meanwhile
        if self._recv_wait_s is None:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(WAIT_SLICE_S))
            self._set_recv_wait(raw, WAIT_SLICE_S)
        raw.setblocking(True)
        try:
            yield BlockingSender(raw, on_wait)
        finally:
            raw.setblocking(False)

    def _set_recv_wait(self, raw: socket.socket, wait_s: float) -> None:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(wait_s))
        self._recv_wait_s = wait_s

    def buffered_frame(self) -> tuple[FrameHeader, Any] | None:
        """Header and body of a frame received whole already (no system call), or None."""
        return self._frames.next_frame()

    def next_frame_blocking(self, idle_timeout_s: float, frame_timeout_s: float,
                            on_wait: Callable[[], None]) -> tuple[FrameHeader, Any, float] | None:
        """``read_frame`` in blocking mode (``blocking``) once ``buffered_frame`` found none, without
        its payload: header, body and the seconds its frame timeout leaves for the payload
        (``finish_frame``); None on a clean EOF between frames. ``ConnectionIdle`` when no frame
        started within ``idle_timeout_s``, ``ProtocolError`` when one started and was not complete
        within ``frame_timeout_s``; ``on_wait()`` is called at least every ``WAIT_SLICE_S`` while waiting."""
        assert self._sock is not None and self._recv_wait_s is not None, "next_frame_blocking needs blocking mode"
        buf = self._frames
        raw = self._sock._sock  # noqa: SLF001 - the socket itself: this thread is its only user meanwhile
        started = time.monotonic()  # of the wait for a frame; of the frame once its first bytes came
        first_wait_s = frame_timeout_s if buf.in_frame else idle_timeout_s
        if first_wait_s < self._recv_wait_s:
            self._set_recv_wait(raw, first_wait_s)
        while True:
            try:
                got = raw.recv_into(buf.receive_space())
            except BlockingIOError:  # nothing came within the socket's receive timeout
                on_wait()
                left_s = started + (frame_timeout_s if buf.in_frame else idle_timeout_s) - time.monotonic()
                if left_s <= 0:
                    if buf.in_frame:
                        raise ProtocolError(f"frame not completed within {frame_timeout_s:g} s") from None
                    raise ConnectionIdle(f"no request for {idle_timeout_s:g} s") from None
                if left_s < self._recv_wait_s:  # wake at the deadline, not a slice later
                    self._set_recv_wait(raw, left_s)
                continue
            if got == 0:
                buf.closed()  # inside a frame: raises
                return None
            frame_started = not buf.in_frame
            buf.received(got)
            frame = buf.next_frame()
            if frame is not None:
                if self._recv_wait_s != WAIT_SLICE_S:
                    self._set_recv_wait(raw, WAIT_SLICE_S)
                if not frame[0].payload_len:  # (all that is left to the caller is the payload)
                    return frame[0], frame[1], frame_timeout_s
                if not frame_started:
                    frame_timeout_s = max(0.0, started + frame_timeout_s - time.monotonic())
                return frame[0], frame[1], frame_timeout_s
            if frame_started:  # its frame timeout runs from its first bytes
                started = time.monotonic()

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


SEND_BATCH_BYTES = 256 << 10
"""``BlockingSender`` sends what it holds once this many bytes are queued (or ``_MAX_IOV`` pieces)."""


class BlockingSender:
    """Answers sent from a connection's own thread (``FrameReader.blocking``), the only sender
    meanwhile (so no lock): ``add`` queues a frame, ``flush`` sends what is queued with as few
    ``sendmsg`` calls as the kernel allows. A run of pipelined requests is answered with one
    system call instead of one per answer; the serving loop flushes before it waits for more
    requests, and once ``full``, so nothing waits on a request that has not arrived.

    A frame cut short raises with the stream left to its owner to close (``send_frame``'s reason)."""

    def __init__(self, raw: socket.socket, on_wait: Callable[[], None]) -> None:
        self._raw = raw
        self._on_wait = on_wait
        self._views: list[Buffer] = []
        self._queued = 0  # bytes

    def add(self, op: int, request_id: int, body: Any, payload: Sequence[Piece] = (), flags: int = 0) -> bool:
        """Queue one frame (a file range is read now: not worth a sendfile here); True once
        enough is queued to ``flush`` now."""
        pieces: list[Buffer] = []
        size = 0
        for piece in payload:
            if isinstance(piece, FileRange):
                piece = _read_range(piece)
            pieces.append(piece)
            size += len(piece)
        head = frames.encode_frame(op, request_id, body, size, flags)
        views = self._views
        views.append(head)
        views += pieces
        self._queued += len(head) + size
        return self._queued >= SEND_BATCH_BYTES or len(views) >= _MAX_IOV

    def flush(self) -> None:
        """Send everything queued, waiting for the peer to read as long as it takes (``on_wait``
        is called every ``WAIT_SLICE_S`` meanwhile, and may raise)."""
        views = self._views
        try:
            while views:
                try:
                    sent = self._raw.sendmsg(views[:_MAX_IOV] if len(views) > _MAX_IOV else views)
                except BlockingIOError:  # nothing taken within the socket's send timeout
                    self._on_wait()
                    continue
                if sent == self._queued:  # all of it (the usual case)
                    views.clear()
                else:
                    _drop_sent(views, sent)
                    self._queued -= sent
        except BaseException:
            views.clear()  # the caller gives the payloads back: nothing may send them later
            raise
        finally:
            self._queued = 0


def _drop_sent(views: list[Buffer], sent: int) -> None:
    """Remove the first ``sent`` bytes from ``views`` (whole pieces, then the front of one)."""
    done = 0
    while done < len(views) and sent >= len(views[done]):
        sent -= len(views[done])
        done += 1
    del views[:done]
    if sent:
        views[0] = memoryview(views[0]).cast("B")[sent:]


def _read_range(piece: FileRange) -> bytes:
    """A file range's bytes, read now (where no sendfile can send it); EIO if the file ends first."""
    data = os.pread(piece.fd, piece.length, piece.offset)
    if len(data) != piece.length:
        raise OSError(errno.EIO, "file ended before the range sent")
    return data


def _timeval(seconds: float) -> bytes:
    """A ``struct timeval`` for SO_RCVTIMEO/SO_SNDTIMEO; never zero (zero means: wait forever)."""
    micros = max(1000, round(seconds * 1e6))
    return struct.pack("@ll", micros // 1_000_000, micros % 1_000_000)


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
                piece = _read_range(piece)
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
