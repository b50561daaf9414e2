"""Model test: random file system operations applied to the mount and to a
local directory must give the same results (errno included) and leave the
same tree behind. Descriptors stay open across steps, so files are also
renamed, replaced, truncated and unlinked while open."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from tests.conftest import Mounted

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(180)]

NAMES = ["a", "b", "c", "d/a", "d/b", "e/f/g"]
names = st.sampled_from(NAMES)
offsets = st.sampled_from([0, 1, 4095, 262_143, 262_144, 300_000, 1_000_000])
payloads = st.binary(min_size=0, max_size=70_000) | st.sampled_from([b"", b"x", bytes(300_000)])


def outcome(fn: Callable[[], object]) -> object:
    try:
        return fn()
    except OSError as exc:
        return f"errno {exc.errno}"


def snapshot(root: Path) -> dict[str, tuple]:
    tree: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            st_ = os.lstat(path)
            rel = str(path.relative_to(root))
            if stat.S_ISLNK(st_.st_mode):
                tree[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st_.st_mode):
                tree[rel] = ("dir", st_.st_nlink)
            else:
                tree[rel] = ("file", st_.st_size, st_.st_nlink, path.read_bytes())
    return tree


def test_mount_behaves_like_a_local_file_system(fuse_mount: Mounted) -> None:
    class SameAsLocal(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.local = Path(tempfile.mkdtemp(prefix="model-"))
            self.remote = fuse_mount.subdir("model")
            self.fds: dict[int, tuple[int, int]] = {}  # slot → (local fd, remote fd)

        def teardown(self) -> None:
            for local_fd, remote_fd in self.fds.values():
                os.close(local_fd)
                os.close(remote_fd)
            shutil.rmtree(self.local, ignore_errors=True)
            shutil.rmtree(self.remote, ignore_errors=True)

        def both(self, op: Callable[[Path], object]) -> None:
            expected = outcome(lambda: op(self.local))
            got = outcome(lambda: op(self.remote))
            assert got == expected

        @rule(name=names, data=payloads)
        def write_file(self, name: str, data: bytes) -> None:
            def op(root: Path) -> None:
                with open(root / name, "wb") as f:
                    f.write(data)
            self.both(op)

        @rule(name=names, offset=offsets, data=payloads)
        def pwrite(self, name: str, offset: int, data: bytes) -> None:
            def op(root: Path) -> int:
                fd = os.open(root / name, os.O_WRONLY)
                try:
                    return os.pwrite(fd, data, offset)
                finally:
                    os.close(fd)
            self.both(op)

        @rule(name=names, data=payloads)
        def append(self, name: str, data: bytes) -> None:
            def op(root: Path) -> None:
                with open(root / name, "ab") as f:
                    f.write(data)
            self.both(op)

        @rule(name=names, size=offsets)
        def truncate(self, name: str, size: int) -> None:
            self.both(lambda root: os.truncate(root / name, size))

        @rule(name=names, offset=offsets, size=st.sampled_from([1, 5000, 300_000]))
        def read(self, name: str, offset: int, size: int) -> None:
            def op(root: Path) -> bytes:
                fd = os.open(root / name, os.O_RDONLY)
                try:
                    return os.pread(fd, size, offset)
                finally:
                    os.close(fd)
            self.both(op)

        @rule(name=names)
        def unlink(self, name: str) -> None:
            self.both(lambda root: os.unlink(root / name))

        @rule(name=st.sampled_from(["d", "e", "e/f", "d/a"]))
        def mkdir(self, name: str) -> None:
            self.both(lambda root: os.mkdir(root / name))

        @rule(name=st.sampled_from(["d", "e", "e/f", "d/a"]))
        def rmdir(self, name: str) -> None:
            self.both(lambda root: os.rmdir(root / name))

        @rule(src=names, dst=names)
        def rename(self, src: str, dst: str) -> None:
            self.both(lambda root: os.rename(root / src, root / dst))

        @rule(src=st.sampled_from(["d", "e", "e/f"]), dst=st.sampled_from(["d", "e", "e/f", "d/a", "x"]))
        def rename_dir(self, src: str, dst: str) -> None:
            self.both(lambda root: os.rename(root / src, root / dst))

        @rule(src=names, dst=names)
        def link(self, src: str, dst: str) -> None:
            self.both(lambda root: os.link(root / src, root / dst))

        @rule(pointee=names, name=names)
        def symlink(self, pointee: str, name: str) -> None:
            self.both(lambda root: os.symlink(pointee, root / name))

        @rule(slot=st.integers(0, 2), name=names, append=st.booleans())
        def open_fd(self, slot: int, name: str, append: bool) -> None:
            if slot in self.fds:
                return
            flags = os.O_RDWR | (os.O_APPEND if append else 0)
            local = outcome(lambda: os.open(self.local / name, flags))
            remote = outcome(lambda: os.open(self.remote / name, flags))
            if isinstance(local, int) and isinstance(remote, int):
                self.fds[slot] = (local, remote)
            else:
                for fd in (local, remote):
                    if isinstance(fd, int):
                        os.close(fd)
                assert local == remote

        @rule(slot=st.integers(0, 2), offset=offsets, data=payloads)
        def fd_write(self, slot: int, offset: int, data: bytes) -> None:
            if slot in self.fds:
                local, remote = self.fds[slot]
                assert os.pwrite(remote, data, offset) == os.pwrite(local, data, offset)

        @rule(slot=st.integers(0, 2), offset=offsets, size=st.sampled_from([1, 5000, 400_000]))
        def fd_read(self, slot: int, offset: int, size: int) -> None:
            if slot in self.fds:
                local, remote = self.fds[slot]
                assert os.pread(remote, size, offset) == os.pread(local, size, offset)
                assert os.fstat(remote).st_size == os.fstat(local).st_size
                assert os.fstat(remote).st_nlink == os.fstat(local).st_nlink

        @rule(slot=st.integers(0, 2))
        def close_fd(self, slot: int) -> None:
            if slot in self.fds:
                local, remote = self.fds.pop(slot)
                os.close(local)
                os.close(remote)

        @invariant()
        def same_tree(self) -> None:
            assert snapshot(self.remote) == snapshot(self.local)

    run_state_machine_as_test(
        SameAsLocal,
        settings=settings(max_examples=12, stateful_step_count=25, deadline=None,
                          suppress_health_check=list(HealthCheck)),
    )
