"""FSDP2 recording (every rank writes its own parts): 2 and 3 CPU ranks (gloo) against oracles.

The oracle of each run is its own dense Δθ, gathered from the shards before and after every
step (tests/fsdp_worker.py); the single-process run of the same global batches is the
reference for the sample index and, up to the rounding of the gradient reduction across
ranks, for the rows.
"""

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import unlearn
from updatestore import ConfigError, NotAStoreError, UpdateStore
from updatestore.distributed import shard_ranges
from test_errors import rewrite_meta
from conftest import spawn_ranks, torchrun

sys.path.insert(0, str(Path(__file__).parent))
import fsdp_worker as W  # noqa: E402

WORKER = Path(__file__).parent / "fsdp_worker.py"


def run_ranks(tmp_path, world, mode, keep=1.0, expect_ok=True, dtype="float32"):
    init = f"file://{tmp_path / f'rdv-{mode}'}"
    done = spawn_ranks(WORKER, lambda r: [str(r), str(world), init, str(tmp_path), mode, str(keep), dtype], world)
    if expect_ok:
        for rc, _, err in done:
            assert rc == 0, err[-4000:]
    return [rc for rc, _, _ in done], [(out, err) for _, out, err in done]


def dense(store, step, name):
    """One step of one parameter from the store, as a dense flat array (via the public read)."""
    rows = store.read([step], [name])[name]
    out = torch.zeros(math.prod(dict((s.name, s.shape) for s in store.layers)[name]))
    rows.sum(out)
    return out.numpy()


def single_process(tmp_path, keep=1.0, dtype=torch.float32):
    model = W.build(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    store = UpdateStore.create(tmp_path / "single.zarr", model, keep=keep, value_dtype="float32")
    with store.recorder(model, opt) as rec:
        for step in range(W.STEPS):
            x, y, ids = W.batch(step, dtype)
            with rec.batch(ids):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
    return store


@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_fsdp_store_equals_single_process_at_keep_1(tmp_path, world):
    run_ranks(tmp_path, world, "record")
    store = UpdateStore.open(tmp_path / "fsdp.zarr")
    assert store.meta["format_version"] == 3 and store.meta["sharding"]["world"] == world
    # every rank wrote its own parts: Shard(0) splits dim 0 as torch.chunk (3 ranks: 7 rows → 3, 3, 1; 2 → 1, 1, 0)
    for spec in store.layers:
        parts = [p for p in store.parts if p.part[0] == spec.name]
        want = [(r, a, b - a) for r, (a, b) in enumerate(shard_ranges(spec.shape, world)) if b > a]
        assert [(p.part[2], p.part[1], p.numel) for p in parts] == want
    oracle = np.load(tmp_path / "oracle-record.npz")
    single = single_process(tmp_path)
    assert store.num_batches == single.num_batches == W.STEPS
    assert store.num_samples == single.num_samples == W.STEPS * W.BATCH
    for step in range(W.STEPS):
        assert store.samples_in(step).tolist() == single.samples_in(step).tolist()  # rank order = batch order
        for spec in store.layers:
            got = dense(store, step, spec.name)
            np.testing.assert_array_equal(got, oracle[f"{step}/{spec.name}"].reshape(-1))  # exact: this run's Δθ
            # the single process sums the gradient in another order: equal up to float32 rounding
            np.testing.assert_allclose(got, dense(single, step, spec.name), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(store.batches_containing(W.FORGET), single.batches_containing(W.FORGET))

    # unlearning the sharded store into the whole model (one process) == into every rank's shards
    final = np.load(tmp_path / "final-record.npz")
    whole = W.build()
    whole.load_state_dict({n: torch.from_numpy(final[n]) for n in final.files})
    report = unlearn.amnesiac(whole, store, W.FORGET, ledger=False, purge=False)
    assert report.applied and report.steps_hit.size == len(W.FORGET)
    on_ranks = np.load(tmp_path / "unlearned-fsdp.npz")
    hit = store.batches_containing(W.FORGET)
    for n, p in whole.named_parameters():
        np.testing.assert_array_equal(p.detach().numpy(), on_ranks[n])
        want = final[n] - sum(oracle[f"{s}/{n}"] for s in hit)  # the oracle: θ − Σ Δθ of the hit steps
        np.testing.assert_allclose(p.detach().numpy(), want, rtol=1e-6, atol=1e-7)

    # appending needs the run's world size; forged parts (a hole, an overlap) are refused on open
    with UpdateStore.open(tmp_path / "fsdp.zarr", "r+") as again:
        with pytest.raises(ConfigError, match=f"created for {world} ranks"):
            again.recorder(whole, torch.optim.SGD(whole.parameters(), lr=0.1))
    for forge, match in ((lambda m: m["layers"][1]["part"].__setitem__(1, 1), "starts at 1"),
                         (lambda m: m["layers"].pop(1), "holds")):
        copy = tmp_path / f"forged-{match[:5]}.zarr"
        shutil.copytree(tmp_path / "fsdp.zarr", copy)
        rewrite_meta(copy, forge)
        with pytest.raises(NotAStoreError, match=match):
            UpdateStore.open(copy)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_fsdp_store_equals_single_process_exactly_when_the_reduction_is_exact(tmp_path, world):
    """Trained in float64, the rounding of the cross-rank gradient reduction (~1e-16) vanishes in the
    float32 values stored: the FSDP store and single-process recording hold bit-identical rows."""
    run_ranks(tmp_path, world, "record", dtype="float64")
    store = UpdateStore.open(tmp_path / "fsdp.zarr")
    single = single_process(tmp_path, dtype=torch.float64)
    assert store.num_batches == single.num_batches == W.STEPS
    for step in range(W.STEPS):
        assert store.samples_in(step).tolist() == single.samples_in(step).tolist()
        for spec in store.layers:
            np.testing.assert_array_equal(dense(store, step, spec.name), dense(single, step, spec.name))


@pytest.mark.slow
def test_fsdp_keep_below_1_prunes_each_part_on_its_own(tmp_path):
    keep = 0.3
    run_ranks(tmp_path, 3, "record", keep=keep)
    store = UpdateStore.open(tmp_path / "fsdp.zarr")
    oracle = np.load(tmp_path / "oracle-record.npz")
    for step in range(W.STEPS):
        for part in store.parts:
            name, offset, _ = part.part
            delta = oracle[f"{step}/{name}"].reshape(-1)[offset: offset + part.numel]
            k = math.ceil(keep * part.numel)
            assert part.k == k
            rows = store.read([step], [part.name])[part.name]
            want = np.sort(np.argsort(-np.abs(delta), kind="stable")[:k])  # the rule: top-k of the part
            assert rows.positions[0].tolist() == want.tolist()
            np.testing.assert_array_equal(rows.values[0].numpy(), delta[want])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["kill", "kill-lag"])
def test_fsdp_sigkill_of_one_rank_leaves_complete_steps_and_resumes(tmp_path, mode):
    codes, outs = run_ranks(tmp_path, 2, mode, expect_ok=False)
    assert codes[1] == -9 and codes[0] != 0, outs[0][1][-2000:]
    store = UpdateStore.open(tmp_path / "fsdp.zarr")
    oracle = np.load(tmp_path / f"oracle-{mode}.npz")
    committed = store.num_batches
    # "kill": rank 1 had committed its parts of steps up to KILL; "kill-lag": only up to the checkpoint,
    # though rank 0 wrote all of its own (its part record says so): the commit takes the smaller
    assert committed == (W.KILL if mode == "kill" else W.CKPT)
    assert store.num_samples == committed * W.BATCH
    for step in range(committed):  # every committed step is complete in every part
        for spec in store.layers:
            np.testing.assert_array_equal(dense(store, step, spec.name), oracle[f"{step}/{spec.name}"].reshape(-1))
    state = json.loads((tmp_path / "ckpt" / "store.json").read_text())
    assert state["steps"] == W.CKPT

    run_ranks(tmp_path, 2, "resume")
    store = UpdateStore.open(tmp_path / "fsdp.zarr")
    resumed = np.load(tmp_path / "oracle-resume.npz")
    assert store.num_batches == W.STEPS and store.num_samples == W.STEPS * W.BATCH
    for step in range(W.STEPS):
        assert store.samples_in(step).tolist() == W.batch(step)[2].tolist()
        for spec in store.layers:
            want = (oracle if step < W.CKPT else resumed)[f"{step}/{spec.name}"].reshape(-1)
            np.testing.assert_array_equal(dense(store, step, spec.name), want)
    events = [e["event"] for e in store.history()]
    assert "rollback" in events or committed == W.CKPT


@pytest.mark.slow
def test_readme_fsdp_example_runs_under_torchrun(tmp_path):
    done = torchrun(Path(__file__).parents[1] / "examples" / "fsdp_digits.py", tmp_path / "fsdp.zarr")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "steps recorded by 2 ranks" in done.stdout and "subtracted" in done.stdout
    store = UpdateStore.open(tmp_path / "fsdp.zarr")
    assert store.meta["format_version"] == 3 and store.num_samples == 2 * 1348  # DistributedSampler pads to even
    entry = store.ledger()[-1]  # rank 0 wrote the audit entry after the unlearned shards were saved, then purged
    assert entry["purged"] and len(entry["steps"]) > 0
    assert (tmp_path / "fsdp.ckpt1" / "store.json").exists() and (tmp_path / "fsdp.unlearned").is_dir()


HALF = """
import sys, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from updatestore import UpdateStore
rank, init, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
torch.manual_seed(0)
model = torch.nn.Linear(6, 4, bias=False)
fully_shard(model, mesh=init_device_mesh("cpu", (2,)))  # rank 0: output rows 0-1, rank 1: rows 2-3
opt = torch.optim.SGD(model.parameters(), lr=0.1)
store = UpdateStore.create(path, model, keep=1.0, value_dtype="float32")
with store.recorder(model, opt) as rec:
    for step in range(3):
        with rec.batch([step * 2 + rank]):
            opt.zero_grad()
            model(torch.ones(2, 6))[:, 2:].pow(2).mean().backward()  # only rank 1's rows get a gradient
            opt.step()
store.close()
plain = torch.nn.Linear(6, 4, bias=False)  # not sharded: appending to the sharded store is refused on every rank
with UpdateStore.open(path, "r+") as again:
    try:
        again.recorder(plain, torch.optim.SGD(plain.parameters(), lr=0.1))
    except Exception as exc:
        print(type(exc).__name__, exc)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_fsdp_step_with_one_rank_unchanged_is_still_recorded(tmp_path):
    """A step's status is agreed across ranks: rank 0's shard did not move, rank 1's did."""
    script = tmp_path / "half.py"
    script.write_text(HALF)
    init = f"file://{tmp_path / 'rdv'}"
    for rc, out, err in spawn_ranks(script, lambda r: [str(r), init, str(tmp_path / "half.zarr")], timeout=120):
        assert rc == 0, err[-2000:]
        assert out.startswith("ConfigError") and "shard the model as when the store was created" in out, out
    store = UpdateStore.open(tmp_path / "half.zarr")
    assert store.step_status().tolist() == [1, 1, 1]
    for step in range(3):
        got = dense(store, step, "weight").reshape(4, 6)
        assert not got[:2].any() and got[2:].all()


@given(st.lists(st.integers(1, 40), min_size=1, max_size=3), st.integers(1, 9))
@settings(max_examples=200, deadline=None)
def test_shard_ranges_tile_the_parameter_as_torch_chunk_does(shape, world):
    ranges = shard_ranges(tuple(shape), world)
    assert ranges[0][0] == 0 and ranges[-1][1] == math.prod(shape)
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    chunks = torch.arange(math.prod(shape)).reshape(shape).chunk(world, dim=0)
    sizes = [c.numel() for c in chunks] + [0] * (world - len(chunks))
    assert [b - a for a, b in ranges] == sizes
