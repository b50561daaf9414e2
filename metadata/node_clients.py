"""Connections from the metadata server to storage nodes, one per address.

The garbage collector and the repair worker both talk the framed storage
protocol to nodes. Each keeps a ``NodeClients``: a connection is opened on
first use, kept for the next request, and dropped after any failure, so the
next request reconnects (a node that restarted, or a half-sent frame, never
poisons later requests). Reader tasks live in the caller's nursery.

Nodes admit only authenticated peers: ``credential`` is asked at every new
connection for what to present (the metadata server's own ticket, role meta,
which it re-issues before it expires), so a long-lived ``NodeClients`` never
presents a stale one. None connects without a handshake (clusters without
authentication, in-process tests).
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable

import trio

from deepfs.auth import Credential
from deepfs.rpc import FrameClient, parse_address

Dial = Callable[[trio.Nursery, str, float], Awaitable[FrameClient]]
CredentialSource = Callable[[], Credential | None]


async def dial_tcp(nursery: trio.Nursery, address: str, timeout_s: float, *,
                   credential: Credential | None = None, ssl_context: ssl.SSLContext | None = None) -> FrameClient:
    host, port = parse_address(address)
    return await FrameClient.connect(nursery, host, port, timeout_s=timeout_s, credential=credential,
                                     ssl_context=ssl_context)


class NodeClients:
    """Cached ``FrameClient``s by node address; ``dial`` opens one (TCP, or memory streams in tests).

    ``credential``: called at every new TCP connection for the credential to present; it is
    passed to the default dialer only (a custom ``dial`` brings its own), as is ``ssl_context``
    (TLS clusters: verifies the nodes' certificates)."""

    def __init__(self, timeout_s: float, dial: Dial | None = None, *,
                 credential: CredentialSource | None = None, ssl_context: ssl.SSLContext | None = None) -> None:
        self.timeout_s = timeout_s
        self._dial = dial
        self._credential = credential
        self._ssl_context = ssl_context
        self._clients: dict[str, FrameClient] = {}

    async def get(self, nursery: trio.Nursery, address: str) -> FrameClient:
        """The open connection to ``address``, connecting (within ``timeout_s``) if needed."""
        client = self._clients.get(address)
        if client is None or client.closed:
            client = await self._connect(nursery, address)
            self._clients[address] = client
        return client

    async def _connect(self, nursery: trio.Nursery, address: str) -> FrameClient:
        if self._dial is not None:
            return await self._dial(nursery, address, self.timeout_s)
        credential = self._credential() if self._credential is not None else None
        return await dial_tcp(nursery, address, self.timeout_s, credential=credential, ssl_context=self._ssl_context)

    async def forget(self, address: str) -> None:
        """Close the connection to ``address`` after a failure; the next ``get`` reconnects."""
        client = self._clients.pop(address, None)
        if client is not None:
            await client.aclose()
