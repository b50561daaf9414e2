"""torch.distributed.checkpoint onto DeepFS: two gloo ranks in separate
processes save shards in parallel, then load them back into fresh state."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch  # a test dependency: missing torch must fail, not skip

import deepfs
from tests.conftest import unique_dir

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parent.parent

RANK = textwrap.dedent("""
    import os, sys
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from deepfs.torch.dcp import DeepFSStorageReader, DeepFSStorageWriter

    url = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))

    def state(fill):
        torch.manual_seed(0)
        full = torch.randn(512, 256) if fill else torch.zeros(512, 256)
        return {
            "sharded": distribute_tensor(full, mesh, [Shard(0)]),  # each rank holds half the rows
            "replicated": torch.arange(10_000, dtype=torch.int64) if fill else torch.zeros(10_000, dtype=torch.int64),
            f"rank{rank}": torch.full((200_000,), float(rank + 1)) if fill else torch.zeros(200_000),
            "step": 42 if fill else 0,
        }

    saved = state(True)
    dcp.save(saved, storage_writer=DeepFSStorageWriter(url))
    dist.barrier()
    loaded = state(False)
    dcp.load(loaded, storage_reader=DeepFSStorageReader(url))
    assert torch.equal(loaded["sharded"].to_local(), saved["sharded"].to_local())
    assert torch.equal(loaded["sharded"].full_tensor(), saved["sharded"].full_tensor())
    assert torch.equal(loaded["replicated"], saved["replicated"])
    assert torch.equal(loaded[f"rank{rank}"], saved[f"rank{rank}"])
    assert loaded["step"] == 42
    dist.barrier()
    dist.destroy_process_group()
    print(f"rank {rank} ok", flush=True)
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_save_and_load(client: deepfs.Client, tmp_path: Path) -> None:
    base = unique_dir(client, "dcp")
    url = f"deepfs://{client.meta_address}{base}/step42"
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    env_base = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
                "PYTHONPATH": str(REPO), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    ranks = []
    logs = []
    try:
        for rank in range(2):
            log = open(tmp_path / f"rank{rank}.log", "w+")  # closed below
            logs.append(log)
            env = {**os.environ, **env_base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            ranks.append(subprocess.Popen([sys.executable, str(script), url], cwd=str(REPO), env=env,
                                          stdout=log, stderr=subprocess.STDOUT))
        for proc in ranks:
            proc.wait(timeout=100)
    finally:
        for proc in ranks:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        outputs = []
        for log in logs:
            log.seek(0)
            outputs.append(log.read())
            log.close()
    for rank, (proc, out) in enumerate(zip(ranks, outputs, strict=True)):
        assert proc.returncode == 0 and f"rank {rank} ok" in out, f"rank {rank} failed:\n{out[-3000:]}"
    names = client.listdir(f"{base}/step42")
    assert ".metadata" in names
    shards = sorted(n for n in names if n.endswith(".distcp"))
    assert [n.split("_")[2] for n in shards] == ["0", "1"]  # __0_0.distcp, __1_0.distcp: one per rank
    assert all(client.stat(f"{base}/step42/{n}").st_size > 100_000 for n in shards)


# ------------------------------------------- one process: what the reader does itself
def many_tensors() -> dict[str, object]:
    g = torch.Generator().manual_seed(5)
    state: dict[str, object] = {f"w{i}": torch.randn(1000 + 37 * i, generator=g) for i in range(40)}
    state["big"] = torch.randn(600_000, generator=g)
    state["bf16"] = torch.randn(3, 5000, generator=g).to(torch.bfloat16)
    state["view"] = torch.arange(100_000)[::3]  # non-contiguous: DCP stores its values
    state["meta"] = {"step": 7, "name": "run-1"}  # not a tensor: stored as bytes
    return state


def zeros_like(state: dict[str, object]) -> dict[str, object]:
    """DCP loads in place: the same keys, tensors of the same shapes, placeholders for the rest."""
    return {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else {"step": 0, "name": ""}
            for k, v in state.items()}


SINGLE_PROCESS = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


@SINGLE_PROCESS
def test_load_reads_windows_of_items_in_parallel_into_the_planners_tensors(
        client: deepfs.Client, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed.checkpoint as dcp

    from deepfs.torch import dcp as deepfs_dcp

    base = unique_dir(client, "dcp-one")
    saved = many_tensors()
    dcp.save(saved, storage_writer=deepfs_dcp.DeepFSStorageWriter(f"{base}/ck", client=client))
    shard = next(n for n in client.listdir(f"{base}/ck") if n.endswith(".distcp"))
    with client.open(f"{base}/ck/{shard}", "rb") as f:  # shard files get the checkpoint's wide stripes
        assert f._handle.layout.stripe_size >= client.aio.config.checkpoint_stripe_bytes  # noqa: SLF001
    monkeypatch.setattr(deepfs_dcp, "READ_WINDOW_BYTES", 1 << 20)  # many windows, one item larger than one
    loaded = zeros_like(saved)
    dcp.load(loaded, storage_reader=deepfs_dcp.DeepFSStorageReader(f"{base}/ck", client=client))
    for key, value in saved.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(loaded[key], value), key
    assert loaded["meta"] == {"step": 7, "name": "run-1"}


@SINGLE_PROCESS
def test_load_errors_are_clear(client: deepfs.Client) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from deepfs.torch import CheckpointError
    from deepfs.torch.dcp import DeepFSStorageReader, DeepFSStorageWriter

    base = unique_dir(client, "dcp-bad")
    saved = {"w": torch.randn(300_000), "b": torch.randn(10)}
    dcp.save(saved, storage_writer=DeepFSStorageWriter(f"{base}/ck", client=client))
    shard = next(f"{base}/ck/{n}" for n in client.listdir(f"{base}/ck") if n.endswith(".distcp"))
    with client.open(shard, "r+b") as f:
        f.truncate(client.stat(shard).st_size // 2)
    with pytest.raises(CheckpointException) as failure:  # DCP wraps what a rank raised
        dcp.load({"w": torch.zeros(300_000), "b": torch.zeros(10)},
                 storage_reader=DeepFSStorageReader(f"{base}/ck", client=client))
    error, _where = failure.value.failures[0]  # rank 0's exception and its stack
    assert isinstance(error, CheckpointError) and "the checkpoint is truncated" in str(error)
