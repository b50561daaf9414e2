"""The systems the benchmark compares, each started and stopped as a context manager.

Mental model: a *target* is a place where a workload runs. Most are a
directory (``surface = "posix"``): DeepFS through its FUSE mount, the local
disk, bindfs over a local directory, a GlusterFS disperse 4+2 mount. One is a
``deepfs.Client`` (``surface = "client"``): DeepFS through the Python client
and the torch adapter, no FUSE in the way.

``open_targets`` starts the chosen targets on an ``ExitStack``; a target that
cannot start is kept in the list as *skipped, with the reason* — the report
shows it, nothing is silently dropped. Closing the stack unmounts and stops
everything, in reverse order.

Degraded mode: ``Target.degraded()`` gives a context manager that takes m
servers of the target away while it is open (DeepFS: storage nodes; Gluster:
bricks), or None for targets with no redundancy. Targets that share one
cluster share one ``FailureGroup``, so the nodes are stopped once for both.

Modules: ``base`` (``Target``, ``FailureGroup``, ``TargetSkipped``),
``selection`` (target names, ``open_targets``), one module per family
(``deepfs_cluster``, ``local_disk``, ``bindfs``, ``gluster``) and
``fuse_mounts`` (waiting for and cleaning up the mounts of bindfs and Gluster).
"""

from bench.targets.base import FailureGroup, Target, TargetSkipped
from bench.targets.deepfs_cluster import ClusterSettings
from bench.targets.selection import TARGET_NAMES, open_targets, parse_target_names

__all__ = ["TARGET_NAMES", "ClusterSettings", "FailureGroup", "Target", "TargetSkipped", "open_targets",
           "parse_target_names"]
