"""Format 2's row map: frequent commits write each shard once, and every path reads the right rows."""

import os
import time
from collections import Counter

import numpy as np
import pytest
import torch
import zarr
from zarr.storage import LocalStore

import unlearn
from conftest import make_tiny, oracle_after
from test_lifecycle import run_steps
from updatestore import CorruptStoreError, UpdateStore


def _rows(store):
    """Each committed step's layer row (the step table, loaded by any query)."""
    store.step_status()
    return store._table.rows


class CountingSets(LocalStore):
    """A local store that counts how often each key is written."""

    def __init__(self, root):
        super().__init__(root)
        self.sets = Counter()

    async def set(self, key, value):
        self.sets[key] += 1
        await super().set(key, value)


def record(path, window, steps=12, keep=0.5, seed=0):
    model = make_tiny()
    store = UpdateStore.create(path, model, keep=keep)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    oracle = []
    with store.recorder(model, opt, commit_seconds=window) as rec:
        for s in range(steps):
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            with rec.batch(np.arange(4) + 4 * s):
                opt.zero_grad()
                model(torch.randn(4, 12, generator=g)).pow(2).mean().backward()
                opt.step()
            oracle.append({n: p.detach() - before[n] for n, p in model.named_parameters()})
    return model, store, oracle


def test_a_commit_per_step_writes_every_shard_once_and_reads_back_identically(tmp_path):
    """commit_seconds tiny: every step is its own commit. Each layer chunk key is written exactly once
    (format 1 rewrote the growing shard at each commit), and every row reads back bit-identical to a
    run that committed only at the end."""
    base = CountingSets(str(tmp_path / "often"))
    _, often, _ = record(base, 1e-9)
    _, once, _ = record(tmp_path / "once", None)
    layer_writes = {k: n for k, n in base.sets.items() if k.startswith("layers/") and "/c/" in k}
    assert layer_writes and max(layer_writes.values()) == 1, layer_writes
    rows = _rows(often)
    assert len(rows) == 12 and (np.diff(rows) > 0).all()
    assert rows[1] >= often.meta["block_steps"]  # each commit closed its shard
    steps = np.arange(12)
    a, b = often.read(steps), once.read(steps)
    for name in a:
        assert torch.equal(a[name].values, b[name].values) and torch.equal(a[name].positions, b[name].positions)
    assert often.batches_containing([5, 44]).tolist() == once.batches_containing([5, 44]).tolist() == [1, 11]


def test_arrays_grow_ahead_of_the_commits_and_close_exact(tmp_path):
    """A commit per step does not resize every array at every commit (each resize rewrites its
    zarr.json): arrays grow many shards ahead, and a closed store's arrays hold exactly its rows."""
    base = CountingSets(str(tmp_path / "often"))
    _, often, _ = record(base, 1e-9)  # 12 commits, each closing a shard
    meta = {k: n for k, n in base.sets.items() if k.startswith("layers/") and k.endswith("/zarr.json")
            and k.count("/") == 3}
    assert meta and max(meta.values()) <= 3, meta  # created, grown once, trimmed at close (was 13)
    root = zarr.open_group(str(tmp_path / "often"), mode="r")
    end = int(_rows(often)[-1]) + 1
    for spec in often.layers:
        assert root[f"layers/{spec.name}/values"].shape[0] == end
    assert root["steps/status"].shape[0] == root["steps/row"].shape[0] == 12
    assert root["samples/ids"].shape[0] == 48


def test_a_run_written_only_at_close_grows_each_array_once_to_its_exact_size(tmp_path):
    """The one write of a short run happens at close: arrays grow straight to what it needs (growing
    ahead and trimming back rewrote every zarr.json twice, a fifth of the digits CNN's close)."""
    base = CountingSets(str(tmp_path / "once"))
    _, once, _ = record(base, None)
    meta = {k: n for k, n in base.sets.items() if k.endswith("/zarr.json")
            and k.startswith(("layers/", "steps/", "samples/")) and k.count("/") >= 2}  # arrays, not groups
    assert meta and max(meta.values()) <= 2, meta  # created, grown once (was: and trimmed at close)
    root = zarr.open_group(str(tmp_path / "once"), mode="r")
    for spec in once.layers:
        assert root[f"layers/{spec.name}/values"].shape[0] == int(_rows(once)[-1]) + 1
    assert root["steps/status"].shape[0] == 12 and root["samples/ids"].shape[0] == 48


def test_a_store_left_mid_run_with_grown_arrays_reopens_reads_and_appends(tmp_path):
    """What a SIGKILL mid-run leaves: arrays longer than their committed rows (FORMAT.md allows it).
    The copy reads the committed steps like the finished run, appends after them, and closes exact."""
    import shutil

    model = make_tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    store = UpdateStore.create(tmp_path / "a", model, keep=0.5)
    with store.recorder(model, opt, commit_seconds=None) as rec:
        run_steps(rec, model, opt, range(4))
        saved = rec.state_dict()  # committed: 4 steps
        shutil.copytree(tmp_path / "a", tmp_path / "b")  # the store as a kill now would leave it
        state = {k: v.clone() for k, v in model.state_dict().items()}
        run_steps(rec, model, opt, range(4, 6))
    root = zarr.open_group(str(tmp_path / "b"), mode="r")
    name = store.layers[0].name
    assert root[f"layers/{name}/values"].shape[0] > 4 and root["steps/status"].shape[0] > 4
    ref = store.read(np.arange(6))
    model.load_state_dict(state)
    with UpdateStore.open(tmp_path / "b", "r+") as b:
        assert b.num_batches == 4
        with b.recorder(model, opt, resume=saved) as rec:
            run_steps(rec, model, opt, range(4, 6))
        got = b.read(np.arange(6))
        for n in got:
            assert torch.equal(got[n].values, ref[n].values) and torch.equal(got[n].positions, ref[n].positions)
        end = int(_rows(b)[-1]) + 1
    root = zarr.open_group(str(tmp_path / "b"), mode="r")
    assert root[f"layers/{name}/values"].shape[0] == end and root["steps/status"].shape[0] == 6


def test_unlearning_purge_and_resume_follow_the_row_map(tmp_path):
    model, store, oracle = record(tmp_path / "s", 1e-9, keep=1.0)
    store.close()
    forget = [9, 30]  # steps 2 and 7
    want = oracle_after(model, oracle, [2, 7], 1.0)
    with UpdateStore.open(tmp_path / "s", "r+") as store:
        report = unlearn.amnesiac(model, store, forget, device="cpu")
        assert report.steps_hit.tolist() == [2, 7]
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), want[name], rtol=0, atol=2e-2)
        status = store.step_status()
        assert status[[2, 7]].tolist() == [3, 3] and (np.delete(status, [2, 7]) == 1).all()
        other = store.read([1, 3])
        assert all(r.values.abs().sum() > 0 for r in other.values())
        purged = store.read([2])
        assert all(r.values.abs().sum() == 0 for r in purged.values())


def test_resume_into_a_closed_shard_starts_the_next_one(tmp_path):
    model = make_tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    store = UpdateStore.create(tmp_path / "s", model, keep=0.5)
    block = store.meta["block_steps"]
    with store.recorder(model, opt) as rec:
        run_steps(rec, model, opt, range(3))
        state = rec.state_dict()  # commits: the shard of rows 0..2 is closed
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        run_steps(rec, model, opt, range(3, 6))
    store._index()
    assert _rows(store).tolist() == [0, 1, 2, block, block + 1, block + 2]
    ref = store.read([0, 1, 2])
    # Resume from the checkpoint: steps 3..5 are rolled back and their rows erased.
    model.load_state_dict(saved)
    with store.recorder(model, opt, resume=state):
        pass
    store.close()
    with UpdateStore.open(tmp_path / "s") as again:
        assert again.num_batches == 3
        for name, rows in again.read([0, 1, 2]).items():
            assert torch.equal(rows.values, ref[name].values)
        arr = zarr.open_group(str(tmp_path / "s"), mode="r")[f"layers/{again.layers[0].name}/values"]
        assert arr.shape[0] == 3  # the rolled-back rows are gone


def test_forged_row_map_is_corruption(tmp_path):
    _, store, _ = record(tmp_path / "s", 1e-9)
    store.close()
    root = zarr.open_group(str(tmp_path / "s"), mode="r+")
    rows = root["steps/row"]
    good = rows[:]
    rows[:] = np.concatenate([[0], good[:1], good[2:]])  # step 1 would read step 0's row
    with UpdateStore.open(tmp_path / "s") as s, pytest.raises(CorruptStoreError, match="steps/row"):
        s.read([0, 1])
    bad = good.copy()
    bad[-1] = 10**9  # beyond every layer array
    rows[:] = bad
    with UpdateStore.open(tmp_path / "s") as s, pytest.raises(CorruptStoreError, match="rows"):
        s.read(np.arange(12))


def test_format1_store_appends_as_format1(tmp_path):
    """A 0.1.0 store opened r+ by this release keeps format 1 (rows = steps, no steps/row)."""
    import shutil
    from pathlib import Path

    fixture = Path(__file__).parent / "fixtures" / "format1"
    shutil.copytree(fixture / "store", tmp_path / "store")
    from safetensors.torch import load_file

    model = make_tiny(0)
    model.load_state_dict(load_file(str(fixture / "trained.safetensors")))
    with UpdateStore.open(tmp_path / "store", "r+") as store:
        n = store.num_batches
        before = store.read(np.arange(n))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        with store.recorder(model, opt, commit_seconds=1e-9) as rec:
            run_steps(rec, model, opt, range(100, 104))
        assert store.num_batches == n + 4 and store.meta["format_version"] == 1
        after = store.read(np.arange(n))
        for name in before:
            assert torch.equal(before[name].values, after[name].values)
        assert store.read([n + 3])[store.layers[0].name].values.abs().sum() > 0
    assert "row" not in zarr.open_group(str(tmp_path / "store"), mode="r")["steps"]


def test_reopening_after_an_interrupted_commit_records_consistently(tmp_path):
    """An interrupted writer leaves arrays longer than the commit record says. The next writer erases
    that tail before it caches array shapes: it once kept the stale, longer shapes, skipped the resize,
    and committed steps beyond the arrays' recorded shape (the store then refused to open)."""
    model = make_tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with UpdateStore.create(tmp_path / "s", model, keep=0.5) as store, store.recorder(model, opt) as rec:
        run_steps(rec, model, opt, range(3))
    root = zarr.open_group(str(tmp_path / "s"), mode="r+")
    block = root.attrs["updatestore"]["block_steps"]
    for path in ("steps/status", "steps/sample_end", "steps/row"):  # what a killed commit leaves behind
        arr = root[path]
        arr.resize((10,))
        arr[3:10] = 7
    ids = root["samples/ids"]
    ids.resize((60,))
    ids[12:60] = 99
    for layer in root.attrs["updatestore"]["layers"]:
        arr = root[f"layers/{layer['name']}/values"]
        arr.resize((block + 5,) + arr.shape[1:])
        arr[block:block + 5] = 1
    with UpdateStore.open(tmp_path / "s", "r+") as store, store.recorder(model, opt) as rec:
        run_steps(rec, model, opt, range(3, 5))
    clean_model = make_tiny()  # the same run without the interruption's leftovers
    clean_opt = torch.optim.SGD(clean_model.parameters(), lr=0.1)
    with UpdateStore.create(tmp_path / "c", clean_model, keep=0.5) as clean:
        for steps in (range(3), range(3, 5)):
            with clean.recorder(clean_model, clean_opt) as rec:
                run_steps(rec, clean_model, clean_opt, steps)
        want = clean.read([3, 4])
    with UpdateStore.open(tmp_path / "s") as store:  # opens: shapes and commit record agree
        assert store.num_batches == 5
        assert [store.samples_in(s).tolist() for s in range(5)] == [list(range(4 * s, 4 * s + 4)) for s in range(5)]
        got = store.read([3, 4])  # the leftover rows were erased, not mixed into the new shard
        assert all(torch.equal(got[n].values, want[n].values) for n in want)


def test_writer_paces_itself_beside_training(tmp_path, monkeypatch):
    """The writer thread runs niced (Linux), its queue holds a byte budget of steps (8 to a block),
    blocks written while training runs compress on the writer's own thread, and a flush (the caller
    waits) compresses on the pool."""
    import sys
    from types import SimpleNamespace

    import updatestore._writer as writer_mod
    from updatestore._pacing import QUEUE_BYTES, WRITER_NICE, queue_steps

    spec = lambda numel, k: SimpleNamespace(numel=numel, k=k)  # noqa: E731
    assert queue_steps([spec(1000, 100)], 64) == 64  # small steps: a block's worth
    assert queue_steps([spec(10**8, 10**7)], 64) == 8  # huge steps: never fewer than 8
    assert queue_steps([spec(10**6, 10**5)], 1024) == QUEUE_BYTES // (10**5 * 12)
    assert queue_steps([spec(10**6, 10**6)], 1024) == QUEUE_BYTES // (10**6 * 4)  # dense: no positions

    calls = []
    real = writer_mod.write_shards
    monkeypatch.setattr(writer_mod, "write_shards", lambda store, items, parallel: (
        calls.append(parallel), real(store, items, parallel=parallel)))
    model = torch.nn.Linear(100, 150)  # 15k entries: a block of 64 KiB holds two steps
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    store = UpdateStore.create(tmp_path / "s", model, keep=0.5, buffer_bytes=1 << 16)
    assert store._meta["block_steps"] == 2

    def steps(rec, which):
        for i in which:
            with rec.batch([i]):
                opt.zero_grad()
                model(torch.randn(4, 100)).square().sum().backward()
                opt.step()

    with store.recorder(model, opt, commit_seconds=None) as rec:
        writer = store._writer
        if sys.platform.startswith("linux"):
            assert os.getpriority(os.PRIO_PROCESS, writer._thread.native_id) == WRITER_NICE
        assert writer._queue.maxsize == 8  # queue_steps(...) for a block of two steps
        steps(rec, range(4))  # two blocks, written while "training" goes on
        deadline = time.time() + 10
        while len(calls) < 2 and time.time() < deadline:
            time.sleep(0.01)
        assert calls == [False, False]  # the queue never filled: on the writer's own thread
        steps(rec, [4])
        rec.state_dict()  # a flush writes the partial block while the caller waits: on the pool
        assert calls == [False, False, True]
