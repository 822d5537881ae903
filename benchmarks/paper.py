"""The paper's comparison on real handwritten digits (Gogineni & Nadimi 2024; Graves et al. 2021).

Rows: original, retrain from scratch (the gold standard), full amnesiac, partial
amnesiac at several keep ratios (with and without one epoch of fine-tuning),
label flipping and gradient ascent, each naive and with layer-wise partial updates.
Columns: test / retain / forget accuracy, membership-inference AUC on the forget set,
distance to the retrained model, bytes stored, seconds. Scenarios: (a) a random 1 % of
the training samples; (b) class removal — the training set holds only ~100 samples of
one class, all forgotten; (c) forgetting three owners, with shuffled vs owner-packed
batches (deletion-aware batching). Mean ± std over seeds.

Run: ``python -m benchmarks.paper [--quick] [--data-dir DIR]``
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import Subset, TensorDataset

import unlearn
from unlearn.data import Split, load_digits, load_idx_dir
from unlearn.models import DigitsCNN
from updatestore import UpdateStore

from ._common import parser, machine, md_table, pyplot, write_results

METRICS = ("test_accuracy", "retain_accuracy", "forget_accuracy", "mia_auc", "distance", "bytes", "seconds",
           "chosen_keep", "steps_hit_share")


def _subset(ds: TensorDataset, idx: np.ndarray) -> TensorDataset:
    return TensorDataset(*(t[torch.as_tensor(idx)] for t in ds.tensors))


def scenario(data: Split, kind: str, seed: int) -> tuple[TensorDataset, np.ndarray]:
    """The training set for a scenario and the positions (in it) of the samples to forget."""
    y = data.train.tensors[1].numpy()
    rng = np.random.default_rng(seed)
    if kind == "random1pct":
        return data.train, np.sort(rng.choice(len(y), size=max(1, round(0.01 * len(y))), replace=False))
    cls = seed % data.num_classes  # class removal: only ~100 samples of one class, all forgotten
    of_cls = np.flatnonzero(y == cls)
    keep_cls = np.sort(rng.choice(of_cls, size=min(100, len(of_cls)), replace=False))
    idx = np.sort(np.concatenate([np.flatnonzero(y != cls), keep_cls]))
    train = _subset(data.train, idx)
    return train, np.flatnonzero(train.tensors[1].numpy() == cls)


def _shuffled(train, seed: int, batch_size: int = 32) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True, generator=g)


def _fit(model, loader, epochs, recorders=()):
    """SGD (lr 0.05, momentum 0.9) over ``loader``; manual-mode ``recorders`` step after each update."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for _ in range(epochs):
        for x, y, ids in loader:
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            for r in recorders:
                r.step(ids)


def run_seed(data: Split, kind: str, seed: int, keeps: list[float], epochs: int, tmp: Path) -> dict[str, dict]:
    train, forget_pos = scenario(data, kind, seed)
    forget = Subset(train, forget_pos.tolist())
    retain_pos = np.setdiff1d(np.arange(len(train)), forget_pos)
    retain = Subset(train, retain_pos.tolist())
    forget_ids = train.tensors[2].numpy()[forget_pos]
    in_hw = data.input_shape[-1]

    def fresh():
        torch.manual_seed(seed)
        return DigitsCNN(num_classes=data.num_classes, in_hw=in_hw)

    # One training run; every store records it through its own manual-mode recorder.
    model = fresh()
    specs = [("full", 1.0, "float32")] + [(f"k{k}", k, "bfloat16") for k in keeps]
    stores = {name: UpdateStore.create(tmp / f"{kind}-{seed}-{name}.zarr", model, keep=k, value_dtype=dt)
              for name, k, dt in specs}
    recs = [s.recorder(model).attach() for s in stores.values()]
    t0 = time.perf_counter()
    _fit(model, _shuffled(train, seed), epochs, recs)
    train_s = time.perf_counter() - t0
    for r in recs:
        r.detach()

    t0 = time.perf_counter()
    retrained = fresh()
    _fit(retrained, _shuffled(retain, seed), epochs)
    retrain_s = time.perf_counter() - t0
    target = unlearn.accuracy(retrained, forget)

    rows: dict[str, dict] = {}

    def judge(name: str, m: torch.nn.Module, seconds: float, nbytes: int = 0) -> None:
        ev = unlearn.evaluate(m, forget=forget, retain=retain, test=data.test, seed=seed)
        rows[name] = {"test_accuracy": ev["test_accuracy"], "retain_accuracy": ev["retain_accuracy"],
                      "forget_accuracy": ev["forget_accuracy"], "mia_auc": ev["mia_auc"],
                      "distance": unlearn.param_distance(m, retrained), "bytes": nbytes, "seconds": seconds}

    judge("original", model, train_s)
    judge("retrain from scratch", retrained, retrain_s)
    for (name, keep, _), store in zip(specs, stores.values()):
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        unlearn.amnesiac(m, store, forget_ids, ledger=False, purge=False)  # keep sizes comparable
        secs = time.perf_counter() - t0
        label = "full amnesiac" if keep == 1.0 else f"partial amnesiac keep {keep}"
        nbytes = store.footprint().total_bytes
        judge(label, m, secs, nbytes)
        t0 = time.perf_counter()
        unlearn.finetune(m, retain, epochs=1, lr=0.01, seed=seed)
        judge(label + " + fine-tune", m, secs + time.perf_counter() - t0, nbytes)
    # keep chosen at deletion time, automatically, from the full (keep 1.0) store. The
    # validation set is every other test sample (so "test acc" of this row is slightly optimistic).
    validation = Subset(data.test, list(range(0, len(data.test), 2)))
    for label, target in (("amnesiac keep auto", None), ("amnesiac keep auto, target = retrained", target)):
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        rep = unlearn.amnesiac(m, stores["full"], forget_ids, ledger=False, purge=False,
                               keep=unlearn.Auto(forget=forget, validation=validation, target=target))
        chosen = next(c["keep"] for c in rep.candidates if c.get("chosen"))
        judge(label, m, time.perf_counter() - t0, stores["full"].footprint().total_bytes)
        rows[label]["chosen_keep"] = chosen
    for label, partial in (("label flip naive", None), ("label flip partial 5%", 0.05)):
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        unlearn.label_flip(m, forget, partial=partial, epochs=3, lr=0.02, seed=seed)
        judge(label, m, time.perf_counter() - t0)
    for label, partial in (("gradient ascent naive", None), ("gradient ascent partial 1%", 0.01)):
        m = copy.deepcopy(model)
        t0 = time.perf_counter()
        unlearn.gradient_ascent(m, forget, partial=partial, retain=retain, lr=0.01, max_steps=60,
                                target_accuracy=target, seed=seed)
        judge(label, m, time.perf_counter() - t0)
    for s in stores.values():
        s.close()
    return rows


def run_owner_seed(data: Split, seed: int, keeps: list[float], epochs: int, tmp: Path) -> dict[str, dict]:
    """Scenario (c): forget three owners (synthetic, 5–20 samples each), trained with plain
    shuffled batches and with owner-packed batches (``OwnerBatchSampler``), batch 64."""
    from updatestore import OwnerBatchSampler

    from .batching import synthetic_owners

    rng = np.random.default_rng(seed)
    train = data.train
    ids = train.tensors[2].numpy()
    owners = synthetic_owners(len(ids), rng)
    gone = rng.choice(np.unique(owners), size=3, replace=False)
    forget_pos = np.flatnonzero(np.isin(owners, gone))
    forget = Subset(train, forget_pos.tolist())
    retain = Subset(train, np.setdiff1d(np.arange(len(ids)), forget_pos).tolist())
    in_hw = data.input_shape[-1]
    rows: dict[str, dict] = {}

    def fresh():
        torch.manual_seed(seed)
        return DigitsCNN(num_classes=data.num_classes, in_hw=in_hw)

    def judge(name, m, seconds, nbytes=0, steps_hit=None, steps_total=None):
        ev = unlearn.evaluate(m, forget=forget, retain=retain, test=data.test, seed=seed)
        rows[name] = {"test_accuracy": ev["test_accuracy"], "retain_accuracy": ev["retain_accuracy"],
                      "forget_accuracy": ev["forget_accuracy"], "mia_auc": ev["mia_auc"],
                      "distance": unlearn.param_distance(m, retrained), "bytes": nbytes, "seconds": seconds}
        if steps_hit is not None:
            rows[name]["steps_hit_share"] = steps_hit / steps_total

    t0 = time.perf_counter()
    retrained = fresh()
    _fit(retrained, _shuffled(retain, seed, 64), epochs)
    judge("retrain from scratch", retrained, time.perf_counter() - t0)
    for batching in ("shuffled", "owner-packed"):
        model = fresh()
        loader = (torch.utils.data.DataLoader(train, batch_sampler=OwnerBatchSampler(owners, 64, seed=seed))
                  if batching == "owner-packed" else _shuffled(train, seed, 64))
        specs = [("full", 1.0, "float32")] + [(f"k{k}", k, "bfloat16") for k in keeps]
        stores = {n: UpdateStore.create(tmp / f"owner-{seed}-{batching}-{n}.zarr", model, keep=k, value_dtype=dt)
                  for n, k, dt in specs}
        for st in stores.values():
            st.index_owners(ids, owners)
        recs = [st.recorder(model).attach() for st in stores.values()]
        _fit(model, loader, epochs, recs)
        for r in recs:
            r.detach()
        judge(f"original, {batching} batches", model, 0.0)
        for (name, keep, _), st in zip(specs, stores.values()):
            m = copy.deepcopy(model)
            t0 = time.perf_counter()
            rep = unlearn.amnesiac(m, st, owners=gone.tolist(), ledger=False, purge=False)
            label = ("full amnesiac" if keep == 1.0 else f"partial amnesiac keep {keep}") + f", {batching} batches"
            judge(label, m, time.perf_counter() - t0, st.footprint().total_bytes, len(rep.steps_hit), st.num_batches)
            st.close()
    return rows


def _fmt(vals: list[float], metric: str) -> str:
    if not vals:
        return ""
    if metric == "chosen_keep":
        return ", ".join(str(v) for v in vals) if vals else ""
    mean, std = float(np.mean(vals)), float(np.std(vals))
    if metric == "bytes":
        return f"{mean / 2**20:.2f} MiB" if mean else ""
    if metric == "seconds":
        return f"{mean:.2f}"
    if metric == "steps_hit_share":
        return f"{mean:.1%}"
    return f"{mean:.3f} ± {std:.3f}" if len(vals) > 1 else f"{mean:.3f}"


def _plot(results: dict, path: Path) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 5.5), squeeze=False)
    for ax, (kind, rows) in zip(axes[0], results.items()):
        names = list(rows)
        y = np.arange(len(names))
        for off, metric, color in ((-0.2, "retain_accuracy", "tab:blue"), (0.2, "forget_accuracy", "tab:red")):
            means = [np.mean(rows[n][metric]) for n in names]
            errs = [np.std(rows[n][metric]) for n in names]
            ax.barh(y + off, means, height=0.4, xerr=errs, color=color, label=metric.replace("_", " "))
        ax.set_yticks(y, names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_title(kind)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    ap = parser("paper", __doc__, "one seed, fewer ratios (≤ 2 minutes on 2 CPU cores)")
    ap.add_argument("--data-dir", type=Path, default=None, help="MNIST-format IDX directory (default: bundled digits)")
    ap.add_argument("--limit", type=int, default=None, help="use the first N training samples of --data-dir")
    ap.add_argument("--seeds", type=int, default=None)
    args = ap.parse_args(argv)
    data = load_idx_dir(args.data_dir, limit=args.limit) if args.data_dir else load_digits()
    seeds = args.seeds or (1 if args.quick else 3)
    keeps = [0.1, 0.01] if args.quick else [0.5, 0.2, 0.1, 0.05, 0.01]
    epochs = 5 if args.quick else 10
    results: dict[str, dict[str, dict[str, list]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-paper-") as tmp:
        from tqdm.auto import tqdm

        bar = tqdm(total=3 * seeds, desc="paper", unit="run", disable=not sys.stderr.isatty())
        for kind in ("random1pct", "class_removal", "owners"):
            per: dict[str, dict[str, list]] = {}
            for seed in range(seeds):
                bar.update()
                t0 = time.perf_counter()
                rows = (run_owner_seed(data, seed, [0.05], epochs, Path(tmp)) if kind == "owners"
                        else run_seed(data, kind, seed, keeps, epochs, Path(tmp)))
                print(f"{kind} seed {seed}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
                for name, r in rows.items():
                    for metric, v in r.items():
                        per.setdefault(name, {}).setdefault(metric, []).append(v)
            results[kind] = per
        bar.close()
    src = str(args.data_dir) if args.data_dir else "bundled digits (scikit-learn)"
    cmd = "python -m benchmarks.paper" + (" --quick" if args.quick else "")
    md = [f"# Paper comparison ({'quick' if args.quick else 'full'} run)\n\nCommand: `{cmd}`; data: {src}; "
          f"{seeds} seed(s), mean ± std; DigitsCNN, SGD lr 0.05 momentum 0.9, batch 32, {epochs} epochs; "
          f"machine: {machine()}\n"]
    titles = {"random1pct": "(a) forget a random 1 % of the training samples",
              "class_removal": "(b) class removal: ~100 samples of one class in training, all forgotten",
              "owners": "(c) forget three owners (synthetic, 5–20 samples each), batch 64: shuffled vs "
                        "owner-packed batches"}
    for kind, per in results.items():
        md.append(f"\n## {titles[kind]}\n\n")
        md.append(md_table(["method", "test acc", "retain acc", "forget acc", "MIA AUC (forget)",
                            "distance to retrained", "stored", "seconds", "keep chosen", "steps hit"],
                           [[name] + [_fmt(per[name].get(m, []), m) for m in METRICS] for name in per]))
    md.append("\n![paper](paper.png)\n")
    text = "".join(md)
    args.out.mkdir(parents=True, exist_ok=True)
    _plot(results, args.out / "paper.png")
    print(text)
    write_results("paper", {"machine": machine(), "quick": args.quick, "data": src, "seeds": seeds,
                            "epochs": epochs, "results": results}, text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
