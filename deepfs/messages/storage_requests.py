"""One validator per storage-node op: a request body in, checked fields out.

Bodies are those of docs/PROTOCOL.md, "Storage node ops"; bad ones are
answered EINVAL (the policy at the top of ``deepfs.messages.validate``).
Only PUT_FRAGMENT and PATCH_FRAGMENT carry a payload. The client builds the same bodies with
the ``*_body`` functions here, so both ends read one definition; the replies
a client checks are described here too (``GET_DIGEST``).

Fragment ops carry an optional ``"cap"``: the capability the metadata server
signed for the inode (docs/SECURITY.md). The validators hand it over
unchecked (``Any``): whether it is well formed, genuine, for this inode and
unexpired is ``deepfs.auth.check_capability``'s decision (EACCES /
EKEYEXPIRED, never EINVAL), made by the node before any disk work.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

from deepfs.messages import validate as v
from deepfs.messages.constants import U64_MAX
from deepfs.messages.fragment_key import FragmentKey

if TYPE_CHECKING:
    from deepfs.auth import Capability

MAX_LIST_FRAGMENTS = 4096
"""Most entries in one LIST_FRAGMENTS reply: ~30 bytes each in msgpack, so a page
stays far below the frame's 1 MiB body limit."""

MAX_PATCH_RANGES = 8192
"""Most ranges in one PATCH_FRAGMENT: every 4 KiB piece of a 1 MiB fragment's worth of
random writes twice over; a msgpack body of that size stays far below 1 MiB."""

GET_DIGEST = "digest"
"""GET_FRAGMENT replies carry the fragment's digest as stored on the node (the CRC32C of
its block-CRC table); a reader compares it with the one in the stripe record."""


class PutFragment(NamedTuple):
    key: FragmentKey
    block_size: int | None  # None: the node's configured block size
    crcs: list[int]
    sync: bool
    cap: Any = None  # the capability, unchecked; None: none sent


class GetFragment(NamedTuple):
    key: FragmentKey
    offset: int
    length: int
    with_crcs: bool
    cap: Any = None


def put_fragment(body: dict[str, Any]) -> PutFragment:
    return PutFragment(v.fragment_key(body.get("key")), v.u32(body, "block_size", None), v.block_crcs(body),
                       v.flag(body, "sync", True), body.get("cap"))


def get_fragment(body: dict[str, Any]) -> GetFragment:
    offset, length, with_crcs = body.get("offset"), body.get("length"), body.get("with_crcs")
    # Every small read comes here: a valid body (with_crcs None: not sent) passes these tests at
    # once; anything else goes through the validators, which say what is wrong.
    if (type(offset) is int and type(length) is int and 0 <= offset <= U64_MAX and 0 <= length <= U64_MAX
            and (with_crcs is None or type(with_crcs) is bool)):
        return GetFragment(v.fragment_key(body.get("key")), offset, length, with_crcs is True, body.get("cap"))
    return GetFragment(v.fragment_key(body.get("key")), v.u64(body, "offset", 0), v.u64(body, "length"),
                       v.flag(body, "with_crcs"), body.get("cap"))


class PatchFragment(NamedTuple):
    """A new version of a fragment made on the node from the one it holds (``base_version``)
    with ``ranges`` of it replaced by the payload, or, with ``xor``, XORed with it: a small
    rewrite of a stripe sends the changed bytes and parity deltas instead of whole fragments."""

    key: FragmentKey  # the new version's key
    base_version: int  # the version of the same stripe and slot it starts from
    ranges: list[tuple[int, int]]  # (offset, length) in the fragment, in payload order
    xor: bool
    payload_crc: int  # CRC32C of the payload: the bytes that change arrive unharmed
    block_size: int | None
    sync: bool
    cap: Any = None


def patch_fragment(body: dict[str, Any]) -> PatchFragment:
    ranges = body.get("ranges")
    if not isinstance(ranges, list) or len(ranges) > MAX_PATCH_RANGES or not all(
            isinstance(r, list) and len(r) == 2 and all(type(x) is int and 0 <= x <= U64_MAX for x in r)
            for r in ranges):
        v.invalid(f"field 'ranges' must be a list of at most {MAX_PATCH_RANGES} [offset, length] pairs of u64")
    return PatchFragment(v.fragment_key(body.get("key")), v.u64(body, "base_version"),
                         [(r[0], r[1]) for r in ranges], v.flag(body, "xor"), v.u32(body, "payload_crc"),
                         v.u32(body, "block_size", None), v.flag(body, "sync", True), body.get("cap"))


class DeleteFragment(NamedTuple):
    keys: list[FragmentKey]
    cap: Any = None


def delete_fragment(body: dict[str, Any]) -> DeleteFragment:
    keys = body.get("keys")
    if not isinstance(keys, list):
        v.invalid("field 'keys' must be a list of fragment keys")
    return DeleteFragment([v.fragment_key(key) for key in keys], body.get("cap"))


class StatFragment(NamedTuple):
    key: FragmentKey
    cap: Any = None


def stat_fragment(body: dict[str, Any]) -> StatFragment:
    return StatFragment(v.fragment_key(body.get("key")), body.get("cap"))


class QuarantineFragment(NamedTuple):
    key: FragmentKey
    digest: int  # what the reader's stripe record says the fragment's digest is
    cap: Any = None


def quarantine_fragment(body: dict[str, Any]) -> QuarantineFragment:
    return QuarantineFragment(v.fragment_key(body.get("key")), v.u32(body, "digest"), body.get("cap"))


class ListFragments(NamedTuple):
    after: FragmentKey | None  # the last key of the previous page; None: from the start
    limit: int


def list_fragments(body: dict[str, Any]) -> ListFragments:
    after = body.get("after")
    return ListFragments(None if after is None else v.fragment_key(after),
                         v.integer(body, "limit", 1, MAX_LIST_FRAGMENTS, MAX_LIST_FRAGMENTS))


# ------------------------------------------------------- the client's side
# ``cap``: the capability to present; None (the metadata server's own requests,
# or a cluster without authentication) leaves it out of the body.
def _with_cap(body: dict[str, Any], cap: Capability | None) -> dict[str, Any]:
    if cap is not None:
        body["cap"] = cap
    return body


def put_fragment_body(key: FragmentKey, block_size: int, crcs: list[int], sync: bool,
                      cap: Capability | None = None) -> dict[str, Any]:
    return _with_cap({"key": key.to_wire(), "block_size": block_size, "crcs": crcs, "sync": sync}, cap)


def patch_fragment_body(key: FragmentKey, base_version: int, ranges: list[tuple[int, int]], xor: bool,
                        payload_crc: int, block_size: int, sync: bool, cap: Capability | None = None) -> dict[str, Any]:
    return _with_cap({"key": key.to_wire(), "base_version": base_version, "ranges": [list(r) for r in ranges],
                      "xor": xor, "payload_crc": payload_crc, "block_size": block_size, "sync": sync}, cap)


def get_fragment_body(key: FragmentKey, offset: int, length: int, with_crcs: bool = False,
                      cap: Capability | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"key": key.to_wire(), "offset": offset, "length": length}
    if with_crcs:
        body["with_crcs"] = True
    return _with_cap(body, cap)


def delete_fragment_body(keys: list[FragmentKey], cap: Capability | None = None) -> dict[str, Any]:
    return _with_cap({"keys": [key.to_wire() for key in keys]}, cap)


def stat_fragment_body(key: FragmentKey, cap: Capability | None = None) -> dict[str, Any]:
    return _with_cap({"key": key.to_wire()}, cap)


def quarantine_fragment_body(key: FragmentKey, digest: int, cap: Capability | None = None) -> dict[str, Any]:
    return _with_cap({"key": key.to_wire(), "digest": digest}, cap)


def list_fragments_body(after: FragmentKey | None, limit: int = MAX_LIST_FRAGMENTS) -> dict[str, Any]:
    return {"after": None if after is None else after.to_wire(), "limit": limit}


class FragmentListing(NamedTuple):
    """One LIST_FRAGMENTS reply, read by the caller: each fragment with its file's age
    by the node's own clock (so clocks of different hosts need not agree)."""

    fragments: list[tuple[FragmentKey, float]]  # (key, age in seconds)
    done: bool  # no fragments after these


def fragment_listing(reply: Any) -> FragmentListing:
    """Check a LIST_FRAGMENTS reply (the node is a peer: ValueError for a malformed one)."""
    try:
        now_ns, done, entries = reply["now_ns"], reply["done"], reply["fragments"]
        if type(now_ns) is not int or type(done) is not bool or not isinstance(entries, list):
            raise TypeError
        fragments = [(FragmentKey.of(entry[:4]), (now_ns - entry[4]) / 1e9) for entry in entries
                     if type(entry[4]) is int]
    except (KeyError, TypeError, IndexError) as exc:
        raise ValueError(f"malformed LIST_FRAGMENTS reply: {exc!r:.80}") from None
    if len(fragments) != len(entries):
        raise ValueError("malformed LIST_FRAGMENTS reply: an mtime is not an integer")
    return FragmentListing(fragments, done)
