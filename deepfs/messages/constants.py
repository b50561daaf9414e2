"""Numbers both ends of the protocol must agree on.

A client that checks a name's length, a mount that passes rename flags
through and the metadata server that enforces them all read them from here,
so they cannot drift apart.
"""

from __future__ import annotations

ROOT_INO = 1
"""Inode number of the root directory (HELLO's ``root``)."""

NAME_MAX = 255
"""Longest file name, and longest xattr name, in bytes (Linux's NAME_MAX)."""

PATH_MAX = 4096
"""Longest path RESOLVE walks, in bytes (Linux's PATH_MAX)."""

MISSING_NODE = -1
"""Placement entry of a fragment no node holds (written degraded, awaiting repair)."""

RENAME_NOREPLACE = 1
"""RENAME flag: fail with EEXIST instead of replacing the target (renameat2)."""
RENAME_EXCHANGE = 2
"""RENAME flag: swap source and target atomically (renameat2)."""
RENAME_FLAGS = RENAME_NOREPLACE | RENAME_EXCHANGE
"""Every RENAME flag DeepFS serves (RENAME_WHITEOUT is not one)."""

U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1
