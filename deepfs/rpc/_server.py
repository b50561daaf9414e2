"""The serving end: a frame server that runs each request as its own task.

Mental model: one reader per connection takes requests off the wire and
starts a task for each (at most ``max_in_flight`` at once), so one slow disk
read does not hold back the others; answers go back in whatever order they
finish. What a handler raises decides the answer: an ``OSError`` its errno,
a ``ProtocolError`` closes the connection, anything else (a bug) ``EIO``.
A malformed frame closes that connection only and is logged; the listener
keeps serving everybody else (the bad-input policy of
``deepfs.messages.validate``).
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import trio

from deepfs import frames
from deepfs.frames import FLAG_ERROR, FLAG_RESPONSE, FrameHeader, ProtocolError
from deepfs.rpc._pump import FileRange, FrameReader, PayloadBuffer, Piece, send_frame

log = logging.getLogger(__name__)

Handler = Callable[[int, Any, memoryview], Awaitable[tuple[Any, Sequence[Piece]]]]
"""``handler(op, body, payload) -> (response_body, response_payload_pieces)``.

Raise OSError to answer with its errno (ENOSYS for an op it does not serve,
EINVAL for a bad body); raise ProtocolError to close the connection (the
peer sent something no valid client sends)."""

PayloadSent = Callable[[Sequence[Piece]], None]
"""``payload_sent(pieces)``: the server is done with a response's payload pieces."""

RequestDone = Callable[[int, float, int, int, int], None]
"""``request_done(op, elapsed_s, errno, payload_bytes_in, payload_bytes_out)`` after each answer
(errno 0: success), e.g. ``deepfs.metrics.RequestMetrics.observe``; called on the event loop."""


@dataclass
class ServerLimits:
    max_body: int = frames.DEFAULT_MAX_BODY
    max_payload: int = frames.DEFAULT_MAX_PAYLOAD
    max_in_flight: int = 64


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

    ``request_done`` (optional) is told about every answered request, once
    the handler returned (latency excludes the send); ``connections`` is the
    number of connections open now.

    ``serve`` listens on TCP; ``serve_connection`` serves any connected
    ``trio.abc.Stream`` (memory streams in tests).
    """

    def __init__(
        self,
        handler: Handler,
        limits: ServerLimits | None = None,
        name: str = "server",
        payload_buffer: PayloadBuffer | None = None,
        payload_sent: PayloadSent | None = None,
        request_done: RequestDone | None = None,
    ) -> None:
        self.handler = handler
        self.limits = limits or ServerLimits()
        self.name = name
        self.payload_buffer = payload_buffer
        self.payload_sent = payload_sent
        self.request_done = request_done
        self.connections_rejected = 0
        self.connections = 0

    async def serve(self, host: str, port: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self.serve_connection, listeners)

    async def serve_connection(self, stream: trio.abc.Stream) -> None:
        """Serve one connection until the peer closes it or sends garbage; never raises for either."""
        peer = _peer_name(stream)
        send_lock = trio.Lock()
        # A Semaphore, not a CapacityLimiter: tokens are taken by this reader task
        # and given back by the request's own task, which a limiter refuses.
        in_flight = trio.Semaphore(self.limits.max_in_flight)
        self.connections += 1
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
            self.connections -= 1
            with trio.CancelScope(shield=True):
                await stream.aclose()

    async def _read_requests(
        self,
        stream: trio.abc.Stream,
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
        stream: trio.abc.Stream,
        send_lock: trio.Lock,
        in_flight: trio.Semaphore,
        header: FrameHeader,
        body: Any,
        payload: memoryview,
        peer: str,
    ) -> None:
        started = time.perf_counter()
        code = 0
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
                code = errno.EIO
                out_body, out_payload = {"errno": errno.EIO, "msg": f"internal error: {exc}"}, ()
                flags = FLAG_RESPONSE | FLAG_ERROR
            if self.request_done is not None:
                self._report(header.op, time.perf_counter() - started, code, header.payload_len, out_payload)
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

    def _report(self, op: int, elapsed_s: float, code: int, bytes_in: int, pieces: Sequence[Piece]) -> None:
        assert self.request_done is not None
        bytes_out = sum(piece.length if isinstance(piece, FileRange) else memoryview(piece).nbytes for piece in pieces)
        try:
            self.request_done(op, elapsed_s, code, bytes_in, bytes_out)
        except Exception:  # a metrics bug must not cost an answer
            log.exception("%s: request_done failed", self.name)

    def _release(self, pieces: Sequence[Piece]) -> None:
        assert self.payload_sent is not None
        try:
            self.payload_sent(pieces)
        except Exception:  # a bug here must not take the connection (or the listener) down
            log.exception("%s: payload_sent failed", self.name)


def _peer_name(stream: trio.abc.Stream) -> str:
    """'host:port' of a TCP peer; '?' where the stream has no peer address (a memory stream)."""
    sock = getattr(stream, "socket", None)
    if sock is None:
        return "?"
    try:
        host, port = sock.getpeername()[:2]
    except (OSError, ValueError, TypeError):
        return "?"
    return f"{host}:{port}"
