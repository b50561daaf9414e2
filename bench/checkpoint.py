"""Checkpoint save and load: a state dict of mixed tensor sizes, like a transformer's.

On a directory target: ``torch.save`` then ``torch.load(weights_only=True,
map_location="cpu")`` — the local disk, the FUSE mount, bindfs, Gluster. On
the client target: ``deepfs.torch.save``/``deepfs.torch.load`` (the adapter),
when it imports; otherwise the target is reported as skipped with the reason.

Two save figures, because they promise different things:
- ``save_s``: until ``torch.save`` returns. On the local disk the bytes may
  still be only in the page cache then.
- ``save_durable_s``: until the bytes are durable (``torch.save`` + fsync of
  the file; on the DeepFS mount that fsync makes the nodes sync the file's
  fragments). The adapter's save fsyncs and renames before it returns, so
  for it the two are the same operation.
Then the same state dict through ``torch.distributed.checkpoint`` (one
process): PyTorch's ``FileSystemWriter``/``FileSystemReader`` on a directory
target, ``DeepFSStorageWriter``/``DeepFSStorageReader`` on the client target.
The loaded state dict is checked against the saved one (shapes, dtypes and a
few values) so a fast wrong answer cannot pass.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any


def adapter_status() -> str | None:
    """None when deepfs.torch imports; else why not (the skip reason)."""
    try:
        import deepfs.torch  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure is the reason
        return f"deepfs.torch is not importable: {exc}"
    return None


def make_state_dict(target_bytes: int, seed: int = 0) -> dict[str, Any]:
    """About ``target_bytes`` of tensors shaped like a transformer's: a big embedding, per-layer
    matrices of a few sizes, small norms and biases, a bf16 head and int64 counters."""
    import torch

    width = 1024 if target_bytes >= 256 << 20 else 256
    vocab = 32000 if width == 1024 else 4000
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int, dtype: Any = torch.float32) -> Any:
        return torch.randn(*shape, generator=generator).to(dtype)

    state: dict[str, Any] = {"embed.weight": rand(vocab, width)}
    layer = 0
    while _nbytes(state) < target_bytes - 2 * vocab * width:
        p = f"layers.{layer}."
        state[p + "attn.qkv.weight"] = rand(3 * width, width)
        state[p + "attn.qkv.bias"] = rand(3 * width)
        state[p + "attn.proj.weight"] = rand(width, width)
        state[p + "mlp.up.weight"] = rand(4 * width, width)
        state[p + "mlp.up.bias"] = rand(4 * width)
        state[p + "mlp.down.weight"] = rand(width, 4 * width)
        state[p + "norm1.weight"] = rand(width)
        state[p + "norm2.weight"] = rand(width)
        state[p + "steps"] = torch.tensor([layer], dtype=torch.int64)
        layer += 1
    state["head.weight"] = rand(vocab, width, dtype=torch.bfloat16)
    return state


def state_bytes(state: dict[str, Any]) -> int:
    return _nbytes(state)


def _nbytes(state: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def save_load_posix(state: dict[str, Any], directory: Path, name: str,
                    before_load: Any = lambda: None) -> dict[str, float]:
    import torch

    path = directory / name
    path.unlink(missing_ok=True)
    started = time.perf_counter()
    torch.save(state, path)
    saved = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    durable = time.perf_counter()
    before_load()
    load_started = time.perf_counter()
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    loaded_at = time.perf_counter()
    check_same(state, loaded)
    del loaded
    path.unlink()
    return {"save_s": saved - started, "save_durable_s": durable - started, "load_s": loaded_at - load_started}


def save_load_adapter(state: dict[str, Any], client: Any, directory: str, name: str,
                      before_load: Any = lambda: None) -> dict[str, float]:
    import deepfs.torch

    path = f"{directory.rstrip('/')}/{name}"
    if client.exists(path):
        client.unlink(path)
    started = time.perf_counter()
    deepfs.torch.save(state, path, client=client, progress=False)
    saved = time.perf_counter()  # fsynced and renamed into place before save returns
    before_load()
    load_started = time.perf_counter()
    loaded = deepfs.torch.load(path, client=client, map_location="cpu", progress=False)
    loaded_at = time.perf_counter()
    check_same(state, loaded)
    del loaded
    client.unlink(path)
    return {"save_s": saved - started, "save_durable_s": saved - started, "load_s": loaded_at - load_started}


def dcp_save_load(state: dict[str, Any], writer: Any, reader: Any, before_load: Any = lambda: None) -> dict[str, float]:
    """``torch.distributed.checkpoint`` save then load (one process, no process group) with
    the given storage writer and reader: PyTorch's FileSystemWriter/Reader on a directory
    (sync_files: every shard fsynced), DeepFSStorageWriter/Reader on the cluster."""
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming the intent is to save in a single process"
        started = time.perf_counter()
        dcp.save(state, storage_writer=writer)
        saved = time.perf_counter()
        before_load()
        loaded = {key: torch.empty_like(tensor) for key, tensor in state.items()}
        load_started = time.perf_counter()
        dcp.load(loaded, storage_reader=reader)
        loaded_at = time.perf_counter()
    check_same(state, loaded)
    return {"dcp_save_s": saved - started, "dcp_load_s": loaded_at - load_started}


def dcp_posix(state: dict[str, Any], directory: Path, name: str, before_load: Any = lambda: None) -> dict[str, float]:
    import shutil

    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

    path = directory / name
    shutil.rmtree(path, ignore_errors=True)
    try:
        return dcp_save_load(state, FileSystemWriter(path), FileSystemReader(path), before_load)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def dcp_client(state: dict[str, Any], client: Any, directory: str, name: str,
               before_load: Any = lambda: None) -> dict[str, float]:
    from deepfs.torch.dcp import DeepFSStorageReader, DeepFSStorageWriter

    path = f"{directory.rstrip('/')}/{name}"
    try:
        return dcp_save_load(state, DeepFSStorageWriter(path, client=client), DeepFSStorageReader(path, client=client),
                             before_load)
    finally:
        if client.exists(path):
            for entry in client.listdir(path):
                client.unlink(f"{path}/{entry}")
            client.rmdir(path)


def check_same(saved: dict[str, Any], loaded: dict[str, Any]) -> None:
    import torch

    if saved.keys() != loaded.keys():
        raise RuntimeError("the loaded checkpoint has different keys")
    for i, (key, tensor) in enumerate(saved.items()):
        other = loaded[key]
        if other.shape != tensor.shape or other.dtype != tensor.dtype:
            raise RuntimeError(f"{key}: loaded {other.dtype}{tuple(other.shape)}, "
                               f"saved {tensor.dtype}{tuple(tensor.shape)}")
        if i % 7 == 0 and not torch.equal(other, tensor):  # every 7th tensor byte for byte: cheap, catches mixups
            raise RuntimeError(f"{key}: loaded values differ from the saved ones")
