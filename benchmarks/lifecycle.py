"""Lifecycle costs: the loss window's write amplification and recording overhead, fsync, checkpoints.

For each model, the same training run is recorded with the writer committing only full
blocks (``commit_seconds=None``, 0.1's behaviour), and with the default 5 s loss window
(and a 1 s one). Write amplification = bytes written to the store ÷ bytes it holds at the
end; overhead = training time with the store ÷ without. Medians of the repeats.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader

from unlearn.data import load_digits
from unlearn.models import DigitsCNN, WideCNN
from updatestore import UpdateStore

from ._common import machine, md_table, parser, synthetic_images, write_results


def _run(make, data, tmp: Path, window, *, steps: int, batch: int, lr: float, checkpoint_every: int | None = None,
         fsync: bool = False):
    torch.manual_seed(0)
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loader = DataLoader(data, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(0))
    store = None if window == "none" else UpdateStore.create(tmp / f"s-{time.monotonic_ns()}", model, keep=0.1)
    rec = (store.recorder(model, opt, commit_seconds=None if window == "blocks" else window, fsync=fsync).attach()
           if store else None)
    done, ckpt_s = 0, 0.0
    t0 = time.perf_counter()
    while done < steps:
        for x, y, ids in loader:
            if rec is not None:
                with rec.batch(ids):
                    opt.zero_grad(set_to_none=True)
                    F.cross_entropy(model(x), y).backward()
                    opt.step()
                if checkpoint_every and (done + 1) % checkpoint_every == 0:
                    c0 = time.perf_counter()
                    rec.state_dict()
                    ckpt_s += time.perf_counter() - c0
            else:
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                opt.step()
            done += 1
            if done == steps:
                break
    if rec is not None:
        rec.detach()
    secs = time.perf_counter() - t0
    if store is None:
        return {"seconds": secs}
    stored = store.footprint().total_bytes
    out = {"seconds": secs, "written": store.bytes_written, "stored": stored,
           "amplification": store.bytes_written / stored, "checkpoint_s": ckpt_s}
    store.close()
    return out


def _purge_fsync_cost(tmp: Path, repeats: int) -> dict[str, float]:
    """Median seconds of one unlearning with ledger and purge (5 samples, digits CNN) with the store
    opened ``fsync=False`` and ``fsync=True`` (each on a fresh copy of the same store)."""
    import shutil

    import unlearn

    data = load_digits().train
    model = DigitsCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    src = tmp / "purge-src"
    with UpdateStore.create(src, model, keep=0.1) as store, store.recorder(model, opt) as rec:
        for x, y, ids in DataLoader(data, batch_size=32):
            with rec.batch(ids):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                opt.step()
    forget = data.tensors[2][:5].tolist()
    times: dict[bool, list[float]] = {False: [], True: []}
    for i in range(repeats):
        for fsync in (False, True):
            work = tmp / f"purge-{i}-{fsync}"
            shutil.copytree(src, work)
            m = DigitsCNN()
            m.load_state_dict(model.state_dict())
            with UpdateStore.open(work, "r+", fsync=fsync) as store:
                t0 = time.perf_counter()
                unlearn.amnesiac(m, store, forget, device="cpu")
                times[fsync].append(time.perf_counter() - t0)
    return {"off_s": statistics.median(times[False]), "on_s": statistics.median(times[True])}


def main(argv: list[str] | None = None) -> int:
    args = parser("lifecycle", __doc__, "fewer steps and repeats (≤ 2 minutes on 2 CPU cores)").parse_args(argv)
    q = args.quick
    repeats = 1 if q else 3
    cases = [("digits CNN (38k)", DigitsCNN, load_digits().train, 120 if q else 400, 32, 0.05),
             ("11M-parameter CNN", WideCNN, synthetic_images(256), 8 if q else 40, 32, 0.01)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-lifecycle-") as t:
        tmp = Path(t)
        for name, make, data, steps, batch, lr in cases:
            per: dict[str, list[dict]] = {}
            for _ in range(repeats):  # interleaved, so that machine noise hits every setting alike
                for window in ("none", "blocks", 5.0, 1.0, "1.0+fsync"):
                    fsync = window == "1.0+fsync"
                    per.setdefault(str(window), []).append(_run(make, data, tmp, 1.0 if fsync else window, steps=steps,
                                                               batch=batch, lr=lr, fsync=fsync))
            ck = _run(make, data, tmp, 5.0, steps=steps, batch=batch, lr=lr, checkpoint_every=max(1, steps // 4))
            base = statistics.median(r["seconds"] for r in per["none"])
            for window in ("blocks", "5.0", "1.0", "1.0+fsync"):
                runs = per[window]
                rows.append({"model": name, "steps": steps, "commit": "full blocks only (0.1)" if window == "blocks"
                             else f"every {window.replace('+fsync', '')} s" + (", fsync" if "fsync" in window else ""), "throughput": base / statistics.median(r["seconds"] for r in runs),
                             "amplification": statistics.median(r["amplification"] for r in runs),
                             "written_mib": statistics.median(r["written"] for r in runs) / 2**20,
                             "stored_mib": runs[0]["stored"] / 2**20})
            rows[-1]["checkpoint_ms"] = 1000 * ck["checkpoint_s"] / 4
        purge = _purge_fsync_cost(tmp, repeats)
    md = (f"# Lifecycle ({'quick' if q else 'full'} run)\n\nCommand: `python -m benchmarks.lifecycle"
          f"{' --quick' if q else ''}`; machine: {machine()}; keep 0.1 bfloat16; medians of {repeats}.\n\n"
          + md_table(["model", "steps", "commit", "throughput vs no store", "write amplification", "written",
                      "stored"],
                     [[r["model"], r["steps"], r["commit"], f"{r['throughput']:.2f}x", f"{r['amplification']:.2f}",
                       f"{r['written_mib']:.1f} MiB", f"{r['stored_mib']:.1f} MiB"] for r in rows])
          + "\nCheckpoint (`rec.state_dict()`: flush + weights fingerprint), mean per call: "
          + ", ".join(f"{r['model']}: {r['checkpoint_ms']:.0f} ms" for r in rows if "checkpoint_ms" in r) + "\n"
          + f"\nUnlearning 5 samples with ledger entry and purge (digits CNN, 1 epoch): {purge['off_s']:.3f} s with "
            f"the store opened fsync=False, {purge['on_s']:.3f} s with fsync=True (every record fsynced after "
            "what it vouches for).\n")
    print(md)
    write_results("lifecycle", {"machine": machine(), "quick": q, "rows": rows, "purge_fsync": purge}, md, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
