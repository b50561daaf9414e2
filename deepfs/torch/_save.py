"""``deepfs.torch.save``: stream a checkpoint into striped DeepFS files.

Pipeline (mental model: a producer thread and a consumer loop):
- the caller's thread runs PyTorch's own ``_save`` (pickling with storage
  persistent ids, copies of GPU storages to the host) against
  ``RecordWriter``, which stands in for PyTorch's zip writer: it lays the
  entries out with ``ArchiveWriter``, computes each entry's CRC-32 (ISA-L,
  GIL dropped) and hands byte ranges — views of the tensors' own memory, no
  copy, cut at stripe boundaries — to a sink;
- ``StripeSink`` batches those ranges and passes them to the client's trio
  thread, where ``AsyncFile.pwrite(zero_copy=True)`` encodes every stripe
  straight from the memory it lies in and stores it in the background (a
  stripe shared by several entries is gathered from their pieces, not copied
  together; only the file's short last stripe is), so stripes travel while
  later tensors are still being serialized
  (back-pressure: ``ClientConfig.max_dirty_stripes`` per file). The tensors
  are lent until the save's fsync returns.

Crash safety: the archive is written under ``<dir>/.<name>.tmp-<random>``,
fsynced, then renamed over the real name; a killed job leaves at most a
temporary file, never a partial checkpoint under the name.
"""

from __future__ import annotations

import functools
import io
import pickle
import secrets
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.serialization
import trio

from deepfs import isal
from deepfs.client import AsyncClient, AsyncFile, Client
from deepfs.layout import Layout
from deepfs.torch._archive import DEFAULT_ALIGNMENT, ArchiveWriter
from deepfs.torch._errors import explain
from deepfs.torch._progress import TransferBar
from deepfs.torch._target import Target, is_temporary_name, resolve, temporary_prefix
from deepfs.url import KeyArg, join_path

CHUNK_BYTES = 8 << 20
"""Ranges are checksummed and handed to the I/O loop in pieces of about this size,
cut at multiples of it in the file (a multiple of the stripe size, see ``chunk_bytes_for``)."""

ARCHIVE_VERSION = b"3\n"  # what PyTorch's writer records for tensor checkpoints


class Sink(Protocol):
    def write(self, offset: int, data: memoryview) -> None: ...


class MemorySink:
    """Collects the archive in memory (tests, and the twin of ``StripeSink``)."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def write(self, offset: int, data: memoryview) -> None:
        end = offset + len(data)
        if len(self.buffer) < end:
            self.buffer.extend(bytes(end - len(self.buffer)))
        self.buffer[offset:end] = data


def storage_bytes(storage: torch.UntypedStorage) -> memoryview:
    """The bytes of a CPU storage as a memoryview of its own memory (any dtype, no conversion)."""
    if storage.nbytes() == 0:
        return memoryview(b"")
    as_bytes = torch.empty(0, dtype=torch.uint8).set_(storage)
    return memoryview(as_bytes.numpy()).cast("B")


class RecordWriter:
    """Stands in for ``torch._C.PyTorchFileWriter`` inside ``torch.serialization._save``."""

    def __init__(self, sink: Sink, alignment: int = DEFAULT_ALIGNMENT, advance: Callable[[int], None] | None = None,
                 chunk_bytes: int = CHUNK_BYTES) -> None:
        self.archive = ArchiveWriter(alignment=alignment)
        self.sink = sink
        self._advance = advance or (lambda n: None)
        self._chunk_bytes = chunk_bytes

    def write_record(self, name: str, data: Any, nbytes: int) -> None:
        if name == ".storage_alignment":
            # The record states the alignment the entries really have: ours, not torch's global setting.
            data = str(self.archive.alignment)
            nbytes = len(data)
        if isinstance(data, str):
            view = memoryview(data.encode())
        elif isinstance(data, (bytes, bytearray, memoryview)):
            view = memoryview(data).cast("B")
        else:
            view = storage_bytes(data)
        if len(view) != nbytes:
            raise ValueError(f"record {name!r}: {len(view)} bytes given for {nbytes}")
        self._write_entry(name, view)

    def write_record_metadata(self, name: str, nbytes: int) -> None:
        raise NotImplementedError("deepfs.torch.save does not support torch.serialization.skip_data")

    def _write_entry(self, name: str, view: memoryview) -> None:
        placed = self.archive.begin(name, len(view))
        self.sink.write(placed.header_offset, memoryview(placed.header))
        crc = 0
        start = 0
        while start < len(view):
            # Cut where the file offset reaches a multiple of the chunk size, so whole
            # stripes of a big tensor reach the file in one piece (sent without a copy).
            file_offset = placed.data_offset + start
            end = min(len(view), start + self._chunk_bytes - file_offset % self._chunk_bytes)
            chunk = view[start:end]
            crc = isal.crc32(chunk, crc)
            self.sink.write(file_offset, chunk)
            self._advance(len(chunk))
            start = end
        offset, descriptor = self.archive.end(crc)
        self.sink.write(offset, memoryview(descriptor))

    def finish(self) -> int:
        """Write the closing records and the central directory; returns the archive's size."""
        self._write_entry("version", memoryview(ARCHIVE_VERSION))
        serialization_id = f"{secrets.randbits(64):020d}{secrets.randbits(64):020d}"
        self._write_entry(".data/serialization_id", memoryview(serialization_id.encode()))
        offset, trailer = self.archive.finish()
        self.sink.write(offset, memoryview(trailer))
        return self.archive.cursor


class StripeSink:
    """Hands byte ranges to an open DeepFS file on the client's trio thread, in batches."""

    def __init__(self, client: Client, handle: AsyncFile, batch_bytes: int = CHUNK_BYTES) -> None:
        self._client = client
        self._handle = handle
        self._batch_bytes = batch_bytes
        self._pending: list[tuple[int, memoryview]] = []
        self._pending_bytes = 0

    def write(self, offset: int, data: memoryview) -> None:
        self._pending.append((offset, data))
        self._pending_bytes += len(data)
        if self._pending_bytes >= self._batch_bytes:
            self.flush()

    def flush(self) -> None:
        batch, self._pending, self._pending_bytes = self._pending, [], 0
        if batch:
            self._client.run_async(_pwrite_all, self._handle, batch)


async def _pwrite_all(handle: AsyncFile, batch: list[tuple[int, memoryview]]) -> None:
    for offset, data in batch:
        await handle.pwrite(data, offset, zero_copy=True)  # lent until save's fsync returns


def chunk_bytes_for(stripe_size: int) -> int:
    """CHUNK_BYTES rounded to whole stripes (at least one)."""
    return stripe_size * max(1, CHUNK_BYTES // stripe_size)


def serialize_to(sink: Sink, obj: object, pickle_module: Any = pickle, pickle_protocol: int = 2,
                 disable_byteorder_record: bool = False, alignment: int = DEFAULT_ALIGNMENT,
                 advance: Callable[[int], None] | None = None, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Write ``obj`` as a PyTorch archive into ``sink``; returns the archive's size."""
    writer = RecordWriter(sink, alignment, advance, chunk_bytes)
    torch.serialization._save(  # noqa: SLF001 - torch.save's own writer, so the bytes match it
        obj, writer, pickle_module, pickle_protocol, disable_byteorder_record)
    return writer.finish()


def save(
    obj: object,
    f: Any,
    pickle_module: Any = pickle,
    pickle_protocol: int = torch.serialization.DEFAULT_PROTOCOL,
    _use_new_zipfile_serialization: bool = True,
    _disable_byteorder_record: bool = False,
    *,
    client: Client | None = None,
    key: KeyArg = None,
    layout: Layout | None = None,
    alignment: int = DEFAULT_ALIGNMENT,
    progress: bool | None = None,
) -> None:
    """Save ``obj`` like ``torch.save``, straight into a DeepFS file.

    ``f`` is a ``deepfs://HOST:PORT/path`` URL (opened with ``key``, as for
    ``load``), or a path on ``client``; a file-like object is handed to
    ``torch.save`` unchanged. The file is
    PyTorch's own format with every entry aligned to ``alignment`` bytes, so
    ``torch.load`` through the FUSE mount reads it too (``mmap=True`` as well).
    It appears under its name only once completely written (temporary name,
    fsync, atomic rename). ``layout`` overrides the directory's default
    erasure layout for the new file; without it the file gets the
    directory's k, m and codec with stripes of at least 32 MiB
    (``ClientConfig.checkpoint_stripe_bytes``). ``progress`` shows a transfer bar
    (default: only when stderr is a terminal).
    """
    target = resolve(f, client, key)
    if target is None:
        torch.save(obj, f, pickle_module, pickle_protocol, _use_new_zipfile_serialization, _disable_byteorder_record)
        return
    ArchiveWriter(alignment=alignment)  # refuse a bad alignment before creating anything
    temporary = target.temporary_sibling()
    aio = target.client.aio
    try:
        # Without a layout: the directory's, with wide stripes (ClientConfig.checkpoint_stripe_bytes):
        # checkpoints are written and read whole, and 4x the usual stripes mean 4x fewer requests.
        handle = target.client.run_async(functools.partial(
            aio.open, temporary, "xb", layout, min_stripe_size=aio.config.checkpoint_stripe_bytes))
    except BaseException as exc:
        raise explain(exc, "saving", target.url) from exc
    try:
        with TransferBar(f"saving {target.url}", progress) as bar:
            sink = StripeSink(target.client, handle)
            if _use_new_zipfile_serialization:
                serialize_to(sink, obj, pickle_module, pickle_protocol, _disable_byteorder_record, alignment,
                             bar.advance, chunk_bytes_for(handle.layout.stripe_size))
            else:
                legacy = io.BytesIO()
                torch.save(obj, legacy, pickle_module, pickle_protocol, False, _disable_byteorder_record)
                sink.write(0, legacy.getbuffer())
                bar.advance(legacy.tell())
            sink.flush()
            target.client.run_async(_publish, aio, handle, temporary, target.path)
    except BaseException as exc:
        _abandon(target, handle, temporary)
        raise explain(exc, "saving", target.url) from exc


async def _publish(aio: AsyncClient, handle: AsyncFile, temporary: str, path: str) -> None:
    """Make the complete archive durable, then visible under its name in one step."""
    await handle.fsync()
    await handle.close()
    await aio.rename(temporary, path)
    await aio.fsync_namespace()
    # The checkpoint is saved: tidying up after earlier killed saves must not fail it.
    with trio.move_on_after(10):
        try:
            await sweep_stale_temporaries(aio, path, aio.config.stale_save_s)
        except OSError:
            pass


async def sweep_stale_temporaries(aio: AsyncClient, path: str, stale_after_s: float) -> list[str]:
    """Remove the temporaries killed saves of ``path`` left behind, untouched for
    ``stale_after_s`` seconds; returns the paths removed. Best effort: a name
    another client removes or renames first is skipped."""
    parent, _, name = path.rpartition("/")
    parent = parent or "/"
    prefix = temporary_prefix(name)
    removed = []
    for entry, _ino, _mode in await aio.scandir(parent):
        if not is_temporary_name(entry, prefix):
            continue
        candidate = join_path(parent, entry)
        try:
            if time.time() - (await aio.stat(candidate)).st_mtime > stale_after_s:
                await aio.unlink(candidate)
                removed.append(candidate)
        except FileNotFoundError:
            continue
    return removed


def _abandon(target: Target, handle: AsyncFile, temporary: str) -> None:
    """Best effort after a failed save: remove the temporary file (the real name was never touched)."""

    async def abandon() -> None:
        with trio.move_on_after(30):
            try:
                await target.client.aio.unlink(temporary)
            except OSError:
                pass
            try:
                await handle.close()
            except Exception:  # noqa: BLE001 - the save's own error is the one to report
                pass

    try:
        target.client.run_async(abandon)
    except Exception:  # noqa: BLE001 - the client itself may be gone
        pass
