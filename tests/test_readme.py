"""The README's examples run, and CI runs the README's test command."""

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def test_ci_runs_the_readme_test_command():
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1).strip().splitlines()
    assert len(first_block) == 2 and "unlearn.demo" in first_block[0] and "pytest" in first_block[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert first_block[1] in ci.splitlines()


def test_readme_python_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    runnable = [b for b in blocks if not b.startswith("# needs:")]  # those name what they need
    assert len(runnable) >= 1
    for block in runnable:
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})


def test_demo_prints_consistent_figures(capsys):
    """The demo's printed numbers agree with each other, not just its words."""
    from unlearn.demo import main

    assert main(["--epochs", "2", "--quiet", "--forget", "5"]) == 0
    out = capsys.readouterr().out
    recorded = int(re.search(r"trained in [\d.]+ s, (\d+) steps recorded", out).group(1))
    assert recorded == 2 * 43  # 1347 digits at batch 32, two epochs
    size, unit = re.search(r"update store: ([\d.]+) (KiB|MiB) on disk for (\d+) stored steps", out).group(1, 2)
    full = float(re.search(r"full amnesiac log \(dense float32\): ([\d.]+) MiB", out).group(1))
    ratio = float(re.search(r"ratio: ([\d.]+)% of the full log", out).group(1))
    store_mib = float(size) / (1024 if unit == "KiB" else 1)
    assert 0 < ratio < 10 and abs(ratio - 100 * store_mib / full) < 0.2
    dry = re.search(r"5/5 samples found; would subtract (\d+) of (\d+) steps", out)
    real = re.search(r"5/5 samples found; subtracted (\d+) of (\d+) steps", out)
    assert dry and real, out
    assert int(dry.group(1)) == int(real.group(1)) >= 1 and int(dry.group(2)) == int(real.group(2)) == recorded
    assert "audit ledger entry 0; rows and IDs purged from disk" in out
    before, after = map(float, re.search(r"test accuracy\s+([\d.]+)\s+([\d.]+)", out).groups())
    assert 0.5 < before <= 1 and 0 <= after <= 1
    assert re.search(r"forgotten samples\s+[\d.]+\s+[\d.]+", out)
