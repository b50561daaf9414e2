"""One validator per storage-node op: a request body in, checked fields out.

Bodies are those of docs/PROTOCOL.md, "Storage node ops"; bad ones are
answered EINVAL (the policy at the top of ``deepfs.messages.validate``).
Only PUT_FRAGMENT carries a payload. The client builds the same bodies with
the ``*_body`` functions here, so both ends read one definition; the replies
a client checks are described here too (``GET_DIGEST``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from deepfs.messages import validate as v
from deepfs.messages.fragment_key import FragmentKey

MAX_LIST_FRAGMENTS = 4096
"""Most entries in one LIST_FRAGMENTS reply: ~30 bytes each in msgpack, so a page
stays far below the frame's 1 MiB body limit."""

GET_DIGEST = "digest"
"""GET_FRAGMENT replies carry the fragment's digest as stored on the node (the CRC32C of
its block-CRC table); a reader compares it with the one in the stripe record."""


class PutFragment(NamedTuple):
    key: FragmentKey
    block_size: int | None  # None: the node's configured block size
    crcs: list[int]
    sync: bool


class GetFragment(NamedTuple):
    key: FragmentKey
    offset: int
    length: int
    with_crcs: bool


def put_fragment(body: dict[str, Any]) -> PutFragment:
    return PutFragment(v.fragment_key(body.get("key")), v.u32(body, "block_size", None), v.block_crcs(body),
                       v.flag(body, "sync", True))


def get_fragment(body: dict[str, Any]) -> GetFragment:
    return GetFragment(v.fragment_key(body.get("key")), v.u64(body, "offset", 0), v.u64(body, "length"),
                       v.flag(body, "with_crcs"))


def delete_fragment(body: dict[str, Any]) -> list[FragmentKey]:
    keys = body.get("keys")
    if not isinstance(keys, list):
        v.invalid("field 'keys' must be a list of fragment keys")
    return [v.fragment_key(key) for key in keys]


def stat_fragment(body: dict[str, Any]) -> FragmentKey:
    return v.fragment_key(body.get("key"))


class QuarantineFragment(NamedTuple):
    key: FragmentKey
    digest: int  # what the reader's stripe record says the fragment's digest is


def quarantine_fragment(body: dict[str, Any]) -> QuarantineFragment:
    return QuarantineFragment(v.fragment_key(body.get("key")), v.u32(body, "digest"))


class ListFragments(NamedTuple):
    after: FragmentKey | None  # the last key of the previous page; None: from the start
    limit: int


def list_fragments(body: dict[str, Any]) -> ListFragments:
    after = body.get("after")
    return ListFragments(None if after is None else v.fragment_key(after),
                         v.integer(body, "limit", 1, MAX_LIST_FRAGMENTS, MAX_LIST_FRAGMENTS))


# ------------------------------------------------------- the client's side
def put_fragment_body(key: FragmentKey, block_size: int, crcs: list[int], sync: bool) -> dict[str, Any]:
    return {"key": key.to_wire(), "block_size": block_size, "crcs": crcs, "sync": sync}


def get_fragment_body(key: FragmentKey, offset: int, length: int, with_crcs: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"key": key.to_wire(), "offset": offset, "length": length}
    if with_crcs:
        body["with_crcs"] = True
    return body


def delete_fragment_body(keys: list[FragmentKey]) -> dict[str, Any]:
    return {"keys": [key.to_wire() for key in keys]}


def quarantine_fragment_body(key: FragmentKey, digest: int) -> dict[str, Any]:
    return {"key": key.to_wire(), "digest": digest}


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
