"""The ``updatestore`` command: thin over the library, one-line errors for user mistakes.

User mistakes (missing store, bad IDs, model/store mismatch, unreadable weights)
print ``updatestore: error: ...`` and exit with code 2; bugs show a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from updatestore import (
    FORMAT_VERSION,
    PURGED_ID,
    STATUS_NONFINITE,
    STATUS_NOT_STORED,
    STATUS_PURGED,
    STATUS_RECORDED,
    STATUS_SKIPPED,
    UpdateStore,
    UpdateStoreError,
    __version__,
    as_sample_ids,
    ids_in_ledger,
)

__all__ = ["main", "CliError"]


class CliError(UpdateStoreError, ValueError):
    """A command-line argument that cannot be used (file missing, bad factory path...)."""


def _ids(args: argparse.Namespace) -> np.ndarray:
    if (args.samples is None) == (args.samples_file is None):
        raise CliError("give exactly one of --samples 3,17,42 or --samples-file ids.txt")
    if args.samples is not None:
        text = args.samples
    else:
        try:
            text = Path(args.samples_file).read_text()
        except OSError as exc:
            raise CliError(f"cannot read --samples-file {args.samples_file}: {exc.strerror}") from None
    tokens = [t for t in text.replace(",", " ").split() if t]
    # ASCII digits only: int() would also take "1_000" and non-ASCII digits, which no key file means.
    bad = next((t for t in tokens if not re.fullmatch(r"-?[0-9]+", t)), None)
    if bad is not None:
        raise CliError(f"sample IDs must be integers separated by commas or spaces; got {bad[:40]!r}")
    values = [int(t) for t in tokens]
    if not values:
        raise CliError("no sample IDs given")
    return as_sample_ids(values)


def _print(obj: Any, as_json: bool, text: str) -> None:
    print(json.dumps(obj, indent=2, default=str) if as_json else text)


def cmd_info(args: argparse.Namespace) -> int:
    with UpdateStore.open(args.store) as store, store.pinned():  # one commit state for every figure
        meta = store.meta
        status = store.step_status()
        fp = store.footprint()
        info = {
            "path": store.path,
            "format_version": meta["format_version"],
            "library_version": meta["library_version"],
            "created": meta["created"],
            "value_dtype": store.value_dtype,
            "steps": int(store.num_batches),
            "steps_recorded": int((status == STATUS_RECORDED).sum()),
            "steps_skipped": int((status == STATUS_SKIPPED).sum()),
            "steps_not_stored": int((status == STATUS_NOT_STORED).sum()),
            "samples_indexed": int(store.num_samples),
            "distinct_samples": int(len(np.setdiff1d(store.samples_in_steps(np.arange(store.num_batches)),
                                                     [PURGED_ID]))),
            "layers": [{"name": s.name, "shape": list(s.shape), "keep": s.keep, "k": s.k, "positions": s.positions}
                       for s in store.layers],
            "footprint": fp.to_dict(),
            "ledger": store.ledger(),
            "steps_purged": int((status == STATUS_PURGED).sum()),
            "steps_nonfinite": int((status == STATUS_NONFINITE).sum()),
            "history": store.history(),
        }
    width = max(len(layer["name"]) for layer in info["layers"])
    lines = [
        f"store {info['path']}: format {info['format_version']}, written by updatestore {info['library_version']} "
        f"on {info['created']}",
        f"steps: {info['steps']} ({info['steps_recorded']} recorded, {info['steps_skipped']} skipped, "
        f"{info['steps_not_stored']} indexed only, {info['steps_purged']} purged"
        f"{', ' + str(info['steps_nonfinite']) + ' non-finite (NaN/inf, not stored)' if info['steps_nonfinite'] else ''}); "
        f"samples indexed: {info['samples_indexed']} "
        f"({info['distinct_samples']} distinct); values: {info['value_dtype']}",
        "layers:",
        *[f"  {lay['name']:<{width}}  {str(tuple(lay['shape'])):<16} keep {lay['keep']:<6} k {lay['k']:<8} "
          f"{lay['positions']}" for lay in info["layers"]],
        str(fp),
        f"history: {len(info['history'])} event(s)" + "".join(
            f"; {e.get('event')} at step {e.get('step')}" + (f" (from {e.get('from_step')})" if 'from_step' in e else "")
            for e in info["history"][-5:]),
        f"audit ledger: {len(info['ledger'])} unlearning(s); {info['steps_purged']} step(s) purged",
        *[f"  [{i}] {e.get('time')} {e.get('method')}: {len(e.get('sample_id_hmac', e.get('sample_id_sha256', [])))} samples, "
          f"{len(e.get('steps', []))} steps, model {str(e.get('model_before'))[:12]} -> "
          f"{str(e.get('model_after'))[:12]}{', purged' if e.get('purged') else ''}"
          for i, e in enumerate(info["ledger"])],
    ]
    _print(info, args.json, "\n".join(lines))
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    ids = np.unique(_ids(args))
    with UpdateStore.open(args.store) as store, store.pinned():  # one commit state for every figure
        found = store.contains(ids)
        steps = store.batches_containing(ids[found])
        others = np.setdiff1d(store.samples_in_steps(steps), ids)
        total = store.num_batches
        # A purged ID is a tombstone in the index: the ledger's hashed IDs tell it from one never recorded.
        purged = np.zeros(ids.size, bool)
        purged[~found] = (ids_in_ledger(store.ledger(), ids[~found], store.meta.get("ledger_key"))
                          if (~found).any() else [])
    unknown = ~found & ~purged
    out = {"samples": ids.tolist(), "unknown": ids[unknown].tolist(), "forgotten_and_purged": ids[purged].tolist(),
           "steps": steps.tolist(), "steps_total": total, "other_samples_in_those_steps": int(others.size)}
    text = (f"{int(found.sum())}/{ids.size} samples found in {steps.size} of {total} steps"
            f"{': ' + ', '.join(map(str, steps[:20].tolist())) + (' ...' if steps.size > 20 else '') if steps.size else ''}\n"
            f"{others.size} other samples share those steps")
    if purged.any():
        text += f"\nforgotten and purged (in the audit ledger): {', '.join(map(str, ids[purged][:20].tolist()))}"
    if unknown.any():
        text += f"\nunknown sample IDs (never recorded): {', '.join(map(str, ids[unknown][:20].tolist()))}"
    _print(out, args.json, text)
    return 0


def _build_model(spec: str):
    import torch

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise CliError(f"--model must be MODULE:FACTORY (e.g. unlearn.models:DigitsCNN), got {spec!r}")
    if os.getcwd() not in sys.path:  # as `python -m` does: a factory module beside the user's files
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise CliError(f"cannot import --model {spec}: {exc}") from None
    try:
        model = factory()
    except TypeError as exc:
        raise CliError(f"--model {spec} must be callable with no arguments: {exc}") from None
    if not isinstance(model, torch.nn.Module):
        raise CliError(f"--model {spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def cmd_unlearn(args: argparse.Namespace) -> int:
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    from .errors import UnknownModelError
    from .methods import amnesiac

    ids = _ids(args)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise CliError("--device cuda: this torch has no CUDA device available (use --device cpu)")
    model = _build_model(args.model)
    if not Path(args.weights).is_file():
        raise CliError(f"weights file {args.weights} does not exist")
    try:
        # load_model, not load_file + load_state_dict: weights saved with tied tensors stored once load too
        load_model(model, args.weights, strict=True)
    except (SafetensorError, OSError) as exc:
        raise CliError(f"cannot read weights {args.weights} as safetensors: {exc}") from None
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        detail = detail if len(detail) <= 300 else detail[:300] + " ..."
        raise CliError(f"weights {args.weights} do not fit --model {args.model}: {detail}") from None
    if not args.dry_run and args.out is None:
        raise CliError("--out is required (where to write the unlearned weights), or pass --dry-run")
    if not args.dry_run and not Path(args.out).parent.is_dir():
        raise CliError(f"cannot write --out {args.out}: directory {Path(args.out).parent} does not exist")
    mode = "r" if args.dry_run or (args.no_ledger and args.no_purge) else "r+"
    with UpdateStore.open(args.store, mode) as store, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # unknown IDs are in the printed report
        if args.device:
            model.to(args.device)
        # Order of effects: subtract in memory, write --out durably, and only then touch the
        # store (ledger entry, purge). A failure before the rename leaves the store untouched.
        try:
            report = amnesiac(model, store, ids, device=args.device, dry_run=args.dry_run,
                              progress=not args.quiet and sys.stderr.isatty(), ledger=not args.no_ledger,
                              purge=not args.no_purge, defer=True)
        except UnknownModelError as exc:
            raise CliError(f"{exc}. If an interrupted `updatestore unlearn` wrote these weights, run it again on "
                           "the weights it started from: nothing of that run reached the store") from None
        if not args.dry_run:
            _refuse_stale_weights(report, store, model)
            _save_atomically(model, Path(args.out))
            report.commit()
    _print(report.to_dict() | {"out": None if args.dry_run else str(args.out)}, args.json,
           str(report) + ("" if args.dry_run else f"\nwrote {args.out}"))
    return 0


def _refuse_stale_weights(report: Any, store: UpdateStore, model: Any) -> None:
    """Never write an --out that still holds samples the store can no longer subtract (their rows
    were purged after an earlier unlearning of these IDs), unless the weights are that unlearning's result."""
    from updatestore import weights_fingerprint

    if report.applied or not (report.steps_unavailable or len(report.already_forgotten)):
        return
    if weights_fingerprint(model) in {e.get("model_after") for e in store.ledger()}:
        return  # an unlearned model: it already had these steps subtracted
    raise CliError(
        "these samples were already forgotten and their steps purged from the store, but the weights given "
        "were never unlearned: nothing was written. Use the weights that unlearning wrote (running this "
        "command on them finishes an interrupted purge)")


def _save_atomically(model: Any, out: Path) -> None:
    """Write the weights as safetensors through a temporary file, fsync, rename, fsync the directory."""
    from safetensors.torch import save_file

    # Cloned so that tied weights (one tensor under two names) save as two tensors.
    state = {k: v.detach().clone().contiguous().cpu() for k, v in model.state_dict().items()}
    if not out.parent.is_dir():
        raise CliError(f"cannot write --out {out}: directory {out.parent} does not exist")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        save_file(state, str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except OSError as exc:
        raise CliError(f"cannot write --out {out}: {exc.strerror or exc}; the store was not changed") from None
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    return demo_main(args.rest + (["--quiet"] if args.quiet else []))


def cmd_bench(args: argparse.Namespace) -> int:
    try:
        mod = importlib.import_module(f"updatestore_benchmarks.{args.name}")
    except ImportError as exc:
        raise CliError(f"benchmarks are not installed with this copy of updatestore ({exc})") from None
    return mod.main((["--quick"] if args.quick else []) + args.rest)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="updatestore", description="Inspect update stores, query them, unlearn.")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--version", action="version", version=f"updatestore {__version__} (writes format {FORMAT_VERSION})")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="what a store holds and its footprint")
    s.add_argument("store")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_info)

    def samples(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--samples", help="comma-separated sample IDs")
        sp.add_argument("--samples-file", help="file of sample IDs (whitespace or comma separated)")

    s = sub.add_parser("query", help="the steps that used some samples")
    s.add_argument("store")
    samples(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_query)

    s = sub.add_parser("unlearn", help="amnesiac unlearning of safetensors weights")
    s.add_argument("store")
    s.add_argument("--model", required=True, help="MODULE:FACTORY that builds the model, e.g. unlearn.models:DigitsCNN")
    s.add_argument("--weights", required=True, help="the trained weights (.safetensors)")
    samples(s)
    s.add_argument("--out", help="where to write the unlearned weights (.safetensors)")
    s.add_argument("--dry-run", action="store_true", help="report the steps and collateral, change nothing")
    s.add_argument("--device", choices=["cpu", "cuda"], default=None)
    s.add_argument("--no-ledger", action="store_true", help="do not append an entry to the store's audit ledger")
    s.add_argument("--no-purge", action="store_true", help="keep the subtracted rows and the IDs on disk")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_unlearn)

    # add_help=False: `updatestore demo --help` reaches the demo's own parser, which lists its options
    s = sub.add_parser("demo", add_help=False, help="train on the bundled digits with a store attached, then unlearn "
                                                    "(options: updatestore demo --help)")
    s.set_defaults(func=cmd_demo, passthrough=True)

    s = sub.add_parser("bench", help="run a benchmark script (other options go to it)")
    s.add_argument("name", choices=["storage", "recording", "speed", "paper", "batching", "scale", "lifecycle", "readpath", "fsdp", "gpu"])
    s.add_argument("--quick", action="store_true")
    s.set_defaults(func=cmd_bench, passthrough=True)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args, rest = p.parse_known_args(argv)
    if rest and not getattr(args, "passthrough", False):
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    try:
        return args.func(args)
    except UpdateStoreError as exc:
        print(f"updatestore: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `updatestore info x | head`: the reader left, not an error
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
