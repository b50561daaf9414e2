"""What tests of a real storage node process share: its key, tickets and capabilities to enter it.

A node needs a node key (``--key``); peers need a ticket signed with the
service secret in that key, and capabilities for fragment I/O. One cluster
secret per test session is enough: nothing here is a metadata server.
``start_node`` runs ``python -m storage_node`` with a key; ``authed_socket``
is a blocking socket that has done the handshake, for tests that write raw
frames.
"""

from __future__ import annotations

import re
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from deepfs import frames
from deepfs.auth import (
    ROLE_META,
    ROLE_NODE,
    Capability,
    ClientHandshake,
    Credential,
    Identity,
    Key,
    NodeTicket,
    derive_service_secret,
    issue_capability,
    issue_ticket,
    make_key,
    new_cluster_secret,
    write_key_file,
)
from deepfs.frames import Op
from deepfs.testing import ServerProcess, ready_line

SECRET = new_cluster_secret()
SERVICE = derive_service_secret(SECRET)
NODE_KEY = make_key(SECRET, Identity("test-node", ROLE_NODE))
META = Identity("meta", ROLE_META)
READY = re.compile(r"^deepfs-node listening on 127\.0\.0\.1:(\d+) node_uuid=([0-9a-f-]{36})$")


def key_file(directory: Path, key: Key = NODE_KEY) -> Path:
    """``key`` written to ``directory/NAME.key`` (0600)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{key.identity.name}.key"
    write_key_file(path, key)
    return path


def start_node(data_dir: Path, *extra: str, meta_grpc: str = "127.0.0.1:1", key: Key | None = NODE_KEY,
               launcher: Sequence[str] = ()) -> ServerProcess:
    """A node on a free port with ``key`` (None: started without ``--key``, which it refuses);
    ``launcher``: a command that runs the node's command line (``prlimit --nofile=...``)."""
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    key_args = ["--key", str(key_file(data_dir.parent / "keys", key))] if key is not None else []
    args = ["-m", "storage_node", "--data-dir", str(data_dir), "--host", "127.0.0.1", "--port", "0",
            "--meta-grpc", meta_grpc, "--no-fsync", "--reserve-bytes", "0", *key_args, *extra]
    if launcher:
        args = [*launcher, sys.executable, *args]
    return ServerProcess(args, ready_line("deepfs-node listening"), data_dir.parent / f"{data_dir.name}.log").start()


def port_of(node: ServerProcess) -> int:
    match = READY.match(node.ready_line)
    assert match, node.ready_line
    return int(match.group(1))


def ticket(identity: Identity = META, ttl_s: float = 600.0, service_secret: bytes = SERVICE) -> NodeTicket:
    """A ticket as the metadata server issues it (to itself: role meta, which needs no capabilities)."""
    return issue_ticket(service_secret, identity, ttl_s, time.time())


def cap(ino: int, ops: str = "rw", min_version: int = 0, ttl_s: float = 60.0,
        service_secret: bytes = SERVICE) -> Capability:
    return issue_capability(service_secret, ino, ops, min_version, ttl_s, time.time())


def frame(op: int, body: Any, payload: bytes = b"", payload_len: int | None = None, request_id: int = 1) -> bytes:
    return frames.encode_frame(op, request_id, body, len(payload) if payload_len is None else payload_len) + payload


def exchange(sock: socket.socket, raw: bytes) -> tuple[frames.FrameHeader, Any]:
    """Send one request frame on a blocking socket; its response's header and body."""
    sock.sendall(raw)
    head = sock.recv(frames.HEADER_SIZE, socket.MSG_WAITALL)
    header = frames.parse_header(head)
    body = frames.decode_body(head, header, sock.recv(header.body_len, socket.MSG_WAITALL))
    sock.recv(header.payload_len, socket.MSG_WAITALL)
    return header, body


def handshake(sock: socket.socket, credential: Credential) -> None:
    """The AUTH exchange on a blocking socket; AssertionError if the server refuses."""
    client = ClientHandshake(credential)
    header, reply = exchange(sock, frame(Op.AUTH, client.hello()))
    assert header.is_response and not header.is_error, reply
    header, done = exchange(sock, frame(Op.AUTH, client.answer(reply), request_id=2))
    assert header.is_response and not header.is_error, done


def authed_socket(port: int, credential: Credential | None = None, timeout_s: float = 5.0) -> socket.socket:
    """A blocking connection to a node that has authenticated (with a meta ticket by default)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout_s)
    try:
        handshake(sock, credential or ticket())
    except BaseException:
        sock.close()
        raise
    return sock
