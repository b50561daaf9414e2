"""What every target family builds on: ``Target``, ``FailureGroup`` and the one way a target says "skip me"."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class TargetSkipped(Exception):
    """A target could not start; the message is the reason the report shows."""


class FailureGroup:
    """What degraded mode stops: shared by the targets that use the same servers."""

    name = ""

    @contextlib.contextmanager
    def degraded(self, wait: bool) -> Iterator[str]:
        """Stop m servers while open; yields a one-line description of what was stopped."""
        raise NotImplementedError
        yield ""


@dataclass
class Target:
    name: str
    surface: str = "posix"  # "posix": a directory at ``root``; "client": ``client`` (a deepfs.Client)
    description: str = ""
    root: Path | None = None
    client: Any = None
    connect: Callable[[], Any] | None = None  # opens another client of ``client``'s cluster (data-loader workers)
    direct: bool = True  # O_DIRECT reaches the target's storage (False: the flag is dropped on the way)
    notes: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    skipped: str | None = None  # the reason, when the target could not start
    failure_group: FailureGroup | None = None

    @property
    def ok(self) -> bool:
        return self.skipped is None

    def summary(self) -> dict[str, Any]:
        return {
            "status": "skipped" if self.skipped else "ok",
            "reason": self.skipped,
            "surface": self.surface,
            "description": self.description,
            "root": str(self.root) if self.root else None,
            "direct_io": self.direct,
            "notes": self.notes,
            "versions": self.versions,
            "degraded_mode": self.failure_group.name if self.failure_group else None,
        }


def first_line(exc: object) -> str:
    """The first non-blank line of an error, whitespace squeezed: what fits in a skip reason."""
    text = str(exc).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return re.sub(r"\s+", " ", lines[0] if lines else type(exc).__name__)
