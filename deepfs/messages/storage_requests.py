"""One validator per storage-node op: a request body in, checked fields out.

Bodies are those of docs/PROTOCOL.md, "Storage node ops"; bad ones are
answered EINVAL (the policy at the top of ``deepfs.messages.validate``).
Only PUT_FRAGMENT carries a payload. The client builds the same bodies with
the ``*_body`` functions here, so both ends read one definition.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from deepfs.messages import validate as v
from deepfs.messages.fragment_key import FragmentKey


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
