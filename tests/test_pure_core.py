"""Sans-I/O pieces: frame codec, layout maths, placement, erasure codec."""

from __future__ import annotations

import os
import random
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepfs import checksums, codec, frames, isal
from deepfs.errors import ChecksumError, ConfigError
from deepfs.layout import (
    ALIGNMENT,
    Layout,
    fragment_data_size,
    stripe_range_to_fragments,
)
from deepfs.messages import MISSING_NODE
from deepfs.placement import NodeView, place_stripe

pytestmark = pytest.mark.unit


# ---------------------------------------------------------------- frames
@given(
    op=st.integers(0, 255),
    rid=st.integers(0, 2**64 - 1),
    body=st.dictionaries(
        st.text(max_size=8), st.one_of(st.integers(-(2**63), 2**63 - 1), st.binary(max_size=32), st.text(max_size=8))
    ),
    payload_len=st.integers(0, 1 << 20),
)
def test_frame_round_trip(op: int, rid: int, body: dict, payload_len: int) -> None:
    raw = frames.encode_frame(op, rid, body, payload_len)
    header = frames.parse_header(raw[: frames.HEADER_SIZE])
    assert (header.op, header.request_id, header.payload_len) == (op, rid, payload_len)
    assert frames.decode_body(raw[: frames.HEADER_SIZE], header, raw[frames.HEADER_SIZE :]) == body


def test_frame_rejects_garbage() -> None:
    raw = bytearray(frames.encode_frame(frames.Op.PING, 1, {"a": 1}))
    with pytest.raises(frames.ProtocolError, match="magic"):
        frames.parse_header(b"\0" * frames.HEADER_SIZE)
    with pytest.raises(frames.ProtocolError, match="payload length"):
        frames.parse_header(frames.encode_frame(1, 1, {}, payload_len=2**31)[: frames.HEADER_SIZE], max_payload=1 << 20)
    raw[-1] ^= 0xFF  # corrupt the body
    header = frames.parse_header(raw[: frames.HEADER_SIZE])
    with pytest.raises(frames.ProtocolError, match="checksum"):
        frames.decode_body(raw[: frames.HEADER_SIZE], header, bytes(raw[frames.HEADER_SIZE :]))
    with pytest.raises(frames.ProtocolError, match="header must be"):
        frames.parse_header(b"short")


# ---------------------------------------------------------------- layout
def test_layout_validation() -> None:
    Layout(4, 2, 4 << 20)
    Layout(1, 2, 64 << 10)
    with pytest.raises(ConfigError, match="multiple"):
        Layout(4, 2, 4 << 20 | 4096)
    with pytest.raises(ConfigError, match="m >= 5"):
        Layout(4, 5, 4 * ALIGNMENT * 4, codec="isa_l_rs_vand")
    Layout(4, 5, 4 * ALIGNMENT * 4, codec="isa_l_rs_cauchy")
    with pytest.raises(ConfigError, match="k must be"):
        Layout(0, 2)


def test_stripe_maths() -> None:
    layout = Layout(4, 2, 64 << 10)
    assert fragment_data_size(layout, 1) == ALIGNMENT
    assert fragment_data_size(layout, 64 << 10) == 16 << 10
    pieces = stripe_range_to_fragments(16 << 10, 16383, 3)
    assert [(p.index, p.start, p.length, p.stripe_offset) for p in pieces] == [(0, 16383, 1, 16383), (1, 0, 2, 16384)]


# ------------------------------------------------------------- placement
def _nodes(count: int, domains: int | None = None) -> list[NodeView]:
    return [NodeView(i, f"127.0.0.1:{9000 + i}", f"d{i % (domains or count)}") for i in range(count)]


def test_placement_distinct_stable_and_spread() -> None:
    nodes = _nodes(8)
    first = place_stripe(7, 3, 6, nodes)
    assert len(set(first)) == 6 and first == place_stripe(7, 3, 6, nodes)
    # A node leaving moves only the fragments it held.
    gone = first[0]
    remaining = [n for n in nodes if n.node_id != gone]
    second = place_stripe(7, 3, 6, remaining)
    assert set(first) - {gone} <= set(second)
    # Three domains, six fragments: each domain holds two.
    spread = place_stripe(1, 1, 6, _nodes(6, domains=3))
    domains = [f"d{i % 3}" for i in spread]
    assert sorted(domains) == ["d0", "d0", "d1", "d1", "d2", "d2"]
    assert spread[:3] and len({domains[0], domains[1], domains[2]}) == 3


def test_placement_marks_missing_when_too_few_nodes() -> None:
    nodes = [NodeView(i, "a", f"d{i}", up=i < 4) for i in range(6)]
    placement = place_stripe(1, 0, 6, nodes)
    assert placement.count(MISSING_NODE) == 2 and set(placement) - {MISSING_NODE} == {0, 1, 2, 3}


def test_placement_balances() -> None:
    nodes = _nodes(6)
    counts = {n.node_id: 0 for n in nodes}
    for stripe in range(600):
        counts[place_stripe(42, stripe, 1, nodes)[0]] += 1
    assert min(counts.values()) > 60  # ~100 each if the hash spreads


# ----------------------------------------------------------------- codec
@pytest.mark.parametrize("k,m", [(4, 2), (1, 2), (2, 1), (8, 3), (4, 0)])
@pytest.mark.parametrize("length", [1, 4095, 4096, 100_000, 256 << 10])
def test_codec_round_trip_any_k(k: int, m: int, length: int) -> None:
    layout = Layout(k, m, 256 << 10 if (256 << 10) % (k * ALIGNMENT) == 0 else k * ALIGNMENT * 8)
    length = min(length, layout.stripe_size)
    data = os.urandom(length)
    encoded = codec.encode_stripe(layout, data)
    fragments = [bytes(f) for f in encoded.fragments]
    assert len(fragments) == k + m
    assert all(len(f) == fragment_data_size(layout, length) for f in fragments)
    # Systematic, no header: data fragment j is stripe bytes [j*F, (j+1)*F).
    size = fragment_data_size(layout, length)
    for j in range(k):
        assert fragments[j] == data[j * size : (j + 1) * size].ljust(size, b"\0")
    assert encoded.block_crcs == [checksums.block_crcs(f) for f in fragments]
    assert encoded.digests == [checksums.fragment_digest(c) for c in encoded.block_crcs]
    rng = random.Random(length)
    for _ in range(3):
        keep = rng.sample(range(k + m), k)
        assert codec.decode_stripe(layout, length, {i: fragments[i] for i in keep}) == data


def test_full_stripe_data_fragments_are_views_of_the_callers_memory() -> None:
    layout = Layout(4, 2, 4 * ALIGNMENT * 4)
    data = bytearray(os.urandom(layout.stripe_size))
    encoded = codec.encode_stripe(layout, data)
    assert all(f.obj is data for f in encoded.fragments[:4])  # sent from where they lie
    assert all(f.obj is not data for f in encoded.fragments[4:])


@settings(max_examples=60, deadline=None)
@given(k=st.integers(1, 8), m=st.integers(1, 4), cuts=st.lists(st.integers(1, 8 * ALIGNMENT * 2 - 1), max_size=12),
       short=st.booleans())
def test_a_gathered_stripe_encodes_like_the_joined_one(k: int, m: int, cuts: list[int], short: bool) -> None:
    """Pieces of separate buffers (cut anywhere, however small) give the same fragments,
    block CRCs and digests as the stripe joined; full stripes leave every byte where it lies."""
    layout = Layout(k, m, k * ALIGNMENT * 2)
    length = layout.stripe_size - (777 if short else 0)
    data = os.urandom(length)
    bounds = sorted({0, length, *(c % length for c in cuts)})
    buffers = [bytearray(data[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    gathered = codec.encode_gathered(layout, [memoryview(b) for b in buffers])
    joined = codec.encode_stripe(layout, data)
    assert [b"".join(gathered.payload(i)) for i in range(k + m)] == [bytes(f) for f in joined.fragments]
    assert (gathered.block_crcs, gathered.digests) == (joined.block_crcs, joined.digests)
    assert gathered.fragment_size == joined.fragment_size
    if not short:
        owners = {id(b) for b in buffers}
        assert all(id(part.obj) in owners for i in range(k) for part in gathered.payload(i))


def test_block_crcs_of_parts_continue_across_parts() -> None:
    data = os.urandom(300_000)
    for cuts in ([], [1], [65_536], [65_535, 65_537, 200_000], list(range(1000, 300_000, 7000))):
        bounds = [0, *cuts, len(data)]
        parts = [memoryview(data)[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
        assert checksums.block_crcs_of_parts(parts) == checksums.block_crcs(data)
    assert checksums.block_crcs_of_parts([]) == checksums.block_crcs(b"")


@pytest.mark.parametrize("codec_name", ["isa_l_rs_cauchy", "isa_l_rs_vand"])
@pytest.mark.parametrize("k,m", [(4, 2), (6, 3), (10, 4), (1, 2)])
def test_parity_is_identical_to_pyeclibs(codec_name: str, k: int, m: int) -> None:
    """The reference: pyeclib (liberasurecode) encodes the same bytes behind its 80-byte header."""
    from pyeclib.ec_iface import ECDriver

    layout = Layout(k, m, k * ALIGNMENT * 4, codec=codec_name)
    data = os.urandom(layout.stripe_size)
    ours = codec.encode_stripe(layout, data).fragments
    theirs = ECDriver(k=k, m=m, ec_type=codec_name).encode(data)
    size = layout.stripe_size // k
    assert [bytes(f) for f in ours] == [f[80 : 80 + size] for f in theirs]


def test_zip_crc32_matches_zlib() -> None:
    data = os.urandom(3 << 20)
    assert isal.crc32(data) == zlib.crc32(data)
    assert isal.crc32(memoryview(data)[7:], 12345) == zlib.crc32(data[7:], 12345)
    assert isal.crc32(b"") == 0


def test_reconstruct_refuses_wrong_source_counts() -> None:
    with pytest.raises(ValueError, match="exactly 4"):
        isal.reconstruct(4, 2, "cauchy", {0: b"x" * 64}, {1: bytearray(64)})
    with pytest.raises(ValueError, match="need 4 fragments"):
        codec.decode_stripe(Layout(4, 2, 4 * ALIGNMENT), 10, {0: b"x", 1: b"x"})


def test_codec_checksums() -> None:
    data = os.urandom(200_000)
    crcs = checksums.block_crcs(data)
    assert len(crcs) == 4
    checksums.verify_fragment(data, checksums.fragment_digest(crcs), "x")
    with pytest.raises(ChecksumError):
        checksums.verify_fragment(data[:-1] + bytes([data[-1] ^ 0xFF]), checksums.fragment_digest(crcs), "x")


@settings(max_examples=30)
@given(st.integers(1, 16), st.integers(0, 8))
def test_every_valid_layout_encodes(k: int, m: int) -> None:
    layout = Layout(k, m, k * ALIGNMENT * 2)
    fragments = [bytes(f) for f in codec.encode_stripe(layout, b"x" * 5000).fragments]
    assert len(fragments) == k + m
    assert codec.decode_stripe(layout, 5000, dict(list(enumerate(fragments))[m:])) == b"x" * 5000


def test_example_cluster_config_loads() -> None:
    from pathlib import Path

    from deepfs.config import load_cluster_config

    config = load_cluster_config(Path(__file__).parent.parent / "examples" / "cluster.toml")
    assert config.meta.port == 7700 and len(config.nodes) == 2 and config.nodes[1].failure_domain == "rack2"


def test_config_rejects_unknown_keys(tmp_path) -> None:
    from deepfs.config import load_cluster_config

    bad = tmp_path / "bad.toml"
    bad.write_text("[meta]\nprot = 1\n")
    with pytest.raises(ConfigError, match="prot"):
        load_cluster_config(bad)


def test_prefault_maps_pages_and_keeps_their_contents() -> None:
    import ctypes
    import platform

    from deepfs.malloc_tuning import prefault

    buf = bytearray(b"x" * (1 << 20))
    address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    major, minor = (int(p) for p in platform.release().split(".")[:2])
    assert prefault(address + 100, len(buf) - 200) is ((major, minor) >= (5, 14))  # MADV_POPULATE_WRITE
    assert buf == b"x" * (1 << 20)
    assert prefault(address, 10)  # less than a page: nothing to do
