"""Deletion-aware batching: steps hit when an owner asks to be forgotten, and accuracy,
with plain shuffled batches vs ``OwnerBatchSampler`` (bundled digits, synthetic owners
of 5–20 samples each).

Run: ``python -m benchmarks.batching [--quick]``
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

import unlearn
from unlearn.data import load_digits
from unlearn.models import DigitsCNN
from updatestore import OwnerBatchSampler, UpdateStore

from ._common import parser, machine, md_table, pyplot, write_results


def synthetic_owners(n: int, rng: np.random.Generator, low: int = 5, high: int = 20) -> np.ndarray:
    """Owner key per sample: consecutive random-sized groups of a shuffled order."""
    sizes = []
    while sum(sizes) < n:
        sizes.append(int(rng.integers(low, high + 1)))
    keys = np.repeat(np.arange(len(sizes)), sizes)[:n]
    out = np.empty(n, dtype=np.int64)
    out[rng.permutation(n)] = keys
    return out


def run(mode: str, seed: int, epochs: int, batch: int, tmp: Path) -> dict:
    data = load_digits(seed=seed)
    rng = np.random.default_rng(seed)
    ids = data.train.tensors[2].numpy()
    owners = synthetic_owners(len(ids), rng)
    torch.manual_seed(seed)
    model = DigitsCNN()
    store = UpdateStore.create(tmp / f"{mode}-{seed}.zarr", model, keep=0.1)
    store.index_owners(ids, owners)
    if mode == "owner-packed":
        loader = torch.utils.data.DataLoader(data.train, batch_sampler=OwnerBatchSampler(owners, batch, seed=seed))
    else:
        g = torch.Generator().manual_seed(seed)
        loader = torch.utils.data.DataLoader(data.train, batch_size=batch, shuffle=True, generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    t0 = time.perf_counter()
    with store.recorder(model, opt) as rec:
        for _ in range(epochs):
            for x, y, sid in loader:
                with rec.batch(sid):
                    opt.zero_grad()
                    F.cross_entropy(model(x), y).backward()
                    opt.step()
    secs = time.perf_counter() - t0
    hits = np.array([store.batches_containing(owners=[o]).size for o in np.unique(owners)])
    out = {"mode": mode, "seed": seed, "steps": store.num_batches, "owners": int(len(hits)),
           "steps_hit_mean": float(hits.mean()), "steps_hit_median": float(np.median(hits)),
           "share_hit_mean": float(hits.mean() / store.num_batches),
           "test_accuracy": unlearn.accuracy(model, data.test), "train_seconds": secs}
    store.close()
    return out


def _plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()

    modes = ["shuffled", "owner-packed"]
    fig, axes = plt.subplots(1, 2, figsize=(7.5, 3.4))
    for ax, key, label in ((axes[0], "steps_hit_mean", "steps hit per owner deletion"),
                           (axes[1], "test_accuracy", "test accuracy")):
        vals = [[r[key] for r in rows if r["mode"] == m] for m in modes]
        ax.bar(modes, [np.mean(v) for v in vals], yerr=[np.std(v) for v in vals], color=["tab:gray", "tab:green"])
        ax.set_title(label)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = parser("batching", __doc__, "one seed, fewer epochs (≤ 2 minutes on 2 CPU cores)")
    args = ap.parse_args(argv)
    seeds = 1 if args.quick else 3
    epochs = 4 if args.quick else 10
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-batching-") as tmp:
        for seed in range(seeds):
            for mode in ("shuffled", "owner-packed"):
                rows.append(run(mode, seed, epochs, 64, Path(tmp)))
                print(f"{mode} seed {seed}: {rows[-1]['steps_hit_mean']:.1f} steps hit", file=sys.stderr)

    def agg(mode: str, key: str) -> tuple[float, float]:
        vals = [r[key] for r in rows if r["mode"] == mode]
        return float(np.mean(vals)), float(np.std(vals))

    table = []
    for mode in ("shuffled", "owner-packed"):
        hm, hs = agg(mode, "steps_hit_mean")
        am, as_ = agg(mode, "test_accuracy")
        sm, _ = agg(mode, "steps")
        table.append([mode, f"{sm:.0f}", f"{hm:.1f} ± {hs:.1f}", f"{hm / sm:.1%}", f"{am:.3f} ± {as_:.3f}"])
    fewer = agg("shuffled", "steps_hit_mean")[0] / agg("owner-packed", "steps_hit_mean")[0]
    change = agg("owner-packed", "test_accuracy")[0] - agg("shuffled", "test_accuracy")[0]
    cmd = "python -m benchmarks.batching" + (" --quick" if args.quick else "")
    md = (f"# Deletion-aware batching ({'quick' if args.quick else 'full'} run)\n\nCommand: `{cmd}`; bundled digits, "
          f"synthetic owners of 5–20 samples, DigitsCNN, batch 64, {epochs} epochs, {seeds} seed(s); "
          f"machine: {machine()}\n\n"
          + md_table(["batching", "steps", "steps hit per owner deletion", "share of steps", "test accuracy"], table)
          + f"\nOwner packing: **{fewer:.1f}× fewer steps hit** per owner deletion; test accuracy "
          f"**{100 * change:+.2f} points** (packed − shuffled).\n")
    md += "\n![batching](batching.png)\n"
    args.out.mkdir(parents=True, exist_ok=True)
    _plot(rows, args.out / "batching.png")
    print(md)
    write_results("batching", {"machine": machine(), "quick": args.quick, "rows": rows,
                               "fewer_steps_factor": fewer, "accuracy_change_points": 100 * change}, md, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
