"""The on-disk fragment format without a disk: names, layout, header and CRC table."""

from __future__ import annotations

import crc32c
import pytest

from deepfs.errors import ChecksumError
from deepfs.messages import FragmentKey
from storage_node import fragment_format as fmt

pytestmark = pytest.mark.unit

KEY = FragmentKey(ino=300, stripe=3, version=123456789, slot=2)


def test_names_are_built_from_the_key_only() -> None:
    assert fmt.prefix_dir(KEY) == "2c"  # 300 % 256 == 0x2c
    assert fmt.file_name(KEY) == "300.3.123456789.2"
    assert fmt.relative_path(KEY) == "2c/300.3.123456789.2"
    temp = fmt.temp_name(KEY, "abc")
    assert temp.startswith(".300.3.123456789.2.") and fmt.is_temp_name(temp)
    assert not fmt.is_temp_name(fmt.file_name(KEY))
    assert fmt.quarantine_name(KEY, 42) == "300.3.123456789.2.42"


def test_a_name_is_a_key_only_as_the_store_writes_it() -> None:
    assert fmt.key_of_name("300.3.123456789.2") == KEY
    assert fmt.key_in_inode_folder(300, "3.123456789.2") == KEY  # the layout before the flat one
    for name in ("300.3.123456789", "300.3.123456789.2.1", "0300.3.123456789.2", "300.3.123456789.32",
                 "300.-3.1.2", "300.3.1.\u0662", fmt.temp_name(KEY, "abc"), "..", "300.3.1.2 "):
        assert fmt.key_of_name(name) is None, name
    assert fmt.key_of_name(f"{2**64}.0.0.0") is None


@pytest.mark.parametrize(("data_len", "block_size", "n_blocks", "data_offset"), [
    (0, 4096, 0, 4096),
    (1, 4096, 1, 4096),
    (5 * 4096 + 1, 4096, 6, 4096),
    (1016 * 65536, 65536, 1016, 4096),  # the table still fits before the first page
    (1017 * 65536, 65536, 1017, 8192),
])
def test_layout_puts_data_on_a_page_boundary_after_the_table(data_len: int, block_size: int, n_blocks: int,
                                                             data_offset: int) -> None:
    header = fmt.layout(data_len, block_size)
    assert (header.n_blocks, header.data_offset) == (n_blocks, data_offset)
    assert header.file_size == data_offset + data_len


def test_prefix_round_trips_and_any_flipped_header_byte_is_caught() -> None:
    header = fmt.layout(3 * 4096 - 5, 4096)
    crcs = [0x11111111, 0x22222222, 0x33333333]
    prefix = fmt.pack_prefix(header, crcs)
    assert len(prefix) == header.data_offset and prefix[:4] == fmt.MAGIC
    assert fmt.unpack_header(prefix[: fmt.HEADER_SIZE]) == header
    table = prefix[fmt.crc_table_offset(1) : fmt.crc_table_offset(3)]
    assert fmt.unpack_crcs(table, 2) == (0x22222222, 0x33333333)
    for i in range(fmt.HEADER_SIZE):
        bad = bytearray(prefix[: fmt.HEADER_SIZE])
        bad[i] ^= 0x01
        with pytest.raises(fmt.CorruptFragment):
            fmt.unpack_header(bad)
    with pytest.raises(fmt.CorruptFragment):
        fmt.unpack_header(prefix[:10])


def test_blocks_are_checked_against_the_table() -> None:
    data = memoryview(bytes(range(256)) * 40)  # 10240 bytes: 3 blocks of 4096
    crcs = [crc32c.crc32c(data[i : i + 4096]) for i in range(0, len(data), 4096)]
    assert fmt.checked_crcs(KEY, data, crcs, 4096) == crcs
    fmt.verify_blocks(data[4096:], crcs[1:], 4096, first=1)
    with pytest.raises(fmt.CorruptFragment, match="block 2"):
        fmt.verify_blocks(data[4096:], [crcs[1], crcs[2] ^ 1], 4096, first=1)
    with pytest.raises(ChecksumError):
        fmt.checked_crcs(KEY, data, [crcs[0], crcs[1] ^ 1, crcs[2]], 4096)
    with pytest.raises(ValueError):
        fmt.checked_crcs(KEY, data, crcs[:2], 4096)
    assert fmt.checked_crcs(KEY, memoryview(b""), [0], 4096) == []  # the CRC of b"" for an empty fragment
