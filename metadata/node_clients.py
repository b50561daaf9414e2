"""Connections from the metadata server to storage nodes, one per address.

The garbage collector and the repair worker both talk the framed storage
protocol to nodes. Each keeps a ``NodeClients``: a connection is opened on
first use, kept for the next request, and dropped after any failure, so the
next request reconnects (a node that restarted, or a half-sent frame, never
poisons later requests). Reader tasks live in the caller's nursery.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import trio

from deepfs.rpc import FrameClient, parse_address

Dial = Callable[[trio.Nursery, str, float], Awaitable[FrameClient]]


async def dial_tcp(nursery: trio.Nursery, address: str, timeout_s: float) -> FrameClient:
    host, port = parse_address(address)
    return await FrameClient.connect(nursery, host, port, timeout_s=timeout_s)


class NodeClients:
    """Cached ``FrameClient``s by node address; ``dial`` opens one (TCP, or memory streams in tests)."""

    def __init__(self, timeout_s: float, dial: Dial = dial_tcp) -> None:
        self.timeout_s = timeout_s
        self._dial = dial
        self._clients: dict[str, FrameClient] = {}

    async def get(self, nursery: trio.Nursery, address: str) -> FrameClient:
        """The open connection to ``address``, connecting (within ``timeout_s``) if needed."""
        client = self._clients.get(address)
        if client is None or client.closed:
            client = await self._dial(nursery, address, self.timeout_s)
            self._clients[address] = client
        return client

    async def forget(self, address: str) -> None:
        """Close the connection to ``address`` after a failure; the next ``get`` reconnects."""
        client = self._clients.pop(address, None)
        if client is not None:
            await client.aclose()
