"""Amnesiac and partial amnesiac unlearning: subtract the stored updates of the steps
that used the samples to forget (Graves et al. 2021; Gogineni & Nadimi 2024)."""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from updatestore import (
    STATUS_PURGED,
    STATUS_RECORDED,
    NonFiniteUpdateError,
    ReadOnlyStoreError,
    UpdateStore,
)
from updatestore.config import resolve_keep
from updatestore.errors import ConfigError
from updatestore.layout import PURGED_ID
from updatestore.pruning import kept_count
from updatestore.ledger import hash_ids, ids_in_ledger, now, subtracted_in_lineage, weights_fingerprint
from updatestore.index import as_sample_ids

from .report import UnlearnReport

__all__ = ["amnesiac", "pick_device", "AUTO_CANDIDATES"]

#: Ratios ``keep="auto"`` tries (each clipped to what the store recorded).
AUTO_CANDIDATES = (1.0, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005)


def pick_device(model: torch.nn.Module, device: str | torch.device | None) -> torch.device:
    """``device`` if given; else the model's CUDA device; else CUDA if available; else CPU."""
    if device is not None:
        return torch.device(device)
    for p in model.parameters():
        if p.device.type == "cuda":
            return p.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _blocks(steps: np.ndarray, block: int) -> list[np.ndarray]:
    """Split sorted steps into groups of at most ``block`` (bounded memory per read)."""
    return [steps[i : i + block] for i in range(0, len(steps), block)]


def _accumulate(store: UpdateStore, pairs: list, steps: np.ndarray, device: torch.device,
                block: int, progress: bool = False,
                ks: list[list[int]] | None = None) -> list[list[torch.Tensor]]:
    """Σ over ``steps`` of the stored rows per layer, scatter-added on ``device`` (float32).

    ``ks`` lists candidates, each a per-layer count k' ≤ k: a candidate sums only
    the k' largest-|value| entries of each stored row. All candidates come from
    one pass over the rows: each row is sorted by magnitude once and the nested
    prefixes are added. Returns one list of per-layer sums per candidate.

    Steps are read in blocks of at most ``block``, every layer of a block in one
    concurrent fetch, so memory is bounded by one block, not by the steps hit.
    """
    if ks is None:
        ks = [[spec.k for spec, _ in pairs]]
    accs = [[torch.zeros(spec.numel, dtype=torch.float32, device=device) for spec, _ in pairs] for _ in ks]
    names = [spec.name for spec, _ in pairs]
    chunks = _blocks(steps, block)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="unlearning", unit="block", leave=False)
    for chunk in chunks:
        rows = store.read_steps_many(names, chunk)
        for li, (spec, _) in enumerate(pairs):
            values, positions = rows.pop(spec.name)
            values = values.to(device, non_blocking=True)
            if positions is not None:
                positions = positions.to(device, non_blocking=True)
            order = None
            if any(k[li] < spec.k for k in ks):
                # Stored rows are the top-k of the true update, so the top-k' of a row
                # is exactly the top-k' of the true update (k' ≤ k).
                order = torch.argsort(values.abs(), dim=1, descending=True)
            for cand, k in zip(accs, ks):
                acc, kk = cand[li], k[li]
                if kk >= spec.k:
                    if positions is None:
                        acc += values.sum(0)
                    else:
                        acc.index_add_(0, positions.reshape(-1), values.reshape(-1))
                    continue
                sel = order[:, :kk]
                pos = sel if positions is None else positions.gather(1, sel)
                acc.index_add_(0, pos.reshape(-1), values.gather(1, sel).reshape(-1))
    return accs


def _counts_for(store: UpdateStore, pairs: list, keep: Any, clip: bool = False) -> list[int]:
    """Per-layer k' for a deletion-time keep (None: as recorded)."""
    if keep is None:
        return [spec.k for spec, _ in pairs]
    ratios = resolve_keep(keep, [spec.name for spec, _ in pairs])
    out = []
    for spec, _ in pairs:
        k = kept_count(ratios[spec.name], spec.numel)
        if k > spec.k and not clip:
            raise ConfigError(
                f"keep {ratios[spec.name]} for layer {spec.name!r} asks for {k} entries per step, but store "
                f"{store.path} recorded only {spec.k} (keep {spec.keep}); choose keep ≤ {spec.keep}"
            )
        out.append(min(k, spec.k))
    return out


def _new_values(store: UpdateStore, pairs: list, deltas: list[torch.Tensor]) -> list[torch.Tensor]:
    """θ − Δ per layer, in the parameter's dtype and device, refused if not finite."""
    out = []
    for (spec, p), delta in zip(pairs, deltas):
        new = p.detach() - delta.view(spec.shape).to(device=p.device, dtype=p.dtype)
        if not torch.isfinite(new).all():
            raise NonFiniteUpdateError(
                f"unlearning layer {spec.name!r} of store {store.path} gives non-finite values; "
                "nothing was applied (check the store with `updatestore info`)"
            )
        out.append(new)
    return out


def _choose(model: torch.nn.Module, pairs: list, news: list[list[torch.Tensor]], ratios: list[float],
            forget: Any, validation: Any, target: float | None) -> tuple[int, list[dict[str, Any]]]:
    """Evaluate each candidate on a scratch copy of the model; return the pick and the table."""
    from .choice import evaluate_candidate, pick

    scratch = copy.deepcopy(model)
    params = dict(scratch.named_parameters())
    table = []
    with torch.no_grad():
        for ratio, new in zip(ratios, news):
            for (spec, _), value in zip(pairs, new):
                params[spec.name].copy_(value)
            table.append(evaluate_candidate(scratch, ratio, forget, validation, target))
    return pick(table), table


def _copy_param(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value)


def _safe_apply(pairs: list, new_values: list[torch.Tensor | None]) -> None:
    """Copy new values into the parameters; on any failure restore every parameter.

    Each old value is kept just before its parameter is overwritten, and each new
    value is dropped just after, so peak memory stays near one copy of the model.
    """
    olds: list[torch.Tensor] = []
    with torch.no_grad():
        try:
            for i, (_, p) in enumerate(pairs):
                olds.append(p.detach().clone())
                _copy_param(p, new_values[i])
                new_values[i] = None
        except BaseException:
            for (_, p), old in zip(pairs, olds):
                p.copy_(old)
            raise


def amnesiac(model: torch.nn.Module, store: UpdateStore, sample_ids: Any = None, *, owners: Any = None,
             device: str | torch.device | None = None, dry_run: bool = False,
             block_steps: int = 16, progress: bool = False, ledger: bool = True,
             purge: bool = True, keep: float | Mapping[str, float] | str | None = None,
             forget: Any = None, validation: Any = None, target: float | None = None,
             candidates: Sequence[float] = AUTO_CANDIDATES) -> UnlearnReport:
    """Forget ``sample_ids`` by subtracting the stored updates of every step that used them.

    ``owners=[...]`` adds every sample the store indexed under those owner keys
    (:meth:`UpdateStore.index_owners`).

    θ' = θ − Σ_{steps b containing the samples} Δθ_b, with Δθ_b as stored (all
    of it at keep = 1, the layer-wise top-k otherwise). Rows are read in blocks
    of ``block_steps`` steps per layer and scatter-added on ``device`` (CUDA
    when available), so memory does not grow with the number of steps hit.
    Every layer's result is computed and checked finite before any parameter
    changes; a failure leaves the model as it was. ``progress=True`` shows a
    progress bar over the blocks of steps.

    Idempotent: steps the audit ledger shows were already subtracted from this
    very model (matched by a hash of its weights) are never subtracted again.
    ``ledger=True`` appends an entry to the store's audit ledger; ``purge=True``
    then erases the subtracted steps' rows and the forgotten IDs from disk
    (:meth:`UpdateStore.purge`). Both need the store opened ``"r+"``.

    ``keep`` chooses the pruning at deletion time: subtract only the top-k' of
    each stored row (k' = ceil(keep × numel) ≤ the recorded k; a float or a
    ``{pattern: ratio}`` mapping). Because each stored row is the top-k of the
    true update, its top-k' is exactly the top-k' of the true update.
    ``keep="auto"`` tries every ratio in ``candidates`` (clipped to what was
    recorded) from one pass over the rows, and picks the one that brings the
    accuracy on ``forget`` (a Dataset of the forgotten samples) to at most
    ``target`` — by default the candidate's own accuracy on the ``validation``
    samples of the same classes — with the best accuracy on ``validation``;
    ``report.candidates`` lists every candidate's figures.

    >>> report = unlearn.amnesiac(model, store, [3, 17, 42], dry_run=True)  # doctest: +SKIP
    >>> print(report)                                                       # doctest: +SKIP
    amnesiac: 3/3 samples found; would subtract 5 of 420 steps (1.2%)
    """
    t0 = time.perf_counter()
    pairs = store.check_model(model)
    if not dry_run and (ledger or purge) and store.mode != "r+":
        raise ReadOnlyStoreError(
            f"unlearning records an audit entry in store {store.path} and purges the forgotten rows: open it "
            "with UpdateStore.open(path, 'r+'), or pass ledger=False, purge=False"
        )
    if sample_ids is None and owners is None:
        raise ConfigError("give the sample IDs to forget, or owners=[...] whose samples to forget")
    ids = np.unique(as_sample_ids([] if sample_ids is None else sample_ids))
    if owners is not None:  # every sample indexed under these owners (user, document, source)
        ids = np.union1d(ids, store.samples_of(owners))
    entries = store.ledger()
    found = store.contains(ids) if ids.size else np.zeros(0, dtype=bool)
    forgotten_before = ~found & ids_in_ledger(entries, ids) if ids.size else np.zeros(0, dtype=bool)
    unknown = ids[~found & ~forgotten_before]
    if unknown.size:
        warnings.warn(f"{unknown.size} of {ids.size} sample IDs were never recorded in {store.path}: "
                      f"{unknown[:10].tolist()}", stacklevel=2)
    fingerprint = weights_fingerprint(model)
    done = subtracted_in_lineage(entries, fingerprint)
    steps = store.batches_containing(ids[found])
    status = store.step_status()
    was_done = np.isin(steps, np.fromiter(done, dtype=np.int64, count=len(done)))
    hit = steps[(status[steps] == STATUS_RECORDED) & ~was_done]
    unavailable = steps[(status[steps] == STATUS_PURGED) & ~was_done]
    if unavailable.size:
        warnings.warn(f"{unavailable.size} step(s) holding these samples were purged after unlearning another "
                      "copy of the model; their updates cannot be subtracted from this one", stacklevel=2)
    others = np.setdiff1d(store.samples_in_steps(hit), np.append(ids, PURGED_ID))
    dev = pick_device(model, device)
    read0 = store.bytes_read
    applied = purged = False
    entry = None
    auto = isinstance(keep, str)
    if auto and keep != "auto":
        raise ConfigError(f"keep must be a ratio, a {{pattern: ratio}} mapping, None or 'auto'; got {keep!r}")
    if auto and (forget is None or validation is None):
        raise ConfigError("keep='auto' needs forget= (the forgotten samples' Dataset) and validation= (a Dataset)")
    ratios = sorted(set(candidates), reverse=True) if auto else [keep]
    ks = [_counts_for(store, pairs, r, clip=auto) for r in ratios]
    chosen_counts = ks[0]
    table: list[dict[str, Any]] = []
    if not dry_run and hit.size:
        sums = _accumulate(store, pairs, hit, dev, block_steps, progress, ks)
        news = [_new_values(store, pairs, deltas) for deltas in sums]
        pick = 0
        if auto:
            pick, table = _choose(model, pairs, news, ratios, forget, validation, target)
        chosen_counts = ks[pick]
        new_values = news[pick]
        del news, sums
        _safe_apply(pairs, new_values)
        applied = True
    bytes_read = store.bytes_read - read0  # before the purge, whose rewrites read chunks too
    method = "amnesiac" if all(s.k == s.numel for s in store.layers) else "partial amnesiac"
    if applied and ledger:
        entry = store.log_unlearning({
            "time": now(), "method": method, "sample_id_sha256": hash_ids(ids[found]),
            "steps": hit.tolist(), "model_before": fingerprint, "model_after": weights_fingerprint(model),
            "kept_per_step": {spec.name: k for (spec, _), k in zip(pairs, chosen_counts)}, "purged": False,
        })
    if not dry_run and purge and found.any():
        # Steps subtracted now or earlier from this model, whose rows are still on disk.
        leftover = steps[(status[steps] == STATUS_RECORDED) & (was_done | np.isin(steps, hit))]
        store.purge(leftover, samples=ids[found])
        purged = True
        if entry is not None:
            store._update_ledger(entry, purged=True)
    return UnlearnReport(
        method=method,
        requested=int(ids.size),
        found=int(found.sum()),
        unknown=unknown,
        steps_hit=hit,
        steps_total=store.num_batches,
        steps_without_update=int(((status[steps] == 0) | (status[steps] == 2)).sum()),
        collateral=int(others.size),
        bytes_read=bytes_read,
        seconds=time.perf_counter() - t0,
        dry_run=dry_run,
        applied=applied,
        device=str(dev),
        keep={s.name: s.keep for s in store.layers},
        steps_already_subtracted=int(was_done.sum()),
        steps_unavailable=int(unavailable.size),
        already_forgotten=ids[forgotten_before],
        purged=purged,
        ledger_entry=entry,
        candidates=table,
        kept={spec.name: k for (spec, _), k in zip(pairs, chosen_counts)},
    )
