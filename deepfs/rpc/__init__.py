"""trio shell around ``deepfs.frames``: a pipelined client and a frame server.

Layers, from the bottom (each module's docstring has its rules):

- ``_buffer``: ``FrameBuffer``, frames parsed out of received bytes, no I/O;
- ``_pump``: the socket pump (``recv_into``, ``sendmsg``, ``sendfile``),
  ``FrameReader`` and ``send_frame``, with plain ``trio.abc.Stream`` fallbacks;
- ``_handshake``: the authentication handshake around ``deepfs.auth.handshake``;
- ``_client``: ``FrameClient``, many requests pipelined on one connection;
- ``_blocking``: ``BlockingFrameClient``, one request at a time on a blocking socket;
- ``_server``: ``FrameServer``, one task per request.

Frames and their errors are ``deepfs.frames``; what goes in their bodies is
``deepfs.messages``.
"""

from deepfs.rpc._address import (
    AddressError,
    format_address,
    format_addresses,
    parse_address,
    parse_addresses,
)
from deepfs.rpc._blocking import BlockingFrameClient
from deepfs.rpc._buffer import READ_BUFFER_SIZE, FrameBuffer
from deepfs.rpc._client import FrameClient
from deepfs.rpc._handshake import PRE_AUTH_MAX_BODY, TlsRefused, client_handshake, server_handshake
from deepfs.rpc._pump import (
    Buffer,
    FileRange,
    FrameReader,
    PayloadBuffer,
    Piece,
    send_frame,
)
from deepfs.rpc._server import FrameServer, Handler, PayloadSent, RefusalLog, ServerLimits

__all__ = [
    "AddressError",
    "BlockingFrameClient",
    "PRE_AUTH_MAX_BODY",
    "READ_BUFFER_SIZE",
    "Buffer",
    "FileRange",
    "FrameBuffer",
    "FrameClient",
    "FrameReader",
    "FrameServer",
    "Handler",
    "PayloadBuffer",
    "PayloadSent",
    "RefusalLog",
    "Piece",
    "ServerLimits",
    "TlsRefused",
    "client_handshake",
    "format_address",
    "format_addresses",
    "parse_address",
    "parse_addresses",
    "send_frame",
    "server_handshake",
]
