"""The GPU paths: sync-free recording, GPU top-k, unlearning on the device.

Everything that needs CUDA skips cleanly without it; the writer's side of the hand-over (it
waits for the rows' copy event before reading them) is tested on the CPU with a fake event.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import unlearn
from updatestore import UpdateStore
from updatestore._pruning import device_select
from updatestore._writer import _wait

def cuda(test):
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


class _LateEvent:
    """Completes on its ``n``-th query, and only then fills the rows it guards (a late copy)."""

    def __init__(self, n: int, fill) -> None:
        self.n, self.fill, self.queries = n, fill, 0

    def query(self) -> bool:
        self.queries += 1
        if self.queries == self.n:
            self.fill()
        return self.queries >= self.n


def test_writer_waits_for_the_copy_event_before_reading_rows(tmp_path):
    from updatestore._format import STATUS_RECORDED
    from updatestore._writer import StepRecord

    model = nn.Linear(8, 4)
    store = UpdateStore.create(tmp_path / "s.zarr", model, keep=1.0)
    rec = store.recorder(model).attach()
    rows = [(torch.zeros(32), None), (torch.zeros(4), None)]  # "pinned buffers" the copy has not reached yet
    truth = [torch.arange(1.0, 33.0), torch.arange(1.0, 5.0)]
    event = _LateEvent(5, lambda: [v.copy_(t) for (v, _), t in zip(rows, truth)])
    rec._emit(StepRecord(STATUS_RECORDED, np.arange(2, dtype=np.int64), rows, event))
    rec.detach()
    got = store.read([0])
    assert event.queries >= 5
    assert torch.equal(got["weight"].values[0], truth[0]) and torch.equal(got["bias"].values[0], truth[1])


def test_wait_accepts_no_event():
    _wait(None)


@pytest.mark.parametrize("method", ["topk", "sort"])
def test_device_select_matches_a_full_sort(method):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10_000, generator=g)
    k = 1234
    want = torch.sort(torch.argsort(x.abs(), descending=True)[:k]).values
    assert torch.equal(device_select(x, k, method), want)
    with pytest.raises(ValueError, match="method"):
        device_select(x, k, "bogus")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))


@cuda
@pytest.mark.parametrize("keep", [1.0, 0.3])
def test_gpu_recording_is_sync_free_and_matches_dense_deltas(tmp_path, keep):
    dev = torch.device("cuda")
    model = _mlp().to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    store = UpdateStore.create(tmp_path / "g.zarr", model, keep=keep)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(32, 64, generator=g).to(dev), torch.randint(0, 10, (32,), generator=g).to(dev))
               for _ in range(6)]
    ids = [np.arange(32) + 32 * i for i in range(6)]
    oracle = []  # the oracle: dense Δθ of the same steps, device copies (no host synchronisation)
    rec = store.recorder(model, opt).attach()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation in the steps below raises
    try:
        for (x, y), i in zip(batches, ids):
            before = [p.detach().clone() for p in model.parameters()]
            with rec.batch(i):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
            oracle.append([(p.detach() - b).reshape(-1) for p, b in zip(model.parameters(), before)])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    rec.detach()
    ks = {s.name: s.k for s in store.layers}
    names = [n for n, _ in model.named_parameters()]
    for s, deltas in enumerate(oracle):
        rows = store.read([s])
        for name, d in zip(names, deltas):
            d = d.cpu()
            r = rows[name]
            dense = torch.zeros(r.numel)
            r.sum(dense)
            want = torch.zeros_like(d)
            top = torch.topk(d.abs(), ks[name]).indices
            want[top] = d[top]
            torch.testing.assert_close(dense, want, rtol=0, atol=0)


@cuda
def test_gpu_unlearning_equals_cpu_unlearning(tmp_path):
    dev = torch.device("cuda")
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    store = UpdateStore.create(tmp_path / "u.zarr", model, keep=0.2)
    g = torch.Generator().manual_seed(2)
    with store.recorder(model, opt) as rec:
        for i in range(12):
            x, y = torch.randn(16, 64, generator=g), torch.randint(0, 10, (16,), generator=g)
            with rec.batch(np.arange(16) + 16 * i):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    forget = np.arange(16, 80)
    on_cpu = _mlp()
    on_cpu.load_state_dict(state)
    unlearn.amnesiac(on_cpu, store, forget, device="cpu", ledger=False, purge=False)
    on_gpu = _mlp().to(dev)
    on_gpu.load_state_dict(state)
    unlearn.amnesiac(on_gpu, store, forget, device=dev, ledger=False, purge=False)
    for (n, a), (_, b) in zip(on_cpu.named_parameters(), on_gpu.named_parameters()):
        torch.testing.assert_close(b.detach().cpu(), a.detach(), rtol=1e-6, atol=1e-7, msg=n)
