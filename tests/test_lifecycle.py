"""The store follows the model through checkpoints, crashes and resumes (issue: lifecycle)."""

import copy
import json
import time

import numpy as np
import pytest
import torch

import unlearn
from conftest import file_bytes, make_tiny
from updatestore import (STATUS_NONFINITE, ModelMismatchError, RecorderError, StoreBehindCheckpointError,
                         UpdateStore)


def batch(step):
    """Deterministic data of step ``step``: the same whichever run trains it."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(4, 12, generator=g), torch.randint(0, 3, (4,), generator=g), np.arange(4) + 4 * step


def recorded(store_path, steps=3, keep=0.5):
    """A model trained ``steps`` steps with a store attached: ``(model, optimizer, store, state at the end)``."""
    model = make_tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    store = UpdateStore.create(store_path, model, keep=keep)
    with store.recorder(model, opt) as rec:
        run_steps(rec, model, opt, range(steps))
        state = rec.state_dict()
    return model, opt, store, state


def run_steps(rec, model, opt, steps):
    for s in steps:
        x, y, ids = batch(s)
        with rec.batch(ids):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()


def test_resume_from_checkpoint_rolls_back_the_lost_lineage(store_path):
    """The issue's scenario: checkpoint after 5 steps, 8 committed, crash, resume from the checkpoint,
    train to 10: the store holds exactly the 10 steps of the final model, and unlearning every
    sample returns the initial weights."""
    model = make_tiny()
    init = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    store = UpdateStore.create(store_path, model, keep=1.0, value_dtype="float32")
    with store.recorder(model, opt) as rec:
        run_steps(rec, model, opt, range(5))
        ckpt = {"model": copy.deepcopy(model.state_dict()), "store": json.loads(json.dumps(rec.state_dict()))}
        run_steps(rec, model, opt, range(5, 8))  # trained (and committed) after the checkpoint...
    store.close()  # ...then the process dies

    model = make_tiny()
    model.load_state_dict(ckpt["model"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with UpdateStore.open(store_path, "r+") as store:
        assert store.num_batches == 8
        with store.recorder(model, opt, resume=ckpt["store"]) as rec:
            assert store.num_batches == 5
            # the rollback is committed on disk before any new step (a crash here must not leave a
            # commit record vouching for the erased steps)
            with UpdateStore.open(store_path) as reader:
                assert reader.num_batches == 5 and reader.num_samples == 20
            run_steps(rec, model, opt, range(5, 10))
        assert store.num_batches == 10
        for s in range(10):
            assert store.samples_in(s).tolist() == batch(s)[2].tolist()  # each sample in one step only
        assert [e["event"] for e in store.history()] == ["checkpoint", "close", "rollback", "close"]
        assert store.history()[2]["step"] == 5 and store.history()[2]["from_step"] == 8
        unlearn.amnesiac(model, store, np.arange(40), ledger=False, purge=False)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), init[n], rtol=0, atol=2e-6)


def test_store_behind_checkpoint_is_a_clear_error_and_changes_nothing(store_path):
    model, opt, store, state = recorded(store_path)
    store.close()
    files = file_bytes(store_path)
    ahead = dict(state, steps=7, samples=28)
    with UpdateStore.open(store_path, "r+") as store:
        with pytest.raises(StoreBehindCheckpointError, match=r"checkpoint is at step 7.*holds only 3.*steps 3..6"):
            store.recorder(model, opt, resume=ahead)
    assert file_bytes(store_path) == files


def test_resume_refuses_other_weights_and_foreign_checkpoints(tmp_path):
    model = make_tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with UpdateStore.create(tmp_path / "a", model, keep=0.5) as a, a.recorder(model, opt) as rec:
        run_steps(rec, model, opt, range(3))
        state = rec.state_dict()
    other = make_tiny(seed=1)
    with UpdateStore.open(tmp_path / "a", "r+") as a:
        with pytest.raises(ModelMismatchError, match="not the ones the checkpoint was saved with"):
            a.recorder(other, torch.optim.SGD(other.parameters(), lr=0.1), resume=state)
    twin = make_tiny()
    topt = torch.optim.SGD(twin.parameters(), lr=0.1)
    with UpdateStore.create(tmp_path / "b", twin, keep=0.5) as b:
        with b.recorder(twin, topt) as rec:
            run_steps(rec, twin, topt, range(3))
        foreign = dict(state, weights="0" * 64)
        with pytest.raises(ModelMismatchError):
            b.recorder(twin, topt, resume=foreign)


def test_loss_window_commits_without_flush(store_path):
    model = make_tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    store = UpdateStore.create(store_path, model, keep=0.5)
    with store.recorder(model, opt, commit_seconds=0.2) as rec:
        run_steps(rec, model, opt, range(3))
        deadline = time.time() + 5
        while UpdateStore.open(store_path).num_batches < 3 and time.time() < deadline:
            time.sleep(0.05)
        assert UpdateStore.open(store_path).num_batches == 3  # a reader sees them: a crash now loses nothing
    assert 0 < store.bytes_written  # counted through the same wrapper as reads
    store.close()


def test_parameter_unfrozen_or_added_after_attach_stops_the_step(store_path):
    model = make_tiny()
    model.fc1.bias.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with UpdateStore.create(store_path, model, keep=0.5) as store, store.recorder(model, opt) as rec:
        run_steps(rec, model, opt, range(2))
        model.fc1.bias.requires_grad_(True)
        before = model.fc1.weight.detach().clone()
        with pytest.raises(RecorderError, match="newly trainable: fc1.bias"):
            run_steps(rec, model, opt, [2])
        assert torch.equal(model.fc1.weight, before)  # refused before the update
        model.fc1.bias.requires_grad_(False)
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})
        with pytest.raises(RecorderError, match="optimizer has new parameters"):
            run_steps(rec, model, opt, [2])


def test_non_finite_step_gets_its_own_status_and_is_reported(store_path, capsys):
    model = make_tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with UpdateStore.create(store_path, model, keep=0.5) as store:
        with pytest.warns(RuntimeWarning, match="step 1 of store .* NaN or infinity"):
            with store.recorder(model, opt) as rec:
                run_steps(rec, model, opt, [0])
                with rec.batch([99]):
                    opt.zero_grad()
                    (model(torch.randn(1, 12)).sum() * float("nan")).backward()
                    opt.step()
                with torch.no_grad():  # the usual guard: roll the diverged step back
                    for p in model.parameters():
                        p.nan_to_num_(0.0)
        assert store.step_status().tolist() == [1, STATUS_NONFINITE]
        report = unlearn.amnesiac(model, store, [99], allow_unknown_model=True, ledger=False, purge=False)
    assert report.steps_nonfinite == 1 and "NaN/infinite" in str(report) and not report.applied
    from unlearn.cli import main

    assert main(["info", str(store_path)]) == 0
    assert "1 non-finite (NaN/inf, not stored)" in capsys.readouterr().out


def test_model_the_store_never_saw_is_refused(store_path):
    model, opt, store, _ = recorded(store_path)
    with store:
        fresh = make_tiny(seed=5)
        before = {n: p.detach().clone() for n, p in fresh.named_parameters()}
        # refused before anything changes the model, a dry run all the same
        for dry_run in (False, True):
            with pytest.raises(unlearn.UnknownModelError, match="allow_unknown_model=True"):
                unlearn.amnesiac(fresh, store, [0], dry_run=dry_run)
        assert len(store.ledger()) == 0
        assert all(torch.equal(p.detach(), before[n]) for n, p in fresh.named_parameters())
        unlearn.amnesiac(copy.deepcopy(model), store, [0], purge=False)  # the recorded one is fine
        # and once the ledger holds an entry (whose lineage the fingerprint is looked up in)
        with pytest.raises(unlearn.UnknownModelError, match="allow_unknown_model=True"):
            unlearn.amnesiac(fresh, store, [1])
        assert len(store.ledger()) == 1
        assert all(torch.equal(p.detach(), before[n]) for n, p in fresh.named_parameters())


def test_defer_writes_nothing_until_commit(store_path):
    model, opt, store, _ = recorded(store_path, steps=4)
    with store:
        files = file_bytes(store_path)
        report = unlearn.amnesiac(model, store, [1], defer=True)
        assert report.applied and file_bytes(store_path) == files  # the caller saves the model now
        assert "call report.commit()" in str(report)
        assert report.commit() and report.purged and report.ledger_entry == 0
        assert store.ledger()[0]["purged"] and store.batches_containing([1]).tolist() == []
        assert not report.commit()  # idempotent


CHILD = r'''
import json, os, shutil, sys
from pathlib import Path
import numpy as np, torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[4])
from conftest import make_tiny
from test_lifecycle import batch, run_steps
from safetensors.torch import load_file, save_file
from updatestore import UpdateStore

store_path, ckpt_dir, total = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
done = sorted(int(p.name.split("-")[1]) for p in ckpt_dir.glob("ckpt-*"))
model = make_tiny()
opt = torch.optim.SGD(model.parameters(), lr=0.1)
if done:  # resume from the latest complete checkpoint
    latest = ckpt_dir / f"ckpt-{done[-1]:04d}"
    model.load_state_dict(load_file(str(latest / "model.safetensors")))
    state = json.loads((latest / "store.json").read_text())
    store = UpdateStore.open(store_path, "r+")
else:  # nothing was checkpointed: a fresh start, whatever an earlier attempt left
    shutil.rmtree(store_path, ignore_errors=True)
    state = None
    store = UpdateStore.create(store_path, model, keep=1.0, value_dtype="float32")

def checkpoint(rec, step):
    tmp = ckpt_dir / f"tmp-{step:04d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    (tmp / "store.json").write_text(json.dumps(rec.state_dict()))
    os.replace(tmp, ckpt_dir / f"ckpt-{step:04d}")  # a checkpoint exists whole or not at all

with store.recorder(model, opt, resume=state, commit_seconds=0.1) as rec:
    start = state["steps"] if state else 0
    if not done:
        checkpoint(rec, 0)
    for s in range(start, total):
        run_steps(rec, model, opt, [s])
        if (s + 1) % 3 == 0 or s + 1 == total:
            checkpoint(rec, s + 1)
store.close()
print("finished")
'''


def _crash_and_resume(tmp_path, seed, total=24):
    import random
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    rng = random.Random(seed)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    store_path, ckpts = tmp_path / "s.zarr", tmp_path / "ckpts"
    ckpts.mkdir()
    here = str(Path(__file__).parent)
    cmd = [sys.executable, str(script), str(store_path), str(ckpts), str(total), here]
    for _ in range(rng.randint(1, 3)):  # SIGKILL at random points, each attempt resuming the last
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(1.0, 4.0))
        proc.kill()
        proc.wait()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "finished" in done.stdout, done.stderr[-2000:]

    # Oracle: replay the surviving lineage (steps 0..total-1 from the initial weights) in this process.
    torch.set_num_threads(1)
    oracle = make_tiny()
    init = copy.deepcopy(oracle.state_dict())
    opt = torch.optim.SGD(oracle.parameters(), lr=0.1)
    for s in range(total):
        x, y, _ = batch(s)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(oracle(x), y).backward()
        opt.step()
    final = make_tiny()
    final.load_state_dict(load_file(str(ckpts / f"ckpt-{total:04d}" / "model.safetensors")))
    for (n, a), (_, b) in zip(final.named_parameters(), oracle.named_parameters()):
        assert torch.equal(a, b), f"the resumed run's final weights differ from the replay ({n})"
    with UpdateStore.open(store_path) as store:
        assert store.num_batches == total, [e["event"] for e in store.history()]
        for s in range(total):
            assert store.samples_in(s).tolist() == batch(s)[2].tolist()
        unlearn.amnesiac(final, store, np.arange(4 * total), ledger=False, purge=False)
    for n, p in final.named_parameters():
        torch.testing.assert_close(p.detach(), init[n], rtol=0, atol=5e-6)


@pytest.mark.parametrize("seed", range(1))
def test_crash_and_resume_keeps_exactly_the_final_lineage(tmp_path, seed):
    _crash_and_resume(tmp_path, seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1, 24))
def test_crash_and_resume_keeps_exactly_the_final_lineage_many_trials(tmp_path, seed):
    _crash_and_resume(tmp_path, seed)


def test_resume_rolls_back_owner_entries_indexed_after_the_checkpoint(store_path):
    model = make_tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    store = UpdateStore.create(store_path, model, keep=0.5)
    store.index_owners([0, 1, 2, 3], [7, 7, 8, 8])
    with store.recorder(model, opt) as rec:
        run_steps(rec, model, opt, range(2))
        state = rec.state_dict()
        saved = copy.deepcopy(model.state_dict())
        store.index_owners([4, 5], [9, 9])  # after the checkpoint: lost with the crash
        run_steps(rec, model, opt, range(2, 4))
    assert state["owners"] == 4 and store.samples_of([9]).tolist() == [4, 5]
    model.load_state_dict(saved)
    legacy = {k: v for k, v in state.items() if k != "owners"}  # a state saved before owner rollback
    with store.recorder(model, opt, resume=legacy):
        pass
    assert store.num_batches == 2 and store.samples_of([9]).tolist() == [4, 5]  # owners untouched
    with store.recorder(model, opt, resume=state):
        pass
    assert store.samples_of([9]).tolist() == [] and store.samples_of([7, 8]).tolist() == [0, 1, 2, 3]
    store.close()
    with UpdateStore.open(store_path) as again:
        assert again.samples_of([9]).tolist() == []
