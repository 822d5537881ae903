"""Scale: open time, query latency and append throughput as a store grows to 1M steps
and 10M indexed samples (synthetic updates of a tiny model, 10 sample IDs per step).

Run: ``python -m benchmarks.scale [--quick]``
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from updatestore import UpdateStore

from ._common import parser, machine, md_table, pyplot, write_results

IDS_PER_STEP = 10
PROBE_STEPS = 2000


def _append(store: UpdateStore, model: torch.nn.Module, start: int, count: int) -> float:
    """Record ``count`` steps through the normal recorder; returns steps per second."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    with store.recorder(model) as rec:
        base = np.arange(IDS_PER_STEP, dtype=np.int64)
        for s in tqdm(range(start, start + count), desc="appending", unit="step", leave=False,
                      disable=not sys.stderr.isatty()):
            with torch.no_grad():
                model.weight.add_(1e-3 * ((s % 7) - 3))
            rec.step(base + IDS_PER_STEP * s)
    return count / (time.perf_counter() - t0)


def _plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()

    steps = [r["steps"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(steps, [1000 * r["open_s"] for r in rows], "o-", label="open (ms)")
    ax.plot(steps, [r["query_10k_ms"] for r in rows], "s-", label="10k-ID query (ms)")
    ax.plot(steps, [1000 * r["first_query_s"] for r in rows], "^-", label="first query after open (ms)")
    ax.plot(steps, [1000 / r["append_steps_per_s"] for r in rows], "d-", label="append (ms per step)")
    ax.set(xscale="log", yscale="log", xlabel="steps in the store", title="Cost as the store grows")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = parser("scale", __doc__, "up to 20k steps (≤ 2 minutes on 2 CPU cores)")
    args = ap.parse_args(argv)
    sizes = [2_000, 10_000, 20_000] if args.quick else [10_000, 100_000, 1_000_000]
    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        path = Path(tmp) / "scale.zarr"
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        UpdateStore.create(path, model, keep=0.5).close()
        n = 0
        for size in sizes:
            with UpdateStore.open(path, "r+") as store:
                bulk = _append(store, model, n, size - n - PROBE_STEPS) if size - n > PROBE_STEPS else None
                n = store.num_batches
            with UpdateStore.open(path, "r+") as store:  # append throughput at this size, same probe each time
                probe = _append(store, model, n, PROBE_STEPS)
                n = store.num_batches
            t0 = time.perf_counter()
            store = UpdateStore.open(path)
            open_s = time.perf_counter() - t0
            q = rng.choice(n * IDS_PER_STEP, size=10_000, replace=False)
            t0 = time.perf_counter()
            store.batches_containing(q[:100])
            first_s = time.perf_counter() - t0
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                found = store.batches_containing(q)
                times.append(time.perf_counter() - t0)
            assert len(found) == len(np.unique(q // IDS_PER_STEP))
            rows.append({"steps": n, "samples": store.num_samples, "open_s": open_s, "first_query_s": first_s,
                         "query_10k_ms": 1000 * float(np.median(times)), "append_steps_per_s": probe,
                         "bulk_steps_per_s": bulk, "bytes": store.footprint().total_bytes})
            print(f"{n} steps: {rows[-1]}", file=sys.stderr)
    cmd = "python -m benchmarks.scale" + (" --quick" if args.quick else "")
    md = (f"# Scale ({'quick' if args.quick else 'full'} run)\n\nCommand: `{cmd}`; a 10-parameter model, "
          f"{IDS_PER_STEP} sample IDs per step; machine: {machine()}\n\n"
          + md_table(["steps", "samples indexed", "open", "first query (reads the index)", "10k-ID query",
                      f"append ({PROBE_STEPS} steps)", "store size"],
                     [[f"{r['steps']:,}", f"{r['samples']:,}", f"{1000 * r['open_s']:.1f} ms",
                       f"{r['first_query_s']:.2f} s", f"{r['query_10k_ms']:.1f} ms",
                       f"{r['append_steps_per_s']:,.0f} steps/s", f"{r['bytes'] / 2**20:.2f} MiB"] for r in rows]))
    md += "\n![scale](scale.png)\n"
    args.out.mkdir(parents=True, exist_ok=True)
    _plot(rows, args.out / "scale.png")
    print(md)
    write_results("scale", {"machine": machine(), "quick": args.quick, "rows": rows}, md, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
