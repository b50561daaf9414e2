"""The benchmark's pure parts: target names, fio parameters and output, small-file trees, statistics, report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import report, smallfiles
from bench.fio_runner import JOBS_BY_NAME, FioError, RunParams, job_env, parse_output
from bench.stats import Result
from bench.targets import parse_target_names

pytestmark = pytest.mark.unit


def test_target_names_deepfs_means_both_surfaces() -> None:
    assert parse_target_names("deepfs,local") == ["deepfs", "deepfs-client", "local"]
    assert parse_target_names("local, gluster,local") == ["local", "gluster"]
    assert parse_target_names("deepfs-client") == ["deepfs-client"]
    with pytest.raises(ValueError, match="unknown target 'ceph'"):
        parse_target_names("deepfs,ceph")


def test_job_env_gives_four_jobs_disjoint_slices() -> None:
    params = RunParams(size_bytes=1 << 30, runtime_s=5, ramp_s=1, direct=True)
    env = job_env(JOBS_BY_NAME["seqread_1m_j4"], Path("/x/bench.dat"), params)
    assert env["BENCH_SIZE"] == env["BENCH_OFFSET_INCREMENT"] == str(256 << 20)
    assert env["BENCH_JOBS"] == "4" and env["BENCH_RUNTIME"] == "5000ms" and env["BENCH_DIRECT"] == "1"
    rand = job_env(JOBS_BY_NAME["randread_4k_j1_qd32"], Path("/x/bench.dat"), params, "libaio")
    assert rand["BENCH_SIZE"] == str(1 << 30) and rand["BENCH_OFFSET_INCREMENT"] == "0"
    assert rand["BENCH_ENGINE"] == "libaio" and rand["BENCH_DEPTH"] == "32"
    for job in JOBS_BY_NAME.values():  # every variable a job file uses is set
        text = (Path(report.__file__).parent / "jobs" / job.jobfile).read_text()
        used = {part.split("}")[0] for part in text.split("${")[1:]}
        assert used <= set(job_env(job, Path("/f"), params)), (job.jobfile, used)


def test_parse_fio_output_skips_warnings_and_reads_p99() -> None:
    fio_json = {"jobs": [{"job_runtime": 5000, "read": {
        "io_bytes": 10 << 20, "bw_bytes": 2 << 20, "iops": 512.0,
        "clat_ns": {"mean": 1_500_000.0, "percentile": {"99.000000": 3_000_000}}},
        "write": {"io_bytes": 0}}]}
    sample = parse_output("fio: some warning\n" + json.dumps(fio_json), "read", "psync")
    assert (sample.bw_mib_s, sample.iops, sample.p99_us, sample.mean_lat_us) == (2.0, 512.0, 3000.0, 1500.0)
    assert sample.runtime_s == 5.0
    with pytest.raises(FioError, match="no bytes"):
        parse_output(json.dumps(fio_json), "write", "psync")
    with pytest.raises(FioError, match="unreadable"):
        parse_output("fio: file system full", "read", "psync")


def test_small_file_tree_is_nested_and_sized() -> None:
    tree = smallfiles.make_tree("top", 1000)
    assert len(tree.files) == 1000 and len({p for p, _ in tree.files}) == 1000
    assert all(smallfiles.MIN_SIZE <= size <= smallfiles.MAX_SIZE for _, size in tree.files)
    parents = {p.rsplit("/", 1)[0] for p, _ in tree.files}
    assert parents <= set(tree.dirs) and all(p.count("/") == 2 for p in parents)
    assert tree.dirs.index("top") == 0 and len(parents) == 10
    assert make_sizes(tree) == make_sizes(smallfiles.make_tree("top", 1000))  # same files for every target


def make_sizes(tree: smallfiles.Tree) -> list[int]:
    return [size for _, size in tree.files]


def test_small_files_phases_on_a_directory(tmp_path: Path) -> None:
    tree = smallfiles.make_tree("t", 30)
    seen = []
    rates = smallfiles.run(smallfiles.PosixOps(tmp_path), tree, threads=3, between_phases=seen.append)
    assert seen == list(smallfiles.PHASES) and all(rates[p] > 0 for p in smallfiles.PHASES)
    assert list(tmp_path.iterdir()) == []


def test_metric_median_and_spread() -> None:
    result = Result("fio", "seqread_1m_j1", "deepfs")
    for value in (3.0, 1.0, 2.0, None):
        result.metric("bw_mib_s", "MiB/s").add(value)
    summary = result.to_json()["metrics"]["bw_mib_s"]
    assert (summary["median"], summary["min"], summary["max"], summary["samples"]) == (2.0, 1.0, 3.0, [3.0, 1.0, 2.0])


def _result(suite: str, job: str, target: str, metric: str, samples: list[float], higher: bool = True) -> dict:
    r = Result(suite, job, target)
    for s in samples:
        r.metric(metric, "u", higher).add(s)
    return r.to_json()


def test_report_ratios_goals_and_skipped_targets(tmp_path: Path) -> None:
    data = {
        "status": "complete", "command": "deepfs bench", "config": {"reps": 3}, "machine": {}, "versions": {},
        "targets": {
            "deepfs": {"status": "ok", "description": "DeepFS FUSE"},
            "local": {"status": "ok"},
            "gluster": {"status": "ok"},
            "bindfs": {"status": "skipped", "reason": "bindfs is not installed"},
        },
        "results": [
            _result("fio", "seqread_1m_j1", "deepfs", "bw_mib_s", [600, 700, 650]),
            _result("fio", "seqread_1m_j1", "gluster", "bw_mib_s", [300, 330, 325]),
            _result("fio", "seqread_1m_j1", "local", "bw_mib_s", [1300, 1300, 1300]),
            {**_result("fio", "randwrite_4k_j1", "gluster", "iops", []), "errors": ["rep 1: fio exited with 1"]},
            _result("fio", "randwrite_4k_j1", "deepfs", "iops", [10, 20, 30]),
            _result("checkpoint", "load", "deepfs-client", "seconds", [2.0], higher=False),
            _result("checkpoint", "load", "local", "seconds", [1.0], higher=False),
        ],
    }
    paths = report.write(tmp_path, data)
    md = paths["markdown"].read_text()
    assert "| bindfs | **skipped**: bindfs is not installed |" in md
    assert "| seqread_1m_j1 | 650 (600–700) | 1,300 (1,300–1,300) · 2.00× | 325 (300–330) · 0.50× | skipped | — |" in md
    assert "| sequential 1 MiB read, 1 job | deepfs 650 vs gluster 325 | 2.00× | ≥ 2.0× | yes |" in md
    assert "adapter load vs torch.load | deepfs-client 2.00 vs local 1.00 | 0.50× | ≥ 0.8× | **no** |" in md
    assert "failed [1]" in md and "- gluster / randwrite_4k_j1: rep 1: fio exited with 1" in md
    assert "| 4 KiB random write, 1 job | deepfs 20.0 IOPS | | ≥ 4,000 IOPS | **no** |" in md
    assert json.loads(paths["json"].read_text())["targets"]["bindfs"]["reason"] == "bindfs is not installed"
    assert (tmp_path / "throughput.png").read_bytes()[:4] == b"\x89PNG"


def test_report_repair_section_gives_shares_of_healthy_and_goals() -> None:
    params = {"nodes": 7, "k": 4, "m": 2, "repair_mib_s": 50.0, "data_bytes": 1 << 30}

    def row(job: str, **metrics: list[float]) -> dict:
        result = Result("repair", job, "deepfs-client")
        for metric, samples in metrics.items():
            for sample in samples:
                result.metric(metric, "u", metric not in ("seconds",)).add(sample)
        return {**result.to_json(), "params": params}

    data = {
        "status": "complete", "config": {}, "machine": {}, "versions": {},
        "targets": {"deepfs-client": {"status": "ok"}},
        "results": [
            row("time_to_redundancy", seconds=[30.0]),
            row("rebuild", seconds=[20.0], mib_s=[10.0], fragments=[200]),
            row("healthy_seqread_1m", bw_mib_s=[400, 500, 600]), row("during_repair_seqread_1m", bw_mib_s=[250]),
            row("healthy_randread_4k", iops=[1000]), row("degraded_randread_4k_columns", iops=[800]),
            row("degraded_randread_4k_whole_stripe", iops=[300]),
        ],
    }
    md = report.markdown(data, [])
    assert "## Repair" in md and "`--repair-mib-s 50.0`" in md and "1024 MiB of data" in md
    assert "| 30.0 s | | |" in md and "| 20.0 s, 10.0 MiB/s of fragments rebuilt (200 fragments) | | |" in md
    assert "| sequential 1 MiB read during repair | 250 MiB/s vs healthy 500 (400–600) | 50% | ≥ 70%: **no** |" in md
    assert "column rebuilds (now) | 800 IOPS vs healthy 1,000 | 80% | ≥ 70%: yes |" in md
    assert "whole-stripe rebuilds (before) | 300 IOPS vs healthy 1,000 | 30% |  |" in md
    assert "seqwrite" not in md  # rows without figures are left out


def _merged(first: dict, *more: dict) -> dict:
    """One job's result with the metrics of several (a Result holds every metric of its job)."""
    return {**first, "metrics": {k: v for r in (first, *more) for k, v in r["metrics"].items()}}


def test_report_issue_14_goals_and_dataload_section(tmp_path: Path) -> None:
    params = {"files": 20000, "total_bytes": 3 << 30, "directories": 100, "min_size_bytes": 64 << 10,
              "max_size_bytes": 256 << 10, "workers": 2, "batch_size": 32}
    data = {
        "status": "complete", "config": {"dataload_files": 20000}, "machine": {}, "versions": {},
        "targets": {name: {"status": "ok"} for name in ("deepfs", "deepfs-client", "gluster")},
        "results": [
            _merged(_result("fio", "randread_4k_j1_qd1", "deepfs", "iops", [9000, 8000, 8500]),
                    _result("fio", "randread_4k_j1_qd1", "deepfs", "p99_us", [400], higher=False)),
            _result("fio", "randread_4k_j1_qd1", "deepfs-client", "iops", [9000]),
            _merged(_result("fio", "randread_4k_j1_qd1", "gluster", "iops", [2000]),
                    _result("fio", "randread_4k_j1_qd1", "gluster", "p99_us", [900], higher=False)),
            _result("smallfiles", "stat", "deepfs", "files_s", [21000]),
            _result("smallfiles", "stat", "gluster", "files_s", [1000]),
            {**_merged(_result("dataload", "epoch", "deepfs", "files_s", [1000, 1200]),
                       _result("dataload", "epoch", "deepfs", "mib_s", [150, 180])), "params": params},
            _result("dataload", "epoch", "deepfs-client", "files_s", [900]),
            {**_merged(_result("dataload", "epoch", "gluster", "files_s", [200]),
                       _result("dataload", "epoch", "gluster", "mib_s", [30])), "errors": ["rep 2: RuntimeError('x')"]},
        ],
    }
    paths = report.write(tmp_path, data)
    md = paths["markdown"].read_text()
    goals = md.split("## Where DeepFS stands against its goals")[1].split("\n## ")[0]
    assert "| 4 KiB random read IOPS, 1 job, QD1 | deepfs 8,500 vs gluster 2,000 | 4.25× | ≥ 4.0× | yes |" in goals
    assert "| 4 KiB random read IOPS, 1 job, QD1 | deepfs-client 9,000 vs gluster 2,000 | 4.50× | ≥ 4.0× | yes |" \
        in goals
    assert "| 4 KiB random read, 1 job, QD1 | deepfs 8,500 IOPS | | ≥ 8,000 IOPS | yes |" in goals
    assert "| 4 KiB random read, 1 job, QD1 | deepfs-client 9,000 IOPS | | ≥ 10,000 IOPS | **no** |" in goals
    assert "| p99 of 4 KiB random read, QD1 | deepfs 400 µs | | ≤ 500 µs | yes |" in goals
    assert "| small-file stats/s | deepfs 21,000 vs gluster 1,000 | 21.00× | ≥ 5.0× | yes |" in goals
    assert "| small-file stats | deepfs 21,000 files/s | | ≥ 20,000 files/s | yes |" in goals
    assert "| DataLoader files/s (mount) | deepfs 1,100 vs gluster 200 | 5.50× | ≥ 5.0× | yes |" in goals
    assert ("| DataLoader files/s (fsspec/deepfs.Client) | deepfs-client 900 vs gluster 200 | 4.50× | ≥ 5.0× "
            "| **no** |") in goals
    assert "small-file creates" not in goals  # no figures, no row
    section = md.split("## Data loading (PyTorch DataLoader)")[1].split("\n## ")[0]
    assert "over 20,000 files of 64–256 KiB in 100 directories (3,072 MiB), 2 workers, batch size 32" in section
    assert "| files/s | 1,100 (1,000–1,200) | 900 (900–900) · 0.82× | 200 (200–200) · 0.18× |" in section
    assert "| MiB/s | 165 (150–180) | — | 30.0 (30.0–30.0) · 0.18× |" in section
    assert "- gluster / epoch: 1 failed repetition(s): rep 2: RuntimeError('x')" in section
    assert (tmp_path / "dataload.png").read_bytes()[:4] == b"\x89PNG"


def test_dataload_tree_and_an_epoch_on_a_directory(tmp_path: Path) -> None:
    from bench import dataload

    tree = dataload.make_tree("dl", 150)
    assert len(tree.files) == 150 and len(tree.dirs) == 101 and tree.dirs[0] == "dl"
    assert all(dataload.MIN_SIZE <= size <= dataload.MAX_SIZE for _, size in tree.files)
    assert {p.rsplit("/", 1)[0] for p, _ in tree.files} == set(tree.dirs[1:])
    assert tree == dataload.make_tree("dl", 150)  # the same files on every target
    ops = smallfiles.PosixOps(tmp_path)
    dataload.write(ops, tree)
    dataset = dataload.Files(tree, str(tmp_path))
    files_s, mib_s = dataload.epoch(dataset, seed=0)
    assert files_s > 0 and mib_s > 0
    path, size = tree.files[77]  # a file that reads back wrong fails the epoch
    with open(tmp_path / path, "r+b") as f:
        f.seek(size - 1)
        f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
    with pytest.raises(RuntimeError, match="f000077.bin"):
        dataload.epoch(dataset, seed=1)
    dataload.remove(ops, tree)
    assert list(tmp_path.iterdir()) == []
