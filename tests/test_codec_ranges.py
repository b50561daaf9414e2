"""Range rebuild (``codec.rebuild_columns``): any column range of k fragments rebuilds
the same range of the others, so repair streams fragments in bounded segments."""

from __future__ import annotations

import itertools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepfs.codec import column_segments, decode_stripe, encode_stripe, rebuild_columns
from deepfs.layout import Layout

pytestmark = pytest.mark.unit

LAYOUTS = [Layout(4, 2, 256 << 10), Layout(2, 1, 64 << 10), Layout(6, 3, 96 << 10, "isa_l_rs_vand")]


@settings(max_examples=40, deadline=None)
@given(layout=st.sampled_from(LAYOUTS), seed=st.integers(0, 2**32 - 1), segment=st.integers(1, 40_000))
def test_segmented_rebuild_equals_encoded_fragments(layout: Layout, seed: int, segment: int) -> None:
    rng = random.Random(seed)
    data = rng.randbytes(rng.randint(1, layout.stripe_size))
    encoded = encode_stripe(layout, data)
    fragments = [bytes(encoded.payload(slot)[0]) for slot in range(layout.width)]
    lost = rng.sample(range(layout.width), rng.randint(1, layout.m))
    survivors = [slot for slot in range(layout.width) if slot not in lost]
    sources = rng.sample(survivors, layout.k)
    rebuilt = {slot: bytearray() for slot in lost}
    for a, b in column_segments(encoded.fragment_size, segment):
        assert b - a <= segment  # the memory bound: one segment per source and per rebuilt fragment
        pieces = rebuild_columns(layout, {s: memoryview(fragments[s])[a:b] for s in sources}, lost)
        for slot, piece in pieces.items():
            rebuilt[slot] += piece
    for slot in lost:
        assert bytes(rebuilt[slot]) == fragments[slot]
    # And the stripe decodes from the rebuilt fragments as from the originals.
    mixed = {slot: (rebuilt[slot] if slot in lost else fragments[slot]) for slot in range(layout.width)}
    chosen = dict(itertools.islice(((s, mixed[s]) for s in sorted(lost) + survivors), layout.k))
    assert decode_stripe(layout, len(data), chosen) == data


def test_column_segments_cover_the_fragment_exactly() -> None:
    assert column_segments(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert column_segments(0, 4) == [(0, 0)]
    with pytest.raises(ValueError):
        column_segments(10, 0)


def test_rebuild_refuses_too_few_or_overlapping_sources() -> None:
    layout = Layout(4, 2, 64 << 10)
    piece = memoryview(bytes(16))
    with pytest.raises(ValueError):
        rebuild_columns(layout, {0: piece, 1: piece, 2: piece}, [3])
    with pytest.raises(ValueError):
        rebuild_columns(layout, {0: piece, 1: piece, 2: piece, 3: piece}, [3])
    with pytest.raises(ValueError):
        rebuild_columns(layout, {0: piece, 1: piece, 2: piece, 4: piece[:8]}, [3])
