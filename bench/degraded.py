"""Degraded mode: sequential and random reads while m servers of a target are stopped.

Only targets with redundancy take part (DeepFS: m storage nodes of the RS
k+m cluster; GlusterFS: ``redundancy`` bricks of the disperse volume). The
reads go to the file laid out earlier, so every stripe must be rebuilt from
survivors on the fly wherever a lost fragment held data. Each failure group
is degraded once, for all the targets that share it, and brought back
before the next; the report sets each figure beside the healthy one from
the same run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench.fio_runner import JOBS_BY_NAME, JobSpec
from bench.targets import FailureGroup, Target, TargetSkipped

DEGRADED_JOBS = ("seqread_1m_j1", "randread_4k_j1_qd1")


def failure_groups(targets: list[Target]) -> list[tuple[FailureGroup, list[Target]]]:
    groups: dict[int, tuple[FailureGroup, list[Target]]] = {}
    for target in targets:
        if target.ok and target.failure_group is not None:
            groups.setdefault(id(target.failure_group), (target.failure_group, []))[1].append(target)
    return list(groups.values())


def run(targets: list[Target], reps: int, wait: bool, run_one: Callable[[Target, JobSpec, int, str], None],
        on_skip: Callable[[Target, str], None], log: Any = print) -> None:
    """For each failure group: stop its servers, run the degraded jobs ``reps`` times on its targets."""
    jobs = [JOBS_BY_NAME[name] for name in DEGRADED_JOBS]
    for group, members in failure_groups(targets):
        try:
            with group.degraded(wait) as what:
                log(f"[degraded] {group.name}: {what}")
                for job in jobs:
                    for rep in range(reps):
                        for target in members:
                            run_one(target, job, rep, what)
        except TargetSkipped as exc:
            for target in members:
                on_skip(target, str(exc))
