"""PyTorch's checkpoint container, sans I/O: a stored zip with aligned entries.

``torch.save`` writes a zip archive (miniz, no compression) whose entries are
``<prefix>/data.pkl`` (the pickled object), one ``<prefix>/data/<key>`` per
tensor storage (raw bytes), and a few small records. This module produces and
parses exactly that container as bytes at offsets; the caller does the I/O.

Rules of the format, kept byte for byte as PyTorch's writer (miniz with
PyTorch's padding) lays it out, so that PyTorch's own reader — including its
``calculate_storage_offsets`` arithmetic and ``mmap=True`` — reads our files:

- every entry is *stored* (method 0); a non-empty entry has general-purpose
  flags 0x0808: its CRC-32 and sizes follow the data in a data descriptor
  (``PK\\x07\\x08``, crc, sizes) and the local header carries zeros there;
  an empty entry has flags 0x0800 and no descriptor;
- each entry's data starts at a multiple of ``alignment``: the local header's
  extra field holds a zip64 field when needed, then an ``FB`` field padded
  with ``Z`` bytes up to the next aligned offset (PyTorch's ``getPadding``);
- zip64 extensions appear where miniz puts them: in the local header and the
  central directory when an entry's size or header offset reaches 0xFFFFFFFF
  (its descriptor then holds 64-bit sizes), and a zip64 end record plus
  locator always precede the classic end record.

Two kinds of failure: ``ValueError`` when the caller asks for something
impossible, ``CheckpointError`` when the bytes read are not such an archive
(truncated, corrupt or not a checkpoint at all).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

U32_MAX = 0xFFFFFFFF
U16_MAX = 0xFFFF

LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")  # 30 bytes
CENTRAL_HEADER = struct.Struct("<IHHHHHHIIIHHHHHII")  # 46 bytes
END_RECORD = struct.Struct("<IHHHHIIH")  # 22 bytes
ZIP64_END_RECORD = struct.Struct("<IQHHIIQQQQ")  # 56 bytes
ZIP64_LOCATOR = struct.Struct("<IIQI")  # 20 bytes
DESCRIPTOR32 = struct.Struct("<IIII")  # 16 bytes
DESCRIPTOR64 = struct.Struct("<IIQQ")  # 24 bytes

LOCAL_SIG = 0x04034B50
CENTRAL_SIG = 0x02014B50
END_SIG = 0x06054B50
ZIP64_END_SIG = 0x06064B50
ZIP64_LOCATOR_SIG = 0x07064B50
DESCRIPTOR_SIG = 0x08074B50

FLAG_DATA_DESCRIPTOR = 0x0008
FLAG_UTF8 = 0x0800
ZIP64_EXTRA_ID = 0x0001
MAX_COMMENT = U16_MAX

DEFAULT_ALIGNMENT = 4096
MAX_ALIGNMENT = 32768  # the padding length is a 16-bit field
DEFAULT_PREFIX = "archive"


class CheckpointError(RuntimeError):
    """A checkpoint's bytes are not a readable PyTorch archive (truncated, corrupt, or not a checkpoint)."""


# --------------------------------------------------------------------- writer
@dataclass(frozen=True, slots=True)
class PlacedEntry:
    """Where the writer put an entry: its local header bytes go at ``header_offset``."""

    name: str
    header_offset: int
    header: bytes
    data_offset: int
    size: int


@dataclass(slots=True)
class _Written:
    name: bytes
    header_offset: int
    size: int
    crc: int


def _flags(size: int) -> int:
    """miniz sets the data-descriptor flag (and writes a descriptor) only for non-empty entries."""
    return FLAG_DATA_DESCRIPTOR | FLAG_UTF8 if size else FLAG_UTF8


def _zip64_extra(size: int | None, header_offset: int | None) -> bytes:
    """miniz's zip64 extra field: uncompressed and compressed size, then header offset, each if given."""
    values = ([size, size] if size is not None else []) + ([header_offset] if header_offset is not None else [])
    if not values:
        return b""
    return struct.pack(f"<HH{len(values)}Q", ZIP64_EXTRA_ID, 8 * len(values), *values)


class ArchiveWriter:
    """Lays out a checkpoint archive entry by entry, like PyTorch's stream writer.

    Call ``begin(name, size)``, write the entry's header and data where the
    returned ``PlacedEntry`` says, then ``end(crc)`` for its descriptor; at
    the end ``finish()`` returns the central directory and end records.
    Offsets grow monotonically from 0, so the writes can stream.
    """

    def __init__(self, prefix: str = DEFAULT_PREFIX, alignment: int = DEFAULT_ALIGNMENT) -> None:
        if alignment < 64 or alignment > MAX_ALIGNMENT or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a power of two between 64 and {MAX_ALIGNMENT}, got {alignment}")
        if not prefix or "/" in prefix:
            raise ValueError(f"invalid archive prefix {prefix!r}")
        self.prefix = prefix
        self.alignment = alignment
        self.cursor = 0
        self._entries: list[_Written] = []
        self._open: _Written | None = None
        self._names: set[bytes] = set()

    def begin(self, name: str, size: int) -> PlacedEntry:
        if self._open is not None:
            raise ValueError(f"entry {self._open.name!r} is still open")
        full = f"{self.prefix}/{name}".encode()
        if full in self._names:
            raise ValueError(f"duplicate archive entry {name!r}")
        if len(full) > U16_MAX or size < 0:
            raise ValueError(f"invalid archive entry {name!r} of {size} bytes")
        offset = self.cursor
        zip64 = _zip64_extra(size if size >= U32_MAX else None, offset if offset >= U32_MAX else None)
        start = offset + LOCAL_HEADER.size + len(full) + len(zip64) + 4
        padding = -start % self.alignment
        extra = zip64 + struct.pack("<2sH", b"FB", padding) + b"Z" * padding
        header = LOCAL_HEADER.pack(LOCAL_SIG, 0, _flags(size), 0, 0, 0, 0, 0, 0, len(full), len(extra))
        header += full + extra
        data_offset = offset + len(header)
        self._open = _Written(full, offset, size, 0)
        self._names.add(full)
        self.cursor = data_offset + size
        return PlacedEntry(name, offset, header, data_offset, size)

    def end(self, crc: int) -> tuple[int, bytes]:
        """Finish the open entry: (offset, bytes) of its data descriptor."""
        entry = self._open
        if entry is None:
            raise ValueError("no open entry")
        entry.crc = crc & U32_MAX
        if entry.size == 0:
            descriptor = b""
        elif entry.size >= U32_MAX or entry.header_offset >= U32_MAX:
            descriptor = DESCRIPTOR64.pack(DESCRIPTOR_SIG, entry.crc, entry.size, entry.size)
        else:
            descriptor = DESCRIPTOR32.pack(DESCRIPTOR_SIG, entry.crc, entry.size, entry.size)
        offset = self.cursor
        self.cursor += len(descriptor)
        self._entries.append(entry)
        self._open = None
        return offset, descriptor

    def finish(self) -> tuple[int, bytes]:
        """(offset, bytes) of the central directory and end records; the archive ends there."""
        if self._open is not None:
            raise ValueError(f"entry {self._open.name!r} is still open")
        directory = bytearray()
        for e in self._entries:
            big_size = e.size >= U32_MAX
            big_offset = e.header_offset >= U32_MAX
            extra = _zip64_extra(e.size if big_size else None, e.header_offset if big_offset else None)
            directory += CENTRAL_HEADER.pack(
                CENTRAL_SIG, 0, 0, _flags(e.size), 0, 0, 0, e.crc,
                min(e.size, U32_MAX), min(e.size, U32_MAX), len(e.name), len(extra), 0, 0, 0, 0,
                min(e.header_offset, U32_MAX),
            )
            directory += e.name + extra
        cd_offset = self.cursor
        count = len(self._entries)
        zip64_offset = cd_offset + len(directory)
        directory += ZIP64_END_RECORD.pack(
            ZIP64_END_SIG, ZIP64_END_RECORD.size - 12, 0x031E, 45, 0, 0, count, count,
            zip64_offset - cd_offset, cd_offset,
        )
        directory += ZIP64_LOCATOR.pack(ZIP64_LOCATOR_SIG, 0, zip64_offset, 1)
        cd_size = zip64_offset - cd_offset
        directory += END_RECORD.pack(
            END_SIG, 0, 0, min(count, U16_MAX), min(count, U16_MAX), min(cd_size, U32_MAX), min(cd_offset, U32_MAX), 0
        )
        self.cursor += len(directory)
        return cd_offset, bytes(directory)


# --------------------------------------------------------------------- reader
@dataclass(frozen=True, slots=True)
class DirectoryLocation:
    """Where the central directory is, from the end records."""

    offset: int
    size: int
    count: int


@dataclass(frozen=True, slots=True)
class Entry:
    """One central-directory entry; ``name`` is without the archive prefix."""

    name: str
    header_offset: int
    size: int
    compressed_size: int
    crc: int
    method: int
    flags: int


TAIL_BYTES = END_RECORD.size + MAX_COMMENT + ZIP64_LOCATOR.size
"""Reading this many bytes from the end of a file always covers the end records."""


def locate_directory(tail: bytes | memoryview, tail_offset: int, file_size: int) -> DirectoryLocation | int:
    """Find the central directory from the last bytes of the file.

    ``tail`` holds file bytes from ``tail_offset`` to the end (at least
    ``min(file_size, TAIL_BYTES)`` of them). Returns the location, or — for a
    zip64 archive whose zip64 end record is not inside ``tail`` — the offset
    of that record: call again with a tail starting there.
    """
    tail = bytes(tail)
    pos = tail.rfind(b"PK\x05\x06")
    while pos >= 0 and pos + END_RECORD.size > len(tail):
        pos = tail.rfind(b"PK\x05\x06", 0, pos)
    if pos < 0:
        raise CheckpointError("no zip end-of-central-directory record: the file is truncated or not a checkpoint")
    _sig, disk, cd_disk, _n_disk, count, cd_size, cd_offset, comment_len = END_RECORD.unpack_from(tail, pos)
    if pos + END_RECORD.size + comment_len != len(tail):
        raise CheckpointError("the zip end record is not at the end of the file: "
                              "the file is truncated or has trailing garbage")
    if disk or cd_disk:
        raise CheckpointError("multi-disk zip archives are not checkpoints")
    loc = pos - ZIP64_LOCATOR.size
    if loc >= 0 and tail[loc : loc + 4] == b"PK\x06\x07":
        _sig, _disk, zip64_offset, _disks = ZIP64_LOCATOR.unpack_from(tail, loc)
        if zip64_offset + ZIP64_END_RECORD.size > tail_offset + loc:
            raise CheckpointError("the zip64 locator points past itself: the file is corrupt")
        rel = zip64_offset - tail_offset
        if rel < 0:
            return zip64_offset
        if tail[rel : rel + 4] != b"PK\x06\x06":
            raise CheckpointError("the zip64 end record is missing: the file is corrupt")
        (_sig, _rec, _made, _need, _d, _cdd, _n, count, cd_size, cd_offset) = ZIP64_END_RECORD.unpack_from(tail, rel)
        end_of_directory = zip64_offset
    else:
        end_of_directory = tail_offset + pos
    if cd_offset + cd_size != end_of_directory or cd_offset > file_size:
        raise CheckpointError(
            f"the central directory ({cd_size} bytes at {cd_offset}) does not end where the end records start "
            f"({end_of_directory}): the file is truncated or corrupt"
        )
    return DirectoryLocation(cd_offset, cd_size, count)


@dataclass(frozen=True, slots=True)
class Directory:
    """A parsed central directory: the archive folder name and the entries in file order."""

    prefix: str
    entries: list[Entry]
    offset: int

    def full_name(self, entry: Entry) -> bytes:
        return f"{self.prefix}/{entry.name}".encode()


def parse_directory(data: bytes | memoryview, location: DirectoryLocation) -> Directory:
    """The entries of a central directory, sorted by position; the common prefix is stripped."""
    data = bytes(data)
    if len(data) != location.size:
        raise CheckpointError(f"central directory: got {len(data)} of {location.size} bytes")
    entries: list[Entry] = []
    prefix: str | None = None
    pos = 0
    while pos < len(data):
        if pos + CENTRAL_HEADER.size > len(data):
            raise CheckpointError("the central directory is cut short")
        (sig, _made, _need, flags, method, _t, _d, crc, csize, usize, name_len, extra_len, comment_len,
         _disk, _iattr, _eattr, header_offset) = CENTRAL_HEADER.unpack_from(data, pos)
        if sig != CENTRAL_SIG:
            raise CheckpointError(f"bad central directory record at byte {location.offset + pos}")
        start = pos + CENTRAL_HEADER.size
        raw_name = data[start : start + name_len]
        extra = data[start + name_len : start + name_len + extra_len]
        pos = start + name_len + extra_len + comment_len
        if pos > len(data):
            raise CheckpointError("the central directory is cut short")
        usize, csize, header_offset = _apply_zip64(extra, usize, csize, header_offset)
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"undecodable entry name {raw_name!r}") from None
        head, slash, rest = name.partition("/")
        if not slash:
            raise CheckpointError(f"entry {name!r} is not inside the archive folder: not a PyTorch checkpoint")
        if prefix is None:
            prefix = head
        elif head != prefix:
            raise CheckpointError(f"entry {name!r} is outside the archive folder {prefix!r}")
        entries.append(Entry(rest, header_offset, usize, csize, crc, method, flags))
    if len(entries) != location.count:
        raise CheckpointError(f"the central directory lists {len(entries)} entries, its end record {location.count}")
    entries.sort(key=lambda e: e.header_offset)
    for e in entries:
        if e.header_offset + LOCAL_HEADER.size + e.compressed_size > location.offset:
            raise CheckpointError(f"entry {e.name!r} lies past the central directory: the file is corrupt")
    if prefix is None:
        raise CheckpointError("the archive is empty: not a PyTorch checkpoint")
    return Directory(prefix, entries, location.offset)


def _apply_zip64(extra: bytes, usize: int, csize: int, offset: int) -> tuple[int, int, int]:
    pos = 0
    while pos + 4 <= len(extra):
        field_id, field_len = struct.unpack_from("<HH", extra, pos)
        body = extra[pos + 4 : pos + 4 + field_len]
        pos += 4 + field_len
        if field_id != ZIP64_EXTRA_ID:
            continue
        values = list(struct.unpack_from(f"<{len(body) // 8}Q", body))
        if usize == U32_MAX and values:
            usize = values.pop(0)
        if csize == U32_MAX and values:
            csize = values.pop(0)
        if offset == U32_MAX and values:
            offset = values.pop(0)
    return usize, csize, offset


def local_header_span(directory: Directory, entry: Entry) -> int:
    """Bytes to read at ``entry.header_offset`` to learn where its data starts (fixed header and name)."""
    return LOCAL_HEADER.size + len(directory.full_name(entry))


def local_data_offset(directory: Directory, entry: Entry, header: bytes | memoryview) -> int:
    """Where ``entry``'s data starts, from the first ``local_header_span`` bytes at its header offset."""
    full = directory.full_name(entry)
    if len(header) < LOCAL_HEADER.size + len(full):
        raise CheckpointError(f"local header of {entry.name!r} is cut short")
    sig, *_rest, name_len, extra_len = LOCAL_HEADER.unpack_from(header, 0)
    name = bytes(header[LOCAL_HEADER.size : LOCAL_HEADER.size + len(full)])
    if sig != LOCAL_SIG or name_len != len(full) or name != full:
        raise CheckpointError(
            f"no local header for {entry.name!r} at byte {entry.header_offset} where the central directory puts it: "
            "the file is corrupt"
        )
    return entry.header_offset + LOCAL_HEADER.size + name_len + extra_len


def check_readable(entry: Entry, data_offset: int, directory_offset: int) -> None:
    """Refuse entries the loader cannot map straight onto memory."""
    if entry.method != 0 or entry.compressed_size != entry.size:
        raise CheckpointError(f"entry {entry.name!r} is compressed (method {entry.method}); "
                              "checkpoints store entries uncompressed")
    if entry.flags & 0x0001:
        raise CheckpointError(f"entry {entry.name!r} is encrypted")
    if data_offset + entry.size > directory_offset:
        raise CheckpointError(f"entry {entry.name!r} runs into the central directory: the file is corrupt")
