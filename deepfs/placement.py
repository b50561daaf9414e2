"""Placement of a stripe's fragments by rendezvous hashing.

Every node gets a score from hash(ino, stripe, node id); the highest-scored
live nodes hold the fragments, taken one failure domain at a time so two
fragments share a domain only when there are fewer domains than fragments.
No table is consulted per write, and a node joining or leaving moves only
the fragments it wins or held. Nodes an operator drains or removes stay in
the map (readers still fetch what they hold) but win no new fragments.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from deepfs.messages import MISSING_NODE


@dataclass(frozen=True, slots=True)
class NodeView:
    """What placement needs to know about a storage node."""

    node_id: int
    address: str
    failure_domain: str
    up: bool = True
    free_bytes: int = 0
    accepts_writes: bool = True  # False while draining or out: reads only


class NodeDescription(Protocol):
    """A cluster-map entry (``control_pb2.NodeInfo``), as far as placement reads it."""

    @property
    def node_id(self) -> int: ...
    @property
    def address(self) -> str: ...
    @property
    def failure_domain(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def admin_state(self) -> str: ...
    @property
    def free_bytes(self) -> int: ...


def node_view(info: NodeDescription) -> NodeView:
    """The one conversion of a map entry: up for reads when ``state`` is "up", and new
    fragments only while ``admin_state`` is "in" (empty from a server that predates it)."""
    return NodeView(info.node_id, info.address, info.failure_domain or info.address, info.state == "up",
                    info.free_bytes, accepts_writes=info.admin_state in ("in", ""))


def rendezvous_score(ino: int, stripe: int, node_id: int) -> int:
    digest = hashlib.blake2b(struct.pack("!QQI", ino, stripe, node_id), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def place_stripe(
    ino: int,
    stripe: int,
    width: int,
    nodes: Sequence[NodeView],
    avoid: frozenset[int] = frozenset(),
) -> list[int]:
    """Node ids for fragments 0..width-1; ``MISSING_NODE`` where too few live nodes exist.

    Only nodes that are up and accept writes are candidates.

    ``avoid`` holds nodes that recently failed: they are used only when
    nothing else is left.
    """
    live = [n for n in nodes if n.up and n.accepts_writes]
    ranked = sorted(live, key=lambda n: (n.node_id in avoid, -rendezvous_score(ino, stripe, n.node_id)))
    chosen: list[NodeView] = []
    used_domains: set[str] = set()
    # First pass: one node per failure domain; second: fill with the best remaining.
    for node in ranked:
        if len(chosen) == width:
            break
        if node.failure_domain not in used_domains:
            chosen.append(node)
            used_domains.add(node.failure_domain)
    for node in ranked:
        if len(chosen) == width:
            break
        if node not in chosen:
            chosen.append(node)
    placement = [n.node_id for n in chosen]
    return placement + [MISSING_NODE] * (width - len(placement))
