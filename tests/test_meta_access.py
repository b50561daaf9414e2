"""The metadata server's authorization (metadata/access.py), driven through ``MetaOps`` directly.

A namespace over a real LMDB store; each request carries the ``Identity`` a
handshake would have authenticated. The tree every test starts from (made
as root, no checks)::

    /            0755 root
    /secret      0700 root        /secret/f  0600 root
    /tmp         1777 root
    /home/alice  0755 alice       /home/alice/notes  0644 alice
    /shared      0770 root:500
"""

from __future__ import annotations

import errno
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from deepfs.auth import (
    ROLE_ADMIN,
    ROLE_NODE,
    Identity,
    check_capability,
    derive_service_secret,
    new_cluster_secret,
    open_ticket,
)
from deepfs.config import MetaConfig
from deepfs.frames import Op
from deepfs.messages import ROOT_INO
from deepfs.messages import metadata_requests as m
from metadata.access import Caller, check_setattr, permits
from metadata.membership import Membership
from metadata.namespace import Namespace
from metadata.ops_server import MetaOps, ServiceTokens
from metadata.records import Inode
from metadata.sessions import Sessions
from metadata.store import MetaStore

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

SERVICE = derive_service_secret(new_cluster_secret())
ALICE = Identity("alice", uid=1000, gid=1000)
BOB = Identity("bob", uid=1001, gid=1001)
CAROL = Identity("carol", uid=1002, gid=1002, groups=(500,))
DAVE = Identity("dave", uid=1003, gid=500)
ADMIN = Identity("admin", ROLE_ADMIN)
MOUNT = Identity("mount", trusted_mount=True)
SUB = Identity("alice-home", uid=1000, gid=1000, path="/home/alice")
RO = Identity("reader", uid=1000, gid=1000, read_only=True)
NODE = Identity("node1", ROLE_NODE)
ROOT_CTX = {"uid": 0, "gid": 0}
STRIPE = 64 << 10


class Cluster:
    """``MetaOps`` over a fresh namespace, and the inodes of the tree above."""

    def __init__(self, store: MetaStore) -> None:
        self.store = store
        self.ns = Namespace(store, MetaConfig(default_stripe_size=STRIPE))
        self.ns.bootstrap()
        self.sessions = Sessions(60.0)
        self.ops = MetaOps(self.ns, store, Membership(store, 5.0), "grpc:1", sessions=self.sessions,
                           tokens=ServiceTokens(SERVICE, 3600.0, 600.0))
        self.secret = self.mkdir(ADMIN, ROOT_INO, b"secret", 0o700)
        self.secret_file = self.create(ADMIN, self.secret, b"f", 0o600)
        self.tmp = self.mkdir(ADMIN, ROOT_INO, b"tmp", 0o1777)
        home = self.mkdir(ADMIN, ROOT_INO, b"home", 0o755)
        self.alice_home = self.mkdir(ADMIN, home, b"alice", 0o755)
        self.call(ADMIN, Op.SETATTR, {"ino": self.alice_home, "uid": 1000, "gid": 1000})
        self.notes = self.create(ALICE, self.alice_home, b"notes", 0o644)
        self.shared = self.mkdir(ADMIN, ROOT_INO, b"shared", 0o770)
        self.call(ADMIN, Op.SETATTR, {"ino": self.shared, "gid": 500})

    def call(self, who: Identity | None, op: Op, body: dict[str, Any]) -> Any:
        async def run() -> Any:
            reply, _ = await self.ops(op, body, memoryview(b""), who)
            return reply

        return trio.run(run)

    def fails(self, code: int, who: Identity | None, op: Op, body: dict[str, Any]) -> OSError:
        with pytest.raises(OSError) as info:
            self.call(who, op, body)
        assert info.value.errno == code, f"{op.name}: expected {errno.errorcode[code]}, got {info.value!r}"
        return info.value

    def mkdir(self, who: Identity, parent: int, name: bytes, mode: int, ctx: dict[str, int] | None = None) -> int:
        body = {"parent": parent, "name": name, "mode": mode, "ctx": ctx or ROOT_CTX}
        return int(self.call(who, Op.MKDIR, body)["attr"]["ino"])

    def create(self, who: Identity, parent: int, name: bytes, mode: int = 0o644,
               ctx: dict[str, int] | None = None) -> int:
        body = {"parent": parent, "name": name, "mode": mode, "exclusive": True, "ctx": ctx or ROOT_CTX}
        return int(self.call(who, Op.CREATE, body)["attr"]["ino"])

    def attr(self, ino: int) -> dict[str, int]:
        return self.ns.getattr(ino)

    def inode(self, ino: int) -> Inode:
        with self.store.read() as txn:
            inode = txn.get_inode(ino)
        assert inode is not None
        return inode


@pytest.fixture
def c(tmp_path: Path) -> Iterator[Cluster]:
    store = MetaStore.open(tmp_path / "meta", map_size_bytes=64 << 20, sync_interval_s=0.001)
    try:
        yield Cluster(store)
    finally:
        store.close()


def record(index: int, version: int, length: int) -> dict[str, Any]:
    return {"index": index, "version": version, "length": length, "fragment_size": 16 << 10,
            "placement": [1, 2, 3, 4, 5, 6], "crcs": [0] * 6}


# the pure rules ---------------------------------------------------------------


def test_mode_bits_pick_owner_group_or_other_and_root_needs_an_x_bit_to_execute() -> None:
    f = Inode(5, stat.S_IFREG | 0o640, 1000, 500, 1, 0, 0, 0)
    assert permits(f, Caller(1000, 1000), 6) and not permits(f, Caller(1000, 1000), 1)
    assert permits(f, Caller(7, 7, frozenset({500})), 4) and not permits(f, Caller(7, 500), 2)
    assert not permits(f, Caller(7, 7), 4)
    assert permits(f, Caller(0, 0), 6) and not permits(f, Caller(0, 0), 1)
    assert permits(Inode(6, stat.S_IFDIR | 0o000, 5, 5, 2, 0, 0, 0), Caller(0, 0), 7)
    owner_only = Inode(7, stat.S_IFREG | 0o077, 1000, 1000, 1, 0, 0, 0)
    assert not permits(owner_only, Caller(1000, 1000), 4)  # the owner class decides, even when it grants less


def test_chmod_by_a_non_member_drops_setgid_and_chgrp_needs_membership() -> None:
    f = Inode(5, stat.S_IFREG | 0o644, 1000, 500, 1, 0, 0, 0)
    chmod = m.setattr({"ino": 5, "mode": 0o2755})
    assert check_setattr(f, Caller(1000, 1000), chmod).mode == 0o755
    assert check_setattr(f, Caller(1000, 1000, frozenset({500})), chmod).mode == 0o2755
    assert check_setattr(f, Caller(1000, 500), m.setattr({"ino": 5, "gid": 500})).gid == 500
    with pytest.raises(PermissionError):
        check_setattr(f, Caller(1000, 1000), m.setattr({"ino": 5, "gid": 600}))


# a uid-limited client key -----------------------------------------------------------


def test_a_user_key_cannot_list_or_read_root_private_things(c: Cluster) -> None:
    c.fails(errno.EACCES, ALICE, Op.READDIR, {"ino": c.secret})
    c.fails(errno.EACCES, ALICE, Op.LOOKUP, {"parent": c.secret, "name": b"f"})
    c.fails(errno.EACCES, ALICE, Op.RESOLVE, {"path": "/secret/f"})
    c.fails(errno.EACCES, ALICE, Op.OPEN, {"ino": c.secret_file})  # even knowing the inode number
    c.fails(errno.EACCES, ALICE, Op.CAPABILITY, {"ino": c.secret_file, "access": "r"})
    c.fails(errno.EACCES, ALICE, Op.GET_STRIPES, {"ino": c.secret_file})
    c.fails(errno.EACCES, ALICE, Op.COMMIT, {"ino": c.secret_file, "stripes": [record(0, 1, 10)], "size": 10})
    c.fails(errno.EACCES, ALICE, Op.CREATE, {"parent": c.secret, "name": b"x", "mode": 0o644, "ctx": ROOT_CTX})
    c.fails(errno.EACCES, ALICE, Op.CREATE, {"parent": ROOT_INO, "name": b"x", "mode": 0o644, "ctx": ROOT_CTX})
    c.fails(errno.EACCES, ALICE, Op.UNLINK, {"parent": c.secret, "name": b"f"})
    c.fails(errno.EACCES, ALICE, Op.GETXATTR, {"ino": c.secret_file, "name": b"user.x"})
    assert sorted(e[0] for e in c.call(ALICE, Op.READDIR, {"ino": ROOT_INO})["entries"]) == [
        b"home", b"secret", b"shared", b"tmp"]
    c.call(ADMIN, Op.SETATTR, {"ino": c.secret_file, "mode": 0o644})
    c.fails(errno.EACCES, ALICE, Op.OPEN, {"ino": c.secret_file})  # the 0700 directory keeps her out, by number too
    c.call(ADMIN, Op.SETATTR, {"ino": c.secret, "mode": 0o711})
    assert c.call(ALICE, Op.RESOLVE, {"path": "/secret/f"})["attr"]["ino"] == c.secret_file
    c.fails(errno.EACCES, ALICE, Op.READDIR, {"ino": c.secret})  # x without r: names known only
    c.fails(errno.EACCES, ALICE, Op.OPEN, {"ino": c.secret_file, "access": "w"})
    assert c.call(ALICE, Op.OPEN, {"ino": c.secret_file})["attr"]["ino"] == c.secret_file


def test_a_user_key_cannot_chmod_chown_or_touch_a_root_file(c: Cluster) -> None:
    f = c.secret_file
    c.call(ADMIN, Op.SETATTR, {"ino": c.secret, "mode": 0o755})
    c.call(ADMIN, Op.SETATTR, {"ino": f, "mode": 0o644})
    c.fails(errno.EPERM, ALICE, Op.SETATTR, {"ino": f, "mode": 0o4777})
    c.fails(errno.EPERM, ALICE, Op.SETATTR, {"ino": f, "uid": 1000})
    c.fails(errno.EPERM, ALICE, Op.SETATTR, {"ino": f, "gid": 1000})
    c.fails(errno.EPERM, ALICE, Op.SETATTR, {"ino": f, "mtime_ns": 5})
    c.fails(errno.EACCES, ALICE, Op.SETATTR, {"ino": f, "mtime_now": True})
    c.fails(errno.EACCES, ALICE, Op.SETATTR, {"ino": f, "size": 0})
    c.fails(errno.EACCES, ALICE, Op.SETXATTR, {"ino": f, "name": b"user.x", "value": b"1"})
    c.fails(errno.EPERM, ALICE, Op.SETXATTR, {"ino": f, "name": b"trusted.x", "value": b"1"})
    c.fails(errno.EPERM, ALICE, Op.SET_LAYOUT, {"ino": f, "layout": None})
    c.fails(errno.EPERM, ALICE, Op.LINK, {"ino": f, "new_parent": c.tmp, "new_name": b"mine"})
    c.fails(errno.EACCES, ALICE, Op.UNLINK, {"parent": c.secret, "name": b"f"})
    assert c.attr(f)["mode"] == stat.S_IFREG | 0o644 and c.attr(f)["uid"] == 0


def test_sticky_directory_protects_other_users_files(c: Cluster) -> None:
    mine = c.create(ALICE, c.tmp, b"a")
    c.create(BOB, c.tmp, b"b")
    c.fails(errno.EPERM, BOB, Op.UNLINK, {"parent": c.tmp, "name": b"a"})
    c.fails(errno.EPERM, BOB, Op.RENAME, {"parent": c.tmp, "name": b"a", "new_parent": c.tmp, "new_name": b"z"})
    c.fails(errno.EPERM, BOB, Op.RENAME, {"parent": c.tmp, "name": b"b", "new_parent": c.tmp, "new_name": b"a"})
    c.call(ALICE, Op.RENAME, {"parent": c.tmp, "name": b"a", "new_parent": c.tmp, "new_name": b"a2"})
    assert c.call(ALICE, Op.LOOKUP, {"parent": c.tmp, "name": b"a2"})["attr"]["ino"] == mine
    c.call(ALICE, Op.UNLINK, {"parent": c.tmp, "name": b"a2"})
    c.call(ADMIN, Op.UNLINK, {"parent": c.tmp, "name": b"b"})  # root may


def test_a_user_key_does_everything_in_its_own_directory(c: Cluster) -> None:
    home = c.alice_home
    d = c.mkdir(ALICE, home, b"d", 0o755, {"uid": 0, "gid": 0})  # a ctx claiming root is ignored
    assert (c.attr(d)["uid"], c.attr(d)["gid"]) == (1000, 1000)
    made = c.call(ALICE, Op.CREATE, {"parent": d, "name": b"f", "mode": 0o444, "ctx": ROOT_CTX, "session": 0})
    f = made["attr"]["ino"]
    assert made["attr"]["uid"] == 1000 and made["cap"][1] == "rw"
    c.call(ALICE, Op.COMMIT, {"ino": f, "stripes": [record(0, 1, 10)], "size": 10})  # created read-only: still hers
    c.call(ALICE, Op.SETATTR, {"ino": f, "mode": 0o640, "mtime_ns": 7, "atime_now": True})
    c.call(ALICE, Op.SETATTR, {"ino": f, "size": 5})
    assert c.call(ALICE, Op.OPEN, {"ino": f, "access": "rw"})["cap"][1] == "rw"
    c.call(ALICE, Op.SETXATTR, {"ino": f, "name": b"user.tag", "value": b"v"})
    assert c.call(ALICE, Op.GETXATTR, {"ino": f, "name": b"user.tag"})["value"] == b"v"
    c.call(ALICE, Op.LINK, {"ino": f, "new_parent": home, "new_name": b"f2"})
    c.call(ALICE, Op.RENAME, {"parent": d, "name": b"f", "new_parent": home, "new_name": b"g"})
    c.call(ALICE, Op.SYMLINK, {"parent": d, "name": b"s", "target": b"../g", "ctx": ROOT_CTX})
    c.call(ALICE, Op.UNLINK, {"parent": d, "name": b"s"})
    c.call(ALICE, Op.UNLINK, {"parent": home, "name": b"g"})
    c.call(ALICE, Op.RMDIR, {"parent": home, "name": b"d"})
    c.call(ALICE, Op.SET_LAYOUT, {"ino": home, "layout": {"k": 2, "m": 1, "stripe_size": STRIPE}})
    c.fails(errno.EACCES, BOB, Op.CREATE, {"parent": home, "name": b"x", "mode": 0o644, "ctx": ROOT_CTX})
    c.fails(errno.EACCES, BOB, Op.OPEN, {"ino": c.notes, "access": "w"})
    assert c.call(BOB, Op.OPEN, {"ino": c.notes})["cap"][1] == "r"


def test_group_access_comes_from_the_key_gid_or_its_groups(c: Cluster) -> None:
    for member in (CAROL, DAVE):
        c.call(member, Op.READDIR, {"ino": c.shared})
        c.create(member, c.shared, member.name.encode())
    c.fails(errno.EACCES, BOB, Op.READDIR, {"ino": c.shared})
    c.fails(errno.EACCES, BOB, Op.LOOKUP, {"parent": c.shared, "name": b"carol"})
    dave_file = c.call(CAROL, Op.LOOKUP, {"parent": c.shared, "name": b"dave"})["attr"]
    assert dave_file["gid"] == 500
    c.call(CAROL, Op.OPEN, {"ino": dave_file["ino"]})  # 0644: group reads
    c.fails(errno.EACCES, CAROL, Op.OPEN, {"ino": dave_file["ino"], "access": "rw"})
    c.call(DAVE, Op.SETATTR, {"ino": dave_file["ino"], "mode": 0o664})
    c.call(CAROL, Op.OPEN, {"ino": dave_file["ino"], "access": "rw"})


def test_chmod_by_the_owner_outside_the_group_drops_setgid_on_the_wire(c: Cluster) -> None:
    c.call(ADMIN, Op.SETATTR, {"ino": c.notes, "gid": 500})
    c.call(ALICE, Op.SETATTR, {"ino": c.notes, "mode": 0o2755})
    assert c.attr(c.notes)["mode"] == stat.S_IFREG | 0o755
    c.call(ADMIN, Op.SETATTR, {"ino": c.notes, "mode": 0o2755})
    assert c.attr(c.notes)["mode"] == stat.S_IFREG | 0o2755


# subtree keys --------------------------------------------------------------------


def test_a_subtree_key_sees_its_subtree_as_root_and_nothing_outside(c: Cluster) -> None:
    hello = c.call(SUB, Op.HELLO, {})
    root = hello["root"]
    assert root == c.alice_home
    assert c.call(SUB, Op.LOOKUP, {"parent": root, "name": b".."})["attr"]["ino"] == root
    assert c.call(SUB, Op.RESOLVE, {"path": "/"})["attr"]["ino"] == root
    assert c.call(SUB, Op.RESOLVE, {"path": "/../../notes"})["attr"]["ino"] == c.notes
    c.fails(errno.ENOENT, SUB, Op.RESOLVE, {"path": "/home"})
    inner = c.mkdir(SUB, root, b"in", 0o755)
    assert c.call(SUB, Op.LOOKUP, {"parent": inner, "name": b".."})["attr"]["ino"] == root
    c.call(ADMIN, Op.SETATTR, {"ino": c.secret_file, "mode": 0o666})
    c.call(ADMIN, Op.SETATTR, {"ino": c.secret, "mode": 0o777})
    outside_file = c.create(ADMIN, c.tmp, b"public", 0o666)
    for ino in (ROOT_INO, c.secret, c.tmp, c.secret_file, outside_file):  # guessed inode numbers
        c.fails(errno.EACCES, SUB, Op.GETATTR, {"ino": ino})
        c.fails(errno.EACCES, SUB, Op.SETXATTR, {"ino": ino, "name": b"user.x", "value": b"1"})
    for directory in (ROOT_INO, c.secret, c.tmp):
        c.fails(errno.EACCES, SUB, Op.LOOKUP, {"parent": directory, "name": b"f"})
        c.fails(errno.EACCES, SUB, Op.READDIR, {"ino": directory})
        c.fails(errno.EACCES, SUB, Op.CREATE, {"parent": directory, "name": b"n", "mode": 0o644, "ctx": ROOT_CTX})
    for file in (c.secret_file, outside_file):
        c.fails(errno.EACCES, SUB, Op.OPEN, {"ino": file})
        c.fails(errno.EACCES, SUB, Op.CAPABILITY, {"ino": file})
        c.fails(errno.EACCES, SUB, Op.COMMIT, {"ino": file, "stripes": [record(0, 1, 10)], "size": 10})
    c.fails(errno.EACCES, SUB, Op.UNLINK, {"parent": c.tmp, "name": b"public"})
    c.fails(errno.EACCES, SUB, Op.UNLINK, {"parent": c.secret, "name": b"f"})
    c.fails(errno.EACCES, SUB, Op.RENAME, {"parent": root, "name": b"notes", "new_parent": c.tmp, "new_name": b"x"})
    c.fails(errno.EACCES, SUB, Op.LINK, {"ino": outside_file, "new_parent": root, "new_name": b"stolen"})
    c.fails(errno.EACCES, SUB, Op.SET_LAYOUT, {"ino": c.tmp, "layout": None})
    assert c.call(SUB, Op.OPEN, {"ino": c.notes, "access": "rw"})["cap"][1] == "rw"
    c.call(ADMIN, Op.RENAME, {"parent": root, "name": b"notes", "new_parent": c.tmp, "new_name": b"moved"})
    c.fails(errno.EACCES, SUB, Op.GETATTR, {"ino": c.notes})  # moved out: out of reach


def test_a_subtree_key_whose_subtree_is_missing_gets_enoent(c: Cluster) -> None:
    c.fails(errno.ENOENT, Identity("lost", uid=5, gid=5, path="/nowhere"), Op.HELLO, {})


def test_inodes_record_their_directory_and_rename_moves_it(c: Cluster) -> None:
    assert c.inode(c.notes).parent == c.alice_home and c.inode(c.secret).parent == ROOT_INO
    c.call(ADMIN, Op.LINK, {"ino": c.notes, "new_parent": c.tmp, "new_name": b"second"})
    c.call(ADMIN, Op.RENAME, {"parent": c.tmp, "name": b"second", "new_parent": c.secret, "new_name": b"s"})
    assert c.inode(c.notes).parent == c.alice_home  # a hard link keeps the first parent
    c.call(ADMIN, Op.RENAME, {"parent": c.alice_home, "name": b"notes", "new_parent": c.shared, "new_name": b"n"})
    assert c.inode(c.notes).parent == c.shared


# read-only keys, admin operations, keys acting for ctx ----------------------------------


def test_a_read_only_key_gets_erofs_for_every_change(c: Cluster) -> None:
    home = c.alice_home
    refused: list[tuple[Op, dict[str, Any]]] = [
        (Op.CREATE, {"parent": home, "name": b"n", "mode": 0o644, "ctx": ROOT_CTX}),
        (Op.MKDIR, {"parent": home, "name": b"n", "mode": 0o755, "ctx": ROOT_CTX}),
        (Op.OPEN, {"ino": c.notes, "access": "rw"}),
        (Op.OPEN, {"ino": c.notes, "access": "w"}),
        (Op.CAPABILITY, {"ino": c.notes, "access": "w"}),
        (Op.SETATTR, {"ino": c.notes, "mode": 0o600}),
        (Op.UNLINK, {"parent": home, "name": b"notes"}),
        (Op.RENAME, {"parent": home, "name": b"notes", "new_parent": home, "new_name": b"x"}),
        (Op.SETXATTR, {"ino": c.notes, "name": b"user.x", "value": b"1"}),
        (Op.REMOVEXATTR, {"ino": c.notes, "name": b"user.x"}),
        (Op.COMMIT, {"ino": c.notes, "stripes": [record(0, 1, 10)], "size": 10}),
        (Op.SET_LAYOUT, {"ino": home, "layout": None}),
    ]
    for op, body in refused:
        c.fails(errno.EROFS, RO, op, body)
    assert c.call(RO, Op.OPEN, {"ino": c.notes})["cap"][1] == "r"
    c.call(RO, Op.READDIR, {"ino": home})
    c.fails(errno.EROFS, Identity("ro-mount", trusted_mount=True, read_only=True), Op.UNLINK,
            {"parent": home, "name": b"notes"})


def test_only_an_admin_key_sets_the_layout_of_the_root(c: Cluster) -> None:
    layout = {"k": 2, "m": 1, "stripe_size": STRIPE}
    root_owner = Identity("rooty", uid=0, gid=0)  # even a client key of uid 0
    for who in (ALICE, root_owner, MOUNT):
        c.fails(errno.EPERM, who, Op.SET_LAYOUT, {"ino": ROOT_INO, "layout": layout})
    c.call(ADMIN, Op.SET_LAYOUT, {"ino": ROOT_INO, "layout": layout})
    c.call(root_owner, Op.SET_LAYOUT, {"ino": c.tmp, "layout": layout})


def test_a_trusted_mount_acts_for_the_ctx_and_leaves_modes_to_the_kernel(c: Cluster) -> None:
    f = c.create(MOUNT, c.alice_home, b"by-mount", 0o600, {"uid": 1000, "gid": 1000})
    assert (c.attr(f)["uid"], c.attr(f)["gid"]) == (1000, 1000)
    c.call(MOUNT, Op.READDIR, {"ino": c.secret})  # the kernel checked default_permissions
    c.call(MOUNT, Op.OPEN, {"ino": c.secret_file, "access": "rw"})
    c.call(MOUNT, Op.SETATTR, {"ino": f, "uid": 1001, "ctx": {"uid": 1000, "gid": 1000}})
    sub_mount = Identity("sub-mount", trusted_mount=True, path="/home/alice")
    c.fails(errno.EACCES, sub_mount, Op.GETATTR, {"ino": c.secret})


def test_an_admin_acts_as_root_or_for_the_ctx_it_sends(c: Cluster) -> None:
    c.call(ADMIN, Op.READDIR, {"ino": c.secret})  # no ctx: root
    as_alice = c.create(ADMIN, c.alice_home, b"for-alice", 0o644, {"uid": 1000, "gid": 1000})
    assert c.attr(as_alice)["uid"] == 1000
    c.fails(errno.EACCES, ADMIN, Op.CREATE,
            {"parent": c.secret, "name": b"x", "mode": 0o644, "ctx": {"uid": 1000, "gid": 1000}})
    c.call(ADMIN, Op.SETATTR, {"ino": c.secret, "mode": 0o770, "ctx": {"uid": 0, "gid": 0}})
    c.call(ADMIN, Op.CREATE, {"parent": c.secret, "name": b"x", "mode": 0o644,
                              "ctx": {"uid": 1000, "gid": 1000, "groups": [0]}})


def test_a_node_key_serves_no_namespace_operation(c: Cluster) -> None:
    c.fails(errno.EACCES, NODE, Op.GETATTR, {"ino": ROOT_INO})
    c.fails(errno.EACCES, NODE, Op.HELLO, {})
    assert c.call(NODE, Op.PING, {}) == {}


# tickets and capabilities --------------------------------------------------------


def test_hello_and_renewals_carry_a_node_ticket_for_the_key(c: Cluster) -> None:
    hello = c.call(ALICE, Op.HELLO, {})
    assert hello["root"] == ROOT_INO
    ticket = hello["node_ticket"]
    identity, secret = open_ticket(SERVICE, ticket["ticket"], 0.0)
    assert identity == ALICE and secret == ticket["secret"]
    renewed = c.call(ALICE, Op.RENEW_SESSION, {"session": hello["session"], "holds": []})
    assert open_ticket(SERVICE, renewed["node_ticket"]["ticket"], 0.0)[0] == ALICE
    plain = c.call(None, Op.HELLO, {})
    assert "node_ticket" not in plain and plain["root"] == ROOT_INO


def test_capabilities_grant_what_was_asked_and_verify(c: Cluster) -> None:
    import time

    now = time.time()
    read = c.call(BOB, Op.OPEN, {"ino": c.notes})["cap"]
    check_capability(SERVICE, read, c.notes, "r", 0, now, 0.0)
    with pytest.raises(OSError) as info:
        check_capability(SERVICE, read, c.notes, "w", 1, now, 0.0)
    assert info.value.errno == errno.EACCES
    with pytest.raises(OSError):
        check_capability(SERVICE, read, c.secret_file, "r", 0, now, 0.0)
    write = c.call(ALICE, Op.OPEN, {"ino": c.notes, "access": "w"})["cap"]
    check_capability(SERVICE, write, c.notes, "w", 1, now, 0.0)
    check_capability(SERVICE, write, c.notes, "r", 0, now, 0.0)
    fresh = c.call(ALICE, Op.CAPABILITY, m.capability_body(c.notes, "rw"))["cap"]
    check_capability(SERVICE, fresh, c.notes, "w", 1, now, 0.0)
    created = c.call(ALICE, Op.CREATE, {"parent": c.alice_home, "name": b"new", "mode": 0o644, "ctx": ROOT_CTX})
    check_capability(SERVICE, created["cap"], created["attr"]["ino"], "w", 1, now, 0.0)
    assert c.call(None, Op.OPEN, m.open_body(c.notes))["cap"] is None  # no authenticator: no token


def test_capability_rechecks_permissions_after_a_chmod(c: Cluster) -> None:
    assert c.call(BOB, Op.CAPABILITY, {"ino": c.notes, "access": "r"})["cap"][0] == c.notes
    c.call(ALICE, Op.SETATTR, {"ino": c.notes, "mode": 0o600})
    c.fails(errno.EACCES, BOB, Op.CAPABILITY, {"ino": c.notes, "access": "r"})
    c.fails(errno.EINVAL, BOB, Op.CAPABILITY, {"ino": c.notes, "access": "x"})


def test_builders_make_what_the_validators_accept() -> None:
    assert m.open_file(m.open_body(5, 7, "rw")) == (5, 7) and m.access(m.open_body(5, 7, "rw")) == "rw"
    assert m.capability(m.capability_body(5)) == (5, "r")
    with pytest.raises(ValueError):
        m.open_body(5, access="x")


def test_a_hard_link_from_outside_stays_out_of_reach_of_a_subtree_key(c: Cluster) -> None:
    outside = c.create(ADMIN, c.tmp, b"outside", 0o666)
    c.call(ADMIN, Op.LINK, {"ino": outside, "new_parent": c.alice_home, "new_name": b"link"})
    c.fails(errno.EACCES, SUB, Op.LOOKUP, {"parent": c.alice_home, "name": b"link"})
    c.fails(errno.EACCES, SUB, Op.RESOLVE, {"path": "/link"})
    assert c.call(ALICE, Op.RESOLVE, {"path": "/home/alice/link"})["attr"]["ino"] == outside


def test_a_commit_to_an_inode_never_made_is_enoent_and_queues_nothing(c: Cluster) -> None:
    with c.store.read() as txn:
        before = set(txn.all_gc())
    c.fails(errno.ENOENT, ADMIN, Op.COMMIT, {"ino": 10**6, "stripes": [record(0, 1, 10)], "size": 10})
    with c.store.read() as txn:
        assert set(txn.all_gc()) == before
