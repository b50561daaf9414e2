"""Small trio helpers shared by the client and the servers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

import trio


async def run_all(tasks: Iterable[Callable[[], Awaitable[object]]]) -> None:
    """Run the tasks concurrently; if any fails, cancel the rest and raise the
    first failure itself (not wrapped in an ExceptionGroup), so callers can
    ``except OSError`` as with sequential code."""
    tasks = list(tasks)
    if len(tasks) == 1:
        # The common case on the read path (one stripe part, one fragment): a
        # nursery and a task cost more there than the 4 KiB read they carry.
        await tasks[0]()
        return
    failure: list[BaseException] = []

    async def guarded(task: Callable[[], Awaitable[object]], cancel: trio.CancelScope) -> None:
        try:
            await task()
        except Exception as exc:  # noqa: BLE001 - re-raised below
            if not failure:
                failure.append(exc)
            cancel.cancel()

    async with trio.open_nursery() as nursery:
        for task in tasks:
            nursery.start_soon(guarded, task, nursery.cancel_scope)
    if failure:
        raise failure[0]


def sole_exception(group: BaseExceptionGroup) -> BaseException | None:
    """The one exception inside a (nested) group, or None if there are several."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    return leaves[0] if len(leaves) == 1 else None


def soon_in_trio(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn`` made safe to call from any thread: it runs soon in the trio thread that called
    ``soon_in_trio`` (in order, ``run_sync_soon``), and not at all once that loop has ended
    (nobody is left to tell). Built outside trio (tests), ``fn`` is called as it is."""
    try:
        token = trio.lowlevel.current_trio_token()
    except RuntimeError:
        token = None

    def soon() -> None:
        if token is None:
            fn()
            return
        try:
            token.run_sync_soon(fn)
        except trio.RunFinishedError:
            pass

    return soon
