"""deepfs.messages without I/O: fragment keys, stripe records, the per-op validators
and the one bad-input policy (EINVAL for any bad body, on both servers)."""

from __future__ import annotations

import errno
from typing import Any

import pytest

from deepfs.messages import (
    MISSING_NODE,
    STRIPE_FIELDS,
    Ctx,
    FragmentKey,
    StripeRecord,
    validate,
)
from deepfs.messages import metadata_requests as meta
from deepfs.messages import storage_requests as storage

pytestmark = pytest.mark.unit


def einval(fn: Any, *args: Any) -> str:
    with pytest.raises(OSError) as info:
        fn(*args)
    assert info.value.errno == errno.EINVAL, info.value
    return str(info.value)


def test_fragment_key_wire_form_keeps_the_order_ino_stripe_version_slot() -> None:
    key = FragmentKey(ino=7, stripe=3, version=9, slot=2)
    assert key.to_wire() == [7, 3, 9, 2]
    assert FragmentKey.of(key.to_wire()) == key
    assert str(key) == "7/3.9.2"


@pytest.mark.parametrize("bad", [
    [1, 2, 3], [1, 2, 3, 4, 5], "1/2/3/4", None, {"ino": 1}, [-1, 0, 0, 0], [1, 0, 0, 32], [1, 0, 0, True],
    ["..", "..", "etc", "passwd"], [1.0, 0, 0, 0], [2**64, 0, 0, 0],
])
def test_fragment_key_of_refuses_anything_but_four_integers(bad: object) -> None:
    with pytest.raises(ValueError):
        FragmentKey.of(bad)
    einval(validate.fragment_key, bad)


def test_stripe_record_round_trips_and_validates_to_the_wire_fields() -> None:
    record = StripeRecord(index=4, version=11, length=100, fragment_size=4096, placement=[1, MISSING_NODE, 3],
                          digests=[5, 6, 7])
    wire = record.to_wire()
    assert tuple(wire) == STRIPE_FIELDS
    assert StripeRecord.from_wire(wire) == record
    assert validate.stripe_record({**wire, "extra": 1}) == wire  # reduced to exactly the wire fields
    einval(validate.stripe_record, {**wire, "placement": [MISSING_NODE - 1, 1, 2]})
    einval(validate.stripe_record, {**wire, "crcs": [1 << 32, 0, 0]})
    einval(validate.stripe_record, {**wire, "index": "4"})
    einval(validate.stripe_record, [1, 2])


def test_storage_validators_read_each_op_and_refuse_bad_bodies() -> None:
    key = FragmentKey(1, 2, 3, 4)
    put = storage.put_fragment(storage.put_fragment_body(key, 4096, [1, 2], sync=False))
    assert put == storage.PutFragment(key, 4096, [1, 2], False)
    assert storage.put_fragment({"key": key.to_wire(), "crcs": []}) == storage.PutFragment(key, None, [], True)
    get = storage.get_fragment(storage.get_fragment_body(key, 10, 20, with_crcs=True))
    assert get == storage.GetFragment(key, 10, 20, True)
    assert storage.get_fragment(storage.get_fragment_body(key, 0, 5)).with_crcs is False
    assert storage.delete_fragment(storage.delete_fragment_body([key, key])).keys == [key, key]
    assert storage.stat_fragment({"key": [1, 2, 3, 4]}) == storage.StatFragment(key, None)
    einval(storage.put_fragment, {"key": key.to_wire(), "crcs": "abc"})
    einval(storage.put_fragment, {"key": key.to_wire(), "crcs": [1 << 32]})
    einval(storage.put_fragment, {"key": key.to_wire(), "crcs": [], "sync": 1})
    einval(storage.get_fragment, {"key": key.to_wire()})  # length is required
    einval(storage.get_fragment, {"key": key.to_wire(), "offset": -1, "length": 1})
    einval(storage.delete_fragment, {"keys": key.to_wire()})


def test_metadata_validators_apply_defaults_and_refuse_bad_bodies() -> None:
    ctx = {"uid": 5, "gid": 6}
    assert meta.create({"parent": 1, "name": b"f", "mode": 0o644, "ctx": ctx}) == meta.Create(
        1, b"f", 0o644, False, Ctx(5, 6), None, 0)
    assert meta.rename({"parent": 1, "name": b"a", "new_parent": 2, "new_name": b"b"}).flags == 0
    assert meta.resolve({"path": "/a/b"}) == b"/a/b"
    assert meta.set_layout({"ino": 1, "layout": None}) == meta.SetLayout(1, None)
    assert meta.setattr({"ino": 3, "size": 10}).size == 10
    message = einval(meta.entry, {"parent": 1})
    assert "name" in message
    einval(meta.ino, {"ino": True})  # a bool is not an integer here
    einval(meta.ino, {"ino": -1})
    einval(meta.create, {"parent": 1, "name": b"f", "mode": 0o644})  # ctx is required
    einval(meta.set_layout, {"ino": 1})  # layout must be present (nil is fine)
    einval(meta.commit, {"ino": 1, "stripes": [{}] * (validate.STRIPES_PER_REQUEST + 1), "size": 0})


def test_bodies_and_payloads_follow_the_policy() -> None:
    assert validate.body_map(None) == {}
    einval(validate.body_map, [1, 2])
    validate.no_payload(memoryview(b""), "PING")
    einval(validate.no_payload, memoryview(b"x"), "PING")
