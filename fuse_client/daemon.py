"""The mount daemon: one trio loop runs the FUSE session and the AsyncClient.

Order of things: connect to the cluster (so a wrong address fails before
anything is mounted), mount, serve until the kernel ends the session
(``fusermount3 -u``) or a signal arrives (SIGINT, SIGTERM, SIGHUP), then
store whatever open files still buffer and unmount. SIGUSR1 logs what the
kernel sent so far (request counts and largest sizes).
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import pyfuse3
import trio

from deepfs.client import AsyncClient
from fuse_client.metrics import start_fuse_metrics
from fuse_client.mounts import mount_device
from fuse_client.operations import PATCHED_PYFUSE3, DeepFSOperations
from fuse_client.options import MountOptions

log = logging.getLogger(__name__)

READY_LINE = "deepfs-mount ready"
# Request tasks pyfuse3 keeps waiting for the next request. With one, the kernel's
# overlapping requests (an asynchronous RELEASE beside the next LOOKUP) had pyfuse3
# start a task and end it again for about every small file.
IDLE_READERS = 4


async def serve(options: MountOptions) -> None:
    if not PATCHED_PYFUSE3:
        log.warning("pyfuse3 without DeepFS's patch: every FUSE request costs more CPU and read-only "
                    "closes send a FLUSH (install it with third_party/pyfuse3/install.py, as make venv does)")
    async with AsyncClient.connect(options.meta_address, options.client_config()) as client:
        ops = DeepFSOperations(client, options)
        fuse_options = options.fuse_options()
        if options.debug:
            fuse_options.add("debug")
        pyfuse3.init(ops, str(options.mountpoint), fuse_options)
        exporter = None
        if options.metrics_port is not None:
            exporter = start_fuse_metrics(ops, options.metrics_host, options.metrics_port)
            log.info("metrics on %s", exporter.url)
        try:
            log.info("%s: %s mounted at %s (pid %d)", READY_LINE, options.meta_address, options.mountpoint, os.getpid())
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_handle_signals, ops)
                nursery.start_soon(_tune_once_serving, options)
                nursery.start_soon(ops.watch_open_files)
                await pyfuse3.main(min_tasks=min(IDLE_READERS, options.max_tasks), max_tasks=options.max_tasks)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await ops.shutdown()
            pyfuse3.close(unmount=True)
            if exporter is not None:
                exporter.stop()
            log.info("unmounted %s", options.mountpoint)


async def _handle_signals(ops: DeepFSOperations) -> None:
    """SIGINT, SIGTERM, SIGHUP: unmount. SIGUSR1: log the request statistics."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1) as signals:
        async for signum in signals:
            if signum == signal.SIGUSR1:
                ops.log_stats()
                continue
            log.info("%s: unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


async def _tune_once_serving(options: MountOptions) -> None:
    """Settings the kernel resets when it processes our INIT reply: a stat of
    the mount (served by this loop) returns only after that."""
    await trio.to_thread.run_sync(os.stat, options.mountpoint)
    set_kernel_readahead(options.mountpoint, options.kernel_readahead_kb)


def set_kernel_readahead(mountpoint: Path, kb: int) -> None:
    """The kernel reads ahead 128 KiB at a time on a FUSE mount (the value
    it offers in INIT) unless told otherwise through the mount's
    backing-device entry in sysfs (root only). Larger windows mean fewer,
    larger read requests (up to max_pages, 1 MiB)."""
    if kb <= 0:
        return
    device = mount_device(mountpoint)
    if device is None:
        return
    path = Path("/sys/class/bdi") / device / "read_ahead_kb"
    try:
        path.write_text(str(kb))
    except OSError as exc:
        log.info("kernel read-ahead left at its default (%s: %s)", path, exc.strerror)
