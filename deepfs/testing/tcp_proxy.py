"""A TCP proxy in front of one server that passes, blackholes or delays its traffic.

Network partitions cannot be made with the kernel here (no ``tc netem``, no
root-only iptables in tests), so a test puts this proxy between a client and
a server and tells it what the network does:

- ``pass_traffic()``: bytes flow both ways as they arrive (the default);
- ``blackhole()``: connections are still accepted, but nothing moves in
  either direction, on new and open connections alike: a peer behind a
  partition whose packets are dropped. Bytes sent meanwhile are held, not
  lost, like TCP retransmitting them; they arrive once the partition heals;
- ``delay(seconds)``: every chunk arrives ``seconds`` late (each way), in order,
  without limiting throughput (a long, fat link);
- ``drop_connections()``: close every open connection, as a crashed
  middlebox or peer would.

The proxy runs its own trio loop in a thread, so synchronous tests use it
like any object; use it as a context manager (or ``start``/``stop``).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Self

import trio

CHUNK_BYTES = 64 << 10
HELD_CHUNKS = 64  # per direction: back-pressure, so a delayed fast sender does not queue without bound


@dataclass(frozen=True, slots=True)
class _Mode:
    blackhole: bool = False
    delay_s: float = 0.0


class TcpProxy:
    """Listens on ``listen_host:listen_port`` (0: any free port) and relays to ``target_host:target_port``."""

    def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1",
                 listen_port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.host = listen_host
        self.port = listen_port
        self.connections_accepted = 0
        self._mode = _Mode()
        self._mode_changed = trio.Event()
        self._connections: set[trio.CancelScope] = set()
        self._token: trio.lowlevel.TrioToken | None = None
        self._cancel: trio.CancelScope | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None

    @property
    def address(self) -> str:
        """``host:port`` for clients to connect to instead of the server's."""
        return f"{self.host}:{self.port}"

    # ------------------------------------------------------ control (any thread)
    def pass_traffic(self) -> None:
        self._set_mode(_Mode())

    def blackhole(self) -> None:
        self._set_mode(_Mode(blackhole=True))

    def delay(self, seconds: float) -> None:
        self._set_mode(_Mode(delay_s=seconds))

    def drop_connections(self) -> None:
        self._in_loop(lambda: [scope.cancel() for scope in self._connections])

    def start(self, timeout_s: float = 10.0) -> Self:
        self._thread = threading.Thread(target=self._run, name=f"tcp-proxy-{self.target[1]}", daemon=True)
        self._thread.start()
        if not self._started.wait(timeout_s):
            raise TimeoutError(f"TCP proxy to {self.target} did not start within {timeout_s:g}s")
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        """Close the listener and every connection; wait for the proxy's thread."""
        if self._thread is None:
            return
        if self._cancel is not None:
            self._in_loop(self._cancel.cancel)
        self._thread.join(10)
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _set_mode(self, mode: _Mode) -> None:
        def apply() -> None:
            self._mode = mode
            self._mode_changed.set()
            self._mode_changed = trio.Event()

        self._in_loop(apply)

    def _in_loop(self, fn: Callable[[], object]) -> None:
        if self._token is None:
            raise RuntimeError("the proxy is not running")
        with contextlib.suppress(trio.RunFinishedError):  # stopped meanwhile: nothing left to change
            trio.from_thread.run_sync(fn, trio_token=self._token)

    # -------------------------------------------------------- the loop (its thread)
    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # noqa: BLE001 - reported by start(), which is waiting for it
            self._error = exc
            self._started.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        with trio.CancelScope() as self._cancel:
            async with trio.open_nursery() as nursery:
                self._started.set()
                await nursery.start(trio.serve_listeners, self._relay, listeners)

    async def _wait_while_blackholed(self) -> None:
        while self._mode.blackhole:
            await self._mode_changed.wait()

    async def _relay(self, client: trio.SocketStream) -> None:
        self.connections_accepted += 1
        with trio.CancelScope() as scope:
            self._connections.add(scope)
            try:
                async with client:
                    await self._wait_while_blackholed()
                    try:
                        server = await trio.open_tcp_stream(*self.target)
                    except OSError:
                        return  # the server is down: the client sees its connection closed
                    async with server, trio.open_nursery() as nursery:
                        nursery.start_soon(self._one_way, client, server)
                        nursery.start_soon(self._one_way, server, client)
            except* (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # one connection's end, never the proxy's
            finally:
                self._connections.discard(scope)

    async def _one_way(self, source: trio.SocketStream, sink: trio.SocketStream) -> None:
        """Relay one direction: a reader stamps chunks with when they may leave, a writer sends them then."""
        send, receive = trio.open_memory_channel[tuple[float, bytes]](HELD_CHUNKS)

        async def read() -> None:
            async with send:
                while True:
                    await self._wait_while_blackholed()
                    try:
                        data = await source.receive_some(CHUNK_BYTES)
                    except trio.BrokenResourceError:
                        data = b""
                    try:
                        await send.send((trio.current_time() + self._mode.delay_s, data))
                    except trio.BrokenResourceError:
                        return  # the writer gave up: the other end is gone
                    if not data:
                        return

        async def write() -> None:
            async with receive:
                async for due, data in receive:
                    await trio.sleep_until(due)
                    await self._wait_while_blackholed()
                    try:
                        if data:
                            await sink.send_all(data)
                        else:
                            await sink.send_eof()  # half-close: the other direction goes on
                            return
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            nursery.start_soon(write)
