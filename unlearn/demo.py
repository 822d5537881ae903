"""The main job: train on the bundled digits with a store attached, show the footprint,
forget a handful of samples, and compare accuracy before and after.

Run: ``python -m unlearn.demo [--store PATH] [--keep 0.1] [--epochs 8]``
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from updatestore import UpdateStore

from .data import load_digits
from .metrics import accuracy
from .methods import amnesiac
from .models import DigitsCNN
from .training import fit

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m unlearn.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--store", type=Path, default=None, help="where to write the store (default: a temp dir)")
    ap.add_argument("--keep", type=float, default=0.1, help="fraction of each layer's update kept per step")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--forget", type=int, default=5, help="how many training samples to forget")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--save-weights", type=Path, default=None,
                    help="also write the trained weights (before unlearning) as safetensors")
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    data = load_digits(seed=args.seed)
    tmp = None
    path = args.store
    if path is None:
        tmp = tempfile.mkdtemp(prefix="updatestore-demo-")
        path = Path(tmp) / "digits.zarr"
    try:
        model = DigitsCNN(num_classes=data.num_classes)
        # Never overwrite: the demo deletes nothing it did not create (an existing --store is an error).
        store = UpdateStore.create(path, model, keep=args.keep)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"training a {n_params:,}-parameter CNN on {len(data.train)} digits for {args.epochs} epochs, "
              f"recording into {path} (keep={args.keep}, bfloat16)")
        secs = fit(model, data.train, store=store, epochs=args.epochs, seed=args.seed,
                   progress=not args.quiet and sys.stderr.isatty())
        print(f"trained in {secs:.1f} s, {store.num_batches} steps recorded\n")
        if args.save_weights is not None:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(args.save_weights))
            print(f"wrote the trained weights to {args.save_weights}\n")
        print(store.footprint(), "\n")

        rng = np.random.default_rng(args.seed)
        train_ids = data.train.tensors[2].numpy()
        forget = np.sort(rng.choice(train_ids, size=args.forget, replace=False))
        before = copy.deepcopy(model)
        dry = amnesiac(model, store, forget, dry_run=True)
        print(f"dry run for sample IDs {forget.tolist()}:\n{dry}\n")
        report = amnesiac(model, store, forget)
        print(f"{report}\n")

        mask = np.isin(train_ids, forget)
        forget_set = torch.utils.data.Subset(data.train, np.flatnonzero(mask).tolist())
        print(f"{'':22}{'before':>8}{'after':>8}")
        for name, ds in (("test accuracy", data.test), ("forgotten samples", forget_set)):
            print(f"{name:22}{accuracy(before, ds):8.3f}{accuracy(model, ds):8.3f}")
        store.close()
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
