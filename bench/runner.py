"""One benchmark run: start the targets, run every suite on each, write the report, stop everything.

Fairness rules the loops follow:
- every target runs the same job with the same parameters in the same
  session; targets take turns job by job (and the order rotates with each
  repetition), so a slow drift of the machine's load hits all of them alike;
- each figure is ``reps`` samples: the report gives the median and min..max;
- before reads the page cache is dropped (root only), so reads come from the
  file system and not from the client's memory.

Cleanup: everything started is on one ``ExitStack``; it is closed in a
``finally`` with SIGINT/SIGTERM ignored meanwhile, so Ctrl-C, SIGTERM or a
failure still unmounts and stops every mount, cluster and daemon. The report
is written in any case, marked interrupted or failed when it is partial.
"""

from __future__ import annotations

import contextlib
import shlex
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from bench import degraded, fio_runner, metadata_ops, pyio, report, smallfiles
from bench.fio_runner import JOBS_BY_NAME, JobSpec, MiB, RunParams, Sample
from bench.repair import RepairParams, RepairRun
from bench.report import CHECKPOINT_JOBS
from bench.stats import Result
from bench.system import PageCache, load_average, machine_info, versions
from bench.targets import ClusterSettings, Target, open_targets, parse_target_names

SUITES = ("fio", "smallfiles", "dataload", "checkpoint", "degraded", "repair", "metadata")
TEST_FILE = "bench.dat"
QUICK_JOBS = ("seqwrite_1m_j1", "seqread_1m_j4", "randread_4k_j1_qd1", "randread_4k_j1_qd32", "randwrite_4k_j1")
"""Every job file, 1 and 4 jobs, both engines: the harness's paths in a fraction of the time."""


@dataclass
class BenchConfig:
    """Every parameter of a run; the report records all of them."""

    quick: bool = False
    targets: list[str] = field(default_factory=lambda: parse_target_names("deepfs,local,bindfs,gluster"))
    suites: list[str] = field(default_factory=lambda: list(SUITES))
    jobs: list[str] = field(default_factory=lambda: list(JOBS_BY_NAME))
    reps: int = 3
    runtime_s: float = 4.0
    ramp_s: float = 1.0
    file_size_bytes: int = 1 << 30
    direct: bool = True
    smallfiles_count: int = 3_000  # sized so a full run stays within ~20 min here
    smallfiles_threads: int = 4
    dataload_files: int = 20_000  # files of 64-256 KiB one DataLoader epoch reads (bench/dataload.py)
    checkpoint_bytes: int = 1 << 30
    drop_caches: bool = True
    degraded_wait: bool = True  # wait until stopped nodes are marked down (steady state)
    repair_data_bytes: int = 1 << 30  # what the repair suite's cluster holds when it loses a node
    repair_mib_s: float = 50.0  # its repair bandwidth (bytes read + written; MetaConfig's default is 100)
    repair_reps: int = 3
    metadata_engines: list[str] = field(default_factory=lambda: list(metadata_ops.ENGINES))
    metadata_files: int = 400  # files per (threads, directories) combination and repetition
    metadata_mount_files: int = 300
    failover_trials: int = 3
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    out_dir: Path | None = None
    work_dir: Path | None = None  # parent of the scratch directory (must be on the local disk)
    command: str = ""

    @classmethod
    def quick_preset(cls) -> BenchConfig:
        """Seconds, tiny files: a smoke test of the harness itself (``make test`` runs it)."""
        return cls(quick=True, targets=parse_target_names("deepfs,local,bindfs"), jobs=list(QUICK_JOBS), reps=2,
                   runtime_s=0.25, ramp_s=0.0, file_size_bytes=16 * MiB, smallfiles_count=200, dataload_files=300,
                   checkpoint_bytes=16 * MiB, drop_caches=False, degraded_wait=False,
                   repair_data_bytes=64 * MiB, repair_mib_s=30.0, repair_reps=1, metadata_engines=["lmdb"],
                   metadata_files=48, metadata_mount_files=48, failover_trials=1)


def run(config: BenchConfig, log: Any = None) -> int:
    """Run the benchmark; returns the exit status (0 ok, 1 failed, 130 interrupted)."""
    return Runner(config, log or _log).run()


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _Interrupted(BaseException):
    """SIGTERM/SIGHUP, turned into an exception so the same cleanup runs as for Ctrl-C."""


class Runner:
    def __init__(self, config: BenchConfig, log: Any) -> None:
        self.config = config
        self.log = log
        self.results: dict[tuple[str, str, str], Result] = {}
        self.setup: dict[str, dict[str, Any]] = {}
        self.targets: list[Target] = []
        self.page_cache = PageCache(config.drop_caches)
        self.phase_seconds: dict[str, float] = {}
        self.params = RunParams(config.file_size_bytes, config.runtime_s, config.ramp_s, config.direct)
        self.work: Path | None = None
        self._repair_params: dict[str, Any] = {}

    # ---------------------------------------------------------------- main
    def run(self) -> int:
        config = self.config
        out_dir = self._out_dir()
        started_at = datetime.now(UTC)
        started = time.monotonic()
        load_before = load_average()
        status, error = "complete", None
        with _signals_raise(), contextlib.ExitStack() as stack:
            try:
                work = self.work = Path(tempfile.mkdtemp(prefix="deepfs-bench-",
                                                         dir=config.work_dir or _default_work_parent()))
                stack.callback(shutil.rmtree, work, ignore_errors=True)
                with self._phase("start targets"):
                    self.targets = open_targets(stack, config.targets, work, config.cluster, self.log)
                self._run_suites()
            except (KeyboardInterrupt, _Interrupted):
                status = "interrupted"
                self.log("interrupted: stopping everything ...")
            except Exception as exc:  # noqa: BLE001 - reported, then everything is stopped
                status, error = "failed", traceback.format_exc()
                self.log(f"benchmark failed: {exc!r}; stopping everything ...")
            finally:
                with _signals_ignored(), self._phase("stop targets"):
                    stack.close()
        data = self._document(status, error, started_at, time.monotonic() - started, load_before)
        paths = report.write(out_dir, data)
        self.log(f"\n{paths['markdown'].read_text()}")
        self.log(f"results: {out_dir} ({', '.join(p.name for p in paths.values())})")
        return {"complete": 0, "interrupted": 130}.get(status, 1)

    def _run_suites(self) -> None:
        suites = self.config.suites
        ok = [t for t in self.targets if t.ok]
        if "fio" in suites or "degraded" in suites:
            with self._phase("layout"):
                for target in ok:
                    self._prepare(target)
        if "fio" in suites:
            with self._phase("fio"):
                self._fio_suite(ok)
        if "smallfiles" in suites:
            with self._phase("smallfiles"):
                self._smallfiles_suite(ok)
        if "dataload" in suites:
            with self._phase("dataload"):
                self._dataload_suite(ok)
        if "checkpoint" in suites:
            with self._phase("checkpoint"):
                self._checkpoint_suite(ok)
        if "degraded" in suites:
            with self._phase("degraded"):
                degraded.run([t for t in ok if t.name in self.setup], self.config.reps, self.config.degraded_wait,
                             self._degraded_one, self._degraded_skip, self.log)
        if "repair" in suites and any(t.name in ("deepfs", "deepfs-client") for t in ok):
            with self._phase("repair"):
                self._repair_suite()
        if "metadata" in suites and any(t.name in ("deepfs", "deepfs-client") for t in ok):
            with self._phase("metadata"):
                self._metadata_suite()

    @contextlib.contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.phase_seconds[name] = round(time.monotonic() - started, 1)

    # ---------------------------------------------------------- fio suite
    def _prepare(self, target: Target) -> None:
        """Lay out the test file; find out whether O_DIRECT works and which async engine runs."""
        info: dict[str, Any] = {}
        try:
            if target.surface == "client":
                sample = pyio.layout(target.client, f"{target.root}/{TEST_FILE}", self.config.file_size_bytes)
                info.update(direct=None, async_engine=pyio.ASYNC_ENGINE)
            else:
                file = target.root / TEST_FILE
                sample = fio_runner.run_job(fio_runner.LAYOUT, file, self._params_for(target, info))
                direct_ok = self.config.direct and fio_runner.supports_direct(file)
                if self.config.direct and not direct_ok:
                    target.notes.append("O_DIRECT opens are refused here: jobs ran buffered (direct=0)")
                info["direct"] = direct_ok
                engine, why = fio_runner.pick_async_engine(file, self._params_for(target, info))
                info["async_engine"] = engine
                if why:
                    info["async_engine_failures"] = why
            info["layout"] = asdict(sample)
            self.log(f"[layout] {target.name}: {self.config.file_size_bytes / MiB:.0f} MiB in {sample.runtime_s:.1f}s "
                     f"({sample.bw_mib_s:.0f} MiB/s), qd32 engine: {info.get('async_engine')}")
            self.setup[target.name] = info
        except fio_runner.FioError as exc:
            target.notes.append(f"layout failed, no fio jobs ran: {exc}")
            self.log(f"[layout] {target.name}: FAILED: {exc}")
        except Exception as exc:  # noqa: BLE001 - this target's jobs are reported as failed
            target.notes.append(f"layout failed, no fio jobs ran: {exc!r}")
            self.log(f"[layout] {target.name}: FAILED: {exc!r}")

    def _params_for(self, target: Target, info: dict[str, Any] | None = None) -> RunParams:
        info = self.setup.get(target.name, {}) if info is None else info
        direct = info.get("direct", self.config.direct)
        return replace(self.params, direct=bool(direct)) if target.surface == "posix" else self.params

    def _fio_suite(self, targets: list[Target]) -> None:
        prepared = [t for t in targets if t.name in self.setup]
        for name in self.config.jobs:
            job = JOBS_BY_NAME[name]
            for rep in range(self.config.reps):
                for target in _rotated(prepared, rep):
                    self._io_once("fio", target, job, rep)

    def _io_once(self, suite: str, target: Target, job: JobSpec, rep: int, note: str = "") -> None:
        result = self._result(suite, job.name, target)
        if note and note not in result.notes:
            result.notes.append(note)
        engine = "psync"
        if target.surface == "posix" and job.depth > 1:
            engine = self.setup[target.name].get("async_engine")
            if engine is None:
                reason = f"no asynchronous engine runs here: {self.setup[target.name].get('async_engine_failures')}"
                if reason not in result.errors:
                    result.errors.append(reason)
                return
        params = self._params_for(target)
        result.params = self._job_params(job, target, params, engine)
        if job.is_read:
            self.page_cache.drop()
        try:
            if target.surface == "client":
                sample = pyio.run_job(target.client, f"{target.root}/{TEST_FILE}", job, params)
            else:
                sample = fio_runner.run_job(job, target.root / TEST_FILE, params, engine)
        except (KeyboardInterrupt, _Interrupted):
            raise
        except Exception as exc:  # noqa: BLE001 - recorded; the run goes on
            result.errors.append(f"rep {rep + 1}: {exc}")
            self.log(f"[{suite}] {job.name} rep {rep + 1} {target.name}: FAILED: {exc}")
            return
        result.params["engine"] = sample.engine
        self._add_sample(result, sample)
        p99 = f", p99 {sample.p99_us:.0f} µs" if sample.p99_us else ""
        self.log(f"[{suite}] {job.name} rep {rep + 1}/{self.config.reps} {target.name}: "
                 f"{sample.bw_mib_s:.1f} MiB/s, {sample.iops:.0f} IOPS{p99}")

    def _job_params(self, job: JobSpec, target: Target, params: RunParams, engine: str) -> dict[str, Any]:
        return {
            "jobfile": f"bench/jobs/{job.jobfile}" if target.surface == "posix" else "bench/pyio.py",
            "rw": job.rw, "block_size_bytes": job.bs, "jobs": job.numjobs, "iodepth": job.depth, "engine": engine,
            "direct": params.direct if target.surface == "posix" else None,
            "direct_reaches_storage": target.direct if target.surface == "posix" else None,
            "runtime_s": params.runtime_s, "ramp_s": params.ramp_s,
            "file_size_bytes": params.size_bytes, "bytes_per_job": params.slice_bytes(job),
            "repetitions": self.config.reps, "page_cache_dropped_before": job.is_read and self.page_cache.enabled,
        }

    @staticmethod
    def _add_sample(result: Result, sample: Sample) -> None:
        result.metric("bw_mib_s", "MiB/s").add(sample.bw_mib_s)
        result.metric("iops", "IOPS").add(sample.iops)
        result.metric("p99_us", "µs", higher_is_better=False).add(sample.p99_us)
        result.metric("mean_lat_us", "µs", higher_is_better=False).add(sample.mean_lat_us)

    def _result(self, suite: str, job: str, target: Target | str) -> Result:
        name = target if isinstance(target, str) else target.name
        key = (suite, job, name)
        if key not in self.results:
            self.results[key] = Result(suite, job, name)
        return self.results[key]

    # ------------------------------------------------------ degraded suite
    def _degraded_one(self, target: Target, job: JobSpec, rep: int, what: str) -> None:
        self._io_once("degraded", target, job, rep, note=what)

    def _degraded_skip(self, target: Target, reason: str) -> None:
        for name in degraded.DEGRADED_JOBS:
            self._result("degraded", name, target).errors.append(f"degraded mode not run: {reason}")

    # ------------------------------------------------------- repair suite
    def _repair_suite(self) -> None:
        """``bench.repair`` on a cluster of its own; its figures are rows of target deepfs-client."""
        config = self.config
        assert self.work is not None
        params = RepairParams(
            data_bytes=config.repair_data_bytes, repair_mib_s=config.repair_mib_s,
            # Longer than one degraded sample, so stopped nodes are back before repair would start.
            repair_after_s=round(config.ramp_s + config.runtime_s + 2.0, 2),
            foreground_bytes=min(config.file_size_bytes, 256 * MiB), runtime_s=config.runtime_s,
            ramp_s=config.ramp_s, reps=config.repair_reps)
        run = RepairRun(self.work / "deepfs-repair", config.cluster, params, self._repair_figure, self.log)
        self.log(f"[repair] cluster of {run.settings.nodes} nodes, {params.data_bytes / MiB:.0f} MiB, "
                 f"--repair-mib-s {params.repair_mib_s:g}, --repair-after {params.repair_after_s:g}")
        self._repair_params = run.describe()
        try:
            run.run()
        except (KeyboardInterrupt, _Interrupted):
            raise
        except Exception as exc:  # noqa: BLE001 - recorded; the run goes on
            self._result("repair", "time_to_redundancy", _REPAIR_TARGET).errors.append(repr(exc))
            self.log(f"[repair] FAILED: {exc!r}")

    def _repair_figure(self, job: str, metric: str, unit: str, value: float, higher: bool) -> None:
        result = self._result("repair", job, _REPAIR_TARGET)
        result.params = self._repair_params
        result.metric(metric, unit, higher).add(value)

    # --------------------------------------------------- metadata suite
    def _metadata_suite(self) -> None:
        """``bench.metadata_ops``: one cluster per engine; figures are rows of target = engine name."""
        config = self.config
        assert self.work is not None
        params = metadata_ops.MetadataParams(engines=config.metadata_engines, files=config.metadata_files,
                                             mount_files=config.metadata_mount_files, reps=config.reps,
                                             failover_trials=config.failover_trials)
        described = {"files": params.files, "mount_files": params.mount_files, "threads": list(metadata_ops.THREADS),
                     "directories": list(metadata_ops.SPREADS), "mount_threads": metadata_ops.MOUNT_THREADS,
                     "repetitions": params.reps, "failover_trials": params.failover_trials,
                     "engines": {e: dict(zip(("engine", "metadata_servers"), metadata_ops.ENGINES[e], strict=True))
                                 for e in params.engines}}

        def figure(job: str, engine: str, metric: str, unit: str, value: float, higher: bool) -> None:
            result = self._result("metadata", job, engine)
            result.params = described
            result.metric(metric, unit, higher).add(value)

        def skip(engine: str, reason: str) -> None:
            self._result("metadata", "create_1dir_t1", engine).errors.append(f"skipped: {reason}")

        def error(job: str, engine: str, message: str) -> None:
            result = self._result("metadata", job, engine)
            result.params = described
            result.errors.append(message)

        run = metadata_ops.MetadataRun(self.work, config.cluster, params, figure, skip, error, self.log)
        try:
            run.run()
        except (KeyboardInterrupt, _Interrupted):
            raise
        except Exception as exc:  # noqa: BLE001 - recorded; the run goes on
            self._result("metadata", "create_1dir_t1", params.engines[0]).errors.append(repr(exc))
            self.log(f"[metadata] FAILED: {exc!r}")

    # ----------------------------------------------------- small files
    def _smallfiles_suite(self, targets: list[Target]) -> None:
        count, threads = self.config.smallfiles_count, self.config.smallfiles_threads
        params = {"files": count, "threads": threads, "min_size_bytes": smallfiles.MIN_SIZE,
                  "max_size_bytes": smallfiles.MAX_SIZE, "files_per_directory": smallfiles.FILES_PER_DIR,
                  "repetitions": self.config.reps, "page_cache_dropped_before": ["stat", "read"]
                  if self.page_cache.enabled else []}

        def between(phase: str) -> None:
            if phase in ("stat", "read"):
                self.page_cache.drop()

        for rep in range(self.config.reps):
            for target in _rotated(targets, rep):
                tree = smallfiles.make_tree(f"smallfiles-r{rep}", count)
                params["total_bytes"] = tree.total_bytes
                ops: smallfiles.Ops = (smallfiles.ClientOps(target.client, str(target.root))
                                       if target.surface == "client" else smallfiles.PosixOps(target.root))
                try:
                    rates = smallfiles.run(ops, tree, threads, between)
                except (KeyboardInterrupt, _Interrupted):
                    raise
                except Exception as exc:  # noqa: BLE001 - recorded; the run goes on
                    for phase in smallfiles.PHASES:
                        self._result("smallfiles", phase, target).errors.append(f"rep {rep + 1}: {exc!r}")
                    self.log(f"[smallfiles] rep {rep + 1} {target.name}: FAILED: {exc!r}")
                    continue
                for phase, rate in rates.items():
                    result = self._result("smallfiles", phase, target)
                    result.params = dict(params)
                    result.metric("files_s", "files/s").add(rate)
                self.log(f"[smallfiles] rep {rep + 1}/{self.config.reps} {target.name}: "
                         + ", ".join(f"{p} {r:.0f}/s" for p, r in rates.items()))

    # ------------------------------------------------------ data loading
    def _dataload_suite(self, targets: list[Target]) -> None:
        """``bench.dataload``: the dataset written once per target, then one timed epoch per repetition."""
        from bench import dataload

        tree = dataload.make_tree("dataload", self.config.dataload_files)
        params: dict[str, Any] = {
            "files": len(tree.files), "total_bytes": tree.total_bytes, "directories": len(tree.dirs) - 1,
            "min_size_bytes": dataload.MIN_SIZE, "max_size_bytes": dataload.MAX_SIZE, "workers": dataload.WORKERS,
            "batch_size": dataload.BATCH_SIZE, "shuffle": True, "repetitions": self.config.reps,
            "timed": "one epoch: iterator creation (worker start included) to its end",
            "page_cache_dropped_before": self.page_cache.enabled}
        ready: list[tuple[Target, smallfiles.Ops, dataload.Files]] = []
        for target in targets:
            ops: smallfiles.Ops
            if target.surface == "client":
                if target.connect is None:
                    self._result("dataload", "epoch", target).errors.append("skipped: no way to open a worker client")
                    continue
                ops = smallfiles.ClientOps(target.client, str(target.root))
                dataset = dataload.Files(tree, str(target.root), target.connect)
                api = "deepfs:// fsspec file system, one deepfs.Client per worker (worker_init_fn)"
            else:
                ops = smallfiles.PosixOps(target.root)
                dataset = dataload.Files(tree, str(target.root))
                api = "open/read in Dataset.__getitem__"
            try:
                seconds = dataload.write(ops, tree)
            except Exception as exc:  # noqa: BLE001 - recorded; the other targets go on
                self._result("dataload", "epoch", target).errors.append(f"writing the dataset: {exc!r}")
                self.log(f"[dataload] {target.name}: writing the dataset FAILED: {exc!r}")
                continue
            self._result("dataload", "epoch", target).params = {**params, "api": api, "written_in_s": round(seconds, 2)}
            self.log(f"[dataload] {target.name}: {len(tree.files)} files, {tree.total_bytes / MiB:.0f} MiB written "
                     f"in {seconds:.1f}s (not timed)")
            ready.append((target, ops, dataset))
        try:
            for rep in range(self.config.reps):
                for target, _, dataset in _rotated(ready, rep):
                    self.page_cache.drop()
                    result = self._result("dataload", "epoch", target)
                    try:
                        files_s, mib_s = dataload.epoch(dataset, seed=rep)
                    except (KeyboardInterrupt, _Interrupted):
                        raise
                    except Exception as exc:  # noqa: BLE001 - recorded; the run goes on
                        result.errors.append(f"rep {rep + 1}: {exc!r}")
                        self.log(f"[dataload] rep {rep + 1} {target.name}: FAILED: {exc!r}")
                        continue
                    result.metric("files_s", "files/s").add(files_s)
                    result.metric("mib_s", "MiB/s").add(mib_s)
                    self.log(f"[dataload] rep {rep + 1}/{self.config.reps} {target.name}: "
                             f"{files_s:.0f} files/s, {mib_s:.1f} MiB/s")
        finally:
            for target, ops, _ in ready:
                try:
                    dataload.remove(ops, tree)
                except Exception as exc:  # noqa: BLE001 - the scratch directory goes at the end anyway
                    self.log(f"[dataload] {target.name}: removing the dataset failed: {exc!r}")

    # ------------------------------------------------------ checkpoints
    def _checkpoint_suite(self, targets: list[Target]) -> None:
        from bench import checkpoint

        adapter_missing = checkpoint.adapter_status()
        started = time.monotonic()
        state = checkpoint.make_state_dict(self.config.checkpoint_bytes)
        nbytes = checkpoint.state_bytes(state)
        self.log(f"[checkpoint] state dict: {len(state)} tensors, {nbytes / MiB:.0f} MiB "
                 f"(made in {time.monotonic() - started:.1f}s)")
        params = {"state_dict_bytes": nbytes, "tensors": len(state), "repetitions": self.config.reps,
                  "map_location": "cpu", "weights_only": True,
                  "page_cache_dropped_before_load": self.page_cache.enabled}
        for rep in range(self.config.reps):
            for target in _rotated(targets, rep):
                if target.surface == "client" and adapter_missing:
                    for job in CHECKPOINT_JOBS:
                        result = self._result("checkpoint", job, target)
                        if adapter_missing not in result.errors:
                            result.errors.append(f"skipped: {adapter_missing}")
                    continue
                try:
                    if target.surface == "client":
                        times = checkpoint.save_load_adapter(state, target.client, str(target.root), f"ckpt-r{rep}.pt",
                                                             self.page_cache.drop)
                        times |= checkpoint.dcp_client(state, target.client, str(target.root), f"dcp-r{rep}",
                                                       self.page_cache.drop)
                        api = "deepfs.torch.save / deepfs.torch.load (adapter); DeepFSStorageWriter/Reader (DCP)"
                    else:
                        times = checkpoint.save_load_posix(state, target.root, f"ckpt-r{rep}.pt", self.page_cache.drop)
                        times |= checkpoint.dcp_posix(state, target.root, f"dcp-r{rep}", self.page_cache.drop)
                        api = "torch.save (+ fsync for save_durable) / torch.load; FileSystemWriter/Reader (DCP)"
                except (KeyboardInterrupt, _Interrupted):
                    raise
                except Exception as exc:  # noqa: BLE001 - recorded; the run goes on
                    for job in CHECKPOINT_JOBS:
                        self._result("checkpoint", job, target).errors.append(f"rep {rep + 1}: {exc!r}")
                    self.log(f"[checkpoint] rep {rep + 1} {target.name}: FAILED: {exc!r}")
                    continue
                for job in CHECKPOINT_JOBS:
                    result = self._result("checkpoint", job, target)
                    result.params = {**params, "api": api}
                    seconds = times[f"{job}_s"]
                    result.metric("seconds", "s", higher_is_better=False).add(seconds)
                    result.metric("gib_s", "GiB/s").add(nbytes / (1 << 30) / seconds)
                self.log(f"[checkpoint] rep {rep + 1}/{self.config.reps} {target.name}: save {times['save_s']:.2f}s, "
                         f"durable {times['save_durable_s']:.2f}s, load {times['load_s']:.2f}s, "
                         f"DCP save {times['dcp_save_s']:.2f}s, DCP load {times['dcp_load_s']:.2f}s")

    # ----------------------------------------------------------- report
    def _out_dir(self) -> Path:
        if self.config.out_dir is not None:
            out = Path(self.config.out_dir)
        elif self.config.quick:
            out = Path(tempfile.mkdtemp(prefix="deepfs-bench-quick-"))
        else:
            out = Path("bench/out") / datetime.now().strftime("%Y%m%d-%H%M%S")
        out.mkdir(parents=True, exist_ok=True)
        return out

    def _document(self, status: str, error: str | None, started_at: datetime, duration_s: float,
                  load_before: list[float]) -> dict[str, Any]:
        config = self.config
        machine = machine_info()
        machine["loadavg_before"] = load_before
        machine["loadavg_after"] = machine.pop("loadavg")
        cfg = asdict(config)
        cfg["out_dir"] = str(config.out_dir) if config.out_dir else None
        cfg["work_dir"] = str(config.work_dir) if config.work_dir else None
        cfg["page_cache_dropped"] = self.page_cache.enabled
        if self.page_cache.reason:
            cfg["page_cache_note"] = self.page_cache.reason
        return {
            "format": "deepfs-bench/1",
            "status": status,
            "error": error,
            "command": config.command,
            "started_utc": started_at.isoformat(timespec="seconds"),
            "duration_s": round(duration_s, 1),
            "phase_seconds": self.phase_seconds,
            "machine": machine,
            "versions": versions(),
            "config": cfg,
            "targets": {t.name: t.summary() for t in self.targets} or
                       {name: {"status": "skipped", "reason": "the run stopped before targets started"}
                        for name in config.targets},
            "setup": self.setup,
            "results": [r.to_json() for r in self.results.values()],
        }


_REPAIR_TARGET = "deepfs-client"


_T = TypeVar("_T")


def _rotated(items: list[_T], rep: int) -> list[_T]:
    if not items:
        return items
    shift = rep % len(items)
    return items[shift:] + items[:shift]


def _default_work_parent() -> str:
    """/var/tmp is on the local disk on Debian (/tmp may be tmpfs, where O_DIRECT fails)."""
    return "/var/tmp" if Path("/var/tmp").is_dir() else tempfile.gettempdir()


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP end the run (cleanup included)."""

    def handler(signum: int, _frame: Any) -> None:
        raise _Interrupted(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGHUP)}
    # Ctrl-C stops the run even where SIGINT was inherited as ignored (background jobs of a script).
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """A second Ctrl-C must not cut the cleanup short and leave mounts behind."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def command_line() -> str:
    """How this run was started, for the report."""
    args = sys.argv[1:]
    prefix = ["deepfs"] if args[:1] == ["bench"] else ["python", "-m", "bench"]
    return " ".join(shlex.quote(a) for a in prefix + args)
