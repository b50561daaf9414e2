"""bench.cpu_cost keeps working (a tiny run of every measurement)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.timeout(120)
def test_cpu_cost_reports_every_operation() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.cpu_cost", "--ops", "5", "--stripes", "2"],
        capture_output=True, text=True, timeout=110, cwd=Path(__file__).parent.parent, check=True,
    ).stdout
    results = json.loads(out.strip().splitlines()[-1])
    assert set(results) == {"node_ping", "small_file_write_16k", "small_file_read_16k", "stripe_write_4m", "stripe_read_4m"}
    for figures in results.values():
        assert figures["wall_ms"] > 0 and all(v >= 0 for v in figures.values())


@pytest.mark.timeout(180)
def test_checkpoint_cpu_reports_saves_and_loads_of_both_sides() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.checkpoint_cpu", "--mib", "8", "--reps", "1"],
        capture_output=True, text=True, timeout=170, cwd=Path(__file__).parent.parent, check=True,
    ).stdout
    rows = json.loads(out.strip().splitlines()[-1])
    assert [r["what"] for r in rows] == ["adapter save", "local torch.save+fsync", "adapter load", "local torch.load"]
    for row in rows:
        assert row["wall_s"] > 0 and row["client_user_s"] + row["client_sys_s"] > 0
    assert rows[0]["nodes_user_s"] + rows[0]["nodes_sys_s"] > 0  # the adapter's bytes went through the nodes
