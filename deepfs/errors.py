"""One error taxonomy for the whole system.

Two kinds of wrong, as in h11, plus failures of the storage itself:

- **Misuse** — the caller asked for something that can never work. In this
  process: ``ConfigError`` (a bad layout, address or setting). From a peer:
  a well-formed request with a bad body is answered ``EINVAL``, an op the
  server does not serve ``ENOSYS``, and the connection keeps serving
  (``deepfs.messages.validate``).
- **Peer garbage** — ``ProtocolError`` (in ``deepfs.frames``): bytes that are
  not a valid frame. The connection carrying them is closed; nothing else is.
- **Operation failures** are plain ``OSError`` subclasses with a POSIX errno
  (``os_error`` picks the subclass), whether the errno came from a server
  (a response with ``FLAG_ERROR``; ``FrameClient.call`` raises it) or from
  the client library. The mount returns that errno; the library raises it
  as is, so ``except FileNotFoundError`` works. Two of them have their own
  type: ``ChecksumError`` (stored bytes did not match their CRC32C; errno
  ``EBADMSG``, clients fall back to a degraded read) and
  ``UnavailableError`` (not enough storage nodes answered to read or write a
  stripe; ``EIO`` at the mount).
"""

from __future__ import annotations

import errno as _errno
import os


def os_error(code: int, message: str = "", filename: str | None = None) -> OSError:
    """Build the right OSError subclass (FileNotFoundError, …) for ``code``."""
    text = message or os.strerror(code)
    if filename is not None:
        return OSError(code, text, filename)
    return OSError(code, text)


class ChecksumError(OSError):
    """Stored bytes failed their CRC32C check."""

    def __init__(self, message: str) -> None:
        super().__init__(_errno.EBADMSG, message)


class UnavailableError(OSError):
    """Too few storage nodes answered to serve a stripe."""

    def __init__(self, message: str) -> None:
        super().__init__(_errno.EIO, message)


class ConfigError(ValueError):
    """The caller asked for something that can never work (bad layout, bad address)."""
