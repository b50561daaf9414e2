"""``deepfs.Client``: the synchronous facade for plain scripts and threads.

A trio loop runs on a background thread and owns the AsyncClient; every
method hands its coroutine to that loop and blocks until it returns. Calls
from many threads are fine: they run concurrently inside the one loop.
Small reads of files opened read-only (``File.read``/``pread``/``readinto``,
``Client.pread``, the bytes of ``read_file``) skip the loop: the calling
thread sends them itself on blocking connections (``_direct``), and only what
that cannot serve goes through the loop. Closing a file opened read-only
(``File.close``, ``read_file``, fsspec's files) has nothing to flush: the close
is handed to the loop without waiting for it (``close_file``).
"""

from __future__ import annotations

import errno
import functools
import io
import os
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import outcome
import trio

from deepfs.auth import Key
from deepfs.client._core import AsyncClient
from deepfs.client._direct import MAX_DIRECT_BYTES, DirectReads
from deepfs.client._file import AsyncFile
from deepfs.concurrency import sole_exception
from deepfs.config import ClientConfig
from deepfs.layout import Layout

T = TypeVar("T")


class Client:
    """Connect to the cluster whose metadata server listens on ``meta_address``: "host:port", or
    several of its metadata servers, "h1:7700,h2:7700" (the client fails over between them within
    ``ClientConfig.meta_failover_s``; mutations are retried idempotently).

    >>> with deepfs.Client("127.0.0.1:7700", key="~/alice.key") as fs:
    ...     with fs.open("/data/x.bin", "wb") as f:
    ...         f.write(b"hello")

    ``key``: a ``deepfs.auth.Key`` or a key file's path; by default
    ``config.key_file``, ``$DEEPFS_KEY``, then ``~/.config/deepfs/key``
    (``AuthError`` if there is none, or the cluster refuses it).
    """

    def __init__(self, meta_address: str, config: ClientConfig | None = None, *,
                 key: Key | str | os.PathLike[str] | None = None) -> None:
        self.meta_address = meta_address
        self._key = key
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._async: AsyncClient | None = None
        self._failure: BaseException | None = None
        self._dispatcher: _Dispatcher | None = None
        self._direct: DirectReads | None = None
        self._thread = threading.Thread(target=self._run, args=(config,), name="deepfs-client", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._failure is not None:
            raise self._failure

    def _run(self, config: ClientConfig | None) -> None:
        async def main() -> None:
            try:
                async with AsyncClient.connect(self.meta_address, config, key=self._key) as client, \
                        trio.open_nursery() as workers:
                    self._async = client
                    self._dispatcher = _Dispatcher(workers)
                    self._token = trio.lowlevel.current_trio_token()
                    self._direct = DirectReads(client.stripes, self._token.run_sync_soon)
                    self._stop = trio.Event()
                    self._ready.set()
                    await self._stop.wait()
                    self._dispatcher.close()
            except BaseException as exc:
                if not self._ready.is_set():
                    self._failure = _unwrap(exc)
                else:
                    raise

        try:
            trio.run(main)
        except BaseException as exc:  # noqa: BLE001 - reported to the waiting constructor
            self._failure = self._failure or _unwrap(exc)
        finally:
            self._ready.set()

    def run_async(self, fn: Callable[..., Coroutine[Any, Any, T]], *args: Any, **kwargs: Any) -> T:
        """Run ``await fn(*args, **kwargs)`` on the client's trio loop and return
        its result: the way to use ``Client.aio`` (the AsyncClient) from threads.

        Raises what ``fn`` raises (a lone exception out of an exception group), and like
        ``trio.from_thread.run``: ``trio.RunFinishedError`` once the client's loop has
        ended, ``trio.Cancelled`` if the client closes while ``fn`` runs, RuntimeError if
        called from the client's own trio thread (it would wait for itself)."""
        token, dispatcher = self._token, self._dispatcher
        if token is None or dispatcher is None or not self._thread.is_alive():
            raise RuntimeError("the DeepFS client is closed")
        if threading.get_ident() == self._thread.ident:
            raise RuntimeError("this is a blocking function; call it from a thread")
        call = _Call(fn, args, kwargs, _thread_signal())
        token.run_sync_soon(dispatcher.submit, call)
        try:
            call.done.acquire()
        except BaseException:
            _local.signal = None  # interrupted: the call still releases it later, so not reusable
            raise
        assert call.result is not None
        try:
            return call.result.unwrap()  # type: ignore[no-any-return]
        except BaseExceptionGroup as group:
            raise _unwrap(group) from None

    def close_file(self, handle: AsyncFile) -> None:
        """``await handle.close()`` for a file this client opened. A handle that cannot write has
        nothing to flush: its close is handed to the loop without waiting for it (a thread hop less
        per file read; the loop runs it before any call made after it, ``run_sync_soon`` being in order)."""
        if handle.closed:  # (only the loop sets it): a writer that committed, as fsspec's do
            return
        token = self._token
        if handle.writable or token is None or not self._thread.is_alive() \
                or threading.get_ident() == self._thread.ident:
            self.run_async(handle.close)  # (and its errors: a closed client, a call from the loop)
            return
        try:
            token.run_sync_soon(handle.close_unwritable)
        except trio.RunFinishedError:
            pass  # the loop ended meanwhile: it holds nothing open any more

    def _read_direct(self, handle: AsyncFile, out: memoryview, offset: int) -> int | None:
        """``handle.pread_into(out, offset)`` from this thread if it is a read the fast path
        serves (``_direct``): the bytes read; None if it has to go through the loop."""
        direct = self._direct
        if direct is None or threading.get_ident() == self._thread.ident:
            return None
        return direct.read(handle, out, offset)

    @property
    def aio(self) -> AsyncClient:
        assert self._async is not None
        return self._async

    @property
    def stats(self) -> Any:
        """I/O counters: stripes written, degraded reads, checksum errors, bad fragments."""
        return self.aio.stripes.stats

    def close(self) -> None:
        if self._direct is not None:
            self._direct.close()
        if self._token is not None and self._thread.is_alive():
            stop = self._stop
            assert stop is not None
            trio.from_thread.run_sync(stop.set, trio_token=self._token)
            self._thread.join(timeout=10)
        self._token = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Namespace
    def stat(self, path: str) -> os.stat_result:
        return self.run_async(self.aio.stat, path)

    def exists(self, path: str) -> bool:
        return self.run_async(self.aio.exists, path)

    def listdir(self, path: str = "/") -> list[str]:
        return self.run_async(self.aio.listdir, path)

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        self.run_async(self.aio.mkdir, path, mode)

    def makedirs(self, path: str, mode: int = 0o755, exist_ok: bool = True) -> None:
        self.run_async(self.aio.makedirs, path, mode, exist_ok)

    def unlink(self, path: str) -> None:
        self.run_async(self.aio.unlink, path)

    def rmdir(self, path: str) -> None:
        self.run_async(self.aio.rmdir, path)

    def rename(self, src: str, dst: str, flags: int = 0) -> None:
        self.run_async(self.aio.rename, src, dst, flags)

    def symlink(self, target: str, path: str) -> None:
        self.run_async(self.aio.symlink, target, path)

    def readlink(self, path: str) -> str:
        return self.run_async(self.aio.readlink, path)

    def link(self, src: str, dst: str) -> None:
        self.run_async(self.aio.link, src, dst)

    def chmod(self, path: str, mode: int) -> None:
        self.run_async(self.aio.chmod, path, mode)

    def truncate(self, path: str, size: int) -> None:
        self.run_async(self.aio.truncate, path, size)

    def set_layout(self, path: str, layout: Layout) -> None:
        self.run_async(self.aio.set_layout, path, layout)

    def statfs(self) -> dict[str, int]:
        return self.run_async(self.aio.statfs)

    # Data
    def open(self, path: str, mode: str = "rb", layout: Layout | None = None, *, min_stripe_size: int = 0) -> File:
        """Like ``AsyncClient.open``, as a raw binary file object."""
        handle = self.run_async(functools.partial(self.aio.open, path, mode, layout, min_stripe_size=min_stripe_size))
        return File(self, handle)

    def read_file(self, path: str) -> bytes:
        """``AsyncClient.read_file``; the bytes of a file not inline in the OPEN's reply are read
        by ``pread`` (from this thread when it can)."""
        opened = self.run_async(self.aio.read_or_open, path)
        if isinstance(opened, bytes):
            return opened
        try:
            return self.pread(opened, opened.size, 0)
        finally:
            self.close_file(opened)

    def pread(self, handle: AsyncFile, size: int, offset: int) -> bytes:
        """``await handle.pread(size, offset)`` for a file this client opened (``File.pread``,
        the fsspec file system): from this thread when it is a small read of a file opened
        read-only (``_direct``), else through the loop."""
        if size < MAX_DIRECT_BYTES:
            out = bytearray(max(0, min(size, handle.size - offset)))
            if out and self._read_direct(handle, memoryview(out), offset) == len(out):
                return bytes(out)
        return self.run_async(handle.pread, size, offset)

    def write_file(self, path: str, data: bytes | bytearray | memoryview, layout: Layout | None = None) -> None:
        self.run_async(self.aio.write_file, path, data, layout)


class File(io.RawIOBase):
    """A DeepFS file opened through ``Client.open``: a binary, seekable raw file."""

    def __init__(self, client: Client, handle: AsyncFile) -> None:
        super().__init__()
        self._client = client
        self._handle = handle
        self._pos = handle.size if handle.append else 0
        self.name = handle.path

    @property
    def size(self) -> int:
        return self._handle.size

    def readable(self) -> bool:
        return self._handle.readable

    def writable(self) -> bool:
        return self._handle.writable

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._handle.size}[whence]
        if base + offset < 0:
            raise OSError(errno.EINVAL, "negative seek position")
        self._pos = base + offset
        return self._pos

    def _check_open(self) -> None:
        """Reads after ``close``: its hand-off to the loop may not have run yet (``Client.close_file``),
        so the handle alone would still let the direct path read."""
        if self.closed:
            raise ValueError("I/O operation on closed file")

    def readinto(self, buffer: Any) -> int:
        self._check_open()
        view = memoryview(buffer).cast("B")
        n = self._client._read_direct(self._handle, view, self._pos)  # noqa: SLF001 - Client's own File
        if n is None:
            n = self._client.run_async(self._handle.pread_into, view, self._pos)
        self._pos += n
        return n

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = max(0, self._handle.size - self._pos)
        data = self.pread(size, self._pos)
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def pread(self, size: int, offset: int) -> bytes:
        self._check_open()
        return self._client.pread(self._handle, size, offset)

    def write(self, data: Any) -> int:
        if self._handle.append:
            self._pos = self._handle.size
        n = self._client.run_async(self._handle.pwrite, data, self._pos)
        self._pos += n
        return n

    def pwrite(self, data: Any, offset: int) -> int:
        return self._client.run_async(self._handle.pwrite, data, offset)

    def truncate(self, size: int | None = None) -> int:
        size = self._pos if size is None else size
        self._client.run_async(self._handle.truncate, size)
        return size

    def flush(self) -> None:
        if not self.closed and self._handle.writable and not self._handle.closed:
            self._client.run_async(self._handle.flush)

    def fsync(self) -> None:
        self._client.run_async(self._handle.fsync)

    def close(self) -> None:
        if not self.closed:
            try:
                self._client.close_file(self._handle)
            finally:
                super().close()


_local = threading.local()
_MAX_IDLE_WORKERS = 64


def _thread_signal() -> threading.Lock:
    """The calling thread's completion signal: a lock it holds, which the worker that ran its
    call releases; acquiring it again waits for that and leaves it held for the next call.
    A thread waits for one call at a time, so one lock per thread serves all its clients."""
    signal: threading.Lock | None = getattr(_local, "signal", None)
    if signal is None:
        signal = _local.signal = threading.Lock()
        signal.acquire()
    return signal


class _Call:
    """One ``run_async`` call, handed from its thread to the trio loop and back."""

    __slots__ = ("args", "done", "fn", "kwargs", "result")

    def __init__(self, fn: Callable[..., Coroutine[Any, Any, Any]], args: tuple[Any, ...],
                 kwargs: dict[str, Any], done: threading.Lock) -> None:
        self.fn, self.args, self.kwargs, self.done = fn, args, kwargs, done
        self.result: outcome.Outcome[Any] | None = None


class _Dispatcher:
    """A thread's call hops into the client's trio loop cheaply: ``trio.from_thread.run``
    spawns a system task and waits on a ``queue.Queue`` per call; here a ``run_sync_soon``
    callback hands the call to an idle long-lived worker task (``reschedule``, or a new
    worker when all are busy, so calls from many threads still run concurrently) and the
    worker releases the caller's own lock when done. What is left of a round trip is the
    floor of any hop: waking the loop out of epoll and the caller out of its lock."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._idle: list[trio.lowlevel.Task] = []
        self._closed = False

    def submit(self, call: _Call) -> None:
        """In the trio thread (``run_sync_soon``): start ``call``; never raises."""
        if self._closed:
            call.result = outcome.Error(trio.RunFinishedError("the DeepFS client is closed"))
            call.done.release()
        elif self._idle:
            trio.lowlevel.reschedule(self._idle.pop(), outcome.Value(call))
        else:
            self._nursery.start_soon(self._work, call)

    def close(self) -> None:
        """Calls submitted from now on fail; those running and idle workers are cancelled."""
        self._closed = True
        self._nursery.cancel_scope.cancel()

    async def _work(self, call: _Call) -> None:
        me = trio.lowlevel.current_task()

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._idle.remove(me)
            return trio.lowlevel.Abort.SUCCEEDED

        while True:
            call.result = await outcome.acapture(call.fn, *call.args, **call.kwargs)
            call.done.release()
            if len(self._idle) >= _MAX_IDLE_WORKERS:
                return
            self._idle.append(me)
            call = await trio.lowlevel.wait_task_rescheduled(abort)  # Cancelled when closing


def _unwrap(exc: BaseException) -> BaseException:
    if isinstance(exc, BaseExceptionGroup):
        return sole_exception(exc) or exc
    return exc
