"""``deepfs.torch.load``: read a checkpoint from DeepFS, then let PyTorch rebuild it.

The bytes come first (``read_checkpoint``: every storage read in parallel
into its own buffer), then PyTorch's own ``_load`` unpickles ``data.pkl``
against the in-memory archive: tensors are built on those buffers without a
copy, sharing between views is preserved, and ``map_location`` means what
it means for ``torch.load``. ``weights_only=True`` (the default) unpickles
with PyTorch's restricted unpickler, which refuses anything but tensors,
containers and primitive types — loading never runs code from the file
unless the caller asks with ``weights_only=False``.

With ``map_location`` naming a CUDA device (and CUDA present), large
storages are read into page-locked staging buffers and copied to the GPU on
a side stream while later reads are still arriving.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any

import torch
import torch._weights_only_unpickler
import torch.serialization

from deepfs.client import Client
from deepfs.torch._archive import CheckpointError
from deepfs.torch._errors import explain
from deepfs.torch._progress import TransferBar
from deepfs.torch._read import LoadedArchive, ReadOptions, read_checkpoint
from deepfs.torch._target import resolve
from deepfs.url import KeyArg

_TRUE = ("1", "y", "yes", "true")


def load(
    f: Any,
    map_location: Any = None,
    pickle_module: Any = None,
    *,
    weights_only: bool = True,
    mmap: bool | None = None,
    client: Client | None = None,
    key: KeyArg = None,
    progress: bool | None = None,
    verify_crc: bool = False,
    pin_memory: bool = False,
    **pickle_load_args: Any,
) -> Any:
    """Load a checkpoint like ``torch.load``, straight from a DeepFS file.

    ``f`` is a ``deepfs://HOST:PORT/path`` URL (opened with ``key``, a key
    file's path; default ``$DEEPFS_KEY``, then ``~/.config/deepfs/key``), or a
    path on ``client``; a file-like object is handed to ``torch.load`` unchanged. Files written by
    ``torch.save`` (through the mount, say) load as well, including the
    pre-1.6 format. ``verify_crc`` also checks each storage's zip CRC-32 (the
    cluster already checks CRC32C of every block it serves); ``pin_memory``
    allocates CPU tensors page-locked. ``mmap`` needs a local file: use the
    FUSE mount and ``torch.load(..., mmap=True)`` for that.
    """
    target = resolve(f, client, key)
    if target is None:
        return torch.load(f, map_location, pickle_module, weights_only=weights_only, mmap=mmap, **pickle_load_args)
    if mmap:
        raise ValueError("mmap=True needs a local file; load through the DeepFS mount to memory-map a checkpoint")
    if os.getenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0").lower() in _TRUE:
        weights_only = True
    if weights_only:
        if pickle_module is not None:
            raise RuntimeError("Can not safely load weights when explicit pickle_module is specified")
        unpickler: Any = torch._weights_only_unpickler  # noqa: SLF001 - torch.load's own safe unpickler
    else:
        unpickler = pickle_module or pickle
    stage_to = None if verify_crc else _cuda_destination(map_location)
    options = ReadOptions(verify_crc=verify_crc, pin_memory=pin_memory, stage_to=stage_to)
    try:
        with TransferBar(f"loading {target.url}", progress) as bar:
            archive = target.client.run_async(
                read_checkpoint, target.client.aio, target.path, target.url, options, bar.set_total, bar.advance
            )
    except BaseException as exc:
        raise explain(exc, "loading", target.url) from exc
    if isinstance(archive, bytes):  # the legacy format: torch reads it from memory
        return torch.load(io.BytesIO(archive), map_location, pickle_module, weights_only=weights_only,
                          **pickle_load_args)
    pickle_load_args.setdefault("encoding", "utf-8")
    if "constants.pkl" in archive.records:
        raise CheckpointError(f"{target.url} is a TorchScript archive: load it with torch.jit.load through the mount")
    return _unpickle(archive, map_location, unpickler, weights_only, pickle_load_args)


def _unpickle(archive: LoadedArchive, map_location: Any, unpickler: Any, weights_only: bool,
              pickle_load_args: dict[str, Any]) -> Any:
    if "data.pkl" not in archive.records:
        raise CheckpointError(f"{archive.url}: the archive has no data.pkl: not a torch.save checkpoint")
    try:
        return torch.serialization._load(  # noqa: SLF001 - torch.load's own reader, so results match it
            archive, map_location, unpickler, **pickle_load_args)
    except pickle.UnpicklingError as exc:
        if not weights_only:
            raise
        raise pickle.UnpicklingError(
            f"Weights only load of {archive.url} failed: the checkpoint holds objects that the safe unpickler "
            f"refuses. Pass weights_only=False only if you trust its source (it can run arbitrary code), or "
            f"allow the types with torch.serialization.add_safe_globals.\n\n{exc}"
        ) from None




def _cuda_destination(map_location: Any) -> torch.device | None:
    """The one CUDA device every storage goes to, when ``map_location`` says so and CUDA is here."""
    if isinstance(map_location, bytes):
        map_location = map_location.decode()
    if not isinstance(map_location, (str, torch.device)):
        return None
    try:
        device = torch.device(map_location)
    except RuntimeError:
        return None
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.device("cuda", index)
