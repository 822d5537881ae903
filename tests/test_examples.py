"""The LLM example runs end to end (small settings) and its figures hang together."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
pytest.importorskip("transformers")

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_forget_document_example_runs(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "forget_document.py"), "--epochs", "3",
                          "--pretrain-steps", "40", "--store", str(tmp_path / "s.zarr")],
                         capture_output=True, text=True, timeout=600, check=True).stdout
    steps = int(re.search(r"(\d+) steps, keep", out).group(1))
    hit = re.search(r"4 documents, (\d+) of (\d+) steps subtracted", out)
    assert hit and int(hit.group(2)) == steps == 30 and int(hit.group(1)) == 3  # one step per epoch
    rows = {m.group(1).strip(): list(map(float, m.group(2).split()))
            for m in re.finditer(r"^(before unlearning|after unlearning|retrained without the owner)\s+(.*)$",
                                 out, re.M)}
    assert len(rows) == 3 and all(len(r) == 3 for r in rows.values())
    assert rows["after unlearning"][0] > rows["before unlearning"][0]  # the forgotten documents got less likely
