"""Reliability: one writer, crash safety under SIGKILL, resuming after a crash."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from updatestore import StoreLockedError, UpdateStore
from conftest import read_rows, tiny_step


def test_second_writer_refused_reader_allowed(store_path, tiny):
    store = UpdateStore.create(store_path, tiny)
    with pytest.raises(StoreLockedError, match=rf"open for writing by process {os.getpid()}.*delete"):
        UpdateStore.open(store_path, "r+")
    with pytest.raises(StoreLockedError):
        UpdateStore.create(store_path, tiny, overwrite=True)
    UpdateStore.open(store_path).close()  # readers are never blocked
    store.close()
    UpdateStore.open(store_path, "r+").close()  # released on close


def test_stale_lock_of_dead_process_is_recovered(store_path, tiny):
    UpdateStore.create(store_path, tiny).close()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    (store_path / "updatestore.lock").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(),
                                                             "since": 0}))
    UpdateStore.open(store_path, "r+").close()


def test_lock_released_when_handle_is_dropped(store_path, tiny):
    import gc

    store = UpdateStore.create(store_path, tiny)
    del store
    gc.collect()
    UpdateStore.open(store_path, "r+").close()


CHILD = textwrap.dedent("""
    import sys, torch
    from updatestore import UpdateStore
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Linear(64, 4))
    path, resume, count = sys.argv[1], sys.argv[2] == "resume", int(sys.argv[3])
    store = UpdateStore.open(path, "r+") if resume else UpdateStore.create(path, model, keep=0.5,
                                                                       value_dtype="float32", buffer_bytes=65536)
    start = store.num_batches
    with torch.no_grad():  # replay the parameters up to where the store stands
        for s in range(start):
            g = torch.Generator().manual_seed(s)
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    print("ready", start, flush=True)
    with store.recorder(model) as rec:
        for s in range(start, start + count):
            g = torch.Generator().manual_seed(s)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.01)
            rec.step([s, 10_000 + s])
            if s % 3 == 2:
                store.flush()
                print("committed", store.num_batches, flush=True)
    store.close()
    print("done", flush=True)
""")


def _expected_deltas(n):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Linear(64, 4))
    out = []
    with torch.no_grad():
        for s in range(n):
            g = torch.Generator().manual_seed(s)
            row = {}
            for name, p in model.named_parameters():
                before = p.detach().clone()
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
                row[name] = (p - before).flatten()
            out.append(row)
    return out


def _check_store(path, committed):
    with UpdateStore.open(path) as store:
        n = store.num_batches
        assert n >= committed, f"{committed} steps were reported committed, the store shows {n}"
        assert store.num_samples == 2 * n
        expected = _expected_deltas(n)
        for spec in store.layers:
            values, pos = read_rows(store, spec.name, 0, n)
            for s in range(n):
                d = expected[s][spec.name]  # oracle: torch.topk (random normals: no ties), sorted by position
                want_p = d.abs().topk(spec.k).indices.sort().values
                want_v = d[want_p]
                assert torch.equal(pos[s], want_p) and torch.equal(values[s], want_v), (spec.name, s)
        for s in range(n):
            assert store.samples_in(s).tolist() == [s, 10_000 + s]
        return n


def _sigkill_trials(tmp_path, trials):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    rng = random.Random(1234)
    for trial in range(trials):
        path = tmp_path / f"s{trial}.zarr"
        proc = subprocess.Popen([sys.executable, str(script), str(path), "new", "300"], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().startswith("ready")
        time.sleep(rng.uniform(0.0, 0.6))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        committed = max([int(line.split()[1]) for line in out.splitlines() if line.startswith("committed")],
                        default=0)
        if not path.exists() or not (path / "zarr.json").exists():
            continue  # killed before the store was created: nothing was promised
        n = _check_store(path, committed)
        if trial % 5 == 0:  # recording resumes into the same store after the crash
            done = subprocess.run([sys.executable, str(script), str(path), "resume", "40"], capture_output=True,
                                  text=True, timeout=120)
            assert done.returncode == 0, done.stderr
            assert _check_store(path, n + 40) == n + 40


def test_sigkill_at_random_points_leaves_committed_steps_intact(tmp_path):
    _sigkill_trials(tmp_path, 4)  # the default run; the slow suite runs 20


@pytest.mark.slow
def test_sigkill_at_random_points_leaves_committed_steps_intact_many_trials(tmp_path):
    _sigkill_trials(tmp_path, 20)


def test_reader_sees_only_committed_steps(store_path, tiny):
    opt = torch.optim.SGD(tiny.parameters(), lr=0.1)
    store = UpdateStore.create(store_path, tiny)
    with store.recorder(tiny, opt) as rec:
        def step(i):
            tiny_step(rec, tiny, opt, [i])

        for i in range(5):
            step(i)
        store.flush()
        reader = UpdateStore.open(store_path)
        assert reader.num_batches == 5
        for i in range(5, 9):
            step(i)
        assert reader.num_batches == 5  # buffered, not committed
        assert reader.batches_containing([7]).size == 0
        store.flush()
        assert reader.num_batches == 9 and reader.batches_containing([7]).tolist() == [7]


def test_fsync_makes_data_durable_before_the_commit_record(tmp_path, monkeypatch):
    """With fsync=True every chunk a commit vouches for is fsynced (with its directory) before the
    commit record is written, and the record itself after."""
    import os

    import torch

    from conftest import make_tiny

    synced: list[str] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    model = make_tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with UpdateStore.create(tmp_path / "s", model, keep=0.5) as store:
        with store.recorder(model, opt, fsync=True) as rec:
            for s in range(3):
                with rec.batch([s]):
                    opt.zero_grad(); model(torch.randn(2, 12)).sum().backward(); opt.step()
            rec.state_dict()
    record = str(tmp_path / "s" / "steps" / "zarr.json")
    chunk = str(tmp_path / "s" / "layers" / "fc1.weight" / "values" / "c" / "0" / "0")
    assert chunk in synced and record in synced
    assert synced.index(chunk) < synced.index(record)  # data first, then the record that vouches for it
    assert str(tmp_path / "s" / "layers" / "fc1.weight" / "values" / "c" / "0") in synced  # its directory
    synced.clear()
    with UpdateStore.open(tmp_path / "s", "r+") as store, store.recorder(model, opt) as rec:  # default: off
        with rec.batch([9]):
            opt.zero_grad(); model(torch.randn(2, 12)).sum().backward(); opt.step()
    assert synced == []


def test_store_level_fsync_covers_purge_ledger_and_rollback(tmp_path, monkeypatch):
    """UpdateStore.open(..., fsync=True): every record write (ledger, ledger count, purge's generation,
    rollback's commit record) comes after the fsync of what it vouches for."""
    import os

    import torch

    import unlearn
    from conftest import make_tiny

    model = make_tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with UpdateStore.create(tmp_path / "s", model, keep=0.5) as store, store.recorder(model, opt) as rec:
        for s in range(4):
            with rec.batch([s]):
                opt.zero_grad(); model(torch.randn(2, 12)).sum().backward(); opt.step()
    synced: list[str] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    with UpdateStore.open(tmp_path / "s", "r+") as store:  # default: no fsync at all
        unlearn.amnesiac(model, store, [0])
    assert synced == []
    with UpdateStore.open(tmp_path / "s", "r+", fsync=True) as store:
        unlearn.amnesiac(model, store, [1])
    root = tmp_path / "s"
    ledger, record = str(root / "ledger" / "zarr.json"), str(root / "steps" / "zarr.json")
    chunk = str(root / "layers" / "fc1.weight" / "values" / "c" / "0" / "0")  # rewritten by the purge
    assert ledger in synced and record in synced and chunk in synced
    assert synced.index(ledger) < len(synced) - 1 - synced[::-1].index(record)  # ledger before its count
    assert synced.index(chunk) < len(synced) - 1 - synced[::-1].index(record)  # rows before the generation
    with pytest.raises(Exception, match="fsync must be True or False"):
        UpdateStore.open(tmp_path / "s", "r+", fsync="yes")


def test_long_lived_reader_sees_another_process_purge(tmp_path):
    """A reader opened before a purge never reports a subtraction that did not happen: the purge
    bumps the store's generation and the reader reloads the step statuses."""
    import copy

    import torch

    import unlearn
    from conftest import make_tiny, train

    model = make_tiny()
    with UpdateStore.create(tmp_path / "s", model, keep=1.0, value_dtype="float32") as store:
        train(store, model, steps=4)
    reader = UpdateStore.open(tmp_path / "s")
    assert (reader.step_status() == 1).all()  # statuses cached
    with UpdateStore.open(tmp_path / "s", "r+") as writer:  # "another process" purges step 0
        unlearn.amnesiac(copy.deepcopy(model), writer, [0])
    stale = copy.deepcopy(model)
    report = unlearn.amnesiac(stale, reader, [0], ledger=False, purge=False)
    assert not report.applied and report.already_forgotten.tolist() == [0]  # it used to "subtract" zeros
    for (n, a), (_, b) in zip(stale.named_parameters(), model.named_parameters()):
        assert torch.equal(a, b)


HOLDER = textwrap.dedent("""
    import sys, time
    from updatestore import UpdateStore
    store = UpdateStore.open(sys.argv[1], "r+")
    print("holding", flush=True)
    time.sleep(float(sys.argv[2]))
    print("done", flush=True)
""")


def _holder(tmp_path, store_path, seconds):
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    proc = subprocess.Popen([sys.executable, str(script), str(store_path), str(seconds)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "holding", proc.stderr.read()
    return proc


def test_lock_is_an_os_lock_not_a_pid_guess(tmp_path, store_path, tiny):
    """A live writer whose recorded pid means nothing here (another PID namespace: the pid is dead or
    someone else's) still holds the store; when it is SIGKILLed the kernel frees the lock at once."""
    UpdateStore.create(store_path, tiny).close()
    proc = _holder(tmp_path, store_path, 60)
    try:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        (store_path / "updatestore.lock").write_text(json.dumps({"pid": int(dead.stdout), "host": "x", "since": 0}))
        with pytest.raises(StoreLockedError, match="open for writing"):
            UpdateStore.open(store_path, "r+")
        for url in (f"local://{store_path}", f"file://{store_path}"):  # every local spelling takes the lock
            with pytest.raises(StoreLockedError):
                UpdateStore.open(url, "r+")
    finally:
        proc.kill()
        proc.wait()
    UpdateStore.open(store_path, "r+").close()  # no stale lock to clean up after a SIGKILL


@pytest.mark.slow
def test_many_writers_racing_for_a_released_lock_only_one_wins(tmp_path, store_path, tiny):
    UpdateStore.create(store_path, tiny).close()
    racer = tmp_path / "racer.py"
    racer.write_text(textwrap.dedent("""
        import sys, time
        from updatestore import StoreLockedError, UpdateStore
        time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # start together
        try:
            store = UpdateStore.open(sys.argv[1], "r+")
        except StoreLockedError:
            print("refused", flush=True)
        else:
            print("got", flush=True)
            time.sleep(3)
    """))
    start = time.time() + 4
    procs = [subprocess.Popen([sys.executable, str(racer), str(store_path), str(start)], stdout=subprocess.PIPE,
                              text=True) for _ in range(4)]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert sorted(outs) == ["got", "refused", "refused", "refused"], outs
