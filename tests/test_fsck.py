"""Fsck's report, without servers: the counts come from a health scan, the names from a walk
of the namespace (files keep no parent, so a name is found from the root down)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deepfs.config import MetaConfig
from deepfs.placement import node_view, place_stripe
from metadata.control_service import cluster_map
from metadata.fsck import fsck_reply, paths_of
from metadata.health import scan_health
from metadata.inodes import Ctx
from metadata.membership import Membership, Usage
from metadata.namespace import Namespace
from metadata.store import MetaStore

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

ROOT = 1
CTX = Ctx(uid=0, gid=0)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MetaStore]:
    st = MetaStore.open(tmp_path / "meta", map_size_bytes=64 << 20, sync_interval_s=0.001)
    yield st
    st.close()


def record(index: int, placement: list[int]) -> dict[str, Any]:
    return {"index": index, "version": 1, "length": 10, "fragment_size": 4096, "placement": placement,
            "crcs": [0] * len(placement)}


def test_fsck_names_degraded_and_unreadable_files_and_counts_their_stripes(store: MetaStore) -> None:
    namespace = Namespace(store, MetaConfig(default_stripe_size=4 << 14))
    namespace.bootstrap()
    membership = Membership(store, 5.0)
    for n in range(1, 7):
        membership.register(f"uuid-{n}", f"127.0.0.1:{7700 + n}", f"host{n}", Usage())
    a = namespace.mkdir(ROOT, b"a", 0o755, CTX)["ino"]
    b = namespace.mkdir(a, b"b", 0o755, CTX)["ino"]
    healthy, _, _ = namespace.create(ROOT, b"healthy", 0o644, True, CTX)
    degraded, _, _ = namespace.create(b, b"degraded", 0o644, True, CTX)
    lost, _, _ = namespace.create(a, b"lost", 0o644, True, CTX)
    open_only, _, _ = namespace.create(ROOT, b"open-only", 0o644, True, CTX)
    namespace.link(degraded["ino"], ROOT, b"second-name")
    namespace.commit(healthy["ino"], [record(0, [1, 2, 3, 4, 5, 6])], 10)
    namespace.commit(degraded["ino"], [record(0, [1, 2, 3, 4, 5, -1]), record(1, [1, 2, 3, 4, -1, -1])],
                     (4 << 14) + 10)
    namespace.commit(lost["ino"], [record(0, [1, 2, 3, -1, -1, -1])], 10)
    namespace.commit(open_only["ino"], [record(0, [1, 2, 3, 4, 5, -1])], 10)
    namespace.unlink(ROOT, b"open-only", keep_open=True)

    with store.read() as txn:
        paths = paths_of(txn, [degraded["ino"], lost["ino"], open_only["ino"]])
    assert paths[lost["ino"]] == "/a/lost"
    assert paths[degraded["ino"]] in ("/a/b/degraded", "/second-name")
    assert open_only["ino"] not in paths

    scan = scan_health(store, membership, repair_after_s=60.0, bad=frozenset())
    reply = fsck_reply(store, scan, files=4, max_files=0)
    assert (reply.stripes, reply.degraded_stripes, reply.unreadable_stripes) == (5, 3, 1)
    assert dict(reply.stripes_by_lost) == {0: 1, 1: 2, 2: 1, 3: 1}
    assert [(f.path, f.stripes, f.worst_lost) for f in reply.unreadable_files] == [("/a/lost", 1, 3)]
    assert [(f.ino, f.stripes, f.worst_lost) for f in reply.degraded_files] == [
        (degraded["ino"], 2, 2), (open_only["ino"], 1, 1)]
    assert reply.degraded_files[1].path == ""  # unlinked while open: no name reaches it
    assert fsck_reply(store, scan, files=4, max_files=1).degraded_files[0].ino == degraded["ino"]


def test_clients_still_read_from_a_draining_node_but_place_no_new_fragment_on_it(store: MetaStore) -> None:
    membership = Membership(store, 5.0)
    for n in range(1, 7):
        membership.register(f"uuid-{n}", f"127.0.0.1:{7700 + n}", f"host{n}", Usage())
    membership.drain(3)
    views = [node_view(info) for info in cluster_map(membership).nodes]
    assert views[2].up and not views[2].accepts_writes
    assert all(3 not in place_stripe(7, stripe, 5, views) for stripe in range(40))
    assert sorted(place_stripe(7, 0, 5, views)) == [1, 2, 4, 5, 6]
