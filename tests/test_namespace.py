"""Namespace operations on a real LMDB store, driven directly (no sockets)."""

from __future__ import annotations

import errno
import functools
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from deepfs.config import MetaConfig
from deepfs.messages import RENAME_EXCHANGE, RENAME_NOREPLACE, Ctx, FragmentKey
from metadata.namespace import Namespace
from metadata.store import MetaStore

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

ROOT = 1
USER = Ctx(uid=1000, gid=100)
STRIPE = 64 << 10  # k=4 x 16 KiB: small stripes keep the arithmetic readable
WIDTH = 6


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MetaStore]:
    st = MetaStore.open(tmp_path / "meta", map_size_bytes=64 << 20, sync_interval_s=0.001)
    yield st
    st.close()


@pytest.fixture
def ns(store: MetaStore) -> Namespace:
    namespace = Namespace(store, MetaConfig(default_stripe_size=STRIPE))
    namespace.bootstrap()
    return namespace


def fails(code: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    with pytest.raises(OSError) as info:
        fn(*args, **kwargs)
    assert info.value.errno == code, f"{fn.__name__}: expected {errno.errorcode[code]}, got {info.value!r}"


def mkfile(ns: Namespace, parent: int, name: bytes, mode: int = 0o644) -> int:
    attr, _layout, created = ns.create(parent, name, mode, True, USER)
    assert created
    return attr["ino"]


def record(index: int, version: int, length: int = STRIPE, nodes: list[int] | None = None) -> dict[str, Any]:
    return {
        "index": index,
        "version": version,
        "length": length,
        "fragment_size": 16 << 10,
        "placement": nodes or [1, 2, 3, 4, 5, 6],
        "crcs": [index, version, 0, 0, 0, 0],
    }


def gc_queue(store: MetaStore) -> set[tuple[int, FragmentKey]]:
    with store.read() as txn:
        return set(txn.all_gc())


def names(ns: Namespace, ino: int) -> list[bytes]:
    return [entry[0] for entry in ns.readdir(ino, 0, 0)]


# root, lookups, names ----------------------------------------------------------


def test_root_exists_after_first_start(ns: Namespace) -> None:
    root = ns.getattr(ROOT)
    assert root["mode"] == stat.S_IFDIR | 0o755
    assert (root["uid"], root["gid"], root["nlink"]) == (0, 0, 2)
    assert ns.lookup(ROOT, b".")["ino"] == ROOT and ns.lookup(ROOT, b"..")["ino"] == ROOT
    assert ns.cluster_id and ns.generation == 1


def test_restart_keeps_everything_and_bumps_generation(tmp_path: Path) -> None:
    store = MetaStore.open(tmp_path / "m", map_size_bytes=16 << 20, sync_interval_s=0.001)
    first = Namespace(store, MetaConfig())
    first.bootstrap()
    ino = mkfile(first, ROOT, b"keep")
    store.close()
    store = MetaStore.open(tmp_path / "m", map_size_bytes=16 << 20, sync_interval_s=0.001)
    second = Namespace(store, MetaConfig())
    second.bootstrap()
    assert second.cluster_id == first.cluster_id
    assert second.generation == 2
    assert second.lookup(ROOT, b"keep")["ino"] == ino
    assert mkfile(second, ROOT, b"new") > ino  # inode numbers are never reused
    store.close()


@pytest.mark.parametrize(
    ("name", "code"),
    [(b"x" * 256, errno.ENAMETOOLONG), (b"a/b", errno.EINVAL), (b"a\0b", errno.EINVAL), (b"", errno.EINVAL),
     (b".", errno.EINVAL), (b"..", errno.EINVAL)],
)
def test_bad_names_are_refused_for_creation(ns: Namespace, name: bytes, code: int) -> None:
    fails(code, ns.create, ROOT, name, 0o644, False, USER)
    fails(code, ns.mkdir, ROOT, name, 0o755, USER)


def test_longest_name_works(ns: Namespace) -> None:
    ino = mkfile(ns, ROOT, b"n" * 255)
    assert ns.lookup(ROOT, b"n" * 255)["ino"] == ino
    fails(errno.ENAMETOOLONG, ns.lookup, ROOT, b"n" * 256)


def test_lookup_errors(ns: Namespace) -> None:
    fails(errno.ENOENT, ns.lookup, ROOT, b"missing")
    ino = mkfile(ns, ROOT, b"f")
    fails(errno.ENOTDIR, ns.lookup, ino, b"x")
    fails(errno.ENOENT, ns.lookup, 999, b"x")
    fails(errno.ENOENT, ns.getattr, 999)
    fails(errno.ENOENT, ns.getattr, 0)


def test_resolve_walks_paths(ns: Namespace) -> None:
    a = ns.mkdir(ROOT, b"a", 0o755, USER)["ino"]
    b = ns.mkdir(a, b"b", 0o755, USER)["ino"]
    f = mkfile(ns, b, b"f")
    assert ns.resolve(b"/a/b/f")["ino"] == f
    assert ns.resolve(b"a//b/./f")["ino"] == f
    assert ns.resolve(b"/a/b/../b/f")["ino"] == f
    assert ns.resolve(b"/")["ino"] == ROOT
    fails(errno.ENOENT, ns.resolve, b"/a/nope")
    fails(errno.ENOTDIR, ns.resolve, b"/a/b/f/g")


# creation and ownership --------------------------------------------------------


def test_create_exclusive_and_open_existing(ns: Namespace) -> None:
    attr, layout, created = ns.create(ROOT, b"f", 0o640, True, USER)
    assert created and attr["mode"] == stat.S_IFREG | 0o640 and attr["nlink"] == 1
    assert (attr["uid"], attr["gid"]) == (USER.uid, USER.gid)
    assert layout == {"k": 4, "m": 2, "stripe_size": STRIPE, "codec": "isa_l_rs_cauchy"}
    fails(errno.EEXIST, ns.create, ROOT, b"f", 0o640, True, USER)
    again, layout2, created2 = ns.create(ROOT, b"f", 0o600, False, USER)
    assert not created2 and again["ino"] == attr["ino"] and layout2 == layout
    ns.mkdir(ROOT, b"d", 0o755, USER)
    fails(errno.EISDIR, ns.create, ROOT, b"d", 0o644, False, USER)
    fails(errno.EEXIST, ns.mkdir, ROOT, b"f", 0o755, USER)
    fails(errno.ENOTDIR, ns.create, attr["ino"], b"x", 0o644, True, USER)
    fails(errno.ENOENT, ns.create, 12345, b"x", 0o644, True, USER)
    fails(errno.EINVAL, ns.create, ROOT, b"fifo", stat.S_IFIFO | 0o644, True, USER)
    parent = ns.getattr(ROOT)
    assert parent["mtime_ns"] >= attr["ctime_ns"]


def test_layouts_inherit_from_directories(ns: Namespace) -> None:
    d = ns.mkdir(ROOT, b"d", 0o755, USER)["ino"]
    custom = {"k": 1, "m": 2, "stripe_size": 1 << 20, "codec": "isa_l_rs_cauchy"}
    ns.set_layout(d, custom)
    _, layout, _ = ns.create(d, b"f", 0o644, True, USER)
    assert layout == custom
    sub = ns.mkdir(d, b"sub", 0o755, USER)["ino"]
    assert ns.create(sub, b"g", 0o644, True, USER)[1] == custom
    explicit = {"k": 2, "m": 1, "stripe_size": 8 << 10, "codec": "isa_l_rs_cauchy"}
    assert ns.create(d, b"h", 0o644, True, USER, layout=explicit)[1] == explicit
    assert ns.open(ns.lookup(d, b"h")["ino"])["layout"] == explicit
    fails(errno.EINVAL, ns.create, d, b"bad", 0o644, True, USER, layout={"k": 3, "m": 1, "stripe_size": 4096})
    fails(errno.EINVAL, ns.set_layout, d, {"k": 0, "m": 1, "stripe_size": 4096})
    ns.set_layout(d, None)
    assert ns.create(d, b"default", 0o644, True, USER)[1]["k"] == 4


def test_create_widens_the_inherited_stripes_on_request(ns: Namespace) -> None:
    d = ns.mkdir(ROOT, b"wide", 0o755, USER)["ino"]
    ns.set_layout(d, {"k": 3, "m": 2, "stripe_size": 3 * 4096, "codec": "isa_l_rs_vand"})
    _, layout, _ = ns.create(d, b"ck", 0o644, True, USER, min_stripe_size=1 << 20)
    # k, m and codec stay the directory's; whole units of k x 4 KiB up to 1 MiB
    assert layout == {"k": 3, "m": 2, "stripe_size": (1 << 20) // 12288 * 12288, "codec": "isa_l_rs_vand"}
    narrow = ns.create(d, b"narrow", 0o644, True, USER, min_stripe_size=4096)[1]
    assert narrow["stripe_size"] == 3 * 4096  # never lowered
    explicit = {"k": 2, "m": 1, "stripe_size": 8 << 10, "codec": "isa_l_rs_cauchy"}
    assert ns.create(d, b"given", 0o644, True, USER, layout=explicit, min_stripe_size=1 << 20)[1] == explicit
    assert ns.create(d, b"capped", 0o644, True, USER, min_stripe_size=1 << 40)[1]["stripe_size"] <= 64 << 20


def test_set_layout_on_files(ns: Namespace) -> None:
    f = mkfile(ns, ROOT, b"f")
    small = {"k": 1, "m": 1, "stripe_size": 4096, "codec": "isa_l_rs_cauchy"}
    ns.set_layout(f, small)
    assert ns.open(f)["layout"] == small
    ns.commit(f, [{**record(0, 1, 100), "placement": [1, 2], "crcs": [0, 0]}], 100)
    fails(errno.EBUSY, ns.set_layout, f, small)
    link = ns.symlink(ROOT, b"l", b"f", USER)["ino"]
    fails(errno.EINVAL, ns.set_layout, link, small)


def test_setgid_directories_pass_their_group_on(ns: Namespace) -> None:
    d = ns.mkdir(ROOT, b"shared", 0o2775, Ctx(uid=1, gid=500))["ino"]
    assert ns.getattr(d)["mode"] & stat.S_ISGID
    f = mkfile(ns, d, b"f")
    assert ns.getattr(f)["gid"] == 500 and ns.getattr(f)["uid"] == USER.uid
    sub = ns.mkdir(d, b"sub", 0o755, USER)
    assert sub["gid"] == 500 and sub["mode"] & stat.S_ISGID
    plain = ns.mkdir(ROOT, b"plain", 0o755, USER)
    assert plain["gid"] == USER.gid and not plain["mode"] & stat.S_ISGID


def test_mknod_symlink_readlink(ns: Namespace) -> None:
    fifo = ns.mknod(ROOT, b"fifo", stat.S_IFIFO | 0o600, 0, USER)
    assert stat.S_ISFIFO(fifo["mode"])
    dev = ns.mknod(ROOT, b"dev", stat.S_IFCHR | 0o600, 0x0501, USER)
    assert stat.S_ISCHR(dev["mode"]) and dev["rdev"] == 0x0501
    reg = ns.mknod(ROOT, b"reg", 0o644, 0, USER)
    assert stat.S_ISREG(reg["mode"]) and ns.open(reg["ino"])["layout"]["k"] == 4
    fails(errno.EINVAL, ns.mknod, ROOT, b"d", stat.S_IFDIR | 0o755, 0, USER)
    link = ns.symlink(ROOT, b"link", b"../some/where", USER)
    assert stat.S_ISLNK(link["mode"]) and link["size"] == len(b"../some/where")
    assert ns.readlink(link["ino"]) == b"../some/where"
    fails(errno.EINVAL, ns.readlink, fifo["ino"])
    fails(errno.ENOENT, ns.symlink, ROOT, b"empty", b"", USER)
    fails(errno.ENAMETOOLONG, ns.symlink, ROOT, b"long", b"x" * 4096, USER)
    fails(errno.EEXIST, ns.symlink, ROOT, b"link", b"t", USER)


# directories -------------------------------------------------------------------


def test_directory_link_counts_and_rmdir(ns: Namespace) -> None:
    a = ns.mkdir(ROOT, b"a", 0o755, USER)["ino"]
    ns.mkdir(a, b"b", 0o755, USER)
    ns.mkdir(a, b"c", 0o755, USER)
    mkfile(ns, a, b"f")
    assert ns.getattr(ROOT)["nlink"] == 3
    assert ns.getattr(a)["nlink"] == 4  # 2 + two subdirectories; files do not count
    assert ns.lookup(a, b"..")["ino"] == ROOT
    fails(errno.ENOTEMPTY, ns.rmdir, ROOT, b"a")
    fails(errno.ENOTDIR, ns.rmdir, a, b"f")
    fails(errno.EISDIR, ns.unlink, a, b"b")
    fails(errno.ENOENT, ns.rmdir, a, b"zz")
    ns.rmdir(a, b"b")
    assert ns.getattr(a)["nlink"] == 3
    ns.rmdir(a, b"c")
    ns.unlink(a, b"f")
    ns.rmdir(ROOT, b"a")
    assert ns.getattr(ROOT)["nlink"] == 2
    fails(errno.ENOENT, ns.getattr, a)
    assert ns.counts()["directories"] == 1


def test_readdir_pages_and_skips_dot_entries(ns: Namespace) -> None:
    d = ns.mkdir(ROOT, b"d", 0o755, USER)["ino"]
    for i in range(25):
        mkfile(ns, d, b"f%02d" % i)
    seen: list[list[Any]] = []
    offset = 0
    while True:
        page = ns.readdir(d, offset, 7)
        if not page:
            break
        assert len(page) <= 7
        seen.extend(page)
        offset = page[-1][3]
    assert sorted(e[0] for e in seen) == [b"f%02d" % i for i in range(25)]  # in cookie (hash) order
    assert [e[3] for e in seen] == sorted(e[3] for e in seen)
    assert all(stat.S_ISREG(e[2]) for e in seen)
    assert len({e[3] for e in seen}) == 25
    assert ns.lookup(d, b"f03")["ino"] == {e[0]: e[1] for e in seen}[b"f03"]
    fails(errno.ENOTDIR, ns.readdir, seen[0][1], 0, 10)


def test_readdir_cookies_survive_concurrent_changes(ns: Namespace) -> None:
    """Entries present all along are listed exactly once, whatever else changes."""
    d = ns.mkdir(ROOT, b"d", 0o755, USER)["ino"]
    for i in range(20):
        mkfile(ns, d, b"stay%02d" % i)
        mkfile(ns, d, b"gone%02d" % i)
    listed: list[bytes] = []
    offset = 0
    step = 0
    while True:
        page = ns.readdir(d, offset, 5)
        if not page:
            break
        listed.extend(e[0] for e in page)
        offset = page[-1][3]
        if step < 10:  # between pages: remove entries on both sides of the offset, add new ones
            for victim in (b"gone%02d" % step, b"gone%02d" % (19 - step)):
                try:
                    ns.unlink(d, victim)
                except FileNotFoundError:
                    pass
            mkfile(ns, d, b"new%02d" % step)
            ns.rename(d, b"stay%02d" % step, d, b"stay%02d" % step)  # same name: a no-op
        step += 1
    stays = [n for n in listed if n.startswith(b"stay")]
    assert sorted(stays) == [b"stay%02d" % i for i in range(20)]
    assert len(listed) == len(set(listed))


# hard links and removal ----------------------------------------------------------


def test_hard_links_count_and_free_at_zero(ns: Namespace, store: MetaStore) -> None:
    f = mkfile(ns, ROOT, b"f")
    ns.commit(f, [record(0, 1, 10)], 10)
    d = ns.mkdir(ROOT, b"d", 0o755, USER)["ino"]
    linked = ns.link(f, d, b"g")
    assert linked["nlink"] == 2 and ns.lookup(d, b"g")["ino"] == f
    fails(errno.EEXIST, ns.link, f, d, b"g")
    fails(errno.EPERM, ns.link, d, ROOT, b"dirlink")
    fails(errno.ENOENT, ns.link, 4242, ROOT, b"x")
    ns.unlink(ROOT, b"f")
    assert ns.getattr(f)["nlink"] == 1
    assert not gc_queue(store)
    ns.unlink(d, b"g")
    fails(errno.ENOENT, ns.getattr, f)
    assert gc_queue(store) == {(n, FragmentKey(f, 0, 1, n - 1)) for n in range(1, 7)}
    fails(errno.ENOENT, ns.unlink, d, b"g")


def test_unlink_of_an_open_file_keeps_it_until_release(ns: Namespace, store: MetaStore) -> None:
    f = mkfile(ns, ROOT, b"f")
    ns.commit(f, [record(0, 1, 10)], 10)
    ns.unlink(ROOT, b"f", keep_open=True)
    fails(errno.ENOENT, ns.lookup, ROOT, b"f")
    assert ns.getattr(f)["nlink"] == 0
    assert ns.open(f)["stripes"][0]["version"] == 1  # still readable by whoever has it open
    ns.commit(f, [record(0, 2, 20)], 20)  # and writable
    fails(errno.ENOENT, ns.link, f, ROOT, b"back")
    assert ns.counts()["orphans"] == 1
    ns.release(f)
    fails(errno.ENOENT, ns.getattr, f)
    assert {key.version for _, key in gc_queue(store)} == {1, 2}
    assert ns.counts()["orphans"] == 0
    ns.release(f)  # idempotent
    g = mkfile(ns, ROOT, b"g")
    ns.release(g)  # not an orphan: nothing happens
    assert ns.getattr(g)["nlink"] == 1


# rename ------------------------------------------------------------------------


def test_rename_moves_and_replaces_files(ns: Namespace, store: MetaStore) -> None:
    a = mkfile(ns, ROOT, b"a")
    b = mkfile(ns, ROOT, b"b")
    ns.commit(b, [record(0, 1, 5)], 5)
    d = ns.mkdir(ROOT, b"d", 0o755, USER)["ino"]
    ns.rename(ROOT, b"a", d, b"a2")
    assert ns.lookup(d, b"a2")["ino"] == a
    fails(errno.ENOENT, ns.lookup, ROOT, b"a")
    ns.rename(d, b"a2", ROOT, b"b")  # replaces b, whose data goes to GC
    assert ns.lookup(ROOT, b"b")["ino"] == a
    fails(errno.ENOENT, ns.getattr, b)
    assert len(gc_queue(store)) == WIDTH
    fails(errno.ENOENT, ns.rename, ROOT, b"nope", ROOT, b"x")
    fails(errno.EINVAL, ns.rename, ROOT, b"b", ROOT, b"x", RENAME_NOREPLACE | RENAME_EXCHANGE)
    fails(errno.EINVAL, ns.rename, ROOT, b"b", ROOT, b"x", 4)
    fails(errno.EINVAL, ns.rename, ROOT, b"b", ROOT, b"..")
    assert sorted(names(ns, ROOT)) == [b"b", b"d"]


def test_rename_over_an_open_file_can_keep_it(ns: Namespace) -> None:
    mkfile(ns, ROOT, b"new")
    old = mkfile(ns, ROOT, b"old")
    ns.rename(ROOT, b"new", ROOT, b"old", keep_open=True)
    assert ns.getattr(old)["nlink"] == 0
    ns.release(old)
    fails(errno.ENOENT, ns.getattr, old)


def test_rename_type_checks(ns: Namespace) -> None:
    mkfile(ns, ROOT, b"f")
    ns.mkdir(ROOT, b"empty", 0o755, USER)
    full = ns.mkdir(ROOT, b"full", 0o755, USER)["ino"]
    mkfile(ns, full, b"x")
    ns.mkdir(ROOT, b"d", 0o755, USER)
    fails(errno.EISDIR, ns.rename, ROOT, b"f", ROOT, b"empty")
    fails(errno.ENOTDIR, ns.rename, ROOT, b"d", ROOT, b"f")
    fails(errno.ENOTEMPTY, ns.rename, ROOT, b"d", ROOT, b"full")
    fails(errno.EEXIST, ns.rename, ROOT, b"d", ROOT, b"empty", RENAME_NOREPLACE)
    assert ns.getattr(ROOT)["nlink"] == 5
    ns.rename(ROOT, b"d", ROOT, b"empty")  # a directory replaces an empty one
    assert ns.getattr(ROOT)["nlink"] == 4
    assert sorted(names(ns, ROOT)) == [b"empty", b"f", b"full"]


def test_rename_refuses_to_move_a_directory_into_itself(ns: Namespace) -> None:
    a = ns.mkdir(ROOT, b"a", 0o755, USER)["ino"]
    b = ns.mkdir(a, b"b", 0o755, USER)["ino"]
    c = ns.mkdir(b, b"c", 0o755, USER)["ino"]
    fails(errno.EINVAL, ns.rename, ROOT, b"a", c, b"a")
    fails(errno.EINVAL, ns.rename, ROOT, b"a", a, b"a")
    fails(errno.EINVAL, ns.rename, a, b"b", c, b"x", RENAME_NOREPLACE)
    fails(errno.ENOTEMPTY, ns.rename, b, b"c", ROOT, b"a")  # over its own (non-empty) ancestor


def test_rename_directory_across_parents_moves_dotdot(ns: Namespace) -> None:
    p1 = ns.mkdir(ROOT, b"p1", 0o755, USER)["ino"]
    p2 = ns.mkdir(ROOT, b"p2", 0o755, USER)["ino"]
    child = ns.mkdir(p1, b"child", 0o755, USER)["ino"]
    assert ns.getattr(p1)["nlink"] == 3
    ns.rename(p1, b"child", p2, b"moved")
    assert ns.getattr(p1)["nlink"] == 2 and ns.getattr(p2)["nlink"] == 3
    assert ns.lookup(child, b"..")["ino"] == p2
    ns.rename(p2, b"moved", ROOT, b"top")
    assert ns.getattr(p2)["nlink"] == 2 and ns.getattr(ROOT)["nlink"] == 5


def test_rename_exchange(ns: Namespace) -> None:
    p1 = ns.mkdir(ROOT, b"p1", 0o755, USER)["ino"]
    p2 = ns.mkdir(ROOT, b"p2", 0o755, USER)["ino"]
    f = mkfile(ns, p1, b"f")
    d = ns.mkdir(p2, b"d", 0o755, USER)["ino"]
    ns.rename(p1, b"f", p2, b"d", RENAME_EXCHANGE)
    assert ns.lookup(p1, b"f")["ino"] == d and ns.lookup(p2, b"d")["ino"] == f
    assert ns.getattr(p1)["nlink"] == 3 and ns.getattr(p2)["nlink"] == 2
    assert ns.lookup(d, b"..")["ino"] == p1
    fails(errno.ENOENT, ns.rename, p1, b"f", p2, b"missing", RENAME_EXCHANGE)
    fails(errno.EINVAL, ns.rename, ROOT, b"p1", d, b"x", RENAME_NOREPLACE)  # d lives in p1
    inner = ns.mkdir(d, b"inner", 0o755, USER)["ino"]
    mkfile(ns, inner, b"leaf")
    fails(errno.EINVAL, ns.rename, inner, b"leaf", ROOT, b"p1", RENAME_EXCHANGE)
    same = ns.link(f, p2, b"alias")["ino"]
    ns.rename(p2, b"d", p2, b"alias", RENAME_EXCHANGE)  # two links of one inode: nothing to do
    assert ns.lookup(p2, b"alias")["ino"] == same


def test_rename_of_hard_links_to_each_other_is_a_noop(ns: Namespace) -> None:
    f = mkfile(ns, ROOT, b"a")
    ns.link(f, ROOT, b"b")
    ns.rename(ROOT, b"a", ROOT, b"b")
    assert ns.lookup(ROOT, b"a")["ino"] == ns.lookup(ROOT, b"b")["ino"] == f
    assert ns.getattr(f)["nlink"] == 2


# attributes and truncation -------------------------------------------------------


def test_setattr_mode_owner_times(ns: Namespace) -> None:
    f = mkfile(ns, ROOT, b"f", 0o4755)
    before = ns.getattr(f)
    attr = ns.setattr(f, mode=0o640)
    assert attr["mode"] == stat.S_IFREG | 0o640 and attr["ctime_ns"] >= before["ctime_ns"]
    ns.setattr(f, mode=0o6755)
    attr = ns.setattr(f, uid=7, gid=8)
    assert (attr["uid"], attr["gid"]) == (7, 8)
    assert attr["mode"] == stat.S_IFREG | 0o755  # chown dropped setuid and setgid
    attr = ns.setattr(f, atime_ns=5, mtime_ns=-6)
    assert (attr["atime_ns"], attr["mtime_ns"]) == (5, -6)
    attr = ns.setattr(f, atime_now=True, mtime_now=True)
    assert attr["atime_ns"] > 5 and attr["mtime_ns"] > 5
    d = ns.mkdir(ROOT, b"d", 0o755, USER)["ino"]
    assert ns.setattr(d, mode=0o1777)["mode"] == stat.S_IFDIR | 0o1777
    fails(errno.EISDIR, ns.setattr, d, size=0)
    link = ns.symlink(ROOT, b"l", b"f", USER)["ino"]
    fails(errno.EINVAL, ns.setattr, link, size=0)
    fails(errno.ENOENT, ns.setattr, 9999, mode=0o600)


def test_truncate_drops_stripes_and_shortens_the_last(ns: Namespace, store: MetaStore) -> None:
    f = mkfile(ns, ROOT, b"f")
    ns.commit(f, [record(i, 1) for i in range(3)], 3 * STRIPE)
    assert ns.counts()["logical_bytes"] == 3 * STRIPE
    attr = ns.setattr(f, size=STRIPE + 100)
    assert attr["size"] == STRIPE + 100
    stripes = ns.open(f)["stripes"]
    assert [(s["index"], s["length"]) for s in stripes] == [(0, STRIPE), (1, 100)]
    assert gc_queue(store) == {(n, FragmentKey(f, 2, 1, n - 1)) for n in range(1, 7)}
    ns.setattr(f, size=10 * STRIPE)  # growing only changes the size: the gap reads as zeros
    assert [(s["index"], s["length"]) for s in ns.open(f)["stripes"]] == [(0, STRIPE), (1, 100)]
    assert ns.getattr(f)["size"] == 10 * STRIPE
    ns.setattr(f, size=0)
    assert ns.open(f)["stripes"] == []
    assert len(gc_queue(store)) == 3 * WIDTH
    assert ns.counts()["logical_bytes"] == 0


# commits -----------------------------------------------------------------------


def test_commit_versions_retire_old_fragments(ns: Namespace, store: MetaStore) -> None:
    f = mkfile(ns, ROOT, b"f")
    attr = ns.commit(f, [record(0, 1), record(1, 1, 10)], STRIPE + 10, mtime_ns=123)["attr"]
    assert attr["size"] == STRIPE + 10 and attr["mtime_ns"] == 123
    attr = ns.commit(f, [record(0, 2)], STRIPE)["attr"]  # the size never shrinks without truncate
    assert attr["size"] == STRIPE + 10
    assert gc_queue(store) == {(n, FragmentKey(f, 0, 1, n - 1)) for n in range(1, 7)}
    stripes = ns.open(f)["stripes"]
    assert [(s["index"], s["version"]) for s in stripes] == [(0, 2), (1, 1)]
    assert stripes[0] == record(0, 2)


def test_commit_after_repair_keeps_the_fragments_still_in_use(ns: Namespace, store: MetaStore) -> None:
    f = mkfile(ns, ROOT, b"f")
    ns.commit(f, [record(0, 1, 10, [1, 2, -1, 4, 5, 6])], 10)
    assert ns.counts()["degraded_stripes"] == 1
    ns.commit(f, [record(0, 1, 10, [1, 2, 7, 4, 5, 9])], 10)  # rebuilt index 2 on 7, moved index 5 to 9
    assert gc_queue(store) == {(6, FragmentKey(f, 0, 1, 5))}
    assert ns.counts()["degraded_stripes"] == 0


def test_stripe_versions_only_grow(ns: Namespace) -> None:
    f = mkfile(ns, ROOT, b"f")
    ns.commit(f, [record(0, 10), record(1, 3)], 2 * STRIPE)
    ns.commit(f, [record(0, 20)], 2 * STRIPE)
    fails(errno.ESTALE, ns.commit, f, [record(0, 10)], 2 * STRIPE)  # retired: its fragments may be deleted
    fails(errno.ESTALE, ns.commit, f, [record(0, 19)], 2 * STRIPE)
    ns.commit(f, [record(0, 20, STRIPE, [1, 2, 3, 4, 5, 9])], 2 * STRIPE)  # same version, same data: repair
    fails(errno.ESTALE, ns.commit, f, [{**record(0, 20), "crcs": [9] * 6}], 2 * STRIPE)  # same key, other data
    ns.commit(f, [record(1, 4), record(2, 0)], 3 * STRIPE)  # per stripe: stripe 2 may start low
    opened = ns.open(f)
    assert opened["min_version"] == 0
    reply = ns.commit(f, [], STRIPE, truncate=True)  # drops stripes 1 (v4) and 2 (v0)
    assert reply["min_version"] == 5 and ns.open(f)["min_version"] == 5
    fails(errno.ESTALE, ns.commit, f, [record(1, 4)], 2 * STRIPE)
    ns.commit(f, [record(1, 5)], 2 * STRIPE)
    ns.commit(f, [record(0, 21)], 2 * STRIPE)  # a stripe with a record only needs to grow


def test_commit_truncate_and_bad_records(ns: Namespace, store: MetaStore) -> None:
    f = mkfile(ns, ROOT, b"f")
    ns.commit(f, [record(i, 1) for i in range(4)], 4 * STRIPE)
    assert ns.commit(f, [record(0, 2, 50)], 50, truncate=True)["attr"]["size"] == 50
    assert [(s["index"], s["version"]) for s in ns.open(f)["stripes"]] == [(0, 2)]
    assert len(gc_queue(store)) == 4 * WIDTH
    fails(errno.EINVAL, ns.commit, f, [record(3, 9)], 2 * STRIPE)  # ends past the size
    fails(errno.EINVAL, ns.commit, f, [record(0, 9, STRIPE + 1)], 2 * STRIPE)
    fails(errno.EINVAL, ns.commit, f, [{**record(0, 9), "placement": [1, 2, 3]}], STRIPE)
    fails(errno.EINVAL, ns.commit, f, [record(0, 9), record(0, 10)], STRIPE)
    d = ns.mkdir(ROOT, b"d", 0o755, USER)["ino"]
    fails(errno.EISDIR, ns.commit, d, [], 0)
    fails(errno.EISDIR, ns.open, d)


def test_commit_to_a_deleted_file_sends_its_fragments_to_gc(ns: Namespace, store: MetaStore) -> None:
    f = mkfile(ns, ROOT, b"f")
    ns.unlink(ROOT, b"f")
    fails(errno.ENOENT, ns.commit, f, [record(0, 1, 10)], 10)
    assert gc_queue(store) == {(n, FragmentKey(f, 0, 1, n - 1)) for n in range(1, 7)}


def test_get_stripes_pages(ns: Namespace, monkeypatch: pytest.MonkeyPatch) -> None:
    f = mkfile(ns, ROOT, b"f")
    ns.commit(f, [record(i, 1) for i in range(10)], 10 * STRIPE)
    assert [s["index"] for s in ns.get_stripes(f, 3, 4)] == [3, 4, 5, 6]
    assert [s["index"] for s in ns.get_stripes(f, 8, 0)] == [8, 9]
    opened = ns.open(f)
    assert opened["stripes_complete"] and len(opened["stripes"]) == 10
    monkeypatch.setattr("metadata.files.STRIPE_REPLY_BYTES", 200)  # replies hold only a few records
    opened = ns.open(f)
    assert not opened["stripes_complete"] and 1 <= len(opened["stripes"]) < 10
    got = opened["stripes"]
    while True:
        page = ns.get_stripes(f, got[-1]["index"] + 1, 0)
        if not page:
            break
        got.extend(page)
    assert [s["index"] for s in got] == list(range(10))


# xattrs ------------------------------------------------------------------------


def test_xattrs(ns: Namespace) -> None:
    f = mkfile(ns, ROOT, b"f")
    fails(errno.ENODATA, ns.getxattr, f, b"user.a")
    ns.setxattr(f, b"user.a", b"1")
    ns.setxattr(f, b"user.b", b"")
    assert ns.getxattr(f, b"user.a") == b"1" and ns.getxattr(f, b"user.b") == b""
    assert sorted(ns.listxattr(f)) == [b"user.a", b"user.b"]
    fails(errno.EEXIST, ns.setxattr, f, b"user.a", b"2", 1)
    fails(errno.ENODATA, ns.setxattr, f, b"user.c", b"2", 2)
    ns.setxattr(f, b"user.a", b"2", 2)
    assert ns.getxattr(f, b"user.a") == b"2"
    fails(errno.EINVAL, ns.setxattr, f, b"user.a", b"2", 3)
    fails(errno.E2BIG, ns.setxattr, f, b"user.big", b"x" * (64 * 1024 + 1))
    ns.setxattr(f, b"user.max", b"x" * (64 * 1024))
    fails(errno.ERANGE, ns.setxattr, f, b"", b"x")
    fails(errno.ERANGE, ns.getxattr, f, b"u" * 256)
    ns.removexattr(f, b"user.a")
    fails(errno.ENODATA, ns.removexattr, f, b"user.a")
    fails(errno.ENOENT, ns.listxattr, 9999)
    ns.unlink(ROOT, b"f")
    g = mkfile(ns, ROOT, b"f")
    assert ns.listxattr(g) == []


# cluster numbers and group commit ---------------------------------------------------


def test_statfs_and_counts(ns: Namespace) -> None:
    mkfile(ns, ROOT, b"a")
    ns.mkdir(ROOT, b"d", 0o755, USER)
    out = ns.statfs(capacity_bytes=6 * 4096 * 100, free_bytes=6 * 4096 * 10)
    assert out["bsize"] == 4096 and out["namemax"] == 255
    assert (out["blocks"], out["bfree"]) == (400, 40)  # k/(k+m) = 4/6 of raw
    assert out["files"] - out["ffree"] == 3
    counts = ns.counts()
    assert (counts["files"], counts["directories"]) == (1, 2)


def test_group_commit_shares_syncs(store: MetaStore, ns: Namespace) -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run_syncer)
            before = store.stats.syncs
            async with trio.open_nursery() as creators:  # concurrent creates share group commits
                for i in range(50):
                    creators.start_soon(store.run, functools.partial(mkfile, ns, ROOT, b"f%d" % i))
            async with trio.open_nursery() as waiters:
                for _ in range(20):
                    waiters.start_soon(store.wait_synced)
            assert 1 <= store.stats.syncs - before < 20
            await store.wait_synced()  # nothing new: returns without another sync
            nursery.cancel_scope.cancel()

    trio.run(main)
