"""Erasure codec: one stripe in, k+m fragments out, and back.

Conventions the rest of DeepFS relies on: a stripe holding L bytes is
zero-padded to ``padded_length`` and cut into k data fragments of
``fragment_data_size`` bytes each — data fragment j *is* stripe bytes
[j·F, (j+1)·F), with no header — so range reads need no decode and data
fragments of a full stripe are sent straight from the caller's memory
(views, no copy). Only the m parity fragments are computed (ISA-L, see
``deepfs.isal``). Every fragment carries block CRC32Cs (``checksums``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from deepfs import isal
from deepfs.checksums import Buffer, block_crcs, fragment_digest
from deepfs.layout import Layout, fragment_data_size

_MATRIX = {"isa_l_rs_cauchy": "cauchy", "isa_l_rs_vand": "vandermonde"}


@dataclass
class EncodedStripe:
    """The k+m fragments of one stripe and their checksums, ready to send."""

    fragments: list[memoryview]
    block_crcs: list[list[int]]
    digests: list[int]

    @property
    def fragment_size(self) -> int:
        return len(self.fragments[0])


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
