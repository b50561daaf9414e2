"""TLS: the test certificates and contexts of deepfs.tls, then a whole cluster running with tls = true.

The unit tests run TLS over trio's in-memory stream pairs (no sockets); the
process tests start a LocalCluster(tls=True) and use it as a user would.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import random
import socket
import ssl
import struct
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import trio
import trio.testing

import deepfs
from deepfs import frames
from deepfs.auth import authenticated_channel, read_key_file
from deepfs.config import ClientConfig
from deepfs.errors import ConfigError
from deepfs.local_cluster import LocalCluster
from deepfs.proto import control_pb2, control_pb2_grpc
from deepfs.rpc._handshake import tls_failure_is_permanent
from deepfs.tls import (
    TlsFiles,
    client_ssl_context,
    create_test_ca_and_cert,
    grpc_channel_credentials,
    grpc_server_credentials,
    read_pem,
    server_ssl_context,
    subject_alt_names,
)
from tests.conftest import FAST_META_ARGS, SESSION_ADMIN_KEY, SESSION_SECRET

unit = pytest.mark.unit


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return create_test_ca_and_cert(tmp_path_factory.mktemp("tls"), ["10.1.2.3", "node7.example"])


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return create_test_ca_and_cert(tmp_path_factory.mktemp("other-tls"), [])


async def _echo_once(server_context: ssl.SSLContext, client_context: ssl.SSLContext, host: str) -> bytes:
    """One message through an SSLStream pair over memory streams; the server echoes it back."""
    client_raw, server_raw = trio.testing.memory_stream_pair()
    client = trio.SSLStream(client_raw, client_context, server_hostname=host)
    server = trio.SSLStream(server_raw, server_context, server_side=True)
    received = b""

    async def serve() -> None:
        data = await server.receive_some(65536)
        await server.send_all(data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        await client.send_all(b"deepfs over tls")
        while len(received) < len(b"deepfs over tls"):
            received += await client.receive_some(65536)
    return received


async def _handshake_failure(server_context: ssl.SSLContext, client_context: ssl.SSLContext, host: str) -> str:
    """The client's handshake error against this server, as text ("" when the handshake succeeded)."""
    client_raw, server_raw = trio.testing.memory_stream_pair()
    client = trio.SSLStream(client_raw, client_context, server_hostname=host)
    server = trio.SSLStream(server_raw, server_context, server_side=True)

    async def serve() -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            await server.do_handshake()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        try:
            await client.do_handshake()
        except trio.BrokenResourceError as exc:
            await client_raw.aclose()
            return repr(exc.__cause__)
    return ""


@unit
@pytest.mark.timeout(30)
def test_test_certificates_name_every_host_and_keep_keys_private(tls_files: TlsFiles) -> None:
    assert all(path.is_file() for path in (tls_files.ca, tls_files.cert, tls_files.key))
    assert tls_files.key.stat().st_mode & 0o777 == 0o600
    assert (tls_files.key.parent / "ca.key").stat().st_mode & 0o777 == 0o600
    assert subject_alt_names(["10.1.2.3", "node7.example", "localhost", "[::1]"]) == [
        "IP:127.0.0.1",
        "DNS:localhost",
        "IP:10.1.2.3",
        "DNS:node7.example",
        "IP:::1",
    ]


@unit
@pytest.mark.timeout(30)
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "10.1.2.3", "node7.example"])
def test_ssl_stream_round_trip_verifies_every_named_host(tls_files: TlsFiles, host: str) -> None:
    server = server_ssl_context(tls_files.cert, tls_files.key)
    client = client_ssl_context(tls_files.ca)
    assert trio.run(_echo_once, server, client, host) == b"deepfs over tls"


@unit
@pytest.mark.timeout(30)
def test_contexts_refuse_old_protocols(tls_files: TlsFiles) -> None:
    assert server_ssl_context(tls_files.cert, tls_files.key).minimum_version >= ssl.TLSVersion.TLSv1_2
    client = client_ssl_context(tls_files.ca)
    assert client.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert client.verify_mode == ssl.CERT_REQUIRED and client.check_hostname


@unit
@pytest.mark.timeout(30)
def test_client_refuses_a_server_signed_by_another_ca(tls_files: TlsFiles, other_ca: TlsFiles) -> None:
    server = server_ssl_context(other_ca.cert, other_ca.key)
    client = client_ssl_context(tls_files.ca)
    assert "CERTIFICATE_VERIFY_FAILED" in trio.run(_handshake_failure, server, client, "127.0.0.1")


@unit
@pytest.mark.timeout(30)
def test_client_refuses_a_host_the_certificate_does_not_name(tls_files: TlsFiles) -> None:
    server = server_ssl_context(tls_files.cert, tls_files.key)
    client = client_ssl_context(tls_files.ca)
    assert "CERTIFICATE_VERIFY_FAILED" in trio.run(_handshake_failure, server, client, "10.9.9.9")


@unit
@pytest.mark.timeout(30)
def test_missing_or_wrong_files_are_config_errors(tls_files: TlsFiles, other_ca: TlsFiles, tmp_path: Path) -> None:
    missing = tmp_path / "nope.pem"
    with pytest.raises(ConfigError, match=r"cannot read TLS certificate file .*nope\.pem"):
        server_ssl_context(missing, tls_files.key)
    with pytest.raises(ConfigError, match=r"cannot read TLS key file .*nope\.pem"):
        server_ssl_context(tls_files.cert, missing)
    with pytest.raises(ConfigError, match=r"cannot read TLS CA file .*nope\.pem"):
        client_ssl_context(missing)
    with pytest.raises(ConfigError, match="cannot read TLS CA file"):
        grpc_channel_credentials(tmp_path)  # a directory
    with pytest.raises(ConfigError, match="TLS CA file not set"):
        read_pem("", "CA")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="is not a PEM file"):
        client_ssl_context(garbage)
    with pytest.raises(ConfigError, match="cannot load TLS certificate"):
        server_ssl_context(tls_files.cert, other_ca.key)  # key of another certificate


@unit
@pytest.mark.timeout(30)
def test_no_openssl_command_is_a_config_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("deepfs.tls.shutil.which", lambda name: None)
    with pytest.raises(ConfigError, match="the openssl command is needed"):
        create_test_ca_and_cert(tmp_path, [])


@unit
@pytest.mark.timeout(30)
def test_grpc_credentials_build_from_the_same_files(tls_files: TlsFiles) -> None:
    assert isinstance(grpc_server_credentials(tls_files.cert, tls_files.key), grpc.ServerCredentials)
    assert isinstance(grpc_channel_credentials(tls_files.ca), grpc.ChannelCredentials)


# ------------------------------------------------------------------ gRPC over loopback, this module's credentials
process = pytest.mark.process


@contextlib.contextmanager
def _echo_grpc_server(files: TlsFiles) -> Iterator[str]:
    """An in-process gRPC server with one unary method (/test.Echo/Echo) on TLS; yields its address."""

    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler("test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=[handler])
    port = server.add_secure_port("127.0.0.1:0", grpc_server_credentials(files.cert, files.key))
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


def _grpc_echo(address: str, credentials: grpc.ChannelCredentials | None) -> bytes:
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        echo = channel.unary_unary("/test.Echo/Echo")
        answer: bytes = echo(b"deepfs grpc over tls", timeout=10)
        return answer


@process
@pytest.mark.timeout(60)
def test_grpc_tls_round_trip_and_refusals(tls_files: TlsFiles, other_ca: TlsFiles) -> None:
    with _echo_grpc_server(tls_files) as address:
        assert _grpc_echo(address, grpc_channel_credentials(tls_files.ca)) == b"deepfs grpc over tls"
        for credentials in (grpc_channel_credentials(other_ca.ca), None):  # another CA; no TLS at all
            with pytest.raises(grpc.RpcError) as info:
                _grpc_echo(address, credentials)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE


# ------------------------------------------------------------------ a whole cluster with tls = true


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """Three storage nodes, RS 2+1, every server on TLS with the cluster's test CA; the session's secret."""
    cluster = LocalCluster(tmp_path_factory.mktemp("tls-cluster"), nodes=3, k=2, m=1, stripe_size=256 << 10,
                           fsync=False, extra_meta_args=list(FAST_META_ARGS), secret_file=SESSION_SECRET, tls=True)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _tls_config(cluster: LocalCluster, ca_file: str | Path | None = None, tls: bool = True) -> ClientConfig:
    """A client config of ``cluster`` (the session's admin key comes from DEEPFS_KEY)."""
    return ClientConfig(meta_address=cluster.meta_address, tls=tls, tls_ca_file=str(ca_file or cluster.tls_ca_file),
                        connect_timeout_s=3.0, io_timeout_s=5.0)


@process
@pytest.mark.timeout(120)
def test_files_round_trip_through_a_tls_cluster(tls_cluster: LocalCluster) -> None:
    big = random.Random(12).randbytes(1 << 20)
    small = random.Random(13).randbytes(4096)
    with deepfs.Client(tls_cluster.meta_address, _tls_config(tls_cluster)) as client:
        client.makedirs("/tls")
        client.write_file("/tls/big.bin", big)
        client.write_file("/tls/small.bin", small)
        assert client.read_file("/tls/big.bin") == big
        assert client.read_file("/tls/small.bin") == small
        with client.open("/tls/big.bin") as file:
            assert file.pread(4096, 300_000) == big[300_000:304_096]
        assert client.stat("/tls/big.bin").st_size == 1 << 20
        assert sorted(client.listdir("/tls")) == ["big.bin", "small.bin"]
    # The control plane (gRPC with TLS, verified by the same CA): every node registered and up.
    status = tls_cluster.status()
    assert len(tls_cluster.cluster_map().nodes) == 3
    assert status is not None


@process
@pytest.mark.timeout(60)
def test_plain_tcp_peer_is_told_in_one_clear_frame_that_the_port_takes_tls_only(tls_cluster: LocalCluster) -> None:
    """Frames in the clear are not TLS: the server answers the first one with EACCES and why, in
    the clear (nothing else), and closes, instead of dropping the peer without a word."""
    host, port = tls_cluster.meta_address.rsplit(":", 1)
    hello = frames.encode_frame(frames.Op.AUTH, 7, {"v": 1, "nonce": bytes(16), "identity": []})
    received = b""
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(hello)
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(4096):
                received += chunk
    header = frames.parse_header(received[:frames.HEADER_SIZE])
    body = frames.decode_body(received[:frames.HEADER_SIZE], header,
                              received[frames.HEADER_SIZE:frames.HEADER_SIZE + header.body_len])
    assert (header.op, header.request_id, header.is_response, header.is_error) == (frames.Op.AUTH, 7, True, True)
    assert body["errno"] == errno.EACCES and "TLS connections only" in body["msg"]
    assert len(received) == frames.HEADER_SIZE + header.body_len  # one frame, then the close


@process
@pytest.mark.timeout(60)
def test_a_tls_port_still_serves_tls_clients_after_refusing_plain_ones(tls_cluster: LocalCluster) -> None:
    host, port = tls_cluster.meta_address.rsplit(":", 1)
    for _ in range(3):
        with socket.create_connection((host, int(port)), timeout=20) as sock:
            sock.sendall(b"GET / HTTP/1.0\r\n\r\n")  # not even a frame: refused the same way
            assert b"TLS connections only" in sock.recv(4096)
        with socket.create_connection((host, int(port)), timeout=20):
            pass  # a port probe: connects and leaves
        for first_bytes in (b"\xdf_", b"\x16\x03", b"\x00"):  # part of a header, of a ClientHello; one byte
            with socket.create_connection((host, int(port)), timeout=20) as sock:
                sock.sendall(first_bytes)
        with socket.create_connection((host, int(port)), timeout=20) as sock:
            sock.sendall(frames.encode_frame(frames.Op.AUTH, 1, {}))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # leaves with a reset
    with deepfs.Client(tls_cluster.meta_address, _tls_config(tls_cluster)) as client:
        assert client.stat("/").st_ino


@process
@pytest.mark.timeout(60)
def test_plain_tcp_client_fails_at_once_with_a_clear_error(tls_cluster: LocalCluster) -> None:
    """No retries: with an hour of failover allowed, the client still stops at its first refusal
    (else the test's timeout fails it)."""
    config = dataclasses.replace(_tls_config(tls_cluster, tls=False), meta_failover_s=3600.0)
    with pytest.raises(PermissionError) as info:
        deepfs.Client(tls_cluster.meta_address, config).close()
    message = str(info.value).strip()
    assert tls_cluster.meta_address in message and "\n" not in message
    assert "TLS connections only" in message and "tls_ca_file" in message


@process
@pytest.mark.timeout(60)
def test_client_with_another_ca_fails_at_once_naming_the_certificate(tls_cluster: LocalCluster,
                                                                     other_ca: TlsFiles) -> None:
    config = dataclasses.replace(_tls_config(tls_cluster, other_ca.ca), meta_failover_s=3600.0)
    with pytest.raises(ConnectionRefusedError) as info:
        deepfs.Client(tls_cluster.meta_address, config).close()
    message = str(info.value)
    assert "certificate verify failed" in message.lower() and tls_cluster.meta_address in message
    assert "\n" not in message


@unit
@pytest.mark.timeout(30)
def test_which_tls_failures_are_worth_a_retry() -> None:
    assert tls_failure_is_permanent(ssl.SSLCertVerificationError(1, "certificate verify failed"))
    assert tls_failure_is_permanent(ssl.SSLError(1, "wrong version number"))
    for passing in (ssl.SSLEOFError(8, "EOF"), ssl.SSLZeroReturnError(6, "closed"), ssl.SSLSyscallError(5, "x"),
                    ConnectionResetError(104, "reset"), None):
        assert not tls_failure_is_permanent(passing)


@process
@pytest.mark.timeout(60)
def test_grpc_without_tls_or_with_another_ca_is_refused(tls_cluster: LocalCluster, other_ca: TlsFiles) -> None:
    key = read_key_file(SESSION_ADMIN_KEY)
    grpc_address = tls_cluster.state.grpc_address
    for ca_file in ("", str(other_ca.ca)):
        with authenticated_channel(grpc_address, key, ca_file) as channel, pytest.raises(grpc.RpcError) as info:
            control_pb2_grpc.ClusterStub(channel).Status(control_pb2.StatusRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


@unit
@pytest.mark.timeout(30)
def test_bench_selects_the_tls_target_beside_the_plain_client() -> None:
    from bench.targets import TARGET_NAMES, parse_target_names

    assert "deepfs-tls" in TARGET_NAMES
    assert parse_target_names("deepfs-client,deepfs-tls") == ["deepfs-client", "deepfs-tls"]


@pytest.mark.fuse
@pytest.mark.timeout(120)
def test_a_mount_reaches_a_tls_cluster_with_its_ca(tls_cluster: LocalCluster) -> None:
    from tests.conftest import mounted

    data = bytes(range(256)) * 1024
    with mounted(tls_cluster, "tls", extra_args=["--tls-ca", str(tls_cluster.tls_ca_file)]) as mnt:
        (mnt.path / "through-tls").write_bytes(data)
        assert (mnt.path / "through-tls").read_bytes() == data
    with deepfs.Client(tls_cluster.meta_address, config=_tls_config(tls_cluster)) as client:
        assert client.read_file("/through-tls") == data
