"""Sharded recording: DDP (rank 0 writes) against FSDP2 (every rank writes its parts), 2 ranks here.

Prints, measured in one run: per-step time of plain training and of recording (medians over
steps, interleaved repeats) and bytes written per rank per step, for DDP and FSDP on a local
directory, and FSDP against an S3 server (SeaweedFS on loopback, when installed); the pruning
rule across shards — each part's own top-k (what the store does) against the exact global
top-k of the layer (a distributed radix selection: histogram all-reduces) — by selection time
on the ranks, agreement of the kept sets, and forgetting quality on the paper's digits
scenario; and a projection of the store size for a 1B-parameter model over 8 GPUs.

Run: ``python -m benchmarks.fsdp [--quick]``
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

import unlearn
from unlearn.data import load_digits
from unlearn.models import DigitsCNN
from updatestore import UpdateStore
from updatestore.distributed import shard_ranges

from ._common import machine, md_table, parser, seaweed, write_results

WIDTH, BATCH = 1536, 64


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 10))


# ---------------------------------------------------------------- the global top-k across ranks
def _hist_split(keys: torch.Tensor, nbins: int, k: int, group) -> tuple[int, int]:
    """The bin holding the k-th largest key over every rank, and how many keys lie above it."""
    hist = torch.bincount(keys, minlength=nbins)
    dist.all_reduce(hist, group=group)
    cum = hist.flip(0).cumsum(0)
    j = int(torch.searchsorted(cum, torch.tensor(k)))
    return nbins - 1 - j, int(cum[j - 1]) if j else 0


def global_topk(flat: torch.Tensor, k: int, group=None) -> torch.Tensor:
    """Positions (local) of this rank's share of the ``k`` largest |x| over all ranks' shards: two
    16-bit histogram passes all-reduced (exact threshold), ties split in rank order (all-gather)."""
    bits = flat.abs().view(torch.int32)
    hi = bits >> 16
    b, above = _hist_split(hi, 1 << 15, k, group)
    mask = hi > b
    cand = (hi == b).nonzero().squeeze(1)
    low = bits[cand] & 0xFFFF
    b2, above2 = _hist_split(low, 1 << 16, k - above, group)
    mask[cand[low > b2]] = True
    ties = cand[low == b2]
    counts = [torch.zeros(1, dtype=torch.int64) for _ in range(dist.get_world_size(group))]
    dist.all_gather(counts, torch.tensor([len(ties)]), group=group)
    rank = dist.get_rank(group)
    before = sum(int(c) for c in counts[:rank])
    take = max(0, min(len(ties), k - above - above2 - before))
    mask[ties[:take]] = True
    return mask.nonzero().squeeze(1)


def shard_topk(flat: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(torch.topk(flat.abs(), k, sorted=False).indices).values


# ---------------------------------------------------------------- the ranks
def _train(rank: int, world: int, strategy: str, path: str | None, steps: int, keep: float,
           storage_options: dict | None, compare: bool) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = mlp()
    if strategy == "fsdp":
        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        net = model
    else:
        net = DDP(model)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(rank)
    data = [(torch.randn(BATCH, 784, generator=g), torch.randint(0, 10, (BATCH,), generator=g)) for _ in range(4)]
    store = None if path is None else UpdateStore.create(path, model, keep=keep, overwrite=True,
                                                         storage_options=storage_options)
    rec = store.recorder(model, opt) if store is not None else None
    times, select = [], {"shard_s": [], "global_s": [], "overlap": [], "share": []}
    params = [p for p in model.parameters()]
    if rec is not None:
        rec.attach()
    for step in range(steps):
        x, y = data[step % len(data)]
        ids = torch.arange(BATCH) + (step * world + rank) * BATCH
        before = [p.to_local().detach().clone() for p in params] if compare else None
        dist.barrier()
        t0 = time.perf_counter()
        if rec is not None:
            rec.begin(ids)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        if rec is not None:
            rec.end()
        times.append(time.perf_counter() - t0)
        if compare:  # both selection rules on this step's Δθ of every layer's local shard
            for p, b in zip(params, before):
                local = (p.to_local().detach() - b).reshape(-1)
                k_global = math.ceil(keep * p.numel())
                t1 = time.perf_counter()
                mine = shard_topk(local, math.ceil(keep * local.numel())) if local.numel() else local.long()
                t2 = time.perf_counter()
                glob = global_topk(local, k_global)
                t3 = time.perf_counter()
                select["shard_s"].append(t2 - t1)
                select["global_s"].append(t3 - t2)
                if local.numel():
                    select["overlap"].append(len(np.intersect1d(mine.numpy(), glob.numpy())) / max(1, len(glob)))
                    select["share"].append(len(glob) / max(1, math.ceil(keep * local.numel())))
    if rec is not None:
        rec.detach()
    written = store.bytes_written if store is not None else 0
    if store is not None:
        store.close()
    return {"step_s": statistics.median(times[2:]), "written_per_step": written / steps,
            "select": {k: (statistics.median(v) if v else None) for k, v in select.items()},
            "share_max": max(select["share"]) if select["share"] else None}


def _rank_main(rank: int, world: int, init: str, jobs: list[dict], out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    results = []
    for job in jobs:
        results.append(_train(rank, world, **job))
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def run_ranks(tmp: Path, jobs: list[dict], world: int = 2) -> list[list[dict]]:
    import torch.multiprocessing as mp

    init = f"file://{tmp / f'rdv-{time.monotonic_ns()}'}"
    mp.spawn(_rank_main, args=(world, init, jobs, str(tmp)), nprocs=world, join=True)
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(world)]


# ---------------------------------------------------------------- forgetting quality of the two rules
def forgetting(tmp: Path, shards: int, keeps: list[float], seeds: list[int], epochs: int) -> list[dict]:
    """Paper scenario (a) on digits: a random 1 % forgotten. One keep-1.0 store holds every dense Δθ; each
    rule prunes it as it would have been recorded over ``shards`` ranks, and the pruned updates are subtracted."""
    from .paper import _fit, _shuffled, scenario

    data = load_digits()
    rows = []
    for seed in seeds:
        train, forget_pos = scenario(data, "random1pct", seed)
        forget = torch.utils.data.Subset(train, forget_pos.tolist())
        retain = torch.utils.data.Subset(train, np.setdiff1d(np.arange(len(train)), forget_pos).tolist())
        torch.manual_seed(seed)
        model = DigitsCNN()
        store = UpdateStore.create(tmp / f"dense-{seed}.zarr", model, keep=1.0, value_dtype="float32")
        rec = store.recorder(model).attach()
        _fit(model, _shuffled(train, seed), epochs, [rec])
        rec.detach()
        torch.manual_seed(seed)
        retrained = DigitsCNN()
        _fit(retrained, _shuffled(retain, seed), epochs)
        hit = store.batches_containing(train.tensors[2].numpy()[forget_pos])
        rows_of = store.read(hit)
        for label, m in (("original (no unlearning)", model), ("retrained without the forget set", retrained)):
            ev = unlearn.evaluate(m, forget=forget, retain=retain, test=data.test, seed=seed)
            rows.append({"seed": seed, "keep": "-", "rule": label, "forget_accuracy": ev["forget_accuracy"],
                         "test_accuracy": ev["test_accuracy"], "mia_auc": ev["mia_auc"],
                         "distance": unlearn.param_distance(m, retrained)})
        for keep in keeps:
            for rule in ("global top-k (per layer)", f"per-part top-k ({shards} shards)"):
                m = copy.deepcopy(model)
                with torch.no_grad():
                    for name, p in m.named_parameters():
                        deltas = rows_of[name].values  # (steps, numel): dense
                        flat = torch.zeros(p.numel())
                        ranges = ([(0, p.numel())] if rule.startswith("global")
                                  else [r for r in shard_ranges(tuple(p.shape), shards) if r[1] > r[0]])
                        for d in deltas:
                            for a, b in ranges:
                                idx = shard_topk(d[a:b], math.ceil(keep * (b - a)))
                                flat[a + idx] += d[a:b][idx]
                        p -= flat.view(p.shape)
                ev = unlearn.evaluate(m, forget=forget, retain=retain, test=data.test, seed=seed)
                rows.append({"seed": seed, "keep": keep, "rule": rule, "forget_accuracy": ev["forget_accuracy"],
                             "test_accuracy": ev["test_accuracy"], "mia_auc": ev["mia_auc"],
                             "distance": unlearn.param_distance(m, retrained)})
        store.close()
    return rows


# ---------------------------------------------------------------- the 1B projection
def projection(ratio: dict[float, float]) -> list[list]:
    """Store size of a GPT-style 1.2B model (24 layers, d 2048) over 8 ranks, using the compressed/raw ratio
    this run measured on real updates at the same keep."""
    d, layers, vocab, gpus = 2048, 24, 50304, 8
    shapes = [(vocab, d)] + [(3 * d, d), (d, d), (4 * d, d), (d, 4 * d)] * layers
    numel = sum(a * b for a, b in shapes)
    out = []
    for keep, r in sorted(ratio.items(), reverse=True):
        raw = 0
        for a, b in shapes:
            for lo, hi in shard_ranges((a, b), gpus):
                n = hi - lo
                k = math.ceil(keep * n)
                raw += 2 * k + (n / 8 if keep >= 0.02 else 4 * k)  # bf16 values + bitmap / uint32 gaps
        per_step = raw * r
        out.append([f"{numel / 1e9:.2f}B params, {gpus} ranks, keep {keep}", f"{per_step / 2**20:.0f} MiB",
                    f"{per_step / gpus / 2**20:.1f} MiB", f"{per_step * 10_000 / 2**40:.2f} TiB",
                    f"{4 * numel * 10_000 / 2**40:.0f} TiB", f"{per_step / (4 * numel):.1%}"])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = parser("fsdp", __doc__, "small run (≈ 1 minute on 2 CPU cores)")
    args = ap.parse_args(argv)
    q = args.quick
    steps, repeats = (8, 1) if q else (30, 3)
    keep = 0.1
    results: dict = {"machine": machine(), "width": WIDTH, "batch_per_rank": BATCH, "steps": steps, "keep": keep}
    with tempfile.TemporaryDirectory(prefix="bench-fsdp-") as t:
        tmp = Path(t)
        jobs = []
        for _ in range(repeats):  # interleaved: plain, recording, for each strategy
            for strategy in ("ddp", "fsdp"):
                jobs.append({"strategy": strategy, "path": None, "steps": steps, "keep": keep,
                             "storage_options": None, "compare": False})
                jobs.append({"strategy": strategy, "path": str(tmp / f"{strategy}.zarr"), "steps": steps, "keep": keep,
                             "storage_options": None, "compare": False})
        jobs.append({"strategy": "fsdp", "path": None, "steps": max(4, steps // 3), "keep": keep,
                     "storage_options": None, "compare": True})
        got = run_ranks(tmp, jobs)
        s3 = None
        with seaweed(tmp / "seaweed") as opts:
            if opts is not None:
                s3_jobs = [{"strategy": "fsdp", "path": "s3://updatestore-bench/fsdp.zarr", "steps": steps,
                            "keep": keep, "storage_options": opts, "compare": False} for _ in range(repeats)]
                s3 = run_ranks(tmp, s3_jobs)
        quality = forgetting(tmp, 8, [0.1, 0.01], [0] if q else [0, 1, 2], 1 if q else 4)
        ratios = {}
        for k in (0.1, 0.01):
            m = mlp()
            st = UpdateStore.create(tmp / f"ratio-{k}.zarr", m, keep=k)
            opt = torch.optim.SGD(m.parameters(), lr=0.01)
            with st.recorder(m, opt) as rec:
                for i in range(4):
                    with rec.batch(torch.arange(BATCH) + i * BATCH):
                        opt.zero_grad()
                        F.cross_entropy(m(torch.randn(BATCH, 784)), torch.randint(0, 10, (BATCH,))).backward()
                        opt.step()
            raw = sum(sp.row_nbytes(st.value_dtype) for sp in st.parts) * st.num_batches
            ratios[k] = sum(st.footprint().layer_bytes.values()) / raw
            st.close()

    def med(strategy: str, recorded: bool, rank: int, key: str, runs=got) -> float:
        vals = [r[key] for r in runs[rank] if r.get("_s") == (strategy, recorded)]
        return statistics.median(vals)

    for rank in range(2):  # tag each result with its job
        for job, r in zip(jobs, got[rank]):
            r["_s"] = (job["strategy"], job["path"] is not None)
    table = []
    for strategy in ("ddp", "fsdp"):
        plain, rec = med(strategy, False, 0, "step_s"), med(strategy, True, 0, "step_s")
        w0, w1 = med(strategy, True, 0, "written_per_step"), med(strategy, True, 1, "written_per_step")
        table.append([f"{strategy.upper()}, local directory", f"{plain * 1e3:.0f} ms", f"{rec * 1e3:.0f} ms",
                      f"{plain / rec:.2f}×", f"{w0 / 2**20:.2f} / {w1 / 2**20:.2f} MiB"])
    if s3 is not None:
        rec = statistics.median(r["step_s"] for r in s3[0])
        plain = med("fsdp", False, 0, "step_s")
        table.append(["FSDP, S3 (SeaweedFS, loopback)", f"{plain * 1e3:.0f} ms", f"{rec * 1e3:.0f} ms",
                      f"{plain / rec:.2f}×", " / ".join(f"{statistics.median(r['written_per_step'] for r in s3[k]) / 2**20:.2f}"
                                                         for k in range(2)) + " MiB"])
    sel = [got[r][-1]["select"] for r in range(2)]
    share = max(got[r][-1]["share_max"] or 0 for r in range(2))
    results.update(table=table, select=sel, quality=quality, ratios=ratios, s3=s3 is not None, raw=got)
    qrows = []
    for keep_ in ("-", 0.1, 0.01):
        for rule in sorted({r["rule"] for r in quality if r["keep"] == keep_}):
            rs = [r for r in quality if r["keep"] == keep_ and r["rule"] == rule]
            qrows.append([keep_, rule] + [f"{statistics.mean(r[m] for r in rs):.3f}"
                                           for m in ("forget_accuracy", "test_accuracy", "mia_auc", "distance")])
    md = (f"# Sharded recording — `python -m benchmarks.fsdp{' --quick' if q else ''}`\n\n"
          f"2 ranks (gloo, one thread each) on {machine()['cpu_count']} CPU cores; a {WIDTH}-wide MLP "
          f"({sum(p.numel() for p in mlp().parameters()) / 1e6:.1f}M parameters), batch {BATCH} per rank, keep {keep} "
          f"bf16; medians of {steps} steps × {repeats} interleaved repeats.\n\n"
          + md_table(["setup", "plain step", "recording step", "throughput (plain ÷ recording)",
                      "written per step, rank 0 / rank 1"], table)
          + "\n## Pruning across shards: each part's top-k (stored) vs the global top-k of each layer\n\n"
          + md_table(["", "rank 0", "rank 1"], [
              ["per-part top-k, median per layer", *(f"{s['shard_s'] * 1e3:.2f} ms" for s in sel)],
              ["global top-k (3 collectives per layer), median", *(f"{s['global_s'] * 1e3:.2f} ms" for s in sel)],
              ["global kept ∩ per-part kept ÷ global kept", *(f"{s['overlap']:.1%}" for s in sel)],
              ["global: entries kept ÷ the part's k, median", *(f"{s['share']:.2f}" for s in sel)]])
          + f"\nLargest share of one rank under the global rule in any layer and step: {share:.2f}× its part's k "
            "(a fixed-width row would have to hold that many; the format's rows are fixed-width).\n\n"
          + "Forgetting quality, paper scenario (a) (digits, a random 1 % forgotten; the same run pruned both ways "
            "over 8 shards; means over seeds):\n\n"
          + md_table(["keep", "rule", "forget acc", "test acc", "MIA AUC", "distance to retrained"], qrows)
          + "\nChosen rule: **per-part top-k** — no collective per layer and step (the global selection costs the "
            "times above, on every layer of every step, and grows with the number of ranks), a fixed k per part "
            "(the format's fixed-width rows; the global rule's per-rank counts vary), the same bytes, and the "
            "forgetting figures above side by side.\n"
          + "\n## Projection: a GPT-style model over 8 GPUs\n\nCompressed ÷ raw measured here on real updates: "
          + ", ".join(f"keep {k}: {r:.2f}" for k, r in ratios.items()) + "\n\n"
          + md_table(["model", "store per step", "per rank per step", "10k steps", "full log, 10k steps", "of the full log"],
                     projection(ratios)))
    print(md)
    write_results("fsdp", results, md, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
