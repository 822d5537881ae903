"""Shared fixtures: tiny models and a training loop that also keeps the dense Δθ oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

# fixtures/ holds stores and the script that wrote them with an older release: data, not tests.
collect_ignore = ["fixtures"]


class Tiny(nn.Module):
    def __init__(self, d_in: int = 12, hidden: int = 40, d_out: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def make_tiny(seed: int = 0, **kw) -> Tiny:
    torch.manual_seed(seed)
    return Tiny(**kw)


def train(store, model, *, steps=20, batch=8, lr=0.1, seed=0, ids_fn=None, momentum=0.0, watch=None):
    """Train ``model`` with ``store`` attached; return per-step dense Δθ and IDs (the oracle)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    d_in = model.fc1.in_features
    oracle, all_ids = [], []
    with store.recorder(model, opt, watch=watch) as rec:
        for s in range(steps):
            x = torch.randn(batch, d_in, generator=g)
            y = torch.randint(0, model.fc2.out_features, (batch,), generator=g)
            ids = ids_fn(s) if ids_fn else np.arange(s * batch, (s + 1) * batch)
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            with rec.batch(ids):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
            oracle.append({n: (p.detach() - before[n]) for n, p in model.named_parameters()})
            all_ids.append(np.asarray(ids))
    return oracle, all_ids


def tiny_step(rec, model, opt, ids):
    """One recorded optimizer step of a ``Tiny`` model on random inputs, for batch ``ids``."""
    with rec.batch(ids):
        opt.zero_grad()
        model(torch.randn(2, model.fc1.in_features)).sum().backward()
        opt.step()


def read_rows(store, layer, start, stop):
    """``(values, positions)`` of steps ``start..stop-1`` of one layer, through the public ``store.read``."""
    rows = store.read(np.arange(start, stop), [layer])[layer]
    return rows.values, rows.positions


def file_bytes(directory):
    """Every file under ``directory`` and its bytes: compare two of these to prove nothing changed."""
    from pathlib import Path

    root = Path(directory)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def steps_with(all_ids, forget):
    """Oracle: the steps whose IDs include any of ``forget`` (brute force)."""
    return [s for s, ids in enumerate(all_ids) if np.isin(ids, forget).any()]


def oracle_after(model, oracle, steps, keep):
    """Oracle: the model's parameters minus the top-k (k = ceil(keep × numel), ≥ 1) of each
    dense Δθ captured by ``train`` for ``steps``, computed with torch.topk independently
    of the library."""
    out = {n: p.detach().clone() for n, p in model.named_parameters()}
    for s in steps:
        for name, d in oracle[s].items():
            flat = d.flatten()
            k = max(1, int(np.ceil(round(keep * flat.numel(), 9))))
            kept = torch.zeros_like(flat)
            idx = flat.abs().topk(k).indices
            kept[idx] = flat[idx]
            out[name] -= kept.view_as(d)
    return out


@pytest.fixture
def tiny():
    return make_tiny()


@pytest.fixture
def persist_small(monkeypatch):
    """Closes write the sorted index however few IDs it holds (the tests' stores are far below the
    threshold), so that tests of the persisted cache have one to check."""
    import updatestore._index

    monkeypatch.setattr(updatestore._index, "PERSIST_MIN_SAMPLES", 0)


@pytest.fixture
def store_path(tmp_path):
    return tmp_path / "run.zarr"


def spawn_ranks(script, args_of, world=2, timeout=240):
    """Run ``script`` as ``world`` processes (``args_of(rank)`` its arguments, strings); returns their
    ``(returncode, stdout, stderr)`` once all have exited."""
    import subprocess
    import sys

    procs = [subprocess.Popen([sys.executable, str(script), *args_of(r)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(world)]
    outs = [p.communicate(timeout=timeout) for p in procs]
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


def torchrun(example, *args, timeout=300):
    """``python -m torch.distributed.run --standalone --nproc_per_node=2 example args``, completed."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(example), *map(str, args)], capture_output=True, text=True, timeout=timeout)
