"""One error taxonomy for the whole system.

- ``RemoteError`` (an ``OSError``): an operation failed with a POSIX errno,
  either on a server or in the client library. The mount returns that errno;
  the library raises it as is, so ``except FileNotFoundError`` works.
- ``ProtocolError`` (in ``deepfs.frames``): a peer sent garbage; the
  connection is closed.
- ``ChecksumError``: stored bytes did not match their CRC32C. Servers report
  it with errno ``EBADMSG``; clients fall back to a degraded read.
- ``UnavailableError``: not enough storage nodes answered to read or write a
  stripe (``EIO`` at the mount).
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
