"""FragmentStore on a real directory: format, verification, quarantine, space."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import crc32c
import pytest

from deepfs.errors import ChecksumError
from storage_node.fragment_store import FragmentKey, FragmentStore

pytestmark = pytest.mark.timeout(30)

BS = 4096  # small blocks so a few KiB cross many block boundaries


def block_crcs(data: bytes, block_size: int = BS) -> list[int]:
    return [crc32c.crc32c(data[i : i + block_size]) for i in range(0, len(data), block_size)]


def make_store(path: Path, **kwargs: object) -> FragmentStore:
    return FragmentStore(path, fsync=False, block_size=BS, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def store(tmp_path: Path) -> FragmentStore:
    return make_store(tmp_path / "node")


KEY = FragmentKey(7, 3, 123456789, 2)
DATA = os.urandom(5 * BS + 123)


def test_round_trip(store: FragmentStore) -> None:
    crc = store.put(KEY, memoryview(DATA), block_crcs(DATA), BS)
    assert crc == crc32c.crc32c(DATA)
    assert store.read(KEY) == DATA
    assert store.stat(KEY) == {"size": len(DATA), "block_size": BS, "crcs": block_crcs(DATA)}
    assert store.path_of(KEY) == store.root / "fragments" / "07" / "7" / "3.123456789.2"
    stats = store.stats()
    assert stats["fragments"] == 1 and stats["quarantined"] == 0
    assert stats["used_bytes"] == store.path_of(KEY).stat().st_size > len(DATA)


def test_empty_fragment(store: FragmentStore) -> None:
    store.put(KEY, b"", [crc32c.crc32c(b"")], BS)  # writers send the CRC of b"" for no data
    assert store.read(KEY) == b""
    assert store.stat(KEY)["size"] == 0


@pytest.mark.parametrize(
    ("offset", "length"),
    [(0, 1), (1, BS), (BS - 1, 2), (BS, BS), (3 * BS + 17, 2 * BS + 5), (len(DATA) - 1, 100), (5, 10**9),
     (len(DATA), 10), (len(DATA) + 100, 10), (100, 0)],
)
def test_range_reads(store: FragmentStore, offset: int, length: int) -> None:
    store.put(KEY, DATA, block_crcs(DATA), BS)
    got = store.read_range(KEY, offset, length)
    assert got.size == len(DATA)
    assert got.data == DATA[offset : offset + length]


def test_range_read_verifies_only_covered_blocks(store: FragmentStore) -> None:
    store.put(KEY, DATA, block_crcs(DATA), BS)
    corrupt_data_byte(store, KEY, 4 * BS + 5)  # block 4
    assert store.read(KEY, 0, 2 * BS) == DATA[: 2 * BS]
    with pytest.raises(ChecksumError):
        store.read(KEY, 4 * BS, 1)


def corrupt_data_byte(store: FragmentStore, key: FragmentKey, data_offset: int) -> None:
    """Flip one byte of the fragment's data as a failing disk would."""
    path = store.path_of(key)
    raw = bytearray(path.read_bytes())
    data_start = len(raw) - store.stat(key)["size"]  # type: ignore[operator]
    raw[data_start + data_offset] ^= 0x01
    path.write_bytes(raw)


def test_flipped_byte_quarantines(store: FragmentStore) -> None:
    store.put(KEY, DATA, block_crcs(DATA), BS)
    corrupt_data_byte(store, KEY, 2 * BS + 100)
    with pytest.raises(ChecksumError) as info:
        store.read(KEY, 2 * BS, 10)
    assert info.value.errno == errno.EBADMSG
    assert not store.path_of(KEY).exists()
    quarantined = list((store.root / "quarantine").iterdir())
    assert len(quarantined) == 1 and quarantined[0].name.startswith("7.3.123456789.2.")
    with pytest.raises(FileNotFoundError):  # never served again
        store.read(KEY)
    stats = store.stats()
    assert (stats["fragments"], stats["quarantined"], stats["used_bytes"]) == (0, 1, 0)
    assert make_store(store.root).stats()["quarantined"] == 1  # counted again after a restart


def test_corrupt_header_quarantines(store: FragmentStore) -> None:
    store.put(KEY, DATA, block_crcs(DATA), BS)
    path = store.path_of(KEY)
    raw = bytearray(path.read_bytes())
    raw[10] ^= 0xFF  # inside data_len
    path.write_bytes(raw)
    with pytest.raises(ChecksumError):
        store.stat(KEY)
    assert store.stats()["quarantined"] == 1


def test_truncated_file_quarantines(store: FragmentStore) -> None:
    store.put(KEY, DATA, block_crcs(DATA), BS)
    path = store.path_of(KEY)
    os.truncate(path, path.stat().st_size - 200)
    with pytest.raises(ChecksumError):
        store.read(KEY, len(DATA) - 10, 10)
    assert store.stats()["quarantined"] == 1


def test_bad_crc_on_put_stores_nothing(store: FragmentStore) -> None:
    crcs = block_crcs(DATA)
    crcs[3] ^= 1
    with pytest.raises(ChecksumError):
        store.put(KEY, DATA, crcs, BS)
    with pytest.raises(FileNotFoundError):
        store.read(KEY)
    assert store.stats()["fragments"] == 0
    assert list(store.fragments_dir.rglob("*.tmp")) == []


def test_wrong_crc_count_is_refused(store: FragmentStore) -> None:
    with pytest.raises(ValueError, match="CRCs"):
        store.put(KEY, DATA, block_crcs(DATA)[:-1], BS)


def test_missing_is_enoent(store: FragmentStore) -> None:
    for call in (lambda: store.read(KEY), lambda: store.stat(KEY)):
        with pytest.raises(FileNotFoundError) as info:
            call()
        assert info.value.errno == errno.ENOENT


@pytest.mark.parametrize(
    "bad",
    [["../../etc/passwd", 0, 0, 0], [-1, 0, 0, 0], [2**64, 0, 0, 0], [1, 2, 3, 32], [1, 2, 3], [1, 2, 3, 4, 5],
     [True, 0, 0, 0], [1.0, 0, 0, 0], "1/2/3/4", None, [b"1", 0, 0, 0]],
)
def test_invalid_keys_rejected(bad: object) -> None:
    with pytest.raises(ValueError):
        FragmentKey.of(bad)


def test_largest_valid_key(store: FragmentStore) -> None:
    key = FragmentKey.of([2**64 - 1, 2**64 - 1, 2**64 - 1, 31])
    store.put(key, b"x", block_crcs(b"x"), BS)
    assert store.read(key) == b"x"


def test_overwrite_replaces(store: FragmentStore) -> None:
    store.put(KEY, DATA, block_crcs(DATA), BS)
    store.put(KEY, b"short", block_crcs(b"short"), BS)
    assert store.read(KEY) == b"short"
    stats = store.stats()
    assert stats["fragments"] == 1 and stats["used_bytes"] == store.path_of(KEY).stat().st_size


def test_delete(store: FragmentStore) -> None:
    other = FragmentKey(7, 4, 1, 0)
    store.put(KEY, DATA, block_crcs(DATA), BS)
    store.put(other, DATA, block_crcs(DATA), BS)
    assert store.delete([KEY, FragmentKey(99, 0, 0, 0)]) == 1
    assert store.path_of(other).parent.is_dir()
    assert store.delete([other, other]) == 1
    assert not store.path_of(other).parent.exists()  # the empty inode directory went too
    assert store.stats()["fragments"] == 0 and store.stats()["used_bytes"] == 0


def test_enospc_with_tiny_capacity(tmp_path: Path) -> None:
    store = make_store(tmp_path / "node", capacity_bytes=64 << 10)
    small = os.urandom(8 << 10)
    store.put(FragmentKey(1, 0, 0, 0), small, block_crcs(small), BS)
    big = os.urandom(60 << 10)
    with pytest.raises(OSError) as info:
        store.put(FragmentKey(1, 1, 0, 0), big, block_crcs(big), BS)
    assert info.value.errno == errno.ENOSPC
    assert store.stats()["fragments"] == 1
    assert list(store.fragments_dir.rglob("*.tmp")) == []
    assert store.stats()["free_bytes"] < 64 << 10


def test_enospc_with_reserve_above_free_space(tmp_path: Path) -> None:
    store = make_store(tmp_path / "node", reserve_bytes=1 << 62)
    with pytest.raises(OSError) as info:
        store.put(KEY, b"x", block_crcs(b"x"), BS)
    assert info.value.errno == errno.ENOSPC
    assert store.stats()["free_bytes"] == 0


def test_crash_leftovers_cleaned_and_counters_rebuilt(tmp_path: Path) -> None:
    store = make_store(tmp_path / "node")
    store.put(KEY, DATA, block_crcs(DATA), BS)
    used = store.stats()["used_bytes"]
    leftover = store.path_of(KEY).parent / ".3.9.0.deadbeef.tmp"
    leftover.write_bytes(b"half a fragment")
    reopened = make_store(tmp_path / "node")
    assert not leftover.exists()
    assert reopened.stats()["fragments"] == 1 and reopened.stats()["used_bytes"] == used
    assert reopened.read(KEY) == DATA


def test_fsync_path_works(tmp_path: Path) -> None:
    store = FragmentStore(tmp_path / "node", fsync=True)
    store.put(KEY, DATA, block_crcs(DATA, 64 << 10), 64 << 10)
    assert store.read(KEY, 70000, 10) == DATA[70000:70010]
    assert store.delete([KEY]) == 1
