"""Record an FSDP2 run into a sharded update store (every rank writes its own shard of each
update), checkpoint it, then forget samples on every rank.

Run on CPU with two processes:  torchrun --standalone --nproc_per_node=2 examples/fsdp_digits.py [STORE]
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

import unlearn
from unlearn.data import load_digits
from unlearn.models import DigitsCNN
from updatestore import UpdateStore

path = Path(sys.argv[1] if len(sys.argv) > 1 else "fsdp-digits.zarr")
dist.init_process_group("gloo")  # "nccl" on GPUs (and init_device_mesh("cuda", ...))
rank = dist.get_rank()
torch.manual_seed(0)
data = load_digits()
model = DigitsCNN()
fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))  # parameters become DTensor shards
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
sampler = DistributedSampler(data.train, shuffle=True, seed=0)
loader = DataLoader(data.train, batch_size=16, sampler=sampler)

store = UpdateStore.create(path, model, keep=0.1, overwrite=True)  # every rank: rank 0 creates, all open
with store.recorder(model, opt) as rec:  # every rank prunes and writes its own shard of each step
    for epoch in range(2):
        sampler.set_epoch(epoch)
        for x, y, ids in loader:
            with rec.batch(ids):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
        # A sharded checkpoint: rec.state_dict() commits every rank's parts first (the same dict on
        # every rank); save it beside the model's shards, and pass it as resume= after a crash.
        state = rec.state_dict()
        checkpoint = path.with_suffix(f".ckpt{epoch}")
        dcp.save({"model": model.state_dict()}, checkpoint_id=checkpoint)
        if rank == 0:
            (checkpoint / "store.json").write_text(json.dumps(state))

if rank == 0:
    print(f"{store.num_batches} steps recorded by {dist.get_world_size()} ranks, "
          f"{store.num_samples} sample IDs indexed; {len(store.parts)} parts for {len(store.layers)} parameters")
forget = data.train.tensors[2][:3].tolist()
report = unlearn.amnesiac(model, store, forget, defer=True)  # every rank subtracts from its own shards
dcp.save({"model": model.state_dict()}, checkpoint_id=path.with_suffix(".unlearned"))  # save first...
report.commit()  # ...then rank 0 writes the audit entry and purges the subtracted rows
if rank == 0:
    print(report)
store.close()
dist.destroy_process_group()
