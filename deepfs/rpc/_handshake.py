"""The authentication handshake on a connection: the I/O around ``deepfs.auth.handshake``.

Rules: before the handshake nothing but ``AUTH`` frames is read, with a
pre-authentication reader whose frames carry no payload (refused on the
header, before anything is allocated) and whose bodies are at most
``PRE_AUTH_MAX_BODY`` bytes. Any other op first is answered ``EACCES``
"authenticate first"; a refused handshake is answered ``EACCES`` with the
one-line reason. Either way the server then closes the connection. A peer
must wait for the handshake's last reply before it sends anything else:
bytes already buffered past it close the connection.

On a TLS port the TLS handshake comes first. A peer that speaks our frames in
clear text there is answered, in clear text, with one ``EACCES`` frame saying
the port takes TLS only (``refuse_plaintext_peer``), so its client stops at
once with that line instead of retrying a connection that closes without a
word. A TLS handshake that fails the same way every time (a certificate the
client does not trust, a peer that does not speak TLS) raises ``TlsRefused``
on the client (``tls_failure_is_permanent``): still a connection error, so a
storage node that fails it is gone around like an unreachable one, but one the
metadata client does not retry.
"""

from __future__ import annotations

import errno
import socket
import ssl
import time
from typing import Any, TypeGuard

import trio

from deepfs import frames
from deepfs.auth import AuthError, ClientHandshake, Credential, Identity, ServerHandshake, Verifier
from deepfs.frames import FLAG_ERROR, FLAG_RESPONSE, HEADER_SIZE, Op, ProtocolError
from deepfs.rpc._pump import FrameReader, send_frame

PRE_AUTH_MAX_BODY = 4096
TLS_HANDSHAKE_RECORD = 0x16
"""The first byte a TLS client sends: the record type of its ClientHello."""
PLAINTEXT_ON_TLS_PORT = ("this port takes TLS connections only: connect with TLS and the cluster's CA "
                         "(tls = true and tls_ca_file in the client's config)")


class TlsRefused(ConnectionRefusedError):
    """A TLS handshake failed in a way a retry would repeat ("TLS handshake with H:P failed: reason")."""

    def __init__(self, address: str, cause: BaseException) -> None:
        super().__init__(errno.ECONNREFUSED, " ".join(f"TLS handshake with {address} failed: {cause}".split()))

    def __str__(self) -> str:
        return str(self.strerror)


def tls_failure_is_permanent(cause: BaseException | None) -> TypeGuard[ssl.SSLError]:
    """Will a TLS handshake that failed with ``cause`` fail again if retried? Yes for an SSL
    error proper: a certificate the client does not trust or that names another host, a peer
    that does not speak TLS, no common protocol version. No for a connection that ended or
    broke during the handshake (EOF, a reset): that may be the network or a restarting server."""
    return isinstance(cause, ssl.SSLError) and not isinstance(
        cause, ssl.SSLEOFError | ssl.SSLZeroReturnError | ssl.SSLSyscallError)


async def refuse_plaintext_peer(transport: trio.SocketStream, lock: trio.Lock) -> bool:
    """On a TLS port, before its TLS handshake: if the peer's first bytes are a frame in clear
    text rather than a TLS record, answer its first request with ``EACCES`` and
    ``PLAINTEXT_ON_TLS_PORT``, in clear text, and return True (the caller closes). False for
    a peer that speaks TLS, or that closed without sending anything. Only peeks: the bytes
    stay for the TLS handshake. The caller bounds the time."""
    peeked = await transport.socket.recv(frames.HEADER_SIZE, socket.MSG_PEEK)
    if not peeked or peeked[0] == TLS_HANDSHAKE_RECORD:
        return False
    request_id = 1  # what both clients number their first AUTH with
    try:
        header = frames.parse_header(peeked)
    except ProtocolError:
        pass  # not a frame, or only part of its header so far: the reason is the same
    else:
        request_id = header.request_id
    await _send_error(transport, lock, request_id, PLAINTEXT_ON_TLS_PORT)
    return True


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
