"""bench.cpu_cost keeps working (a tiny run of every measurement)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.process


def run_tool(*args: str, timeout_s: float) -> str:
    """The tool's stdout; its stderr in the failure message if it fails."""
    done = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout_s,
                          cwd=Path(__file__).parent.parent)
    assert done.returncode == 0, f"{' '.join(args)} exited {done.returncode}:\n{done.stderr[-4000:]}"
    return done.stdout


@pytest.mark.timeout(120)
def test_cpu_cost_reports_every_operation() -> None:
    out = run_tool("bench.cpu_cost", "--ops", "5", "--stripes", "2", timeout_s=110)
    lines = out.strip().splitlines()
    results = json.loads(lines[-1])
    assert list(results) == ["node_ping", "small_file_write_16k", "small_file_read_16k", "stripe_write_4m",
                             "stripe_read_4m", "randread_4k", "small_file_create_4k", "small_file_read_4k",
                             "small_file_stat_4k", "small_file_unlink_4k"]
    for figures in results.values():
        assert figures["wall_ms"] > 0 and all(v >= 0 for v in figures.values())
    table = {line.split()[0]: line for line in lines[1:-1]}
    assert set(table) == set(results)
    assert "<= 0.12: " in table["randread_4k"] and "<= 1.00: " in table["small_file_create_4k"]
    assert "<=" not in table["node_ping"] and "<=" not in table["small_file_read_4k"]


@pytest.mark.timeout(180)
def test_checkpoint_cpu_reports_saves_and_loads_of_both_sides() -> None:
    out = run_tool("bench.checkpoint_cpu", "--mib", "8", "--reps", "1", timeout_s=170)
    rows = json.loads(out.strip().splitlines()[-1])
    assert [r["what"] for r in rows] == ["adapter save", "local torch.save+fsync", "adapter load", "local torch.load"]
    groups = ("client", "meta", "nodes")
    for row in rows:  # 8 MiB costs a few clock ticks at most: the figures exist, nothing more to say
        assert row["wall_s"] > 0
        assert all(row[f"{g}_{kind}_s"] >= 0 for g in groups for kind in ("user", "sys"))


@pytest.mark.timeout(60)
def test_floor_reports_the_round_trips_and_the_commit(tmp_path: Path) -> None:
    out = run_tool("bench.floor", "--rounds", "40", "--dir", str(tmp_path), timeout_s=50)
    lines = out.strip().splitlines()
    figures = json.loads(lines[-1])
    assert list(figures) == ["echo_tcp_us", "echo_unix_us", "lmdb_commit_us", "lmdb_commit_cpu_us",
                             "lmdb_commit_switches"]
    assert figures["echo_tcp_us"] > 0 and figures["echo_unix_us"] > 0 and figures["lmdb_commit_us"] > 0
    assert {line.split()[0] for line in lines[:-1]} == set(figures)
    assert not list(tmp_path.iterdir())  # its LMDB directory is gone again
    assert subprocess.run([sys.executable, "-m", "bench.floor", "--rounds", "0"], capture_output=True,
                          cwd=Path(__file__).parent.parent, timeout=30).returncode == 2
