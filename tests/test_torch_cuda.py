"""The CUDA paths of deepfs.torch: saving GPU tensors, loading through pinned
staging buffers with ``map_location='cuda'``, and ``pin_memory=True``.

They need a CUDA device. Without one every test here is reported as skipped
(never counted as passing): run ``make test-cuda`` on a GPU machine (a CUDA
build of torch 2.13.0, which PyPI's default wheel is), which fails instead of
skipping when torch sees no device.
"""

from __future__ import annotations

import os

import pytest
import torch

import deepfs
import deepfs.torch as dtorch
from deepfs.torch import _read
from tests.conftest import unique_dir
from tests.torch_samples import all_dtypes, assert_same, shared_views

if os.environ.get("DEEPFS_REQUIRE_CUDA") == "1" and not torch.cuda.is_available():  # make test-cuda
    raise RuntimeError(f"DEEPFS_REQUIRE_CUDA=1 but torch {torch.__version__} sees no CUDA device "
                       f"(built for CUDA {torch.version.cuda})")

pytestmark = [
    pytest.mark.process,
    pytest.mark.timeout(300),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)"),
]


def on(device: str, obj: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in obj.items()}


def checkpoint() -> dict[str, torch.Tensor]:
    """Every dtype, plus tensors spanning many of the test cluster's stripes and staging slots."""
    g = torch.Generator().manual_seed(3)
    return {**all_dtypes(), "big": torch.randn(3_000_000, generator=g), "odd": torch.randn(123_457, generator=g)}


def test_map_location_cuda_loads_every_byte_onto_the_gpu(client: deepfs.Client) -> None:
    base = unique_dir(client, "cuda-load")
    obj = checkpoint()
    dtorch.save(obj, f"{base}/ck.pt", client=client)
    got = dtorch.load(f"{base}/ck.pt", client=client, map_location="cuda")
    assert all(t.device.type == "cuda" for t in got.values())
    assert_same(obj, on("cpu", got))


def test_staging_goes_through_pinned_buffers(client: deepfs.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stager's slots are page-locked and every storage passes through them."""
    base = unique_dir(client, "cuda-staging")
    obj = checkpoint()
    dtorch.save(obj, f"{base}/ck.pt", client=client)
    stagers: list[_read.Stager] = []
    real_init = _read.Stager.__init__

    def remember(self: _read.Stager, *args: object, **kwargs: object) -> None:
        real_init(self, *args, **kwargs)  # type: ignore[arg-type]
        stagers.append(self)

    monkeypatch.setattr(_read.Stager, "__init__", remember)  # observes the real stager, changes nothing
    got = dtorch.load(f"{base}/ck.pt", client=client, map_location="cuda:0")
    assert len(stagers) == 1 and stagers[0].cuda
    assert all(buffer.is_pinned() for buffer in stagers[0]._buffers)  # noqa: SLF001
    assert_same(obj, on("cpu", got))


def test_gpu_tensors_save_and_load_both_ways(client: deepfs.Client) -> None:
    base = unique_dir(client, "cuda-save")
    obj = on("cuda", {"weight": torch.randn(1000, 1000), "steps": torch.arange(10)})
    dtorch.save(obj, f"{base}/ck.pt", client=client)
    assert_same(on("cpu", obj), dtorch.load(f"{base}/ck.pt", client=client, map_location="cpu"))
    back = dtorch.load(f"{base}/ck.pt", client=client)  # default: where they were saved
    assert all(t.device.type == "cuda" for t in back.values())
    assert_same(on("cpu", obj), on("cpu", back))


def test_shared_views_stay_shared_on_the_gpu(client: deepfs.Client) -> None:
    base = unique_dir(client, "cuda-views")
    obj = shared_views()
    dtorch.save(obj, f"{base}/ck.pt", client=client)
    got = dtorch.load(f"{base}/ck.pt", client=client, map_location="cuda")
    ptr = got["base"].untyped_storage().data_ptr()
    assert all(got[k].untyped_storage().data_ptr() == ptr for k in obj)


def test_pin_memory_loads_page_locked_cpu_tensors(client: deepfs.Client) -> None:
    base = unique_dir(client, "cuda-pinned")
    obj = checkpoint()
    dtorch.save(obj, f"{base}/ck.pt", client=client)
    got = dtorch.load(f"{base}/ck.pt", client=client, pin_memory=True)
    assert all(t.is_pinned() for t in got.values() if t.numel())
    assert_same(obj, got)
