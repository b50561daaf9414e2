"""The run's document, written three ways: JSON (everything), Markdown (ratios to DeepFS), PNG charts.

``write(out_dir, data)`` takes the document ``runner`` builds (parameters,
machine, versions, targets, every sample) and writes ``results.json``,
``results.md`` and the charts next to them. Every Markdown cell is
``median (min–max)`` over the repetitions, followed by the ratio of that
target to DeepFS through FUSE (``deepfs``) for the same row.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

REFERENCE = "deepfs"
SEQ_JOBS = ("seqwrite_1m_j1", "seqwrite_1m_j4", "seqread_1m_j1", "seqread_1m_j4")
RAND_JOBS = ("randread_4k_j1_qd1", "randread_4k_j4_qd1", "randread_4k_j1_qd32", "randwrite_4k_j1")
PHASES = ("create", "stat", "read", "delete")
CHECKPOINT_JOBS = ("save", "save_durable", "load", "dcp_save", "dcp_load")
DEGRADED_JOBS = (("seqread_1m_j1", "bw_mib_s", "MiB/s"), ("randread_4k_j1_qd1", "iops", "IOPS"))
DATALOAD_JOBS = ("epoch",)

# (suite, job, metric, target, baseline, wanted ratio of speeds, what): the goals for DeepFS.
GOALS = (
    ("fio", "seqread_1m_j1", "bw_mib_s", "deepfs", "gluster", 2.0, "sequential 1 MiB read, 1 job"),
    ("fio", "seqread_1m_j4", "bw_mib_s", "deepfs", "gluster", 2.0, "sequential 1 MiB read, 4 jobs"),
    ("fio", "seqwrite_1m_j1", "bw_mib_s", "deepfs", "gluster", 2.0, "sequential 1 MiB write, 1 job"),
    ("fio", "seqwrite_1m_j4", "bw_mib_s", "deepfs", "gluster", 2.0, "sequential 1 MiB write, 4 jobs"),
    ("fio", "seqread_1m_j1", "bw_mib_s", "deepfs", "bindfs", 0.5, "sequential 1 MiB read, 1 job"),
    ("fio", "seqread_1m_j4", "bw_mib_s", "deepfs", "bindfs", 0.5, "sequential 1 MiB read, 4 jobs"),
    ("fio", "seqwrite_1m_j1", "bw_mib_s", "deepfs", "bindfs", 0.5, "sequential 1 MiB write, 1 job"),
    ("fio", "seqwrite_1m_j4", "bw_mib_s", "deepfs", "bindfs", 0.5, "sequential 1 MiB write, 4 jobs"),
    ("fio", "randread_4k_j1_qd1", "iops", "deepfs", "gluster", 4.0, "4 KiB random read IOPS, 1 job, QD1"),
    ("fio", "randread_4k_j1_qd1", "iops", "deepfs-client", "gluster", 4.0, "4 KiB random read IOPS, 1 job, QD1"),
    ("fio", "randread_4k_j4_qd1", "iops", "deepfs", "gluster", 2.0, "4 KiB random read IOPS, 4 jobs, QD1"),
    ("fio", "randread_4k_j1_qd32", "iops", "deepfs", "gluster", 2.0, "4 KiB random read IOPS, 1 job, QD32"),
    ("smallfiles", "create", "files_s", "deepfs", "gluster", 5.0, "small-file creates/s"),
    ("smallfiles", "read", "files_s", "deepfs", "gluster", 5.0, "small-file reads/s"),
    ("smallfiles", "stat", "files_s", "deepfs", "gluster", 5.0, "small-file stats/s"),
    ("smallfiles", "delete", "files_s", "deepfs", "gluster", 5.0, "small-file deletes/s"),
    ("dataload", "epoch", "files_s", "deepfs", "gluster", 5.0, "DataLoader files/s (mount)"),
    ("dataload", "epoch", "files_s", "deepfs-client", "gluster", 5.0, "DataLoader files/s (fsspec/deepfs.Client)"),
    ("checkpoint", "save", "seconds", "deepfs-client", "local", 0.8, "adapter save vs torch.save (returned)"),
    ("checkpoint", "save_durable", "seconds", "deepfs-client", "local", 0.8,
     "adapter save vs torch.save + fsync (durable)"),
    ("checkpoint", "load", "seconds", "deepfs-client", "local", 0.8, "adapter load vs torch.load"),
)
# (suite, job, metric, target, bound, unit, what): issue 14's absolute goals (≥ bound, or ≤ for latencies).
ABSOLUTE_GOALS = (
    ("fio", "randread_4k_j1_qd1", "iops", "deepfs", 8_000, "IOPS", "4 KiB random read, 1 job, QD1"),
    ("fio", "randread_4k_j1_qd1", "iops", "deepfs-client", 10_000, "IOPS", "4 KiB random read, 1 job, QD1"),
    ("fio", "randread_4k_j4_qd1", "iops", "deepfs", 12_000, "IOPS", "4 KiB random read, 4 jobs, QD1"),
    ("fio", "randread_4k_j1_qd32", "iops", "deepfs", 20_000, "IOPS", "4 KiB random read, 1 job, QD32"),
    ("fio", "randread_4k_j1_qd1", "p99_us", "deepfs", 500, "µs", "p99 of 4 KiB random read, QD1"),
    ("fio", "randwrite_4k_j1", "iops", "deepfs", 4_000, "IOPS", "4 KiB random write, 1 job"),
    ("smallfiles", "create", "files_s", "deepfs", 1_500, "files/s", "small-file creates"),
    ("smallfiles", "read", "files_s", "deepfs", 3_000, "files/s", "small-file reads"),
    ("smallfiles", "stat", "files_s", "deepfs", 20_000, "files/s", "small-file stats"),
    ("smallfiles", "delete", "files_s", "deepfs", 5_000, "files/s", "small-file deletes"),
)
LOWER_IS_BETTER = ("seconds", "p99_us", "mean_lat_us")


def write(out_dir: Path, data: dict[str, Any]) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "markdown": out_dir / "results.md"}
    paths["json"].write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    charts = write_charts(out_dir, data)
    paths.update(charts)
    paths["markdown"].write_text(markdown(data, [p.name for p in charts.values()]))
    return paths


class _Index:
    def __init__(self, data: dict[str, Any]) -> None:
        self.by_key = {(r["suite"], r["job"], r["target"]): r for r in data.get("results", [])}
        self.status = dict(data.get("targets", {}))
        self.targets = list(self.status)
        for suite, _, target in self.by_key:  # a target with figures always gets its column
            if suite != "metadata" and target not in self.status:  # metadata columns are engines (lmdb, ...)
                self.targets.append(target)
                self.status[target] = {"status": "ok"}

    def get(self, suite: str, job: str, target: str) -> dict[str, Any] | None:
        return self.by_key.get((suite, job, target))

    def metric(self, suite: str, job: str, target: str, metric: str) -> dict[str, Any] | None:
        result = self.get(suite, job, target)
        if result is None:
            return None
        m = result["metrics"].get(metric)
        return m if m and m.get("samples") else None

    def median(self, suite: str, job: str, target: str, metric: str) -> float | None:
        m = self.metric(suite, job, target, metric)
        return m["median"] if m else None

    def jobs(self, suite: str, order: Iterable[str]) -> list[str]:
        present = {job for (s, job, _) in self.by_key if s == suite}
        return [job for job in order if job in present]


# ------------------------------------------------------------------ Markdown
def markdown(data: dict[str, Any], chart_names: list[str]) -> str:
    idx = _Index(data)
    cfg = data.get("config", {})
    machine = data.get("machine", {})
    lines = [f"# DeepFS benchmark — {data.get('started_utc', '')}", ""]
    if data.get("status") != "complete":
        lines += [f"**Run {data.get('status')}: the figures below are partial.**", ""]
        if data.get("error"):
            lines += ["```", data["error"].strip()[-2000:], "```", ""]
    machine_line = (f"Machine: {machine.get('cores')} cores ({machine.get('cpu_model')}), "
                    f"{(machine.get('memory_bytes') or 0) / 2**30:.1f} GiB RAM, Linux {machine.get('kernel')}, "
                    f"load average {_load(machine.get('loadavg_before'))} before, "
                    f"{_load(machine.get('loadavg_after'))} after  ")
    params_line = (f"Parameters: {cfg.get('reps')} repetitions (median, min–max); fio file "
                   f"{(cfg.get('file_size_bytes') or 0) / 2**20:.0f} MiB, {cfg.get('runtime_s')} s per job after "
                   f"{cfg.get('ramp_s')} s ramp, direct={1 if cfg.get('direct') else 0}; small files: "
                   f"{cfg.get('smallfiles_count')} files of 4–64 KiB, {cfg.get('smallfiles_threads')} threads; "
                   f"dataload: {cfg.get('dataload_files')} files of 64–256 KiB, 2 workers; "
                   f"checkpoint {(cfg.get('checkpoint_bytes') or 0) / 2**20:.0f} MiB; page cache dropped before "
                   f"reads: {'yes' if cfg.get('page_cache_dropped') else 'no'}; DeepFS cluster: "
                   f"{_cluster(cfg.get('cluster', {}))}")
    lines += [
        f"Command: `{data.get('command', '')}`  ",
        f"Duration: {data.get('duration_s', 0):.0f} s ({_phases(data.get('phase_seconds', {}))})  ",
        machine_line,
        "Versions: " + ", ".join(f"{k} {v}" for k, v in data.get("versions", {}).items()) + "  ",
        params_line,
        "",
        ("Each cell: median (min–max) over the repetitions, then **× = that target ÷ deepfs** (FUSE) for the "
         "same row. Higher is better unless the table says otherwise."),
        "",
    ]
    lines += _targets_table(idx)
    lines += _goals_table(idx)
    lines += _section(idx, "Streaming, 1 MiB blocks (MiB/s)", "fio", SEQ_JOBS, "bw_mib_s")
    lines += _section(idx, "Random 4 KiB (IOPS)", "fio", RAND_JOBS, "iops")
    lines += _section(idx, "Random 4 KiB, p99 completion latency (µs, lower is better)", "fio", RAND_JOBS, "p99_us")
    lines += _section(idx, "Small files (files/s per phase)", "smallfiles", PHASES, "files_s")
    lines += _dataload_section(idx)
    lines += _section(idx, "Checkpoint (seconds, lower is better)", "checkpoint", CHECKPOINT_JOBS, "seconds",
                      intro="save: until the call returns; save_durable: until the bytes are on disk "
                            "(torch.save + fsync; the adapter is durable when its save returns). "
                            "deepfs-client is the adapter (deepfs.torch.save/load); the others run "
                            "torch.save/torch.load on their directory. dcp_save/dcp_load: "
                            "torch.distributed.checkpoint in one process, with DeepFSStorageWriter/Reader "
                            "on deepfs-client and PyTorch's FileSystemWriter/Reader (shards fsynced) on "
                            "the directories.")
    lines += _degraded_section(idx)
    lines += _repair_section(idx)
    lines += _metadata_section(idx)
    lines += _engines_section(idx, data)
    if chart_names:
        lines += ["## Charts", ""] + [f"![{Path(n).stem}]({n})" for n in chart_names] + [""]
    return "\n".join(lines)


def _targets_table(idx: _Index) -> list[str]:
    lines = ["## Targets", "", "| target | status | what | notes |", "| --- | --- | --- | --- |"]
    for name, t in idx.status.items():
        status = "ok" if t.get("status") == "ok" else f"**skipped**: {t.get('reason')}"
        lines.append(f"| {name} | {status} | {t.get('description') or ''} | {'; '.join(t.get('notes') or [])} |")
    return lines + [""]


def _goals_table(idx: _Index) -> list[str]:
    """Ratio goals (DeepFS against a baseline target of the same run), then absolute ones (issue 14)."""
    rows = []
    for suite, job, metric, target, baseline, wanted, what in GOALS:
        a, b = idx.median(suite, job, target, metric), idx.median(suite, job, baseline, metric)
        if a is None or b is None or a <= 0 or b <= 0:
            continue
        ratio = b / a if metric in LOWER_IS_BETTER else a / b
        mark = "yes" if ratio >= wanted else "**no**"
        rows.append(f"| {what} | {target} {_fmt(a)} vs {baseline} {_fmt(b)} | {ratio:.2f}× | ≥ {wanted}× | {mark} |")
    for suite, job, metric, target, bound, unit, what in ABSOLUTE_GOALS:
        value = idx.median(suite, job, target, metric)
        if value is None or value <= 0:
            continue
        lower = metric in LOWER_IS_BETTER
        met = value <= bound if lower else value >= bound
        rows.append(f"| {what} | {target} {_fmt(value)} {unit} | | {'≤' if lower else '≥'} {_fmt(bound)} {unit} "
                    f"| {'yes' if met else '**no**'} |")
    if not rows:
        return []
    return ["## Where DeepFS stands against its goals", "",
            "Ratio of speeds (for times and latencies: baseline ÷ DeepFS), or an absolute figure.", "",
            "| goal | medians | ratio | wanted | met |", "| --- | --- | --- | --- | --- |", *rows, ""]


def _section(idx: _Index, title: str, suite: str, order: Iterable[str], metric: str, intro: str = "") -> list[str]:
    jobs = idx.jobs(suite, order)
    if not jobs:
        return []
    lines = [f"## {title}", ""]
    if intro:
        lines += [intro, ""]
    lines += ["| job | " + " | ".join(idx.targets) + " |", "| --- |" + " --- |" * len(idx.targets)]
    footnotes: list[str] = []
    for job in jobs:
        ref = idx.median(suite, job, REFERENCE, metric)
        cells = [_cell(idx, suite, job, t, metric, ref, footnotes) for t in idx.targets]
        lines.append(f"| {job} | " + " | ".join(cells) + " |")
    return lines + [""] + footnotes + ([""] if footnotes else [])


def _cell(idx: _Index, suite: str, job: str, target: str, metric: str, ref: float | None,
          footnotes: list[str]) -> str:
    if idx.status.get(target, {}).get("status") != "ok":
        return "skipped"
    result = idx.get(suite, job, target)
    m = idx.metric(suite, job, target, metric)
    if m is None:
        if result and result.get("errors"):
            footnotes.append(f"- {target} / {job}: {result['errors'][0]}")
            return f"failed [{len(footnotes)}]" if "skipped" not in result["errors"][0] else "n/a"
        return "—"
    text = f"{_fmt(m['median'])} ({_fmt(m['min'])}–{_fmt(m['max'])})"
    if ref and target != REFERENCE and m["median"]:
        text += f" · {m['median'] / ref:.2f}×"
    if result and result.get("errors"):
        footnotes.append(f"- {target} / {job}: {len(result['errors'])} failed repetition(s): {result['errors'][0]}")
    return text


def _dataload_section(idx: _Index) -> list[str]:
    """One DataLoader epoch per repetition: files/s and MiB/s per target (``bench.dataload``)."""
    if not idx.jobs("dataload", DATALOAD_JOBS):
        return []
    p = next((r.get("params") for (suite, _, _), r in idx.by_key.items() if suite == "dataload" and r.get("params")),
             None) or {}
    lines = ["## Data loading (PyTorch DataLoader)", ""]
    if p:
        lines += [f"One shuffled epoch per repetition over {p.get('files'):,} files of "
                  f"{(p.get('min_size_bytes') or 0) >> 10}–{(p.get('max_size_bytes') or 0) >> 10} KiB in "
                  f"{p.get('directories')} directories ({(p.get('total_bytes') or 0) / 2**20:,.0f} MiB), "
                  f"{p.get('workers')} workers, batch size {p.get('batch_size')}, worker start included. Directories: "
                  "open/read in `Dataset.__getitem__`; deepfs-client: the `deepfs://` fsspec file system over one "
                  "`deepfs.Client` per worker.", ""]
    lines += ["| figure | " + " | ".join(idx.targets) + " |", "| --- |" + " --- |" * len(idx.targets)]
    footnotes: list[str] = []
    for metric, label in (("files_s", "files/s"), ("mib_s", "MiB/s")):
        ref = idx.median("dataload", "epoch", REFERENCE, metric)
        cells = [_cell(idx, "dataload", "epoch", t, metric, ref, footnotes) for t in idx.targets]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + [""] + footnotes + ([""] if footnotes else [])


def _metadata_section(idx: _Index) -> list[str]:
    """Metadata ops/s per engine (columns: lmdb, etcd-1, etcd-3), then the failover window."""
    from bench.metadata_ops import ENGINES, job_names

    results = {key: r for key, r in idx.by_key.items() if key[0] == "metadata"}
    if not results:
        return []
    engines = [e for e in ENGINES if any(target == e for _, _, target in results)]
    lines = ["## Metadata operations (ops/s; failover window in seconds, lower is better)", "",
             "deepfs.Client, 1 and 16 threads, files in one directory and spread over 16; mount_create_4k: "
             "4 KiB files created through the FUSE mount (4 threads); failover_window: kill -9 of the "
             "metadata server a client uses until its next successful create. lmdb: one server; etcd-1 / "
             "etcd-3: one / three metadata servers over a 3-member etcd (etcd-3: client threads spread "
             "over the servers). × = that engine ÷ lmdb.", "",
             "| job | " + " | ".join(engines) + " |", "| --- |" + " --- |" * len(engines)]
    notes: list[str] = []
    for job in job_names():
        if not any(key[1] == job for key in results):
            continue
        cells = []
        for engine in engines:
            result = results.get(("metadata", job, engine))
            metric = next(iter(result["metrics"].values()), None) if result else None
            if metric is None or metric["median"] is None:
                cells.append("—")
                continue
            ref_result = results.get(("metadata", job, "lmdb"))
            ref = next(iter(ref_result["metrics"].values()))["median"] if ref_result and ref_result["metrics"] else None
            text = f"{_fmt(metric['median'])} ({_fmt(metric['min'])}–{_fmt(metric['max'])})"
            if ref and engine != "lmdb" and metric["median"]:
                text += f" · {metric['median'] / ref:.2f}×"
            cells.append(text)
        lines.append(f"| {job} | " + " | ".join(cells) + " |")
    for (_, job, engine), result in results.items():
        notes += [f"- {engine} / {job}: {error}" for error in result.get("errors", [])]
    return lines + [""] + notes + ([""] if notes else [])


def _degraded_section(idx: _Index) -> list[str]:
    rows = []
    for job, metric, unit in DEGRADED_JOBS:
        for target in idx.targets:
            result = idx.get("degraded", job, target)
            if result is None:
                continue
            m = idx.metric("degraded", job, target, metric)
            healthy = idx.median("fio", job, target, metric)
            if m is None:
                rows.append(f"| {job} ({unit}) | {target} | failed: {(result.get('errors') or ['?'])[0]} | | |")
                continue
            share = f"{m['median'] / healthy:.0%}" if healthy else "—"
            what = "; ".join(result.get("notes") or [])
            rows.append(f"| {job} ({unit}) | {target} | {_fmt(m['median'])} ({_fmt(m['min'])}–{_fmt(m['max'])}) "
                        f"| {share} | {what} |")
    if not rows:
        return []
    return ["## Degraded mode (m servers stopped)", "",
            "| job | target | degraded | of healthy | stopped |", "| --- | --- | --- | --- | --- |", *rows, ""]


REPAIR_TARGET = "deepfs-client"
REPAIR_GOAL = 0.7  # of healthy, for foreground I/O during repair and for degraded 4 KiB reads
REPAIR_SHARES = (
    ("sequential 1 MiB write during repair", "during_repair_seqwrite_1m", "healthy_seqwrite_1m", "bw_mib_s", True),
    ("sequential 1 MiB read during repair", "during_repair_seqread_1m", "healthy_seqread_1m", "bw_mib_s", True),
    ("4 KiB random read, m nodes stopped: column rebuilds (now)", "degraded_randread_4k_columns",
     "healthy_randread_4k", "iops", True),
    ("4 KiB random read, m nodes stopped: whole-stripe rebuilds (before)", "degraded_randread_4k_whole_stripe",
     "healthy_randread_4k", "iops", False),
)


def _repair_section(idx: _Index) -> list[str]:
    """The repair suite (``bench.repair``): time back to full redundancy, and shares of healthy."""
    results = [r for (suite, _, _), r in idx.by_key.items() if suite == "repair"]
    if not results:
        return []
    p = next((r.get("params") for r in results if r.get("params")), None) or {}
    lines = ["## Repair", ""]
    if p:
        lines += [f"A cluster of its own: {p.get('nodes')} storage nodes, RS {p.get('k')}+{p.get('m')}, "
                  f"{(p.get('stripe_size_bytes') or 0) >> 20} MiB stripes, "
                  f"{(p.get('data_bytes') or 0) / 2**20:.0f} MiB of data, `--repair-mib-s {p.get('repair_mib_s')}` "
                  f"(bytes read + written), `--repair-after {p.get('repair_after_s')}`, "
                  f"`--grace-period {p.get('grace_period_s')}`; I/O through {p.get('api')}, "
                  f"{p.get('runtime_s')} s per job after {p.get('ramp_s')} s ramp.", ""]
    lines += ["| measurement | figure | of healthy | goal |", "| --- | --- | --- | --- |"]
    errors = [e for r in results for e in r.get("errors") or []]
    total = idx.metric("repair", "time_to_redundancy", REPAIR_TARGET, "seconds")
    if total:
        lines.append(f"| time to full redundancy after kill -9 of one node and a wiped disk (down detection, "
                     f"repair_after, rebuild) | {_spread(total)} s | | |")
    rebuild = idx.metric("repair", "rebuild", REPAIR_TARGET, "seconds")
    rate = idx.metric("repair", "rebuild", REPAIR_TARGET, "mib_s")
    fragments = idx.median("repair", "rebuild", REPAIR_TARGET, "fragments")
    if rebuild and rate:
        lines.append(f"| rebuild, from repair_after to full redundancy | {_spread(rebuild)} s, {_spread(rate)} "
                     f"MiB/s of fragments rebuilt ({_fmt(fragments)} fragments) | | |")
    during = idx.median("repair", "during_repair", REPAIR_TARGET, "repair_mib_s")
    for what, job, healthy_job, metric, has_goal in REPAIR_SHARES:
        m, healthy = idx.metric("repair", job, REPAIR_TARGET, metric), idx.metric("repair", healthy_job,
                                                                                 REPAIR_TARGET, metric)
        if not m or not healthy:
            continue
        share = m["median"] / healthy["median"]
        goal = (f"≥ {REPAIR_GOAL:.0%}: {'yes' if share >= REPAIR_GOAL else '**no**'}") if has_goal else ""
        unit = "MiB/s" if metric == "bw_mib_s" else "IOPS"
        extra = f" (repair at {_fmt(during)} MiB/s)" if job.startswith("during_repair") and during else ""
        lines.append(f"| {what}{extra} | {_spread(m)} {unit} vs healthy {_spread(healthy)} | {share:.0%} | {goal} |")
    lines += [""] + [f"- failed: {e}" for e in errors] + ([""] if errors else [])
    return lines


def _spread(m: dict[str, Any]) -> str:
    if len(m.get("samples") or []) == 1:
        return _fmt(m["median"])
    return f"{_fmt(m['median'])} ({_fmt(m['min'])}–{_fmt(m['max'])})"


def _engines_section(idx: _Index, data: dict[str, Any]) -> list[str]:
    setup = data.get("setup", {})
    if not setup:
        return []
    lines = ["## How the jobs ran", "",
             "| target | direct I/O | queue-depth-32 engine | layout write |", "| --- | --- | --- | --- |"]
    for name, info in setup.items():
        direct = info.get("direct")
        target = idx.status.get(name, {})
        if direct is None:
            direct_text = "n/a (client library)"
        elif direct and not target.get("direct_io", True):
            direct_text = "O_DIRECT accepted, not passed on to the disk"
        else:
            direct_text = "yes" if direct else "no (refused)"
        layout = info.get("layout") or {}
        engine = info.get("async_engine") or f"none: {info.get('async_engine_failures')}"
        bandwidth = f"{_fmt(layout.get('bw_mib_s'))} MiB/s (one sample, setup)"
        lines.append(f"| {name} | {direct_text} | {engine} | {bandwidth} |")
    return lines + [""]


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _phases(phases: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.0f} s" for k, v in phases.items())


def _load(values: list[float] | None) -> str:
    return " ".join(f"{v:.2f}" for v in values) if values else "?"


def _cluster(c: dict[str, Any]) -> str:
    if not c:
        return "—"
    return (f"{c.get('nodes')} nodes, RS {c.get('k')}+{c.get('m')}, {(c.get('stripe_size') or 0) >> 20} MiB stripes, "
            f"fsync {'on' if c.get('fsync') else 'off'}")


# ------------------------------------------------------------------ charts
def write_charts(out_dir: Path, data: dict[str, Any]) -> dict[str, Path]:
    """throughput.png, iops.png, p99.png (+ smallfiles.png, checkpoint.png, dataload.png): median bars, min–max
    whiskers."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    idx = _Index(data)
    specs = [
        ("throughput", "fio", SEQ_JOBS, "bw_mib_s", "MiB/s", "Sequential 1 MiB throughput", False),
        ("iops", "fio", RAND_JOBS, "iops", "IOPS (log)", "Random 4 KiB IOPS", True),
        ("p99", "fio", RAND_JOBS, "p99_us", "µs (log, lower is better)", "Random 4 KiB p99 completion latency", True),
        ("smallfiles", "smallfiles", PHASES, "files_s", "files/s (log)", "Small files, 4–64 KiB", True),
        ("checkpoint", "checkpoint", CHECKPOINT_JOBS, "gib_s", "GiB/s", "Checkpoint save/load throughput", False),
        ("dataload", "dataload", DATALOAD_JOBS, "files_s", "files/s (log)", "DataLoader, 64–256 KiB files",
         True),
    ]
    paths = {}
    for name, suite, order, metric, ylabel, title, log in specs:
        jobs = idx.jobs(suite, order)
        series = [t for t in idx.targets if any(idx.metric(suite, j, t, metric) for j in jobs)]
        if not jobs or not series:
            continue
        fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(jobs) + 2), 4.2))
        width = 0.8 / len(series)
        for i, target in enumerate(series):
            xs, heights, lower, upper = [], [], [], []
            for j, job in enumerate(jobs):
                m = idx.metric(suite, job, target, metric)
                if m is None:
                    continue
                xs.append(j - 0.4 + width * (i + 0.5))
                heights.append(m["median"])
                lower.append(m["median"] - m["min"])
                upper.append(m["max"] - m["median"])
            ax.bar(xs, heights, width, label=target, yerr=[lower, upper], capsize=2)
        ax.set_xticks(range(len(jobs)))
        ax.set_xticklabels(jobs, rotation=15, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} — median, min–max whiskers")
        if log:
            ax.set_yscale("log")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths[name] = path
    return paths
