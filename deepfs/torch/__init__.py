"""Torch checkpoint adapter: ``torch.save``/``torch.load`` straight into DeepFS.

>>> import deepfs.torch
>>> deepfs.torch.save(model.state_dict(), "deepfs://10.0.0.5:7700/ckpt/step100.pt")
>>> state = deepfs.torch.load("deepfs://10.0.0.5:7700/ckpt/step100.pt", map_location="cuda")

The adapter is the checkpoint fast path beside the FUSE mount: it talks to
the metadata server and the storage nodes directly, streams tensors from
their own memory into whole stripes that are encoded and stored while later
tensors are still being serialized, and reads many stripes at once straight
into the buffers the loaded tensors use. The file is PyTorch's own format
(storages aligned to 4 KiB), so ``torch.load`` reads it through the mount.
See ``docs/TORCH.md`` for the on-disk layout.

Layers:
- ``save``, ``load``, ``CheckpointError`` — the torch.save/torch.load twins;
- ``deepfs.torch.dcp`` — ``torch.distributed.checkpoint`` storage writer and
  reader (imported on demand: it pulls in torch.distributed);
- ``deepfs.fsspec_fs`` — the generic ``deepfs://`` fsspec file system.

Requires the optional extra ``deepfs[torch]``; ``import deepfs`` alone never
imports torch.
"""

from deepfs.torch._archive import CheckpointError
from deepfs.torch._load import load
from deepfs.torch._save import save

__all__ = ["CheckpointError", "load", "save"]
