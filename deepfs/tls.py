"""TLS for every DeepFS port: contexts, gRPC credentials and test certificates.

The problem: authentication (``deepfs.auth``) proves who is at the other end
of a connection, but the bytes still cross the network in the clear, so
anyone on the path reads file contents and metadata. With ``tls = true`` in
the cluster TOML every framed connection runs inside a ``trio.SSLStream``
and every gRPC channel uses gRPC's TLS; this module builds what both need
from three PEM files:

- ``server_ssl_context(cert, key)`` — a server's certificate chain and key
  (metadata servers and storage nodes, framed ports);
- ``client_ssl_context(ca)`` — clients (and servers talking to other
  servers) trust exactly the certificates signed by this CA and check the
  host name they dialled against the certificate's subjectAltName;
- ``grpc_server_credentials`` / ``grpc_channel_credentials`` — the same
  files for gRPC;
- ``create_test_ca_and_cert(directory, hosts)`` — a throwaway CA and one
  server certificate valid for the given hosts, made with the ``openssl``
  CLI (local clusters, tests, benchmarks; production brings its own PKI).

TLS here is transport privacy and server identity only: who may do what is
still decided by the HMAC handshake and capabilities, which run inside the
TLS stream unchanged. Clients present no certificate. Every file problem is
a ``ConfigError`` naming the file, raised when the context is built, not at
the first connection.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

import grpc

from deepfs.errors import ConfigError

DEFAULT_HOSTS = ("127.0.0.1", "localhost")  # always in a test certificate's subjectAltName
TEST_CERT_DAYS = 30  # test certificates are for one cluster's life, not for deployment
_OPENSSL_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of one TLS setup: the CA clients trust, a server's certificate and its key."""

    ca: Path
    cert: Path
    key: Path


def read_pem(path: str | os.PathLike[str], what: str) -> bytes:
    """The bytes of a PEM file; ``ConfigError`` naming ``what`` and the path when it cannot be read."""
    file = Path(path)
    if not str(path):
        raise ConfigError(f"TLS {what} file not set")
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read TLS {what} file {file}: {exc.strerror or exc}") from exc
    if b"-----BEGIN" not in data:
        raise ConfigError(f"TLS {what} file {file} is not a PEM file")
    return data


def server_ssl_context(cert_file: str | os.PathLike[str], key_file: str | os.PathLike[str]) -> ssl.SSLContext:
    """A server-side context (TLS 1.2 or later) presenting ``cert_file`` with ``key_file``."""
    read_pem(cert_file, "certificate")
    read_pem(key_file, "key")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(os.fspath(cert_file), os.fspath(key_file))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"cannot load TLS certificate {cert_file} with key {key_file}: {exc}") from exc
    return context


def client_ssl_context(ca_file: str | os.PathLike[str]) -> ssl.SSLContext:
    """A client-side context (TLS 1.2 or later) that trusts only ``ca_file`` and checks host names."""
    read_pem(ca_file, "CA")
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        context.load_verify_locations(cafile=os.fspath(ca_file))
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"cannot load TLS CA file {ca_file}: {exc}") from exc
    return context


def grpc_server_credentials(
    cert_file: str | os.PathLike[str], key_file: str | os.PathLike[str]
) -> grpc.ServerCredentials:
    """gRPC server credentials from the same certificate and key as the framed port."""
    return grpc.ssl_server_credentials([(read_pem(key_file, "key"), read_pem(cert_file, "certificate"))])


def grpc_channel_credentials(ca_file: str | os.PathLike[str]) -> grpc.ChannelCredentials:
    """gRPC channel credentials that trust only ``ca_file`` (gRPC checks the host name itself)."""
    return grpc.ssl_channel_credentials(root_certificates=read_pem(ca_file, "CA"))


def create_test_ca_and_cert(directory: str | os.PathLike[str], hosts: list[str] | tuple[str, ...] = ()) -> TlsFiles:
    """Make ``ca.pem``, ``server.pem`` and ``server.key`` in ``directory`` with the ``openssl`` CLI.

    The server certificate's subjectAltName names 127.0.0.1, localhost and
    every entry of ``hosts`` (IP addresses as ``IP:``, the rest as ``DNS:``).
    Keys are EC P-256 and mode 0600; the CA key is kept beside them
    (``ca.key``) so more certificates can be signed later by hand.
    Existing files are overwritten.
    """
    openssl = shutil.which("openssl")
    if openssl is None:
        raise ConfigError("the openssl command is needed to create test TLS certificates; install OpenSSL")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(ca=out / "ca.pem", cert=out / "server.pem", key=out / "server.key")
    ca_key, csr, extensions = out / "ca.key", out / "server.csr", out / "server.ext"
    extensions.write_text(_server_extensions(hosts))
    ec_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(
        openssl,
        ["req", "-x509", *ec_key, "-keyout", str(ca_key), "-out", str(files.ca), "-days", str(TEST_CERT_DAYS),
         "-subj", "/CN=DeepFS test CA",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign",
         "-addext", "subjectKeyIdentifier=hash"],
    )  # fmt: skip
    _openssl(openssl, ["req", "-new", *ec_key, "-keyout", str(files.key), "-out", str(csr), "-subj", "/CN=deepfs"])
    _openssl(
        openssl,
        ["x509", "-req", "-in", str(csr), "-CA", str(files.ca), "-CAkey", str(ca_key), "-CAcreateserial",
         "-out", str(files.cert), "-days", str(TEST_CERT_DAYS), "-extfile", str(extensions)],
    )  # fmt: skip
    for private in (ca_key, files.key):
        private.chmod(0o600)
    for public in (files.ca, files.cert):
        public.chmod(0o644)
    csr.unlink()
    extensions.unlink()
    return files


def subject_alt_names(hosts: list[str] | tuple[str, ...] = ()) -> list[str]:
    """``IP:…`` / ``DNS:…`` entries for 127.0.0.1, localhost and ``hosts``, without duplicates."""
    names: list[str] = []
    for host in (*DEFAULT_HOSTS, *hosts):
        host = host.strip().strip("[]")
        if not host:
            continue
        try:
            entry = f"IP:{ipaddress.ip_address(host)}"
        except ValueError:
            entry = f"DNS:{host}"
        if entry not in names:
            names.append(entry)
    return names


def _server_extensions(hosts: list[str] | tuple[str, ...]) -> str:
    return "\n".join(
        [
            "basicConstraints=critical,CA:FALSE",
            "keyUsage=critical,digitalSignature,keyEncipherment",
            "extendedKeyUsage=serverAuth",
            "subjectKeyIdentifier=hash",
            "authorityKeyIdentifier=keyid,issuer",
            "subjectAltName=" + ",".join(subject_alt_names(hosts)),
            "",
        ]
    )


def _openssl(openssl: str, args: list[str]) -> None:
    # umask 077: private keys are never readable by others, not even between creation and chmod.
    result = subprocess.run(
        [openssl, *args], capture_output=True, text=True, timeout=_OPENSSL_TIMEOUT_S, umask=0o077, check=False
    )
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"openssl {args[0]} failed (exit {result.returncode}): {last}")
