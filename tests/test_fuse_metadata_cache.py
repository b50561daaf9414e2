"""The daemon's name and attribute caches (``fuse_client/attr_cache.py``) through a real mount.

The kernel asks the daemon again when it forgot its own entries; the tests
make it forget (``drop_caches`` of dentries and inodes, root only) right
after a change, so the answer must come from the daemon's caches, updated or
dropped by this mount's change, or from the server. What the mount shows is
compared with what the metadata server says (``deepfs.Client``), and changes
made by a second mount must show within twice ``--attr-timeout``.
"""

from __future__ import annotations

import errno
import os
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

import deepfs
from deepfs.local_cluster import LocalCluster
from deepfs.testing import wait_for
from tests.conftest import Mounted, mounted

# kernel_caches: they drop the kernel's dentries and count what reaches the daemon (conftest)
pytestmark = [pytest.mark.fuse, pytest.mark.timeout(120), pytest.mark.kernel_caches]

TIMEOUT_S = 1.0  # the mounts' --attr-timeout and --entry-timeout (the defaults)


def forget_kernel_entries() -> None:
    """Make the kernel drop unused dentries and inodes, so its next lookup or getattr reaches the daemon."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("2")


@pytest.fixture(scope="module")
def two_mounts(cluster: LocalCluster) -> Iterator[tuple[Mounted, Mounted]]:
    if os.geteuid() != 0:
        pytest.skip("making the kernel forget its entries (drop_caches) needs root")
    with mounted(cluster, "cache-a") as a, mounted(cluster, "cache-b") as b:
        yield a, b


@pytest.fixture(scope="module")
def long_mount(cluster: LocalCluster) -> Iterator[Mounted]:
    """Timeouts far longer than any test: what the caches answer does not depend on speed."""
    if os.geteuid() != 0:
        pytest.skip("making the kernel forget its entries (drop_caches) needs root")
    with mounted(cluster, "cache-long", ["--attr-timeout", "600", "--entry-timeout", "600"]) as mount:
        yield mount


def meta_requests(cluster: LocalCluster) -> dict[str, float]:
    """Requests the metadata server has served, by op (its metrics)."""
    text = urllib.request.urlopen(cluster.state.meta.metrics_url, timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        found = re.match(r'deepfs_meta_requests_total\{op="([A-Z_]+)"', line)
        if found:
            out[found.group(1)] = out.get(found.group(1), 0) + float(line.rsplit(" ", 1)[1])
    return out


def served(before: dict[str, float], after: dict[str, float], *ops: str) -> float:
    return sum(after.get(op, 0) - before.get(op, 0) for op in ops)


STAT_FIELDS = ("st_ino", "st_mode", "st_size", "st_nlink", "st_uid", "st_gid", "st_mtime_ns", "st_ctime_ns")


def fields(st: os.stat_result) -> tuple[int, ...]:
    return tuple(getattr(st, name) for name in STAT_FIELDS)


@pytest.fixture
def server(cluster: LocalCluster) -> Iterator[deepfs.Client]:
    with deepfs.Client(cluster.meta_address) as client:
        yield client


def stat_errno(path: Path) -> int:
    try:
        os.stat(path)
    except OSError as exc:
        return exc.errno or 0
    return 0


def test_stat_after_unlink_is_enoent(two_mounts: tuple[Mounted, Mounted]) -> None:
    a, _ = two_mounts
    d = a.subdir("unlink")
    (d / "f").write_bytes(b"x" * 100)
    ino = os.stat(d / "f").st_ino
    forget_kernel_entries()
    assert os.stat(d / "f").st_ino == ino  # the daemon's cached name and attributes
    os.unlink(d / "f")
    assert stat_errno(d / "f") == errno.ENOENT
    forget_kernel_entries()
    assert stat_errno(d / "f") == errno.ENOENT
    assert os.listdir(d) == []


def test_rename_seen_at_once(two_mounts: tuple[Mounted, Mounted], server: deepfs.Client) -> None:
    a, _ = two_mounts
    d = a.subdir("rename")
    (d / "a").write_bytes(b"first")
    (d / "victim").write_bytes(b"replaced")
    moved = os.stat(d / "a").st_ino
    os.stat(d / "victim")
    forget_kernel_entries()
    os.rename(d / "a", d / "victim")
    forget_kernel_entries()
    assert stat_errno(d / "a") == errno.ENOENT
    assert os.stat(d / "victim").st_ino == moved
    assert (d / "victim").read_bytes() == b"first"
    # the moved inode's ctime and the directory's times are the server's
    here, there = os.stat(d / "victim"), server.stat(f"/{d.name}/victim")
    assert (here.st_ctime_ns, here.st_nlink) == (there.st_ctime_ns, there.st_nlink)
    assert os.stat(d).st_mtime_ns == server.stat(f"/{d.name}").st_mtime_ns
    # onto a name that does not exist (looked up absent just before)
    os.rename(d / "victim", d / "fresh")
    assert stat_errno(d / "victim") == errno.ENOENT
    forget_kernel_entries()
    assert stat_errno(d / "victim") == errno.ENOENT
    assert os.stat(d / "fresh").st_ino == moved
    assert os.stat(d / "fresh").st_ctime_ns == server.stat(f"/{d.name}/fresh").st_ctime_ns


def test_chmod_seen_at_once(two_mounts: tuple[Mounted, Mounted]) -> None:
    a, _ = two_mounts
    d = a.subdir("chmod")
    (d / "f").write_bytes(b"")
    os.chmod(d / "f", 0o600)
    forget_kernel_entries()
    assert os.stat(d / "f").st_mode & 0o7777 == 0o600
    os.chmod(d / "f", 0o640)
    forget_kernel_entries()
    assert os.stat(d / "f").st_mode & 0o7777 == 0o640


def test_hard_link_counts(two_mounts: tuple[Mounted, Mounted]) -> None:
    a, _ = two_mounts
    d = a.subdir("links")
    (d / "f").write_bytes(b"data")
    os.link(d / "f", d / "g")
    forget_kernel_entries()
    assert os.stat(d / "f").st_nlink == 2
    assert os.stat(d / "g").st_ino == os.stat(d / "f").st_ino
    os.unlink(d / "g")
    forget_kernel_entries()
    assert os.stat(d / "f").st_nlink == 1
    assert stat_errno(d / "g") == errno.ENOENT
    # a link another mount makes: A sees the new count within the timeout, its own unlink at once
    _, b = two_mounts
    os.link(b.path / d.name / "f", b.path / d.name / "h")
    wait_for(lambda: os.stat(d / "f").st_nlink == 2, timeout_s=2 * TIMEOUT_S + 3)
    os.unlink(d / "h")
    assert os.stat(d / "f").st_nlink == 1
    forget_kernel_entries()
    assert os.stat(d / "f").st_nlink == 1


def test_parent_times_follow_this_mounts_changes(two_mounts: tuple[Mounted, Mounted],
                                                 server: deepfs.Client) -> None:
    a, _ = two_mounts
    d = a.subdir("times")
    sub = d / "sub"
    sub.mkdir()
    os.stat(sub)
    for change in (lambda: (sub / "f").write_bytes(b"1"), lambda: (sub / "dir").mkdir(),
                   lambda: os.symlink("f", sub / "link"), lambda: os.link(sub / "f", sub / "f2"),
                   lambda: os.unlink(sub / "f2"), lambda: (sub / "dir").rmdir()):
        change()
        for forget in (False, True):
            if forget:
                forget_kernel_entries()
            here, there = os.stat(sub), server.stat(f"/{d.name}/sub")
            assert (here.st_mtime_ns, here.st_ctime_ns, here.st_nlink) == (
                there.st_mtime_ns, there.st_ctime_ns, there.st_nlink)


def test_new_files_have_no_xattrs_until_set(two_mounts: tuple[Mounted, Mounted]) -> None:
    a, _ = two_mounts
    d = a.subdir("xattr")
    (d / "f").write_bytes(b"abc")
    with pytest.raises(OSError) as absent:
        os.getxattr(d / "f", "user.tag")
    assert absent.value.errno == errno.ENODATA
    os.setxattr(d / "f", "user.tag", b"v1")
    assert os.getxattr(d / "f", "user.tag") == b"v1"
    os.mkdir(d / "sub")
    os.setxattr(d / "sub", "user.tag", b"v2")
    assert os.getxattr(d / "sub", "user.tag") == b"v2"


def test_listing_fills_the_name_cache_correctly(two_mounts: tuple[Mounted, Mounted]) -> None:
    a, _ = two_mounts
    d = a.subdir("listing")
    sizes = {f"f{i}": i * 10 for i in range(30)}
    for name, size in sizes.items():
        (d / name).write_bytes(b"z" * size)
    forget_kernel_entries()
    assert sorted(os.listdir(d)) == sorted(sizes)
    forget_kernel_entries()
    assert {name: os.stat(d / name).st_size for name in sizes} == sizes


def test_other_mounts_changes_seen_within_the_timeout(two_mounts: tuple[Mounted, Mounted]) -> None:
    a, b = two_mounts
    d = a.subdir("cross")
    other = b.path / d.name
    (d / "f").write_bytes(b"one")
    (d / "gone").write_bytes(b"")
    (d / "old").write_bytes(b"")
    for name in ("f", "gone", "old"):
        os.stat(d / name)  # cached in A's kernel and daemon
    # a name B creates is seen by A at once (absent names are never cached)
    (other / "new").write_bytes(b"fresh")
    assert (d / "new").read_bytes() == b"fresh"
    os.chmod(other / "f", 0o604)
    os.unlink(other / "gone")
    os.rename(other / "old", other / "renamed")
    (other / "f").write_bytes(b"longer contents")
    bound = 2 * TIMEOUT_S + 3  # the kernel's and the daemon's copies, plus slack for a loaded machine

    def caught_up() -> bool:
        forget_kernel_entries()
        got = os.stat(d / "f")
        return (got.st_mode & 0o7777 == 0o604 and got.st_size == len(b"longer contents")
                and stat_errno(d / "gone") == errno.ENOENT and stat_errno(d / "old") == errno.ENOENT
                and stat_errno(d / "renamed") == 0)

    wait_for(caught_up, timeout_s=bound)
    assert (d / "f").read_bytes() == b"longer contents"


def test_open_after_another_mount_replaced_the_name(two_mounts: tuple[Mounted, Mounted]) -> None:
    """The daemon still maps the name to the replaced inode: the open of it answers ESTALE, the
    daemon forgets what it cached, and the kernel's retried lookup finds the new file."""
    a, b = two_mounts
    d = a.subdir("replace")
    other = b.path / d.name
    (d / "final").write_bytes(b"old version")
    assert (other / "final").read_bytes() == b"old version"  # B caches the name and the inode
    os.stat(other / "final")
    (d / "draft").write_bytes(b"new version!")
    os.rename(d / "draft", d / "final")
    forget_kernel_entries()  # B's next lookup reaches its daemon, which still has the old mapping
    assert (other / "final").read_bytes() == b"new version!"


def test_listing_carries_the_attributes_stat_shows(long_mount: Mounted, server: deepfs.Client,
                                                    cluster: LocalCluster) -> None:
    """One READDIR brings every entry's attributes (no GETATTR per entry), and what the
    kernel and the daemon then answer for each name is what the server says."""
    d = long_mount.subdir("plus")
    for i in range(12):
        (d / f"f{i}").write_bytes(b"q" * (i * 1000 + 1))
        os.chmod(d / f"f{i}", 0o600 | i)
    (d / "sub").mkdir(mode=0o750)
    os.symlink("f1", d / "ln")
    os.link(d / "f2", d / "f2link")
    forget_kernel_entries()
    before = meta_requests(cluster)
    names = sorted(os.listdir(d))
    listed = meta_requests(cluster)
    assert served(before, listed, "READDIR") >= 1 and served(before, listed, "GETATTR") == 0
    here = {name: fields(os.lstat(d / name)) for name in names}
    assert served(listed, meta_requests(cluster), "LOOKUP", "GETATTR") == 0  # all from the listing
    assert here == {name: fields(server.stat(f"/{d.name}/{name}")) for name in names}
    assert here["f2"][3] == 2 and here["f5"][2] == 5001 and here["f5"][1] & 0o7777 == 0o605


def test_statahead_answers_lookups_and_this_mounts_changes_show_at_once(
        long_mount: Mounted, server: deepfs.Client, cluster: LocalCluster) -> None:
    d = long_mount.subdir("statahead")
    for i in range(40):  # made elsewhere: the mount has cached none of these names
        server.write_file(f"/{d.name}/f{i}", b"s" * i)
    forget_kernel_entries()
    before = meta_requests(cluster)
    sizes = {i: os.stat(d / f"f{i}").st_size for i in range(40)}
    after = meta_requests(cluster)
    assert sizes == {i: i for i in range(40)}
    assert served(before, after, "LOOKUP") < 20 and served(before, after, "READDIR") >= 1
    # this mount's own unlink and rename: seen at once, even after the kernel forgot
    moved = os.stat(d / "f6").st_ino
    os.unlink(d / "f5")
    os.rename(d / "f6", d / "g6")
    os.rename(d / "f7", d / "f8")  # over a name the listing cached
    for forget in (False, True):
        if forget:
            forget_kernel_entries()
        assert stat_errno(d / "f5") == errno.ENOENT
        assert stat_errno(d / "f6") == errno.ENOENT and stat_errno(d / "f7") == errno.ENOENT
        assert os.stat(d / "g6").st_ino == moved and os.stat(d / "f8").st_size == 7
        for name in ("g6", "f8", "f9"):
            assert fields(os.stat(d / name)) == fields(server.stat(f"/{d.name}/{name}"))
        assert fields(os.stat(d)) == fields(server.stat(f"/{d.name}"))  # times the replies carried
    assert sorted(os.listdir(d)) == sorted([f"f{i}" for i in range(40) if i not in (5, 6, 7)] + ["g6"])


def test_statahead_shows_other_mounts_changes_within_the_timeout(
        two_mounts: tuple[Mounted, Mounted], server: deepfs.Client) -> None:
    a, b = two_mounts
    d = a.subdir("statahead-cross")
    for i in range(20):
        server.write_file(f"/{d.name}/f{i}", b"x" * i)
    forget_kernel_entries()
    assert [os.stat(d / f"f{i}").st_size for i in range(20)] == list(range(20))  # listed by statahead
    other = b.path / d.name
    os.unlink(other / "f3")
    os.rename(other / "f4", other / "g4")
    (other / "f9").write_bytes(b"new and longer")

    def caught_up() -> bool:
        forget_kernel_entries()
        present = [name for name in (f"f{i}" for i in range(20)) if stat_errno(d / name) == 0]  # lists again
        return (present == [f"f{i}" for i in range(20) if i not in (3, 4)] and stat_errno(d / "g4") == 0
                and os.stat(d / "f9").st_size == len(b"new and longer"))

    wait_for(caught_up, timeout_s=2 * TIMEOUT_S + 3)
    assert (d / "g4").read_bytes() == b"x" * 4


def test_statahead_backs_off_from_a_directory_whose_listing_went_unused(
        two_mounts: tuple[Mounted, Mounted], server: deepfs.Client, cluster: LocalCluster) -> None:
    """A data loader's pattern: a few random names of a large directory per timeout. The first
    listing answers almost none of the lookups that follow it, so once it expired the directory
    is not listed again (each lookup asks the server); names are still right."""
    a, _ = two_mounts
    d = a.subdir("statahead-wasted")
    for i in range(200):
        server.write_file(f"/{d.name}/f{i}", b"w" * (i % 7))
    forget_kernel_entries()
    before = meta_requests(cluster)
    assert [os.stat(d / f"f{i}").st_size for i in range(5)] == [i % 7 for i in range(5)]
    first = meta_requests(cluster)
    assert served(before, first, "READDIR") == 1  # the fifth lookup listed the directory
    time.sleep(TIMEOUT_S + 0.3)  # the listing's names expire, unused
    forget_kernel_entries()
    assert [os.stat(d / f"f{i}").st_size for i in range(100, 110)] == [i % 7 for i in range(100, 110)]
    after = meta_requests(cluster)
    assert served(first, after, "READDIR") == 0
    assert served(first, after, "LOOKUP") >= 10


def test_statahead_pages_through_a_directory_larger_than_one_listing(
        long_mount: Mounted, server: deepfs.Client, cluster: LocalCluster) -> None:
    """Past one READDIR page (STATAHEAD_PAGE names), statahead asks for the next page after the
    last cookie: names on every page are answered from the listing, with the right attributes."""
    d = long_mount.subdir("statahead-pages")
    count = 1100
    for i in range(count):
        server.write_file(f"/{d.name}/f{i:04d}", b"p" * (i % 50))
    forget_kernel_entries()
    before = meta_requests(cluster)
    sizes = [os.stat(d / f"f{i:04d}").st_size for i in range(count)]
    after = meta_requests(cluster)
    assert sizes == [i % 50 for i in range(count)]
    assert served(before, after, "READDIR") >= 2  # a second page was listed
    assert served(before, after, "LOOKUP") < 50
