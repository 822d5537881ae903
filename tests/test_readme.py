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


def test_demo_runs(capsys):
    from unlearn.demo import main

    assert main(["--epochs", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "full amnesiac log" in out and "test accuracy" in out and "subtracted" in out
