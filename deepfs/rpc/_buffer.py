"""Frames out of received bytes: the receive side of the protocol, without I/O.

Mental model: one buffer per connection that the socket pump fills
(``receive_space`` / ``received``) and ``next_frame`` empties, a frame at a
time. A burst of pipelined frames arrives in one receive and comes out as
many frames, so small frames cost no system call each. Payloads are not
kept here: after ``next_frame`` returned a header, the caller takes the
payload's first bytes with ``take_payload`` and receives the rest straight
into its destination (zero-copy for large payloads), then asks for the next
frame.

Rules: a frame the peer got wrong raises ``ProtocolError`` (``deepfs.frames``);
so does a frame announcing a payload its op cannot carry (``payload_limits``),
decided on the header alone, before anything is allocated for it; a body
larger than the buffer is gathered in a buffer of its own, never by growing
this one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from deepfs import frames
from deepfs.frames import HEADER_SIZE, FrameHeader, ProtocolError

READ_BUFFER_SIZE = 256 << 10
"""Bytes a connection asks the kernel for at once: many small frames per receive."""


class FrameBuffer:
    """Received bytes of one connection, parsed into frames.

    Use: ``while (frame := buf.next_frame()) is None: n = recv_into(buf.receive_space());
    buf.received(n)`` (``buf.closed()`` when ``n`` is 0), then move the frame's
    ``payload_len`` bytes out with ``take_payload`` and, for what that did not
    cover, straight from the connection.
    """

    def __init__(self, max_body: int = frames.DEFAULT_MAX_BODY, max_payload: int = frames.DEFAULT_MAX_PAYLOAD,
                 size: int = READ_BUFFER_SIZE, payload_limits: Mapping[int, int] | None = None) -> None:
        """``payload_limits``: the largest payload each op may carry (an op not
        listed carries none); None: every op up to ``max_payload``."""
        self._max_body = max_body
        self._max_payload = max_payload
        self._payload_limits = payload_limits
        self._buf = bytearray(size)
        self._view = memoryview(self._buf)
        self._start = 0  # first unparsed byte
        self._end = 0  # end of the received bytes
        self._head = b""  # header bytes of a frame whose body is still incomplete
        self._header: FrameHeader | None = None  # that frame's header
        self._big: memoryview | None = None  # the body of that frame, when it is larger than the buffer
        self._big_got = 0

    @property
    def buffered(self) -> int:
        """Received bytes not taken yet."""
        return self._end - self._start

    @property
    def in_frame(self) -> bool:
        """Some bytes of a frame were received, not all of them (payloads excepted)."""
        return self._header is not None or self._start != self._end

    def next_frame(self) -> tuple[FrameHeader, Any] | None:
        """Header and decoded body of the next frame, or None until more bytes arrive."""
        header = self._header
        if header is None:
            start = self._start
            if self._end - start < HEADER_SIZE:
                return None
            view = self._view
            head_view = view[start : start + HEADER_SIZE]
            header = frames.parse_header(head_view, self._max_body, self._max_payload)
            if self._payload_limits is not None and header.payload_len:
                check_payload_allowed(header, self._payload_limits)
            body_end = start + HEADER_SIZE + header.body_len
            if body_end <= self._end:  # the whole frame is here (the usual case): decode it in place
                self._start = body_end
                return header, frames.decode_body(head_view, header, view[start + HEADER_SIZE : body_end])
            self._start += HEADER_SIZE
            self._head, self._header = bytes(head_view), header
            if header.body_len > len(self._buf):
                self._big = memoryview(bytearray(header.body_len))
                self._big_got = self.take_payload(self._big)
        if self._big is not None:
            if self._big_got < header.body_len:
                return None
            body_bytes = bytes(self._big)
            self._big, self._big_got = None, 0
        else:
            if self._end - self._start < header.body_len:
                return None
            body_bytes = bytes(self._view[self._start : self._start + header.body_len])
            self._start += header.body_len
        self._header = None
        return header, frames.decode_body(self._head, header, body_bytes)

    def receive_space(self) -> memoryview:
        """Where the next receive should put its bytes (never empty while a frame waits for more).

        Buffered bytes move to the front only when the frame being waited for
        would not fit behind them."""
        if self._big is not None and self._big_got < len(self._big):
            return self._big[self._big_got :]
        if self._start == self._end:
            self._start = self._end = 0
        need = HEADER_SIZE if self._header is None else self._header.body_len
        if len(self._buf) - self._start < need:
            held = self._end - self._start
            self._buf[:held] = self._view[self._start : self._end]
            self._start, self._end = 0, held
        return self._view[self._end :]

    def received(self, count: int) -> None:
        """``count`` bytes were written at the start of the last ``receive_space``."""
        if self._big is not None and self._big_got < len(self._big):
            self._big_got += count
        else:
            self._end += count

    def take_payload(self, dest: memoryview) -> int:
        """Move up to ``len(dest)`` buffered bytes into ``dest``; how many there were."""
        take = min(len(dest), self._end - self._start)
        dest[:take] = self._view[self._start : self._start + take]
        self._start += take
        return take

    def closed(self) -> None:
        """The peer closed the connection: fine between frames, ProtocolError inside one."""
        if self._header is not None or self._start != self._end:
            held = self._end - self._start + self._big_got + (HEADER_SIZE if self._header is not None else 0)
            raise ProtocolError(f"connection closed inside a frame ({held} bytes of it received)")


def check_payload_allowed(header: FrameHeader, payload_limits: Mapping[int, int]) -> None:
    """ProtocolError unless ``header``'s op may carry a payload of ``header.payload_len`` bytes."""
    limit = payload_limits.get(header.op, 0)
    if header.payload_len > limit:
        what = "no payload" if not limit else f"at most {limit} payload bytes"
        raise ProtocolError(f"op {header.op} carries {what}, the frame announces {header.payload_len}")
