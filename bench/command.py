"""``deepfs bench`` (and ``python -m bench``): the benchmark's command-line options, turned into a ``BenchConfig``.

The command lives here, not in the ``deepfs`` command's package, so the
benchmark runs on its own; ``deepfs_cli.main`` only adds it to the group.
Every failure ends in one line on stderr and exit status 1, as for the other
``deepfs`` commands.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NoReturn

import click


@click.command()
@click.option("--quick", is_flag=True, help="seconds and tiny files: a smoke test of the harness itself")
@click.option("--targets", default=None, metavar="LIST",
              help="comma-separated: deepfs (FUSE + client/adapter), deepfs-client, deepfs-tls, local, bindfs, gluster "
                   "[default: deepfs,local,bindfs,gluster; --quick: deepfs,local,bindfs]")
@click.option("--suites", default=None, metavar="LIST",
              help="fio,smallfiles,dataload,checkpoint,degraded,repair,metadata [default: all]")
@click.option("--jobs", "fio_jobs", default=None, metavar="LIST",
              help="fio jobs to run [default: all eight; quick: five]")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="where results.json/.md and the charts go [default: bench/out/DATE; --quick: a temp dir]")
@click.option("--reps", type=click.IntRange(1), default=None, help="repetitions of every measurement [3; quick 2]")
@click.option("--runtime", type=click.FloatRange(0.1), default=None, help="seconds per fio job [4; quick 0.25]")
@click.option("--ramp", type=click.FloatRange(0), default=None, help="unmeasured seconds before each job [1; quick 0]")
@click.option("--size-mb", type=click.IntRange(4), default=None, help="fio test file, MiB [1024; quick 16]")
@click.option("--smallfiles", "smallfiles_count", type=click.IntRange(1), default=None,
              help="small files per run [3000; quick 200]")
@click.option("--smallfiles-threads", type=click.IntRange(1), default=None, help="threads for small files [4]")
@click.option("--dataload-files", type=click.IntRange(1), default=None,
              help="files of 64-256 KiB the DataLoader epoch reads [20000; quick 300]")
@click.option("--checkpoint-mb", type=click.IntRange(1), default=None, help="state dict size, MiB [1024; quick 16]")
@click.option("--drop-caches/--no-drop-caches", default=None,
              help="drop the page cache before reads (root) [on; quick off]")
@click.option("--buffered", is_flag=True, help="fio without O_DIRECT")
@click.option("--repair-mb", type=click.IntRange(16), default=None,
              help="data on the repair suite's cluster when it loses a node, MiB [1024; quick 64]")
@click.option("--repair-mib-s", type=click.FloatRange(1), default=None,
              help="the repair suite's repair bandwidth, MiB/s read + written [50; quick 30]")
@click.option("--meta-engines", default=None, metavar="LIST",
              help="metadata suite: lmdb, etcd-1, etcd-3 (1 / 3 metadata servers over etcd) "
                   "[default: all three; --quick: lmdb]")
@click.option("--metadata-files", type=click.IntRange(16), default=None,
              help="metadata suite: files per measurement [400; quick 48]")
@click.option("--nodes", type=click.IntRange(1), default=6, show_default=True, help="DeepFS storage nodes")
@click.option("--k", type=click.IntRange(1), default=4, show_default=True)
@click.option("--m", type=click.IntRange(0), default=2, show_default=True)
@click.option("--work-dir", default=None, type=click.Path(file_okay=False),
              help="parent of the scratch directory; must be on the local disk [/var/tmp]")
def bench(quick: bool, targets: str | None, suites: str | None, fio_jobs: str | None, out_dir: str | None,
          reps: int | None, runtime: float | None, ramp: float | None, size_mb: int | None,
          smallfiles_count: int | None, smallfiles_threads: int | None, dataload_files: int | None,
          checkpoint_mb: int | None,
          drop_caches: bool | None, buffered: bool, repair_mb: int | None, repair_mib_s: float | None,
          meta_engines: str | None, metadata_files: int | None, nodes: int, k: int, m: int,
          work_dir: str | None) -> None:
    """Benchmark DeepFS beside the local disk, bindfs and GlusterFS, side by side in one run.

    Starts a local cluster (and the other targets), runs the fio job set, small
    files, a PyTorch DataLoader epoch, checkpoints and degraded reads on each, then the repair suite on a
    cluster of its own, writes results.json,
    results.md (ratios to DeepFS) and PNG charts, and stops everything again,
    also on Ctrl-C. See bench/RESULTS.md.
    """
    # Imported here so that ``deepfs --help`` and the other commands do not load the harness.
    from bench.fio_runner import JOBS_BY_NAME
    from bench.metadata_ops import ENGINES
    from bench.runner import SUITES, BenchConfig, command_line, run
    from bench.targets import ClusterSettings, parse_target_names

    config = BenchConfig.quick_preset() if quick else BenchConfig()
    try:
        if targets is not None:
            config.targets = parse_target_names(targets)
        if suites is not None:
            config.suites = _choices(suites, SUITES, "suite")
        if fio_jobs is not None:
            config.jobs = _choices(fio_jobs, tuple(JOBS_BY_NAME), "fio job")
        if meta_engines is not None:
            config.metadata_engines = _choices(meta_engines, tuple(ENGINES), "metadata engine")
        if k + m > nodes:
            raise ValueError(f"RS {k}+{m} needs at least {k + m} storage nodes, --nodes is {nodes}")
    except ValueError as exc:
        _fail(str(exc))
    overrides = {"reps": reps, "runtime_s": runtime, "ramp_s": ramp, "smallfiles_count": smallfiles_count,
                 "smallfiles_threads": smallfiles_threads, "dataload_files": dataload_files,
                 "drop_caches": drop_caches,
                 "file_size_bytes": size_mb << 20 if size_mb else None,
                 "checkpoint_bytes": checkpoint_mb << 20 if checkpoint_mb else None,
                 "repair_data_bytes": repair_mb << 20 if repair_mb else None, "repair_mib_s": repair_mib_s,
                 "metadata_files": metadata_files}
    for name, value in overrides.items():
        if value is not None:
            setattr(config, name, value)
    config.direct = not buffered
    config.cluster = ClusterSettings(nodes=nodes, k=k, m=m)
    config.out_dir = Path(out_dir) if out_dir else None
    config.work_dir = Path(work_dir) if work_dir else None
    config.command = command_line()
    sys.exit(run(config))


def _choices(text: str, allowed: tuple[str, ...], what: str) -> list[str]:
    chosen = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in allowed]
    if unknown or not chosen:
        raise ValueError(f"unknown {what} {', '.join(unknown) or '(none given)'}; choose from {', '.join(allowed)}")
    return chosen


def _fail(message: str) -> NoReturn:
    click.echo(f"deepfs: {message}", err=True)
    sys.exit(1)
