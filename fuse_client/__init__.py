"""The DeepFS FUSE client: mount a cluster as a POSIX file system.

- ``fuse_client.operations`` — the pyfuse3 ``Operations`` (thin over ``deepfs.AsyncClient``);
- ``fuse_client.handles`` — open files, shared per inode, unlinked-but-open bookkeeping;
- ``fuse_client.attr_cache`` / ``fuse_client.readahead`` — the caches;
- ``fuse_client.daemon`` — the trio loop that serves one mount;
- ``fuse_client.mount_process`` — ``MountProcess`` (spawn/stop a daemon) and ``unmount``;
- ``fuse_client.main`` — ``deepfs mount`` / ``python -m fuse_client``.

Caching rules and mount options: ``docs/FUSE.md``.
"""

from fuse_client.mount_process import MountProcess, UnmountError, is_mounted, unmount

__all__ = ["MountProcess", "UnmountError", "is_mounted", "unmount"]
