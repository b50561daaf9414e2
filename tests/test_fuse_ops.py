"""Every FUSE operation through real syscalls on a real mount, errno cases included.

One cluster and one mount for the module; each test works in its own directory.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

import deepfs
from deepfs.testing import wait_for
from tests.conftest import Mounted
from tests.fuse_syscalls import RENAME_EXCHANGE, RENAME_NOREPLACE, UTIME_NOW, UTIME_OMIT, renameat2, utimensat

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(60)]


def errno_of(fn, *args, **kwargs) -> int:
    with pytest.raises(OSError) as info:
        fn(*args, **kwargs)
    return info.value.errno


def write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


# ------------------------------------------------------------------ files
def test_create_write_read_stat(mnt_dir: Path) -> None:
    data = os.urandom(700_000)  # several 256 KiB stripes, last one short
    write(mnt_dir / "f", data)
    st = os.stat(mnt_dir / "f")
    assert stat.S_ISREG(st.st_mode) and st.st_size == len(data) and st.st_nlink == 1
    assert st.st_uid == os.getuid() and st.st_gid == os.getgid()
    assert (mnt_dir / "f").read_bytes() == data
    with open(mnt_dir / "f", "rb") as f:
        f.seek(300_000)
        assert f.read(1000) == data[300_000:301_000]
        f.seek(len(data) - 10)
        assert f.read(100) == data[-10:]
        assert f.read(100) == b""
    assert errno_of(os.stat, mnt_dir / "missing") == errno.ENOENT


def test_open_flags(mnt_dir: Path) -> None:
    path = mnt_dir / "f"
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
    os.write(fd, b"hello world")
    os.close(fd)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640 & ~_umask()
    assert errno_of(os.open, path, os.O_CREAT | os.O_EXCL | os.O_WRONLY) == errno.EEXIST
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    assert os.fstat(fd).st_size == 0
    os.write(fd, b"abc")
    os.close(fd)
    assert path.read_bytes() == b"abc"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"def")
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, b"ghi")  # O_APPEND: still at the end
    os.close(fd)
    assert path.read_bytes() == b"abcdefghi"
    assert errno_of(os.open, mnt_dir / "nope", os.O_RDONLY) == errno.ENOENT
    assert errno_of(os.open, mnt_dir, os.O_WRONLY) == errno.EISDIR
    assert errno_of(os.open, path / "x", os.O_CREAT | os.O_WRONLY) == errno.ENOTDIR


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_two_descriptors_share_writes_and_append(mnt_dir: Path) -> None:
    path = mnt_dir / "shared"
    a = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    b = os.open(path, os.O_RDWR)
    try:
        os.pwrite(a, b"x" * 5000, 0)
        assert os.pread(b, 5000, 0) == b"x" * 5000  # before any close
        assert os.fstat(b).st_size == 5000
        c = os.open(path, os.O_WRONLY | os.O_APPEND)
        os.write(c, b"tail")
        os.close(c)
        assert os.pread(a, 10, 4998) == b"xxtail"
    finally:
        os.close(a)
        os.close(b)
    assert os.stat(path).st_size == 5004


def test_fsync_and_fdatasync_put_the_bytes_in_the_cluster(mnt_dir: Path, fuse_mount: Mounted) -> None:
    """Checked through another client while the file is still open: it sees only
    what reached the cluster, never the mount's write-back buffers."""
    data = os.urandom(300_000)
    in_cluster = "/" + str((mnt_dir / "f").relative_to(fuse_mount.path))
    fd = os.open(mnt_dir / "f", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        with deepfs.Client(fuse_mount.cluster.meta_address) as other:
            os.write(fd, data)
            os.fsync(fd)
            assert other.read_file(in_cluster) == data
            os.pwrite(fd, b"tail", len(data))
            os.fdatasync(fd)
            assert other.read_file(in_cluster) == data + b"tail"
    finally:
        os.close(fd)
    dfd = os.open(mnt_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)  # a directory's fsync succeeds (its entries are committed already)
    finally:
        os.close(dfd)
    assert (mnt_dir / "f").read_bytes() == data + b"tail"


def test_a_failed_store_fails_every_later_fsync_and_close_and_commits_no_zeros(
        mnt_dir: Path, fuse_mount: Mounted) -> None:
    """The self-healing issue's reproduction, through the mount: a layout wider than
    the cluster cannot store the 9 bytes. The first fsync said EINVAL, the second
    said 0 and close committed the size: another client read nine zero bytes."""
    in_cluster = "/" + str(mnt_dir.relative_to(fuse_mount.path))
    with deepfs.Client(fuse_mount.cluster.meta_address) as other:
        other.mkdir(in_cluster + "/wide")
        other.set_layout(in_cluster + "/wide", deepfs.Layout(k=16, m=8, stripe_size=16 * 4096))
        fd = os.open(mnt_dir / "wide" / "f.txt", os.O_CREAT | os.O_WRONLY, 0o644)
        try:
            assert os.pwrite(fd, b"important", 64 << 10) == 9  # past inline_max_bytes: stored on the nodes
            assert errno_of(os.fsync, fd) == errno.EINVAL
            assert errno_of(os.fsync, fd) == errno.EINVAL
        finally:
            close_errno = errno_of(os.close, fd)
        assert close_errno == errno.EINVAL
        assert other.read_file(in_cluster + "/wide/f.txt") == b""


def test_sparse_file_reads_zeros(mnt_dir: Path) -> None:
    path = mnt_dir / "sparse"
    with open(path, "wb") as f:
        f.seek(3 << 20)
        f.write(b"end")
        f.seek(100)
        f.write(b"start")
    data = path.read_bytes()
    assert len(data) == (3 << 20) + 3
    assert data[:100] == bytes(100) and data[100:105] == b"start"
    assert data[105 : 3 << 20] == bytes((3 << 20) - 105)
    assert data[-3:] == b"end"
    os.truncate(path, 5 << 20)  # extend: a hole at the end
    with open(path, "rb") as f:
        f.seek(4 << 20)
        assert f.read() == bytes(1 << 20)


def test_file_larger_than_4_gib(mnt_dir: Path) -> None:
    path = mnt_dir / "huge"
    offset = (5 << 30) + 12345
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.pwrite(fd, b"far away", offset)
        os.pwrite(fd, b"near 4G", (4 << 30) - 3)
    finally:
        os.close(fd)
    assert os.stat(path).st_size == offset + 8
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(fd, 8, offset) == b"far away"
        assert os.pread(fd, 7, (4 << 30) - 3) == b"near 4G"
        assert os.pread(fd, 4096, 1 << 32 | 1 << 20) == bytes(4096)
    finally:
        os.close(fd)


def test_truncate(mnt_dir: Path) -> None:
    path = mnt_dir / "t"
    data = os.urandom(600_000)
    write(path, data)
    os.truncate(path, 300_001)
    assert path.read_bytes() == data[:300_001]
    os.truncate(path, 400_000)
    assert path.read_bytes() == data[:300_001] + bytes(99_999)
    with open(path, "r+b") as f:
        f.write(b"Z")
        f.truncate(10)
        f.seek(0)
        assert f.read() == b"Z" + data[1:10]
    assert errno_of(os.truncate, mnt_dir, 0) == errno.EISDIR


def test_unlinked_but_open_file_stays_usable(mnt_dir: Path, fuse_mount: Mounted) -> None:
    path = mnt_dir / "ghost"
    data = os.urandom(400_000)
    files_before = fuse_mount.cluster.status().files
    write(path, data)
    fd = os.open(path, os.O_RDWR)
    other = os.open(path, os.O_RDONLY)
    try:
        os.unlink(path)
        assert not path.exists()
        assert os.fstat(fd).st_nlink == 0
        time.sleep(1.5)  # past the server's garbage collection round: the orphan must survive it
        assert os.pread(fd, len(data), 0) == data
        os.pwrite(fd, b"still writable", 1000)
        os.fsync(fd)
        os.close(fd)
        fd = -1
        assert os.pread(other, 14, 1000) == b"still writable"
    finally:
        if fd >= 0:
            os.close(fd)
        os.close(other)
    assert os.listdir(mnt_dir) == []
    # The last close released the orphan (release runs after close(2) returns).
    wait_for(lambda: fuse_mount.cluster.status().files == files_before, 10, what="the orphan's inode to go")


def test_replaced_while_open_stays_readable(mnt_dir: Path) -> None:
    old, new = os.urandom(300_000), os.urandom(1000)
    write(mnt_dir / "target", old)
    write(mnt_dir / "incoming", new)
    fd = os.open(mnt_dir / "target", os.O_RDONLY)
    try:
        os.rename(mnt_dir / "incoming", mnt_dir / "target")
        assert (mnt_dir / "target").read_bytes() == new
        assert os.pread(fd, len(old), 0) == old
    finally:
        os.close(fd)


def test_mknod_regular_and_fifo(mnt_dir: Path) -> None:
    os.mknod(mnt_dir / "reg", stat.S_IFREG | 0o600)
    assert stat.S_ISREG(os.stat(mnt_dir / "reg").st_mode) and os.stat(mnt_dir / "reg").st_size == 0
    write(mnt_dir / "reg", b"data")
    assert (mnt_dir / "reg").read_bytes() == b"data"
    os.mkfifo(mnt_dir / "fifo", 0o644)
    assert stat.S_ISFIFO(os.stat(mnt_dir / "fifo").st_mode)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append((mnt_dir / "fifo").read_bytes()))
    reader.start()
    with open(mnt_dir / "fifo", "wb") as f:
        f.write(b"through the pipe")
    reader.join(10)
    assert received == [b"through the pipe"]
    assert errno_of(os.mknod, mnt_dir / "reg", stat.S_IFREG | 0o600) == errno.EEXIST


# ------------------------------------------------------------------ names
def test_mkdir_rmdir_unlink_errors(mnt_dir: Path) -> None:
    os.mkdir(mnt_dir / "d", 0o750)
    st = os.stat(mnt_dir / "d")
    assert stat.S_ISDIR(st.st_mode) and st.st_nlink == 2
    os.mkdir(mnt_dir / "d" / "sub")
    assert os.stat(mnt_dir / "d").st_nlink == 3
    assert errno_of(os.mkdir, mnt_dir / "d") == errno.EEXIST
    write(mnt_dir / "d" / "sub" / "f", b"x")
    assert errno_of(os.rmdir, mnt_dir / "d") == errno.ENOTEMPTY
    assert errno_of(os.rmdir, mnt_dir / "d" / "sub" / "f") == errno.ENOTDIR
    assert errno_of(os.unlink, mnt_dir / "d" / "sub") == errno.EISDIR
    assert errno_of(os.unlink, mnt_dir / "d" / "missing") == errno.ENOENT
    assert errno_of(os.mkdir, mnt_dir / "d" / "sub" / "f" / "x") == errno.ENOTDIR
    os.unlink(mnt_dir / "d" / "sub" / "f")
    os.rmdir(mnt_dir / "d" / "sub")
    assert os.stat(mnt_dir / "d").st_nlink == 2
    os.rmdir(mnt_dir / "d")
    assert os.listdir(mnt_dir) == []


def test_names_up_to_255_bytes(mnt_dir: Path) -> None:
    longest = "é" * 127 + "x"  # 255 bytes of UTF-8
    write(mnt_dir / longest, b"ok")
    assert os.listdir(mnt_dir) == [longest]
    assert (mnt_dir / longest).read_bytes() == b"ok"
    too_long = "y" * 256
    assert errno_of(os.open, mnt_dir / too_long, os.O_CREAT | os.O_WRONLY) == errno.ENAMETOOLONG
    assert errno_of(os.mkdir, mnt_dir / too_long) == errno.ENAMETOOLONG
    assert errno_of(os.stat, mnt_dir / too_long) == errno.ENAMETOOLONG
    odd = b"bytes \xff\xfe not utf-8"
    write(Path(os.fsdecode(os.fsencode(mnt_dir) + b"/" + odd)), b"raw")
    assert odd in os.listdir(os.fsencode(mnt_dir))


def test_rename_replace_noreplace_exchange(mnt_dir: Path) -> None:
    write(mnt_dir / "a", b"A")
    write(mnt_dir / "b", b"B")
    ino_a = os.stat(mnt_dir / "a").st_ino
    os.rename(mnt_dir / "a", mnt_dir / "b")  # atomic replace
    assert (mnt_dir / "b").read_bytes() == b"A" and os.stat(mnt_dir / "b").st_ino == ino_a
    assert not (mnt_dir / "a").exists()
    write(mnt_dir / "c", b"C")
    assert errno_of(renameat2, mnt_dir / "c", mnt_dir / "b", RENAME_NOREPLACE) == errno.EEXIST
    renameat2(mnt_dir / "c", mnt_dir / "d", RENAME_NOREPLACE)
    renameat2(mnt_dir / "b", mnt_dir / "d", RENAME_EXCHANGE)
    assert (mnt_dir / "b").read_bytes() == b"C" and (mnt_dir / "d").read_bytes() == b"A"
    assert errno_of(renameat2, mnt_dir / "b", mnt_dir / "zz", RENAME_EXCHANGE) == errno.ENOENT
    assert errno_of(os.rename, mnt_dir / "missing", mnt_dir / "x") == errno.ENOENT


def test_rename_directories(mnt_dir: Path) -> None:
    for d in ("p1/d/inner", "p2", "full/x", "empty"):
        os.makedirs(mnt_dir / d)
    write(mnt_dir / "p1/d/inner/f", b"deep")
    write(mnt_dir / "file", b"f")
    os.rename(mnt_dir / "p1/d", mnt_dir / "p2/moved")  # across parents
    assert (mnt_dir / "p2/moved/inner/f").read_bytes() == b"deep"
    assert os.stat(mnt_dir / "p1").st_nlink == 2 and os.stat(mnt_dir / "p2").st_nlink == 3
    assert errno_of(os.rename, mnt_dir / "p2/moved", mnt_dir / "full") == errno.ENOTEMPTY
    os.rename(mnt_dir / "p2/moved", mnt_dir / "empty")  # replaces an empty directory
    assert (mnt_dir / "empty/inner/f").read_bytes() == b"deep"
    assert errno_of(os.rename, mnt_dir / "empty", mnt_dir / "empty/inner/sub") == errno.EINVAL
    assert errno_of(os.rename, mnt_dir / "file", mnt_dir / "full") == errno.EISDIR
    assert errno_of(os.rename, mnt_dir / "full", mnt_dir / "file") == errno.ENOTDIR


def test_cross_device_is_exdev(mnt_dir: Path, tmp_path: Path) -> None:
    write(mnt_dir / "f", b"x")
    assert errno_of(os.rename, mnt_dir / "f", tmp_path / "f") == errno.EXDEV
    assert errno_of(os.link, mnt_dir / "f", tmp_path / "f") == errno.EXDEV


def test_hard_links(mnt_dir: Path) -> None:
    write(mnt_dir / "orig", b"shared bytes")
    os.link(mnt_dir / "orig", mnt_dir / "second")
    os.mkdir(mnt_dir / "sub")
    os.link(mnt_dir / "orig", mnt_dir / "sub" / "third")
    assert os.stat(mnt_dir / "orig").st_nlink == 3
    assert os.stat(mnt_dir / "sub" / "third").st_ino == os.stat(mnt_dir / "orig").st_ino
    with open(mnt_dir / "second", "ab") as f:
        f.write(b"!")
    assert (mnt_dir / "sub" / "third").read_bytes() == b"shared bytes!"
    os.unlink(mnt_dir / "orig")
    assert os.stat(mnt_dir / "second").st_nlink == 2
    assert errno_of(os.link, mnt_dir / "sub", mnt_dir / "dirlink") == errno.EPERM
    assert errno_of(os.link, mnt_dir / "second", mnt_dir / "sub" / "third") == errno.EEXIST


def test_symlinks(mnt_dir: Path) -> None:
    write(mnt_dir / "target", b"pointed at")
    os.symlink("target", mnt_dir / "rel")
    os.symlink(str(mnt_dir / "target"), mnt_dir / "abs")
    os.symlink("nowhere/at/all", mnt_dir / "dangling")
    assert os.readlink(mnt_dir / "rel") == "target"
    assert (mnt_dir / "rel").read_bytes() == (mnt_dir / "abs").read_bytes() == b"pointed at"
    assert stat.S_ISLNK(os.lstat(mnt_dir / "dangling").st_mode)
    assert os.lstat(mnt_dir / "dangling").st_size == len("nowhere/at/all")
    assert errno_of(os.stat, mnt_dir / "dangling") == errno.ENOENT
    assert errno_of(os.readlink, mnt_dir / "target") == errno.EINVAL
    assert errno_of(os.symlink, "x", mnt_dir / "rel") == errno.EEXIST
    os.unlink(mnt_dir / "rel")
    assert (mnt_dir / "target").exists()


def test_readdir_inodes_and_types(mnt_dir: Path) -> None:
    write(mnt_dir / "file", b"x")
    os.mkdir(mnt_dir / "dir")
    os.symlink("file", mnt_dir / "link")
    os.mkfifo(mnt_dir / "fifo")
    with os.scandir(mnt_dir) as it:
        entries = {e.name: e for e in it}
    assert sorted(entries) == ["dir", "fifo", "file", "link"]
    for name, entry in entries.items():
        assert entry.inode() == os.lstat(mnt_dir / name).st_ino
    assert entries["file"].is_file(follow_symlinks=False)
    assert entries["dir"].is_dir(follow_symlinks=False)
    assert entries["link"].is_symlink()
    listing = os.popen(f"ls -a '{mnt_dir}'").read().split()
    assert listing[:2] == [".", ".."]


def test_readdir_stable_while_entries_change(mnt_dir: Path) -> None:
    names = [f"e{i:04d}" for i in range(600)]
    for name in names:
        os.mknod(mnt_dir / name, stat.S_IFREG | 0o644)
    seen: list[str] = []
    removed: set[str] = set()
    dir_fd = os.open(mnt_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with os.scandir(dir_fd) as it:
            for i, entry in enumerate(it):
                seen.append(entry.name)
                if i % 50 == 0:  # remove one not yet listed, add new ones
                    victim = names[-1 - i // 50]
                    os.unlink(mnt_dir / victim)
                    removed.add(victim)
                    os.mknod(mnt_dir / f"new{i}", stat.S_IFREG | 0o644)
    finally:
        os.close(dir_fd)
    assert len(seen) == len(set(seen)), "an entry was listed twice"
    assert set(names) - removed <= set(seen), "an entry present throughout was skipped"


def test_statfs_reports_cluster_capacity(fuse_mount: Mounted) -> None:
    st = os.statvfs(fuse_mount.path)
    with deepfs.Client(fuse_mount.cluster.meta_address) as client:
        expected = client.statfs()
    assert st.f_namemax == 255
    assert st.f_blocks == expected["blocks"] and st.f_blocks > 0
    assert 0 < st.f_bfree <= st.f_blocks
    assert st.f_frsize * st.f_blocks > 1 << 30


def test_xattrs(mnt_dir: Path) -> None:
    path = mnt_dir / "f"
    write(path, b"x")
    os.setxattr(path, "user.color", b"blue")
    assert os.getxattr(path, "user.color") == b"blue"
    assert "user.color" in os.listxattr(path)
    assert errno_of(os.setxattr, path, "user.color", b"red", os.XATTR_CREATE) == errno.EEXIST
    os.setxattr(path, "user.color", b"red", os.XATTR_REPLACE)
    assert os.getxattr(path, "user.color") == b"red"
    assert errno_of(os.setxattr, path, "user.size", b"1", os.XATTR_REPLACE) == errno.ENODATA
    os.setxattr(path, "user.size", b"1", os.XATTR_CREATE)
    os.setxattr(path, "user.empty", b"")
    assert os.getxattr(path, "user.empty") == b""
    assert sorted(n for n in os.listxattr(path) if n.startswith("user.")) == ["user.color", "user.empty", "user.size"]
    os.removexattr(path, "user.color")
    assert errno_of(os.getxattr, path, "user.color") == errno.ENODATA
    assert errno_of(os.removexattr, path, "user.color") == errno.ENODATA
    os.mkdir(mnt_dir / "d")
    os.setxattr(mnt_dir / "d", "user.on-a-dir", b"yes")
    assert os.getxattr(mnt_dir / "d", "user.on-a-dir") == b"yes"


def test_access(mnt_dir: Path) -> None:
    write(mnt_dir / "f", b"#!/bin/sh\n")
    os.chmod(mnt_dir / "f", 0o644)
    assert os.access(mnt_dir / "f", os.R_OK | os.W_OK)
    assert not os.access(mnt_dir / "f", os.X_OK)  # even root needs some x bit
    os.chmod(mnt_dir / "f", 0o744)
    assert os.access(mnt_dir / "f", os.X_OK)
    assert not os.access(mnt_dir / "missing", os.F_OK)


# ------------------------------------------------------------------ attributes and times
def test_chmod_chown(mnt_dir: Path) -> None:
    path = mnt_dir / "f"
    write(path, b"x")
    before = os.stat(path)
    time.sleep(0.01)
    os.chmod(path, 0o4751)
    after = os.stat(path)
    assert stat.S_IMODE(after.st_mode) == 0o4751
    assert after.st_ctime_ns > before.st_ctime_ns and after.st_mtime_ns == before.st_mtime_ns
    os.chown(path, 1234, 5678)
    st = os.stat(path)
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    assert not st.st_mode & stat.S_ISUID  # chown clears set-user-ID
    os.chown(path, -1, 42)
    assert (os.stat(path).st_uid, os.stat(path).st_gid) == (1234, 42)


def test_utimensat_now_and_omit(mnt_dir: Path) -> None:
    path = mnt_dir / "f"
    write(path, b"x")
    os.utime(path, ns=(1_000_000_123, 2_000_000_456))
    st = os.stat(path)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 2_000_000_456)
    utimensat(path, (0, UTIME_OMIT), (5, 7))
    st = os.stat(path)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_123, 5_000_000_007)
    before = time.time_ns()
    utimensat(path, (0, UTIME_NOW), (0, UTIME_OMIT))
    st = os.stat(path)
    assert st.st_atime_ns >= before - 10_000_000 and st.st_mtime_ns == 5_000_000_007
    utimensat(path, (0, UTIME_OMIT), (0, UTIME_NOW))
    st = os.stat(path)
    assert st.st_mtime_ns >= before - 10_000_000 and st.st_atime_ns >= before - 10_000_000


def test_write_updates_mtime_and_ctime(mnt_dir: Path) -> None:
    path = mnt_dir / "f"
    write(path, b"first")
    os.utime(path, ns=(10**18, 10**18 - 1))  # 2001
    before = os.stat(path)
    with open(path, "ab") as f:
        f.write(b" second")
        f.flush()
        mid = os.fstat(f.fileno())  # before close: the write buffered in the mount counts
    after = os.stat(path)
    assert mid.st_mtime_ns != before.st_mtime_ns and mid.st_size == len(b"first second")
    assert after.st_mtime_ns != before.st_mtime_ns and after.st_ctime_ns > before.st_ctime_ns
    assert after.st_size == len(b"first second")


def test_times_set_on_an_open_descriptor_survive_close(mnt_dir: Path) -> None:
    """cp -p and tar set the times through the descriptor before close."""
    fd = os.open(mnt_dir / "f", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, os.urandom(100_000))
    os.utime(fd, ns=(123_000_000_000, 456_000_000_000))
    os.close(fd)
    st = os.stat(mnt_dir / "f")
    assert (st.st_atime_ns, st.st_mtime_ns, st.st_size) == (123_000_000_000, 456_000_000_000, 100_000)


def test_ctime_on_link_and_rename(mnt_dir: Path) -> None:
    write(mnt_dir / "f", b"x")
    t0 = os.stat(mnt_dir / "f").st_ctime_ns
    time.sleep(0.01)
    os.link(mnt_dir / "f", mnt_dir / "g")
    t1 = os.stat(mnt_dir / "f").st_ctime_ns
    assert t1 > t0
    time.sleep(0.01)
    os.rename(mnt_dir / "g", mnt_dir / "h")
    assert os.stat(mnt_dir / "h").st_ctime_ns > t1


def test_directory_times_follow_entries(mnt_dir: Path) -> None:
    os.mkdir(mnt_dir / "d")
    os.utime(mnt_dir / "d", ns=(10**9, 10**9))
    write(mnt_dir / "d" / "f", b"x")
    st = os.stat(mnt_dir / "d")
    assert st.st_mtime_ns > 10**9 and st.st_ctime_ns > 10**9


def test_reading_does_not_update_atime(mnt_dir: Path) -> None:
    """Documented atime policy (docs/FUSE.md): like noatime."""
    write(mnt_dir / "f", b"x")
    os.utime(mnt_dir / "f", ns=(10**9, 10**9))
    (mnt_dir / "f").read_bytes()
    assert os.stat(mnt_dir / "f").st_atime_ns == 10**9


@pytest.mark.kernel_caches  # drops the kernel's caches: alone among such tests (conftest)
def test_large_requests_and_byte_exact_round_trip(mnt_dir: Path, fuse_mount: Mounted) -> None:
    """The kernel sends 1 MiB writes (max_write) and, with the mount's read-ahead
    window raised, 1 MiB reads; sequential reads come from whole-stripe read-ahead."""
    data = os.urandom(12 << 20)
    with open(mnt_dir / "big", "wb") as f:
        f.write(data)
    subprocess.run(["sh", "-c", "echo 1 > /proc/sys/vm/drop_caches"], check=True)
    before = fuse_mount.process.request_stats()
    with open(mnt_dir / "big", "rb") as f:
        assert f.read() == data
    stats = fuse_mount.process.request_stats()
    assert stats["largest_write"] == 1 << 20
    assert stats["largest_read"] == 1 << 20
    assert stats["readahead_hits"] - before["readahead_hits"] >= (stats["reads"] - before["reads"]) // 2


@pytest.mark.kernel_caches  # counts on the kernel's cached pages: alone among such tests (conftest)
def test_page_cache_kept_for_unchanged_files(mnt_dir: Path, fuse_mount: Mounted) -> None:
    data = os.urandom(3 << 20)
    (mnt_dir / "cached").write_bytes(data)
    assert (mnt_dir / "cached").read_bytes() == data  # fills the page cache
    before = fuse_mount.process.request_stats()["reads"]
    for _ in range(3):
        assert (mnt_dir / "cached").read_bytes() == data
    assert fuse_mount.process.request_stats()["reads"] == before, "an unchanged file was read again"
    with open(mnt_dir / "cached", "r+b") as f:
        f.write(b"changed")
    assert (mnt_dir / "cached").read_bytes() == b"changed" + data[7:]


def test_o_direct_writes_skip_the_capability_check_and_stay_coherent(fuse_mount: Mounted, mnt_dir: Path) -> None:
    """An O_DIRECT descriptor is a direct-I/O handle: its writes cost no GETXATTR of
    security.capability each (a cached handle's do), a reader holding the file's pages in the
    kernel's cache sees them at once, and they are there after close and in a fresh open. A
    shared mmap of such a descriptor is refused (ENODEV, docs/FUSE.md); a private one works."""
    path = mnt_dir / "direct"
    old, new = os.urandom(1 << 20), os.urandom(16 * 4096)
    path.write_bytes(old)
    reader = os.open(path, os.O_RDONLY)
    writer = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        assert os.pread(reader, 1 << 20, 0) == old  # now in the kernel's page cache
        offsets = [i * 61_440 for i in range(16)]  # 15 pages apart: 16 writes into cached pages
        aligned = mmap.mmap(-1, 4096)
        before = fuse_mount.process.request_stats()
        for i, offset in enumerate(offsets):
            aligned[:] = new[i * 4096:(i + 1) * 4096]
            assert os.pwrite(writer, aligned, offset) == 4096
        after = fuse_mount.process.request_stats()
        assert after["op.write"] - before["op.write"] == len(offsets)
        assert after.get("op.getxattr", 0) == before.get("op.getxattr", 0)
        expected = bytearray(old)
        for i, offset in enumerate(offsets):
            expected[offset:offset + 4096] = new[i * 4096:(i + 1) * 4096]
        assert os.pread(reader, 1 << 20, 0) == expected  # before the writer's close
        with pytest.raises(OSError) as refused:
            mmap.mmap(writer, 4096)
        assert refused.value.errno == errno.ENODEV
        private = mmap.mmap(writer, 4096, flags=mmap.MAP_PRIVATE)
        assert private[:4096] == expected[:4096]
        private.close()
        os.fsync(writer)
    finally:
        os.close(writer)
        os.close(reader)
    assert path.read_bytes() == expected


@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_WRONLY | os.O_DIRECT, os.O_WRONLY | os.O_APPEND],
                         ids=["cached", "o_direct", "o_append"])
def test_a_write_drops_file_capabilities_through_every_kind_of_handle(mnt_dir: Path, flags: int) -> None:
    """A write removes security.capability. The kernel does it for a cached handle; for a
    direct-I/O one (O_DIRECT, O_APPEND) it leaves it to the daemon."""
    path = mnt_dir / "capable"
    path.write_bytes(b"\x7fELF" + bytes(4092))
    caps_v2 = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)  # effective CAP_NET_BIND_SERVICE
    os.setxattr(path, "security.capability", caps_v2)
    assert os.getxattr(path, "security.capability") == caps_v2
    fd = os.open(path, flags)
    try:
        block = mmap.mmap(-1, 4096)
        block[:4] = b"\x7fELF"
        assert os.pwrite(fd, block, 0) == 4096 if not flags & os.O_APPEND else os.write(fd, block) == 4096
    finally:
        os.close(fd)
    assert errno_of(os.getxattr, path, "security.capability") == errno.ENODATA
