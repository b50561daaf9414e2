"""What the ``deepfs`` commands share: finding a cluster, and the failure rule.

Failure rule: every failure ends in one line on stderr and a non-zero exit
status (1 unless the command documents another, as ``fsck`` does).

Finding a cluster: ``status``, ``fsck`` and the ``node`` admin commands take
``cluster_options`` — ``--data-dir`` of a local cluster started with
``deepfs up`` (its state file names the control plane), or ``--grpc
HOST:PORT`` of any cluster's control plane — and talk to it through
``control_plane``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn, TypeVar

import click
import grpc

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
    return data_dir_option(command)


def control_address(data_dir: str, grpc_address: str | None) -> str:
    """The control plane named by ``--grpc``, else the one of the local cluster in ``data_dir``."""
    if grpc_address:
        return grpc_address
    from deepfs.local_cluster import ClusterState

    return ClusterState.load(data_dir).grpc_address


@contextmanager
def control_plane(data_dir: str, grpc_address: str | None,
                  fail_status: int = 1) -> Iterator[control_pb2_grpc.ClusterStub]:
    """A ``Cluster`` stub for the cluster the options name; any failure inside ends the command."""
    try:
        address = control_address(data_dir, grpc_address)
    except ConfigError as exc:
        fail(str(exc), fail_status)
    with grpc.insecure_channel(address) as channel:
        try:
            yield control_pb2_grpc.ClusterStub(channel)
        except grpc.RpcError as exc:
            fail(rpc_error_message(exc, address), fail_status)


def rpc_error_message(exc: grpc.RpcError, address: str) -> str:
    """One line for a failed control-plane call: the server's own words when it refused the request."""
    code = exc.code() if isinstance(exc, grpc.Call) else None
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, None):
        return f"metadata server at {address} is unreachable ({code.name if code else exc})"
    details = exc.details() if isinstance(exc, grpc.Call) else None
    return details or f"metadata server at {address} refused: {code.name}"
