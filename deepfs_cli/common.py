"""What the ``deepfs`` commands share: finding a cluster, and the failure rule.

Failure rule: every failure ends in one line on stderr and a non-zero exit
status (1 unless the command documents another, as ``fsck`` does).

Finding a cluster: ``status``, ``fsck`` and the ``node`` admin commands take
``cluster_options`` — ``--data-dir`` of a local cluster started with
``deepfs up`` (its state file names the control plane), or ``--grpc
HOST:PORT`` of any cluster's control plane — and talk to it through
``control_plane``.

Keys: those commands authenticate with ``--key FILE``, else ``$DEEPFS_KEY``,
else (for ``--data-dir``) the admin key ``deepfs up`` made for that cluster,
else ``~/.config/deepfs/key`` (``admin_key``). A refusal is one line,
"permission denied: ... (an admin key is needed)", exit 1.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn, TypeVar

import click
import grpc

from deepfs.auth import KEY_ENV, AuthError, Key, read_key_file, resolve_key
from deepfs.auth.grpc_auth import authenticated_channel
from deepfs.errors import ConfigError
from deepfs.proto import control_pb2_grpc

DEFAULT_DATA_DIR = "./deepfs-data"
CONTROL_TIMEOUT_S = 10.0

F = TypeVar("F", bound=Callable[..., object])

data_dir_option = click.option("--data-dir", default=DEFAULT_DATA_DIR, show_default=True,
                               type=click.Path(file_okay=False))


def fail(message: str, status: int = 1) -> NoReturn:
    """End the command with ``message`` as its one line on stderr."""
    click.echo(f"deepfs: {message}", err=True)
    sys.exit(status)


def cluster_options(command: F) -> F:
    """Adds ``--data-dir`` and ``--grpc`` (the latter wins): the command gets ``data_dir`` and ``grpc_address``."""
    command = click.option("--grpc", "grpc_address", default=None, metavar="HOST:PORT",
                           help="control-plane address of the cluster (instead of --data-dir)")(command)
    command = key_option(command)
    command = click.option("--tls-ca", "tls_ca_file", default=None, type=click.Path(dir_okay=False),
                           expose_value=False, is_eager=True, callback=_remember_tls_ca,
                           help="CA file that verifies a TLS cluster's control plane")(command)
    return data_dir_option(command)


def _remember(name: str) -> Callable[[click.Context, click.Parameter, object], None]:
    """Keep an option in ``ctx.meta`` (not a parameter of every command); ``control_plane`` reads it."""

    def store(ctx: click.Context, param: click.Parameter, value: object) -> None:
        if value:
            ctx.meta[name] = value

    return store


_remember_key = _remember("deepfs.key")
_remember_tls_ca = _remember("deepfs.tls_ca")
key_option = click.option("--key", "key_file", default=None, type=click.Path(dir_okay=False), expose_value=False,
                          is_eager=True, callback=_remember_key,
                          help="key file to authenticate with [default: $DEEPFS_KEY, the local cluster's admin "
                               "key, ~/.config/deepfs/key]")


def admin_key(data_dir: str, grpc_address: str | None, key_file: str | None = None) -> Key | None:
    """The key a control-plane command presents (see the module's docstring for the order)."""
    if key_file:
        return read_key_file(key_file)
    if not os.environ.get(KEY_ENV) and not grpc_address:
        from deepfs.local_cluster import ClusterState

        try:
            state = ClusterState.load(data_dir)
        except ConfigError:
            state = None
        if state is not None and state.admin_key:
            return read_key_file(state.admin_key)
    return resolve_key(None)


def tls_ca_of(data_dir: str, grpc_address: str | None, tls_ca_file: str | None = None) -> str:
    """``--tls-ca``, else the CA of the local cluster in ``data_dir`` ("" : no TLS)."""
    if tls_ca_file or grpc_address:
        return tls_ca_file or ""
    from deepfs.local_cluster import ClusterState

    try:
        return ClusterState.load(data_dir).tls_ca_file
    except ConfigError:
        return ""


def control_address(data_dir: str, grpc_address: str | None) -> str:
    """The control plane named by ``--grpc``, else the one of the local cluster in ``data_dir``."""
    if grpc_address:
        return grpc_address
    from deepfs.local_cluster import ClusterState
    from deepfs.processes import pid_alive

    state = ClusterState.load(data_dir)
    # Several metadata servers: the first one still running (any of them serves the control plane).
    for address, info in zip(state.grpc_addresses, state.metas, strict=False):
        if info is not None and pid_alive(info.pid):
            return address
    return state.grpc_address


@contextmanager
def control_plane(data_dir: str, grpc_address: str | None,
                  fail_status: int = 1) -> Iterator[control_pb2_grpc.ClusterStub]:
    """A ``Cluster`` stub for the cluster the options name, over a channel authenticated with
    ``admin_key``; any failure inside ends the command."""
    ctx = click.get_current_context(silent=True)
    options = ctx.meta if ctx is not None else {}
    try:
        address = control_address(data_dir, grpc_address)
        key = admin_key(data_dir, grpc_address, options.get("deepfs.key"))
        tls_ca = tls_ca_of(data_dir, grpc_address, options.get("deepfs.tls_ca"))
    except (ConfigError, AuthError) as exc:
        fail(str(exc), fail_status)
    with authenticated_channel(address, key, tls_ca) as channel:
        try:
            yield control_pb2_grpc.ClusterStub(channel)
        except grpc.RpcError as exc:
            fail(rpc_error_message(exc, address, key), fail_status)
        except PermissionError as exc:  # the server did not prove it knows the key's secret
            fail(f"permission denied: {exc}", fail_status)


def rpc_error_message(exc: grpc.RpcError, address: str, key: Key | None = None) -> str:
    """One line for a failed control-plane call: the server's own words when it refused the request."""
    code = exc.code() if isinstance(exc, grpc.Call) else None
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, None):
        return f"metadata server at {address} is unreachable ({code.name if code else exc})"
    details = exc.details() if isinstance(exc, grpc.Call) else None
    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        who = (f"no key: set {KEY_ENV} or pass --key" if key is None
               else f"key {key.identity.name!r}, role {key.identity.role}")
        return f"permission denied: {details or code.name} ({who}; an admin key is needed)"
    return details or f"metadata server at {address} refused: {code.name}"
