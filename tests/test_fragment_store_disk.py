"""What the fragment store asks of the disk, counted on a block device of the test's own.

The problem with counting on the disk the tests run from: its request counters
are the whole machine's, and ``make test`` runs two workers at once, so the
other worker's reads land in the count (a run saw 64 requests for 40 fragments
that needed 40). Each test here mounts a small ext4 image of its own through a
loop device (root, ``mkfs.ext4`` and ``mount`` from the base system) and counts
that device's requests only.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from deepfs.messages import FragmentKey
from storage_node.fragment_store import FragmentStore
from tests.test_fragment_store import block_crcs

pytestmark = [pytest.mark.process, pytest.mark.timeout(60)]

IMAGE_BYTES = 256 << 20
COMMAND_TIMEOUT_S = 30


@pytest.fixture
def own_disk(tmp_path: Path) -> Iterator[Path]:
    """A fresh ext4 file system on a loop device of its own, mounted for the test; unmounted
    (and the loop device freed: ``mount -o loop`` sets autoclear) whatever happens. Skips
    where loop devices cannot be mounted (not root, a container without them), as the test
    skipped before where its directory was on no block device."""
    if os.geteuid() != 0:
        pytest.skip("a loop device of the test's own needs root")
    image, mountpoint = tmp_path / "disk.img", tmp_path / "disk"
    mountpoint.mkdir()
    with open(image, "wb") as f:
        f.truncate(IMAGE_BYTES)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True, timeout=COMMAND_TIMEOUT_S)
    mounted = subprocess.run(["mount", "-o", "loop", str(image), str(mountpoint)], capture_output=True, text=True,
                             check=False, timeout=COMMAND_TIMEOUT_S)
    if mounted.returncode != 0:  # e.g. a container without loop devices
        pytest.skip(f"cannot mount a loop device here: {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        unmounted = subprocess.run(["umount", str(mountpoint)], capture_output=True, text=True, check=False,
                                   timeout=COMMAND_TIMEOUT_S)
        if unmounted.returncode != 0:  # something still holds a file there: detach it anyway, then fail
            subprocess.run(["umount", "--lazy", str(mountpoint)], check=False, timeout=COMMAND_TIMEOUT_S)
            pytest.fail(f"the test's disk was still busy at its end: {unmounted.stderr.strip()}")


def _device_read_requests(path: Path) -> int:
    """Read requests the block device holding ``path`` completed so far."""
    dev = os.stat(path).st_dev
    return int(Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat").read_text().split()[0])


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages are not dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_a_small_fragment_read_cold_costs_one_request_to_the_disk(own_disk: Path) -> None:
    """A small fragment opened for a read and not in the page cache is asked of the disk whole,
    in one request (``_read_ahead_on_open``), not as the header page first and then the data.
    Measured on this machine's disk and on the loop device here: 2.8 read requests per
    fragment without the hint (111 for these 40), 1.0 with it."""
    root = own_disk / "node"
    writer = FragmentStore(root, fsync=False, block_size=64 << 10)
    fragments = []
    for i in range(40):
        data = os.urandom((64 << 10) + i * 1400)  # 64-118 KiB: one request on any disk
        key = FragmentKey(100 + i, 0, 1, 0)
        writer.put(key, memoryview(data), block_crcs(data, 64 << 10), 64 << 10)
        fragments.append((key, data))
    for key, _ in fragments:
        _evict(writer.path_of(key))
    writer.close()
    reader = FragmentStore(root, fsync=False, block_size=64 << 10)  # no open files yet
    try:
        before = _device_read_requests(root)
        for key, data in fragments:
            assert reader.read_range(key, 0, len(data)).data == data
        requests, count = _device_read_requests(root) - before, len(fragments)
    finally:
        reader.close()  # its cache of open fragment files would keep the disk busy
    assert requests <= 1.5 * count, f"{requests} read requests to the disk for {count} cold fragments"
