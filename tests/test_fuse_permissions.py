"""POSIX permissions and ownership on the mount, checked as non-root users.

Each check runs a small Python program under setpriv with another uid/gid
(the mount allows other users in); it reports errno values as JSON. The last
tests check who gets into a mount at all: root's mounts let everyone in by
default (``allow_other``), ``--no-allow-other`` only root.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from deepfs.local_cluster import LocalCluster
from fuse_client.options import FUSE_CONF, user_allow_other_enabled
from tests.conftest import mounted

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(60)]

ALICE, BOB = 1000, 1001
NOBODY = 65534
STAFF, OTHER_GROUP = 3000, 4000

PRELUDE = textwrap.dedent(
    """
    import json, os, stat, sys
    def err(fn, *args, **kwargs):
        try:
            fn(*args, **kwargs)
        except OSError as exc:
            return exc.errno
        return 0
    def create(path, data=b"x", mode=0o644):
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, mode)
        os.write(fd, data)
        os.close(fd)
    def read(path):
        with open(path, "rb") as f:
            return f.read()
    def write(path, data, mode="ab"):
        with open(path, mode) as f:
            f.write(data)
    """
)


def as_user(code: str, uid: int = ALICE, gid: int | None = None, groups: tuple[int, ...] = ()) -> dict:
    """Run ``code`` as uid/gid (and supplementary groups); it sets ``out``, returned here."""
    gid = uid if gid is None else gid
    group_arg = f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"
    program = PRELUDE + "out = {}\n" + textwrap.dedent(code) + "\nprint(json.dumps(out))\n"
    result = subprocess.run(
        ["setpriv", f"--reuid={uid}", f"--regid={gid}", group_arg, "--reset-env", sys.executable, "-c", program],
        capture_output=True, text=True, timeout=30, cwd="/",
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def make_file(path: Path, mode: int, data: bytes = b"secret", uid: int = 0, gid: int = 0) -> Path:
    path.write_bytes(data)
    os.chown(path, uid, gid)
    os.chmod(path, mode)
    return path


def make_dir(path: Path, mode: int, uid: int = 0, gid: int = 0) -> Path:
    path.mkdir()
    os.chown(path, uid, gid)
    os.chmod(path, mode)
    return path


def test_mode_bits_are_enforced(mnt_dir: Path) -> None:
    private = make_file(mnt_dir / "private", 0o600)
    readable = make_file(mnt_dir / "readable", 0o644)
    locked = make_dir(mnt_dir / "locked", 0o755)
    make_file(locked / "existing", 0o666)
    hidden = make_dir(mnt_dir / "hidden", 0o700)
    make_file(hidden / "inside", 0o644)
    out = as_user(f"""
        out["read_private"] = err(read, {str(private)!r})
        out["read_readable"] = read({str(readable)!r}).decode()
        out["write_readable"] = err(write, {str(readable)!r}, b"x")
        out["truncate_readable"] = err(os.truncate, {str(readable)!r}, 0)
        out["create_in_locked"] = err(create, {str(locked / "new")!r})
        out["mkdir_in_locked"] = err(os.mkdir, {str(locked / "newdir")!r})
        out["unlink_in_locked"] = err(os.unlink, {str(locked / "existing")!r})
        out["stat_in_hidden"] = err(os.stat, {str(hidden / "inside")!r})
        out["list_hidden"] = err(os.listdir, {str(hidden)!r})
        out["xattr_readable"] = err(os.setxattr, {str(readable)!r}, "user.k", b"v")
        out["access"] = [os.access({str(readable)!r}, os.R_OK), os.access({str(readable)!r}, os.W_OK),
                         os.access({str(private)!r}, os.R_OK)]
    """)
    assert out == {
        "read_private": 13, "read_readable": "secret", "write_readable": 13, "truncate_readable": 13,
        "create_in_locked": 13, "mkdir_in_locked": 13, "unlink_in_locked": 13, "stat_in_hidden": 13,
        "list_hidden": 13, "xattr_readable": 13, "access": [True, False, False],
    }
    assert readable.read_bytes() == b"secret"


def test_new_inodes_belong_to_the_caller(mnt_dir: Path) -> None:
    as_user(f"""
        base = {str(mnt_dir)!r}
        create(base + "/file")
        os.mkdir(base + "/dir")
        os.symlink("file", base + "/link")
        os.mkfifo(base + "/fifo")
        os.link(base + "/file", base + "/hard")
    """)
    for name in ("file", "dir", "link", "fifo", "hard"):
        st = os.lstat(mnt_dir / name)
        assert (st.st_uid, st.st_gid) == (ALICE, ALICE), name


def test_sticky_directory(mnt_dir: Path) -> None:
    shared = make_dir(mnt_dir / "tmp", 0o1777)
    as_user(f"""create({str(shared / "alice")!r})""", ALICE)
    out = as_user(f"""
        out["unlink"] = err(os.unlink, {str(shared / "alice")!r})
        out["rename"] = err(os.rename, {str(shared / "alice")!r}, {str(shared / "bob")!r})
        create({str(shared / "mine")!r})
        out["replace"] = err(os.rename, {str(shared / "mine")!r}, {str(shared / "alice")!r})
        out["own"] = err(os.unlink, {str(shared / "mine")!r})
    """, BOB)
    assert out == {"unlink": 1, "rename": 1, "replace": 1, "own": 0}
    out = as_user(f"""
        out["rename"] = err(os.rename, {str(shared / "alice")!r}, {str(shared / "alice2")!r})
        out["unlink"] = err(os.unlink, {str(shared / "alice2")!r})
    """, ALICE)
    assert out == {"rename": 0, "unlink": 0}
    assert os.listdir(shared) == []


def test_setgid_directory_inheritance(mnt_dir: Path) -> None:
    project = make_dir(mnt_dir / "project", 0o2777, gid=STAFF)
    as_user(f"""
        create({str(project / "file")!r})
        os.mkdir({str(project / "sub")!r})
        create({str(project / "sub" / "deeper")!r})
    """, ALICE)
    assert os.stat(project / "file").st_gid == STAFF
    sub = os.stat(project / "sub")
    assert sub.st_gid == STAFF and sub.st_mode & stat.S_ISGID
    assert os.stat(project / "sub" / "deeper").st_gid == STAFF
    assert os.stat(project / "file").st_uid == ALICE


def test_chmod_and_chown_rules(mnt_dir: Path) -> None:
    as_user(f"""create({str(mnt_dir / "alices")!r})""", ALICE)
    alices = str(mnt_dir / "alices")
    out = as_user(f"""
        out["chmod_other"] = err(os.chmod, {alices!r}, 0o777)
        out["chown_other"] = err(os.chown, {alices!r}, {BOB}, -1)
    """, BOB)
    assert out == {"chmod_other": 1, "chown_other": 1}
    out = as_user(f"""
        out["chmod_own"] = err(os.chmod, {alices!r}, 0o640)
        out["give_away"] = err(os.chown, {alices!r}, {BOB}, -1)
        out["chgrp_not_member"] = err(os.chown, {alices!r}, -1, {OTHER_GROUP})
        out["chgrp_member"] = err(os.chown, {alices!r}, -1, {STAFF})
    """, ALICE, groups=(STAFF,))
    assert out == {"chmod_own": 0, "give_away": 1, "chgrp_not_member": 1, "chgrp_member": 0}
    st = os.stat(alices)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (ALICE, STAFF, 0o640)
    # Setting set-group-ID on a file of a group one is not in silently drops the bit.
    as_user(f"""os.chmod({alices!r}, 0o2755)""", ALICE)
    assert stat.S_IMODE(os.stat(alices).st_mode) == 0o755


def test_setuid_bits_cleared_by_writes_of_others_and_chown(mnt_dir: Path) -> None:
    tool = make_file(mnt_dir / "tool", 0o6777, b"#!/bin/sh\n")
    as_user(f"""write({str(tool)!r}, b"echo tampered\\n")""", ALICE)
    mode = os.stat(tool).st_mode
    assert not mode & stat.S_ISUID and not mode & stat.S_ISGID
    os.chmod(tool, 0o6777)
    with open(tool, "ab") as f:  # root (CAP_FSETID) keeps them
        f.write(b"# root was here\n")
    assert stat.S_IMODE(os.stat(tool).st_mode) == 0o6777
    as_user(f"""os.truncate({str(tool)!r}, 3)""", ALICE)
    assert stat.S_IMODE(os.stat(tool).st_mode) == 0o777
    os.chmod(tool, 0o6755)
    os.chown(tool, ALICE, ALICE)  # even root's chown clears them
    assert stat.S_IMODE(os.stat(tool).st_mode) == 0o755


def test_utime_rules(mnt_dir: Path) -> None:
    shared = make_file(mnt_dir / "shared", 0o666)
    readonly = make_file(mnt_dir / "readonly", 0o644)
    out = as_user(f"""
        out["now_with_write_permission"] = err(os.utime, {str(shared)!r}, None)
        out["explicit_not_owner"] = err(os.utime, {str(shared)!r}, (1, 1))
        out["now_without_write"] = err(os.utime, {str(readonly)!r}, None)
    """, ALICE)
    assert out == {"now_with_write_permission": 0, "explicit_not_owner": 1, "now_without_write": 13}


def test_root_overrides_but_needs_an_execute_bit(mnt_dir: Path) -> None:
    private = make_file(mnt_dir / "alices-private", 0o600, uid=ALICE, gid=ALICE)
    assert private.read_bytes() == b"secret"  # root reads through mode bits
    assert not os.access(private, os.X_OK)


def mount_options(mountpoint: Path) -> set[str]:
    """The options /proc/self/mounts lists for the (top) mount at ``mountpoint``."""
    found: set[str] = set()
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[1] == str(mountpoint):
            found = set(fields[3].split(","))
    return found


def test_root_mounts_let_other_users_in_with_kernel_permission_checks(cluster: LocalCluster) -> None:
    assert os.geteuid() == 0, "the FUSE layer runs as root"
    with mounted(cluster, "default-mount", allow_other=None) as mount:  # no flag: the daemon's default
        assert {"allow_other", "default_permissions"} <= mount_options(mount.path)
        base = mount.subdir("defaults")
        readable = make_file(base / "readable", 0o644)
        private = make_file(base / "private", 0o600)
        out = as_user(f"""
            out["read_readable"] = read({str(readable)!r}).decode()
            out["read_private"] = err(read, {str(private)!r})
            out["write_readable"] = err(write, {str(readable)!r}, b"x")
        """, NOBODY)
    assert out == {"read_readable": "secret", "read_private": 13, "write_readable": 13}


def test_no_allow_other_lets_only_the_mounting_user_in(cluster: LocalCluster) -> None:
    with mounted(cluster, "private-mount", allow_other=False) as mount:
        options = mount_options(mount.path)
        assert "default_permissions" in options and "allow_other" not in options
        base = mount.subdir("private")
        base.chmod(0o777)
        readable = make_file(base / "readable", 0o644)
        out = as_user(f"""
            out["stat_mount"] = err(os.stat, {str(mount.path)!r})
            out["list_mount"] = err(os.listdir, {str(mount.path)!r})
            out["read_world_readable"] = err(read, {str(readable)!r})
            out["create_in_world_writable"] = err(create, {str(base / "new")!r})
        """, NOBODY)
        assert readable.read_bytes() == b"secret"  # root, the mounting user, still gets in
        (base / "roots").write_bytes(b"mine")
        assert sorted(os.listdir(base)) == ["readable", "roots"]
    assert out == {"stat_mount": 13, "list_mount": 13, "read_world_readable": 13, "create_in_world_writable": 13}


def test_non_root_allow_other_without_fuse_conf_permission_is_one_line() -> None:
    if FUSE_CONF.exists() and user_allow_other_enabled(FUSE_CONF.read_text(errors="replace")):
        pytest.skip(f"{FUSE_CONF} enables user_allow_other here")
    project_root = str(Path(__file__).resolve().parent.parent)
    result = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable,
         "-m", "fuse_client", "127.0.0.1:1", "/", "--allow-other", "--foreground"],
        capture_output=True, text=True, timeout=30, cwd="/",
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": project_root},
    )
    assert result.returncode == 1
    assert len(result.stderr.splitlines()) == 1 and "user_allow_other" in result.stderr, result.stderr
