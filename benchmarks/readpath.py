"""Unlearning read path: the store against full logs and against the floor, side by side.

Prints each target of the read path next to what this run reached (medians of interleaved
repeats): a 4.3M-parameter MLP (keep 0.1 bf16) against one safetensors file of dense Δθ per
step, cold (page cache evicted) and warm; an MNIST-sized CNN against Graves-style per-step
pickled dense deltas; the floor (bytes ÷ measured sequential read bandwidth, plus
decompressing them and scatter-adding the kept entries in a tight single-thread loop); peak
memory against the number of steps hit; and, with no target, small requests (1 / 3 / 10 steps),
where the full log is the faster.

Run: ``python -m benchmarks.readpath [--quick]``
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from numcodecs import Blosc
from safetensors.torch import load_file, save_file
from torch import nn

import unlearn
from unlearn.data import load_digits
from updatestore import UpdateStore

from ._common import machine, md_table, parser, synthetic_images, write_results
from .speed import PeakRSS, _full_log_unlearn, _train, evict, wide_mlp


def mnist_cnn() -> nn.Module:
    """An MNIST-sized CNN (≈ 102k parameters) for 3×28×28 inputs."""
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(800, 120), nn.ReLU(), nn.Linear(120, 10))


def _pickled_log(model: nn.Module, data, tmp: Path, batch: int) -> Path:
    """Graves et al.'s baseline: every step's dense Δθ pickled to its own file (torch.save)."""
    out = tmp / "pickled"
    out.mkdir()
    torch.manual_seed(0)
    m = mnist_cnn()
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(0))
    for step, (x, y, _) in enumerate(loader):
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        opt.zero_grad(); nn.functional.cross_entropy(m(x), y).backward(); opt.step()
        torch.save({n: p.detach() - before[n] for n, p in m.named_parameters()}, out / f"step_{step:08d}.pt")
    return out


def _pickled_unlearn(model: nn.Module, log_dir: Path, steps: np.ndarray) -> None:
    params = dict(model.named_parameters())
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    for s in steps:
        # the peer's own format, files this run wrote; the library itself never unpickles
        for n, d in torch.load(log_dir / f"step_{s:08d}.pt", weights_only=True).items():  # noqa: pickle-baseline
            acc[n] += d
    with torch.no_grad():
        for n, p in params.items():
            p.sub_(acc[n])


def _fresh(make, state):
    m = make()
    m.load_state_dict(state)
    return m


def _time(fn, cpu: list | None = None) -> float:
    """Wall seconds of ``fn()``; the process's CPU seconds (every thread, user + system) appended to ``cpu``."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    if cpu is not None:
        cpu.append(time.process_time() - c0)
    return wall


def read_bandwidth(tmp: Path, mib: int) -> float:
    """Sequential read bandwidth (bytes/s) of this disk: a fresh file, evicted, read in 8 MiB blocks."""
    f = tmp / "bandwidth.bin"
    block = np.random.default_rng(0).integers(0, 256, 8 << 20, dtype=np.uint8).tobytes()
    with open(f, "wb") as fh:
        for _ in range(mib // 8):
            fh.write(block)
        fh.flush()
        os.fsync(fh.fileno())
    runs = []
    for _ in range(3):
        fd = os.open(f, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # out of the page cache: read from disk
        os.close(fd)
        with open(f, "rb", buffering=0) as fh:
            t0 = time.perf_counter()
            while fh.read(8 << 20):
                pass
            runs.append(time.perf_counter() - t0)
    f.unlink()
    return (mib << 20) / statistics.median(runs)


def compute_floor(store: UpdateStore, steps: np.ndarray) -> float:
    """Decompress every stored chunk the request needs and scatter-add its kept entries, in a tight
    loop on one thread, from bytes already in memory: what any reader of these bytes must do.

    The chunks are read with zarr-python's store API and decoded with numcodecs (not this
    library's reader); positions are decoded beforehand (not timed), so the loop times only
    decompression and the scatter-add itself.
    """
    import zarr
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    root = zarr.open_group(store.path, mode="r")
    blobs = []
    for arr in (root[f"layers/{s.name}/{a}"] for s in store.layers for a in ("values", "positions")
                if a == "values" or s.positions != "dense"):
        shard_rows = arr.metadata.chunk_grid.chunk_shape[0]
        n = shard_rows // arr.metadata.codecs[0].chunk_shape[0]
        for shard in np.unique(steps // shard_rows):
            raw = sync(arr.store.get(f"{arr.path}/c/{shard}/0", default_buffer_prototype())).to_bytes()
            idx = np.frombuffer(raw[-4 - 16 * n:-4], "<u8").reshape(n, 2)
            blobs += [raw[int(o): int(o + m) - 4] for o, m in idx if int(o) != 2**64 - 1]
    rows = [store.read(steps[i: i + 16]) for i in range(0, len(steps), 16)]
    adds = [(torch.zeros(r.numel), r.positions.reshape(-1), r.values.reshape(-1)) for b in rows for r in b.values()]
    codec = Blosc()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            for b in blobs:
                codec.decode(b)
            for acc, pos, val in adds:
                acc.index_add_(0, pos, val)
            runs.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(runs)


def versus_full_log(tmp: Path, steps_recorded: int, hit: int, repeats: int) -> dict:
    data = load_digits().train
    kw = dict(epochs=1, batch=8, unique_ids=True, make=wide_mlp, max_steps=steps_recorded)
    _, store, model = _train("store", data, tmp, **kw)
    _, fast, _ = _train("store", data, tmp, codec="lz4", **kw)  # the same steps, values in lz4
    _, full, _ = _train("full", data, tmp, **kw)
    state = model.state_dict()
    steps = np.sort(np.random.default_rng(0).choice(store.num_batches, size=hit, replace=False))
    ids = store.samples_in_steps(steps)
    t = {f"{w}_{c}": [] for w in ("store", "lz4", "full") for c in ("warm", "cold")}
    cpu = {k: [] for k in t}  # CPU seconds of the same calls: how much of the two cores each one keeps busy
    # The first unlearning in a process also loads the compiled kernels (numba): timed apart.
    first = _time(lambda: unlearn.amnesiac(_fresh(wide_mlp, state), store, ids, ledger=False, purge=False))
    for _ in range(repeats):  # interleaved: drift on a noisy machine hits all six alike
        for cold in (False, True):
            tag = "cold" if cold else "warm"
            for name, s in (("store", store), ("lz4", fast)):
                if cold:
                    evict(s.path), evict(full.dir)
                m = _fresh(wide_mlp, state)
                t[f"{name}_{tag}"].append(_time(lambda: unlearn.amnesiac(m, s, ids, ledger=False, purge=False),
                                                cpu[f"{name}_{tag}"]))
            if cold:
                # The full log's files only: evicting the store here too (as this did before) left its
                # files out of the page cache for the next repeat's *warm* run, which then read them from disk
                # in every repeat but the first (the lz4 store and the full log were warm there, as meant).
                evict(full.dir)
            m = _fresh(wide_mlp, state)
            t[f"full_{tag}"].append(_time(lambda: _full_log_unlearn(m, full.dir, steps), cpu[f"full_{tag}"]))
    small = small_requests(store, full, state, steps, repeats + 2)
    read = unlearn.amnesiac(_fresh(wide_mlp, state), store, ids, ledger=False, purge=False).bytes_read
    read_lz4 = unlearn.amnesiac(_fresh(wide_mlp, state), fast, ids, ledger=False, purge=False).bytes_read
    med = {k: statistics.median(v) for k, v in t.items()}
    full_bytes = sum((full.dir / f"step_{s:08d}.safetensors").stat().st_size for s in steps)
    return {"steps_recorded": store.num_batches, "steps_hit": hit, "seconds": med, "all": t,
            "cpu_seconds": {k: statistics.median(v) for k, v in cpu.items()},
            "store_bytes_read": read, "lz4_bytes_read": read_lz4, "first_call_s": first, "full_bytes_read": full_bytes, "compute_floor_s": compute_floor(store, steps),
            "params": sum(p.numel() for p in model.parameters()), "small_requests": small}


#: Steps hit by the small requests (a few users' samples), measured warm beside the full log.
SMALL_REQUESTS = (1, 3, 10)


def small_requests(store: UpdateStore, full, state: dict, steps: np.ndarray, repeats: int) -> list[dict]:
    """Warm seconds of the first 1 / 3 / 10 of ``steps`` from the store and from the full log (interleaved):
    no target, shown because the full log wins there (the store's per-request passes over every weight,
    the fingerprint among them, cost more than reading a few dense files)."""
    out = []
    for n in SMALL_REQUESTS:
        sub = steps[:n]
        ids = store.samples_in_steps(sub)
        ts, tf = [], []
        for _ in range(repeats):
            m = _fresh(wide_mlp, state)
            ts.append(_time(lambda: unlearn.amnesiac(m, store, ids, ledger=False, purge=False)))
            m = _fresh(wide_mlp, state)
            tf.append(_time(lambda: _full_log_unlearn(m, full.dir, sub)))
        out.append({"steps_hit": n, "store_s": statistics.median(ts), "full_s": statistics.median(tf)})
    return out


def versus_pickled(tmp: Path, samples: int, batch: int, hit: int, repeats: int) -> dict:
    data = synthetic_images(samples, size=28)
    _, store, model = _train("store", data, tmp, epochs=1, batch=batch, unique_ids=True, make=mnist_cnn)
    log = _pickled_log(model, data, tmp, batch)
    state = model.state_dict()
    steps = np.sort(np.random.default_rng(0).choice(store.num_batches, size=min(hit, store.num_batches), replace=False))
    ids = store.samples_in_steps(steps)
    ts, tp = [], []
    unlearn.amnesiac(_fresh(mnist_cnn, state), store, ids, ledger=False, purge=False)  # warm-up
    for _ in range(repeats):
        m = _fresh(mnist_cnn, state)
        ts.append(_time(lambda: unlearn.amnesiac(m, store, ids, ledger=False, purge=False)))
        m = _fresh(mnist_cnn, state)
        tp.append(_time(lambda: _pickled_unlearn(m, log, steps)))
    return {"params": sum(p.numel() for p in model.parameters()), "steps_recorded": store.num_batches,
            "steps_hit": len(steps), "store_s": statistics.median(ts), "pickled_s": statistics.median(tp),
            "all": {"store": ts, "pickled": tp}}


def _peak_child(store_path: str, state_path: str, steps: list[int], out) -> None:
    """In a fresh process: peak RSS above the level before one unlearning of ``steps``
    (kernels already loaded)."""
    store = UpdateStore.open(store_path)
    model = wide_mlp()
    model.load_state_dict(load_file(state_path))
    ids = store.samples_in_steps(np.array(steps))
    # one step first, on a copy: loads the kernels and thread pools, which are not per-request memory
    spare = wide_mlp()
    spare.load_state_dict(model.state_dict())
    unlearn.amnesiac(spare, store, store.samples_in_steps(np.array(steps[:1])), ledger=False, purge=False)
    del spare
    with PeakRSS() as mem:
        rep = unlearn.amnesiac(model, store, ids, ledger=False, purge=False)
    out.put((mem.delta, rep.bytes_read))


def peak_memory(tmp: Path, steps_recorded: int, hits: list[int]) -> list[dict]:
    """Each count of steps hit in its own process (memory a previous run freed would hide a peak)."""
    import multiprocessing as mp

    data = load_digits().train
    _, store, model = _train("store", data, tmp, epochs=2, batch=1, unique_ids=True, make=wide_mlp,
                             max_steps=steps_recorded)
    save_file(model.state_dict(), str(tmp / "state.safetensors"))
    ctx = mp.get_context("spawn")
    out = []
    for h in hits:
        steps = np.sort(np.random.default_rng(1).choice(store.num_batches, size=h, replace=False))
        row = {"steps_hit": h}
        # glibc raises its mmap threshold as large buffers are freed, and then keeps freed blocks
        # resident: RSS creeps up with the number of blocks read. With the threshold fixed (an
        # environment variable of the child) RSS shows what the reader itself holds.
        for tag, env in (("", None), ("_fixed_mmap", "1048576")):
            before = os.environ.get("MALLOC_MMAP_THRESHOLD_")
            if env is not None:
                os.environ["MALLOC_MMAP_THRESHOLD_"] = env
            try:
                q = ctx.Queue()
                p = ctx.Process(target=_peak_child,
                                args=(str(store.path), str(tmp / "state.safetensors"), steps.tolist(), q))
                p.start()
                p.join()
            finally:
                if env is not None:
                    os.environ.pop("MALLOC_MMAP_THRESHOLD_") if before is None else os.environ.update(
                        MALLOC_MMAP_THRESHOLD_=before)
            if p.exitcode != 0:
                raise RuntimeError(f"the peak-memory run for {h} steps failed (exit code {p.exitcode})")
            delta, read = q.get(timeout=10)
            row.update({f"peak_rss_mib{tag}": delta / 2**20, "store_mib_read": read / 2**20})
        out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = parser("readpath", __doc__, "small run (≈ 1 minute on 2 CPU cores)")
    args = ap.parse_args(argv)
    q = args.quick
    with tempfile.TemporaryDirectory(prefix="bench-readpath-") as t:
        tmp = Path(t)
        bw = read_bandwidth(tmp, 64 if q else 512)
        print(f"  sequential read bandwidth {bw / 2**20:.0f} MiB/s", file=sys.stderr)
        a = versus_full_log(tmp / "a", 24 if q else 120, 20 if q else 100, 1 if q else 5)
        print(f"  wide MLP: {a['seconds']}", file=sys.stderr)
        b = versus_pickled(tmp / "b", 1500 if q else 6000, 16, 80 if q else 200, 1 if q else 5)
        print(f"  MNIST CNN: store {b['store_s']:.3f}s pickled {b['pickled_s']:.3f}s", file=sys.stderr)
        mem = peak_memory(tmp / "c", 100 if q else 1100, [10, 100] if q else [10, 100, 1000])
    s, c = a["seconds"], a["cpu_seconds"]
    floor_warm = a["compute_floor_s"]
    floor_cold = a["store_bytes_read"] / bw + floor_warm
    rows = [
        ["wide MLP, cold cache: full log ÷ store", "≥ 10×", f"{s['full_cold'] / s['store_cold']:.1f}×",
         f"store {s['store_cold']:.3f} s (CPU {c['store_cold']:.3f} s), full log {s['full_cold']:.3f} s (CPU {c['full_cold']:.3f} s)"],
        ["wide MLP, warm: full log ÷ store", "≥ 1.5×", f"{s['full_warm'] / s['store_warm']:.2f}×",
         f"store {s['store_warm']:.3f} s (CPU {c['store_warm']:.3f} s), full log {s['full_warm']:.3f} s (CPU {c['full_warm']:.3f} s)"],
        ["the same, `codec=\"lz4\"`: cold / warm", "≥ 10× / ≥ 1.5×",
         f"{s['full_cold'] / s['lz4_cold']:.1f}× / {s['full_warm'] / s['lz4_warm']:.2f}×",
         f"store {s['lz4_cold']:.3f} / {s['lz4_warm']:.3f} s, reads {a['lz4_bytes_read'] / 2**20:.1f} MiB"],
        ["wide MLP, small requests (" + " / ".join(str(r["steps_hit"]) for r in a["small_requests"]) +
         " steps), warm: full log ÷ store", "— (no target)",
         " / ".join(f"{r['full_s'] / r['store_s']:.2f}×" for r in a["small_requests"]),
         "store " + " / ".join(f"{r['store_s'] * 1e3:.0f}" for r in a["small_requests"]) + " ms, full log " +
         " / ".join(f"{r['full_s'] * 1e3:.0f}" for r in a["small_requests"]) + " ms"],
        ["MNIST CNN, warm: pickled deltas ÷ store", "≥ 3×", f"{b['pickled_s'] / b['store_s']:.1f}×",
         f"store {b['store_s']:.3f} s, pickled {b['pickled_s']:.3f} s ({b['steps_hit']} of {b['steps_recorded']} steps)"],
        ["wide MLP, cold: store ÷ floor", "≤ 2×", f"{s['store_cold'] / floor_cold:.2f}×",
         f"floor {floor_cold:.3f} s = {a['store_bytes_read'] / 2**20:.1f} MiB ÷ {bw / 2**20:.0f} MiB/s + {floor_warm:.3f} s"],
        ["wide MLP, warm: store ÷ floor", "≤ 2×", f"{s['store_warm'] / floor_warm:.2f}×",
         f"floor {floor_warm:.3f} s (decompress + scatter-add, one thread)"],
        ["peak memory vs steps hit", "bounded by a block",
         " / ".join(f"{m['peak_rss_mib_fixed_mmap']:.0f}" for m in mem) + " MiB",
         "at " + " / ".join(str(m["steps_hit"]) for m in mem) + " steps, glibc's mmap threshold fixed at 1 MiB; "
         "with its default (dynamic) threshold " + " / ".join(f"{m['peak_rss_mib']:.0f}" for m in mem) +
         " MiB: freed blocks stay resident"],
    ]
    cmd = "python -m benchmarks.readpath" + (" --quick" if q else "")
    text = (f"# Unlearning read path ({'quick' if q else 'full'} run)\n\nCommand: `{cmd}`; machine: {machine()}\n\n"
            f"Wide MLP: {a['params']:,} parameters, {a['steps_hit']} of {a['steps_recorded']} steps, keep 0.1 bf16 (values zstd unless said), "
            f"store reads {a['store_bytes_read'] / 2**20:.1f} MiB, the full log {a['full_bytes_read'] / 2**20:.0f} MiB; "
            f"the first unlearning in a process took {a['first_call_s']:.2f} s (it loads the compiled kernels). "
            f"MNIST-sized CNN: {b['params']:,} parameters. Medians of interleaved repeats; CPU is the process's "
            f"CPU time of the same calls, every thread ({os.cpu_count()} cores here).\n\n"
            + md_table(["target", "goal", "reached", "measured"], rows))
    print(text)
    write_results("readpath", {"machine": machine(), "quick": q, "read_bandwidth": bw, "versus_full_log": a,
                               "versus_pickled": b, "peak_memory": mem}, text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
