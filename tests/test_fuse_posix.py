"""The mount's own POSIX rules (fuse_client/posix.py): pure, no mount."""

from __future__ import annotations

import errno
import os
import stat
from types import SimpleNamespace

import pytest

from deepfs.messages import NAME_MAX, RENAME_EXCHANGE, RENAME_NOREPLACE
from fuse_client.posix import (
    caller,
    check_name,
    check_regular_file,
    check_rename_flags,
    inode_held,
    may_access,
    permissions_without_set_id,
    setattr_changes,
    setattr_drops_set_id_bits,
    syscall_errno,
)

pytestmark = pytest.mark.unit


def fields(**changed: bool) -> SimpleNamespace:
    names = ("mode", "uid", "gid", "size", "atime", "mtime")
    return SimpleNamespace(**{f"update_{n}": changed.get(n, False) for n in names})


def test_names_past_name_max_are_too_long() -> None:
    check_name(b"x" * NAME_MAX)
    with pytest.raises(OSError) as info:
        check_name(b"x" * (NAME_MAX + 1))
    assert info.value.errno == errno.ENAMETOOLONG


def test_rename_takes_noreplace_and_exchange_only() -> None:
    check_rename_flags(0)
    check_rename_flags(RENAME_NOREPLACE)
    check_rename_flags(RENAME_EXCHANGE)
    with pytest.raises(OSError) as info:
        check_rename_flags(4)  # RENAME_WHITEOUT
    assert info.value.errno == errno.EINVAL


@pytest.mark.parametrize(("mode", "expected"), [
    (stat.S_IFDIR | 0o755, errno.EISDIR),
    (stat.S_IFLNK | 0o777, errno.EEXIST),
    (stat.S_IFIFO | 0o644, errno.EEXIST),
])
def test_create_that_found_no_regular_file(mode: int, expected: int) -> None:
    check_regular_file(stat.S_IFREG | 0o644)
    with pytest.raises(OSError) as info:
        check_regular_file(mode)
    assert info.value.errno == expected


def test_a_vanished_held_inode_is_stale_and_other_errors_pass() -> None:
    with pytest.raises(OSError) as info, inode_held():
        raise FileNotFoundError(errno.ENOENT, "gone")
    assert info.value.errno == errno.ESTALE
    with pytest.raises(PermissionError), inode_held():
        raise PermissionError(errno.EACCES, "no")


def test_syscall_errno_hides_connection_trouble() -> None:
    assert syscall_errno(ConnectionResetError(errno.ECONNRESET, "reset")) == errno.EIO
    assert syscall_errno(OSError("no errno")) == errno.EIO
    assert syscall_errno(OSError(errno.ENOSPC, "full")) == errno.ENOSPC


def test_caller_is_the_requests_uid_and_gid() -> None:
    assert caller(SimpleNamespace(uid=1000, gid=100, pid=7)) == {"uid": 1000, "gid": 100}


@pytest.mark.parametrize(("mode", "expected"), [
    (stat.S_IFREG | 0o4755, 0o755),  # setuid goes
    (stat.S_IFREG | 0o2755, 0o755),  # setgid of a group-executable file goes
    (stat.S_IFREG | 0o2745, None),  # setgid without group exec is mandatory locking: stays
    (stat.S_IFREG | 0o644, None),  # nothing to drop
    (stat.S_IFDIR | 0o2775, None),  # a directory's setgid means inheritance
])
def test_permissions_without_set_id(mode: int, expected: int | None) -> None:
    assert permissions_without_set_id(mode) == expected


def test_setattr_changes_send_only_what_the_kernel_set() -> None:
    attr = SimpleNamespace(st_mode=stat.S_IFREG | 0o4700, st_uid=5, st_gid=6, st_atime_ns=1, st_mtime_ns=2,
                           st_size=99)
    assert setattr_changes(fields(), attr) == {}
    assert setattr_changes(fields(mode=True, mtime=True), attr) == {"mode": 0o4700, "mtime_ns": 2}
    assert setattr_changes(fields(uid=True, gid=True, atime=True, size=True), attr) == {
        "uid": 5, "gid": 6, "atime_ns": 1}


def test_chown_and_unprivileged_truncate_drop_set_id_bits() -> None:
    assert setattr_drops_set_id_bits(fields(uid=True), uid=0)
    assert setattr_drops_set_id_bits(fields(gid=True), uid=1000)
    assert setattr_drops_set_id_bits(fields(size=True), uid=1000)
    assert not setattr_drops_set_id_bits(fields(size=True), uid=0)
    assert not setattr_drops_set_id_bits(fields(uid=True, mode=True), uid=1000)  # the mode given wins
    assert not setattr_drops_set_id_bits(fields(mtime=True), uid=1000)


def test_may_access_owner_group_other_and_root() -> None:
    attr = {"mode": stat.S_IFREG | 0o640, "uid": 10, "gid": 20}
    assert may_access(attr, os.R_OK | os.W_OK, 10, 99)
    assert may_access(attr, os.R_OK, 11, 20) and not may_access(attr, os.W_OK, 11, 20)
    assert not may_access(attr, os.R_OK, 11, 21)
    assert may_access(attr, os.R_OK | os.W_OK, 0, 0)
    assert not may_access(attr, os.X_OK, 0, 0)  # root executes only what someone may execute
