"""Test helpers that ship with DeepFS, for its own tests and for anyone testing code built on it.

What each helper is for:

- Processes (``deepfs.processes``, shared with ``deepfs up``): ``ServerProcess``
  starts one server, waits until a ``ReadyCheck`` (``ready_line``,
  ``port_open``, ``pid_file`` or any callable) says it is ready, fails with
  its log tail when it is not, and stops it SIGTERM-then-SIGKILL, always
  reaped; ``stop_all`` stops several together; ``free_port``.
  ``deepfs.local_cluster.LocalCluster`` builds a whole cluster from them.
- ``wait_for``: the one polling loop for conditions another process brings
  about, with a message naming what it waited for.
- Faults (``deepfs.testing.faults``): find (``fragment_files``), rot
  (``flip_bytes``), forge (``forge_fragment``) and lose
  (``remove_fragments``) a file's fragments on the nodes' disks; fill a
  node's disk (``fill_node_disk``); ``pause``/``resume``/``paused`` and
  ``kill_9`` a process.
- ``TcpProxy``: a proxy in front of a server that passes, blackholes or
  delays traffic: a network partition without root or ``tc``.
- Network (``deepfs.testing.netns``, root only): ``HostNetwork`` gives each
  storage node a network namespace and IP of its own behind a bridge, and
  cuts one off silently (nftables drops) or takes its link down;
  ``NetnsCluster`` is a ``LocalCluster`` whose nodes run there;
  ``network_unavailable`` says why not (for a skip).
- Load (``deepfs.testing.workload``): ``Workload`` runs library and mount
  writers and verifying readers in threads during faults, recording every
  acknowledged write in a ``Ledger``; ``verify_files`` and
  ``placement_problems`` check the end state.
- ``MemoryCluster`` (``deepfs.testing.memory_cluster``): a metadata server
  and storage nodes inside the test's own trio loop, connected to an
  ``AsyncClient`` over memory streams (``MemoryTransport``): the client's
  write-back and stripe I/O tested in milliseconds, with nodes stopped,
  restarted and marked down at will.
- ``FakeClock``: a clock that moves only when told, for components that
  take a ``clock`` argument (``metadata.membership.Membership``,
  ``metadata.gc.GarbageCollector``); ``trio.testing.MockClock`` for trio's
  own sleeps.
"""

from deepfs.processes import (
    ProcessStartError,
    ReadyCheck,
    ServerProcess,
    free_port,
    pid_file,
    port_open,
    ready_line,
    stop_all,
)
from deepfs.testing.clock import FakeClock
from deepfs.testing.faults import (
    fill_node_disk,
    flip_bytes,
    forge_fragment,
    fragment_files,
    kill_9,
    pause,
    paused,
    quarantined_files,
    remove_fragments,
    resume,
)
from deepfs.testing.memory_cluster import MemoryCluster, MemoryTransport
from deepfs.testing.netns import HostNetwork, NetnsCluster, network_unavailable
from deepfs.testing.tcp_proxy import TcpProxy
from deepfs.testing.waiting import wait_for
from deepfs.testing.workload import Ledger, Workload, placement_problems, verify_files

__all__ = [
    "FakeClock",
    "HostNetwork",
    "Ledger",
    "MemoryCluster",
    "MemoryTransport",
    "NetnsCluster",
    "ProcessStartError",
    "ReadyCheck",
    "ServerProcess",
    "TcpProxy",
    "Workload",
    "fill_node_disk",
    "flip_bytes",
    "forge_fragment",
    "fragment_files",
    "free_port",
    "kill_9",
    "network_unavailable",
    "pause",
    "paused",
    "pid_file",
    "placement_problems",
    "port_open",
    "quarantined_files",
    "ready_line",
    "remove_fragments",
    "resume",
    "stop_all",
    "verify_files",
    "wait_for",
]
