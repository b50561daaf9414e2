"""The DeepFS FUSE client: mount a cluster as a POSIX file system.

- ``fuse_client.operations`` — the pyfuse3 ``Operations``: a thin shell over ``deepfs.AsyncClient``
  and its typed metadata client (the FUSE surface ``deepfs.client`` documents);
- ``fuse_client.posix`` — the POSIX rules left to us and the errno a syscall sees (pure);
- ``fuse_client.dirs`` — open directories and readdir paging;
- ``fuse_client.handles`` — open files, shared per inode, unlinked-but-open bookkeeping;
- ``fuse_client.attr_cache`` / ``fuse_client.readahead`` — the caches;
- ``fuse_client.daemon`` — the trio loop that serves one mount;
- ``fuse_client.mount_process`` — ``MountProcess`` (spawn/stop a daemon) and ``unmount``;
- ``fuse_client.main`` — ``deepfs mount`` / ``python -m fuse_client``.

Caching rules and mount options: ``docs/FUSE.md``.
"""

from fuse_client.mount_process import MountProcess, UnmountError, is_mounted, unmount

__all__ = ["MountProcess", "UnmountError", "is_mounted", "unmount"]
