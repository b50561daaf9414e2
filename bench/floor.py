"""What this machine allows a Python storage service per request, before any of DeepFS's work.

The problem: issue 14's goals are IOPS and files/s, and whether a goal is far
or near depends on what one request costs here with no work in it at all.
A 4 KiB read through the mount takes a FUSE round trip (the kernel to the
mount daemon and back) and one request from the daemon to a storage node; a
create waits for a synced commit of the metadata store. This measures those
floors with nothing of DeepFS in them, side by side in one run (the host's
speed drifts):

- ``echo_tcp_us`` / ``echo_unix_us``: one 100-byte request and a 4 KiB
  answer between two Python processes over blocking sockets (TCP on loopback,
  a Unix socket), round trip;
- ``lmdb_commit_us``: a synced LMDB commit of a 4 KiB record (``sync=True,
  metasync=False``, as ``metadata/engines/lmdb_engine.py`` opens it), wall
  time, with its CPU (``lmdb_commit_cpu_us``) and the voluntary context
  switches it costs (``lmdb_commit_switches``), in the directory given.

Run: ``python -m bench.floor [--dir PATH] [--rounds N]``. The FUSE round trip
is measured by the benchmark itself: ``bindfs`` beside ``local`` in the fio
jobs (bindfs's 4 KiB QD1 reads are served by the page cache, so their latency
is the kernel's FUSE round trip plus a C daemon's work).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import socket
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

import lmdb

REQUEST = b"q" * 100
ANSWER_BYTES = 4096 + 64


def _echo_server(family: int, address: tuple[str, int] | str, report: Connection) -> None:
    """Bind ``address`` (port 0: any), send the address bound through ``report``, then answer
    each request with ``ANSWER_BYTES`` until the peer closes."""
    with socket.socket(family) as listener:
        listener.bind(address)
        listener.listen()
        report.send(listener.getsockname())
        conn, _ = listener.accept()
        with conn:
            if family == socket.AF_INET:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            answer = os.urandom(ANSWER_BYTES)
            pieces = [answer[:64], answer[64:]]  # a frame's header and payload: one sendmsg
            while conn.recv(65536):
                conn.sendmsg(pieces)


def echo_round_trip_us(family: int, rounds: int) -> float:
    """The mean of ``rounds`` request/answer round trips to another process, in µs."""
    with tempfile.TemporaryDirectory(prefix="deepfs-floor-") as tmp:
        wanted: tuple[str, int] | str = ("127.0.0.1", 0) if family == socket.AF_INET else os.path.join(tmp, "echo")
        context = multiprocessing.get_context("fork")
        ours, theirs = context.Pipe(duplex=False)
        server = context.Process(target=_echo_server, args=(family, wanted, theirs), daemon=True)
        server.start()
        try:
            if not ours.poll(10):
                raise RuntimeError("the echo server did not start")
            address = ours.recv()
            with socket.socket(family) as conn:
                conn.settimeout(10)
                conn.connect(address)
                if family == socket.AF_INET:
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                buf = memoryview(bytearray(ANSWER_BYTES))
                started = time.perf_counter()
                for _ in range(rounds):
                    conn.sendall(REQUEST)
                    got = 0
                    while got < ANSWER_BYTES:
                        n = conn.recv_into(buf[got:])
                        if not n:
                            raise RuntimeError("the echo server went away")
                        got += n
                return (time.perf_counter() - started) * 1e6 / rounds
        finally:
            server.join(10)
            if server.is_alive():
                server.kill()


def lmdb_commit_cost(directory: Path, rounds: int) -> dict[str, float]:
    """Wall µs, CPU µs and voluntary context switches per synced commit of one 4 KiB record."""
    with tempfile.TemporaryDirectory(prefix="deepfs-floor-", dir=directory) as tmp:
        env = lmdb.open(tmp, map_size=1 << 30, sync=True, metasync=False, max_dbs=2)
        try:
            db = env.open_db(b"floor")
            value = os.urandom(4096)
            before = resource.getrusage(resource.RUSAGE_THREAD)
            started = time.perf_counter()
            for i in range(rounds):
                with env.begin(write=True) as txn:
                    txn.put(i.to_bytes(8, "big"), value, db=db)
            wall = time.perf_counter() - started
            after = resource.getrusage(resource.RUSAGE_THREAD)
        finally:
            env.close()
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return {
        "lmdb_commit_us": wall * 1e6 / rounds,
        "lmdb_commit_cpu_us": cpu * 1e6 / rounds,
        "lmdb_commit_switches": (after.ru_nvcsw - before.ru_nvcsw) / rounds,
    }


def measure(directory: Path, rounds: int) -> dict[str, float]:
    """Every floor, measured in two interleaved passes; the lower of the two (the host's speed drifts)."""
    passes: list[dict[str, float]] = []
    jobs: list[tuple[str, Callable[[], float]]] = [
        ("echo_tcp_us", lambda: echo_round_trip_us(socket.AF_INET, rounds)),
        ("echo_unix_us", lambda: echo_round_trip_us(socket.AF_UNIX, rounds)),
    ]
    for _ in range(2):
        figures = {name: job() for name, job in jobs}
        figures.update(lmdb_commit_cost(directory, max(1, rounds // 4)))
        passes.append(figures)
    return {name: min(p[name] for p in passes) for name in passes[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=Path.cwd(),
                        help="where the LMDB commits go (the metadata server's disk; default: here)")
    parser.add_argument("--rounds", type=int, default=5000, help="round trips per measurement (commits: a quarter)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    figures = measure(args.dir, args.rounds)
    for name, value in figures.items():
        print(f"{name:<24}{value:10.1f}")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
