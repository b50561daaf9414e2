"""Rebalancing (``metadata.rebalance``): which fragments move when the writable nodes change.

Pure: stripe records placed the way a client places them
(``deepfs.placement.place_stripe``), then the node set changed. The worker
that moves them is tested over a memory cluster in tests/test_unit_repair.py.
"""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepfs.messages import MISSING_NODE
from deepfs.placement import NodeView, place_stripe
from metadata.rebalance import find_misplaced, misplaced_slots, placement_views, writable_signature
from metadata.records import Inode

pytestmark = [pytest.mark.unit, pytest.mark.timeout(60)]

WIDTH = 6  # 4 + 2


def views(count: int, domains: int | None = None, first_id: int = 1) -> list[NodeView]:
    """``count`` up, writable nodes; ``domains`` failure domains shared round-robin (default: one each)."""
    domains = domains or count
    return [NodeView(n, f"10.0.0.{n}:7710", f"rack{n % domains}") for n in range(first_id, first_id + count)]


def written(ino: int, index: int, nodes: list[NodeView], width: int = WIDTH) -> dict[str, Any]:
    """The record of a stripe a client wrote with map ``nodes``."""
    placement = place_stripe(ino, index, width, nodes)
    return {"index": index, "version": 5, "length": 10, "fragment_size": 4, "placement": placement,
            "crcs": [0] * width}


def apply(record: dict[str, Any], moves: dict[int, int]) -> list[int]:
    placement = list(record["placement"])
    for slot, node_id in moves.items():
        placement[slot] = node_id
    return placement


node_sets = st.tuples(st.integers(WIDTH, 14), st.integers(1, 14), st.integers(0, 2**32), st.integers(0, 1000))


@settings(max_examples=60, deadline=None)
@given(node_sets)
def test_a_stripe_written_on_the_current_map_never_moves(case: tuple[int, int, int, int]) -> None:
    count, domains, ino, index = case
    nodes = views(count, domains)
    record = written(ino, index, nodes)
    assert misplaced_slots(record, ino, nodes) == {}
    # The slot order is placement's rank order, but only the set counts.
    shuffled = dict(record, placement=random.Random(ino).sample(record["placement"], WIDTH))
    assert misplaced_slots(shuffled, ino, nodes) == {}
    # Removing a node the stripe does not use changes nothing either.
    unused = [n for n in nodes if n.node_id not in record["placement"]]
    if unused:
        assert misplaced_slots(record, ino, [n for n in nodes if n is not unused[0]]) == {}


@settings(max_examples=60, deadline=None)
@given(node_sets, st.booleans())
def test_adding_a_node_moves_at_most_one_fragment_per_stripe_onto_it(case: tuple[int, int, int, int],
                                                                     new_domain: bool) -> None:
    count, domains, ino, _ = case
    nodes = views(count, domains)
    joined = NodeView(100, "10.0.1.100:7710", "rack-new" if new_domain else nodes[0].failure_domain)
    grown = [*nodes, joined]
    for index in range(20):
        record = written(ino, index, nodes)
        moves = misplaced_slots(record, ino, grown)
        assert len(moves) <= 1 and set(moves.values()) <= {joined.node_id}
        after = apply(record, moves)
        # After the moves the stripe sits exactly where a client writing now would put it.
        assert set(after) == set(place_stripe(ino, index, WIDTH, grown))
        assert misplaced_slots(dict(record, placement=after), ino, grown) == {}


def test_adding_one_node_to_n_misplaces_about_one_in_n_plus_one_fragments() -> None:
    for count in (6, 8, 12):
        nodes = views(count)
        grown = [*nodes, NodeView(100, "10.0.1.100:7710", "rack-new")]
        stripes = 3000
        moved = sum(len(misplaced_slots(written(9, index, nodes), 9, grown)) for index in range(stripes))
        expected = stripes * WIDTH / (count + 1)  # the new node wins a stripe's top k+m this often
        assert abs(moved - expected) < 0.1 * expected, (count, moved, expected)


def test_moves_keep_failure_domains_distinct_when_enough_exist() -> None:
    nodes = views(12, domains=6)  # two nodes per rack
    domain = {n.node_id: n.failure_domain for n in nodes}
    for index in range(200):
        placement = list(written(3, index, nodes)["placement"])
        # A repair on a smaller cluster crowded slots 0 and 1 into one rack.
        placement[1] = next(n for n in domain if domain[n] == domain[placement[0]] and n != placement[0])
        crowded = dict(written(3, index, nodes), placement=placement)
        after = apply(crowded, misplaced_slots(crowded, 3, nodes))
        assert len(set(after)) == WIDTH and len({domain[n] for n in after}) == WIDTH


def test_two_fragments_on_one_node_are_split() -> None:
    nodes = views(7)
    record = written(1, 0, nodes)
    doubled = dict(record, placement=[record["placement"][0], *record["placement"][:-1]])
    moves = misplaced_slots(doubled, 1, nodes)
    assert len(moves) == 1 and len(set(apply(doubled, moves))) == WIDTH


def test_stripes_with_work_for_repair_are_left_to_repair() -> None:
    nodes = views(7)
    grown = [*nodes, NodeView(100, "10.0.1.100:7710", "rack-new")]
    index = next(i for i in range(100) if misplaced_slots(written(1, i, nodes), 1, grown))
    record = written(1, index, nodes)
    slot_node = record["placement"][2]
    missing = dict(record, placement=[*record["placement"][:2], MISSING_NODE, *record["placement"][3:]])
    assert misplaced_slots(missing, 1, grown) == {}
    down = [replace(n, up=False) if n.node_id == slot_node else n for n in grown]
    draining = [replace(n, accepts_writes=False) if n.node_id == slot_node else n for n in grown]
    assert misplaced_slots(record, 1, down) == {} and misplaced_slots(record, 1, draining) == {}
    assert misplaced_slots(record, 1, grown)


def test_too_few_nodes_move_nothing() -> None:
    nodes = views(WIDTH)
    record = written(1, 0, nodes)
    assert misplaced_slots(record, 1, nodes[:-1]) == {}  # one node went away: repair rebuilds, nothing moves


def test_find_misplaced_walks_records_and_the_signature_follows_writable_nodes() -> None:
    nodes = views(6)
    grown = [*nodes, NodeView(100, "10.0.1.100:7710", "rack-new")]
    inode = Inode(ino=4, mode=0o100644, uid=0, gid=0, nlink=1, atime_ns=0, mtime_ns=0, ctime_ns=0,
                  layout={"k": 4, "m": 2})
    records = [(inode, written(4, index, nodes)) for index in range(30)]
    assert find_misplaced(records, nodes) == []
    found = find_misplaced(records, grown)
    assert found and all(item.ino == 4 and item.version == 5 and list(item.moves.values()) == [100]
                         for item in found)
    assert writable_signature(nodes) != writable_signature(grown)
    assert writable_signature(grown) == writable_signature([*grown, replace(grown[0], node_id=7, up=False)])


class MapEntry:
    """A membership node as ``placement_views`` reads it (NodeState's fields)."""

    def __init__(self, node_id: int, failure_domain: str, state: str = "up", admin_state: str = "in") -> None:
        self.node_id, self.address, self.failure_domain = node_id, f"10.0.0.{node_id}:7710", failure_domain
        self.state, self.admin_state, self.free_bytes = state, admin_state, 0


def test_views_are_converted_as_clients_convert_the_map() -> None:
    converted = placement_views([MapEntry(1, ""), MapEntry(2, "r1", "down"), MapEntry(3, "r2", "up", "draining")])
    assert [(v.failure_domain, v.up, v.accepts_writes) for v in converted] == [
        ("10.0.0.1:7710", True, True), ("r1", False, True), ("r2", True, False)]
