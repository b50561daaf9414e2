"""``deepfs up --meta-engine etcd --meta-servers 3``, ``status`` and ``down``, as an operator runs them.

One cluster for the module: three etcd members and three metadata servers
started by the real command in a temporary data directory. A client reaches
the namespace through the printed comma-separated address list; ``deepfs
status`` names the engine, the etcd members (leader marked) and the server
leading background work; ``deepfs down`` leaves no process behind.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import deepfs
from deepfs.local_cluster import LocalCluster
from deepfs.processes import pid_alive
from tests.conftest import SESSION_SECRET, processes_mentioning, require_etcd

pytestmark = [pytest.mark.process, pytest.mark.timeout(240)]

DEEPFS = str(Path(sys.executable).with_name("deepfs"))
COMMAND_TIMEOUT_S = 120


def deepfs_cmd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([DEEPFS, *args], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)


def recorded_pids(data_dir: Path) -> dict[str, int]:
    """Every process cluster.json names: metadata servers, storage nodes, etcd members."""
    raw = json.loads((data_dir / "cluster.json").read_text())
    infos = [*raw["metas"], *raw["nodes"], *raw["etcd"]]
    return {info["name"]: info["pid"] for info in infos if info}


@pytest.fixture(scope="module")
def etcd_up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    """(data dir, stdout of ``deepfs up``); whatever is left running is stopped at the end."""
    require_etcd()
    data_dir = tmp_path_factory.mktemp("cli-etcd") / "data"
    try:
        proc = deepfs_cmd("up", "--meta-engine", "etcd", "--meta-servers", "3", "--nodes", "3", "--k", "2",
                          "--m", "1", "--no-fsync", "--data-dir", str(data_dir), "--secret-file", str(SESSION_SECRET))
        assert proc.returncode == 0, proc.stderr[-3000:]
        yield data_dir, proc.stdout
    finally:
        if (data_dir / "cluster.json").exists():
            LocalCluster.attach(data_dir).stop()


def test_up_prints_the_address_list_and_the_etcd_endpoints(etcd_up: tuple[Path, str]) -> None:
    data_dir, out = etcd_up
    match = re.search(r"Metadata servers: (\S+)", out)
    assert match, out
    addresses = match.group(1).split(",")
    assert len(addresses) == 3 and all(re.fullmatch(r"127\.0\.0\.1:\d+", a) for a in addresses), addresses
    etcd = re.search(r"engine:\s+etcd, members (\S+)", out)
    assert etcd and len(etcd.group(1).split(",")) == 3, out
    state = json.loads((data_dir / "cluster.json").read_text())
    assert state["meta_engine"] == "etcd" and state["meta_address"] == match.group(1)


def test_a_client_writes_and_reads_through_the_list(etcd_up: tuple[Path, str]) -> None:
    data_dir, out = etcd_up
    match = re.search(r"Metadata servers: (\S+)", out)
    assert match, out
    payload = b"etcd-backed " * 5000
    with deepfs.Client(match.group(1)) as client:
        client.makedirs("/cli-etcd")
        with client.open("/cli-etcd/f.bin", "wb") as f:
            f.write(payload)
        assert client.read_file("/cli-etcd/f.bin") == payload
        assert "f.bin" in client.listdir("/cli-etcd")


def test_status_shows_engine_members_and_leader(etcd_up: tuple[Path, str]) -> None:
    data_dir, _ = etcd_up
    proc = deepfs_cmd("status", "--data-dir", str(data_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    state = json.loads((data_dir / "cluster.json").read_text())
    assert re.search(r"engine\s.*\betcd\b", text), text
    for endpoint in state["etcd_endpoints"]:
        assert endpoint in text, (endpoint, text)
    assert "(leader)" in text, text
    leader = re.search(r"background leader[\s│|]+(\d+\.\d+\.\d+\.\d+:\d+)", text)
    assert leader, text
    assert leader.group(1) in {*state["grpc_addresses"], *state["meta_addresses"]}, (leader.group(1), state)


def test_down_leaves_no_process_behind(etcd_up: tuple[Path, str]) -> None:
    data_dir, _ = etcd_up
    pids = recorded_pids(data_dir)
    assert len([n for n in pids if n.startswith("meta")]) == 3 and len([n for n in pids if n.startswith("etcd")]) == 3
    assert all(pid_alive(pid) for pid in pids.values()), pids
    proc = deepfs_cmd("down", "--data-dir", str(data_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [name for name, pid in pids.items() if pid_alive(pid)] == []
    assert processes_mentioning(data_dir) == []
    # Followers stop first: a leader stopped beside its followers waits out etcd's 7 s leadership
    # transfer to them, and says so in its log (alone, it gives up at once: "unhealthy cluster").
    logs = sorted((data_dir / "etcd").glob("*.log"))
    assert len(logs) == 3, logs
    assert [log.name for log in logs if "leader transfer took too long" in log.read_text()] == []
