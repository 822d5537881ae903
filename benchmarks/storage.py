"""Storage: bytes on disk of the update store against the full amnesiac log.

One real training run per model; every store setting records the same run
(manual-mode recorders stepped after each optimizer step), beside the full log
(one safetensors file of dense float32 Δθ per step). Also reports the
information floor of what is kept: the bits of the kept values plus
log2 C(numel, k) bits to name each step's kept positions.

Run: ``python -m benchmarks.storage [--quick]``
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from unlearn.data import load_digits
from unlearn.models import DigitsCNN, WideCNN
from updatestore import StoreConfig, UpdateStore

from ._common import parser, FullLog, log2_binom, machine, md_table, pyplot, synthetic_images, write_results

KEEPS = (1.0, 0.5, 0.2, 0.1, 0.05, 0.01)
DTYPES = ("float32", "float16", "bfloat16")
VALUE_BITS = {"float32": 32, "float16": 16, "bfloat16": 16}


def _settings(quick: bool, big: bool) -> list[dict]:
    keeps = (1.0, 0.1, 0.01) if (quick or big) else KEEPS
    dtypes = ("bfloat16",) if big else DTYPES
    out = [{"keep": k, "value_dtype": d, "positions": "auto"} for k in keeps for d in dtypes]
    if big:
        out.append({"keep": 0.1, "value_dtype": "bfloat16", "positions": "auto", "clevel": 9})
    if not big:  # the measurement behind positions="auto"
        out += [{"keep": k, "value_dtype": "bfloat16", "positions": enc, "tag": "encodings"}
                for k in (0.2, 0.05, 0.02, 0.01, 0.005) for enc in ("bitmap", "gaps")]
        out.append({"keep": 0.1, "value_dtype": "bfloat16", "positions": "auto", "clevel": 9})
    return out


def run_model(name: str, model: torch.nn.Module, data, *, epochs: int, batch_size: int, lr: float,
              settings: list[dict], tmp: Path, max_steps: int | None = None) -> list[dict]:
    full = FullLog(tmp / f"{name}-full", model)
    stores, recs = [], []
    for i, s in enumerate(settings):
        kw = {k: v for k, v in s.items() if k != "tag"}
        st = UpdateStore.create(tmp / f"{name}-{i}.zarr", model, **kw)
        stores.append(st)
        recs.append(st.recorder(model).attach())  # manual mode: stepped below
    g = torch.Generator().manual_seed(0)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    steps, t0 = 0, time.perf_counter()
    from tqdm.auto import tqdm

    total = min(epochs * len(loader), max_steps or epochs * len(loader))
    bar = tqdm(total=total, desc=name, unit="step", leave=False, disable=not sys.stderr.isatty())
    for _ in range(epochs):
        for x, y, ids in loader:
            bar.update()
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            full.record()
            for r in recs:
                r.step(ids)
            steps += 1
            if max_steps and steps >= max_steps:
                break
    bar.close()
    for r in recs:
        r.detach()
    full_bytes = full.nbytes()
    print(f"{name}: {steps} steps in {time.perf_counter() - t0:.1f} s; full log {full_bytes / 2**20:.1f} MiB",
          file=sys.stderr)
    rows = []
    for s, st in zip(settings, stores):
        fp = st.footprint()
        floor_bits = steps * sum(
            sp.k * VALUE_BITS[s["value_dtype"]] + (0 if sp.k == sp.numel else log2_binom(sp.numel, sp.k))
            for sp in st.layers
        )
        rows.append({
            "model": name, "params": sum(sp.numel for sp in st.layers), "steps": steps,
            "keep": s["keep"], "value_dtype": s["value_dtype"], "positions": s["positions"],
            "encodings": sorted({sp.positions for sp in st.layers}), "clevel": s.get("clevel", StoreConfig.clevel),
            "tag": s.get("tag", "main"), "store_bytes": fp.total_bytes, "index_bytes": fp.index_bytes,
            "full_log_bytes": full_bytes, "ratio": fp.total_bytes / full_bytes,
            "floor_bytes": floor_bits / 8, "floor_ratio": floor_bits / 8 / full_bytes,
        })
        st.close()
    return rows


def _plot(rows: list[dict], path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    main = [r for r in rows if r["tag"] == "main" and r["clevel"] == StoreConfig.clevel]
    for (model, dtype) in sorted({(r["model"], r["value_dtype"]) for r in main}):
        pts = sorted((r["keep"], r["ratio"]) for r in main if r["model"] == model and r["value_dtype"] == dtype)
        ax.plot(*zip(*pts), marker="o", label=f"{model}, {dtype}")
    floor = sorted((r["keep"], r["floor_ratio"]) for r in main if r["value_dtype"] == "bfloat16"
                   and r["model"] == main[0]["model"])
    ax.plot(*zip(*floor), ls=":", color="gray", label="information floor (bf16)")
    ax.axhline(0.04, color="red", lw=0.6, ls="--")
    ax.axhline(0.005, color="red", lw=0.6, ls="--")
    ax.set(xscale="log", yscale="log", xlabel="keep (fraction of each layer per step)",
           ylabel="store bytes / full amnesiac log", title="Update store size vs full amnesiac log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = parser("storage", __doc__, "small run (≤ 2 minutes on 2 CPU cores)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench-storage-") as tmp:
        digits = load_digits()
        rows += run_model("digits-cnn", DigitsCNN(), digits.train, epochs=2 if args.quick else 8, batch_size=32,
                          lr=0.05, settings=_settings(args.quick, False), tmp=Path(tmp))
        torch.manual_seed(0)
        rows += run_model("wide-cnn-11M", WideCNN(), synthetic_images(512), epochs=1, batch_size=32, lr=0.01,
                          settings=_settings(args.quick, True), tmp=Path(tmp), max_steps=4 if args.quick else 16)
    headers = ["model", "steps", "keep", "values", "positions", "zstd", "store", "full log", "store/full",
               "floor/full", "store/floor"]
    fmt = [[r["model"], r["steps"], r["keep"], r["value_dtype"], "/".join(r["encodings"]), r["clevel"],
            f"{r['store_bytes'] / 2**20:.2f} MiB", f"{r['full_log_bytes'] / 2**20:.1f} MiB", f"{r['ratio']:.2%}",
            f"{r['floor_ratio']:.2%}", f"{r['store_bytes'] / r['floor_bytes']:.2f}"]
           for r in rows if r["tag"] == "main"]
    enc = [[r["keep"], r["positions"], f"{r['store_bytes'] / 2**10:.0f} KiB", f"{r['ratio']:.2%}"]
           for r in rows if r["tag"] == "encodings"]
    cmd = "python -m benchmarks.storage" + (" --quick" if args.quick else "")
    md = (f"# Storage ({'quick' if args.quick else 'full'} run)\n\nCommand: `{cmd}`; machine: {machine()}\n\n"
          + md_table(headers, fmt)
          + "\nPositions encodings compared on the digits CNN (bfloat16 values, everything else equal):\n\n"
          + md_table(["keep", "positions", "store", "store/full"], enc)
          + "\n![storage](storage.png)\n")
    args.out.mkdir(parents=True, exist_ok=True)
    _plot(rows, args.out / "storage.png")
    print(md)
    write_results("storage", {"machine": machine(), "quick": args.quick, "rows": rows}, md, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
