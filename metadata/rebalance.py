"""Rebalancing: which fragments should move now that the set of writable nodes changed.

Mental model: a client places stripe (ino, index) on the top-ranked nodes of
``deepfs.placement.place_stripe`` over the writable nodes of its map. When a
node joins, that choice changes for the stripes the new node now wins (a
stripe of width k+m on N nodes, with probability (k+m)/(N+1)) and for no
other: each of those holds one fragment on a node placement no longer
picks, and placement picks a node it does not use (tests/test_rebalance.py
checks: at most one fragment per stripe, always onto the new node).
Moving exactly those fragments makes the stripe look as if it had been
written on today's map, so a stripe written on the current map
never moves.

The comparison is between *sets* of nodes, not slot by slot: a new node
ranked third shifts the ranks of the nodes below it, but the fragments on
them stay where they are. A move goes onto a chosen node the stripe does not
use yet, so after all of a stripe's moves its nodes are exactly placement's
choice: distinct nodes, in distinct failure domains whenever there are
enough domains. Only stripes whose every fragment sits on an up, writable
node are considered: anything else (missing, lost, draining) is repair's
work, and repair goes first.

Pure over the stripe record and ``NodeView``s built by the same function
clients use (``deepfs.placement.node_view``); tested without servers.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from deepfs.messages import MISSING_NODE
from deepfs.placement import NodeDescription, NodeView, node_view, place_stripe
from metadata.records import Inode


@dataclass(frozen=True, slots=True)
class Misplaced:
    """One stripe to rebalance: ``moves`` maps slot -> the node its fragment goes to."""

    ino: int
    index: int
    version: int
    moves: dict[int, int]


def placement_views(nodes: Iterable[NodeDescription]) -> list[NodeView]:
    """The cluster map as placement sees it, converted exactly as a client converts its map."""
    return [node_view(node) for node in nodes]


def misplaced_slots(record: dict[str, Any], ino: int, views: Sequence[NodeView]) -> dict[int, int]:
    """Slot -> new node for the fragments of stripe ``record`` (of file ``ino``) that placement
    over ``views`` no longer picks; empty when the stripe is where placement puts it, or when
    any of its fragments is not on an up, writable node (repair's work, not rebalancing's)."""
    placement: list[int] = record["placement"]
    writable = {v.node_id: v for v in views if v.up and v.accepts_writes}
    if any(node_id not in writable for node_id in placement):  # also catches MISSING_NODE
        return {}
    chosen = [n for n in place_stripe(ino, record["index"], len(placement), views) if n != MISSING_NODE]
    wanted = set(chosen)
    kept: set[int] = set()
    misplaced: list[int] = []
    for slot, node_id in enumerate(placement):
        if node_id in wanted and node_id not in kept:
            kept.add(node_id)
        else:  # not chosen, or a second fragment on one node
            misplaced.append(slot)
    targets = [n for n in chosen if n not in kept]  # in rank order
    return _pair(misplaced, targets, placement, writable)


def _pair(misplaced: list[int], targets: list[int], placement: list[int],
          writable: dict[int, NodeView]) -> dict[int, int]:
    """Match slots to new nodes, a target in the slot's own failure domain first (the move then
    changes no domain's share of the stripe), the others in rank order."""
    moves: dict[int, int] = {}
    free = list(targets)
    for slot in misplaced:
        domain = writable[placement[slot]].failure_domain
        same = next((t for t in free if writable[t].failure_domain == domain), None)
        if same is not None:
            moves[slot] = same
            free.remove(same)
    for slot in misplaced:
        if slot not in moves and free:
            moves[slot] = free.pop(0)
    return moves


def find_misplaced(records: Iterable[tuple[Inode, dict[str, Any]]], views: Sequence[NodeView]) -> list[Misplaced]:
    """Every stripe with fragments to move, in key order."""
    found: list[Misplaced] = []
    for inode, record in records:
        moves = misplaced_slots(record, inode.ino, views)
        if moves:
            found.append(Misplaced(inode.ino, record["index"], record["version"], moves))
    return found


def writable_signature(views: Iterable[NodeView]) -> frozenset[tuple[int, str]]:
    """What placement's choice depends on: the writable nodes and their failure domains. A
    rebalance pass that finished under one signature need not run again until it changes."""
    return frozenset((v.node_id, v.failure_domain) for v in views if v.up and v.accepts_writes)
