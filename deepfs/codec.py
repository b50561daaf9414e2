"""Erasure codec: one stripe in, k+m fragments out, and back.

Conventions the rest of DeepFS relies on: a stripe holding L bytes is
zero-padded to ``padded_length`` and cut into k data fragments of
``fragment_data_size`` bytes each — data fragment j *is* stripe bytes
[j·F, (j+1)·F), with no header — so range reads need no decode and data
fragments of a full stripe are sent straight from the caller's memory
(views, no copy). Only the m parity fragments are computed (ISA-L, see
``deepfs.isal``). Every fragment carries block CRC32Cs (``checksums``).

A full stripe may also arrive *gathered*: as pieces of several buffers (a
checkpoint's stripe holding the end of one tensor and the start of the
next). ``encode_gathered`` then leaves every byte where it lies: a data
fragment is the tuple of its pieces (sent with one vectored send), parity is
computed segment by segment (RS works column by column, so a segment where
every data fragment lies in one piece encodes on its own), and block CRCs
continue across pieces.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from deepfs import isal
from deepfs.checksums import Buffer, block_crcs, block_crcs_of_parts, fragment_digest
from deepfs.layout import Layout, fragment_data_size

_MATRIX = {"isa_l_rs_cauchy": "cauchy", "isa_l_rs_vand": "vandermonde"}


Parts = tuple[memoryview, ...]


@dataclass
class EncodedStripe:
    """The k+m fragments of one stripe and their checksums, ready to send. A data
    fragment of a gathered stripe is the tuple of its pieces."""

    fragments: list[memoryview | Parts]
    block_crcs: list[list[int]]
    digests: list[int]

    @property
    def fragment_size(self) -> int:
        return _length(self.fragments[0])

    def payload(self, slot: int) -> Parts:
        """Fragment ``slot`` as buffers to send one after another."""
        fragment = self.fragments[slot]
        return fragment if isinstance(fragment, tuple) else (fragment,)


def _length(fragment: memoryview | Parts) -> int:
    return sum(len(p) for p in fragment) if isinstance(fragment, tuple) else len(fragment)


def encode_stripe(layout: Layout, data: Buffer,
                  allocate: Callable[[int], bytearray] = bytearray) -> EncodedStripe:
    """Encode one stripe (≤ stripe_size bytes) into k+m fragments with their checksums.

    Data fragments are views of ``data`` unless it needs padding (a short
    stripe), so ``data`` must stay unchanged until the fragments are sent.
    Parity buffers come from ``allocate(size)`` (a pool, say)."""
    view = memoryview(data).cast("B")
    size = fragment_data_size(layout, len(view))
    padded = size * layout.k
    if len(view) != padded:
        copy = bytearray(padded)
        copy[: len(view)] = view
        view = memoryview(copy)
    fragments = [view[i * size : (i + 1) * size] for i in range(layout.k)]
    parity = [memoryview(allocate(size))[:size] for _ in range(layout.m)]
    isal.encode(layout.k, layout.m, _MATRIX[layout.codec], fragments, parity)
    fragments += parity
    crcs = [block_crcs(f) for f in fragments]
    return EncodedStripe(fragments, crcs, [fragment_digest(c) for c in crcs])


def encode_gathered(layout: Layout, pieces: Sequence[memoryview],
                    allocate: Callable[[int], bytearray] = bytearray) -> EncodedStripe:
    """``encode_stripe`` of the concatenation of ``pieces``, none of them copied (see the
    module docstring). A stripe that needs padding is joined and encoded the usual way."""
    total = sum(len(p) for p in pieces)
    size = fragment_data_size(layout, total)
    if size * layout.k != total:
        return encode_stripe(layout, b"".join(pieces), allocate)
    cells = [cut_pieces(pieces, i * size, (i + 1) * size) for i in range(layout.k)]
    starts = [list(itertools.accumulate((len(v) for v in cell[:-1]), initial=0)) for cell in cells]
    bounds = sorted({size, *itertools.chain.from_iterable(starts)})
    parity = [memoryview(allocate(size))[:size] for _ in range(layout.m)]
    for a, b in itertools.pairwise(bounds):  # in each segment every data fragment lies in one piece
        data = []
        for cell, cell_starts in zip(cells, starts, strict=True):
            i = bisect.bisect_right(cell_starts, a) - 1
            data.append(cell[i][a - cell_starts[i] : b - cell_starts[i]])
        isal.encode(layout.k, layout.m, _MATRIX[layout.codec], data, [p[a:b] for p in parity])
    fragments: list[memoryview | Parts] = [cell[0] if len(cell) == 1 else tuple(cell) for cell in cells]
    crcs = [block_crcs_of_parts(cell) for cell in cells] + [block_crcs(p) for p in parity]
    fragments += parity
    return EncodedStripe(fragments, crcs, [fragment_digest(c) for c in crcs])


def cut_pieces(pieces: Sequence[memoryview], start: int, end: int) -> list[memoryview]:
    """The views of ``pieces`` (concatenated) that hold bytes [start, end), empty ones left out."""
    out = []
    offset = 0
    for piece in pieces:
        lo, hi = max(start, offset), min(end, offset + len(piece))
        if lo < hi:
            out.append(piece[lo - offset : hi - offset])
        offset += len(piece)
    return out


def decode_stripe(layout: Layout, length: int, fragments: dict[int, Buffer]) -> bytes:
    """Rebuild a stripe's first ``length`` bytes from any k fragments (index → bytes)."""
    if len(fragments) < layout.k:
        raise ValueError(f"need {layout.k} fragments to decode, have {len(fragments)}")
    sizes = {len(f) for f in fragments.values()}
    if len(sizes) != 1:
        raise ValueError(f"fragments of one stripe must have one size, got {sorted(sizes)}")
    size = sizes.pop()
    data = {i: f for i, f in fragments.items() if i < layout.k}
    missing = [i for i in range(layout.k) if i not in data]
    if missing:
        # Survivors: the data fragments we have, then parity, k in all.
        sources = dict(sorted(fragments.items())[: layout.k])
        rebuilt = {i: bytearray(size) for i in missing}
        isal.reconstruct(layout.k, layout.m, _MATRIX[layout.codec], sources, rebuilt)
        data.update(rebuilt)
    return b"".join(memoryview(data[i]) for i in range(layout.k))[:length]


def rebuild_columns(layout: Layout, sources: dict[int, Buffer], wanted: Sequence[int]) -> dict[int, bytearray]:
    """Fragments ``wanted`` (slot numbers) rebuilt over the columns ``sources`` cover.

    RS works column by column: bytes [a, b) of any k fragments of a stripe
    determine bytes [a, b) of every other, so repair streams a fragment in
    segments (``column_segments``) and never holds more than a segment of
    each survivor. ``sources`` maps k slots to equally long pieces (the same
    columns of each); the result maps each wanted slot to its piece."""
    if len(sources) < layout.k:
        raise ValueError(f"need {layout.k} fragments to rebuild, have {len(sources)}")
    chosen = dict(sorted(sources.items())[: layout.k])
    sizes = {len(piece) for piece in chosen.values()}
    if len(sizes) != 1:
        raise ValueError(f"source pieces must have one length, got {sorted(sizes)}")
    if set(wanted) & set(chosen):
        raise ValueError("a wanted fragment cannot also be a source")
    size = sizes.pop()
    out = {slot: bytearray(size) for slot in wanted}
    if size:
        isal.reconstruct(layout.k, layout.m, _MATRIX[layout.codec], chosen, out)
    return out


def column_segments(fragment_size: int, segment_bytes: int) -> list[tuple[int, int]]:
    """[a, b) column ranges covering a fragment of ``fragment_size`` bytes, each at most
    ``segment_bytes`` (keep it a multiple of the CRC block size, so segments hold whole blocks)."""
    if segment_bytes <= 0:
        raise ValueError("segment_bytes must be positive")
    return [(a, min(a + segment_bytes, fragment_size)) for a in range(0, fragment_size, segment_bytes)] or [(0, 0)]


def xor_into(dest: memoryview, src: Buffer) -> None:
    """``dest`` ^= ``src`` (equal lengths, ``dest`` writable): a change applied to parity, or
    new bytes turned into their change. numpy, imported on first use: only writers that
    patch stripes and the nodes that apply the patches need it."""
    import numpy as np

    if len(dest) != len(src):
        raise ValueError(f"XOR of {len(dest)} and {len(src)} bytes")
    target = np.frombuffer(dest, np.uint8)
    np.bitwise_xor(target, np.frombuffer(src, np.uint8), out=target)


def parity_deltas(layout: Layout, deltas: Sequence[Buffer]) -> list[bytearray]:
    """What the m parity fragments change by when data fragment i changes by ``deltas[i]``
    (XOR, all the same length, zeros where a fragment did not change), at the same offsets:
    Reed-Solomon is linear, so parity(new) = parity(old) XOR parity(new XOR old)."""
    size = len(deltas[0])
    parity = [bytearray(size) for _ in range(layout.m)]
    isal.encode(layout.k, layout.m, _MATRIX[layout.codec], list(deltas), parity)
    return parity
