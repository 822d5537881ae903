"""Speed: training throughput, unlearning time, peak memory, query latency — each as a
ratio measured side by side in this run (absolute times only as context).

Run: ``python -m benchmarks.speed [--quick]``; ``python -m benchmarks.speed --transformer`` runs only
the realistic-size case (a 29.5M-parameter GPT, 100 steps against a ≥ 10 GB full log; ≈ 10 minutes on
2 CPU cores, not in CI) and writes ``transformer.md``.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch.nn import functional as F

import unlearn
from unlearn.data import load_digits
from unlearn.models import DigitsCNN, WideCNN
from updatestore import UpdateStore
# The query micro-benchmark times the index component alone (scale.py times it through the store).
from updatestore._index import SampleIndex

from .recording import NOTE, STEPS, recording_overhead, recording_table
from ._common import parser, FullLog, machine, md_table, pyplot, synthetic_images, write_results


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every millisecond (Linux)."""

    def __enter__(self) -> "PeakRSS":
        self._page = 4096
        self.base = self._rss()
        self.peak = self.base
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _run(self) -> None:
        while not self._stop:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self._stop = True
        self._t.join()
        self.peak = max(self.peak, self._rss())

    @property
    def delta(self) -> int:
        return self.peak - self.base


def wide_mlp() -> torch.nn.Module:
    """A 4.3M-parameter MLP on the 8×8 digits: big enough that reading dense Δθ costs something."""
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 2048), torch.nn.ReLU(),
                               torch.nn.Linear(2048, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 10))


def _train(mode: str, data, tmp: Path, *, epochs: int, batch: int, unique_ids: bool = False,
           make=DigitsCNN, max_steps: int | None = None, codec: str = "zstd"):
    """One training run: mode is 'none', 'full' (safetensors per step) or 'store'. Returns (seconds, handle, model)."""
    torch.manual_seed(0)
    model = make()
    g = torch.Generator().manual_seed(0)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    handle = None
    rec = None
    if mode == "full":
        handle = FullLog(tmp / f"full-{time.monotonic_ns()}", model)
    elif mode == "store":
        handle = UpdateStore.create(tmp / f"store-{time.monotonic_ns()}.zarr", model, keep=0.1, codec=codec)
        rec = handle.recorder(model, opt).attach()
    step = 0
    t0 = time.perf_counter()
    for _ in range(epochs):
        for x, y, ids in loader:
            if unique_ids:  # one ID per (step, slot): a request for a step's IDs hits exactly that step
                ids = torch.arange(step * batch, step * batch + len(ids))
            if rec is not None:
                with rec.batch(ids):
                    opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()
            else:
                if mode == "full":
                    handle.snapshot()
                opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()
                if mode == "full":
                    handle.record()
            step += 1
            if max_steps and step >= max_steps:
                break
    if rec is not None:
        rec.detach()
    return time.perf_counter() - t0, handle, model


def throughput(data, tmp: Path, repeats: int, epochs: int, make=DigitsCNN, max_steps: int | None = None) -> dict:
    kw = dict(epochs=epochs, batch=32, make=make, max_steps=max_steps)
    _train("none", data, tmp, **kw)  # warm-up: thread pools, allocator, page cache
    times = {"none": [], "full": [], "store": []}
    for _ in range(repeats):  # interleaved, so drift on a noisy machine hits all three alike
        for mode in times:
            times[mode].append(_train(mode, data, tmp, **kw)[0])
    med = {m: statistics.median(v) for m, v in times.items()}
    return {"seconds_median": med, "all": times,
            "store_vs_none": med["none"] / med["store"], "full_vs_none": med["none"] / med["full"],
            "store_vs_full": med["full"] / med["store"]}


def evict(path: Path) -> None:
    """Drop a directory's files from the OS page cache, so the next read comes from disk.

    A real full log (175 GB for ResNet-18 × 10 epochs) does not fit in memory;
    without this the baseline would be read from RAM.
    """
    for f in Path(path).rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _full_log_unlearn(model, log_dir: Path, steps: np.ndarray) -> None:
    """The baseline: load each hit step's dense Δθ file and subtract it."""
    params = dict(model.named_parameters())
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    for s in steps:
        for n, d in load_file(str(log_dir / f"step_{s:08d}.safetensors")).items():
            acc[n] += d
    with torch.no_grad():
        for n, p in params.items():
            p.sub_(acc[n])


def unlearning(data, tmp: Path, hits: list[int], epochs: int, repeats: int, make=DigitsCNN,
               max_steps: int | None = None) -> tuple[list[dict], dict]:
    kw = dict(epochs=epochs, batch=8, unique_ids=True, make=make, max_steps=max_steps)
    secs_store, store, model = _train("store", data, tmp, **kw)
    secs_full, full, _ = _train("full", data, tmp, **kw)
    secs_retrain = _train("none", data, tmp, **kw)[0]  # retraining from scratch, no logging
    n = store.num_batches
    rng = np.random.default_rng(0)
    rows = []
    for h in [h for h in hits if h <= n]:
        steps = np.sort(rng.choice(n, size=h, replace=False))
        ids = store.samples_in_steps(steps)
        t_store, t_full, m_store, m_full, c_store, c_full = [], [], [], [], [], []
        for _ in range(repeats):
            for cold in (False, True):
                if cold:
                    evict(store.path), evict(full.dir)
                m = make(); m.load_state_dict(model.state_dict())
                with PeakRSS() as mem:
                    t0 = time.perf_counter()
                    rep = unlearn.amnesiac(m, store, ids, ledger=False, purge=False)  # the store is reused
                    (c_store if cold else t_store).append(time.perf_counter() - t0)
                m_store.append(mem.delta)
                assert len(rep.steps_hit) == h
                m = make(); m.load_state_dict(model.state_dict())
                with PeakRSS() as mem:
                    t0 = time.perf_counter()
                    _full_log_unlearn(m, full.dir, steps)
                    (c_full if cold else t_full).append(time.perf_counter() - t0)
                m_full.append(mem.delta)
        ts, tf = statistics.median(t_store), statistics.median(t_full)
        cs, cf = statistics.median(c_store), statistics.median(c_full)
        rows.append({"cold_store_s": cs, "cold_full_log_s": cf, "cold_speedup_vs_full": cf / cs,
                     "store_bytes_read": rep.bytes_read,"model": make.__name__, "params": sum(p.numel() for p in model.parameters()), "steps_hit": h, "store_s": ts, "full_log_s": tf, "retrain_s": secs_full,
                     "store_speedup_vs_full": tf / ts, "store_speedup_vs_retrain": secs_retrain / ts,
                     "store_peak_rss_mib": max(m_store) / 2**20, "full_peak_rss_mib": max(m_full) / 2**20})
        print(f"  unlearn {h} steps: store {ts:.3f}s, full log {tf:.3f}s; cold cache {cs:.3f}s vs {cf:.3f}s",
              file=sys.stderr)
    ctx = {"model": make.__name__, "steps_recorded": n, "train_with_store_s": secs_store,
           "train_with_full_log_s": secs_full, "retrain_s": secs_retrain}
    return rows, ctx


def recording_memory(data, tmp: Path, epochs: int) -> dict:
    out = {}
    for mode in ("none", "store", "full"):
        with PeakRSS() as mem:
            _train(mode, data, tmp, epochs=epochs, batch=32)
        out[mode] = mem.delta / 2**20
    return out


def query_latency(samples: int, epochs: int, query: int, batch: int = 128) -> dict:
    rng = np.random.default_rng(0)
    ids = np.concatenate([rng.permutation(samples) for _ in range(epochs)]).astype(np.int64) * 7 + 3
    ends = np.arange(batch, len(ids) + batch, batch, dtype=np.int64)
    ends[-1] = len(ids)
    t0 = time.perf_counter()
    index = SampleIndex(ids, ends)
    build = time.perf_counter() - t0
    q = rng.choice(samples, size=query, replace=False).astype(np.int64) * 7 + 3
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        steps = index.batches_containing(q)
        times.append(time.perf_counter() - t0)
    # brute force on a slice, for scale: a Python-free full scan with np.isin
    t0 = time.perf_counter()
    mask = np.isin(ids, q)
    brute = np.unique(np.searchsorted(ends, np.flatnonzero(mask), side="right"))
    scan = time.perf_counter() - t0
    assert np.array_equal(brute, steps)
    return {"indexed": len(ids), "query_ids": query, "steps_found": int(len(steps)),
            "build_s": build, "query_ms_median": 1000 * statistics.median(times), "full_scan_ms": 1000 * scan,
            "speedup_vs_scan": scan / statistics.median(times)}


def _plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for model, color in (("DigitsCNN", "tab:blue"), ("wide_mlp", "tab:orange")):
        rs = [r for r in rows if r["model"] == model]
        if not rs:
            continue
        hits = [r["steps_hit"] for r in rs]
        ax.plot(hits, [r["store_s"] for r in rs], "o-", color=color, label=f"{model}: update store")
        ax.plot(hits, [r["full_log_s"] for r in rs], "s--", color=color, label=f"{model}: full log (warm cache)")
        ax.plot(hits, [r["cold_full_log_s"] for r in rs], "s:", color=color, alpha=0.6,
                label=f"{model}: full log (cold cache)")
    ax.set(xscale="log", yscale="log", xlabel="steps hit by the request", ylabel="seconds",
           title="Amnesiac unlearning time (keep 0.1 bf16 store vs dense full log)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = parser("speed", __doc__, "small run (≤ 2 minutes on 2 CPU cores)")
    ap.add_argument("--transformer", action="store_true",
                    help="run only the 29.5M-parameter GPT case (needs ≈ 13 GB of free disk for its full log)")
    args = ap.parse_args(argv)
    q = args.quick
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.transformer:
        return _transformer_main(args)
    steps, repeats = STEPS[q]
    data = load_digits().train
    with tempfile.TemporaryDirectory(prefix="bench-speed-") as t:
        tmp = Path(t)
        rec = recording_overhead(tmp, steps, repeats)
        tp = throughput(data, tmp, repeats=1 if q else 5, epochs=2 if q else 4)
        print(f"  throughput: {tp['seconds_median']}", file=sys.stderr)
        tp2 = throughput(synthetic_images(256), tmp, repeats=1 if q else 3, epochs=1, make=WideCNN,
                         max_steps=2 if q else 6)
        print(f"  throughput (wide CNN): {tp2['seconds_median']}", file=sys.stderr)
        un, ctx = unlearning(data, tmp, [1, 10, 100] if q else [1, 10, 100, 1000], epochs=1 if q else 6,
                             repeats=1 if q else 2)
        un2, ctx2 = unlearning(data, tmp, [1, 10] if q else [1, 10, 100], epochs=1, repeats=1 if q else 3,
                               make=wide_mlp, max_steps=12 if q else 120)
        mem = recording_memory(data, tmp, epochs=1 if q else 3)
    ql = query_latency(100_000 if q else 1_000_000, 10, 10_000)
    cmd = "python -m benchmarks.speed" + (" --quick" if q else "")
    md = [f"# Speed ({'quick' if q else 'full'} run)\n\nCommand: `{cmd}`; machine: {machine()}\n",
          "## Recording overhead: the targets (CPU; plain training ÷ training with a store, keep 0.1 bf16)\n\n",
          NOTE, "\n",
          recording_table(rec),
          "\n## Training throughput (CPU, batch 32; ratios of median wall times)\n",
          md_table(["model", "mode", "median s", "throughput vs no logging", "vs full log"],
                   [row for name, t in (("DigitsCNN 38k", tp), ("WideCNN 11.0M (32×32)", tp2)) for row in (
                       [name, "no logging", f"{t['seconds_median']['none']:.2f}", "1.00", ""],
                       [name, "full log (safetensors/step)", f"{t['seconds_median']['full']:.2f}",
                        f"{t['full_vs_none']:.2f}", "1.00"],
                       [name, "update store keep 0.1 bf16", f"{t['seconds_median']['store']:.2f}",
                        f"{t['store_vs_none']:.2f}", f"{t['store_vs_full']:.2f}"])]),
          f"\n## Unlearning time (store keep 0.1 bf16 vs full log; batch 8)\n\n"
          f"DigitsCNN: {ctx['steps_recorded']} steps recorded; wide MLP: {ctx2['steps_recorded']} steps.\n\n",
          md_table(["model", "params", "steps hit", "store s", "full log s", "store vs full log",
                    "cold cache: store s", "full log s", "store vs full log", "store MiB read", "vs retraining",
                    "store peak MiB", "full log peak MiB"],
                   [[r["model"], f"{r['params']:,}", r["steps_hit"], f"{r['store_s']:.3f}", f"{r['full_log_s']:.3f}",
                     f"{r['store_speedup_vs_full']:.2f}x", f"{r['cold_store_s']:.3f}", f"{r['cold_full_log_s']:.3f}",
                     f"{r['cold_speedup_vs_full']:.2f}x", f"{r['store_bytes_read'] / 2**20:.1f}",
                     f"{r['store_speedup_vs_retrain']:.0f}x",
                     f"{r['store_peak_rss_mib']:.1f}", f"{r['full_peak_rss_mib']:.1f}"] for r in un + un2]),
          f"\nRetraining from scratch (the same run, no logging): {ctx['retrain_s']:.1f} s "
          f"(DigitsCNN), {ctx2['retrain_s']:.1f} s (wide MLP).\n",
          "\n## Peak memory while training (RSS above start, MiB)\n",
          md_table(["no logging", "update store", "full log"],
                   [[f"{mem['none']:.1f}", f"{mem['store']:.1f}", f"{mem['full']:.1f}"]]),
          f"\n## Query latency\n\n{ql['query_ids']:,} IDs against {ql['indexed']:,} indexed samples "
          f"({ql['indexed'] // 10:,} samples × 10 epochs, batch 128): median {ql['query_ms_median']:.1f} ms "
          f"({ql['speedup_vs_scan']:.0f}x a vectorised full scan of {ql['full_scan_ms']:.0f} ms); "
          f"building the index took {ql['build_s']:.2f} s.\n"]
    md.append("\n![speed](speed.png)\n")
    text = "".join(md)
    args.out.mkdir(parents=True, exist_ok=True)
    _plot(un + un2, args.out / "speed.png")
    print(text)
    write_results("speed", {"machine": machine(), "quick": q, "recording": rec, "throughput": tp, "throughput_wide": tp2, "unlearning": un + un2,
                            "unlearning_context": [ctx, ctx2], "recording_memory_mib": mem, "query": ql}, text, args.out)
    return 0


def _transformer_main(args) -> int:
    from ._transformer import run

    return run(args, evict, _full_log_unlearn)

if __name__ == "__main__":
    raise SystemExit(main())
