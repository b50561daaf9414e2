"""Which etcd answers ``EtcdClient`` retries (on another member) and which become an errno at once.

etcd 3.4 maps only its own errors to gRPC codes: a request whose deadline passed inside the server (a
linearizable read waiting for a leader during an election) comes back as UNKNOWN with the text
"context deadline exceeded". A leader-kill test once failed a client's read with EIO on exactly that.
The answers here are grpc's own error type carrying the codes and texts etcd sends.
"""

from __future__ import annotations

import errno

import grpc
import pytest

from deepfs.etcd_client import _translate, retryable

pytestmark = [pytest.mark.unit, pytest.mark.timeout(10)]


class Answer(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


@pytest.mark.parametrize(("code", "details"), [
    (grpc.StatusCode.UNAVAILABLE, "etcdserver: request timed out"),
    (grpc.StatusCode.UNAVAILABLE, "etcdserver: leader changed"),
    (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"),
    (grpc.StatusCode.UNKNOWN, "context deadline exceeded"),
    (grpc.StatusCode.CANCELLED, "rpc error: context deadline exceeded"),
])
def test_a_member_without_a_leader_or_time_is_retried(code: grpc.StatusCode, details: str) -> None:
    assert retryable(Answer(code, details))


@pytest.mark.parametrize(("code", "details", "expected"), [
    (grpc.StatusCode.UNKNOWN, "some other failure", errno.EIO),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, "etcdserver: mvcc: database space exceeded", errno.ENOSPC),
    (grpc.StatusCode.INVALID_ARGUMENT, "etcdserver: too many operations in txn request", errno.E2BIG),
    (grpc.StatusCode.NOT_FOUND, "etcdserver: requested lease not found", errno.ENOENT),
])
def test_other_answers_become_an_errno_at_once(code: grpc.StatusCode, details: str, expected: int) -> None:
    answer = Answer(code, details)
    assert not retryable(answer)
    assert _translate(answer, "range").errno == expected
