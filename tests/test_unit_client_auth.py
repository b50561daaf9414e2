"""The client's side of authentication, without servers: the capability cache
(refresh timing on a fake clock, bound, one refresh after a node refuses),
key resolution, and what OPEN asks for from open modes and flags."""

from __future__ import annotations

import errno
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from deepfs.auth import (
    AuthError,
    Identity,
    issue_capability,
    make_key,
    new_cluster_secret,
    write_key_file,
)
from deepfs.client import AsyncClient
from deepfs.client._caps import CapabilityCache, access_for
from deepfs.client._file import open_access
from deepfs.client._stripes import StripeIO
from deepfs.client._transport import NO_KEY, client_key
from deepfs.config import ClientConfig
from deepfs.frames import Op
from deepfs.testing import FakeClock
from fuse_client.posix import InodeNumbers, open_flags_access

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]

SERVICE = bytes(range(32))
TTL_S = 600.0


class Issuer:
    """A metadata server's CAPABILITY op on a fake clock: counts what it was asked."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.asked: list[tuple[int, str]] = []

    async def __call__(self, ino: int, access: str) -> list[Any]:
        await trio.lowlevel.checkpoint()
        self.asked.append((ino, access))
        return self.cap(ino, "rw" if "w" in access else "r")

    def cap(self, ino: int, ops: str) -> list[Any]:
        return issue_capability(SERVICE, ino, ops, 0, TTL_S, self.clock())


def run(test: Callable[[], Awaitable[None]]) -> None:
    trio.run(test)


# ------------------------------------------------------------------ the cache
def test_a_capability_is_reused_until_a_quarter_of_its_life_is_left() -> None:
    clock = FakeClock(1_000_000.0)
    issuer = Issuer(clock)
    caps = CapabilityCache(issuer, clock=clock)

    async def main() -> None:
        opened = issuer.cap(7, "r")
        caps.put(7, opened)  # from an OPEN reply
        assert await caps.get(7, "r") is opened and issuer.asked == []
        clock.advance(TTL_S * 0.74)
        assert await caps.get(7, "r") is opened and issuer.asked == []
        clock.advance(TTL_S * 0.02)  # < 1/4 left: a fresh one before use
        fresh = await caps.get(7, "r")
        assert fresh is not opened and issuer.asked == [(7, "r")]
        assert await caps.get(7, "r") is fresh and caps.fetches == 1

    run(main)


def test_a_missing_capability_is_fetched_once_for_concurrent_requests() -> None:
    clock = FakeClock(1_000_000.0)
    issuer = Issuer(clock)
    caps = CapabilityCache(issuer, clock=clock)

    async def main() -> None:
        got: list[Any] = []

        async def one() -> None:
            got.append(await caps.get(9, "r"))

        async with trio.open_nursery() as nursery:
            for _ in range(8):
                nursery.start_soon(one)
        assert issuer.asked == [(9, "r")]
        assert all(cap is got[0] for cap in got)

    run(main)


def test_a_write_with_only_read_held_asks_for_read_write() -> None:
    clock = FakeClock(1_000_000.0)
    issuer = Issuer(clock)
    caps = CapabilityCache(issuer, clock=clock)

    async def main() -> None:
        caps.put(3, issuer.cap(3, "r"))
        cap = await caps.get(3, "w")
        assert issuer.asked == [(3, "rw")] and cap is not None and cap[1] == "rw"
        assert await caps.get(3, "r") is cap  # "rw" serves reads as well

    assert access_for("r") == "r" and access_for("w") == "rw" and access_for("r", "rw") == "rw"
    run(main)


def test_the_cache_is_bounded_least_recently_used_first() -> None:
    clock = FakeClock(1_000_000.0)
    issuer = Issuer(clock)
    caps = CapabilityCache(issuer, max_entries=4, clock=clock)

    async def main() -> None:
        for ino in range(1, 6):
            caps.put(ino, issuer.cap(ino, "r"))
            if ino == 2:
                await caps.get(1, "r")  # 1 used again: 2 is older now
        assert len(caps) == 4
        assert caps.cached(1) is not None and caps.cached(2) is None and caps.cached(5) is not None
        assert issuer.asked == []

    run(main)


def test_without_authentication_nothing_is_fetched_or_kept() -> None:
    clock = FakeClock(1_000_000.0)
    issuer = Issuer(clock)
    caps = CapabilityCache(issuer, clock=clock)
    caps.enabled = False

    async def main() -> None:
        caps.put(5, None)
        caps.put(5, issuer.cap(5, "r"))
        assert await caps.get(5, "w") is None and await caps.refresh(5, "r", None) is None
        assert issuer.asked == [] and len(caps) == 0

    run(main)


class RefusingCluster:
    """A ``ClusterView`` whose node refuses the capabilities it was not handed yet."""

    def __init__(self, refuse: int, code: int = errno.EKEYEXPIRED) -> None:
        self.refuse = refuse
        self.code = code
        self.bodies: list[dict[str, Any]] = []

    async def call_node(self, node_id: int, op: int, body: Any, payload: tuple = (),
                        into: memoryview | None = None, timeout_s: float | None = None) -> tuple[Any, memoryview]:
        await trio.lowlevel.checkpoint()
        self.bodies.append(body)
        if len(self.bodies) <= self.refuse:
            raise OSError(self.code, "capability expired")
        return {"ok": True}, memoryview(b"")


def stripe_io(cluster: RefusingCluster, caps: CapabilityCache) -> StripeIO:
    return StripeIO(cluster, caps=caps)  # type: ignore[arg-type]


@pytest.mark.parametrize("code", [errno.EKEYEXPIRED, errno.EACCES])
def test_a_refused_capability_is_refreshed_and_sent_once_more(code: int) -> None:
    clock = FakeClock(1_000_000.0)
    issuer = Issuer(clock)
    caps = CapabilityCache(issuer, clock=clock)
    first = issuer.cap(4, "r")
    caps.put(4, first)

    async def main() -> None:
        cluster = RefusingCluster(refuse=1, code=code)
        io = stripe_io(cluster, caps)
        reply, _ = await io.fragment_call(1, Op.GET_FRAGMENT, 4, "r", lambda cap: {"cap": cap})
        assert reply == {"ok": True}
        assert [b["cap"] is first for b in cluster.bodies] == [True, False]
        assert issuer.asked == [(4, "r")]

        # Refused twice: the second refusal is the caller's error, after one refresh only.
        cluster = RefusingCluster(refuse=2, code=code)
        with pytest.raises(OSError) as refused:
            await stripe_io(cluster, caps).fragment_call(1, Op.PUT_FRAGMENT, 4, "w", lambda cap: {"cap": cap})
        assert refused.value.errno == code and len(cluster.bodies) == 2
        assert issuer.asked == [(4, "r"), (4, "rw"), (4, "rw")]  # w needed a fetch, then the one refresh

        # Other errors are not about the capability: no refresh.
        cluster = RefusingCluster(refuse=1, code=errno.ENOENT)
        with pytest.raises(FileNotFoundError):
            await stripe_io(cluster, caps).fragment_call(1, Op.GET_FRAGMENT, 4, "r", lambda cap: {"cap": cap})
        assert len(issuer.asked) == 3

    run(main)


def test_concurrent_refusals_of_one_capability_share_one_refresh() -> None:
    clock = FakeClock(1_000_000.0)
    issuer = Issuer(clock)
    caps = CapabilityCache(issuer, clock=clock)
    stale = issuer.cap(6, "r")
    caps.put(6, stale)

    async def main() -> None:
        fresh: list[Any] = []

        async def refused() -> None:
            fresh.append(await caps.refresh(6, "r", stale))

        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(refused)
        assert issuer.asked == [(6, "r")] and all(cap is fresh[0] for cap in fresh)
        # A refusal of the same token arriving after that refresh finished takes its result too.
        assert await caps.refresh(6, "r", stale) is fresh[0] and issuer.asked == [(6, "r")]

    run(main)


def test_without_capabilities_no_cap_goes_into_bodies() -> None:
    async def main() -> None:
        cluster = RefusingCluster(refuse=0)
        io = StripeIO(cluster)  # type: ignore[arg-type]
        await io.fragment_call(1, Op.GET_FRAGMENT, 4, "r", lambda cap: {} if cap is None else {"cap": cap})
        assert cluster.bodies == [{}]

    run(main)


# ------------------------------------------------------------- key resolution
@pytest.fixture
def keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Four key files (explicit, config, env, default) and a home without any default key yet."""
    secret = new_cluster_secret()
    paths = {}
    for name in ("explicit", "config", "env", "default"):
        paths[name] = tmp_path / f"{name}.key"
        write_key_file(paths[name], make_key(secret, Identity(name, uid=1000, gid=1000)))
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("DEEPFS_KEY", raising=False)
    return paths


def test_key_resolution_order(keys: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    config = ClientConfig(key_file=str(keys["config"]))
    plain = ClientConfig()
    default = Path(os.environ["HOME"]) / ".config/deepfs/key"
    default.parent.mkdir(parents=True)
    default.write_bytes(keys["default"].read_bytes())
    assert client_key(None, plain, required=True).identity.name == "default"  # type: ignore[union-attr]
    monkeypatch.setenv("DEEPFS_KEY", str(keys["env"]))
    assert client_key(None, plain, required=True).identity.name == "env"  # type: ignore[union-attr]
    assert client_key(None, config, required=True).identity.name == "config"  # type: ignore[union-attr]
    assert client_key(str(keys["explicit"]), config, required=True).identity.name == "explicit"  # type: ignore[union-attr]
    explicit = client_key(keys["explicit"], plain, required=True)
    assert client_key(explicit, config, required=True) is explicit


def test_no_key_is_one_clear_line(keys: dict[str, Path]) -> None:
    assert client_key(None, ClientConfig(), required=False) is None
    with pytest.raises(AuthError) as missing:
        client_key(None, ClientConfig(), required=True)
    assert str(missing.value) == NO_KEY and "\n" not in str(missing.value)
    assert missing.value.errno == errno.EACCES

    async def connect() -> None:  # over TCP: refused before any connection is tried
        async with AsyncClient.connect("127.0.0.1:1"):
            pass

    with pytest.raises(AuthError, match="no DeepFS key"):
        trio.run(connect)


# ------------------------------------------------------------ what OPEN asks
def test_open_access_from_modes_and_flags() -> None:
    assert open_access(readable=True, writable=False) == "r"
    assert open_access(readable=False, writable=True) == "w"
    assert open_access(readable=True, writable=True) == "rw"
    assert open_flags_access(os.O_RDONLY) == "r"
    assert open_flags_access(os.O_WRONLY | os.O_APPEND) == "w"
    assert open_flags_access(os.O_RDWR | os.O_CREAT) == "rw"
    assert open_flags_access(os.O_RDONLY | os.O_TRUNC) == "rw"


def test_a_subtree_root_and_the_kernel_root_trade_places() -> None:
    same = InodeNumbers(1)
    assert [same.to_server(i) for i in (1, 2, 40)] == [1, 2, 40]
    sub = InodeNumbers(40)
    assert sub.to_server(1) == 40 and sub.to_kernel(40) == 1
    assert sub.to_server(40) == 1 and sub.to_kernel(1) == 40  # never seen below the subtree, but a bijection
    assert all(sub.to_kernel(sub.to_server(i)) == i for i in range(1, 100))
