"""The serving end: a frame server that runs each request as its own task.

Mental model: one reader per connection takes requests off the wire and
starts a task for each (at most ``max_in_flight`` at once), so one slow disk
read does not hold back the others; answers go back in whatever order they
finish. Requests the handler declares cheap (``inline``) are answered by the
reader itself, before it reads on: a task per request costs more than they do.
What a handler raises decides the answer: an ``OSError`` its errno, a
``ProtocolError`` closes the connection, anything else (a bug) ``EIO``.
A malformed frame closes that connection only and is logged; the listener
keeps serving everybody else (the bad-input policy of
``deepfs.messages.validate``).

Resources per peer are bounded (``ServerLimits``): a payload its op cannot
carry is refused on the header, before anything is allocated; large payloads
are received into memory committed as it fills; payload bytes of requests in
flight on one connection are capped (the reader stops reading past the cap);
a connection idle too long, a frame not completed in time and a peer over
its connection cap are closed.

With an ``authenticator`` (``deepfs.auth.KeyVerifier`` on metadata servers,
``TicketVerifier`` on storage nodes) every connection first runs the
handshake (``_handshake``: small frames, no payloads, ``handshake_timeout_s``);
only then is the full reader made, and every request's handler is told the
connection's identity. With an ``ssl_context`` the stream is TLS, its
handshake under the same timeout.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio

from deepfs import frames
from deepfs.auth import AuthError, Identity, Verifier
from deepfs.frames import FLAG_ERROR, FLAG_RESPONSE, FrameHeader, ProtocolError
from deepfs.rpc._handshake import refuse_plaintext_peer, server_handshake
from deepfs.rpc._pump import BlockingSender, ConnectionIdle, FrameReader, PayloadBuffer, Piece, send_frame

log = logging.getLogger(__name__)

INLINE_THREAD_NAME = "inline-conn"
"""The thread that serves a connection's inline requests is named this, then the peer's address."""

INLINE_STREAK = 8
"""With ``inline_threads``, a connection moves to a thread after this many inline requests in a
row (and back at the first request that is not): a peer that mixes in other requests stays on the
event loop instead of paying a hand-off to the thread and back every few requests."""

Handler = Callable[[int, Any, memoryview, Identity | None], Awaitable[tuple[Any, Sequence[Piece]]]]
"""``handler(op, body, payload, principal) -> (response_body, response_payload_pieces)``.

``principal`` is the identity the connection authenticated as; None when the
server runs without an authenticator (in-process harnesses only).

Raise OSError to answer with its errno (ENOSYS for an op it does not serve,
EINVAL for a bad body); raise ProtocolError to close the connection (the
peer sent something no valid client sends)."""

InlineHandler = Callable[[int, Any, Identity | None], "tuple[Any, Sequence[Piece]] | None"]
"""``inline(op, body, principal) -> (response_body, response_payload_pieces) | None``: the answer to
a request without a payload, computed at once on the connection's reader task (or, with
``inline_threads``, on the connection's own worker thread: it must then be thread-safe), or None
to serve it as usual (``Handler``, a task of its own). Errors as ``Handler``. For requests that
cost a few microseconds (a ping, a read the page cache serves): the connection reads nothing else
meanwhile."""

PayloadSent = Callable[[Sequence[Piece]], None]
"""``payload_sent(pieces)``: the server is done with a response's payload pieces."""

RequestDone = Callable[[int, float, int, int, int], None]
"""``request_done(op, elapsed_s, errno, payload_bytes_in, payload_bytes_out)`` after each answer
(errno 0: success), e.g. ``deepfs.metrics.RequestMetrics.observe``; called on the event loop, and
on connections' worker threads for inline requests with ``inline_threads``."""


@dataclass
class ServerLimits:
    """What one peer may hold of a server; every bound closes the connection, none answers an errno."""

    max_body: int = frames.DEFAULT_MAX_BODY
    max_payload: int = frames.DEFAULT_MAX_PAYLOAD
    max_in_flight: int = 64  # requests being served per connection
    # The largest payload each op may carry (ops not listed: none), decided on the header;
    # None: every op up to max_payload.
    payload_limits: Mapping[int, int] | None = None
    max_bytes_in_flight: int = 128 << 20  # payload bytes being served per connection (one frame may pass it)
    idle_timeout_s: float = 300.0  # no request in flight and no frame started this long: closed
    frame_timeout_s: float = 30.0  # a frame started must be complete this soon
    max_connections_per_peer: int = 64  # per peer IP address; 0: no cap
    refused_log_interval_s: float = 60.0  # at most one log line per refused peer this often


@dataclass
class _Connection:
    """Accounting of one connection, shared by its reader, its requests and its idle watchdog."""

    requests: int = 0
    payload_bytes: int = 0
    idle_since: float = 0.0
    payload_freed: trio.Event = field(default_factory=trio.Event)


class RefusalLog:
    """At most one log line per peer per ``interval_s``; the lines left out are counted in the next one."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self._clock = clock
        self._last: dict[str, tuple[float, int]] = {}  # peer -> (time of its last line, refusals since)

    def refused(self, peer: str) -> str | None:
        """The line to log for this refusal, or None while the peer's last line is recent."""
        now = self._clock()
        last, quiet = self._last.get(peer, (-math.inf, 0))
        if now - last < self.interval_s:
            self._last[peer] = (last, quiet + 1)
            return None
        if len(self._last) > 10_000:  # many peers: forget the old ones rather than grow
            self._last = {p: v for p, v in self._last.items() if now - v[0] < self.interval_s}
        self._last[peer] = (now, 0)
        return f" ({quiet} more refused since the last line)" if quiet else ""


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
      loop (or a connection's worker thread, see ``inline_threads``); it
      must be quick and must not raise (an exception is logged).

    ``inline`` (optional) answers the requests it takes on the reader task
    itself: no task, no nursery, the reply sent at once where the socket
    takes it; they count against ``max_in_flight`` and keep the connection
    busy (not idle) like any other request while they are served.
    ``inline_threads`` (with ``inline``): at most this many plain-TCP
    connections at once are served by a worker thread of their own after
    ``INLINE_STREAK`` inline requests in a row (``_serve_on_thread``), until
    a request ``inline`` does not take; 0: never.

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
        authenticator: Verifier | None = None,
        handshake_timeout_s: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
        inline: InlineHandler | None = None,
        inline_threads: int = 0,
    ) -> None:
        self.handler = handler
        self.inline = inline
        self._threads = trio.CapacityLimiter(inline_threads) if inline and inline_threads else None
        self.limits = limits or ServerLimits()
        self.name = name
        self.payload_buffer = payload_buffer
        self.payload_sent = payload_sent
        self.request_done = request_done
        self.authenticator = authenticator
        self.handshake_timeout_s = handshake_timeout_s
        self.ssl_context = ssl_context
        self.connections_rejected = 0
        self.connections_refused = 0  # over the per-peer cap
        self.connections_idle_closed = 0
        self.connections_unauthenticated = 0  # handshakes (TLS or ours) refused, failed or timed out
        self.connections = 0
        self._per_peer: dict[str, int] = {}
        self._refusals = RefusalLog(self.limits.refused_log_interval_s)
        self._auth_refusals = RefusalLog(self.limits.refused_log_interval_s)

    async def serve(self, host: str, port: int, *,
                    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self.serve_connection, listeners)

    async def serve_connection(self, stream: trio.abc.Stream) -> None:
        """Serve one connection until the peer closes it or sends garbage; never raises for either."""
        peer = _peer_name(stream)
        host = peer.rpartition(":")[0]
        cap = self.limits.max_connections_per_peer
        if host and cap and self._per_peer.get(host, 0) >= cap:
            self._refuse(host)
            with trio.CancelScope(shield=True):
                await stream.aclose()
            return
        if host:
            self._per_peer[host] = self._per_peer.get(host, 0) + 1
        self.connections += 1
        try:
            if self.ssl_context is not None:
                stream = trio.SSLStream(stream, self.ssl_context, server_side=True)
            send_lock = trio.Lock()
            principal: Identity | None = None
            if self.authenticator is not None or self.ssl_context is not None:
                admitted, principal = await self._authenticate(stream, send_lock, peer, host)
                if not admitted:
                    return
            await self._serve_authenticated(stream, send_lock, principal, peer)
        finally:
            self.connections -= 1
            if host:
                left = self._per_peer.pop(host) - 1
                if left:
                    self._per_peer[host] = left
            await _close(stream)

    async def _authenticate(self, stream: trio.abc.Stream, send_lock: trio.Lock, peer: str,
                            host: str) -> tuple[bool, Identity | None]:
        """The TLS handshake, then ours, both within ``handshake_timeout_s``: ``(True, the peer's
        identity)`` (None without an authenticator: TLS only), or ``(False, None)`` once the peer
        was refused (counted, logged at most once per ``refused_log_interval_s``, told why where it can be)."""
        reason = ""
        try:
            with trio.fail_after(self.handshake_timeout_s):
                if isinstance(stream, trio.SSLStream):
                    transport = stream.transport_stream
                    if isinstance(transport, trio.SocketStream) and await refuse_plaintext_peer(transport, send_lock):
                        raise _TlsFailed("the peer spoke without TLS (told so)")
                    try:
                        await stream.do_handshake()
                    except trio.BrokenResourceError as exc:
                        raise _TlsFailed(str(exc.__cause__ or exc)) from exc
                if self.authenticator is None:
                    return True, None
                principal = await server_handshake(stream, self.authenticator, send_lock)
                if principal is None:
                    log.debug("%s: %s closed the connection before authenticating", self.name, peer)
                    return False, None
                return True, principal
        except trio.TooSlowError:
            reason = f"handshake not completed within {self.handshake_timeout_s:g} s"
        except _TlsFailed as exc:
            reason = f"TLS handshake failed: {exc}"
        except AuthError as exc:
            reason = str(exc)
        except ProtocolError as exc:
            reason = f"bad frame: {exc}"
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            reason = f"connection ended during the handshake: {exc}"
        self.connections_unauthenticated += 1
        suffix = self._auth_refusals.refused(host or peer)
        if suffix is not None:
            log.warning("%s: refusing unauthenticated peer %s: %s%s", self.name, peer, reason, suffix)
        return False, None

    async def _serve_authenticated(self, stream: trio.abc.Stream, send_lock: trio.Lock,
                                   principal: Identity | None, peer: str) -> None:
        # A Semaphore, not a CapacityLimiter: tokens are taken by this reader task
        # and given back by the request's own task, which a limiter refuses.
        in_flight = trio.Semaphore(self.limits.max_in_flight)
        conn = _Connection(idle_since=trio.current_time())
        reader = FrameReader(stream, self.limits.max_body, self.limits.max_payload,
                             payload_limits=self.limits.payload_limits, lazy_payloads=True)
        async with trio.open_nursery() as nursery:
            # Connection errors are handled inside the nursery: trio wraps what
            # escapes a nursery in an ExceptionGroup, which no ``except`` here
            # would match, and the listener (every connection) would die.
            watchdog = trio.CancelScope()
            if self.limits.idle_timeout_s < math.inf:
                nursery.start_soon(self._close_when_idle, reader, conn, nursery.cancel_scope, watchdog, peer)
            try:
                await self._read_requests(stream, reader, nursery, send_lock, in_flight, conn, peer, principal)
            except ProtocolError as exc:
                self.connections_rejected += 1
                log.warning("%s: closing connection from %s: %s", self.name, peer, exc)
                nursery.cancel_scope.cancel()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                # OSError, not just ConnectionError: the zero-copy receive sees raw
                # socket errors (ETIMEDOUT, EHOSTUNREACH, …) that trio does not translate.
                log.debug("%s: connection from %s ended: %s", self.name, peer, exc)
                nursery.cancel_scope.cancel()
            else:
                watchdog.cancel()  # clean EOF: the requests in flight still get their answers

    def _refuse(self, host: str) -> None:
        self.connections_refused += 1
        suffix = self._refusals.refused(host)
        if suffix is not None:
            log.warning("%s: refusing a connection from %s: it has %d open, the cap is "
                        "max_connections_per_peer%s", self.name, host, self._per_peer.get(host, 0), suffix)

    async def _close_when_idle(self, reader: FrameReader, conn: _Connection, connection_scope: trio.CancelScope,
                               watchdog: trio.CancelScope, peer: str) -> None:
        """Close the connection once no request was in flight and no frame started for ``idle_timeout_s``.

        The peer may have sent a request the moment it is closed; that request was
        never read, so a client retries it on a new connection (it was not served)."""
        idle_s = self.limits.idle_timeout_s
        with watchdog:
            await self._wait_idle(reader, conn, idle_s)
            self.connections_idle_closed += 1
            log.debug("%s: closing connection from %s: idle for %g s", self.name, peer, idle_s)
            connection_scope.cancel()

    @staticmethod
    async def _wait_idle(reader: FrameReader, conn: _Connection, idle_s: float) -> None:
        while True:
            await trio.sleep_until(conn.idle_since + idle_s)
            now = trio.current_time()
            if conn.requests or reader.in_frame:
                await trio.sleep_until(now + idle_s)  # busy: look again later (idle_since moves on)
            elif now >= conn.idle_since + idle_s:
                return

    async def _read_requests(
        self,
        stream: trio.abc.Stream,
        reader: FrameReader,
        nursery: trio.Nursery,
        send_lock: trio.Lock,
        in_flight: trio.Semaphore,
        conn: _Connection,
        peer: str,
        principal: Identity | None,
    ) -> None:
        """Start one task per request until a clean EOF (or answer it here: ``inline``)."""
        frame_timeout_s = self.limits.frame_timeout_s
        max_bytes = self.limits.max_bytes_in_flight
        inline = self.inline
        # Inline requests served in a row on the event loop; from INLINE_STREAK on, with nothing
        # else in flight, the connection moves to a thread of its own (``_serve_on_thread``).
        streak = 0
        threads = self._threads if isinstance(stream, trio.SocketStream) else None  # not TLS, not in memory
        while True:
            handed = None
            if threads is not None and streak >= INLINE_STREAK and not conn.requests and threads.available_tokens:
                handed = await self._serve_on_thread(reader, conn, principal, peer)
                if handed is None:
                    return
                streak = 0
            try:  # read_frame has a schedule point for every frame: no checkpoint needed here
                in_flight.acquire_nowait()
            except trio.WouldBlock:
                await in_flight.acquire()
            while conn.payload_bytes >= max_bytes:  # stop reading until requests give their payloads back
                conn.payload_freed = trio.Event()
                await conn.payload_freed.wait()
            try:
                if handed is None:
                    frame = await reader.read_frame(self.payload_buffer, frame_timeout_s)
                else:  # a frame the thread did not serve: on to a task, with its payload
                    header, body, frame_left_s = handed
                    frame = header, body, await reader.finish_frame(header, body, self.payload_buffer, frame_left_s)
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
            conn.requests += 1
            if handed is None and inline is not None and not header.payload_len:
                try:
                    served = await self._answer_inline(inline, stream, send_lock, header, body, peer, principal)
                finally:
                    in_flight.release()
                    conn.requests -= 1
                    if not conn.requests:
                        conn.idle_since = trio.current_time()
                if served:
                    streak += 1
                    continue
                in_flight.acquire_nowait()  # released just now: free
                conn.requests += 1
            streak = 0  # a request served as a task of its own ends the run of inline ones
            conn.payload_bytes += header.payload_len
            nursery.start_soon(self._answer, stream, send_lock, in_flight, conn, header, body, payload, peer,
                               principal)

    async def _answer_inline(self, inline: InlineHandler, stream: trio.abc.Stream, send_lock: trio.Lock,
                             header: FrameHeader, body: Any, peer: str, principal: Identity | None) -> bool:
        """Answer a request on the reader task if ``inline`` takes it (True), as ``_answer`` would."""
        reply = self._inline_reply(inline, header, body, peer, principal)
        if reply is None:
            return False
        out_body, out_payload, flags = reply
        try:
            await send_frame(stream, send_lock, header.op, header.request_id, out_body, out_payload, flags)
        finally:  # a broken connection ends the reader (it raises here, or on its next read)
            if out_payload and self.payload_sent is not None:
                self._release(out_payload)
        return True

    def _inline_reply(self, inline: InlineHandler, header: FrameHeader, body: Any, peer: str,
                      principal: Identity | None) -> tuple[Any, Sequence[Piece], int] | None:
        """(body, payload, flags) of ``inline``'s answer, reported to ``request_done``; None if it
        does not take the request."""
        started = time.perf_counter()
        code = 0
        try:
            answer = inline(header.op, body, principal)
            if answer is None:
                return None
            out_body, out_payload = answer
            flags = FLAG_RESPONSE
        except ProtocolError:
            raise  # the reader closes the connection
        except Exception as exc:  # noqa: BLE001 - OSError: its errno; a bug: EIO, logged (_error_answer)
            code, out_body = self._error_answer(exc, header.op, peer)
            out_payload, flags = (), FLAG_RESPONSE | FLAG_ERROR
        if self.request_done is not None:
            self._report(header.op, time.perf_counter() - started, code, 0, out_payload)
        return out_body, out_payload, flags

    async def _serve_on_thread(self, reader: FrameReader, conn: _Connection, principal: Identity | None,
                               peer: str) -> tuple[FrameHeader, Any, float] | None:
        """Serve the connection's inline requests from a worker thread (``inline_threads``) until
        a frame comes that ``inline`` does not take: its header, body and what its frame timeout
        leaves for the payload; None once the peer closed the connection or left it idle."""
        conn.requests += 1  # busy for the idle watchdog: the thread keeps the idle timeout itself
        try:
            handed = await trio.to_thread.run_sync(self._inline_thread, reader, principal, peer,
                                                   thread_name=f"{INLINE_THREAD_NAME} {peer}", limiter=self._threads)
        except ConnectionIdle:
            self.connections_idle_closed += 1
            log.debug("%s: closing connection from %s: idle for %g s", self.name, peer, self.limits.idle_timeout_s)
            return None
        finally:
            conn.requests -= 1
            conn.idle_since = trio.current_time()
        return handed

    def _inline_thread(self, reader: FrameReader, principal: Identity | None,
                       peer: str) -> tuple[FrameHeader, Any, float] | None:
        """``_serve_on_thread``'s loop, in the worker thread: blocking socket calls, no event loop.

        Why: on the event loop each small request also pays trio's wake-up (epoll, a failed recv,
        the scheduler, the send lock); a thread blocked in ``recv`` on one socket pays none of it.
        Nothing else touches the connection meanwhile: no request of it is in flight. Answers to
        requests that arrived together (pipelined) go out together (``BlockingSender``)."""
        inline = self.inline
        assert inline is not None
        check_cancelled = trio.from_thread.check_cancelled
        idle_timeout_s, frame_timeout_s = self.limits.idle_timeout_s, self.limits.frame_timeout_s
        queued: list[Sequence[Piece]] = []  # payloads of the queued answers, given back once sent
        with reader.blocking(check_cancelled) as sender:
            try:
                while True:
                    frame = reader.buffered_frame()
                    if frame is None:
                        self._flush(sender, queued)
                        handed = reader.next_frame_blocking(idle_timeout_s, frame_timeout_s, check_cancelled)
                        if handed is None:
                            return None
                        header, body = handed[0], handed[1]
                    else:
                        header, body = frame
                        handed = header, body, frame_timeout_s
                    if header.flags & FLAG_RESPONSE:
                        raise ProtocolError("a client sent a response frame")
                    reply = None if header.payload_len else self._inline_reply(inline, header, body, peer, principal)
                    if reply is None:  # answered in order: what is queued goes first
                        self._flush(sender, queued)
                        return handed
                    out_body, out_payload, flags = reply
                    if out_payload and self.payload_sent is not None:
                        queued.append(out_payload)
                    if sender.add(header.op, header.request_id, out_body, out_payload, flags):
                        self._flush(sender, queued)
            except Exception:
                # The answers to the requests before the failing frame go out first, as they did
                # when each was sent at once (a broken connection takes them nowhere).
                with contextlib.suppress(OSError):
                    self._flush(sender, queued)
                raise
            finally:
                for payload in queued:  # not sent: the connection is closing
                    self._release(payload)

    def _flush(self, sender: BlockingSender, queued: list[Sequence[Piece]]) -> None:
        """Send the queued answers, then give their payloads back."""
        try:
            sender.flush()
        finally:
            for payload in queued:
                self._release(payload)
            queued.clear()

    async def _answer(
        self,
        stream: trio.abc.Stream,
        send_lock: trio.Lock,
        in_flight: trio.Semaphore,
        conn: _Connection,
        header: FrameHeader,
        body: Any,
        payload: memoryview,
        peer: str,
        principal: Identity | None,
    ) -> None:
        started = time.perf_counter()
        code = 0
        try:
            try:
                out_body, out_payload = await self.handler(header.op, body, payload, principal)
                flags = FLAG_RESPONSE
            except ProtocolError:
                raise
            except Exception as exc:  # noqa: BLE001 - OSError: its errno; a bug: EIO, logged (_error_answer)
                code, out_body = self._error_answer(exc, header.op, peer)
                out_payload, flags = (), FLAG_RESPONSE | FLAG_ERROR
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
            conn.requests -= 1
            if not conn.requests:
                conn.idle_since = trio.current_time()
            if header.payload_len:
                conn.payload_bytes -= header.payload_len
                conn.payload_freed.set()

    def _error_answer(self, exc: Exception, op: int, peer: str) -> tuple[int, dict[str, Any]]:
        """(errno, error body) a handler's exception is answered with: an ``OSError`` its errno,
        anything else (a bug in a handler, which must not take the server down) EIO, logged."""
        if isinstance(exc, OSError):
            code = exc.errno or errno.EIO
            return code, {"errno": code, "msg": exc.strerror or str(exc)}
        log.exception("%s: op %s from %s failed", self.name, op, peer, exc_info=exc)
        return errno.EIO, {"errno": errno.EIO, "msg": f"internal error: {exc}"}

    def _report(self, op: int, elapsed_s: float, code: int, bytes_in: int, pieces: Sequence[Piece]) -> None:
        assert self.request_done is not None
        bytes_out = sum(map(len, pieces)) if pieces else 0  # what send_frame announces as payload_len
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


class _TlsFailed(Exception):
    """The TLS handshake failed (bad certificate, not TLS at all)."""


async def _close(stream: trio.abc.Stream) -> None:
    """Close a connection even while cancelled; TLS's goodbye gets a second at most (the peer may
    not read). A TLS stream whose handshake never ran (a plaintext peer refused before it) runs
    it to say goodbye, and fails (the peer's bytes are not TLS, or it reset the connection): its
    socket is then closed without one. Nothing a peer does here may escape: it would end the listener."""
    broken = False
    with trio.CancelScope(shield=True) as scope:
        scope.deadline = trio.current_time() + 1.0
        try:
            await stream.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            broken = True
    if (scope.cancelled_caught or broken) and isinstance(stream, trio.SSLStream):
        with trio.CancelScope(shield=True):
            await stream.transport_stream.aclose()


def _peer_name(stream: trio.abc.Stream) -> str:
    """'host:port' of a TCP peer; '?' where the stream has no peer address (a memory stream)."""
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    sock = getattr(stream, "socket", None)
    if sock is None:
        return "?"
    try:
        host, port = sock.getpeername()[:2]
    except (OSError, ValueError, TypeError):
        return "?"
    return f"{host}:{port}"
