"""Connection to the metadata server: reconnects, and turns errors into OSError."""

from __future__ import annotations

import errno
import os
from typing import Any

import trio

from deepfs import rpc
from deepfs.frames import Op

RETRIES = 3


class MetaClient:
    def __init__(self, nursery: trio.Nursery, address: str, connect_timeout_s: float, timeout_s: float) -> None:
        self.address = address
        self._host, self._port = rpc.parse_address(address)
        self._nursery = nursery
        self._connect_timeout_s = connect_timeout_s
        self._timeout_s = timeout_s
        self._conn: rpc.FrameClient | None = None
        self._lock = trio.Lock()

    async def _connection(self) -> rpc.FrameClient:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        async with self._lock:
            if self._conn is None or self._conn.closed:
                try:
                    self._conn = await rpc.FrameClient.connect(
                        self._nursery, self._host, self._port, timeout_s=self._connect_timeout_s
                    )
                except (OSError, trio.TooSlowError) as exc:
                    raise ConnectionRefusedError(
                        errno.ECONNREFUSED, f"metadata server {self.address} is unreachable: {exc}"
                    ) from exc
            return self._conn

    async def call(self, op: Op, body: dict[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
        """One namespace operation. Connection loss is retried (operations are
        idempotent or checked by the server); errno answers are raised."""
        request = dict(body or {}, **fields)
        last: BaseException | None = None
        for attempt in range(RETRIES):
            try:
                conn = await self._connection()
                reply, _ = await conn.call(op, request, timeout_s=self._timeout_s)
                return reply or {}
            except (ConnectionResetError, ConnectionRefusedError, BrokenPipeError, trio.TooSlowError) as exc:
                last = exc
                await trio.sleep(0.05 * (attempt + 1))
        raise OSError(errno.EIO, f"metadata server {self.address}: {last}")

    async def aclose(self) -> None:
        if self._conn is not None:
            await self._conn.aclose()


def caller_context() -> dict[str, int]:
    """The uid/gid new inodes get (like NFS AUTH_SYS, the server trusts it)."""
    return {"uid": os.geteuid(), "gid": os.getegid()}
