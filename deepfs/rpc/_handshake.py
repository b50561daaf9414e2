"""The authentication handshake on a connection: the I/O around ``deepfs.auth.handshake``.

Rules: before the handshake nothing but ``AUTH`` frames is read, with a
pre-authentication reader whose frames carry no payload (refused on the
header, before anything is allocated) and whose bodies are at most
``PRE_AUTH_MAX_BODY`` bytes. Any other op first is answered ``EACCES``
"authenticate first"; a refused handshake is answered ``EACCES`` with the
one-line reason. Either way the server then closes the connection. A peer
must wait for the handshake's last reply before it sends anything else:
bytes already buffered past it close the connection.
"""

from __future__ import annotations

import errno
import time
from typing import Any

import trio

from deepfs import frames
from deepfs.auth import AuthError, ClientHandshake, Credential, Identity, ServerHandshake, Verifier
from deepfs.frames import FLAG_ERROR, FLAG_RESPONSE, HEADER_SIZE, Op, ProtocolError
from deepfs.rpc._pump import FrameReader, send_frame

PRE_AUTH_MAX_BODY = 4096


def pre_auth_reader(stream: trio.abc.ReceiveStream) -> FrameReader:
    """A reader for the handshake: small bodies, no payload for any op."""
    return FrameReader(stream, PRE_AUTH_MAX_BODY, frames.DEFAULT_MAX_PAYLOAD,
                       buffer_size=PRE_AUTH_MAX_BODY + HEADER_SIZE, payload_limits={})


async def _send_error(stream: trio.abc.Stream, lock: trio.Lock, request_id: int, reason: str) -> None:
    try:
        await send_frame(stream, lock, Op.AUTH, request_id, {"errno": errno.EACCES, "msg": reason},
                         flags=FLAG_RESPONSE | FLAG_ERROR)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass  # the peer left; the connection is closed anyway


async def server_handshake(stream: trio.abc.Stream, verifier: Verifier, lock: trio.Lock) -> Identity | None:
    """Run the server's side; the peer's identity, or ``AuthError`` (the peer was told why);
    None if the peer closed the connection before sending anything (a port probe).

    ``ProtocolError`` and connection errors pass through (the caller closes);
    the caller bounds the time (``handshake_timeout_s``)."""
    reader = pre_auth_reader(stream)
    handshake = ServerHandshake(verifier, time.time())
    identity: Identity | None = None
    for step in ("hello", "proof"):
        frame = await reader.read_frame()
        if frame is None:
            if step == "hello":
                return None
            raise AuthError("peer closed the connection before its proof")
        header, body, _ = frame
        if header.is_response:
            raise ProtocolError("a client sent a response frame")
        try:
            if header.op != Op.AUTH:
                raise AuthError("authenticate first")
            if step == "hello":
                reply: dict[str, Any] = handshake.hello(body)
            else:
                identity = handshake.finish(body)
                reply = {}
        except AuthError as exc:
            await _send_error(stream, lock, header.request_id, str(exc))
            raise
        await send_frame(stream, lock, Op.AUTH, header.request_id, reply, flags=FLAG_RESPONSE)
    if reader.buffered:
        raise ProtocolError("frames sent before the handshake finished")
    assert identity is not None
    return identity


async def client_handshake(stream: trio.abc.Stream, credential: Credential, address: str) -> None:
    """Run the client's side on a connected stream; ``AuthError`` if refused or the server is not genuine.

    The caller bounds the time; a connection that breaks meanwhile raises ``ConnectionResetError``."""
    lock = trio.Lock()
    reader = pre_auth_reader(stream)
    handshake = ClientHandshake(credential)
    try:
        body: dict[str, Any] = handshake.hello()
        for request_id in (1, 2):
            await send_frame(stream, lock, Op.AUTH, request_id, body)
            frame = await reader.read_frame()
            if frame is None:
                raise ConnectionResetError(errno.ECONNRESET, f"{address} closed the connection during the "
                                                             "handshake (a TLS port reached without TLS, or "
                                                             "this peer is over its connection cap?)")
            header, reply, _ = frame
            if header.op != Op.AUTH or header.request_id != request_id or not header.is_response:
                raise ProtocolError("unexpected frame during the handshake")
            if header.is_error:
                msg = reply.get("msg") if isinstance(reply, dict) else None
                raise AuthError(str(msg or "refused"))
            if request_id == 1:
                body = handshake.answer(reply)
    except AuthError as exc:
        raise AuthError(f"authentication with {address} failed: {exc}") from None
    except (ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise ConnectionResetError(errno.ECONNRESET, f"handshake with {address} failed: {exc}") from exc
    if reader.buffered:
        raise ConnectionResetError(errno.ECONNRESET, f"{address} sent frames before the handshake finished")
