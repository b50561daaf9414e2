"""The benchmark harness itself: ``deepfs bench --quick`` runs end to end and reports real figures.

This is a smoke test of the harness (targets up and down, every suite, the
report), so the benchmark cannot rot; its numbers are not checked against
any goal. The full benchmark is ``make bench``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import processes_mentioning

TARGETS = ("deepfs", "deepfs-client", "local", "bindfs")

pytestmark = [
    pytest.mark.fuse,
    pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed (make deps)"),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
]


def _mounts() -> str:
    return Path("/proc/self/mounts").read_text()


@pytest.mark.timeout(300)
def test_quick_run_reports_every_target(tmp_path: Path) -> None:
    out = tmp_path / "out"
    deepfs_cli = Path(sys.executable).with_name("deepfs")
    cmd = [str(deepfs_cli), "bench", "--quick", "--targets", "deepfs,local,bindfs", "--out", str(out),
           "--work-dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]

    data = json.loads((out / "results.json").read_text())
    assert data["status"] == "complete"
    assert data["config"]["reps"] == 2 and data["config"]["dataload_files"] == 300
    for name in TARGETS:
        assert data["targets"][name]["status"] == "ok", data["targets"][name]

    def figures(suite: str, job: str, metric: str) -> dict[str, list[float]]:
        return {r["target"]: r["metrics"][metric]["samples"] for r in data["results"]
                if r["suite"] == suite and r["job"] == job and metric in r["metrics"]}

    checks = [("fio", "seqwrite_1m_j1", "bw_mib_s"), ("fio", "seqread_1m_j4", "bw_mib_s"),  # the quick jobs
              ("fio", "randread_4k_j1_qd1", "iops"), ("fio", "randread_4k_j1_qd32", "iops"),
              ("fio", "randwrite_4k_j1", "iops"), ("smallfiles", "create", "files_s"),
              ("smallfiles", "read", "files_s"), ("dataload", "epoch", "files_s"), ("dataload", "epoch", "mib_s"),
              ("checkpoint", "save", "seconds"),
              ("checkpoint", "load", "seconds"), ("checkpoint", "dcp_save", "seconds"),
              ("checkpoint", "dcp_load", "seconds")]
    for suite, job, metric in checks:
        found = figures(suite, job, metric)
        for name in TARGETS:
            samples = found.get(name)
            assert samples and len(samples) == 2 and all(s > 0 for s in samples), (suite, job, name, found)
    assert figures("fio", "randread_4k_j1_qd1", "p99_us")["deepfs"][0] > 0
    degraded = figures("degraded", "seqread_1m_j1", "bw_mib_s")
    assert degraded.get("deepfs") and degraded.get("deepfs-client"), degraded
    repair = [("time_to_redundancy", "seconds"), ("rebuild", "mib_s"), ("healthy_seqwrite_1m", "bw_mib_s"),
              ("during_repair_seqwrite_1m", "bw_mib_s"), ("during_repair_seqread_1m", "bw_mib_s"),
              ("healthy_randread_4k", "iops"), ("degraded_randread_4k_columns", "iops"),
              ("degraded_randread_4k_whole_stripe", "iops")]
    for job, metric in repair:
        samples = figures("repair", job, metric).get("deepfs-client")
        assert samples and all(s > 0 for s in samples), (job, samples)

    markdown = (out / "results.md").read_text()
    assert "| seqread_1m_j4 |" in markdown and "## Small files" in markdown and "## Checkpoint" in markdown
    assert "## Data loading (PyTorch DataLoader)" in markdown and "over 300 files of 64–256 KiB" in markdown
    assert "## Repair" in markdown and "column rebuilds (now)" in markdown
    for name in ("throughput", "iops", "p99", "dataload"):
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Everything it started is gone: no mounts, no scratch directory left under the work dir.
    assert str(tmp_path) not in _mounts()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.timeout(120)
def test_sigterm_mid_run_stops_and_unmounts_everything(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [str(Path(sys.executable).with_name("deepfs")), "bench", "--quick", "--targets", "deepfs,local,bindfs",
           "--suites", "fio", "--out", str(out), "--work-dir", str(tmp_path)]
    log = tmp_path / "bench.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while "[fio]" not in log.read_text(errors="replace"):  # targets are up and mounted
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    data = json.loads((out / "results.json").read_text())
    assert data["status"] == "interrupted"
    assert str(tmp_path) not in _mounts()
    assert processes_mentioning(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.log", "out"]
