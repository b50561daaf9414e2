"""Where a checkpoint's save and load spend CPU: wall time and CPU seconds per
process group (client, metadata server, storage nodes; user and system) for
the adapter, with a plain ``torch.save``/``torch.load`` on the local disk
beside it, alternating, page cache dropped before every load.

The full benchmark compares speeds; this is the tool for a change to the
checkpoint path (CPU barely moves with the VM's noise, wall time does). Run:

    python -m bench.checkpoint_cpu [--mib 1024] [--reps 3] [--stripe-mib 4]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import deepfs
from bench.checkpoint import check_same, make_state_dict
from bench.system import PageCache
from deepfs.config import ClientConfig
from deepfs.local_cluster import LocalCluster

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_split(pids: list[int]) -> tuple[float, float]:
    """(user, system) CPU seconds of the given processes so far."""
    user = system = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        user += int(fields[11])
        system += int(fields[12])
    return user / _TICKS, system / _TICKS


def measure(groups: dict[str, list[int]], work: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    """Run ``work``; its result and the wall seconds and CPU seconds per group it took."""
    before = {name: cpu_split(pids) for name, pids in groups.items()}
    started = time.perf_counter()
    result = work()
    figures = {"wall_s": time.perf_counter() - started}
    for name, pids in groups.items():
        user, system = cpu_split(pids)
        figures[f"{name}_user_s"] = user - before[name][0]
        figures[f"{name}_sys_s"] = system - before[name][1]
    return result, figures


def run(mib: int, reps: int, stripe_mib: int, work_dir: Path,
        checkpoint_stripe_mib: int | None = None) -> list[dict[str, Any]]:
    import torch

    import deepfs.torch as dtorch

    state = make_state_dict(mib << 20)
    page_cache = PageCache(enabled=True)
    rows: list[dict[str, Any]] = []
    with LocalCluster(work_dir / "cluster", 6, 4, 2, stripe_mib << 20, fsync=True).start() as cluster, \
            deepfs.Client(cluster.meta_address, _client_config(cluster.meta_address, checkpoint_stripe_mib),
                          key=cluster.admin_key) as client:
        groups = {"client": [os.getpid()], "meta": [cluster.state.meta.pid],
                  "nodes": [n.pid for n in cluster.state.nodes if n]}
        local = work_dir / "local.pt"
        for rep in range(reps):
            if client.exists("/ck.pt"):
                client.unlink("/ck.pt")
            _, figures = measure(groups, lambda: dtorch.save(state, "/ck.pt", client=client, progress=False))
            rows.append({"rep": rep, "what": "adapter save", **figures})
            _, figures = measure(groups, lambda: (torch.save(state, local), _fsync(local)))
            rows.append({"rep": rep, "what": "local torch.save+fsync", **figures})
            for what, load in (("adapter load", lambda: dtorch.load("/ck.pt", client=client, progress=False)),
                               ("local torch.load", lambda: torch.load(local, map_location="cpu", weights_only=True))):
                page_cache.drop()
                gc.collect()
                loaded, figures = measure(groups, load)
                check_same(state, loaded)
                del loaded
                rows.append({"rep": rep, "what": what, "page_cache_dropped": page_cache.enabled, **figures})
    return rows


def _client_config(address: str, checkpoint_stripe_mib: int | None) -> ClientConfig:
    config = ClientConfig(meta_address=address)
    if checkpoint_stripe_mib is not None:
        config.checkpoint_stripe_bytes = checkpoint_stripe_mib << 20
    return config


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.checkpoint_cpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=1024, help="size of the state dict")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--stripe-mib", type=int, default=4, help="the cluster's default stripe size")
    parser.add_argument("--checkpoint-stripe-mib", type=int,
                        help="ClientConfig.checkpoint_stripe_bytes in MiB (default: the client's default)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="deepfs-ckpt-cpu-", dir="/var/tmp") as tmp:
        rows = run(args.mib, args.reps, args.stripe_mib, Path(tmp), args.checkpoint_stripe_mib)
    print(f"{'rep':>3} {'what':<24}{'wall':>7}{'client':>13}{'nodes':>13}{'meta':>7}   (s; user+sys)")
    for r in rows:
        print(f"{r['rep']:>3} {r['what']:<24}{r['wall_s']:7.2f}"
              f"{r['client_user_s']:7.2f}+{r['client_sys_s']:.2f}{r['nodes_user_s']:7.2f}+{r['nodes_sys_s']:.2f}"
              f"{r['meta_user_s'] + r['meta_sys_s']:7.2f}")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
