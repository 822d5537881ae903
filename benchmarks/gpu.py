"""GPU: recording overhead, the device top-k, and unlearning a transformer against its full log.

On one CUDA card, side by side in one run (medians of interleaved repeats):

* recording with a store (keep 0.1 bf16) against plain training, for a ResNet-18-sized CNN at
  batch 256 and a GPT-2-small-sized transformer (124M parameters, built from its config) at
  8 × 1024 tokens, bf16 autocast; and whether a recording step synchronises the host
  (``torch.cuda.set_sync_debug_mode("error")``);
* the device top-k: ``torch.topk`` against a full sort, at keep 0.1, on layer sizes of both models;
* unlearning 20 steps of the transformer from the store (decoded on the GPU) against its full log
  (20 safetensors files of dense float32 Δθ, ≈ 10 GB), page cache evicted.

Writes ``gpu.md``/``gpu.json`` naming the card. Without CUDA it says so and measures nothing.
At most ≈ 8 minutes on an H100.

Run: ``python -m benchmarks.gpu [--quick]``
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch.nn import functional as F

import unlearn
from unlearn.models import GPT, GPTConfig, WideCNN
from updatestore import UpdateStore
from updatestore._pruning import device_select

from ._common import FullLog, machine, md_table, parser, write_results
from .speed import evict

TARGET_RECORDING = 0.97
TARGET_UNLEARN = 10.0


def _cnn_case(dev):
    g = torch.Generator(device=dev).manual_seed(0)
    data = [(torch.randn(256, 3, 32, 32, device=dev, generator=g), torch.randint(0, 10, (256,), device=dev, generator=g))
            for _ in range(4)]

    def step(model, opt, i):
        x, y = data[i % len(data)]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return ("ResNet-18-sized CNN (11.0M), batch 256", WideCNN,
            lambda m: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9), step, 256)


def _gpt_case(dev, tokens: int):
    cfg = GPTConfig.gpt2_small()
    g = torch.Generator(device=dev).manual_seed(0)
    data = [torch.randint(0, cfg.vocab, (8, tokens + 1), device=dev, generator=g) for _ in range(4)]

    def step(model, opt, i):
        x = data[i % len(data)]
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(x[:, :-1])
        F.cross_entropy(logits.float().reshape(-1, cfg.vocab), x[:, 1:].reshape(-1)).backward()
        opt.step()

    return (f"GPT-2 small (124M), 8 × {tokens} tokens, bf16 autocast", lambda: GPT(cfg),
            lambda m: torch.optim.AdamW(m.parameters(), lr=3e-4), step, 8)


def _train(case, dev, steps: int, store_dir: Path | None, *, sync_check: bool = False, first: int = 0):
    """Seconds for ``steps`` steps (the recording run includes writing its last block)."""
    _, make, make_opt, step, batch = case
    torch.manual_seed(0)
    model = make().to(dev)
    opt = make_opt(model)
    rec = None
    if store_dir is not None:
        store = UpdateStore.create(store_dir / f"s-{time.monotonic_ns()}.zarr", model, keep=0.1)
        rec = store.recorder(model, opt).attach()
    torch.cuda.synchronize()
    if sync_check:
        torch.cuda.set_sync_debug_mode("error")
    try:
        t0 = time.perf_counter()
        for i in range(first, first + steps):
            if rec is not None:
                with rec.batch(np.arange(batch) + i * batch):
                    step(model, opt, i)
            else:
                step(model, opt, i)
        if sync_check:
            torch.cuda.set_sync_debug_mode("default")
        if rec is not None:
            rec.detach()
        torch.cuda.synchronize()
        return time.perf_counter() - t0
    finally:
        torch.cuda.set_sync_debug_mode("default")


def recording(case, dev, tmp: Path, steps: int, repeats: int) -> dict:
    _train(case, dev, 3, tmp)  # warm-up: kernels, pinned pool, threads
    plain, rec = [], []
    for _ in range(repeats):
        plain.append(_train(case, dev, steps, None))
        rec.append(_train(case, dev, steps, tmp))
    checks = {}
    for tag, where in (("plain", None), ("recording", tmp)):
        try:
            _train(case, dev, 3, where, sync_check=True)
            checks[tag] = "none"
        except RuntimeError as exc:
            checks[tag] = f"synchronises: {str(exc).splitlines()[0][:120]}"
    p, r = statistics.median(plain), statistics.median(rec)
    print(f"  {case[0]}: plain {p:.2f}s recording {r:.2f}s ({p / r:.3f}x); sync {checks}", file=sys.stderr)
    return {"model": case[0], "steps": steps, "plain_s": p, "recording_s": r, "ratio": p / r,
            "all_plain": plain, "all_recording": rec, "host_sync": checks}


def select_timing(dev, repeats: int) -> list[dict]:
    out = []
    for name, n in (("GPT-2 MLP weight (768×3072)", 768 * 3072), ("CNN conv 512×512×3×3", 512 * 512 * 9),
                    ("GPT-2 token embedding (50257×768)", 50257 * 768)):
        x = torch.randn(n, device=dev)
        k = max(1, n // 10)
        row = {"layer": name, "numel": n, "k": k}
        for method in ("topk", "sort"):
            device_select(x, k, method)
            times = []
            for _ in range(repeats):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                device_select(x, k, method)
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            row[f"{method}_ms"] = statistics.median(times)
        out.append(row)
        print(f"  select {name}: topk {row['topk_ms']:.2f} ms, sort {row['sort_ms']:.2f} ms", file=sys.stderr)
    return out


def unlearning(dev, tmp: Path, tokens: int, steps: int, repeats: int) -> dict:
    case = _gpt_case(dev, tokens)
    _, make, make_opt, step, batch = case
    torch.manual_seed(0)
    init = make().state_dict()
    runs = {}
    for mode in ("store", "full"):
        model = make()
        model.load_state_dict(init)
        model.to(dev)
        opt = make_opt(model)
        if mode == "store":
            store = UpdateStore.create(tmp / "gpt.zarr", model, keep=0.1)
            with store.recorder(model, opt) as rec:
                for i in range(steps):
                    with rec.batch(np.arange(batch) + i * batch):
                        step(model, opt, i)
        else:
            full = FullLog(tmp / "full", model)
            for i in range(steps):
                step(model, opt, i)
                full.record()
        runs[mode] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ids = store.samples_in_steps(np.arange(steps))
    t_store, t_full = [], []
    for _ in range(repeats):
        evict(store.path), evict(full.dir)
        model = make().to(dev)
        model.load_state_dict(runs["store"])
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        report = unlearn.amnesiac(model, store, ids, device=dev, ledger=False, purge=False)
        torch.cuda.synchronize()
        t_store.append(time.perf_counter() - t0)
        evict(store.path), evict(full.dir)
        model.load_state_dict(runs["full"])
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        params = dict(model.named_parameters())
        with torch.no_grad():
            for s in range(steps):
                for n, d in load_file(str(full.dir / f"step_{s:08d}.safetensors")).items():
                    params[n].sub_(d.to(dev, non_blocking=True))
        torch.cuda.synchronize()
        t_full.append(time.perf_counter() - t0)
        print(f"  unlearn {steps} steps: store {t_store[-1]:.2f}s, full log {t_full[-1]:.2f}s", file=sys.stderr)
    s, f = statistics.median(t_store), statistics.median(t_full)
    return {"steps": steps, "store_s": s, "full_s": f, "speedup": f / s, "store_bytes_read": report.bytes_read,
            "full_bytes": full.nbytes(), "store_bytes": store.footprint().total_bytes,
            "all_store": t_store, "all_full": t_full}


def main(argv: list[str] | None = None) -> int:
    ap = parser("gpu", __doc__, "small run (≈ 2 minutes on an H100)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.gpu: no CUDA device here; nothing measured", file=sys.stderr)
        return 0
    q = args.quick
    dev = torch.device("cuda")
    card = torch.cuda.get_device_name(dev)
    tokens = 256 if q else 1024
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as t:
        tmp = Path(t)
        sel = select_timing(dev, 5 if q else 20)
        rec = [recording(_cnn_case(dev), dev, tmp, 10 if q else 50, 1 if q else 3),
               recording(_gpt_case(dev, tokens), dev, tmp, 5 if q else 20, 1 if q else 3)]
        un = unlearning(dev, tmp, tokens, 4 if q else 20, 1 if q else 3)
    rows = [[f"recording, {r['model']}: plain ÷ recording", f"≥ {TARGET_RECORDING}", f"{r['ratio']:.3f}×",
             f"{r['steps']} steps: plain {r['plain_s']:.2f} s, recording {r['recording_s']:.2f} s; host syncs in a "
             f"recording step: {r['host_sync']['recording']} (plain step: {r['host_sync']['plain']})"] for r in rec]
    rows.append([f"unlearning {un['steps']} steps of GPT-2 small, cold: full log ÷ store", f"≥ {TARGET_UNLEARN:.0f}×",
                 f"{un['speedup']:.1f}×", f"store {un['store_s']:.2f} s ({un['store_bytes_read'] / 2**20:.0f} MiB "
                 f"read), full log {un['full_s']:.2f} s ({un['full_bytes'] / 2**30:.1f} GiB)"])
    cmd = "python -m benchmarks.gpu" + (" --quick" if q else "")
    text = (f"# GPU ({'quick' if q else 'full'} run) on {card}\n\nCommand: `{cmd}`; machine: {machine()}\n\n"
            + md_table(["target", "goal", "reached", "measured"], rows)
            + "\nDevice top-k at keep 0.1 (positions sorted; CUDA events, median):\n\n"
            + md_table(["layer", "entries", "torch.topk ms", "full sort ms"],
                       [[s["layer"], f"{s['numel']:,}", f"{s['topk_ms']:.2f}", f"{s['sort_ms']:.2f}"] for s in sel]))
    print(text)
    write_results("gpu", {"machine": machine(), "card": card, "quick": q, "select": sel, "recording": rec,
                          "unlearning": un}, text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
