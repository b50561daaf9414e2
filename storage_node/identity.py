"""Who this node is: a uuid persisted in its data directory, and the node id the
metadata server gave it.

The uuid survives restarts so the metadata server recognises a returning node
(and its fragments) instead of counting a new one. The node id is 0 until the
first registration succeeds; the data server reports whatever it is now.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from deepfs.config import NODE_UUID_FILE


@dataclass
class NodeIdentity:
    uuid: str
    node_id: int = 0  # 0: not registered yet


def load_or_create_uuid(data_dir: str | os.PathLike[str]) -> str:
    """Read ``<data_dir>/node.uuid``, creating it (atomically, durably) on first start."""
    path = Path(data_dir) / NODE_UUID_FILE
    try:
        return str(uuid.UUID(path.read_text().strip()))
    except FileNotFoundError:
        pass
    except ValueError as exc:
        raise ValueError(f"{path} does not hold a uuid; refusing to invent a new identity") from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    value = str(uuid.uuid4())
    tmp = path.with_name(f".{NODE_UUID_FILE}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(value + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return value
