"""``bench.cpu_cost --mount``: CPU and requests per operation through a real mount.

A tiny run of every row; the request counts it reports are the point: through
the kernel, a small file created, written and closed costs the metadata server
one CREATE and one COMMIT (besides the LOOKUP of the new name), a read of it
one OPEN and no COMMIT, an unlink one UNLINK, and each such system call
reaches the daemon as the FUSE request it is named after, once; but for the
read of a small file, which the page cache serves from the bytes its OPEN
brought. Closing a file opened read-only sends no FLUSH (pyfuse3's ``noflush``,
third_party/pyfuse3).
"""

from __future__ import annotations

import json

import pytest

from tests.test_bench_cpu_cost import run_tool

# kernel_caches: its cold rows drop the page cache (conftest)
pytestmark = [pytest.mark.fuse, pytest.mark.kernel_caches]


@pytest.mark.timeout(120)
def test_mount_rows_report_cpu_and_requests_per_operation() -> None:
    out = run_tool("bench.cpu_cost", "--mount", "--ops", "4", timeout_s=110)
    results = json.loads(out.strip().splitlines()[-1])
    assert list(results) == ["mount_randread_4k", "mount_create_4k", "mount_stat", "mount_read_4k", "mount_unlink",
                             "mount_read_64_256k", "mount_randwrite_4k"]
    for row in results.values():
        assert row["wall_ms"] > 0 and all(row[f"{g}_cpu_ms"] >= 0 for g in ("app", "fuse", "meta", "nodes"))
        assert row["busy"] >= 0 and row["ms_per_sync"] >= 0  # (busy: clock ticks, coarse over 4 ops)
    # One thread: the CREATE and the COMMIT of a create are two groups, each one durable commit.
    assert results["mount_create_4k"]["syncs_per_op"] >= 2 and results["mount_create_4k"]["ms_per_sync"] > 0
    assert results["mount_stat"]["syncs_per_op"] < 1  # reads commit nothing (a background write at most)
    fuse = {name: row["requests"]["fuse"] for name, row in results.items()}
    meta = {name: row["requests"]["meta"] for name, row in results.items()}
    assert fuse["mount_randread_4k"]["read"] == 1
    assert all(n < 1 for n in meta["mount_randread_4k"].values())  # a stray background request at most
    # Each write is one WRITE; the fsync stores the touched stripes and commits them (one COMMIT each).
    assert fuse["mount_randwrite_4k"]["write"] == 1 and fuse["mount_randwrite_4k"]["fsync"] == 0.25
    assert 0 < meta["mount_randwrite_4k"]["COMMIT"] <= 1 and meta["mount_randwrite_4k"]["FSYNC"] == 0.25
    assert fuse["mount_create_4k"]["create"] == 1 and fuse["mount_create_4k"]["flush"] == 1
    assert meta["mount_create_4k"]["CREATE"] == 1 and meta["mount_create_4k"]["COMMIT"] == 1
    # The OPEN of an unchanged inline file brings its bytes into the page cache: no READ follows.
    assert fuse["mount_read_4k"]["open"] == 1 and "read" not in fuse["mount_read_4k"]
    assert meta["mount_read_4k"]["OPEN"] == 1 and "COMMIT" not in meta["mount_read_4k"]
    assert meta["mount_unlink"]["UNLINK"] == 1 and fuse["mount_unlink"]["unlink"] == 1
    # Files past the inline size: OPEN, READ (the bytes come from a node) and no FLUSH at close.
    assert fuse["mount_read_64_256k"]["open"] == 1 and fuse["mount_read_64_256k"]["read"] >= 1
    assert "flush" not in fuse["mount_read_4k"] and "flush" not in fuse["mount_read_64_256k"]
