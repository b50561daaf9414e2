"""The adapter and plain torch through the FUSE mount read each other's checkpoints."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch  # a test dependency: missing torch must fail, not skip

import deepfs
import deepfs.torch as dtorch
from deepfs.url import close_shared_clients
from tests.conftest import Mounted
from tests.torch_samples import all_dtypes, assert_same, shared_views, trained

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(120)]


@pytest.fixture(autouse=True, scope="module")
def _close_shared_clients() -> Iterator[None]:
    yield
    close_shared_clients()


def deepfs_path(mount: Mounted, local: Path) -> str:
    return "/" + str(local.relative_to(mount.path))


def checkpoint() -> dict[str, object]:
    model, optimizer = trained(3)
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "dtypes": all_dtypes(),
            "views": shared_views(), "big": torch.randn(1 << 20), "epoch": 9}


def test_plain_torch_loads_adapter_checkpoints_from_the_mount(client: deepfs.Client, fuse_mount: Mounted,
                                                              mnt_dir: Path) -> None:
    obj = checkpoint()
    dtorch.save(obj, deepfs_path(fuse_mount, mnt_dir / "adapter.pt"), client=client)
    assert_same(obj, torch.load(mnt_dir / "adapter.pt"))
    assert_same(obj, torch.load(mnt_dir / "adapter.pt", mmap=True))  # aligned storages, mapped pages
    assert_same(obj, torch.load(mnt_dir / "adapter.pt", mmap=True, weights_only=True, map_location="cpu"))


def test_adapter_loads_plain_torch_checkpoints_from_the_mount(client: deepfs.Client, fuse_mount: Mounted,
                                                              mnt_dir: Path) -> None:
    obj = checkpoint()
    torch.save(obj, mnt_dir / "plain.pt")
    assert_same(obj, dtorch.load(deepfs_path(fuse_mount, mnt_dir / "plain.pt"), client=client, verify_crc=True))
    url = f"deepfs://{client.meta_address}{deepfs_path(fuse_mount, mnt_dir / 'plain.pt')}"
    assert_same(obj, dtorch.load(url))
