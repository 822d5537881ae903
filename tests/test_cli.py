"""The command line, run as a subprocess: output, --json, and one-line errors with exit code 2."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import file_bytes
from unlearn.data import load_digits
from unlearn.models import DigitsCNN
from unlearn.training import fit
from updatestore import UpdateStore


def run(*args, cwd):
    proc = subprocess.run([sys.executable, "-m", "unlearn.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A trained store, its weights and an IDs file, built once; tests get their own copy."""
    d = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = DigitsCNN()
    store = UpdateStore.create(d / "run.zarr", model, keep=0.1)
    fit(model, load_digits().train, store=store, epochs=1)
    store.close()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "w.safetensors"))
    (d / "ids.txt").write_text("3\n17, 2000\n")
    return d


def assert_one_subtraction(store_dir, weights, ids, written):
    """Oracle: the library's unlearning of ``ids`` from ``weights`` with an untouched store equals ``written``."""
    import unlearn

    model = DigitsCNN()
    model.load_state_dict(load_file(str(weights)))
    with UpdateStore.open(store_dir, "r+") as store:
        unlearn.amnesiac(model, store, ids)
    got = load_file(str(written))
    for k, v in model.state_dict().items():
        assert torch.equal(got[k], v), k


@pytest.fixture
def workdir(pristine, tmp_path):
    """This test's own copy of the pristine directory: no test sees another's purge."""
    import shutil

    d = tmp_path / "work"
    shutil.copytree(pristine, d)
    return d


def test_info_text_and_json(workdir):
    rc, out, _ = run("info", "run.zarr", cwd=workdir)
    assert rc == 0 and "steps: 43 (43 recorded, 0 skipped, 0 indexed only, 0 purged)" in out
    assert "full amnesiac log" in out
    rc, out, _ = run("info", "run.zarr", "--json", cwd=workdir)
    info = json.loads(out)
    assert rc == 0 and info["steps"] == 43 and info["samples_indexed"] == 1347
    assert [lay["name"] for lay in info["layers"]][:2] == ["conv1.weight", "conv1.bias"]
    assert 0 < info["footprint"]["ratio"] < 0.1


def test_query_json_matches_library(workdir):
    rc, out, _ = run("query", "run.zarr", "--samples-file", "ids.txt", "--json", cwd=workdir)
    res = json.loads(out)
    store = UpdateStore.open(workdir / "run.zarr")
    assert rc == 0 and res["unknown"] == [2000]
    assert res["steps"] == store.batches_containing([3, 17]).tolist()


def test_unlearn_writes_safetensors_equal_to_library(workdir):
    import shutil

    shutil.copytree(workdir / "run.zarr", workdir / "copy.zarr")  # the CLI purges what it subtracted
    rc, out, err = run("unlearn", "run.zarr", "--model", "unlearn.models:DigitsCNN", "--weights", "w.safetensors",
                       "--samples", "3,17", "--out", "out.safetensors", "--json", cwd=workdir)
    assert rc == 0, err
    report = json.loads(out)
    assert report["found"] == 2 and report["applied"]
    assert_one_subtraction(workdir / "copy.zarr", workdir / "w.safetensors", [3, 17], workdir / "out.safetensors")
    rc, out, _ = run("info", "run.zarr", "--json", cwd=workdir)
    info = json.loads(out)
    assert info["ledger"][0]["steps"] == report["steps_hit"] and info["ledger"][0]["purged"]
    assert info["steps_purged"] == len(report["steps_hit"])


def test_dry_run_writes_nothing(workdir):
    before = file_bytes(workdir)
    rc, out, _ = run("unlearn", "run.zarr", "--model", "unlearn.models:DigitsCNN", "--weights", "w.safetensors",
                     "--samples", "3", "--dry-run", cwd=workdir)
    assert rc == 0 and "would subtract" in out
    assert file_bytes(workdir) == before  # the store, the weights, everything: bit-identical


@pytest.mark.parametrize("args,message", [
    (["info", "missing.zarr"], "no update store at missing.zarr: the path does not exist"),
    (["query", "run.zarr", "--samples", "3,x"], "sample IDs must be integers"),
    (["query", "run.zarr"], "give exactly one of --samples"),
    (["query", "run.zarr", "--samples", "18446744073709551616"], "must fit in int64"),
    (["query", "run.zarr", "--samples=--5"], "sample IDs must be integers"),
    (["query", "run.zarr", "--samples", "1_000"], "sample IDs must be integers"),
    (["query", "run.zarr", "--samples", "\u0663"], "sample IDs must be integers"),
    (["unlearn", "run.zarr", "--model", "unlearn.models:DigitsCNN", "--weights", "w.safetensors", "--samples", "3",
      "--out", "o.safetensors", "--device", "cuda"], "no CUDA device"),
    (["unlearn", "run.zarr", "--model", "unlearn.models:WideCNN", "--weights", "w.safetensors", "--samples", "3",
      "--out", "o.safetensors"], "do not fit --model unlearn.models:WideCNN"),
    (["unlearn", "run.zarr", "--model", "nope.mod:F", "--weights", "w.safetensors", "--samples", "3",
      "--out", "o.safetensors"], "cannot import --model nope.mod:F"),
    (["unlearn", "run.zarr", "--model", "unlearn.models:DigitsCNN", "--weights", "missing.safetensors",
      "--samples", "3", "--out", "o.safetensors"], "weights file missing.safetensors does not exist"),
    (["unlearn", "run.zarr", "--model", "unlearn.models:DigitsCNN", "--weights", "ids.txt", "--samples", "3",
      "--out", "o.safetensors"], "cannot read weights ids.txt as safetensors"),
])
def test_user_errors_are_one_line_exit_2(workdir, args, message, capsys, monkeypatch):
    from unlearn.cli import main

    monkeypatch.chdir(workdir)  # in-process (a subprocess per case cost 2.5 s of imports each)
    rc = main(list(args))
    out, err = capsys.readouterr()
    assert rc == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("updatestore: error: ") and message in err
    assert "Traceback" not in err


def test_model_store_mismatch_is_user_error(workdir):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    save_file(model.state_dict(), str(workdir / "lin.safetensors"))
    (workdir / "factory.py").write_text("import torch\ndef make():\n    return torch.nn.Sequential(torch.nn.Linear(3, 2))\n")
    rc, _, err = run("unlearn", "run.zarr", "--model", "factory:make", "--weights", "lin.safetensors",
                     "--samples", "3", "--out", "o.safetensors", cwd=workdir)
    assert rc == 2 and "was recorded for a model with layer 'conv1.weight'" in err


def test_failed_save_leaves_the_store_untouched(workdir):
    before = file_bytes(workdir / "run.zarr")
    rc, out, err = run("unlearn", "run.zarr", "--model", "unlearn.models:DigitsCNN", "--weights", "w.safetensors",
                       "--samples", "3,17", "--out", "no/such/dir/out.safetensors", cwd=workdir)
    assert rc == 2 and "directory no/such/dir does not exist" in err
    assert file_bytes(workdir / "run.zarr") == before


KILLER = r"""
import os, signal, sys
target, nth = sys.argv[1], int(sys.argv[2])
calls = {"n": 0}

def arm(owner, name):
    real = getattr(owner, name)
    def wrapper(*a, **k):
        calls["n"] += 1
        if calls["n"] == nth:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)
    setattr(owner, name, wrapper)

import torch, zarr, updatestore.ledger as ledger
if target == "subtract":
    arm(torch.Tensor, "copy_")
elif target == "ledger":
    arm(ledger, "append_entry")
elif target == "output":
    arm(os, "replace")
elif target == "purge":
    arm(zarr.Array, "__setitem__")
from unlearn.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("point,nth", [("subtract", 3), ("output", 1), ("ledger", 1), ("purge", 1), ("purge", 4)])
def test_sigkill_during_cli_unlearn_then_retry(pristine, workdir, point, nth):
    """A kill at any point leaves the old state (store untouched, no output) or a state the same
    request finishes: the final weights equal one subtraction, and the samples are purged."""
    (workdir / "killer.py").write_text(KILLER)
    before = file_bytes(workdir / "run.zarr")
    before.pop("updatestore.lock", None)
    args = ["unlearn", "run.zarr", "--model", "unlearn.models:DigitsCNN", "--samples", "3,17"]
    proc = subprocess.run([sys.executable, "killer.py", point, str(nth), *args, "--weights", "w.safetensors",
                           "--out", "out.safetensors"], cwd=workdir, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    if not (workdir / "out.safetensors").exists():
        after = file_bytes(workdir / "run.zarr")
        after.pop("updatestore.lock", None)  # the lock file names its last holder (the kernel freed the lock)
        assert after == before  # old state: nothing changed
    # the repeated request, on the newest weights the user has; the error says when to use the original ones
    latest = "out.safetensors" if (workdir / "out.safetensors").exists() else "w.safetensors"
    rc, out, err = run(*args, "--weights", latest, "--out", "final.safetensors", cwd=workdir)
    if rc == 2 and "run it again on the weights it started from" in err:
        rc, out, err = run(*args, "--weights", "w.safetensors", "--out", "final.safetensors", cwd=workdir)
    assert rc == 0, err
    with UpdateStore.open(workdir / "run.zarr") as store:
        assert store.batches_containing([3, 17]).tolist() == []  # forgotten and purged
        assert store.ledger()[-1]["purged"]
    # oracle: one unlearning of the same request by the library, on an untouched copy of the store
    import shutil

    shutil.copytree(pristine / "run.zarr", workdir / "ref.zarr")
    assert_one_subtraction(workdir / "ref.zarr", pristine / "w.safetensors", [3, 17], workdir / "final.safetensors")


def test_version_and_demo_help(workdir):
    from updatestore import FORMAT_VERSION, __version__

    rc, out, _ = run("--version", cwd=workdir)
    assert rc == 0 and out.strip() == f"updatestore {__version__} (writes format {FORMAT_VERSION})"
    rc, out, _ = run("demo", "--help", cwd=workdir)
    assert rc == 0 and "--epochs" in out and "--store" in out and "--forget" in out


def test_query_after_purge_says_forgotten_not_never_recorded(workdir):
    rc, _, err = run("unlearn", "run.zarr", "--model", "unlearn.models:DigitsCNN", "--weights", "w.safetensors",
                     "--samples", "3", "--out", "out.safetensors", cwd=workdir)
    assert rc == 0, err
    rc, out, _ = run("query", "run.zarr", "--samples", "3,2000", cwd=workdir)
    assert rc == 0 and "forgotten and purged (in the audit ledger): 3" in out
    assert "unknown sample IDs (never recorded): 2000" in out
    res = json.loads(run("query", "run.zarr", "--samples", "3,2000", "--json", cwd=workdir)[1])
    assert res["forgotten_and_purged"] == [3] and res["unknown"] == [2000]


def test_unlearn_reads_weights_saved_with_tied_tensors_once(tmp_path):
    """safetensors' save_model stores a tied tensor once; the CLI loads such files (load_model)."""
    from safetensors.torch import save_model

    (tmp_path / "tied.py").write_text(
        "import torch\n"
        "class Tied(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.emb = torch.nn.Embedding(10, 4)\n"
        "        self.out = torch.nn.Linear(4, 10, bias=False)\n"
        "        self.out.weight = self.emb.weight\n"
        "    def forward(self, x):\n"
        "        return self.out(self.emb(x))\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    return Tied()\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import tied

        model = tied.make()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("tied", None)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with UpdateStore.create(tmp_path / "s.zarr", model, keep=1.0, value_dtype="float32") as store, \
            store.recorder(model, opt) as rec:
        for s in range(3):
            with rec.batch([s]):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(torch.tensor([s])), torch.tensor([s + 1])).backward()
                opt.step()
    save_model(model, str(tmp_path / "tied.safetensors"))  # one tensor for the two names
    assert len(load_file(str(tmp_path / "tied.safetensors"))) == 1
    rc, out, err = run("unlearn", "s.zarr", "--model", "tied:make", "--weights", "tied.safetensors",
                       "--samples", "0,1,2", "--out", "o.safetensors", cwd=tmp_path)
    assert rc == 0, err
    got = load_file(str(tmp_path / "o.safetensors"))
    torch.testing.assert_close(got["emb.weight"], tied.make().emb.weight.detach(), rtol=0, atol=1e-6)
