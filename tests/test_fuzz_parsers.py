"""Fuzzing of every parser that reads bytes a peer (or a disk) wrote.

The rule each target checks: garbage in gives the parser's documented error,
never another exception, never a hang, never an allocation past its limits.

- frame header and body (``deepfs.frames``): ``ProtocolError``;
- ``deepfs.rpc.FrameBuffer`` fed arbitrary bytes in arbitrary cuts: frames
  within its limits or ``ProtocolError``; fed valid frames cut anywhere, exactly
  the frames ``encode_frame`` made (a differential check);
- every per-op validator of ``deepfs.messages``: a result or ``OSError(EINVAL)``;
- a LIST_FRAGMENTS reply (the client side of a storage node): ``ValueError``;
- the on-disk fragment header and CRC table (``storage_node.fragment_format``):
  ``CorruptFragment``; file names in a fragment folder: a key or None;
- the authentication parsers (``deepfs.auth``): ``ServerHandshake.hello`` /
  ``finish``, ``Identity.from_wire``, ``open_ticket``, ``check_capability``:
  ``AuthError`` / ``OSError`` only.

Each target is a function of one ``bytes`` input in ``TARGETS``; ``make test``
runs them under hypothesis with a fixed seed and a few hundred examples each
(seconds), ``make fuzz`` with ``DEEPFS_FUZZ_EXAMPLES`` examples and random seeds,
then coverage-guided under atheris (``python tests/test_fuzz_parsers.py TARGET``).
A new parser is fuzzed by adding one function to ``TARGETS``; both tools pick it up.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import os
import random
import struct
import sys
from collections.abc import Callable
from typing import Any

import crc32c
import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

if __name__ == "__main__":  # atheris (make fuzz): coverage of the parsers' code only, instrumented as imported
    import atheris

    _parsers_imported = atheris.instrument_imports(include=["deepfs", "storage_node", "msgpack"])
else:
    _parsers_imported = contextlib.nullcontext()
with _parsers_imported:
    from deepfs import auth, frames
    from deepfs.frames import HEADER_SIZE, ProtocolError
    from deepfs.messages import metadata_requests, storage_requests
    from deepfs.messages import validate as v
    from deepfs.rpc import FrameBuffer
    from storage_node import fragment_format as fmt

# make test: deterministic and short. make fuzz: DEEPFS_FUZZ_EXAMPLES examples per property, random seeds.
_EXAMPLES_ENV = os.environ.get("DEEPFS_FUZZ_EXAMPLES")
FUZZ = settings(
    max_examples=int(_EXAMPLES_ENV) if _EXAMPLES_ENV else 300,
    derandomize=not _EXAMPLES_ENV,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
# make fuzz: as long as its example count takes, still bounded
pytestmark = [pytest.mark.unit, pytest.mark.timeout(3600 if _EXAMPLES_ENV else 60)]


# ------------------------------------------------------------------ frames
def fuzz_frame(data: bytes) -> None:
    """A header and a body straight off the wire: a frame or ProtocolError."""
    head, body = data[:HEADER_SIZE], data[HEADER_SIZE:]
    try:
        header = frames.parse_header(head)
    except ProtocolError:
        return
    assert header.body_len <= frames.DEFAULT_MAX_BODY and header.payload_len <= frames.DEFAULT_MAX_PAYLOAD
    try:
        frames.decode_body(head, header, body)
    except ProtocolError:
        pass


# FrameBuffer limits small enough that random input reaches every path (bodies larger than the buffer).
_BUF_SIZE, _MAX_BODY, _MAX_PAYLOAD = 64, 200, 1000


def _pump(stream: bytes, rng: random.Random,
          payload_limits: dict[int, int] | None = None) -> list[tuple[frames.FrameHeader, Any, bytes]]:
    """What a connection does with ``stream``, received in random cuts: (header, body, payload) per frame.

    Raises ProtocolError where the connection would be closed."""
    buf = FrameBuffer(max_body=_MAX_BODY, max_payload=_MAX_PAYLOAD, size=_BUF_SIZE, payload_limits=payload_limits)
    pos, out = 0, []
    while True:
        frame = buf.next_frame()
        if frame is None:
            if pos == len(stream):
                buf.closed()
                return out
            space = buf.receive_space()
            assert 0 < len(space) <= max(_BUF_SIZE, _MAX_BODY), len(space)  # never empty, never past its limits
            count = min(len(space), len(stream) - pos, rng.randint(1, 80))
            space[:count] = stream[pos : pos + count]
            buf.received(count)
            pos += count
            continue
        header, body = frame
        assert header.body_len <= _MAX_BODY and header.payload_len <= _MAX_PAYLOAD
        assert payload_limits is None or header.payload_len <= payload_limits.get(header.op, 0)
        payload = bytearray(header.payload_len)
        got = buf.take_payload(memoryview(payload))
        rest = min(header.payload_len - got, len(stream) - pos)  # the rest comes straight from the connection
        payload[got : got + rest] = stream[pos : pos + rest]
        pos += rest
        out.append((header, body, bytes(payload[: got + rest])))
        if got + rest < header.payload_len:
            return out  # closed inside a payload: the caller of the buffer reports that


def fuzz_frame_buffer(data: bytes) -> None:
    """Arbitrary bytes in arbitrary cuts: frames or ProtocolError (``_pump`` checks the limits);
    with per-op payload limits (as a server has them) when the first byte is odd."""
    limits = {int(frames.Op.PUT_FRAGMENT): 500, int(frames.Op.PING): 0} if data[:1] and data[0] & 1 else None
    try:
        _pump(data[4:], random.Random(data[:4]), limits)
    except ProtocolError:
        pass


# --------------------------------------------------------------- messages
def _validators(module: Any) -> dict[str, Callable[[dict[str, Any]], Any]]:
    """Every per-op validator of ``module``: its public one-argument functions of a body."""
    return {
        name: func for name, func in vars(module).items()
        if inspect.isfunction(func) and func.__module__ == module.__name__ and not name.startswith("_")
        and not name.endswith("_body") and name != "fragment_listing"
    }


VALIDATORS = {**_validators(storage_requests), **_validators(metadata_requests)}


def _decoded(data: bytes) -> tuple[bool, Any]:
    """``data`` as decode_body would unpack it; (False, None) where the frame layer already refuses it."""
    try:
        return True, msgpack.unpackb(data, raw=False, strict_map_key=False) if data else None
    except Exception:  # noqa: BLE001 - decode_body turns every msgpack error into ProtocolError
        return False, None


def check_validators(body: Any) -> None:
    """Each validator, as the servers call it (``body_map`` first): a result or EINVAL."""
    for name, validator in [("body_map", v.body_map), *VALIDATORS.items()]:
        try:
            validator(v.body_map(body) if name != "body_map" else body)
        except OSError as exc:
            assert exc.errno == errno.EINVAL, (name, exc)


def fuzz_validators(data: bytes) -> None:
    ok, body = _decoded(data)
    if ok:
        check_validators(body)


def check_fragment_listing(reply: Any) -> None:
    try:
        storage_requests.fragment_listing(reply)
    except ValueError:
        pass


def fuzz_fragment_listing(data: bytes) -> None:
    ok, reply = _decoded(data)
    if ok:
        check_fragment_listing(reply)


# ---------------------------------------------------------- on-disk format
def check_fragment_prefix(head: bytes, rest: bytes) -> None:
    """A header from disk, then its CRC table and first block as the fragment store reads them."""
    try:
        header = fmt.unpack_header(head)
    except fmt.CorruptFragment:
        return
    table_end = fmt.crc_table_offset(header.n_blocks)
    if table_end > 1 << 16:
        return  # a valid header of a big fragment: the table the store would read is not in this input
    prefix = head + rest[:table_end].ljust(table_end - HEADER_SIZE, b"\0")
    fmt.table_digest(prefix, header.n_blocks)
    if header.n_blocks:
        crcs = fmt.unpack_crcs(prefix, 1, fmt.crc_table_offset(0))
        block = rest[table_end - HEADER_SIZE :][: header.block_size]
        try:
            fmt.verify_blocks(memoryview(block), crcs, header.block_size, 0)
        except fmt.CorruptFragment:
            pass


def fuzz_fragment_header(data: bytes) -> None:
    """Raw bytes, and the same bytes with a valid header CRC (so the field checks are reached)."""
    head, rest = data[: fmt.HEADER_SIZE], data[fmt.HEADER_SIZE :]
    check_fragment_prefix(head, rest)
    if len(head) == fmt.HEADER_SIZE:
        covered = head[:-4]
        check_fragment_prefix(covered + struct.pack("<I", crc32c.crc32c(covered)), rest)


def fuzz_fragment_name(data: bytes) -> None:
    name = data.decode("utf-8", "replace")
    key = fmt.key_of_name(name)
    assert key is None or fmt.file_name(key) == name  # one name per key, and back
    ino = int.from_bytes(data[:8], "little")
    old = fmt.key_in_inode_folder(ino, data[8:].decode("utf-8", "replace"))
    assert old is None or old.ino == ino


# ------------------------------------------------------- authentication
_SECRET = bytes(range(32))
_SERVICE = auth.derive_service_secret(_SECRET)
_NOW = 1_700_000_000.0


def check_handshake(hello: Any, proof: Any) -> None:
    """A server's side of the handshake on a peer's two bodies: a reply and an identity, or AuthError."""
    for verifier in (auth.KeyVerifier(_SECRET), auth.TicketVerifier(_SERVICE)):
        server = auth.ServerHandshake(verifier, _NOW)
        try:
            reply = server.hello(hello)
        except auth.AuthError:
            continue
        assert set(reply) == {"nonce", "proof"}
        with contextlib.suppress(auth.AuthError):
            server.finish(proof)


def check_identity_and_ticket(value: Any, raw: bytes) -> None:
    with contextlib.suppress(auth.AuthError):
        identity = auth.Identity.from_wire(value)
        assert auth.Identity.from_wire(identity.to_wire()) == identity
    with contextlib.suppress(auth.AuthError):
        auth.open_ticket(_SERVICE, raw, _NOW)
    with contextlib.suppress(auth.AuthError):
        auth.NodeTicket.from_wire(value)


def check_capability(cap: Any) -> None:
    try:
        auth.check_capability(_SERVICE, cap, 1, auth.READ, 0, _NOW, 1.0)
    except OSError as exc:
        assert exc.errno in (errno.EACCES, errno.EKEYEXPIRED), exc


def fuzz_auth(data: bytes) -> None:
    """Handshake bodies, identities, tickets and capabilities out of peer bytes."""
    ok, value = _decoded(data)
    check_identity_and_ticket(value if ok else None, data)
    if ok:
        check_handshake(value, value)
        check_capability(value)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "auth": fuzz_auth,
    "frame": fuzz_frame,
    "frame_buffer": fuzz_frame_buffer,
    "validators": fuzz_validators,
    "fragment_listing": fuzz_fragment_listing,
    "fragment_header": fuzz_fragment_header,
    "fragment_name": fuzz_fragment_name,
}


# ------------------------------------------------- hypothesis: make test
@pytest.mark.parametrize("name", sorted(TARGETS))
@FUZZ
@given(data=st.binary(max_size=2048))
def test_target_on_random_bytes(name: str, data: bytes) -> None:
    TARGETS[name](data)


def _valid_header(op: int, flags: int, body_len: int, payload_len: int) -> bytes:
    head = frames.HEADER.pack(frames.MAGIC, frames.PROTOCOL_VERSION, op, flags, 7, body_len, payload_len, 0)
    return head[:-4] + struct.pack("!I", crc32c.crc32c(head[:-4]))


@FUZZ
@given(op=st.integers(0, 255), flags=st.integers(0, 3), body_len=st.integers(0, 300),
       payload_len=st.integers(0, 1200), tail=st.binary(max_size=600), seed=st.binary(min_size=4, max_size=4))
def test_frame_buffer_on_near_valid_headers(op: int, flags: int, body_len: int, payload_len: int, tail: bytes,
                                            seed: bytes) -> None:
    """Headers that pass the magic/version checks, so the body, big-body and payload paths are fuzzed."""
    head = _valid_header(op, flags, body_len, payload_len)
    fuzz_frame(head + tail)
    fuzz_frame_buffer(seed + head + tail)


_frame_specs = st.lists(
    st.tuples(st.integers(0, 255), st.integers(0, 2**64 - 1), st.integers(0, 3),
              st.binary(max_size=_MAX_BODY - 10), st.binary(max_size=_MAX_PAYLOAD)),
    max_size=8)


@FUZZ
@given(specs=_frame_specs, seed=st.integers(0, 2**32))
def test_frame_buffer_yields_exactly_the_encoded_frames(specs: list[tuple[int, int, int, bytes, bytes]],
                                                        seed: int) -> None:
    """Differential: valid frames cut at random points come out as encode_frame made them."""
    stream = b"".join(frames.encode_frame(op, rid, body, len(payload), flags) + payload
                      for op, rid, flags, body, payload in specs)
    got = _pump(stream, random.Random(seed))
    assert [(h.op, h.request_id, h.flags, body, payload) for h, body, payload in got] == specs


_scalars = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
            | st.text(max_size=20) | st.binary(max_size=20)
            | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)))
_msgpack_values = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=6),
    max_leaves=30)
_FIELD_NAMES = sorted({
    "key", "keys", "block_size", "crcs", "sync", "offset", "length", "with_crcs", "digest", "after", "limit",
    "ino", "session", "released", "holds", "parent", "name", "path", "mode", "exclusive", "ctx", "uid", "gid",
    "layout", "k", "m", "stripe_size", "codec", "min_stripe_size", "rdev", "target", "new_parent", "new_name",
    "keep_open", "flags", "size", "atime_ns", "mtime_ns", "atime_now", "mtime_now", "value", "first", "count",
    "stripes", "index", "version", "fragment_size", "placement", "truncate",
})
_u64 = st.integers(0, 2**64 - 1) | st.sampled_from([0, 1, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1, -1])
_u64_list = st.lists(_u64, max_size=6)
_fragment_keys = st.tuples(_u64, _u64, _u64, st.integers(0, 40)).map(list) | st.lists(_u64, max_size=5)
_stripe = st.fixed_dictionaries({name: _u64 for name in ("index", "version", "length", "fragment_size")}
                                | {"placement": _u64_list, "crcs": _u64_list})
_BOOL_FIELDS = ("sync", "with_crcs", "exclusive", "keep_open", "atime_now", "mtime_now", "truncate")
_PLAUSIBLE = {
    **{name: st.booleans() for name in _BOOL_FIELDS},
    **{name: st.binary(max_size=12) | st.text(max_size=12) for name in ("name", "path", "target", "value", "new_name")},
    **{name: _u64_list for name in ("holds", "released")},
    "crcs": st.lists(st.integers(0, 2**32 - 1), max_size=6) | _u64_list,
    "key": _fragment_keys, "after": _fragment_keys, "keys": st.lists(_fragment_keys, max_size=4),
    "ctx": st.fixed_dictionaries({}, optional={"uid": _u64, "gid": _u64}),
    "layout": st.fixed_dictionaries({"k": _u64, "m": _u64, "stripe_size": _u64}, optional={"codec": _scalars}),
    "stripes": st.lists(_stripe, max_size=3),
}
# A body with every field any validator reads, most of them of the right type: each validator gets past
# its first field, so every check (ranges, list contents, nested maps) is reached, not only the first one.
_plausible_bodies = st.fixed_dictionaries({
    name: _PLAUSIBLE.get(name, _u64) | _PLAUSIBLE.get(name, _u64) | _PLAUSIBLE.get(name, _u64) | _msgpack_values
    for name in _FIELD_NAMES
})
_field_values = (_msgpack_values | st.lists(st.integers(-1, 2**64 - 1), max_size=6)
                 | st.dictionaries(st.sampled_from(_FIELD_NAMES), _msgpack_values, max_size=8))
_bodies = st.dictionaries(st.sampled_from(_FIELD_NAMES) | st.text(max_size=4), _field_values, max_size=12)


def _over_the_wire(value: Any) -> tuple[bool, Any]:
    """``value`` as a peer's msgpack encoder and our decoder leave it (False: not encodable)."""
    try:
        packed = msgpack.packb(value, use_bin_type=True)
    except (ValueError, TypeError, OverflowError, UnicodeEncodeError):
        return False, None
    return _decoded(packed)


@FUZZ
@given(body=_bodies | _msgpack_values)
def test_validators_on_msgpack_bodies(body: Any) -> None:
    ok, decoded = _over_the_wire(body)
    if ok:
        check_validators(decoded)


@settings(FUZZ, max_examples=FUZZ.max_examples if _EXAMPLES_ENV else 150)  # 50 fields a body: slower to draw
@given(body=_plausible_bodies)
def test_validators_on_plausible_bodies(body: dict[str, Any]) -> None:
    ok, decoded = _over_the_wire(body)
    if ok:
        check_validators(decoded)


@FUZZ
@given(reply=st.dictionaries(st.sampled_from(["now_ns", "done", "fragments"]),
                             _msgpack_values | st.lists(st.lists(st.integers(-1, 2**64 - 1) | _scalars,
                                                                 max_size=6), max_size=4)) | _msgpack_values)
def test_fragment_listing_on_msgpack_replies(reply: Any) -> None:
    ok, decoded = _over_the_wire(reply)
    if ok:
        check_fragment_listing(decoded)


@FUZZ
@given(data_len=st.integers(0, 2**64 - 1) | st.integers(0, 1 << 16), block_size=st.integers(0, 2**32 - 1)
       | st.sampled_from([512, 4096, 65536]), n_blocks=st.integers(0, 2**32 - 1) | st.integers(0, 200),
       data_offset=st.integers(0, 2**32 - 1) | st.just(4096), rest=st.binary(max_size=5000),
       fields_agree=st.booleans())
def test_fragment_header_on_crc_valid_headers(data_len: int, block_size: int, n_blocks: int, data_offset: int,
                                              rest: bytes, fields_agree: bool) -> None:
    if fields_agree and fmt.MIN_BLOCK_SIZE <= block_size <= fmt.MAX_BLOCK_SIZE:
        expected = fmt.layout(data_len, block_size)
        n_blocks, data_offset = expected.n_blocks, expected.data_offset
    raw = struct.pack("<4sHHQIII", fmt.MAGIC, fmt.FORMAT_VERSION, 0, data_len, block_size,
                      n_blocks % 2**32, data_offset % 2**32)
    check_fragment_prefix(raw + struct.pack("<I", crc32c.crc32c(raw)), rest)


_identity_fields = st.tuples(
    st.text(max_size=130) | _msgpack_values,
    st.sampled_from(sorted(auth.ROLES)) | st.text(max_size=6) | _msgpack_values,
    st.integers(-1, 2**32) | _msgpack_values, st.integers(-1, 2**32),
    st.lists(st.integers(-1, 2**32), max_size=34) | _msgpack_values,
    st.sampled_from(["/", "/a", "/a/", "//a", "/a/../b", "a", "/a\0b", ""]) | st.text(max_size=8),
    st.booleans() | _msgpack_values, st.booleans() | st.integers(0, 1))
_wire_identity = _identity_fields.map(list) | _msgpack_values
_plausible_hellos = st.fixed_dictionaries(
    {"v": st.sampled_from([1, 2, True, "1"]), "nonce": st.binary(min_size=15, max_size=17) | _msgpack_values},
    optional={"identity": _wire_identity, "ticket": st.binary(max_size=64) | _msgpack_values})
_plausible_caps = st.tuples(st.integers(-1, 3) | _msgpack_values,
                            st.sampled_from(["r", "w", "rw", "x", ""]) | _msgpack_values, st.integers(-1, 3),
                            st.floats() | st.integers(), st.binary(min_size=15, max_size=17)).map(list)
_plausible_caps = _plausible_caps | _msgpack_values


@FUZZ
@given(hello=_plausible_hellos | _msgpack_values,
       proof=st.fixed_dictionaries({"proof": st.binary(min_size=31, max_size=33)}) | _msgpack_values)
def test_handshake_on_plausible_bodies(hello: Any, proof: Any) -> None:
    ok, decoded = _over_the_wire(hello)
    if ok:
        check_handshake(decoded, proof)


@FUZZ
@given(identity=_wire_identity, cap=_plausible_caps)
def test_identities_tickets_and_capabilities_on_plausible_values(identity: Any, cap: Any) -> None:
    ok, decoded = _over_the_wire(identity)
    if ok:
        ticket = msgpack.packb([1, decoded, _NOW + 10, b"12345678"], use_bin_type=True)
        check_identity_and_ticket(decoded, ticket)
    check_capability(cap)


def test_every_validator_is_fuzzed() -> None:
    """The validator list is found by introspection: make sure it found them (and no helper by mistake)."""
    assert {"put_fragment", "get_fragment", "delete_fragment", "stat_fragment", "quarantine_fragment",
            "list_fragments", "create", "commit", "set_layout", "setattr", "rename"} <= set(VALIDATORS)
    for name, func in VALIDATORS.items():
        assert len(inspect.signature(func).parameters) == 1, name


# ----------------------------------------------------- atheris: make fuzz
def _atheris_main(argv: list[str]) -> None:
    """``python tests/test_fuzz_parsers.py TARGET [libFuzzer options]``; ``--list`` names the targets."""
    if argv[1:2] == ["--list"]:
        print(" ".join(TARGETS))
        return
    target = TARGETS[argv[1]]
    atheris.Setup([argv[0], *argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    _atheris_main(sys.argv)
