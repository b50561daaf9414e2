"""What the unit-layer tests share: async tests without pytest-trio, and a client
of an in-process cluster.

``@trio_test`` turns ``async def test_x(tmp_path)`` into a plain test
function that runs it in a fresh ``trio.run`` under a deadline: a unit test
that hangs fails in seconds instead of waiting for pytest-timeout.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from deepfs.client import AsyncClient
from deepfs.layout import Layout
from deepfs.testing.memory_cluster import DEFAULT_LAYOUT, MemoryCluster

UNIT_DEADLINE_S = 10.0


def trio_test(fn: Callable[..., Awaitable[Any]]) -> Callable[..., None]:
    @functools.wraps(fn)  # keeps the signature, so pytest still passes fixtures
    def run(*args: Any, **kwargs: Any) -> None:
        async def main() -> None:
            with trio.fail_after(UNIT_DEADLINE_S):
                await fn(*args, **kwargs)

        trio.run(main)

    return run


@asynccontextmanager
async def memory_client(tmp_path: Path, layout: Layout = DEFAULT_LAYOUT
                        ) -> AsyncIterator[tuple[MemoryCluster, AsyncClient]]:
    """Six memory nodes with ``layout`` as the default, and a client of them."""
    async with MemoryCluster.start(tmp_path, nodes=6, layout=layout) as cluster, \
            cluster.connect_client() as client:
        yield cluster, client
