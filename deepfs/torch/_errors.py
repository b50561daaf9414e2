"""Errors of the checkpoint adapter, each naming the checkpoint it is about.

- ``CheckpointError`` (a ``RuntimeError``): the file is not a readable
  checkpoint — truncated, corrupt, not a PyTorch archive.
- ``OSError`` with the client's errno: the file system failed — missing
  file (``FileNotFoundError``), cluster full (``ENOSPC``), data unavailable
  because too many storage nodes are down or fragments are corrupt beyond
  repair (``EIO``). The message says which and names the URL.
"""

from __future__ import annotations

import errno

from deepfs.torch._archive import CheckpointError

__all__ = ["CheckpointError", "explain"]

_HINTS = {
    errno.ENOSPC: "the DeepFS cluster is full",
    errno.EDQUOT: "the DeepFS quota is exhausted",
    errno.ECONNREFUSED: "the metadata server is unreachable",
}
_EIO_HINTS = {
    "saving": "too few storage nodes stored the data (too many nodes down)",
    "loading": "the data is unavailable (too many storage nodes down, or fragments corrupt beyond repair)",
}


def explain(exc: BaseException, action: str, url: str) -> BaseException:
    """The exception to raise for ``exc`` that happened while ``action``-ing ``url``."""
    if isinstance(exc, CheckpointError):
        if url in str(exc):
            return exc
        return CheckpointError(f"{url}: {exc}")
    if isinstance(exc, FileNotFoundError):
        return FileNotFoundError(errno.ENOENT, f"{action} {url}: no such file", url)
    if isinstance(exc, OSError) and exc.errno is not None:
        detail = exc.strerror or str(exc)
        hint = _EIO_HINTS.get(action) if exc.errno == errno.EIO else _HINTS.get(exc.errno)
        message = f"{action} {url} failed: {hint}: {detail}" if hint else f"{action} {url} failed: {detail}"
        return OSError(exc.errno, message, url)
    return exc
