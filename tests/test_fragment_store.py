"""FragmentStore on a real directory: format, verification, quarantine, space."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import crc32c
import pytest

from deepfs.checksums import fragment_digest
from deepfs.errors import ChecksumError
from deepfs.messages import FragmentKey
from storage_node import fragment_format as fmt
from storage_node.direct_io import DIRECT_MIN_BYTES
from storage_node.fragment_store import FragmentStore, open_to_read
from storage_node.payload_pool import PayloadPool

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

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
    digest = store.put(KEY, memoryview(DATA), block_crcs(DATA), BS)
    assert digest == fragment_digest(block_crcs(DATA))
    assert store.read(KEY) == DATA
    assert store.stat(KEY) == {"size": len(DATA), "block_size": BS, "crcs": block_crcs(DATA)}
    assert store.path_of(KEY) == store.root / "fragments" / "07" / "7.3.123456789.2"
    stats = store.stats()
    assert stats["fragments"] == 1 and stats["quarantined"] == 0
    assert stats["used_bytes"] == store.path_of(KEY).stat().st_size > len(DATA)


def test_a_header_claiming_a_huge_crc_table_is_refused_without_reading_it(store: FragmentStore) -> None:
    """A damaged or forged header with a valid CRC may claim 2**29 blocks (a 2 GiB CRC
    table): the node must see the file is far shorter, not allocate the table to read it."""
    store.put(KEY, memoryview(DATA), block_crcs(DATA), BS)
    path = store.path_of(KEY)
    claimed = fmt.layout((1 << 29) * fmt.MIN_BLOCK_SIZE, fmt.MIN_BLOCK_SIZE)
    header = fmt._HEADER  # noqa: SLF001 - forging the on-disk header is the point
    fields = header.pack(fmt.MAGIC, fmt.FORMAT_VERSION, 0, claimed.data_len, claimed.block_size,
                         claimed.n_blocks, claimed.data_offset, 0)[: header.size - 4]
    with open(path, "r+b") as f:
        f.write(fields + crc32c.crc32c(fields).to_bytes(4, "little"))
    tracemalloc.start()
    try:
        with pytest.raises(ChecksumError):
            store.stat(KEY)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    assert store.stats()["quarantined"] == 1


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


@pytest.mark.parametrize(
    ("offset", "length", "inner"),
    [(0, len(DATA), (0, len(DATA))), (BS, 2 * BS, (BS, 3 * BS)), (17, 3 * BS, (BS, 3 * BS)),
     (BS + 1, 10**9, (2 * BS, len(DATA))), (3, len(DATA) - 130, (BS, 4 * BS)), (BS + 1, BS, None), (10, 20, None)],
)
def test_spans_send_whole_blocks_unread_and_check_the_partial_ones(
        store: FragmentStore, offset: int, length: int, inner: tuple[int, int] | None) -> None:
    """The whole blocks of a range stay in the file, with their CRCs; the partial blocks at
    its ends come read and checked (the fragment's end counts as a block boundary)."""
    store.put(KEY, DATA, block_crcs(DATA), BS)
    span = store.open_span(KEY, offset, length)
    if inner is None:
        assert span is None
        return
    assert span is not None
    try:
        start, end = inner
        data_start = store.path_of(KEY).stat().st_size - len(DATA)
        assert (span.file_offset - data_start, span.length) == (start, end - start)
        assert span.crcs == block_crcs(DATA)[start // BS : -(-end // BS)]
        sent = bytes(span.head) + os.pread(span.fd, span.length, span.file_offset) + bytes(span.tail)
        assert sent == DATA[offset : offset + length]
    finally:
        os.close(span.fd)


@pytest.mark.parametrize("bad_block", [0, 4])
def test_a_span_checks_its_partial_blocks(store: FragmentStore, bad_block: int) -> None:
    store.put(KEY, DATA, block_crcs(DATA), BS)
    corrupt_data_byte(store, KEY, bad_block * BS + 100)
    with pytest.raises(ChecksumError):
        store.open_span(KEY, 50, 4 * BS + 200)  # partial blocks 0 and 4
    assert not store.path_of(KEY).exists()  # quarantined


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
    assert not store.path_of(KEY).exists() and store.read(other) == DATA
    assert store.delete([other, other]) == 1
    assert list(store.fragments_dir.rglob("*")) == [store.path_of(other).parent]  # prefix folders stay
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


# ------------------------------------------------------------ direct I/O
MIB = 1 << 20
BIG_BS = 64 << 10
IO_COUNTERS = ("direct_io", "direct_writes", "buffered_writes", "direct_reads", "buffered_reads")


def io_counts(store: FragmentStore) -> tuple[int, ...]:
    stats = store.stats()
    return tuple(stats[name] for name in IO_COUNTERS)


def pooled_copy(data: bytes, skew: int = 0) -> memoryview:
    """``data`` in a page-aligned buffer, as the node receives PUT payloads (``skew``: start that far past the page)."""
    view = PayloadPool().take(len(data) + skew, min_bytes=0)
    assert view is not None
    view[skew:] = data
    return view[skew:]


def big_store(path: Path, **kwargs: object) -> FragmentStore:
    """A store reading large ranges with O_DIRECT as well (nodes do not by default)."""
    kwargs.setdefault("direct_reads", True)
    return FragmentStore(path, fsync=False, block_size=BIG_BS, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def direct_dir(tmp_path: Path) -> Path:
    """``tmp_path``, where O_DIRECT works (it does not on tmpfs before Linux 6.6, for one)."""
    fd = os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, os.O_DIRECT)
    except OSError as exc:
        pytest.skip(f"the temp file system refuses O_DIRECT: {exc}")
    finally:
        os.close(fd)
        os.unlink(tmp_path / "probe")
    return tmp_path


@pytest.mark.parametrize("block_size", [BIG_BS, 1000])  # 1000: blocks (and reads) start off page boundaries
def test_large_aligned_fragment_goes_direct_and_reads_back_exactly(direct_dir: Path, block_size: int) -> None:
    data = os.urandom(MIB)
    crcs = block_crcs(data, block_size)
    direct = big_store(direct_dir / "direct")
    buffered = big_store(direct_dir / "buffered", direct_io=False)
    direct.put(KEY, pooled_copy(data), crcs, block_size)
    buffered.put(KEY, pooled_copy(data), crcs, block_size)
    assert io_counts(direct) == (1, 1, 0, 0, 0)
    assert io_counts(buffered) == (0, 0, 1, 0, 0)
    assert direct.path_of(KEY).read_bytes() == buffered.path_of(KEY).read_bytes()  # one format

    whole = direct.read_range(KEY, 0, 1 << 40)
    assert (whole.size, bytes(whole.data)) == (MIB, data)
    part = direct.read_range(KEY, 12345, DIRECT_MIN_BYTES + 777)
    assert bytes(part.data) == data[12345 : 12345 + DIRECT_MIN_BYTES + 777]
    small = direct.read_range(KEY, 4000, 1000)  # small reads stay in the page cache
    assert isinstance(small.data, bytearray) and small.data == data[4000:5000]
    assert io_counts(direct) == (1, 1, 0, 2, 1)

    # Given back, a read buffer serves the next direct read.
    obj = whole.data.obj
    direct.release(whole.data)
    direct.release(small.data)  # a buffered read's data: ignored
    again = direct.read_range(KEY, 0, MIB)
    assert again.data.obj is obj and bytes(again.data) == data  # type: ignore[union-attr]
    assert bytes(buffered.read_range(KEY, 0, MIB).data) == data
    assert io_counts(buffered) == (0, 0, 1, 0, 1)


@pytest.mark.parametrize(
    ("length", "place"),
    [
        pytest.param(MIB + 100, pooled_copy, id="length-not-whole-pages"),
        pytest.param(MIB, lambda d: pooled_copy(d, skew=512), id="buffer-not-page-aligned"),
        pytest.param(MIB, bytes, id="read-only-bytes"),
        pytest.param(DIRECT_MIN_BYTES - 4096, pooled_copy, id="small"),
    ],
)
def test_what_does_not_fit_o_direct_is_written_buffered(
    tmp_path: Path, length: int, place: Callable[[bytes], bytes | memoryview]
) -> None:
    data = os.urandom(length)
    store = big_store(tmp_path / "node")
    store.put(KEY, place(data), block_crcs(data, BIG_BS), BIG_BS)
    assert io_counts(store)[:3] == (1, 0, 1)
    assert bytes(store.read(KEY)) == data


def test_direct_read_of_a_file_not_ending_on_a_page(direct_dir: Path) -> None:
    """O_DIRECT reads whole pages; the last one comes back short at the end of the file."""
    data = os.urandom(MIB + 100)
    store = big_store(direct_dir / "node")
    store.put(KEY, data, block_crcs(data, BIG_BS), BIG_BS)
    tail = store.read_range(KEY, len(data) - DIRECT_MIN_BYTES - 3, MIB)
    assert bytes(tail.data) == data[-DIRECT_MIN_BYTES - 3 :]
    assert io_counts(store) == (1, 0, 1, 1, 0)


def test_corruption_is_caught_on_a_direct_read(direct_dir: Path) -> None:
    data = os.urandom(MIB)
    store = big_store(direct_dir / "node")
    store.put(KEY, pooled_copy(data), block_crcs(data, BIG_BS), BIG_BS)
    corrupt_data_byte(store, KEY, 700_000)  # a buffered write: O_DIRECT reads must see it all the same
    with pytest.raises(ChecksumError):
        store.read_range(KEY, 0, MIB)
    assert not store.path_of(KEY).exists()
    stats = store.stats()
    assert (stats["quarantined"], stats["fragments"], stats["direct_reads"]) == (1, 0, 0)
    assert store.buffers.idle_bytes >= MIB  # the read buffer went back to the pool


def test_truncated_file_is_caught_on_a_direct_read(direct_dir: Path) -> None:
    data = os.urandom(MIB)
    store = big_store(direct_dir / "node")
    store.put(KEY, pooled_copy(data), block_crcs(data, BIG_BS), BIG_BS)
    os.truncate(store.path_of(KEY), store.path_of(KEY).stat().st_size - 5000)
    with pytest.raises(ChecksumError, match="ends early"):
        store.read_range(KEY, MIB - DIRECT_MIN_BYTES, DIRECT_MIN_BYTES)
    assert store.stats()["quarantined"] == 1


@pytest.fixture
def ramfs_dir(tmp_path: Path) -> Iterator[Path]:
    """A ramfs mount: a real file system that refuses O_DIRECT (EINVAL). tmpfs
    accepts it since Linux 6.6, so it cannot serve here. Needs root."""
    mount_point = tmp_path / "ramfs"
    mount_point.mkdir()
    try:
        subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mount_point)], check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a ramfs here: {exc}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True, timeout=10)


def test_file_system_refusing_o_direct_falls_back(ramfs_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = os.urandom(MIB)
    # ramfs has no size limit and reports no free space; a negative reserve lets the store admit writes.
    store = big_store(ramfs_dir / "node", reserve_bytes=-(64 << 20))
    with caplog.at_level(logging.INFO, logger="storage_node.direct_io"):
        for key in (KEY, KEY._replace(stripe=4)):
            store.put(key, pooled_copy(data), block_crcs(data, BIG_BS), BIG_BS)
            assert bytes(store.read(key, 0, MIB)) == data
    assert io_counts(store) == (0, 0, 2, 0, 2)
    assert sum("using buffered I/O" in r.getMessage() for r in caplog.records) == 1  # said once, remembered


@pytest.mark.parametrize(("module", "syscall"), [(fcntl, "fcntl"), (os, "pwritev"), (os, "preadv")])
def test_o_direct_refused_falls_back(
    direct_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, module: object, syscall: str
) -> None:
    """Without root (no ramfs), a system call refuses O_DIRECT with EINVAL as some
    file systems do: setting the flag (ramfs, tmpfs before Linux 6.6), or the I/O
    itself (FUSE, network file systems, disks with larger sectors). Only that
    call is replaced, and only for O_DIRECT; the store's fallback runs for real."""
    real, real_fcntl = getattr(module, syscall), fcntl.fcntl

    def refusing(fd: int, *args: object) -> object:
        setting_direct = syscall == "fcntl" and args[0] == fcntl.F_SETFL and args[1] & os.O_DIRECT  # type: ignore[operator]
        doing_direct_io = syscall != "fcntl" and real_fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
        if setting_direct or doing_direct_io:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, *args)

    monkeypatch.setattr(module, syscall, refusing)
    data = os.urandom(MIB)
    store = big_store(direct_dir / "node")
    with caplog.at_level(logging.INFO, logger="storage_node.direct_io"):
        for key in (KEY, KEY._replace(stripe=4)):
            store.put(key, pooled_copy(data), block_crcs(data, BIG_BS), BIG_BS)
            assert bytes(store.read(key, 0, MIB)) == data
    monkeypatch.undo()
    # fcntl or pwritev refused: the first put is (re)written through the page cache, all reads are buffered.
    # preadv refused: the first put went direct before the first read found out.
    assert io_counts(store) == ((0, 1, 1, 0, 2) if syscall == "preadv" else (0, 0, 2, 0, 2))
    assert sum("using buffered I/O" in r.getMessage() for r in caplog.records) == 1
    reference = big_store(direct_dir / "reference", direct_io=False)
    reference.put(KEY, data, block_crcs(data, BIG_BS), BIG_BS)
    assert store.path_of(KEY).read_bytes() == reference.path_of(KEY).read_bytes()


def test_concurrent_direct_puts_and_reads(direct_dir: Path) -> None:
    """Worker threads share the store and its buffer pool."""
    store = big_store(direct_dir / "node")
    blobs = [os.urandom(MIB) for _ in range(4)]

    def round_trip(i: int) -> bool:
        key = FragmentKey(9, i, 1, 0)
        data = blobs[i % 4]
        store.put(key, pooled_copy(data), block_crcs(data, BIG_BS), BIG_BS)
        ok = True
        for _ in range(3):
            got = store.read_range(key, 0, MIB)
            ok &= bytes(got.data) == data
            store.release(got.data)
        return ok

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(round_trip, range(32)))
    assert io_counts(store) == (1, 32, 0, 96, 0)


def test_large_buffered_reads_land_in_reused_pool_buffers(direct_dir: Path) -> None:
    """The default for reads: through the page cache, but large ranges into pooled buffers."""
    store = big_store(direct_dir / "store", direct_reads=False)
    data = os.urandom(MIB)
    store.put(KEY, pooled_copy(data), block_crcs(data, BIG_BS), BIG_BS)
    first = store.read_range(KEY, 0, MIB)
    assert isinstance(first.data, memoryview) and bytes(first.data) == data
    buffer = first.data.obj
    store.release(first.data)
    second = store.read_range(KEY, 0, MIB)
    assert second.data.obj is buffer and bytes(second.data) == data  # type: ignore[union-attr]
    part = store.read_range(KEY, 5000, DIRECT_MIN_BYTES)
    assert bytes(part.data) == data[5000 : 5000 + DIRECT_MIN_BYTES]
    assert io_counts(store)[3:] == (0, 3)  # no direct reads, three buffered


def _atime_is_kept_by_this_file_system(directory: Path) -> bool:
    """Does a plain read update the access time of a file read since it was last changed
    (relatime, strictatime), so that a test of not touching it can fail? Not under noatime."""
    probe = directory / "atime-probe"
    probe.write_bytes(b"x")
    stat = probe.stat()
    os.utime(probe, ns=(stat.st_mtime_ns - 10**11, stat.st_mtime_ns))
    probe.read_bytes()
    return probe.stat().st_atime_ns != stat.st_mtime_ns - 10**11


def test_reading_a_fragment_leaves_its_access_time_alone(tmp_path: Path) -> None:
    """The first read of a fragment written since its last read would, under relatime, rewrite
    the fragment's inode: an inode write for every fragment an epoch reads cold. Every read
    path of the store opens with O_NOATIME (the file is the node's own)."""
    store = make_store(tmp_path / "node")
    if not _atime_is_kept_by_this_file_system(tmp_path):
        pytest.skip("this file system does not update access times on reads (noatime)")
    keys = [FragmentKey(9, 0, 1, slot) for slot in range(3)]
    for key in keys:
        store.put(key, memoryview(DATA), block_crcs(DATA), BS)
        stat = store.path_of(key).stat()
        os.utime(store.path_of(key), ns=(stat.st_mtime_ns - 10**11, stat.st_mtime_ns))
    assert store.read_range(keys[0], 0, len(DATA)).data == DATA  # small: the open-file cache
    assert store.read_range(keys[1], BS, 100).data == DATA[BS:BS + 100]
    assert store.read(keys[2]) == DATA  # whole, as the scrubber and repair read
    for key in keys:
        stat = store.path_of(key).stat()
        assert stat.st_atime_ns == stat.st_mtime_ns - 10**11, f"reading {key} changed its access time"


def test_a_fragment_file_the_node_does_not_own_still_opens_for_reading() -> None:
    """The kernel refuses O_NOATIME (EPERM) to a process that does not own the file (a data
    directory restored by root, say): the file then opens the ordinary way."""
    if os.geteuid() != 0:
        pytest.skip("needs root, to read as another user")
    with tempfile.TemporaryDirectory(prefix="deepfs-noatime-") as directory:
        os.chmod(directory, 0o755)
        path = os.path.join(directory, "owned-by-root")
        with open(path, "wb") as f:
            f.write(b"fragment")
        os.chmod(path, 0o644)
        child = os.fork()
        if child == 0:  # the child reads as nobody, reports by its exit status, and never returns
            code = 3
            try:
                os.setegid(65534)
                os.seteuid(65534)
                fd = open_to_read(path)
                code = 0 if os.read(fd, 100) == b"fragment" else 2
            except BaseException:  # noqa: BLE001 - reported as the exit status
                code = 1
            finally:
                os._exit(code)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0


# ------------------------------------------------ the layout before the flat one
def _to_a_folder_per_inode(store: FragmentStore) -> None:
    """Rewrite ``store``'s files as a node before the flat layout kept them:
    ``fragments/<prefix>/<ino>/<stripe>.<version>.<slot>``."""
    for path in sorted(store.fragments_dir.glob("*/*")):
        key = fmt.key_of_name(path.name)
        assert key is not None, path
        folder = path.parent / str(key.ino)
        folder.mkdir(exist_ok=True)
        path.rename(folder / f"{key.stripe}.{key.version}.{key.slot}")


def _stored(count: int, root: Path) -> dict[FragmentKey, bytes]:
    """``count`` fragments over a few inodes (several per inode, several inodes per prefix)."""
    store = FragmentStore(root, fsync=False, block_size=BS)
    fragments = {}
    for i in range(count):
        key = FragmentKey(1 + (i // 4) * 129, i % 4, 5, i % 3)
        fragments[key] = os.urandom(100 + 37 * i)
        store.put(key, fragments[key], block_crcs(fragments[key]), BS)
    store.close()
    return fragments


def _check_all_there(root: Path, fragments: dict[FragmentKey, bytes]) -> FragmentStore:
    store = FragmentStore(root, fsync=False, block_size=BS)
    for key, data in fragments.items():
        assert store.read(key) == data, key
    assert store.stats()["fragments"] == len(fragments)
    assert store.stats()["used_bytes"] == sum(p.stat().st_size for p in store.fragments_dir.glob("*/*") if p.is_file())
    listed, done = store.list_fragments(None, 10_000)
    assert done and [key for key, _ in listed] == sorted(fragments, key=fmt.list_order)
    return store


def test_a_store_with_a_folder_per_inode_moves_to_the_flat_layout_when_opened(tmp_path: Path,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    """A node upgraded from the layout with a folder per inode reads everything it stored, and
    from then on has one layout: each fragment renamed into its prefix folder, temp files of
    interrupted writes removed, files that are not the store's left alone (with their folder),
    and a key found in both layouts kept once, the other copy quarantined, not deleted."""
    root = tmp_path / "node"
    fragments = _stored(24, root)
    old = FragmentStore(root, fsync=False, block_size=BS)
    _to_a_folder_per_inode(old)
    first = next(iter(fragments))
    folder = old.fragments_dir / fmt.prefix_dir(first) / str(first.ino)
    (folder / f".{first.stripe}.{first.version}.{first.slot}.abc.tmp").write_bytes(b"half")
    (folder / "notes.txt").write_bytes(b"an operator's file")
    junk = old.fragments_dir / fmt.prefix_dir(first) / f"0{first.ino + 256}"  # not a name the store writes
    junk.mkdir()
    (junk / "0.5.2").write_bytes(b"not a fragment of the store")
    twice = FragmentKey(first.ino, 0, 5, 2)  # not among the 24: stored in both layouts
    newer, older = os.urandom(500), os.urandom(400)
    old.put(twice, newer, block_crcs(newer), BS)
    (folder / "0.5.2").write_bytes(_fragment_file_bytes(twice, older))
    fragments[twice] = newer
    with caplog.at_level(logging.INFO, logger="storage_node.fragment_store"):
        store = _check_all_there(root, fragments)
    assert "moved 24 fragment(s)" in caplog.text and "stored twice" in caplog.text
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    assert sorted(p for p in store.fragments_dir.glob("*/*") if p.is_dir()) == sorted([folder, junk])
    assert (junk / "0.5.2").read_bytes() == b"not a fragment of the store"
    assert store.stats()["quarantined"] == 1
    assert [FragmentKey.of([int(x) for x in p.name.split(".")[:4]]) for p in store.quarantine_dir.iterdir()] == [twice]
    _check_all_there(root, fragments)  # and a second open finds nothing to move


def _fragment_file_bytes(key: FragmentKey, data: bytes) -> bytes:
    with tempfile.TemporaryDirectory(prefix="deepfs-fragment-") as scratch:
        store = FragmentStore(scratch, fsync=False, block_size=BS)
        store.put(key, data, block_crcs(data), BS)
        return store.path_of(key).read_bytes()


def test_a_node_killed_while_it_moves_to_the_flat_layout_goes_on_at_its_next_open(tmp_path: Path) -> None:
    """SIGKILL in the middle of the move (a process opening the store, synced renames), then an
    open: every fragment is there once, in the flat layout, and reads back whole."""
    root = tmp_path / "node"
    fragments = _stored(2000, root)
    _to_a_folder_per_inode(FragmentStore(root, fsync=False, block_size=BS))
    opener = ("import sys; from storage_node.fragment_store import FragmentStore; "
              "print('opening', flush=True); FragmentStore(sys.argv[1], fsync=True); print('opened', flush=True)")
    repo = Path(__file__).resolve().parent.parent
    interrupted = False
    for delay_s in (0.001, 0.003, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4):
        if not [p for p in (root / fmt.FRAGMENTS_DIR).glob("*/*") if p.is_dir()]:  # the last try finished
            _to_a_folder_per_inode(FragmentStore(root, fsync=False, block_size=BS))
        proc = subprocess.Popen([sys.executable, "-c", opener, str(root)], cwd=repo, stdout=subprocess.PIPE,
                                text=True)
        try:
            assert proc.stdout is not None and proc.stdout.readline() == "opening\n"
            time.sleep(delay_s)
            proc.kill()
        finally:
            output = proc.communicate(timeout=20)[0]
        folders = [p for p in (root / fmt.FRAGMENTS_DIR).glob("*/*") if p.is_dir()]
        flat = [p for p in (root / fmt.FRAGMENTS_DIR).glob("*/*") if p.is_file()]
        if "opened" not in output and folders and flat:
            interrupted = True
            break
    assert interrupted, "no kill landed in the middle of the move"
    store = _check_all_there(root, fragments)
    assert not [p for p in store.fragments_dir.glob("*/*") if p.is_dir()]
