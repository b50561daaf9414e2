"""Read a checkpoint archive from DeepFS into memory, many stripes in flight.

Runs on the client's trio thread. Steps: the file's tail (end records and
central directory), then the reads ``plan_reads`` decides — small entries in
runs, each large storage straight into its own preallocated buffer (or a
pinned staging buffer on its way to the GPU) in stripe-aligned pieces. All
runs and pieces share one limit on reads in flight. The result,
``LoadedArchive``, answers PyTorch's unpickler the way its zip reader would.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import torch
import trio

from deepfs import isal
from deepfs.client import AsyncClient, AsyncFile
from deepfs.concurrency import run_all
from deepfs.malloc_tuning import prefault
from deepfs.torch._archive import (
    TAIL_BYTES,
    CheckpointError,
    Directory,
    DirectoryLocation,
    Entry,
    check_readable,
    local_data_offset,
    local_header_span,
    locate_directory,
    parse_directory,
)
from deepfs.torch._plan import Run, is_storage, piece_size, plan_reads, split_range

INFLIGHT_BYTES = 256 << 20
"""About this many bytes of reads are in flight at once (into the tensors' own memory)."""
STAGING_BYTES = 128 << 20
"""Page-locked staging buffers of the GPU path, in all (they bound its reads in flight)."""

LEGACY_MAGIC = b"\x8a\x0a"  # pickled LONG1 of length 10 after the PROTO opcode: torch's pre-1.6 format


@dataclass
class ReadOptions:
    verify_crc: bool = False  # check every storage's zip CRC-32 too (the small records always are)
    pin_memory: bool = False  # CPU buffers in page-locked memory (faster later copies to a GPU)
    stage_to: torch.device | None = None  # put large storages on this device through staging buffers


@dataclass
class LoadedArchive:
    """A checkpoint in memory; stands in for ``torch._C.PyTorchFileReader`` inside ``torch.serialization._load``."""

    url: str
    directory: Directory
    records: dict[str, bytes] = field(default_factory=dict)
    storages: dict[str, torch.Tensor] = field(default_factory=dict)
    data_offsets: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._by_name = {e.name: e for e in self.directory.entries}

    def _entry(self, name: str) -> Entry:
        entry = self._by_name.get(name)
        if entry is not None:
            return entry
        raise CheckpointError(f"{self.url}: the archive has no record {name!r}: "
                              "the checkpoint is incomplete or corrupt")

    def take_entry(self, entry: Entry, buffer: memoryview, base: int) -> memoryview | None:
        """``entry`` found in ``buffer`` (file bytes from offset ``base``): a record is
        CRC-checked and kept; a storage's bytes are returned for the caller to place."""
        data_offset = local_data_offset(self.directory, entry, buffer[entry.header_offset - base :])
        check_readable(entry, data_offset, self.directory.offset)
        if data_offset + entry.size > base + len(buffer):
            raise CheckpointError(f"entry {entry.name!r} overruns the next entry: the file is corrupt")
        self.data_offsets[entry.name] = data_offset
        data = buffer[data_offset - base : data_offset - base + entry.size]
        if is_storage(entry):
            return data
        _check_crc(entry, data)
        self.records[entry.name] = bytes(data)
        return None

    def has_record(self, name: str) -> bool:
        return name in self.records or name in self.storages

    def get_all_records(self) -> list[str]:
        return [e.name for e in self.directory.entries]

    def get_record(self, name: str) -> bytes:
        if name not in self.records:
            self._entry(name)
        return self.records[name]

    def get_storage_from_record(self, name: str, nbytes: int, _storage_type: object) -> torch.Tensor:
        tensor = self.storages.get(name)
        if tensor is None:
            self._entry(name)
            raise CheckpointError(f"{self.url}: record {name!r} was not read")
        if tensor.numel() != nbytes:
            raise CheckpointError(
                f"{self.url}: the pickle expects {nbytes} bytes in {name!r}, the archive holds {tensor.numel()}: "
                "the checkpoint is corrupt"
            )
        return tensor

    def serialization_id(self) -> str:
        return self.records.get(".data/serialization_id", b"").decode("ascii", "replace")

    def get_record_offset(self, name: str) -> int:
        if name not in self.data_offsets:
            self._entry(name)
        return self.data_offsets[name]

    def get_record_header_offset(self, name: str) -> int:
        return self._entry(name).header_offset

    def get_record_offset_no_read(self, _header_offset: int, name: str, _size: int, _alignment: int) -> int:
        return self.get_record_offset(name)


async def read_exact(handle: AsyncFile, offset: int, dest: memoryview) -> None:
    n = await handle.pread_into(dest, offset)
    if n != len(dest):
        raise CheckpointError(
            f"the file ends at byte {handle.size}, inside an entry that needs bytes up to {offset + len(dest)}: "
            "the checkpoint is truncated"
        )


def host_buffer(nbytes: int, pin_memory: bool) -> torch.Tensor:
    pin = pin_memory and torch.cuda.is_available()
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)


def byte_view(tensor: torch.Tensor) -> memoryview:
    """A writable memoryview of a CPU uint8 tensor's memory."""
    return memoryview(tensor.numpy()).cast("B") if tensor.numel() else memoryview(bytearray())


class Stager:
    """Reads land in page-locked host buffers; each is copied to the device on a
    side stream while later reads proceed, and reused once its copy is done.

    On a non-CUDA device (tests) the same slots and ordering run with plain copies."""

    def __init__(self, device: torch.device, slot_bytes: int, slots: int) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device=device) if self.cuda else None
        self._buffers = [torch.empty(slot_bytes, dtype=torch.uint8, pin_memory=self.cuda) for _ in range(slots)]
        self._free = list(range(slots))
        self._slots = trio.Semaphore(slots)

    def allocate(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    async def fill(self, dest: torch.Tensor, read: Callable[[memoryview], Awaitable[None]]) -> None:
        """``read`` fills a staging view of ``len(dest)`` bytes; then it goes to ``dest``."""
        async with self._slots:
            index = self._free.pop()
            try:
                staging = self._buffers[index][: dest.numel()]
                await read(byte_view(staging))
                if self.stream is None:
                    dest.copy_(staging)
                    return
                with torch.cuda.stream(self.stream):
                    dest.copy_(staging, non_blocking=True)
                    copied = torch.cuda.Event()
                    copied.record(self.stream)
                # The staging buffer is reused only after the GPU has read it.
                await trio.to_thread.run_sync(copied.synchronize)
            finally:
                self._free.append(index)

    async def finish(self) -> None:
        if self.stream is not None:
            await trio.to_thread.run_sync(self.stream.synchronize)


async def read_checkpoint(aio: AsyncClient, path: str, url: str, options: ReadOptions,
                          set_total: Callable[[int], None], advance: Callable[[int], None]) -> LoadedArchive | bytes:
    """The checkpoint at ``path`` in memory; the whole file as bytes if it is in torch's legacy format."""
    handle = await aio.open(path, "rb")
    try:
        size = handle.size
        if size == 0:
            raise CheckpointError(f"{url} is empty: not a checkpoint (an interrupted write?)")
        tail_offset = max(0, size - TAIL_BYTES)
        tail = bytearray(size - tail_offset)
        await read_exact(handle, tail_offset, memoryview(tail))
        try:
            location = await _locate(handle, tail, tail_offset, size)
        except CheckpointError:
            head = bytearray(min(size, 4))
            await read_exact(handle, 0, memoryview(head))
            if head[:1] == b"\x80" and head[2:4] == LEGACY_MAGIC:
                whole = bytearray(size)
                await read_exact(handle, 0, memoryview(whole))
                advance(size)
                return bytes(whole)
            raise
        if location.offset >= tail_offset:
            start = location.offset - tail_offset
            directory_bytes = bytes(tail[start : start + location.size])
        else:
            buf = bytearray(location.size)
            await read_exact(handle, location.offset, memoryview(buf))
            directory_bytes = bytes(buf)
        directory = parse_directory(directory_bytes, location)
        archive = LoadedArchive(url, directory)
        await _read_entries(handle, archive, options, set_total, advance)
        return archive
    finally:
        await handle.close()


async def _locate(handle: AsyncFile, tail: bytearray, tail_offset: int, size: int) -> DirectoryLocation:
    found = locate_directory(tail, tail_offset, size)
    if isinstance(found, int):  # a zip64 end record before the tail we read
        extra = bytearray(tail_offset - found)
        await read_exact(handle, found, memoryview(extra))
        found = locate_directory(extra + tail, found, size)
        if isinstance(found, int):
            raise CheckpointError("the zip64 end record cannot be found: the file is corrupt")
    return found


async def _read_entries(handle: AsyncFile, archive: LoadedArchive, options: ReadOptions,
                        set_total: Callable[[int], None], advance: Callable[[int], None]) -> None:
    plan = plan_reads(archive.directory)
    set_total(plan.total_bytes)
    piece = piece_size(handle.layout.stripe_size)
    inflight = trio.CapacityLimiter(max(2, INFLIGHT_BYTES // piece))
    prefaulter = trio.CapacityLimiter(1)
    stager = None
    if options.stage_to is not None and plan.direct:
        stager = Stager(options.stage_to, piece, max(2, STAGING_BYTES // piece))

    async def read_piece(offset: int, dest: memoryview) -> None:
        async with inflight:
            await read_exact(handle, offset, dest)
        advance(len(dest))

    async def read_run(run: Run) -> None:
        buf = bytearray(run.end - run.start)
        view = memoryview(buf)
        await run_all(
            functools.partial(read_piece, offset, view[offset - run.start : offset - run.start + length])
            for offset, length in split_range(run.start, len(buf), piece)
        )
        for entry in run.entries:
            data = archive.take_entry(entry, view, run.start)
            if data is not None:  # a small storage: its own buffer (the run's is shared)
                if options.verify_crc:
                    _check_crc(entry, data)
                tensor = host_buffer(entry.size, options.pin_memory)
                byte_view(tensor)[:] = data
                archive.storages[entry.name] = tensor

    async def read_direct(entry: Entry) -> None:
        header = bytearray(local_header_span(archive.directory, entry))
        async with inflight:
            await read_exact(handle, entry.header_offset, memoryview(header))
        data_offset = local_data_offset(archive.directory, entry, header)
        check_readable(entry, data_offset, archive.directory.offset)
        archive.data_offsets[entry.name] = data_offset
        pieces = split_range(data_offset, entry.size, piece)
        if stager is not None:
            dest = stager.allocate(entry.size)

            async def staged(offset: int, length: int) -> None:
                async def fill(view: memoryview) -> None:
                    await read_exact(handle, offset, view)
                    advance(length)

                await stager.fill(dest[offset - data_offset : offset - data_offset + length], fill)

            await run_all(functools.partial(staged, offset, length) for offset, length in pieces)
        else:
            dest = host_buffer(entry.size, options.pin_memory)
            view = byte_view(dest)
            # Map the fresh pages in a worker, entry after entry, ahead of the receives.
            await trio.to_thread.run_sync(prefault, dest.data_ptr(), entry.size, limiter=prefaulter)
            await run_all(
                functools.partial(read_piece, offset, view[offset - data_offset : offset - data_offset + length])
                for offset, length in pieces
            )
            if options.verify_crc:
                await trio.to_thread.run_sync(_check_crc, entry, view)
        archive.storages[entry.name] = dest

    await run_all([
        *(functools.partial(read_run, run) for run in plan.runs),
        *(functools.partial(read_direct, entry) for entry in plan.direct),
    ])
    if stager is not None:
        await stager.finish()


def archive_in_memory(data: memoryview, url: str) -> LoadedArchive:
    """A whole archive already in memory (an item of a DCP shard file): its storages
    are tensors over ``data`` itself, so the pickle's tensors are built without a copy."""
    size = len(data)
    tail_offset = max(0, size - TAIL_BYTES)
    found = locate_directory(data[tail_offset:], tail_offset, size)
    if isinstance(found, int):
        found = locate_directory(data[found:], found, size)
        if isinstance(found, int):
            raise CheckpointError(f"{url}: the zip64 end record cannot be found: the checkpoint is corrupt")
    archive = LoadedArchive(url, parse_directory(data[found.offset : found.offset + found.size], found))
    for entry in archive.directory.entries:
        view = archive.take_entry(entry, data, 0)
        if view is not None:
            archive.storages[entry.name] = (
                torch.frombuffer(view, dtype=torch.uint8) if entry.size else torch.empty(0, dtype=torch.uint8)
            )
    return archive


def _check_crc(entry: Entry, data: memoryview) -> None:
    # A CRC of 0 is what writers leave when told not to compute one (torch's set_crc32_options(False)).
    if entry.crc != 0 and isal.crc32(data) != entry.crc:
        raise CheckpointError(f"entry {entry.name!r} fails its CRC-32 check: the checkpoint is corrupt")
