"""The deepfs:// fsspec file system against a real cluster."""

from __future__ import annotations

import io
import os
import tomllib
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest

import deepfs
from deepfs.auth import Identity, make_key, new_cluster_secret, write_key_file
from deepfs.fsspec_fs import DeepFSFileSystem
from deepfs.url import close_shared_clients
from tests.conftest import unique_dir

pytestmark = [pytest.mark.process, pytest.mark.timeout(60)]


@pytest.fixture(autouse=True, scope="module")
def _close_shared_clients() -> Iterator[None]:
    """URLs open shared clients; close them with this module's cluster."""
    yield
    close_shared_clients()


@pytest.fixture
def base_url(client: deepfs.Client) -> str:
    return f"deepfs://{client.meta_address}{unique_dir(client, 'fsspec')}"


def test_registered_for_the_protocol() -> None:
    assert fsspec.get_filesystem_class("deepfs") is DeepFSFileSystem
    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    assert pyproject["project"]["entry-points"]["fsspec.specs"]["deepfs"] == "deepfs.fsspec_fs:DeepFSFileSystem"


def test_url_to_fs_and_paths(client: deepfs.Client, base_url: str) -> None:
    fs, path = fsspec.core.url_to_fs(f"{base_url}/a.bin")
    assert isinstance(fs, DeepFSFileSystem) and fs.address == client.meta_address
    assert path.startswith("/fsspec-") and path.endswith("/a.bin")
    assert fs.unstrip_protocol(path) == f"{base_url}/a.bin"
    assert fsspec.core.url_to_fs(f"{base_url}/b.bin")[0] is fs  # one instance per cluster


def test_open_write_read_seek(base_url: str) -> None:
    data = bytes(range(256)) * 40_000  # ~10 MiB: several write blocks and stripes
    with fsspec.open(f"{base_url}/big.bin", "wb") as f:
        for i in range(0, len(data), 1_000_003):
            f.write(data[i : i + 1_000_003])
    with fsspec.open(f"{base_url}/big.bin", "rb") as f:
        assert f.size == len(data)
        assert f.read(10) == data[:10]
        f.seek(5_000_000)
        assert f.read(1000) == data[5_000_000:5_001_000]
        f.seek(-7, 2)
        assert f.read() == data[-7:]
    with fsspec.open(f"{base_url}/big.bin", "ab") as f:
        f.write(b"tail")
    with fsspec.open(f"{base_url}/big.bin", "rb") as f:
        assert f.read() == data + b"tail"
    with pytest.raises(FileExistsError):
        fsspec.open(f"{base_url}/big.bin", "xb").open()


def test_namespace_operations(base_url: str) -> None:
    fs, base = fsspec.core.url_to_fs(base_url)
    fs.mkdir(f"{base}/d1/d2")
    fs.makedirs(f"{base}/d3", exist_ok=True)
    fs.pipe_file(f"{base}/d1/d2/x.txt", b"hello world")
    fs.touch(f"{base}/d3/empty")
    assert sorted(fs.ls(base, detail=False)) == [f"{base}/d1", f"{base}/d3"]
    info = fs.info(f"{base}/d1/d2/x.txt")
    assert info["type"] == "file" and info["size"] == 11 and info["name"] == f"{base}/d1/d2/x.txt"
    assert fs.info(f"{base}/d1")["type"] == "directory"
    assert fs.isdir(f"{base}/d1") and fs.isfile(f"{base}/d3/empty") and not fs.exists(f"{base}/nope")
    assert fs.find(base) == [f"{base}/d1/d2/x.txt", f"{base}/d3/empty"]
    assert fs.cat_file(f"{base}/d1/d2/x.txt") == b"hello world"
    assert fs.cat_file(f"{base}/d1/d2/x.txt", start=6) == b"world"
    assert fs.cat_file(f"{base}/d1/d2/x.txt", start=2, end=5) == b"llo"
    assert fs.cat_file(f"{base}/d1/d2/x.txt", start=-5, end=-1) == b"worl"
    assert fs.cat(f"{base_url}/d1/d2/x.txt") == b"hello world"
    fs.mv(f"{base}/d1/d2/x.txt", f"{base}/d3/y.txt")
    assert not fs.exists(f"{base}/d1/d2/x.txt") and fs.cat_file(f"{base}/d3/y.txt") == b"hello world"
    fs.cp_file(f"{base}/d3/y.txt", f"{base}/d3/z.txt")
    assert fs.cat_file(f"{base}/d3/z.txt") == b"hello world"
    assert fs.modified(f"{base}/d3/z.txt").year >= 2024
    fs.rm(f"{base}/d3/z.txt")
    assert not fs.exists(f"{base}/d3/z.txt")
    fs.rm(f"{base}/d1", recursive=True)
    assert not fs.exists(f"{base}/d1")
    with pytest.raises(FileNotFoundError):
        fs.info(f"{base}/d1")
    with pytest.raises(FileNotFoundError):
        fs.open(f"{base}/missing", "rb")


def test_torch_save_and_load_through_fsspec(base_url: str) -> None:
    import torch

    state = {"w": torch.randn(300, 300), "step": 7}
    with fsspec.open(f"{base_url}/ck.pt", "wb") as f:
        torch.save(state, f)
    with fsspec.open(f"{base_url}/ck.pt", "rb") as f:
        got = torch.load(f)
    assert torch.equal(got["w"], state["w"]) and got["step"] == 7


def test_pandas_round_trip(base_url: str) -> None:
    import pandas as pd
    frame = pd.DataFrame({"a": range(1000), "b": [f"row-{i}" for i in range(1000)]})
    frame.to_csv(f"{base_url}/frame.csv", index=False)
    assert pd.read_csv(f"{base_url}/frame.csv").equals(frame)


def test_instance_with_a_client(client: deepfs.Client) -> None:
    fs = DeepFSFileSystem(client=client)
    base = unique_dir(client, "fsclient")
    fs.pipe_file(f"{base}/x", b"abc")
    assert client.read_file(f"{base}/x") == b"abc"
    buf = io.BytesIO(fs.cat_file(f"{base}/x"))
    assert buf.read() == b"abc"


def test_the_key_storage_option(client: deepfs.Client, base_url: str, tmp_path: Path) -> None:
    key = os.environ["DEEPFS_KEY"]  # the session cluster's admin key (conftest)
    with fsspec.open(f"{base_url}/keyed.bin", "wb", key=key) as f:
        f.write(b"keyed")
    with fsspec.open(f"{base_url}/keyed.bin", "rb", key=key) as f:
        assert f.read() == b"keyed"
    # A key of another cluster: the metadata server's handshake refuses it, in one line.
    intruder = tmp_path / "intruder.key"
    write_key_file(intruder, make_key(new_cluster_secret(), Identity("intruder", uid=1000, gid=1000)))
    host, _, port = client.meta_address.rpartition(":")
    fs = DeepFSFileSystem(host=host, port=int(port), key=str(intruder), skip_instance_cache=True)
    with pytest.raises(deepfs.AuthError) as refused:
        fs.ls("/")
    assert "\n" not in str(refused.value)
