"""One rank of an FSDP2 recording on the CPU (gloo), for tests/test_fsdp.py.

python fsdp_worker.py RANK WORLD INIT OUT MODE [KEEP [DTYPE]]
MODE: ``record`` (STEPS steps, then unlearn into the FSDP model), ``kill`` (checkpoint at step
CKPT, then rank 1 SIGKILLs itself at step KILL once its writer committed), ``kill-lag`` (the same,
but rank 1 dies with its rows since the checkpoint unwritten while rank 0 writes all of its own),
``resume`` (from the checkpoint of a kill run).
Rank 0 writes the oracle: every step's dense Δθ, gathered from the shards (``OUT/oracle.npz``).
"""

import json
import os
import signal
import sys
import time
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import unlearn
from updatestore import UpdateStore

STEPS, CKPT, KILL, BATCH = 12, 6, 10, 12
FORGET = [4, 40, 100]  # in steps 0, 1 and 2


def build(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2)).to(dtype)


def batch(step: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The global batch of ``step`` (the same in every run)."""
    g = torch.Generator().manual_seed(1000 + step)
    return (torch.randn(BATCH, 12, generator=g).to(dtype), torch.randint(0, 2, (BATCH,), generator=g),
            torch.arange(step * BATCH, (step + 1) * BATCH) * 3 + 1)


def full(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {n: p.detach().full_tensor().numpy().copy() for n, p in model.named_parameters()}


def main() -> None:
    rank, world, init, out, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    keep = float(sys.argv[6]) if len(sys.argv) > 6 else 1.0
    dtype = getattr(torch, sys.argv[7]) if len(sys.argv) > 7 else torch.float32
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=60))
    mesh = init_device_mesh("cpu", (world,))
    model = build(dtype)
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    path = os.path.join(out, "fsdp.zarr")
    start = 0
    if mode == "resume":
        state = model.state_dict()
        dcp.load(state, checkpoint_id=os.path.join(out, "ckpt"))
        model.load_state_dict(state)
        with open(os.path.join(out, "ckpt", "store.json")) as f:
            resume = json.load(f)
        start = resume["steps"]
        store = UpdateStore.open(path, "r+")
    else:
        resume = None
        store = UpdateStore.create(path, model, keep=keep, value_dtype="float32")
    oracle = {}
    killed = mode.startswith("kill")
    with store.recorder(model, opt, resume=resume, commit_seconds=30 if mode == "kill-lag" else 0.05) as rec:
        for step in range(start, STEPS):
            if killed and step == KILL and rank == 1:
                if mode == "kill":
                    time.sleep(0.5)  # rank 0's writer commits what both ranks wrote, then this rank dies
                os.kill(os.getpid(), signal.SIGKILL)
            x, y, ids = batch(step, dtype)
            mine = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
            before = full(model)
            with rec.batch(ids[mine]):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x[mine]), y[mine]).backward()
                opt.step()
            after = full(model)
            for n in before:
                oracle[f"{step}/{n}"] = after[n] - before[n]
            if rank == 0:  # the oracle so far: the killed run's survivor keeps it
                np.savez(os.path.join(out, f"oracle-{mode}.npz"), **oracle)
            if mode == "kill-lag" and rank == 0 and step == KILL - 1:
                store.flush()  # rank 0's rows up to KILL are durable; rank 1's only up to the checkpoint
            if killed and step == CKPT - 1:
                state = rec.state_dict()  # commits every rank's parts first
                dcp.save(model.state_dict(), checkpoint_id=os.path.join(out, "ckpt"))
                if rank == 0:
                    with open(os.path.join(out, "ckpt", "store.json"), "w") as f:
                        json.dump(state, f)
            time.sleep(0.02)
    if rank == 0:
        np.savez(os.path.join(out, f"final-{mode}.npz"), **full(model))
    else:
        full(model)  # a collective: every rank takes part
    if mode == "record":  # unlearn into every rank's own shards
        report = unlearn.amnesiac(model, store, FORGET, ledger=False, purge=False)
        weights = full(model)
        if rank == 0:
            np.savez(os.path.join(out, "unlearned-fsdp.npz"), **weights)
            print(report)
    store.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
