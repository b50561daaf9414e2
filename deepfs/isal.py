"""ISA-L (Intel's storage acceleration library) called directly through ctypes.

Why not through pyeclib's ``encode``/``decode``: pyeclib copies every stripe
twice (into liberasurecode's aligned fragments, then into new ``bytes``),
puts an 80-byte header in front of each fragment and holds the GIL while it
works. Called directly, ISA-L reads the data fragments where they lie (a
tensor's memory, a stripe buffer), writes only the m parity fragments, and
ctypes releases the GIL for the call, so encoding runs beside the event loop.

The library is the one pyeclib's wheel bundles (the code pyeclib itself
runs), else the system's ``libisal``. The matrices are the ones
liberasurecode's ``isa_l_rs_cauchy`` and ``isa_l_rs_vand`` backends use, so
the parity bytes are identical to pyeclib's (tests compare them).

Mental model of the maths: a (k+m)×k generator matrix whose first k rows are
the identity (systematic code). Encoding multiplies the data by the last m
rows. Decoding picks the rows of k surviving fragments, inverts that k×k
matrix, and multiplies the survivors by the rows of the inverse that give
the wanted fragments.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import importlib.metadata
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

Buffer = bytes | bytearray | memoryview

MATRICES = ("cauchy", "vandermonde")


def _find_library() -> str:
    try:
        files = importlib.metadata.files("pyeclib") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for entry in files:
        if entry.name.startswith("libisal") and ".so" in entry.name:
            return str(Path(entry.locate()).resolve())
    system = ctypes.util.find_library("isal")
    if system:
        return system
    raise ImportError("ISA-L not found: install pyeclib (its wheel bundles libisal) or the libisal2 package")


def _load() -> ctypes.CDLL:
    lib = ctypes.CDLL(_find_library())  # CDLL (not PyDLL): every call releases the GIL
    u8p = ctypes.c_void_p
    lib.gf_gen_cauchy1_matrix.argtypes = [u8p, ctypes.c_int, ctypes.c_int]
    lib.gf_gen_rs_matrix.argtypes = [u8p, ctypes.c_int, ctypes.c_int]
    lib.gf_invert_matrix.argtypes = [u8p, u8p, ctypes.c_int]
    lib.gf_invert_matrix.restype = ctypes.c_int
    lib.gf_mul.argtypes = [ctypes.c_ubyte, ctypes.c_ubyte]
    lib.gf_mul.restype = ctypes.c_ubyte
    lib.ec_init_tables.argtypes = [ctypes.c_int, ctypes.c_int, u8p, u8p]
    lib.ec_encode_data.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, u8p, u8p, u8p]
    lib.crc32_gzip_refl.argtypes = [ctypes.c_uint32, u8p, ctypes.c_uint64]
    lib.crc32_gzip_refl.restype = ctypes.c_uint32
    return lib


_lib = _load()


class _PyBuffer(ctypes.Structure):
    """CPython's Py_buffer: how to get the address of any buffer, read-only ones included."""

    _fields_ = [
        ("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p),
    ]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_PYBUF_SIMPLE = 0
_PYBUF_WRITABLE = 1


@contextmanager
def _addresses(buffers: Sequence[Buffer], writable: bool = False) -> Iterator[list[int]]:
    """Addresses of contiguous buffers, held (not movable, not resizable) inside the block."""
    views: list[_PyBuffer] = []
    try:
        for buf in buffers:
            view = _PyBuffer()
            flags = _PYBUF_WRITABLE if writable else _PYBUF_SIMPLE
            if _get_buffer(buf, ctypes.byref(view), flags) != 0:  # raises the Python error set by CPython
                raise BufferError("buffer is not contiguous")
            views.append(view)
        yield [v.buf or 0 for v in views]
    finally:
        for view in views:
            _release_buffer(ctypes.byref(view))


# ------------------------------------------------------------------ matrices
@functools.lru_cache(maxsize=64)
def generator_matrix(k: int, m: int, matrix: str) -> bytes:
    """(k+m)×k generator matrix, row-major; the first k rows are the identity."""
    if matrix not in MATRICES:
        raise ValueError(f"unknown matrix {matrix!r}; choose one of {', '.join(MATRICES)}")
    out = ctypes.create_string_buffer((k + m) * k)
    generate = _lib.gf_gen_cauchy1_matrix if matrix == "cauchy" else _lib.gf_gen_rs_matrix
    generate(ctypes.addressof(out), k + m, k)
    return out.raw


def _tables(k: int, rows: bytes) -> ctypes.Array:
    """ISA-L's expanded multiplication tables for ``rows`` (len(rows)/k rows of k coefficients)."""
    tables = ctypes.create_string_buffer(32 * len(rows))
    coefficients = ctypes.create_string_buffer(rows, len(rows))
    _lib.ec_init_tables(k, len(rows) // k, ctypes.addressof(coefficients), ctypes.addressof(tables))
    return tables


@functools.lru_cache(maxsize=64)
def _encode_tables(k: int, m: int, matrix: str) -> ctypes.Array:
    return _tables(k, generator_matrix(k, m, matrix)[k * k :])


@functools.lru_cache(maxsize=256)
def _decode_tables(k: int, m: int, matrix: str, sources: tuple[int, ...], wanted: tuple[int, ...]) -> ctypes.Array:
    """Tables that turn the fragments ``sources`` (k indices) into the fragments ``wanted``."""
    full = generator_matrix(k, m, matrix)
    chosen = ctypes.create_string_buffer(b"".join(full[r * k : (r + 1) * k] for r in sources), k * k)
    inverse = ctypes.create_string_buffer(k * k)
    if _lib.gf_invert_matrix(ctypes.addressof(chosen), ctypes.addressof(inverse), k) != 0:
        raise ValueError(f"fragments {sources} cannot be decoded with the {matrix} matrix {k}+{m}")
    inv = inverse.raw
    rows = bytearray()
    for index in wanted:
        if index < k:  # a data fragment: its row of the inverse
            rows += inv[index * k : (index + 1) * k]
        else:  # a parity fragment: its generator row times the inverse
            generator_row = full[index * k : (index + 1) * k]
            for col in range(k):
                value = 0
                for j in range(k):
                    value ^= _lib.gf_mul(generator_row[j], inv[j * k + col])
                rows.append(value)
    return _tables(k, bytes(rows))


# ------------------------------------------------------------------ coding
def _run(length: int, k: int, tables: ctypes.Array, sources: Sequence[Buffer], outputs: Sequence[Buffer]) -> None:
    if any(len(b) < length for b in (*sources, *outputs)):
        raise ValueError(f"every fragment must hold at least {length} bytes")
    if not outputs:
        return
    with _addresses(sources) as src, _addresses(outputs, writable=True) as out:
        src_array = (ctypes.c_void_p * len(src))(*src)
        out_array = (ctypes.c_void_p * len(out))(*out)
        _lib.ec_encode_data(length, k, len(out), ctypes.addressof(tables),
                            ctypes.addressof(src_array), ctypes.addressof(out_array))


def encode(k: int, m: int, matrix: str, data: Sequence[Buffer], parity: Sequence[Buffer]) -> None:
    """Compute the m parity fragments from the k data fragments (all of one length) into ``parity``."""
    if len(data) != k or len(parity) != m:
        raise ValueError(f"encode {k}+{m} needs {k} data and {m} parity buffers, got {len(data)} and {len(parity)}")
    _run(len(data[0]) if data else 0, k, _encode_tables(k, m, matrix), data, parity)


def reconstruct(k: int, m: int, matrix: str, sources: dict[int, Buffer], wanted: dict[int, Buffer]) -> None:
    """Rebuild the fragments in ``wanted`` (index → output buffer) from exactly k ``sources`` (index → bytes)."""
    if len(sources) != k:
        raise ValueError(f"reconstruct needs exactly {k} source fragments, got {len(sources)}")
    order = tuple(sorted(sources))
    targets = tuple(sorted(wanted))
    if any(not 0 <= i < k + m for i in (*order, *targets)):
        raise ValueError(f"fragment indices must be in [0, {k + m})")
    tables = _decode_tables(k, m, matrix, order, targets)
    _run(len(sources[order[0]]), k, tables, [sources[i] for i in order], [wanted[i] for i in targets])


def crc32(data: Buffer, value: int = 0) -> int:
    """zlib's CRC-32 (the ZIP format's), with ISA-L's carry-less-multiply code (~3× zlib here)."""
    with _addresses([data]) as (address,):
        return _lib.crc32_gzip_refl(value, address, len(data))
