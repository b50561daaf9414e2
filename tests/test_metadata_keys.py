"""Key encoding of the metadata store: byte order must equal logical order."""

from __future__ import annotations

import random

import pytest

from deepfs.messages import FragmentKey
from metadata import keys
from metadata.records import Inode

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]


def test_inode_keys_sort_numerically() -> None:
    numbers = [0, 1, 2, 255, 256, 65535, 1 << 32, (1 << 64) - 1]
    encoded = [keys.inode_key(n) for n in numbers]
    assert sorted(encoded) == encoded
    assert all(len(k) == 8 for k in encoded)
    assert [keys.decode_inode_key(k) for k in encoded] == numbers


@pytest.mark.parametrize("bad", [-1, 1 << 64])
def test_out_of_range_integers_are_refused(bad: int) -> None:
    with pytest.raises(ValueError):
        keys.inode_key(bad)


def test_dentries_of_one_directory_share_a_prefix_and_never_mix() -> None:
    a = keys.dentry_key(2, b"zzz")
    b = keys.dentry_key(3, b"")
    c = keys.dentry_key(3, b"a")
    assert a < b < c
    assert c.startswith(keys.dir_prefix(3)) and not a.startswith(keys.dir_prefix(3))
    assert keys.dentry_name(c) == b"a"


def test_cookie_and_stripe_keys_sort_by_second_number() -> None:
    rng = random.Random(7)
    pairs = sorted((rng.randrange(4), rng.randrange(1 << 40)) for _ in range(200))
    encoded = [keys.cookie_key(p, c) for p, c in pairs]
    assert sorted(encoded) == encoded
    assert [keys.decode_pair_key(k) for k in encoded] == pairs
    stripe_keys = [keys.stripe_key(9, i) for i in (0, 1, 2, 10, 300, 70000)]
    assert sorted(stripe_keys) == stripe_keys
    assert all(len(k) == keys.PAIR_KEY_SIZE for k in stripe_keys)


def test_gc_keys_round_trip_and_group_by_node() -> None:
    fragment = FragmentKey(ino=12, stripe=3, version=7, slot=5)
    key = keys.gc_key(4, fragment)
    assert len(key) == keys.GC_KEY_SIZE
    assert keys.decode_gc_key(key) == (4, fragment)
    assert key.startswith(keys.gc_prefix(4))
    assert keys.gc_key(4, FragmentKey(99, 99, 99, 31)) < keys.gc_key(5, FragmentKey(0, 0, 0, 0))
    with pytest.raises(ValueError):
        keys.gc_key(1, FragmentKey(1, 1, 1, 256))


def test_xattr_and_node_keys() -> None:
    assert keys.xattr_name(keys.xattr_key(5, b"user.x")) == b"user.x"
    assert keys.decode_node_key(keys.node_key(70000)) == 70000
    with pytest.raises(ValueError):
        keys.node_key(1 << 32)


def test_values_keep_bytes_and_text_apart() -> None:
    value = {"name": b"\xff\x00bin", "text": "t", "n": [1, -1, 1 << 63]}
    assert keys.unpack(keys.pack(value)) == value


def test_inode_record_round_trips_and_reads_shorter_records() -> None:
    inode = Inode(5, 0o100644, 1, 2, 1, 10, 20, 30, size=4096, layout={"k": 4}, target=None, min_version=9)
    assert Inode.from_value(keys.unpack(keys.pack(inode.to_value()))) == inode
    old = inode.to_value()[:-3]  # a record written before min_version, max_version, truncs existed
    assert Inode.from_value(old).min_version == 0
    assert Inode.from_value(inode.to_value()[:-2]).truncs is None
    assert inode.attr()["blocks"] == 8


def test_name_cookies_are_stable_positive_and_leave_room_for_the_mounts_offsets() -> None:
    names = [b"", b"a", b"\xff" * 255, *(random.randbytes(20) for _ in range(200))]
    for name in names:
        cookie = keys.name_cookie(name)
        assert cookie == keys.name_cookie(name) and 1 <= cookie <= keys.COOKIE_MAX
        assert cookie + 2 < 1 << 63  # '.' and '..' come first: the kernel's offset is signed 64-bit
    assert keys.next_cookie_after(7) == 8 and keys.next_cookie_after(keys.COOKIE_MAX) == 1


def test_shared_state_keys() -> None:
    assert keys.counter_key(keys.META_DIRECTORIES, b"ab12").startswith(keys.counter_prefix(keys.META_DIRECTORIES))
    assert not keys.counter_key(b"directories_x", b"1").startswith(keys.counter_prefix(keys.META_DIRECTORIES))
    assert keys.op_result_key(bytes(16)) == bytes(16)
    with pytest.raises(ValueError):
        keys.op_result_key(b"short")
    assert keys.decode_u64_value(keys.u64_value(1 << 62)) == 1 << 62
