"""The FUSE client's pure pieces, without a mount."""

from __future__ import annotations

import stat
import time
from pathlib import Path
from typing import Any

import pytest

from deepfs.auth import AuthError
from fuse_client.attr_cache import AttrCache, NameCache, XattrCache, cache_stamp, to_entry
from fuse_client.dirs import Directories
from fuse_client.main import MountError, check_allow_other
from fuse_client.mounts import unescape_mount_path
from fuse_client.options import allow_other_refusal, key_path, parse_args, user_allow_other_enabled
from fuse_client.posix import may_access, refuse_acl, without_set_id_bits
from fuse_client.readahead import is_sequential

pytestmark = pytest.mark.unit

ATTR = {"ino": 7, "mode": stat.S_IFREG | 0o640, "uid": 10, "gid": 20, "nlink": 1, "size": 5,
        "atime_ns": 1, "mtime_ns": 2_000_000_003, "ctime_ns": 4, "rdev": 0, "generation": 9, "blocks": 1}


def test_set_id_bits_follow_linux() -> None:
    assert without_set_id_bits(0o6755) == 0o755  # group-executable: both go
    assert without_set_id_bits(0o6745) == 0o2745  # setgid without group x (mandatory-locking mark) stays
    assert without_set_id_bits(0o644) == 0o644


def test_access_check() -> None:
    assert may_access(ATTR, 4 | 2, uid=10, gid=99)  # owner rw
    assert not may_access(ATTR, 2, uid=11, gid=20)  # group r only
    assert may_access(ATTR, 4, uid=11, gid=20)
    assert not may_access(ATTR, 4, uid=11, gid=21)  # others nothing
    assert may_access(ATTR, 4 | 2, uid=0, gid=0)  # root reads and writes anything
    assert not may_access(ATTR, 1, uid=0, gid=0)  # but executes only what someone may execute


def test_acl_xattrs_are_refused() -> None:
    with pytest.raises(OSError):
        refuse_acl(b"system.posix_acl_access")
    refuse_acl(b"user.anything")


def test_sequential_window() -> None:
    assert is_sequential(1 << 20, 1 << 20)
    assert is_sequential((1 << 20) + (512 << 10), 1 << 20)  # parallel read-ahead requests
    assert not is_sequential(10 << 20, 1 << 20)
    assert not is_sequential(0, 4 << 20)


def test_attr_cache_expires_and_clears() -> None:
    cache = AttrCache(ttl_s=0.05)
    cache.put(ATTR)
    assert cache.get(7) == ATTR
    time.sleep(0.06)
    assert cache.get(7) is None
    cache.put(ATTR)
    cache.clear()
    assert cache.get(7) is None
    assert AttrCache(ttl_s=0).put(ATTR) == ATTR  # a zero timeout caches nothing


def test_entry_and_stamp() -> None:
    entry = to_entry(ATTR, 1.5, 2.5)
    assert (entry.st_ino, entry.generation, entry.st_size, entry.st_mtime_ns) == (7, 9, 5, 2_000_000_003)
    assert (entry.attr_timeout, entry.entry_timeout) == (1.5, 2.5)
    assert cache_stamp(ATTR) != cache_stamp(dict(ATTR, ctime_ns=5))


def test_mount_paths_with_odd_characters() -> None:
    assert unescape_mount_path("/mnt/with\\040space\\011tab\\134back") == "/mnt/with space\ttab\\back"


def test_options_round_trip() -> None:
    options = parse_args(["127.0.0.1:7700", "/mnt/x", "--attr-timeout", "0.5", "--allow-other", "-o", "ro",
                          "--failover-timeout", "2.5"])
    assert (options.meta_address, options.mountpoint, options.foreground) == ("127.0.0.1:7700", Path("/mnt/x"), False)
    again = parse_args(options.to_args())
    assert again.foreground and again.attr_timeout_s == 0.5 and again.allow_other
    assert again.client_config().meta_failover_s == 2.5
    assert parse_args(["127.0.0.1:7700", "/mnt/x"]).client_config().meta_failover_s == 10.0
    assert again.extra_fuse_options == ["ro"]
    assert "default_permissions" in again.fuse_options() and "allow_other" in again.fuse_options()
    with pytest.raises(SystemExit):
        parse_args(["127.0.0.1:7700", "/mnt/x", "--attr-timeout", "-1"])
    with pytest.raises(SystemExit):
        parse_args(["127.0.0.1:7700", "/mnt/x", "--failover-timeout", "0"])


def test_the_key_goes_to_the_daemon_as_an_absolute_path(tmp_path: Path) -> None:
    options = parse_args(["127.0.0.1:7700", "/mnt/x", "--key", "mount.key"])
    assert options.key == Path("mount.key")
    options.key = key_path(options.key)  # what `deepfs mount` does before starting the daemon
    assert options.key.is_absolute() and options.key.name == "mount.key"
    again = parse_args(options.to_args())
    assert again.key == options.key and again.client_config().key_file == str(options.key)
    assert parse_args(["127.0.0.1:7700", "/mnt/x"]).client_config().key_file == ""  # resolved by the client


def test_key_path_follows_resolve_key_order(tmp_path: Path) -> None:
    home = tmp_path / "home"
    default = home / ".config/deepfs/key"
    env = {"HOME": str(home)}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(home))
        with pytest.raises(AuthError, match="no DeepFS key"):
            key_path(None, env)
        default.parent.mkdir(parents=True)
        default.write_text("{}")
        assert key_path(None, env) == default
        assert key_path(None, {**env, "DEEPFS_KEY": "/etc/deepfs/env.key"}) == Path("/etc/deepfs/env.key")
        assert key_path(Path("/k/given.key"), {**env, "DEEPFS_KEY": "/x"}) == Path("/k/given.key")


def test_default_permissions_cannot_be_dropped() -> None:
    # A trusted-mount key makes the server act for each request's uid: the kernel's checks are the checks.
    options = parse_args(["127.0.0.1:7700", "/mnt/x", "-o", "ro"])
    options.extra_fuse_options = []
    assert "default_permissions" in options.fuse_options()


def test_a_subtree_root_is_its_own_parent() -> None:
    async def nothing(*_args: object) -> Any:
        raise AssertionError("no round trips")

    dirs = Directories(nothing, nothing, root=40)
    assert dirs.parent_of(40) == 40


def test_root_mounts_allow_other_users_by_default() -> None:
    argv = ["127.0.0.1:7700", "/mnt/x"]
    assert parse_args(argv, euid=0).allow_other
    assert not parse_args(argv, euid=1000).allow_other
    assert not parse_args([*argv, "--no-allow-other"], euid=0).allow_other
    assert parse_args([*argv, "--allow-other"], euid=1000).allow_other
    assert not parse_args([*argv, "--allow-other", "--no-allow-other"], euid=0).allow_other  # the last one wins
    for euid in (0, 1000):
        for flags in ([], ["--allow-other"], ["--no-allow-other"]):
            options = parse_args([*argv, *flags], euid=euid)
            assert "default_permissions" in options.fuse_options()  # the kernel always checks mode bits
            assert ("allow_other" in options.fuse_options()) == options.allow_other
            # The daemon a background mount starts gets the resolved choice, not its own default.
            other_euid = 1000 if euid == 0 else 0
            assert parse_args(options.to_args(), euid=other_euid).allow_other == options.allow_other


def test_non_root_allow_other_needs_fuse_conf(tmp_path: Path) -> None:
    assert user_allow_other_enabled("# comment\n  user_allow_other  \n")
    assert not user_allow_other_enabled("#user_allow_other\nmount_max = 10\n")
    assert not user_allow_other_enabled("user_allow_other_please\n")
    assert allow_other_refusal(True, 0, None) is None  # root needs no permission
    assert allow_other_refusal(False, 1000, None) is None
    assert allow_other_refusal(True, 1000, "user_allow_other\n") is None
    refusal = allow_other_refusal(True, 1000, "#user_allow_other\n")
    assert refusal is not None and "user_allow_other" in refusal and "\n" not in refusal
    assert allow_other_refusal(True, 1000, None) == refusal  # no fuse.conf at all
    conf = tmp_path / "fuse.conf"
    conf.write_text("#user_allow_other\n")
    options = parse_args(["127.0.0.1:7700", "/mnt/x", "--allow-other"], euid=1000)
    with pytest.raises(MountError, match="user_allow_other"):
        check_allow_other(options, 1000, conf)
    check_allow_other(options, 0, conf)
    conf.write_text("user_allow_other\n")
    check_allow_other(options, 1000, conf)
    with pytest.raises(MountError):
        check_allow_other(options, 1000, tmp_path / "missing")


def test_xattr_cache_remembers_absence_and_forgets_per_inode() -> None:
    cache = XattrCache(ttl_s=10)
    assert cache.get(7, b"security.capability") == (False, None)
    cache.put(7, b"security.capability", None)
    cache.put(7, b"user.a", b"1")
    assert cache.get(7, b"security.capability") == (True, None)
    assert cache.get(7, b"user.a") == (True, b"1")
    cache.drop(7)
    assert cache.get(7, b"user.a") == (False, None)
    short = XattrCache(ttl_s=0.01)
    short.put(1, b"user.a", b"1")
    time.sleep(0.02)
    assert short.get(1, b"user.a") == (False, None)


def test_xattr_cache_of_a_new_inode_says_absent_until_set() -> None:
    cache = XattrCache(ttl_s=10)
    cache.put_none(7)
    assert cache.get(7, b"security.capability") == (True, None)
    cache.put(7, b"user.a", b"1")
    assert cache.get(7, b"user.a") == (True, b"1")
    assert cache.get(7, b"user.b") == (True, None)
    cache.drop(7)
    assert cache.get(7, b"user.b") == (False, None)


def test_name_cache_expires_and_pops() -> None:
    names = NameCache(ttl_s=10, max_entries=2)
    names.put(1, b"a", 7)
    assert names.get(1, b"a") == 7
    assert names.get(2, b"a") is None
    assert names.pop(1, b"a") == 7
    assert names.get(1, b"a") is None and names.pop(1, b"a") is None
    names.put(1, b"a", 7)
    names.put(1, b"b", 8)
    names.put(1, b"c", 9)  # over the bound: forgotten wholesale first
    assert (names.get(1, b"a"), names.get(1, b"c")) == (None, 9)
    short = NameCache(ttl_s=0.01)
    short.put(1, b"a", 7)
    time.sleep(0.02)
    assert short.get(1, b"a") is None
    NameCache(ttl_s=0).put(1, b"a", 7)  # a zero timeout caches nothing
    assert NameCache(ttl_s=0).get(1, b"a") is None


def test_a_new_name_moves_the_cached_parent_times() -> None:
    directory = {**ATTR, "ino": 3, "mode": stat.S_IFDIR | 0o755, "nlink": 2, "mtime_ns": 100, "ctime_ns": 100}
    cache = AttrCache(ttl_s=10)
    cache.put(directory)
    cache.entries_changed(3, 500, subdirs_delta=1)
    got = cache.get(3)
    assert got is not None and (got["mtime_ns"], got["ctime_ns"], got["nlink"]) == (500, 500, 3)
    assert directory["nlink"] == 2  # the cached map is replaced, not changed under a holder
    cache.entries_changed(3, 400)  # times never go back
    got = cache.get(3)
    assert got is not None and (got["mtime_ns"], got["nlink"]) == (500, 3)
    cache.entries_changed(4, 500)  # not cached: stays uncached
    assert cache.get(4) is None


def test_socket_trouble_reaches_programs_as_eio() -> None:
    import errno

    from fuse_client.posix import syscall_errno

    assert syscall_errno(ConnectionResetError(errno.ECONNRESET, "reset")) == errno.EIO
    assert syscall_errno(ConnectionRefusedError(errno.ECONNREFUSED, "refused")) == errno.EIO
    assert syscall_errno(OSError("no errno")) == errno.EIO
    assert syscall_errno(FileNotFoundError(errno.ENOENT, "x")) == errno.ENOENT
    assert syscall_errno(OSError(errno.ENOSPC, "full")) == errno.ENOSPC
