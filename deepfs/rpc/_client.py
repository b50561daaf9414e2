"""The requesting end of a connection: a pipelined client.

Mental model: one connection is a pipe many requests share; answers come back
in any order, matched by ``request_id``. A request is written whole: tried at
once with one ``sendmsg``, finished under the send lock if the kernel took
only part of it (requests behind it wait for the lock). On a busy connection
(more than ``BATCH_FROM`` requests waiting) requests without payload that
tasks ask in one scheduler batch go out together, in one send at its end: the
tasks a burst of answers wakes ask their next requests all at once.

Over a TCP socket the task waiting for an answer reads the connection itself:
one waiter at a time is the *reader*; it takes frames off the wire, hands each
to its waiter, and once its own answer came passes the reading on to a waiter
still parked. A lone request (queue depth 1) thus costs one wake-up, with no
task between its caller and the socket. What was received of a frame is kept
in the connection, not in the reader's stack: a reader that leaves halfway
through a frame (its timeout) leaves the rest to the next one, and the rest of
a payload whose waiter left goes to scratch memory, never into memory its
caller has back. Over any other stream (TLS, memory streams in tests) a
background task is the only reader.

Timeouts: each connection has one background task that keeps time (no
cancel scope per request, which would cost more than a small request). It
sleeps until the earliest deadline of the requests waiting, fails those past
it, and wakes the reader out of its wait for the socket if the reader is one
of them. While no request runs for a while (``IDLE_WATCH_S``) it watches the
socket itself, so a connection the server closes as idle is known closed.
A send that has to wait (a full socket buffer) runs under its own deadline.

Response payloads are received straight into a buffer the caller supplies
(``into=``), or into a fresh ``bytearray``.

``connect`` optionally wraps the connection in TLS and authenticates
(``deepfs.rpc._handshake``) before any request goes out, so no request ever
goes out on a connection the server has not accepted.
"""

from __future__ import annotations

import errno
import itertools
import logging
import math
import socket
import ssl
from collections.abc import Sequence
from typing import Any, NoReturn

import trio

from deepfs import frames
from deepfs.auth import Credential
from deepfs.errors import os_error
from deepfs.frames import FrameHeader, ProtocolError
from deepfs.rpc._buffer import READ_BUFFER_SIZE, FrameBuffer
from deepfs.rpc._handshake import TlsRefused, client_handshake, tls_failure_is_permanent
from deepfs.rpc._pump import Buffer, FileRange, send_frame

log = logging.getLogger(__name__)

IDLE_WATCH_S = 1.0
"""A connection without requests for this long (up to twice as long) is watched for the peer closing it."""

_NO_PAYLOAD = memoryview(b"")
_MAX_IOV = 64  # pieces per sendmsg, well below any IOV_MAX
BATCH_FROM = 2
"""A request without payload that finds more requests than this waiting on its connection
is sent with the others of its scheduler batch (``FrameClient._send_batch``)."""
_BROKEN = (ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError, OSError)
"""What reading or writing a broken connection raises."""


class _Woken(Exception):
    """The reader was woken out of its wait for the socket to look at its deadline."""


class _Pending:
    """One request waiting for its answer."""

    __slots__ = ("body", "deadline", "done", "failure", "header", "into", "payload", "sending", "task",
                 "timed_out")

    def __init__(self, into: memoryview | None) -> None:
        self.into = into
        self.deadline = math.inf
        self.task: trio.lowlevel.Task | None = None  # parked, to be woken: answered, or to read
        self.sending = False  # a send that waits, under its own deadline
        self.done = False
        self.timed_out = False
        self.header: FrameHeader | None = None
        self.body: Any = None
        self.payload: memoryview = _NO_PAYLOAD
        self.failure: BaseException | None = None


class _Incoming:
    """A frame whose payload is partly received (kept between readers)."""

    __slots__ = ("body", "dest", "got", "header", "lent")

    def __init__(self, header: FrameHeader, body: Any, dest: memoryview, got: int, lent: _Pending | None) -> None:
        self.header, self.body, self.dest, self.got = header, body, dest, got
        self.lent = lent  # whose ``into`` memory ``dest`` is (None: a fresh buffer)


class FrameClient:
    """One pipelined connection to a framed server.

    Create with ``await FrameClient.connect(nursery, host, port)`` (TCP), or
    ``FrameClient.over_stream(nursery, stream, address)`` over any connected
    ``trio.abc.Stream`` (memory streams in tests). The connection's background
    task lives in ``nursery``. After the connection breaks every waiter gets
    ``ConnectionError`` and ``closed`` turns True; callers reconnect.
    """

    def __init__(self, stream: trio.abc.Stream, address: str, max_payload: int) -> None:
        self.address = address
        self._stream = stream
        self._sock = stream.socket if isinstance(stream, trio.SocketStream) else None
        # The stdlib socket under trio's: sends and receives are tried on it before waiting.
        self._raw: socket.socket | None = None if self._sock is None else self._sock._sock  # type: ignore[attr-defined]  # noqa: SLF001
        self._send_lock = trio.Lock()
        self._slow_sends = 0  # sends holding or waiting for the send lock: none may be tried past them
        self._outbox: list[bytes] | None = None  # frames of a batch waiting to be sent (_send_batch)
        self.batched_sends = 0  # sends of batched requests, and the requests they carried (tests, benchmarks)
        self.batched_frames = 0
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._frames = FrameBuffer(frames.DEFAULT_MAX_BODY, max_payload, READ_BUFFER_SIZE)
        self._incoming: _Incoming | None = None
        self._reading = False  # a task is receiving frames (only one may)
        self._leader: _Pending | None = None  # the request whose task reads now
        self._wakes = 0  # times the reader was woken to look at its deadline
        self._calls = 0  # requests started: the idle watch starts after none for a while
        self._timer = trio.CancelScope()  # the background task's sleep (or idle watch)
        self._timer_at = math.inf  # when it ends by itself
        self._watching = False  # the background task reads the idle connection
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
        credential or could not prove it knows the secret; ``TlsRefused`` if TLS failed in a way a
        retry would repeat (``tls_failure_is_permanent``); ``trio.TooSlowError`` past ``timeout_s``."""
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
                        if tls_failure_is_permanent(exc.__cause__):  # retrying would fail the same way
                            raise TlsRefused(address, exc.__cause__) from None
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
        """A client over a connected ``stream``, its background task started in ``nursery``.

        ``address`` only names the peer in errors and logs. A
        ``trio.SocketStream`` gets the direct paths (callers read their own
        answers, zero-copy); any other stream works through ``receive_some`` /
        ``send_all``, read by the background task."""
        client = cls(stream, address, max_payload)
        nursery.start_soon(client._background)
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
        pending = _Pending(into)
        self._pending[request_id] = pending
        self._calls += 1
        if timeout_s < math.inf:
            pending.deadline = trio.current_time() + timeout_s
        if pending.deadline < self._timer_at or self._watching:
            self._timer.cancel()  # the background task would sleep past this deadline, or reads
        try:
            await self._send(op, request_id, body, payload, pending)
            while not pending.done:
                if self._reading or self._raw is None:
                    await self._park(pending)  # answered, timed out, or handed the reading
                else:
                    await self._read_until(pending)
        finally:
            del self._pending[request_id]
        if pending.timed_out:
            raise trio.TooSlowError
        if pending.failure is not None:
            raise ConnectionResetError(
                errno.ECONNRESET, f"connection to {self.address} broke: {pending.failure}"
            ) from pending.failure
        header = pending.header
        assert header is not None
        if header.flags & frames.FLAG_ERROR:
            raise _remote_error(pending.body or {})
        return pending.body, pending.payload

    # ---------------------------------------------------------------- send
    async def _send(self, op: int, request_id: int, body: Any, payload: Sequence[Buffer], pending: _Pending) -> None:
        """One request's frame out: tried at once with one ``sendmsg``, queued into a batch on a
        busy connection (``_send_batch``), or finished under the send lock (``_send_waiting``)."""
        raw = self._raw
        if raw is None or (payload and any(isinstance(p, FileRange) for p in payload)):
            await self._send_frame(op, request_id, body, payload, pending)
            return
        payload_len = sum(len(p) for p in payload) if payload else 0
        head = frames.encode_frame(op, request_id, body, payload_len)
        if not payload and not self._slow_sends:  # a read, a ping: perhaps one of a batch
            if self._outbox is not None:
                self._outbox.append(head)  # the batch's sender sends it
                return
            if len(self._pending) > BATCH_FROM:
                await self._send_batch(head, pending)
                return
        pieces: list[Buffer] = [head, *payload] if payload else [head]
        sent = 0
        if not self._slow_sends and len(pieces) <= _MAX_IOV:
            try:
                sent = raw.sendmsg(pieces)
            except BlockingIOError:
                pass
            except OSError as exc:
                await self._send_failed(exc)
            if sent == len(head) + payload_len:
                return
        await self._send_waiting(pieces, sent, pending)

    async def _send_batch(self, head: bytes, pending: _Pending) -> None:
        """Send ``head`` with the frames other tasks queue until the scheduler's next batch.

        Many requests waiting means their answers arrive in bursts, and the tasks a burst
        wakes ask their next requests in the same scheduler batch: this task's frame waits
        for the end of it, and one send carries them all. A task whose frame was queued may
        leave (cancelled, timed out): its frame still goes out whole and its answer is
        dropped, as for any waiter that left. This task leaves only once it sent them."""
        outbox = self._outbox = [head]
        await trio.lowlevel.cancel_shielded_checkpoint()
        self._outbox = None
        self.batched_sends += 1
        self.batched_frames += len(outbox)
        data = b"".join(outbox) if len(outbox) > 1 else head
        sent = 0
        if not self._slow_sends:  # (else a frame is under way: this one goes behind it)
            assert self._raw is not None
            try:
                sent = self._raw.send(data)
            except BlockingIOError:
                pass
            except OSError as exc:
                await self._send_failed(exc)
            if sent == len(data):
                return
        # The rest waits for the socket (or the lock) within this request's deadline, and
        # not for this task's cancellation: the frames of the others are in it. Frames not
        # sent in time fail the connection, so their tasks know at once.
        with trio.CancelScope(shield=True):
            try:
                await self._send_waiting([data], sent, pending)
            except trio.TooSlowError:
                if len(outbox) > 1:
                    await self._fail_all(ConnectionResetError("a batch of requests could not be sent in time"))
                raise

    async def _send_failed(self, exc: OSError) -> NoReturn:
        """A send the kernel refused (not for a full buffer): the connection is broken."""
        await self._fail_all(exc)
        raise ConnectionResetError(errno.ECONNRESET, f"send to {self.address} failed: {exc}") from exc

    async def _send_frame(self, op: int, request_id: int, body: Any, payload: Sequence[Buffer],
                          pending: _Pending) -> None:
        """Any stream, and file ranges: ``send_frame`` under the request's deadline."""
        pending.sending = True
        try:
            with trio.CancelScope(deadline=pending.deadline) as scope:
                await send_frame(self._stream, self._send_lock, op, request_id, body, payload)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            await self._fail_all(exc)
            raise ConnectionResetError(errno.ECONNRESET, f"send to {self.address} failed: {exc}") from exc
        finally:
            pending.sending = False
        if scope.cancelled_caught:  # (a frame cut short: send_frame closed the stream, and the reader sees it)
            raise trio.TooSlowError

    async def _send_waiting(self, pieces: list[Buffer], sent: int, pending: _Pending) -> None:
        """The rest of a frame the kernel took ``sent`` bytes of (none if the send lock was
        held), holding the send lock, within the request's deadline.

        A frame cut short (a timeout, a cancellation) would leave the peer inside it, and
        whatever followed would be parsed as its rest: the connection is closed instead."""
        assert self._sock is not None and self._raw is not None
        pending.sending = True
        self._slow_sends += 1
        try:
            with trio.CancelScope(deadline=pending.deadline) as scope:
                if sent:
                    self._send_lock.acquire_nowait()  # free: nothing awaited since it was checked
                else:
                    await self._send_lock.acquire()
                try:
                    await self._send_rest(pieces, sent)
                finally:
                    self._send_lock.release()
        finally:
            pending.sending = False
            self._slow_sends -= 1
        if scope.cancelled_caught:
            raise trio.TooSlowError

    async def _send_rest(self, pieces: list[Buffer], sent: int) -> None:
        assert self._sock is not None and self._raw is not None
        started = sent > 0
        try:
            views = [memoryview(p).cast("B") for p in pieces]
            while views:
                while views and sent >= len(views[0]):
                    sent -= len(views.pop(0))
                if sent:
                    views[0], sent = views[0][sent:], 0
                if not views:
                    return
                try:
                    sent = self._raw.sendmsg(views[:_MAX_IOV])
                    started = True
                except BlockingIOError:
                    wakes = self._wakes
                    try:
                        await trio.lowlevel.wait_writable(self._raw)
                    except trio.ClosedResourceError:
                        if self._wakes == wakes or self.closed:
                            raise
        except BaseException as exc:
            if started or isinstance(exc, Exception):
                await self._fail_all(exc if isinstance(exc, Exception) else ConnectionResetError("request cut short"))
            if isinstance(exc, _BROKEN):
                raise ConnectionResetError(errno.ECONNRESET, f"send to {self.address} failed: {exc}") from exc
            raise

    # ------------------------------------------------------------- receive
    async def _park(self, pending: _Pending) -> None:
        pending.task = trio.lowlevel.current_task()

        def abort(_: Any) -> trio.lowlevel.Abort:
            pending.task = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    @staticmethod
    def _wake(pending: _Pending) -> None:
        task = pending.task
        if task is not None:
            pending.task = None
            trio.lowlevel.reschedule(task)

    async def _read_until(self, pending: _Pending) -> None:
        """Be the reader until ``pending`` is answered (or past its deadline), then hand the reading on."""
        self._reading = True
        self._leader = pending
        try:
            while not pending.done:
                try:
                    if not await self._receive_one():
                        await self._fail_all(ConnectionResetError(f"{self.address} closed the connection"))
                except _Woken:
                    pass
        except _BROKEN as exc:
            if not self.closed:  # not our own aclose()
                log.warning("connection to %s failed: %s", self.address, exc)
            await self._fail_all(exc)
        finally:
            self._reading = False
            self._leader = None
            self._hand_over()

    def _hand_over(self) -> None:
        """Wake a parked waiter to read next, if one is still waiting."""
        if self.closed:
            return
        for pending in self._pending.values():
            if pending.task is not None and not pending.done:
                self._wake(pending)
                return

    async def _receive_one(self) -> bool:
        """Receive the next frame (or the rest of the one under way) and hand it to its
        waiter; False at a clean end of the connection between frames."""
        incoming = self._incoming
        if incoming is None:
            buf = self._frames
            frame = buf.next_frame()
            while frame is None:
                got = await self._recv(buf.receive_space())
                if got == 0:
                    buf.closed()  # inside a frame: raises
                    return False
                buf.received(got)
                frame = buf.next_frame()
            header, body = frame
            size = header.payload_len
            if not size:
                self._deliver(header, body, _NO_PAYLOAD)
                return True
            owner = self._pending.get(header.request_id)
            into = None if owner is None else owner.into
            if into is not None and len(into) >= size:
                dest, lent = into[:size], owner
            else:
                dest, lent = memoryview(bytearray(size)), None
            got = buf.take_payload(dest)
            if got == size:
                self._deliver(header, body, dest)
                return True
            incoming = self._incoming = _Incoming(header, body, dest, got, lent)
        while incoming.got < len(incoming.dest):
            if incoming.lent is not None and self._pending.get(incoming.header.request_id) is not incoming.lent:
                incoming.dest, incoming.lent = memoryview(bytearray(len(incoming.dest))), None  # its waiter left
            got = await self._recv(incoming.dest[incoming.got :])
            if got == 0:
                raise ProtocolError(f"connection closed after {incoming.got} of {len(incoming.dest)} payload bytes")
            incoming.got += got
        self._incoming = None
        self._deliver(incoming.header, incoming.body, incoming.dest)
        return True

    async def _recv(self, view: memoryview) -> int:
        raw = self._raw
        if raw is None:
            chunk = await self._stream.receive_some(len(view))
            view[: len(chunk)] = chunk
            return len(chunk)
        while True:
            try:
                return raw.recv_into(view)
            except BlockingIOError:
                wakes = self._wakes
                try:
                    await trio.lowlevel.wait_readable(raw)
                except trio.ClosedResourceError:
                    if self._wakes == wakes or self.closed:
                        raise
                    raise _Woken from None

    def _deliver(self, header: FrameHeader, body: Any, payload: memoryview) -> None:
        pending = self._pending.get(header.request_id)
        if pending is None or pending.done:
            return  # the waiter timed out and left
        pending.header, pending.body, pending.payload = header, body, payload
        pending.done = True
        self._wake(pending)

    # ---------------------------------------------------------- background
    async def _background(self) -> None:
        """Keeps time for the requests; the only reader of a stream that is no socket."""
        if self._raw is None:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_while, None)
                await self._keep_time()
        else:
            await self._keep_time()

    async def _keep_time(self) -> None:
        """Fail requests past their deadline; over a socket, watch it while idle (module docstring)."""
        calls, check_at = self._calls, trio.current_time() + IDLE_WATCH_S
        while not self.closed:
            now = trio.current_time()
            wake_at = self._expire(now)
            if self._raw is not None:
                if now >= check_at:
                    if self._calls == calls and not self._reading and not self._pending:
                        await self._watch_idle()
                        now = trio.current_time()
                    calls, check_at = self._calls, now + IDLE_WATCH_S
                    continue
                wake_at = min(wake_at, check_at)
            self._timer = trio.CancelScope(deadline=wake_at)
            self._timer_at = wake_at
            with self._timer:
                await trio.sleep_forever()
            self._timer_at = -math.inf  # awake: nothing to wake

    def _expire(self, now: float) -> float:
        """Fail the waiting requests past their deadline; the earliest deadline left."""
        earliest = math.inf
        for pending in self._pending.values():
            if pending.done or pending.sending:
                continue
            if pending.deadline <= now:
                pending.done = pending.timed_out = True
                if pending.task is not None:
                    self._wake(pending)
                elif pending is self._leader and self._raw is not None:
                    self._wakes += 1  # it waits for the socket: wake it with a ClosedResourceError
                    trio.lowlevel.notify_closing(self._raw)
            elif pending.deadline < earliest:
                earliest = pending.deadline
        return earliest

    async def _watch_idle(self) -> None:
        """Read the idle connection until a request starts (which wakes this)."""
        self._timer = trio.CancelScope()
        self._timer_at = math.inf
        self._watching = True
        try:
            with self._timer:
                await self._read_while(self._calls)
        finally:
            self._watching = False
            self._timer_at = -math.inf

    async def _read_while(self, calls: int | None) -> None:
        """Read frames for good (None), or while no request was started since ``calls``
        of them were: the next request then takes over the reading."""
        self._reading = True
        try:
            while calls is None or self._calls == calls:
                await trio.lowlevel.checkpoint()  # a steady stream of frames must not starve other tasks
                try:
                    if not await self._receive_one():
                        await self._fail_all(ConnectionResetError(f"{self.address} closed the connection"))
                        return
                except _Woken:
                    pass  # meant for a reader before this one
        except _BROKEN as exc:
            if not self.closed:  # not our own aclose()
                log.warning("connection to %s failed: %s", self.address, exc)
            await self._fail_all(exc)
        finally:
            self._reading = False
            self._hand_over()

    async def _fail_all(self, failure: BaseException) -> None:
        if not self.closed:
            self.closed = True
            self._timer.cancel()
            for pending in list(self._pending.values()):
                if not pending.done:
                    pending.failure = failure
                    pending.done = True
                    self._wake(pending)
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
