"""The checkpoint container without a cluster: our archives against PyTorch's
own writer and reader, Python's zipfile, zip64, and the read planning."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch  # a test dependency: missing torch must fail, not skip
from torch.utils.serialization import config as torch_config

from deepfs.torch._archive import (
    TAIL_BYTES,
    ArchiveWriter,
    CheckpointError,
    Directory,
    Entry,
    locate_directory,
    parse_directory,
)
from deepfs.torch._plan import is_storage, plan_reads, split_range
from deepfs.torch._save import MemorySink, serialize_to

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]


def sample_state() -> dict[str, object]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 33, generator=g)
    return {
        "empty": torch.empty(0),
        "base": base,
        "view": base[3:9, ::2],  # shares base's storage
        "bf16": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "c64": torch.randn(9, dtype=torch.complex64, generator=g),
        "bool": torch.rand(17, generator=g) > 0.5,
        "i8": torch.randint(-128, 127, (33,), dtype=torch.int8, generator=g),
        "scalar": torch.tensor(3.5, dtype=torch.float16),
        "nested": [1, "two", {"three": torch.arange(5, dtype=torch.int16)}],
        "empty_i64": torch.zeros(0, 4, dtype=torch.int64),
    }


def ours(obj: object) -> bytes:
    sink = MemorySink()
    size = serialize_to(sink, obj)
    assert size == len(sink.buffer)
    return bytes(sink.buffer)


@pytest.fixture
def torch_alignment_4k() -> Iterator[None]:
    old = torch_config.save.storage_alignment
    torch_config.save.storage_alignment = 4096
    try:
        yield
    finally:
        torch_config.save.storage_alignment = old


def assert_same(a: object, b: object) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.bool else a,
                           b.view(torch.uint8) if b.dtype == torch.bool else b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


def test_identical_to_torch_save_but_for_the_serialization_id(torch_alignment_4k: None) -> None:
    state = sample_state()
    mine = ours(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    theirs = buf.getvalue()
    assert len(mine) == len(theirs)
    # Only the random serialization id (its bytes and its CRC, local and central) may differ.
    info = zipfile.ZipFile(io.BytesIO(theirs)).getinfo("archive/.data/serialization_id")
    data_start = theirs.index(b"PK\x07\x08", info.header_offset) - info.file_size
    allowed = set(range(data_start, data_start + info.file_size + 16))
    central = theirs.rindex(b"archive/.data/serialization_id")
    allowed |= set(range(central - 30, central - 26))  # crc field of its central header
    diff = {i for i in range(len(mine)) if mine[i] != theirs[i]}
    assert diff <= allowed


def test_torch_reads_it_every_way(tmp_path: Path) -> None:
    state = sample_state()
    data = ours(state)
    assert zipfile.ZipFile(io.BytesIO(data)).testzip() is None  # every CRC-32 is right
    path = tmp_path / "ck.pt"
    path.write_bytes(data)
    loaded = torch.load(io.BytesIO(data))
    assert_same(state, loaded)
    assert loaded["view"].untyped_storage().data_ptr() == loaded["base"].untyped_storage().data_ptr()
    assert_same(state, torch.load(path, mmap=True))
    old = torch_config.load.calculate_storage_offsets
    torch_config.load.calculate_storage_offsets = True  # torch computes offsets with miniz's arithmetic
    try:
        assert_same(state, torch.load(path, mmap=True))
    finally:
        torch_config.load.calculate_storage_offsets = old


def test_storages_are_4k_aligned() -> None:
    data = ours(sample_state())
    archive = zipfile.ZipFile(io.BytesIO(data))
    for info in archive.infolist():
        extra_len = int.from_bytes(data[info.header_offset + 28 : info.header_offset + 30], "little")
        start = info.header_offset + 30 + len(info.filename) + extra_len
        assert start % 4096 == 0, info.filename
    assert archive.read("archive/.storage_alignment") == b"4096"


def test_zip64_entries_in_a_sparse_file(tmp_path: Path) -> None:
    """A >4 GiB storage without 4 GiB of memory: header, descriptor and directory
    at their offsets in a sparse file; PyTorch's reader and zipfile agree with us."""
    writer = ArchiveWriter()
    writes: list[tuple[int, bytes]] = []

    def entry(name: str, data: bytes | None = None, size: int = 0):
        placed = writer.begin(name, len(data) if data is not None else size)
        writes.append((placed.header_offset, placed.header))
        if data is not None:
            writes.append((placed.data_offset, data))
        writes.append(writer.end(zlib.crc32(data) if data is not None else 0x1234))
        return placed

    entry("data.pkl", b"pickle")
    big = entry("data/0", size=(4 << 30) + 5)
    after = entry("data/1", b"abc")
    entry("version", b"3\n")
    writes.append(writer.finish())
    path = tmp_path / "sparse.pt"
    with open(path, "wb") as f:
        for offset, chunk in writes:
            f.seek(offset)
            f.write(chunk)
    assert after.header_offset > 0xFFFFFFFF
    reader = torch._C.PyTorchFileReader(str(path))  # noqa: SLF001 - torch's own archive reader as the referee
    assert reader.get_record("data/1") == b"abc"
    assert reader.get_record_offset("data/0") == big.data_offset
    assert reader.get_record_offset("data/1") == after.data_offset
    assert reader.get_record_offset_no_read(after.header_offset, "data/1", 3, 4096) == after.data_offset
    assert big.data_offset + big.size + 24 == after.header_offset  # a zip64 data descriptor
    infos = {i.filename: i for i in zipfile.ZipFile(path).infolist()}
    assert infos["archive/data/0"].file_size == (4 << 30) + 5
    assert infos["archive/data/1"].header_offset == after.header_offset
    directory = read_directory(path)
    assert [(e.name, e.header_offset, e.size) for e in directory.entries] == [
        ("data.pkl", 0, 6), ("data/0", big.header_offset, big.size), ("data/1", after.header_offset, 3),
        ("version", directory.entries[3].header_offset, 2),
    ]


def read_directory(path: Path) -> Directory:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        f.seek(size - min(size, TAIL_BYTES))
        tail = f.read()
        found = locate_directory(tail, size - len(tail), size)
        assert not isinstance(found, int)
        f.seek(found.offset)
        return parse_directory(f.read(found.size), found)


def test_directory_of_a_plain_torch_save_file(tmp_path: Path) -> None:
    path = tmp_path / "plain.pt"
    torch.save(sample_state(), path)  # torch's default 64-byte alignment, prefix "plain"
    directory = read_directory(path)
    assert directory.prefix == "plain"
    names = [e.name for e in directory.entries]
    assert names[0] == "data.pkl" and "version" in names and any(is_storage(e) for e in directory.entries)


@pytest.mark.parametrize("cut", [1, 22, 100, 4096])
def test_truncated_archives_are_refused(cut: int) -> None:
    data = ours(sample_state())[:-cut]
    with pytest.raises(CheckpointError, match="truncated|corrupt"):
        locate_directory(data[-TAIL_BYTES:], max(0, len(data) - TAIL_BYTES), len(data))


def test_garbage_is_refused() -> None:
    junk = os.urandom(10_000)
    with pytest.raises(CheckpointError):
        locate_directory(junk, 0, len(junk))


def test_a_flipped_directory_byte_is_refused() -> None:
    data = bytearray(ours(sample_state()))
    found = locate_directory(data, 0, len(data))
    assert not isinstance(found, int)
    data[found.offset] ^= 0xFF
    with pytest.raises(CheckpointError, match="central directory"):
        parse_directory(bytes(data[found.offset : found.offset + found.size]), found)


def test_alignment_is_validated() -> None:
    for bad in (0, 100, 1 << 16):
        with pytest.raises(ValueError):
            ArchiveWriter(alignment=bad)


def test_read_plan_groups_small_entries_and_reads_large_ones_directly() -> None:
    def e(name: str, offset: int, size: int) -> Entry:
        return Entry(name, offset, size, size, 0, 0, 0x808)

    entries = [e("data.pkl", 0, 500), e("data/0", 4096, 100), e("data/1", 8192, 3 << 20),
               e("data/2", 8192 + (3 << 20) + 4096, 10), e("version", 8192 + (3 << 20) + 8192, 2)]
    directory = Directory("archive", entries, 8192 + (3 << 20) + 12288)
    plan = plan_reads(directory, direct_min_bytes=1 << 20, run_max_bytes=1 << 20)
    assert [x.name for x in plan.direct] == ["data/1"]
    assert [(r.start, r.end, [x.name for x in r.entries]) for r in plan.runs] == [
        (0, 8192, ["data.pkl", "data/0"]),
        (entries[3].header_offset, directory.offset, ["data/2", "version"]),
    ]
    small_runs = plan_reads(directory, direct_min_bytes=1 << 30, run_max_bytes=5000)
    assert sum(len(r.entries) for r in small_runs.runs) == 5 and not small_runs.direct


def test_split_range_cuts_on_piece_boundaries() -> None:
    assert split_range(100, 300, 128) == [(100, 28), (128, 128), (256, 128), (384, 16)]
    assert split_range(0, 0, 128) == []
    assert split_range(256, 128, 128) == [(256, 128)]


def test_import_deepfs_does_not_import_torch() -> None:
    """torch is an optional extra: the core and the fsspec file system stay torch-free."""
    code = "import sys, deepfs, deepfs.fsspec_fs, deepfs.url; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(Path(__file__).resolve().parent.parent),
                   timeout=60)
