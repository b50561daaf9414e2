"""FragmentLister on a real store: pages in order, each prefix folder read about once per walk."""

from __future__ import annotations

import os
from pathlib import Path

import crc32c
import pytest

from deepfs.messages import FragmentKey
from storage_node import fragment_format as fmt
from storage_node.fragment_store import FragmentStore

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

BS = 4096


def put(store: FragmentStore, key: FragmentKey) -> None:
    data = os.urandom(64)
    store.put(key, data, [crc32c.crc32c(data)], BS)


def walk(store: FragmentStore, limit: int, between: object = None) -> list[FragmentKey]:
    seen: list[FragmentKey] = []
    after = None
    while True:
        page, done = store.list_fragments(after, limit)
        assert len(page) <= limit
        seen += [key for key, _ in page]
        if done:
            return seen
        after = page[-1][0]
        if callable(between):
            between(after)


def test_a_walk_reads_each_prefix_folder_once_and_sees_everything_once_in_order(tmp_path: Path) -> None:
    """Many pages resume in one big prefix folder (every inode below is 5 mod 256): the folder is
    listed once, not once per page; the keys come in listing order, each exactly once."""
    store = FragmentStore(tmp_path / "node", fsync=False, block_size=BS)
    keys = [FragmentKey(5 + 256 * i, stripe, 1, slot) for i in range(40) for stripe in range(2) for slot in range(3)]
    keys += [FragmentKey(7, 0, 1, 0), FragmentKey(300, 9, 9, 9)]
    for key in keys:
        put(store, key)
    listed_before = store.lister.folders_listed
    assert walk(store, limit=7) == sorted(keys, key=fmt.list_order)
    assert store.lister.folders_listed - listed_before == 256  # every prefix folder once, not once a page


def test_fragments_deleted_during_a_walk_are_skipped_and_later_folders_show_new_ones(tmp_path: Path) -> None:
    store = FragmentStore(tmp_path / "node", fsync=False, block_size=BS)
    early = [FragmentKey(1 + 256 * i, 0, 1, 0) for i in range(30)]  # prefix 01
    for key in early:
        put(store, key)
    late = FragmentKey(200, 0, 1, 0)  # prefix c8, stored once the walk is under way
    gone = early[20]

    def between(after: FragmentKey) -> None:
        if after == early[4]:
            store.delete([gone])
            put(store, late)

    seen = walk(store, limit=5, between=between)
    assert gone not in seen and late in seen
    assert seen == sorted([k for k in early if k != gone] + [late], key=fmt.list_order)
