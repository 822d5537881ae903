"""Fault injection: every file class of a small store deleted, truncated, zeroed or symlinked away, and
SIGKILL at every write point of index persistence, owner indexing, the ledger and purge.

Each case must end in "clean error" (an ``UpdateStoreError``, the model unchanged) or "same result"
(the queries, rows and unlearned weights of the undamaged store). Run as a script for the table:

    python tests/test_faults.py            # one file per class (what CI's default run checks)
    python tests/test_faults.py --full     # every file
"""

from __future__ import annotations

import copy
import shutil
import signal
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # when run as a script

import unlearn  # noqa: E402
from conftest import make_tiny, read_rows, train  # noqa: E402
from updatestore import UpdateStore, UpdateStoreError  # noqa: E402

FORGET = [3, 10]
FAULTS = ("delete", "truncate", "zero", "symlink")


def make_store(root: Path) -> tuple[Path, torch.nn.Module]:
    model = make_tiny()
    keep = {"fc1.weight": 0.01, "fc2.bias": 1.0, "*": 0.5}  # gaps, dense and bitmap layers
    with UpdateStore.create(root / "s.zarr", model, keep=keep) as store:
        train(store, model, steps=12, ids_fn=lambda s: np.arange(8) + 4 * (s % 4))
        store.index_owners(np.arange(20), np.arange(20) // 4)
    return root / "s.zarr", model


def observe(path: Path, model: torch.nn.Module) -> dict:
    """Everything a user asks a store, and the result of unlearning (on a copy of the model)."""
    with UpdateStore.open(path) as store:
        m = copy.deepcopy(model)
        unlearn.amnesiac(m, store, FORGET, ledger=False, purge=False)
        return {"params": {n: p.detach().clone() for n, p in m.named_parameters()},
                "steps": store.batches_containing(list(range(40))).tolist(),
                "owners": store.samples_of([1, 2]).tolist(), "ledger": len(store.ledger()),
                "status": store.step_status().tolist(),
                "rows": {s.name: read_rows(store, s.name, 0, store.num_batches) for s in store.layers}}


def same(a: dict, b: dict) -> bool:
    if any(a[k] != b[k] for k in ("steps", "owners", "ledger", "status")):
        return False
    for name, (v, p) in a["rows"].items():
        v2, p2 = b["rows"][name]
        if not torch.equal(v, v2) or not torch.equal(p, p2):
            return False
    return all(torch.equal(a["params"][n], b["params"][n]) for n in a["params"])


def file_class(rel: str) -> str:
    """``layers/fc1.weight/values/c/0/0`` -> ``layers/*/values/c``; ``steps/zarr.json`` stays."""
    parts = rel.split("/")
    if parts[0] == "layers" and len(parts) > 2:  # layers/<name>/...: one class for every layer
        parts[1] = "*"
    if "c" in parts:
        parts = parts[: parts.index("c") + 1]
    return "/".join(parts)


def files_of(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != "updatestore.lock")


def inject(target: Path, fault: str, outside: Path) -> None:
    if fault == "delete":
        target.unlink()
    elif fault == "truncate":
        target.write_bytes(target.read_bytes()[: max(0, target.stat().st_size // 2)])
    elif fault == "zero":
        target.write_bytes(bytes(target.stat().st_size))
    elif fault == "symlink":  # the same bytes, but from outside the store
        copy_ = outside / target.name
        shutil.copy(target, copy_)
        target.unlink()
        target.symlink_to(copy_)


def run_case(src: Path, model, expected: dict, rel: str, fault: str, work: Path) -> str:
    shutil.copytree(src, work)
    outside = work.parent / (work.name + "-outside")
    outside.mkdir()
    inject(work / rel, fault, outside)
    try:
        got = observe(work, model)
    except UpdateStoreError as exc:
        return f"clean error ({type(exc).__name__})"
    except Exception as exc:  # noqa: BLE001 - a raw error is a finding, reported with the others
        return f"RAW ERROR ({type(exc).__name__}: {str(exc)[:80]})"
    return "same result" if same(got, expected) else "WRONG RESULT"


def cases(files: list[str], full: bool) -> list[tuple[str, str]]:
    chosen, seen = [], set()
    for rel in files:
        cls = file_class(rel)
        if full or cls not in seen:
            seen.add(cls)
            chosen += [(rel, f) for f in FAULTS]
    return chosen


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    src, model = make_store(tmp_path_factory.mktemp("faults"))
    return src, model, observe(src, model)


def test_every_file_class_and_fault_gives_a_clean_error_or_the_same_result(pristine, tmp_path):
    src, model, expected = pristine
    outcomes = {}
    for i, (rel, fault) in enumerate(cases(files_of(src), full=False)):
        outcomes[(rel, fault)] = run_case(src, model, expected, rel, fault, tmp_path / f"w{i}")
    wrong = {k: v for k, v in outcomes.items() if not v.startswith(("clean error", "same result"))}
    assert not wrong, wrong
    # data chunks must not be silently tolerated: deleting or zeroing one is always an error
    for (rel, fault), outcome in outcomes.items():
        if "/c/" in rel and fault in ("delete", "zero") and not rel.startswith("index/"):
            assert outcome.startswith("clean error"), (rel, fault, outcome)


@pytest.mark.slow
def test_every_file_and_fault_full(pristine, tmp_path):
    src, model, expected = pristine
    for i, (rel, fault) in enumerate(cases(files_of(src), full=True)):
        outcome = run_case(src, model, expected, rel, fault, tmp_path / f"w{i}")
        assert outcome.startswith(("clean error", "same result")), (rel, fault, outcome)


# ---------------------------------------------------------------- SIGKILL at every write point
KILLER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from zarr.storage import LocalStore
    sys.path.insert(0, sys.argv[4])
    nth, op, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    real, calls = LocalStore.set, {"n": 0}
    async def counted(self, key, value, *a, **k):
        calls["n"] += 1
        if calls["n"] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return await real(self, key, value, *a, **k)
    LocalStore.set = counted
    from updatestore import UpdateStore
    store = UpdateStore.open(path, "r+")
    if op == "index":
        store._table.forget_persisted(); store._table.persist(store.num_batches, store.num_samples, force=True)
    elif op == "owners":
        store.index_owners(np.arange(100, 140), np.arange(40) // 10 + 50)
    elif op == "ledger":
        store.log_unlearning({"time": "t", "method": "test", "steps": [1], "purged": False})
    elif op == "purge":
        store.purge([1, 5], samples=[3])
    store.close()
    print("writes", calls["n"])
""")


def answers(path: Path) -> dict:
    with UpdateStore.open(path) as store:
        return {"steps": store.batches_containing(list(range(40))).tolist(), "ledger": len(store.ledger()),
                "owners": store.samples_of([1, 50, 51]).tolist(), "status": store.step_status().tolist(),
                "ids": [store.samples_in(s).tolist() for s in range(store.num_batches)]}


def kill_points(src: Path, op: str, tmp: Path, every: bool) -> dict[int, str]:
    """Run ``op`` killed at write 1, 2, ... until it completes; classify each store left behind."""
    script = tmp / "killer.py"
    script.write_text(KILLER)
    before = answers(src)
    done = tmp / "done"
    shutil.copytree(src, done)
    out = subprocess.run([sys.executable, str(script), "0", op, str(done), str(Path(__file__).parent)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    writes = int(out.stdout.split()[-1])
    after = answers(done)
    points = range(1, writes + 1) if every else sorted({1, writes // 2, writes})
    result = {}
    for n in points:
        work = tmp / f"k{n}"
        shutil.copytree(src, work)
        proc = subprocess.run([sys.executable, str(script), str(n), op, str(work), str(Path(__file__).parent)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        try:
            got = answers(work)
        except UpdateStoreError as exc:
            result[n] = f"clean error ({type(exc).__name__})"
            continue
        result[n] = "as before" if got == before else "as after" if got == after else "MIXED"
        if op == "purge" and result[n] == "MIXED":  # purge is finished by repeating it (never undone)
            with UpdateStore.open(work, "r+") as store:
                store.purge([1, 5], samples=[3])
            result[n] = "as after once repeated" if answers(work) == after else "MIXED"
    return result


@pytest.mark.slow
@pytest.mark.parametrize("op", ["index", "owners", "ledger", "purge"])
def test_sigkill_at_every_write_point(tmp_path, op):
    src, _ = make_store(tmp_path)
    result = kill_points(src, op, tmp_path, every=True)
    assert all(v in ("as before", "as after", "as after once repeated") for v in result.values()), result


def main(argv: list[str]) -> int:
    import tempfile

    full = "--full" in argv
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        src, model = make_store(tmp / "src")
        expected = observe(src, model)
        table: dict[tuple[str, str], Counter] = {}
        for i, (rel, fault) in enumerate(cases(files_of(src), full)):
            outcome = run_case(src, model, expected, rel, fault, tmp / f"w{i}")
            table.setdefault((file_class(rel), fault), Counter())[outcome] += 1
        print("| file class | fault | outcome (files) |\n|---|---|---|")
        for (cls, fault), outcomes in sorted(table.items()):
            print(f"| `{cls}` | {fault} | " + ", ".join(f"{o} ×{c}" for o, c in sorted(outcomes.items())) + " |")
        print("\n| operation | SIGKILL at write | outcome |\n|---|---|---|")
        for op in ("index", "owners", "ledger", "purge"):
            d = tmp / f"kill-{op}"
            d.mkdir()
            src2, _ = make_store(d)
            res = kill_points(src2, op, d, every=full)
            summary = Counter(res.values())
            print(f"| {op} | {len(res)} point(s) | " + ", ".join(f"{o} ×{c}" for o, c in sorted(summary.items())) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
