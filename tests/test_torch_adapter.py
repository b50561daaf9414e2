"""deepfs.torch.save/load against real clusters: round trips of everything people
save, interoperability with plain torch, safety, errors, crashes and failures."""

from __future__ import annotations

import errno
import io
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch  # a test dependency: missing torch must fail, not skip

import deepfs
import deepfs.torch as dtorch
from deepfs import Layout
from deepfs.config import ClientConfig
from deepfs.local_cluster import LocalCluster
from deepfs.testing import flip_bytes, fragment_files, wait_for
from deepfs.torch._load import _cuda_destination
from deepfs.torch._read import ReadOptions, read_checkpoint
from deepfs.url import close_shared_clients
from tests.conftest import FAST_META_ARGS, SESSION_SECRET, unique_dir
from tests.torch_samples import all_dtypes, assert_same, shared_views, trained

pytestmark = [pytest.mark.process, pytest.mark.timeout(120)]


@pytest.fixture(autouse=True, scope="module")
def _close_shared_clients() -> Iterator[None]:
    """URLs open shared clients; close them with this module's cluster."""
    yield
    close_shared_clients()

REPO = Path(__file__).resolve().parent.parent
WIDENED_STRIPE = 1 << 20


@pytest.fixture
def client(cluster: LocalCluster) -> Iterator[deepfs.Client]:
    """Checkpoints widen the cluster's 256 KiB stripes to 1 MiB (not the default 16 MiB),
    so the test objects still cross many stripes."""
    config = ClientConfig(meta_address=cluster.meta_address, checkpoint_stripe_bytes=WIDENED_STRIPE)
    with deepfs.Client(cluster.meta_address, config) as c:
        yield c


def file_layout(client: deepfs.Client, path: str) -> Layout:
    async def layout() -> Layout:
        handle = await client.aio.open(path, "rb")
        await handle.close()
        return handle.layout

    return client.run_async(layout)


OBJECTS: dict[str, object] = {
    "dtypes": all_dtypes(),
    "views": shared_views(),
    "empty_and_0d": {"empty": torch.empty(0), "empty2d": torch.zeros(0, 7, dtype=torch.int64),
                     "scalar": torch.tensor(2.5), "int_scalar": torch.tensor(7, dtype=torch.int32)},
    "python": {"int": 3, "float": 0.25, "str": "hello", "none": None, "bool": True, "bytes": b"\x00\x01",
               "tuple": (1, "a"), "list": [1, 2.0, "x"], "nested": {"a": [{"b": (1, 2)}]}},
    "bare_tensor": torch.linspace(0, 1, 1000),
    "list_of_tensors": [torch.ones(3), torch.zeros(2, 2), torch.full((5,), 7, dtype=torch.int16)],
    "big_and_small": {"big": torch.randn(700_000), "small": torch.randn(10), "mid": torch.randn(50_000)},
}


def load_both_ways(client: deepfs.Client, path: str, **kwargs: object) -> object:
    """Load through a path on the client and through the deepfs:// URL; both must agree."""
    by_path = dtorch.load(path, client=client, **kwargs)
    by_url = dtorch.load(f"deepfs://{client.meta_address}{path}", **kwargs)
    assert_same(by_path, by_url)
    return by_path


# ------------------------------------------------------------ round trips
@pytest.mark.parametrize("kind", sorted(OBJECTS))
def test_round_trip(client: deepfs.Client, kind: str) -> None:
    base = unique_dir(client, f"rt-{kind}")
    obj = OBJECTS[kind]
    dtorch.save(obj, f"{base}/ck.pt", client=client)
    got = load_both_ways(client, f"{base}/ck.pt")
    assert_same(obj, got)
    assert client.listdir(base) == ["ck.pt"]  # no temporary left behind


def test_checkpoints_get_wide_stripes_unless_a_layout_is_given(cluster: LocalCluster) -> None:
    with deepfs.Client(cluster.meta_address) as default_client:
        base = unique_dir(default_client, "stripes")
        tensors = {"w": torch.randn(1000)}
        dtorch.save(tensors, f"{base}/default.pt", client=default_client)
        assert file_layout(default_client, f"{base}/default.pt") == Layout(4, 2, 32 << 20)
        dtorch.save(tensors, f"{base}/explicit.pt", client=default_client, layout=Layout(2, 1, 128 << 10))
        assert file_layout(default_client, f"{base}/explicit.pt") == Layout(2, 1, 128 << 10)
        default_client.set_layout(base, Layout(4, 2, 64 << 20))  # already wider: kept
        dtorch.save(tensors, f"{base}/wide.pt", client=default_client)
        assert file_layout(default_client, f"{base}/wide.pt") == Layout(4, 2, 64 << 20)
        assert sorted(default_client.listdir(base)) == ["default.pt", "explicit.pt", "wide.pt"]
        assert_same(tensors, dtorch.load(f"{base}/default.pt", client=default_client))


def test_whole_stripes_of_a_tensor_are_sent_from_its_memory(client: deepfs.Client) -> None:
    base = unique_dir(client, "lent")
    tensor = torch.randn(5 * WIDENED_STRIPE // 4)  # 5 stripes' worth of float32, 4 of them whole at least
    before = client.stats.lent_stripes
    dtorch.save({"t": tensor}, f"{base}/ck.pt", client=client)
    assert client.stats.lent_stripes - before >= 4
    assert torch.equal(dtorch.load(f"{base}/ck.pt", client=client)["t"], tensor)


def test_storage_sharing_survives(client: deepfs.Client) -> None:
    base = unique_dir(client, "sharing")
    obj = shared_views()
    dtorch.save(obj, f"{base}/ck.pt", client=client)
    got = dtorch.load(f"{base}/ck.pt", client=client)
    ptr = got["base"].untyped_storage().data_ptr()
    assert all(got[k].untyped_storage().data_ptr() == ptr for k in obj)
    got["base"][0, 0] = -1.0
    assert got["transposed"][0, 0] == -1.0 and got["same_again"] is got["base"]


def test_model_and_adam_state(client: deepfs.Client) -> None:
    base = unique_dir(client, "model")
    model, optimizer = trained(0)
    checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3, "note": "adam"}
    dtorch.save(checkpoint, f"{base}/model.pt", client=client)
    got = dtorch.load(f"{base}/model.pt", client=client)
    assert_same(checkpoint, got)
    fresh, fresh_opt = trained(1)
    fresh.load_state_dict(got["model"])
    fresh_opt.load_state_dict(got["optimizer"])
    x = torch.randn(4, 64)
    assert torch.equal(fresh(x), model(x))
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_legacy_format_round_trip(client: deepfs.Client) -> None:
    base = unique_dir(client, "legacy")
    obj = all_dtypes()
    dtorch.save(obj, f"{base}/old.pt", client=client, _use_new_zipfile_serialization=False)
    assert_same(obj, dtorch.load(f"{base}/old.pt", client=client))


def test_map_location_like_torch_load(client: deepfs.Client) -> None:
    base = unique_dir(client, "maploc")
    obj = {**all_dtypes(), "big": torch.randn(600_000)}
    dtorch.save(obj, f"{base}/ck.pt", client=client)
    for where in ("cpu", torch.device("cpu"), {"cpu": "cpu"}, lambda storage, location: storage):
        assert_same(obj, dtorch.load(f"{base}/ck.pt", client=client, map_location=where))
    on_meta = dtorch.load(f"{base}/ck.pt", client=client, map_location="meta")
    assert on_meta["big"].device.type == "meta" and on_meta["big"].shape == obj["big"].shape
    assert_same(obj, dtorch.load(f"{base}/ck.pt", client=client, pin_memory=True))  # page-locked only with CUDA


def test_staged_reads_keep_every_byte(client: deepfs.Client) -> None:
    """The GPU path's staging (slots, piece order, copies into device tensors) with plain CPU copies."""
    base = unique_dir(client, "staged")
    obj = {"big": torch.randn(3 << 20), "odd": torch.randn(1_234_567).to(torch.float64), "small": torch.ones(5)}
    dtorch.save(obj, f"{base}/ck.pt", client=client)
    options = ReadOptions(stage_to=torch.device("cpu"))
    archive = client.run_async(read_checkpoint, client.aio, f"{base}/ck.pt", "test", options,
                               lambda n: None, lambda n: None)
    assert_same(obj, torch.serialization._load(archive, None, torch._weights_only_unpickler))  # noqa: SLF001


def test_staging_goes_to_the_one_cuda_device_named_and_only_where_cuda_is(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both answers of ``_cuda_destination`` on every machine: CUDA's presence is faked
    either way (an explicit device index needs no real device)."""
    has_cuda = torch.cuda.is_available()
    for where in ("cpu", torch.device("cpu"), {"cuda:0": "cpu"}, lambda storage, location: storage, "not a device"):
        assert _cuda_destination(where) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _cuda_destination("cuda:0") is None  # no device: the plain path, even when asked for CUDA
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _cuda_destination("cuda:1") == torch.device("cuda", 1)
    assert _cuda_destination(b"cuda:0") == torch.device("cuda", 0)
    assert _cuda_destination(torch.device("cuda", 2)) == torch.device("cuda", 2)
    if has_cuda:  # a bare "cuda" means the current device, which only a real one has
        assert _cuda_destination("cuda") == torch.device("cuda", torch.cuda.current_device())


# ------------------------------------------------------ plain torch interop
def test_plain_torch_reads_adapter_bytes(client: deepfs.Client) -> None:
    base = unique_dir(client, "interop")
    obj = {**all_dtypes(), **shared_views()}
    dtorch.save(obj, f"{base}/ck.pt", client=client)
    raw = client.read_file(f"{base}/ck.pt")
    assert_same(obj, torch.load(io.BytesIO(raw)))


def test_adapter_reads_plain_torch_save(client: deepfs.Client) -> None:
    base = unique_dir(client, "interop2")
    obj = {**all_dtypes(), **shared_views(), "big": torch.randn(600_000)}
    buf = io.BytesIO()
    torch.save(obj, buf)  # 64-byte alignment, PyTorch's own writer
    client.write_file(f"{base}/plain.pt", buf.getvalue())
    assert_same(obj, dtorch.load(f"{base}/plain.pt", client=client, verify_crc=True))


def test_file_objects_go_to_plain_torch(tmp_path: Path) -> None:
    obj = all_dtypes()
    buf = io.BytesIO()
    dtorch.save(obj, buf)
    buf.seek(0)
    assert_same(obj, dtorch.load(buf))


# ------------------------------------------------------------------- safety
MARKS: list[str] = []


def _mark(text: str) -> str:
    MARKS.append(text)
    return text


class Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (_mark, ("code ran",))


def test_weights_only_refuses_code(client: deepfs.Client) -> None:
    base = unique_dir(client, "evil")
    dtorch.save({"weights": torch.ones(3), "payload": Evil()}, f"{base}/evil.pt", client=client)
    MARKS.clear()
    with pytest.raises(pickle.UnpicklingError, match="Weights only load"):
        dtorch.load(f"{base}/evil.pt", client=client)
    assert MARKS == []
    got = dtorch.load(f"{base}/evil.pt", client=client, weights_only=False)  # the caller asked for it
    assert MARKS == ["code ran"] and got["payload"] == "code ran"
    with pytest.raises(RuntimeError, match="pickle_module"):
        dtorch.load(f"{base}/evil.pt", client=client, pickle_module=pickle)


# ------------------------------------------------------------------- errors
def test_errors_are_clear(client: deepfs.Client) -> None:
    base = unique_dir(client, "errors")
    with pytest.raises(FileNotFoundError, match="no such file"):
        dtorch.load(f"{base}/missing.pt", client=client)
    good = io.BytesIO()
    dtorch.save(all_dtypes(), good)
    client.write_file(f"{base}/truncated.pt", good.getvalue()[: len(good.getvalue()) // 2])
    with pytest.raises(dtorch.CheckpointError, match="truncated.pt") as info:
        dtorch.load(f"{base}/truncated.pt", client=client)
    assert isinstance(info.value, RuntimeError)
    client.write_file(f"{base}/garbage.pt", os.urandom(100_000))
    with pytest.raises(dtorch.CheckpointError, match="garbage.pt"):
        dtorch.load(f"{base}/garbage.pt", client=client)
    client.write_file(f"{base}/empty.pt", b"")
    with pytest.raises(dtorch.CheckpointError, match="empty"):
        dtorch.load(f"{base}/empty.pt", client=client)
    with pytest.raises(IsADirectoryError):
        dtorch.load(base, client=client)
    with pytest.raises(ValueError, match="mmap"):
        dtorch.load(f"{base}/truncated.pt", client=client, mmap=True)
    with pytest.raises(ValueError, match="deepfs://"):
        dtorch.save({}, "/local/path.pt")
    with pytest.raises(ValueError, match="root"):
        dtorch.save({}, f"deepfs://{client.meta_address}/")
    with pytest.raises(ValueError, match="HOST:PORT"):
        dtorch.load("deepfs://no-port/x.pt")
    with pytest.raises(FileNotFoundError):
        dtorch.save({}, f"{base}/no/such/dir/ck.pt", client=client)


def test_a_flipped_storage_byte_fails_the_crc_check(client: deepfs.Client) -> None:
    base = unique_dir(client, "crc")
    good = io.BytesIO()
    dtorch.save({"x": torch.arange(1 << 18, dtype=torch.int32)}, good)
    raw = bytearray(good.getvalue())
    raw[raw.index(b"data/0") + 4096 + 100] ^= 0x01  # inside the storage's bytes
    client.write_file(f"{base}/flipped.pt", bytes(raw))
    with pytest.raises(dtorch.CheckpointError, match="CRC"):
        dtorch.load(f"{base}/flipped.pt", client=client, verify_crc=True)


def test_progress_bar(client: deepfs.Client, capsys: pytest.CaptureFixture[str]) -> None:
    base = unique_dir(client, "progress")
    dtorch.save(all_dtypes(), f"{base}/ck.pt", client=client, progress=True)
    dtorch.load(f"{base}/ck.pt", client=client, progress=True)
    err = capsys.readouterr().err
    assert "saving" in err and "loading" in err


# ----------------------------------------------------------- crash safety
SAVER = textwrap.dedent("""
    import sys, torch, deepfs, deepfs.torch
    address, path = sys.argv[1], sys.argv[2]
    state = {f"layer{i}": torch.full((1 << 20,), float(i)) for i in range(48)}  # 192 MiB
    with deepfs.Client(address) as client:
        print("saving", flush=True)
        deepfs.torch.save(state, path, client=client)
        print("saved", flush=True)
""")


def test_kill_9_mid_save_keeps_the_previous_checkpoint_and_a_later_save_tidies_up(
        fresh_cluster: LocalCluster, tmp_path: Path) -> None:
    with deepfs.Client(fresh_cluster.meta_address) as client:
        client.mkdir("/ckpt")
        previous = {"step": 100, "w": torch.randn(300_000)}
        dtorch.save(previous, "/ckpt/latest.pt", client=client)
        script = tmp_path / "saver.py"
        script.write_text(SAVER)
        saver = subprocess.Popen([sys.executable, str(script), fresh_cluster.meta_address, "/ckpt/latest.pt"],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=str(REPO), text=True)
        try:
            def temporary_past_8_mib() -> str | None:
                assert saver.poll() is None, f"the save ended before it got going: {saver.stdout.read()}"
                temps = [n for n in client.listdir("/ckpt") if n.startswith(".latest.pt.tmp-")]
                return temps[0] if temps and client.stat(f"/ckpt/{temps[0]}").st_size > (8 << 20) else None

            temporary = wait_for(temporary_past_8_mib, 60, interval_s=0.02, what="a temporary file past 8 MiB")
            saver.send_signal(signal.SIGKILL)
            saver.wait(10)
        finally:
            if saver.poll() is None:
                saver.kill()
                saver.wait(10)
            assert saver.stdout is not None
            saver.stdout.close()
        assert_same(previous, dtorch.load("/ckpt/latest.pt", client=client))
        names = client.listdir("/ckpt")
        assert "latest.pt" in names and all(n == "latest.pt" or n.startswith(".latest.pt.tmp-") for n in names)
        assert temporary in names
        client.write_file("/ckpt/.latest.pt.tmp-notours", b"x")  # not a name a save makes: never swept

        # The next save keeps a leftover written to recently: it may be another job's live save.
        dtorch.save(previous, "/ckpt/latest.pt", client=client)
        assert temporary in client.listdir("/ckpt")
    # Once nothing has been written to it for stale_save_s, the next save removes it.
    time.sleep(0.2)
    config = ClientConfig(meta_address=fresh_cluster.meta_address, stale_save_s=0.1)
    with deepfs.Client(fresh_cluster.meta_address, config=config) as tidy:
        dtorch.save(previous, "/ckpt/latest.pt", client=tidy)
        assert sorted(tidy.listdir("/ckpt")) == [".latest.pt.tmp-notours", "latest.pt"]
        assert_same(previous, dtorch.load("/ckpt/latest.pt", client=tidy))


# ------------------------------------------------------- node failures
LAYOUT = Layout(4, 2, 256 << 10)


def checkpoint_of_a_few_mib() -> dict[str, object]:
    model, optimizer = trained(2)
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "extra": torch.randn(1 << 20), "views": shared_views()}


def test_save_with_m_nodes_down(fresh_cluster: LocalCluster) -> None:
    fresh_cluster.kill_node(1)
    fresh_cluster.kill_node(4)
    with deepfs.Client(fresh_cluster.meta_address) as client:
        obj = checkpoint_of_a_few_mib()
        dtorch.save(obj, "/ck.pt", client=client, layout=LAYOUT)
        assert_same(obj, dtorch.load("/ck.pt", client=client))
        for i in (1, 4):
            fresh_cluster.start_node(i)
        assert_same(obj, dtorch.load("/ck.pt", client=client))


def test_load_with_m_nodes_down(fresh_cluster: LocalCluster) -> None:
    with deepfs.Client(fresh_cluster.meta_address) as client:
        obj = checkpoint_of_a_few_mib()
        dtorch.save(obj, "/ck.pt", client=client, layout=LAYOUT)
        fresh_cluster.kill_node(0)
        fresh_cluster.kill_node(3)
        assert_same(obj, dtorch.load("/ck.pt", client=client))
        assert client.stats.degraded_reads > 0


def test_full_cluster_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path / "cluster", nodes=6, k=4, m=2, stripe_size=256 << 10, fsync=False,
                           extra_meta_args=FAST_META_ARGS, extra_node_args=["--capacity-bytes", "2M"],
                           secret_file=SESSION_SECRET).start()
    try:
        with deepfs.Client(cluster.meta_address) as client:
            previous = {"w": torch.randn(1000)}
            dtorch.save(previous, "/ck.pt", client=client)
            with pytest.raises(OSError) as info:
                dtorch.save({"w": torch.randn(8 << 20)}, "/ck.pt", client=client)
            assert info.value.errno == errno.ENOSPC
            assert "cluster is full" in str(info.value) and "ck.pt" in str(info.value)
            assert_same(previous, dtorch.load("/ck.pt", client=client))
            assert client.listdir("/") == ["ck.pt"]  # the temporary file is gone
    finally:
        cluster.stop()


def test_corruption_beyond_repair_is_an_error(fresh_cluster: LocalCluster) -> None:
    with deepfs.Client(fresh_cluster.meta_address) as client:
        obj = {"w": torch.randn(1 << 20), "b": torch.randn(1000)}
        dtorch.save(obj, "/ck.pt", client=client, layout=LAYOUT)
        ino = client.stat("/ck.pt").st_ino
        stripe = 2  # inside the big storage
        victims = fragment_files(fresh_cluster, ino, stripe=stripe)
        assert len(victims) == LAYOUT.width
        for path in victims[: LAYOUT.m + 1]:  # more than m fragments of one stripe
            for pos in range(200, path.stat().st_size, 4096):  # a byte of every block
                flip_bytes(path, pos)
    with deepfs.Client(fresh_cluster.meta_address) as client:  # nothing cached
        with pytest.raises(OSError) as info:
            dtorch.load("/ck.pt", client=client)
        assert info.value.errno == errno.EIO
        assert "ck.pt" in str(info.value) and "unavailable" in str(info.value)
