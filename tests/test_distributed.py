"""DistributedDataParallel recording: 2 CPU processes (gloo) against single-process recording."""

import textwrap

import numpy as np
import pytest
import torch

import unlearn
from updatestore import UpdateStore
from conftest import read_rows, spawn_ranks, torchrun

WORKER = textwrap.dedent("""
    import sys, numpy as np, torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from updatestore import Recorder, UpdateStore

    rank, world, init, path, api = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 40), torch.nn.Tanh(), torch.nn.Linear(40, 3))
    ddp = DDP(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    store = UpdateStore.create(path, model, keep=0.3, value_dtype="float32")  # collective: every rank
    if api == "legacy" and rank > 0:  # the 0.2 way: still works, with a DeprecationWarning
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rec = Recorder(None, model, opt)
        assert any(issubclass(w.category, DeprecationWarning) for w in caught)
    else:
        rec = store.recorder(model, opt)
    with rec:
        for step in range(8):
            x = torch.randn(8, 12, generator=g); y = torch.randint(0, 3, (8,), generator=g)
            ids = torch.arange(step * 8, step * 8 + 8) * 3
            mine = slice(rank * 4, rank * 4 + 4)  # each rank takes half of the global batch
            with rec.batch(ids[mine]):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(ddp(x[mine]), y[mine]).backward()
                opt.step()
    store.close()
    dist.destroy_process_group()
""")


@pytest.mark.parametrize("api", ["collective", "legacy"])
def test_ddp_store_equals_single_process_on_the_union(tmp_path, api):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    init = f"file://{tmp_path / 'rendezvous'}"
    for rc, _, err in spawn_ranks(script, lambda r: [str(r), "2", init, str(tmp_path / "ddp.zarr"), api], timeout=180):
        assert rc == 0, err

    # the same run in one process, on the union of the ranks' batches
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 40), torch.nn.Tanh(), torch.nn.Linear(40, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    single = UpdateStore.create(tmp_path / "single.zarr", model, keep=0.3, value_dtype="float32")
    with single.recorder(model, opt) as rec:
        for step in range(8):
            x = torch.randn(8, 12, generator=g)
            y = torch.randint(0, 3, (8,), generator=g)
            with rec.batch(torch.arange(step * 8, step * 8 + 8) * 3):
                opt.zero_grad()
                # DDP averages the two ranks' mean losses' gradients: the mean over the union
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()

    ddp = UpdateStore.open(tmp_path / "ddp.zarr")
    assert ddp.num_batches == single.num_batches == 8
    for s in range(8):
        assert ddp.samples_in(s).tolist() == single.samples_in(s).tolist()  # rank 0's IDs, then rank 1's
    for spec in single.layers:
        v1, p1 = read_rows(single, spec.name, 0, 8)
        v2, p2 = read_rows(ddp, spec.name, 0, 8)
        torch.testing.assert_close(v2, v1, rtol=1e-5, atol=1e-7)
        assert (p1 == p2).float().mean() > 0.99  # positions agree up to near-ties from all-reduce rounding

    # unlearning from the DDP store matches unlearning from the single-process one
    a = torch.nn.Sequential(torch.nn.Linear(12, 40), torch.nn.Tanh(), torch.nn.Linear(40, 3))
    a.load_state_dict(model.state_dict())
    b = torch.nn.Sequential(torch.nn.Linear(12, 40), torch.nn.Tanh(), torch.nn.Linear(40, 3))
    b.load_state_dict(model.state_dict())
    forget = np.array([9, 60])
    unlearn.amnesiac(a, single, forget, ledger=False, purge=False)
    # b holds the single-process weights, which the DDP store never saw (they differ by rounding)
    unlearn.amnesiac(b, ddp, forget, ledger=False, purge=False, allow_unknown_model=True)
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pb, pa, rtol=1e-4, atol=1e-5)


def test_readme_ddp_example_runs_under_torchrun(tmp_path):
    from pathlib import Path

    done = torchrun(Path(__file__).parents[1] / "examples" / "ddp_digits.py", tmp_path / "ddp.zarr")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "steps recorded" in done.stdout and "subtracted" in done.stdout
    store = UpdateStore.open(tmp_path / "ddp.zarr")
    assert store.num_samples == 3 * 1347 + 3  # DistributedSampler pads to an even split: 1348 per epoch


BAD_ARGUMENT = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from updatestore import ConfigError, OtherRankError, UpdateStore
    rank, init, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    model = torch.nn.Linear(3, 2)
    store = UpdateStore.create(path, model)
    try:  # rank 1 alone passes a bad argument: both ranks raise, neither waits for the other
        store.recorder(model, torch.optim.SGD(model.parameters(), lr=0.1), commit_seconds=-1 if rank else 5)
    except (ConfigError, OtherRankError) as exc:
        print(type(exc).__name__)
    with store.recorder(model, torch.optim.SGD(model.parameters(), lr=0.1)) as rec:  # and they go on in step
        with rec.batch([rank]):
            model(torch.ones(1, 3)).sum().backward()
            rec._optimizer.step()
    store.close()
    dist.destroy_process_group()
""")


def test_a_bad_argument_on_one_rank_is_an_error_on_every_rank(tmp_path):
    script = tmp_path / "bad.py"
    script.write_text(BAD_ARGUMENT)
    init = f"file://{tmp_path / 'rendezvous'}"
    done = spawn_ranks(script, lambda r: [str(r), init, str(tmp_path / "s.zarr")], timeout=120)
    assert [rc for rc, _, _ in done] == [0, 0], done[0][2][-2000:] + done[1][2][-2000:]
    assert [out.strip() for _, out, _ in done] == ["OtherRankError", "ConfigError"]
    store = UpdateStore.open(tmp_path / "s.zarr")
    assert store.num_batches == 1 and sorted(store.samples_in(0).tolist()) == [0, 1]
