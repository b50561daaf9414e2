"""Syscalls Python's os module does not expose: renameat2 flags, utimensat's
UTIME_NOW / UTIME_OMIT. Used by the FUSE tests to drive the real kernel paths."""

from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)

AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _check(result: int, *paths: object) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), *[os.fspath(p) for p in paths[:1]])


def renameat2(src: os.PathLike | str, dst: os.PathLike | str, flags: int) -> None:
    _check(_libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), ctypes.c_uint(flags)), src)


def utimensat(path: os.PathLike | str, atime: tuple[int, int], mtime: tuple[int, int]) -> None:
    """Times as (seconds, nanoseconds); nanoseconds may be UTIME_NOW or UTIME_OMIT."""
    times = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    _check(_libc.utimensat(AT_FDCWD, os.fsencode(path), times, 0), path)
