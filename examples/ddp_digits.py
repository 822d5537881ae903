"""Record a DistributedDataParallel run into an update store, then forget samples.

Run on CPU with two processes:  torchrun --standalone --nproc_per_node=2 examples/ddp_digits.py [STORE]
Every rank calls UpdateStore.create and store.recorder (collective); rank 0 prunes and writes
the updates (Δθ is the same on every rank), every rank's batch IDs are gathered into each step.
"""

import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

import unlearn
from unlearn.data import load_digits
from unlearn.models import DigitsCNN
from updatestore import UpdateStore

path = sys.argv[1] if len(sys.argv) > 1 else "ddp-digits.zarr"
dist.init_process_group("gloo")  # "nccl" on GPUs
rank = dist.get_rank()
torch.manual_seed(0)
data = load_digits()
model = DigitsCNN()
ddp = DDP(model)
opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
sampler = DistributedSampler(data.train, shuffle=True, seed=0)
loader = DataLoader(data.train, batch_size=16, sampler=sampler)

store = UpdateStore.create(path, model, keep=0.1, overwrite=True)  # rank 0 creates, the others open it
with store.recorder(model, opt) as rec:
    for epoch in range(3):
        sampler.set_epoch(epoch)
        for x, y, ids in loader:
            with rec.batch(ids):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(ddp(x), y).backward()
                opt.step()

if rank == 0:
    print(f"{store.num_batches} steps recorded, {store.num_samples} sample IDs indexed (both ranks)")
    print(store.footprint())
    forget = data.train.tensors[2][:3].tolist()
    print(unlearn.amnesiac(model, store, forget))
store.close()
dist.destroy_process_group()
