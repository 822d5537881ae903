"""Recording overhead: plain training against the same training with a store attached (keep 0.1
bf16), on the three CPU targets of issue #16, side by side in one run.

Run: ``python -m benchmarks.recording [--quick] [--malloc fixed]`` (≈ 9 minutes on 2 CPU cores; ``--quick`` ≈ 30 s).
``python -m benchmarks.speed`` runs it too, as the first table of ``speed.md``.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from unlearn.models import DigitsCNN, WideCNN
from updatestore import UpdateStore

from ._common import machine, md_table, parser, write_results

__all__ = ["RECORDING_TARGETS", "STEPS", "NOTE", "recording_overhead", "recording_table", "main"]

#: The recording targets of issue #16: (name, model factory, input shape, batch, floor).
RECORDING_TARGETS = (
    ("digits CNN (38k), batch 32", DigitsCNN, (1, 8, 8), 32, 0.85),
    ("28×28 conv net (407k), batch 128", lambda: DigitsCNN(in_hw=28), (1, 28, 28), 128, 0.95),
    ("WideCNN (11.0M), batch 32", WideCNN, (3, 32, 32), 32, 0.95),
)
#: Steps per run and interleaved pairs of runs, per target: full, quick. A full run writes at least one
#: block in its loop on the 11M CNN (16 steps a block); the two small models' blocks (256 and 1024
#: steps) are written at close, which is counted.
STEPS = (([1000, 120, 32], [7, 7, 5]), ([40, 6, 2], [1, 1, 1]))

NOTE = ("Pairs of runs of the same steps (plain, then recording), interleaved; the median of the pairs' ratios "
        "(plain training alone on this 2-core machine varies by up to 30 % between runs with glibc's default malloc, whose "
        "page faults in torch's own allocations `--malloc fixed` removes). *Throughput* counts the whole "
        "recording run: the loop and closing the recorder (the last block, the arrays' trim, the index, the "
        "model's fingerprint), whose time is shown beside it; *loop only* leaves the close out. Δθ + top-k and "
        "the snapshot are the training thread's time in the recorder (`rec.seconds`); *exact Δθ alone* is plain training "
        "÷ training that only copies the parameters before each step and subtracts them after (from the optimizer's "
        "hooks, as the recorder does; a third run of each pair): the bound for any recorder of the exact update "
        "on this machine; *background CPU* is the "
        "CPU time of the library's threads (the writer: encoding, compression, writes; the thread pool; zarr's "
        "I/O loop) per step, loop and close.\n")


def _background_cpu() -> float:
    """CPU seconds so far of the process's threads but the main thread and threads Python did not start
    (torch's OpenMP workers, which spin while they wait): the library's writer, pool and zarr's I/O loop,
    dead ones included (Linux; elsewhere it counts the OpenMP workers too)."""
    ours = {threading.main_thread().native_id} | {t.native_id for t in threading.enumerate()}
    foreign = 0.0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        tasks = []
    for tid in tasks:
        if int(tid) in ours:
            continue
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # it just ended
            continue
        foreign += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return time.process_time() - time.thread_time() - foreign  # called on the main thread


def recording_overhead(tmp: Path, steps: list[int], repeats: list[int]) -> list[dict]:
    """Plain training against training with a store attached (keep 0.1 bf16), see ``NOTE``."""
    out = []
    for (name, make, shape, batch, floor), n, reps in zip(RECORDING_TARGETS, steps, repeats):
        g = torch.Generator().manual_seed(0)
        data = [(torch.randn(batch, *shape, generator=g), torch.randint(0, 10, (batch,), generator=g))
                for _ in range(4)]
        ids = [torch.arange(batch) + i * batch for i in range(n)]  # a loader yields them either way

        def run(record: bool, floor: bool = False) -> tuple[float, float, float, dict]:
            torch.manual_seed(0)
            model = make()
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            store = UpdateStore.create(tmp / f"rec-{time.monotonic_ns()}.zarr", model, keep=0.1) if record else None
            rec = store.recorder(model, opt).attach() if record else None
            hooks = _exact_delta_hooks(model, opt) if floor else []
            c0 = _background_cpu()
            t0 = time.perf_counter()
            for i in range(n):
                x, y = data[i % len(data)]
                if rec is not None:
                    rec.begin(ids[i])
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
                if rec is not None:
                    rec.end()
            t1 = time.perf_counter()
            if rec is not None:
                rec.detach()
            for h in hooks:
                h.remove()
            return t1 - t0, time.perf_counter() - t1, _background_cpu() - c0, dict(rec.seconds) if rec else {}

        run(True)  # warm-up: compiled kernels, thread pools, allocator
        triples = [(run(False), run(True), run(False, floor=True)) for _ in range(reps)]
        pairs = [(a, b) for a, b, _ in triples]
        med = statistics.median
        out.append({"model": name, "floor": floor, "steps": n, "pairs": reps,
                    "plain_s": med([a[0] for a, _ in pairs]), "recording_s": med([b[0] + b[1] for _, b in pairs]),
                    "ratio": med([a[0] / (b[0] + b[1]) for a, b in pairs]),
                    "ratio_exact_delta": med([a[0] / f[0] for a, _, f in triples]),
                    "ratio_loop_only": med([a[0] / b[0] for a, b in pairs]),
                    "close_ms": med([b[1] for _, b in pairs]) * 1e3,
                    "overhead_ms_per_step": med([(b[0] + b[1] - a[0]) / n * 1e3 for a, b in pairs]),
                    "topk_ms_per_step": med([b[3]["prune"] for _, b in pairs]) / n * 1e3,
                    "snapshot_ms_per_step": med([b[3]["snapshot"] for _, b in pairs]) / n * 1e3,
                    "background_cpu_ms_per_step": med([b[2] for _, b in pairs]) / n * 1e3})
        r = out[-1]
        print(f"  recording {name}: {r['ratio']:.3f}x (loop only {r['ratio_loop_only']:.3f}x; target {floor}; "
              f"exact Δθ alone {r['ratio_exact_delta']:.3f}x); "
              f"overhead {r['overhead_ms_per_step']:.2f} ms/step, top-k {r['topk_ms_per_step']:.2f}, snapshot "
              f"{r['snapshot_ms_per_step']:.2f}, background CPU {r['background_cpu_ms_per_step']:.2f}, close "
              f"{r['close_ms']:.0f} ms", file=sys.stderr)
    return out


def _exact_delta_hooks(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list:
    """What any recorder of the exact Δθ must do, and nothing else: copy the parameters into one buffer before
    each step and subtract them after it, from the optimizer's hooks as the recorder does (no top-k, no
    hand-off, no writer). Its throughput is the bound the recording targets are measured against here."""
    params = [p for p in model.parameters() if p.requires_grad]
    buf = torch.empty(sum(p.numel() for p in params))
    views, o = [], 0
    for p in params:
        views.append(buf[o:o + p.numel()].view(p.shape))
        o += p.numel()

    @torch.no_grad()
    def before(*_: object) -> None:
        torch._foreach_copy_(views, params)

    @torch.no_grad()
    def after(*_: object) -> None:
        torch._foreach_sub_(views, params)

    return [opt.register_step_pre_hook(before), opt.register_step_post_hook(after)]


def recording_table(rec: list[dict]) -> str:
    return md_table(["model", "steps × pairs", "plain s", "recording s", "throughput", "target", "exact Δθ alone",
                     "loop only",
                     "close ms (once a run)", "overhead ms/step", "Δθ + top-k ms/step", "snapshot ms/step",
                     "background CPU ms/step"],
                    [[r["model"], f"{r['steps']} × {r['pairs']}", f"{r['plain_s']:.2f}", f"{r['recording_s']:.2f}",
                      f"**{r['ratio']:.2f}**", f"≥ {r['floor']}", f"{r['ratio_exact_delta']:.2f}",
                      f"{r['ratio_loop_only']:.2f}", f"{r['close_ms']:.0f}",
                      f"{r['overhead_ms_per_step']:.2f}", f"{r['topk_ms_per_step']:.2f}",
                      f"{r['snapshot_ms_per_step']:.2f}", f"{r['background_cpu_ms_per_step']:.2f}"] for r in rec])


#: ``--malloc fixed``: glibc's allocator told to keep freed memory (both arms run with it). With its
#: defaults, torch's per-step activations were returned to the OS and faulted back in: 0.05–1.3 million
#: minor page faults per 120 steps of the 28×28 net, in plain runs too, varying from run to run, and
#: more of them with a recorder attached even when it did no work (its threads and buffers move where
#: glibc's adaptive thresholds settle). This setting removed them (sys time 27 → 7 s over a full run).
FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(64 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def main(argv: list[str] | None = None) -> int:
    ap = parser("recording", __doc__, "one short pair of runs per model (≈ 30 s)")
    ap.add_argument("--malloc", choices=("default", "fixed"), default="default",
                    help="glibc malloc as the process started (default) or with FIXED_MALLOC's settings (re-executes "
                         "this benchmark with them; results go to recording-fixed-malloc.*)")
    args = ap.parse_args(argv)
    fixed = all(os.environ.get(k) == v for k, v in FIXED_MALLOC.items())
    if args.malloc == "fixed" and not fixed:  # glibc reads them once, at start: run again with them
        cmd = [sys.executable, "-m", "benchmarks.recording", *(sys.argv[1:] if argv is None else argv)]
        os.execve(sys.executable, cmd, {**os.environ, **FIXED_MALLOC})
    steps, repeats = STEPS[args.quick]
    with tempfile.TemporaryDirectory(prefix="bench-recording-") as t:
        rec = recording_overhead(Path(t), steps, repeats)
    malloc = ("glibc malloc with " + ", ".join(f"`{k}={v}`" for k, v in FIXED_MALLOC.items()) + " (both arms)"
              if fixed else "glibc malloc as the process started (its defaults unless the environment set them)")
    flags = (" --quick" if args.quick else "") + (" --malloc fixed" if args.malloc == "fixed" else "")
    text = (f"# Recording overhead ({'quick' if args.quick else 'full'} run)\n\nCommand: `python -m benchmarks.recording"
            f"{flags}`; machine: {machine()}; {malloc}\n\n{NOTE}\n" + recording_table(rec) + "\n")
    print(text)
    write_results("recording-fixed-malloc" if args.malloc == "fixed" else "recording",
                  {"machine": machine(), "quick": args.quick, "malloc": dict(FIXED_MALLOC) if fixed else "as started",
                   "recording": rec}, text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
