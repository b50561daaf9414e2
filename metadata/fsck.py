"""``Fsck``: a health scan told as files, so an operator knows what is at risk.

The scan (``metadata.health``) counts stripes by how many fragments they
lost and sums them per inode; fsck adds the names. Stripe records are keyed
by inode and regular files do not record their parent (hard links give a
file several), so a path is found by walking the namespace from the root,
breadth first, until every inode asked about has a name: one pass, only as
deep as needed. An inode no directory reaches (unlinked while open) gets "".
The walk reads inside one read transaction; it is an operator's command, not
a hot path.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection

from deepfs.messages.constants import ROOT_INO
from deepfs.proto import control_pb2
from metadata.health import HealthScan, InodeHealth
from metadata.store import MetaStore, Txn

DEFAULT_MAX_FILES = 100
LIST_BATCH = 1024


def paths_of(txn: Txn, wanted: Collection[int]) -> dict[int, str]:
    """A path ("/dir/name") for each inode of ``wanted`` that a directory reaches; one per inode."""
    found: dict[int, str] = {}
    missing = set(wanted)
    directories: deque[tuple[int, str]] = deque([(ROOT_INO, "")])
    while directories and missing:
        directory, path = directories.popleft()
        cookie = 0
        while batch := txn.list_dir(directory, cookie, LIST_BATCH):
            cookie = batch[-1][0]
            for _cookie, name, ino in batch:
                child_path = f"{path}/{name.decode(errors='surrogateescape')}"
                if ino in missing:
                    missing.discard(ino)
                    found[ino] = child_path
                child = txn.get_inode(ino)
                if child is not None and child.is_dir:
                    directories.append((ino, child_path))
    return found


def fsck_reply(store: MetaStore, scan: HealthScan, files: int, max_files: int) -> control_pb2.FsckReply:
    """The ``FsckReply`` for ``scan``: counts, and up to ``max_files`` files per category (worst first)."""
    limit = max_files or DEFAULT_MAX_FILES
    # A file with an unreadable stripe is listed as unreadable only.
    unreadable = _worst(scan.inodes, lambda h: h.unreadable, limit)
    degraded = _worst(scan.inodes, lambda h: 0 if h.unreadable else h.degraded, limit)
    with store.read() as txn:
        paths = paths_of(txn, [ino for ino, _, _ in unreadable + degraded])

    def listed(entries: list[tuple[int, InodeHealth, int]]) -> list[control_pb2.FsckFile]:
        return [control_pb2.FsckFile(path=paths.get(ino, ""), ino=ino, stripes=stripes, worst_lost=health.worst_lost)
                for ino, health, stripes in entries]

    return control_pb2.FsckReply(
        files=files,
        stripes=scan.stripes,
        degraded_stripes=scan.degraded,
        unreadable_stripes=scan.unreadable,
        degraded_files=listed(degraded),
        unreadable_files=listed(unreadable),
        repair_queue=sum(len(w.health.rebuild) + len(w.health.move) for w in scan.work),
        stripes_by_lost=scan.stripes_by_lost,
    )


def _worst(inodes: dict[int, InodeHealth], count: Callable[[InodeHealth], int],
           limit: int) -> list[tuple[int, InodeHealth, int]]:
    """(ino, health, count) of inodes with a non-zero ``count``, most fragments lost first, at most ``limit``."""
    chosen = [(ino, health, count(health)) for ino, health in inodes.items() if count(health)]
    chosen.sort(key=lambda item: (-item[1].worst_lost, item[0]))
    return chosen[:limit]
