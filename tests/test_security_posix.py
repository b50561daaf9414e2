"""POSIX permissions enforced by the metadata server for a library client with a non-root key.

No mount and no kernel in between: ``deepfs.Client`` with a key for uid 1000
(no ``trusted_mount``) talks to the metadata server, which must refuse what
the kernel's ``default_permissions`` would refuse. The first test runs one
script of operations twice, on a local kernel file system as the real uid
1000 (setpriv) and on DeepFS with the key, and compares every errno; the
others check what the kernel comparison cannot reach: chown rules, groups of
a key, read-only and subtree keys, and keys that act for their callers.
The test process itself runs as root and its client sends ctx uid 0: the
server must ignore that ctx for a plain client key.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import deepfs
from deepfs.auth import Identity, Key, load_cluster_secret, make_key, read_key_file
from deepfs.frames import Op
from deepfs.layout import Layout
from deepfs.local_cluster import LocalCluster
from tests.conftest import FAST_META_ARGS, SESSION_SECRET
from tests.test_security_attacks import meta_peer, refused_errno

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]

ALICE, BOB, STAFF = 1000, 1001, 3000
LAYOUT = Layout(2, 1, 256 << 10)

# The tree both file systems start from: (path, kind, mode, uid, gid), parents first.
TREE: list[tuple[str, str, int, int, int]] = [
    ("pub", "dir", 0o755, 0, 0),
    ("pub/readable", "file", 0o644, 0, 0),
    ("pub/private", "file", 0o600, 0, 0),
    ("pub/group_rw", "file", 0o060, 0, ALICE),  # the group class allows, nothing else does
    ("pub/owner_denied", "file", 0o077, ALICE, ALICE),  # the owner class denies, even if others allow
    ("pub/staff_only", "file", 0o640, 0, STAFF),
    ("hidden", "dir", 0o700, 0, 0),
    ("hidden/inside", "file", 0o644, 0, 0),
    ("locked", "dir", 0o755, 0, 0),
    ("locked/existing", "file", 0o666, 0, 0),
    ("home", "dir", 0o755, ALICE, ALICE),
    ("home/own", "file", 0o644, ALICE, ALICE),
    ("tmp", "dir", 0o1777, 0, 0),
    ("tmp/bobs", "file", 0o666, BOB, BOB),
    ("tmp/alices", "file", 0o644, ALICE, ALICE),
    ("searchonly", "dir", 0o711, 0, 0),  # x without r: names inside are reachable, the list is not
    ("searchonly/known", "file", 0o644, 0, 0),
]

# What uid 1000 tries, in order, on both file systems: (op, path[, argument]).
SCRIPT: list[list[Any]] = [
    ["read", "pub/readable"], ["read", "pub/private"], ["read", "pub/group_rw"], ["read", "pub/owner_denied"],
    ["read", "pub/staff_only"], ["append", "pub/readable"], ["append", "pub/group_rw"],
    ["truncate", "pub/readable"], ["truncate", "pub/group_rw"],
    ["listdir", "hidden"], ["stat", "hidden/inside"], ["read", "hidden/inside"],
    ["listdir", "searchonly"], ["read", "searchonly/known"],
    ["create", "locked/new"], ["mkdir", "locked/newdir"], ["unlink", "locked/existing"],
    ["append", "locked/existing"], ["rename", "locked/existing", "home/stolen"],
    ["create", "home/new"], ["mkdir", "home/sub"], ["create", "home/sub/deeper"],
    ["rename", "home/new", "home/renamed"], ["unlink", "home/renamed"], ["listdir", "home"],
    ["unlink", "tmp/bobs"], ["rename", "tmp/bobs", "tmp/mine-now"],
    ["create", "tmp/fresh"], ["unlink", "tmp/fresh"], ["unlink", "tmp/alices"],
    ["chmod", "pub/readable", 0o777], ["chmod", "pub/readable", 0o4755], ["chmod", "home/own", 0o600],
    ["chmod", "pub/owner_denied", 0o600], ["read", "pub/owner_denied"],
    ["rmdir", "home/sub"], ["unlink", "home/sub/deeper"], ["rmdir", "home/sub"], ["rmdir", "locked"],
    ["mkdir", "pub/x"], ["chmod", "tmp", 0o777],
]

KERNEL_PROGRAM = textwrap.dedent(
    """
    import json, os, sys
    base, script = sys.argv[1], json.loads(sys.argv[2])
    def read(p):
        with open(p, "rb") as f:
            f.read()
    def append(p):
        with open(p, "ab") as f:
            f.write(b"x")
    def create(p):
        os.close(os.open(p, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644))
    ops = {"read": read, "append": append, "create": create, "listdir": os.listdir, "stat": os.stat,
           "mkdir": os.mkdir, "unlink": os.unlink, "rmdir": os.rmdir, "chmod": os.chmod,
           "truncate": lambda p: os.truncate(p, 0),
           "rename": lambda p, q: os.rename(p, os.path.join(base, q))}
    out = []
    for op, path, *args in script:
        try:
            ops[op](os.path.join(base, path), *args)
            out.append(0)
        except OSError as exc:
            out.append(exc.errno)
    print(json.dumps(out))
    """
)


def run_on_deepfs(fs: deepfs.Client, script: list[list[Any]]) -> list[int]:
    def append(path: str) -> None:
        with fs.open(path, "ab") as f:
            f.write(b"x")

    def create(path: str) -> None:
        fs.open(path, "xb", layout=LAYOUT).close()

    ops: dict[str, Callable[..., Any]] = {
        "read": fs.read_file, "append": append, "create": create, "listdir": fs.listdir, "stat": fs.stat,
        "mkdir": fs.mkdir, "unlink": fs.unlink, "rmdir": fs.rmdir, "chmod": fs.chmod,
        "truncate": lambda p: fs.truncate(p, 0), "rename": lambda p, q: fs.rename(p, "/" + q),
    }
    out = []
    for op, path, *args in script:
        try:
            ops[op]("/" + path, *args)
            out.append(0)
        except OSError as exc:
            out.append(exc.errno or -1)
    return out


def build_kernel_tree(base: Path) -> None:
    for path, kind, mode, uid, gid in TREE:
        target = base / path
        if kind == "dir":
            target.mkdir()
        else:
            target.write_bytes(b"data of " + path.encode())
        os.chown(target, uid, gid)
        os.chmod(target, mode)


def build_deepfs_tree(cluster: LocalCluster, root: str) -> None:
    """The same tree under ``root`` of the cluster, made with the admin key."""
    with deepfs.Client(cluster.meta_address, key=admin_key(cluster)) as fs:
        fs.mkdir(root, 0o755)
        for path, kind, _, _, _ in TREE:
            if kind == "dir":
                fs.mkdir(f"{root}/{path}", 0o755)
            else:
                fs.write_file(f"{root}/{path}", b"data of " + path.encode(), layout=LAYOUT)
        with meta_peer(cluster, admin_key(cluster)) as peer:
            for path, _, mode, uid, gid in TREE:
                ino = fs.stat(f"{root}/{path}").st_ino
                peer.call(Op.SETATTR, {"ino": ino, "uid": uid, "gid": gid, "mode": mode})


# ------------------------------------------------------------------ fixtures
def admin_key(cluster: LocalCluster) -> Key:
    return read_key_file(cluster.admin_key)


def key_of(cluster: LocalCluster, **fields: Any) -> Key:
    identity = Identity(**{"name": "alice", "uid": ALICE, "gid": ALICE, **fields})
    return make_key(load_cluster_secret(cluster.secret_file), identity)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path_factory.mktemp("posix"), nodes=3, k=2, m=1, stripe_size=256 << 10, fsync=False,
                     extra_meta_args=list(FAST_META_ARGS), secret_file=SESSION_SECRET)
    try:
        yield c.start()
    finally:
        c.stop()


@pytest.fixture
def root(cluster: LocalCluster, request: pytest.FixtureRequest) -> str:
    """A fresh tree (``TREE``) for one test, owned as listed."""
    path = f"/{request.node.name[:30]}-{os.urandom(3).hex()}".replace("[", "-").replace("]", "")
    build_deepfs_tree(cluster, path)
    return path


@pytest.fixture
def alice(cluster: LocalCluster) -> Iterator[deepfs.Client]:
    with deepfs.Client(cluster.meta_address, key=key_of(cluster)) as fs:
        yield fs


def errno_of(fn: Callable[..., Any], *args: Any) -> int:
    try:
        fn(*args)
    except OSError as exc:
        return exc.errno or -1
    return 0


# ------------------------------------------------------------------ against the kernel
def test_the_same_script_gets_the_same_errnos_as_the_kernel(cluster: LocalCluster, root: str) -> None:
    base = Path(tempfile.mkdtemp(prefix="deepfs-posix-"))
    try:
        base.chmod(0o755)
        build_kernel_tree(base)
        result = subprocess.run(
            ["setpriv", f"--reuid={ALICE}", f"--regid={ALICE}", "--clear-groups", "--reset-env", sys.executable,
             "-c", KERNEL_PROGRAM, str(base), json.dumps(SCRIPT)],
            capture_output=True, text=True, timeout=60, cwd="/")
        assert result.returncode == 0, result.stderr
        kernel = json.loads(result.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert errno.EACCES in kernel and errno.EPERM in kernel and 0 in kernel  # the script tests something
    script = [[op, f"{root[1:]}/{path}", *[f"{root[1:]}/{a}" if isinstance(a, str) else a for a in args]]
              for op, path, *args in SCRIPT]
    with deepfs.Client(cluster.meta_address, key=key_of(cluster)) as fs:
        ours = run_on_deepfs(fs, script)
    differences = [(step, k, o) for step, k, o in zip(SCRIPT, kernel, ours, strict=True) if k != o]
    assert differences == [], "(step, kernel errno, deepfs errno)"


# ------------------------------------------------------------------ what the kernel comparison does not reach
def test_new_inodes_belong_to_the_key_not_to_the_ctx(cluster: LocalCluster, root: str,
                                                     alice: deepfs.Client) -> None:
    alice.write_file(f"{root}/home/file", b"hello", layout=LAYOUT)  # this process is root: ctx says uid 0
    alice.mkdir(f"{root}/home/dir")
    for name in ("file", "dir"):
        st = alice.stat(f"{root}/home/{name}")
        assert (st.st_uid, st.st_gid) == (ALICE, ALICE)
    assert alice.read_file(f"{root}/home/file") == b"hello"
    assert sorted(alice.listdir(f"{root}/home")) == ["dir", "file", "own"]


def test_chown_rules(cluster: LocalCluster, root: str, alice: deepfs.Client) -> None:
    own = alice.stat(f"{root}/home/own").st_ino
    roots = alice.stat(f"{root}/pub/readable").st_ino
    with meta_peer(cluster, key_of(cluster)) as peer:
        assert refused_errno(peer, Op.SETATTR, {"ino": roots, "uid": ALICE}) == errno.EPERM
        assert refused_errno(peer, Op.SETATTR, {"ino": roots, "gid": ALICE}) == errno.EPERM
        assert refused_errno(peer, Op.SETATTR, {"ino": own, "uid": BOB}) == errno.EPERM  # no giving away
        assert refused_errno(peer, Op.SETATTR, {"ino": own, "gid": STAFF}) == errno.EPERM  # not in STAFF
        assert refused_errno(peer, Op.SETATTR, {"ino": own, "gid": ALICE}) == 0
    with meta_peer(cluster, key_of(cluster, groups=(STAFF,))) as peer:
        assert refused_errno(peer, Op.SETATTR, {"ino": own, "gid": STAFF}) == 0
    st = alice.stat(f"{root}/home/own")
    assert (st.st_uid, st.st_gid) == (ALICE, STAFF)
    assert alice.stat(f"{root}/pub/readable").st_uid == 0


def test_supplementary_groups_of_a_key(cluster: LocalCluster, root: str, alice: deepfs.Client) -> None:
    staff_file = f"{root}/pub/staff_only"
    assert errno_of(alice.read_file, staff_file) == errno.EACCES
    with deepfs.Client(cluster.meta_address, key=key_of(cluster, groups=(STAFF,))) as staff:
        assert staff.read_file(staff_file) == b"data of pub/staff_only"
        assert errno_of(staff.write_file, staff_file, b"x") == errno.EACCES  # 0640: the group only reads
    with deepfs.Client(cluster.meta_address, key=key_of(cluster, gid=STAFF)) as primary:
        assert primary.read_file(staff_file) == b"data of pub/staff_only"


def test_sticky_directory(cluster: LocalCluster, root: str, alice: deepfs.Client) -> None:
    assert errno_of(alice.unlink, f"{root}/tmp/bobs") == errno.EPERM
    assert errno_of(alice.rename, f"{root}/tmp/bobs", f"{root}/tmp/taken") == errno.EPERM
    alice.write_file(f"{root}/tmp/replace-me", b"alice's")
    assert errno_of(alice.rename, f"{root}/tmp/replace-me", f"{root}/tmp/bobs") == errno.EPERM  # nor replace it
    alice.unlink(f"{root}/tmp/alices")
    with deepfs.Client(cluster.meta_address, key=key_of(cluster, name="bob", uid=BOB, gid=BOB)) as bob:
        bob.unlink(f"{root}/tmp/bobs")
        assert errno_of(bob.unlink, f"{root}/tmp/replace-me") == errno.EPERM
    assert sorted(alice.listdir(f"{root}/tmp")) == ["replace-me"]


def test_a_read_only_key_gets_erofs(cluster: LocalCluster, root: str) -> None:
    with deepfs.Client(cluster.meta_address, key=key_of(cluster, read_only=True)) as fs:
        assert fs.read_file(f"{root}/home/own") == b"data of home/own"
        assert fs.listdir(f"{root}/home") == ["own"]
        for fn, args in ((fs.write_file, (f"{root}/home/new", b"x")), (fs.mkdir, (f"{root}/home/d",)),
                         (fs.unlink, (f"{root}/home/own",)), (fs.chmod, (f"{root}/home/own", 0o600)),
                         (fs.truncate, (f"{root}/home/own", 0)), (fs.write_file, (f"{root}/home/own", b"x")),
                         (fs.rename, (f"{root}/home/own", f"{root}/home/moved"))):
            assert errno_of(fn, *args) == errno.EROFS, (fn, args)
    with deepfs.Client(cluster.meta_address, key=admin_key(cluster)) as fs:
        assert fs.read_file(f"{root}/home/own") == b"data of home/own"
        assert fs.stat(f"{root}/home/own").st_mode & 0o7777 == 0o644


def test_a_subtree_key_sees_only_its_subtree(cluster: LocalCluster, root: str) -> None:
    with deepfs.Client(cluster.meta_address, key=admin_key(cluster)) as admin:
        outside_ino = admin.stat(f"{root}/pub/readable").st_ino
        admin.write_file(f"{root}/home/top-secret", b"not for the subtree")
    with deepfs.Client(cluster.meta_address, key=key_of(cluster, path=f"{root}/home")) as fs:
        assert sorted(fs.listdir("/")) == ["own", "top-secret"]
        assert fs.read_file("/own") == b"data of home/own"
        fs.write_file("/new", b"inside", layout=LAYOUT)
        for path in ("/pub/readable", "/../pub/readable", f"{root}/pub/readable", "/../../"):
            assert errno_of(fs.read_file, path) in (errno.ENOENT, errno.EISDIR), path
        assert sorted(fs.listdir("/..")) == sorted(fs.listdir("/"))  # '..' at its root stays there
        assert fs.stat("/..").st_ino == fs.stat("/").st_ino
    with meta_peer(cluster, key_of(cluster, path=f"{root}/home")) as peer:
        hello, _ = peer.call(Op.HELLO, {})
        sub_root = hello["root"]
        assert refused_errno(peer, Op.GETATTR, {"ino": outside_ino}) == errno.EACCES
        assert refused_errno(peer, Op.OPEN, {"ino": outside_ino, "access": "r"}) == errno.EACCES
        assert refused_errno(peer, Op.GETATTR, {"ino": 1}) == errno.EACCES  # the real root
        assert peer.call(Op.LOOKUP, {"parent": sub_root, "name": b".."})[0]["attr"]["ino"] == sub_root
        assert refused_errno(peer, Op.RENAME, {"parent": sub_root, "name": b"own", "new_parent": 1,
                                               "new_name": b"escaped"}) == errno.EACCES
    with deepfs.Client(cluster.meta_address, key=admin_key(cluster)) as admin:
        assert admin.read_file(f"{root}/home/new") == b"inside"
        assert not admin.exists("/escaped")


def test_admin_and_trusted_mount_keys_act_for_the_ctx(cluster: LocalCluster, root: str) -> None:
    with deepfs.Client(cluster.meta_address, key=admin_key(cluster)) as admin:
        home_ino = admin.stat(f"{root}/home").st_ino
        tmp_ino = admin.stat(f"{root}/tmp").st_ino
        assert admin.read_file(f"{root}/pub/private") == b"data of pub/private"  # root reads 0600
        assert admin.read_file(f"{root}/pub/owner_denied") == b"data of pub/owner_denied"
    mount = make_key(load_cluster_secret(cluster.secret_file), Identity("mount", trusted_mount=True))
    for key, name in ((admin_key(cluster), b"by-admin"), (mount, b"by-mount")):
        with meta_peer(cluster, key) as peer:
            reply, _ = peer.call(Op.MKDIR, {"parent": tmp_ino, "name": name, "mode": 0o40755,
                                            "ctx": {"uid": BOB, "gid": STAFF}})
            assert (reply["attr"]["uid"], reply["attr"]["gid"]) == (BOB, STAFF)
            if key.identity.trusted_mount:
                continue  # the kernel checked modes for it (default_permissions)
            # The admin acts as uid 1001 (the ctx), not as root: alice's home is closed to it.
            assert refused_errno(peer, Op.MKDIR, {"parent": home_ino, "name": name, "mode": 0o40755,
                                                  "ctx": {"uid": BOB, "gid": STAFF}}) == errno.EACCES
    # A plain client key sending the same ctx creates as itself.
    with meta_peer(cluster, key_of(cluster)) as peer:
        reply, _ = peer.call(Op.MKDIR, {"parent": home_ino, "name": b"by-alice", "mode": 0o40755,
                                        "ctx": {"uid": 0, "gid": 0}})
        assert (reply["attr"]["uid"], reply["attr"]["gid"]) == (ALICE, ALICE)
