"""Layout and stripe arithmetic: pure functions, no I/O.

A file is cut into stripes of ``stripe_size`` bytes. Stripe i covers bytes
[i·S, (i+1)·S). A stripe holding L bytes is padded to ``padded_length(L)``
(a multiple of k × ALIGNMENT) and encoded into k data fragments of
``fragment_data_size(L)`` bytes each plus m parity fragments. The codec is
systematic and fragments have no header: data fragment j holds exactly
stripe bytes [j·F, (j+1)·F). So a small read of a stripe is one range read
of one data fragment, with no decode, and fragments are 4 KiB multiples
(storage nodes can write and read them with O_DIRECT).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from deepfs.errors import ConfigError

ALIGNMENT = 4096
"""Every data fragment's size is a multiple of this (page-aligned range reads)."""

CODECS = ("isa_l_rs_cauchy", "isa_l_rs_vand")
"""ISA-L Reed–Solomon with liberasurecode's Cauchy or Vandermonde generator matrix."""
DEFAULT_CODEC = "isa_l_rs_cauchy"
MAX_FRAGMENTS = 32


@dataclass(frozen=True, slots=True)
class Layout:
    """How a file's bytes are spread: k data + m parity fragments per stripe."""

    k: int = 4
    m: int = 2
    stripe_size: int = 4 << 20
    codec: str = DEFAULT_CODEC

    def __post_init__(self) -> None:
        validate_layout(self)

    @property
    def width(self) -> int:
        return self.k + self.m

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Layout:
        try:
            return cls(int(data["k"]), int(data["m"]), int(data["stripe_size"]), str(data.get("codec", DEFAULT_CODEC)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"invalid layout {data!r}: {exc}") from exc


def validate_layout(layout: Layout) -> None:
    """Refuse layouts that cannot work, with the reason."""
    if not 1 <= layout.k <= 16:
        raise ConfigError(f"k must be between 1 and 16, got {layout.k}")
    if not 0 <= layout.m <= 8:
        raise ConfigError(f"m must be between 0 and 8, got {layout.m}")
    if layout.k + layout.m > MAX_FRAGMENTS:
        raise ConfigError(f"k+m must be at most {MAX_FRAGMENTS}")
    if layout.codec not in CODECS:
        raise ConfigError(f"unknown codec {layout.codec!r}; choose one of {', '.join(CODECS)}")
    if layout.codec == "isa_l_rs_vand" and layout.m >= 5:
        # ISA-L's Vandermonde matrix is not MDS for m >= 5: some losses cannot be rebuilt.
        raise ConfigError("isa_l_rs_vand cannot reconstruct reliably for m >= 5; use isa_l_rs_cauchy")
    unit = layout.k * ALIGNMENT
    if layout.stripe_size <= 0 or layout.stripe_size % unit:
        raise ConfigError(f"stripe_size must be a positive multiple of k x {ALIGNMENT} = {unit}, "
                          f"got {layout.stripe_size}")
    if layout.stripe_size > MAX_STRIPE_SIZE:
        raise ConfigError("stripe_size must be at most 64 MiB")


MAX_STRIPE_SIZE = 64 << 20


def with_stripes_of_at_least(layout: Layout, least_bytes: int) -> Layout:
    """``layout`` with its stripe size raised to ``least_bytes`` (rounded down to whole
    units of k x 4 KiB, at most MAX_STRIPE_SIZE); never lowered."""
    unit = layout.k * ALIGNMENT
    stripe = max(layout.stripe_size, min(least_bytes, MAX_STRIPE_SIZE) // unit * unit)
    return Layout(layout.k, layout.m, stripe, layout.codec)


def replicated_form(layout: Layout, default: Layout) -> Layout | None:
    """The layout a small file of ``layout`` is stored in instead (docs/METADATA.md, "Replicated
    small files"): k = 1 with the same m, stripes and codec (m+1 copies, as many losses survived),
    for a layout of the cluster default's scheme (k, m, codec); None for any other layout, and
    for one that is replicated already. Clients ask for it, the metadata server checks it."""
    if layout.k == 1 or (layout.k, layout.m, layout.codec) != (default.k, default.m, default.codec):
        return None
    return Layout(1, layout.m, layout.stripe_size, layout.codec)


def padded_length(layout: Layout, length: int) -> int:
    """Bytes actually encoded for a stripe holding ``length`` bytes (>= 1 unit)."""
    unit = layout.k * ALIGNMENT
    return max(unit, -(-length // unit) * unit)


def fragment_data_size(layout: Layout, length: int) -> int:
    """Data bytes in each fragment of a stripe holding ``length`` bytes."""
    return padded_length(layout, length) // layout.k


@dataclass(frozen=True, slots=True)
class FragmentRange:
    """A piece of a read: bytes [start, start+length) of data fragment ``index``."""

    index: int
    start: int
    length: int
    stripe_offset: int  # where these bytes sit inside the stripe


def stripe_range_to_fragments(fragment_size: int, start: int, length: int) -> list[FragmentRange]:
    """Map stripe bytes [start, start+length) onto data-fragment ranges (no decode)."""
    pieces = []
    pos = start
    end = start + length
    while pos < end:
        index = pos // fragment_size
        inner = pos - index * fragment_size
        take = min(end - pos, fragment_size - inner)
        pieces.append(FragmentRange(index, inner, take, pos))
        pos += take
    return pieces
