"""Amnesiac and partial amnesiac unlearning: subtract the stored updates of the steps that used
the samples to forget (Graves et al. 2021; Gogineni & Nadimi 2024)."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from updatestore import ConfigError, CorruptStoreError, LayerSpec, OtherRankError, Rows, UpdateStore, canonical_name, kept_count, resolve_keep, weights_fingerprint
from updatestore.distributed import all_ok, is_sharded, local_range, local_tensor

from ..choice import Auto, choose, legacy_auto
from ..errors import NonFiniteUpdateError
from ..report import UnlearnReport
from ..request import log, purge as purge_request, resolve

__all__ = ["amnesiac", "pick_device", "AUTO_CANDIDATES"]

#: Decoded rows read per block by default (two blocks are in memory at once: one read ahead).
BLOCK_BYTES = 64 * 2**20

#: Ratios ``keep=Auto(...)`` tries by default (each clipped to what the store recorded).
AUTO_CANDIDATES = (1.0, 0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005)

Pairs = list[tuple[LayerSpec, torch.nn.Parameter]]
#: Per parameter: its local flat range ``[a, b)`` (all of it unless an FSDP shard) and the indices,
#: into the list of stored layers read, of the parts that overlap it.
Targets = list[tuple[int, int, list[int]]]


def _targets(store: UpdateStore, pairs: Pairs) -> tuple[list[LayerSpec], Targets]:
    """The stored layers to read (a sharded store's parts overlapping what this rank holds) and how
    each parameter's local delta is assembled from them."""
    by_param: dict[str, list[LayerSpec]] = {}
    for spec in store.parts:
        by_param.setdefault(spec.name if spec.part is None else spec.part[0], []).append(spec)
    read: list[LayerSpec] = []
    targets: Targets = []
    for spec, p in pairs:
        a, b = local_range(spec.name, p)
        hit = []
        for part in by_param[spec.name]:
            offset = 0 if part.part is None else part.part[1]
            if offset < b and offset + part.numel > a:
                hit.append(len(read))
                read.append(part)
        targets.append((a, b, hit))
    return read, targets


def _offset(spec: LayerSpec) -> int:
    return 0 if spec.part is None else spec.part[1]


def _assemble(parts: list[LayerSpec], targets: Targets, sums: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each parameter's local delta from its parts' sums (the sum itself when one part is exactly it)."""
    out = []
    for a, b, hit in targets:
        if len(hit) == 1 and _offset(parts[hit[0]]) == a and parts[hit[0]].numel == b - a:
            out.append(sums[hit[0]])
            continue
        delta = torch.zeros(b - a, dtype=torch.float32, device=sums[hit[0]].device if hit else None)
        for j in hit:
            o, n = _offset(parts[j]), parts[j].numel
            lo, hi = max(a, o), min(b, o + n)
            delta[lo - a: hi - a] += sums[j][lo - o: hi - o]
        out.append(delta)
    return out


def pick_device(model: torch.nn.Module, device: str | torch.device | None) -> torch.device:
    """``device`` if given (checked); else the model's CUDA device; else CUDA if available; else CPU."""
    if device is not None:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(f"device {device!r} is not a torch device ({exc}); use 'cpu', 'cuda' or 'cuda:N'") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} asked for, but CUDA is not available here; use device='cpu'")
        return dev
    for p in model.parameters():
        if p.device.type == "cuda":
            return p.device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _accumulate(store: UpdateStore, parts: list[LayerSpec], steps: np.ndarray, device: torch.device, block: int,
                progress: bool, ks: list[list[int]]) -> list[list[torch.Tensor]]:
    """Σ over ``steps`` of the stored rows per layer, scatter-added on ``device`` (float32).

    ``ks`` lists candidates, each a per-layer count k' ≤ k: a candidate sums only
    the k' largest-|value| entries of each stored row. All candidates come from
    one pass over the rows: each row is sorted by magnitude once and the nested
    prefixes are added. Steps are read in blocks of at most ``block`` (cut where shards end),
    every layer of a block in one concurrent fetch, so memory is bounded by one block.
    """
    accs = [[torch.zeros(spec.numel, dtype=torch.float32, device=device) for spec in parts] for _ in ks]
    names = [spec.name for spec in parts]
    chunks = store.read_groups(steps, block)  # cut at shard ends: each shard file is fetched once
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(chunks), desc="unlearning", unit="block", leave=False)
    # The next block is read (fetched, checked, decompressed) while this one is added: the
    # read is I/O and Blosc, the sum compiled kernels, and both release the GIL. At most two
    # blocks are in memory.
    with ThreadPoolExecutor(1, thread_name_prefix="updatestore-prefetch") as ahead:
        pending = ahead.submit(store.read, chunks[0], names) if chunks else None
        for i in range(len(chunks)):
            rows = pending.result()
            pending = ahead.submit(store.read, chunks[i + 1], names) if i + 1 < len(chunks) else None
            for li, spec in enumerate(parts):
                layer = rows.pop(spec.name).to(device)
                # Stored rows are the top-k of the true update, so the top-k' of a row
                # is exactly the top-k' of the true update (k' ≤ k).
                order = (torch.argsort(layer.values.abs(), dim=1, descending=True)
                         if any(k[li] < spec.k for k in ks) else None)
                for acc, k in zip(accs, ks):
                    layer.sum(acc[li], None if k[li] >= spec.k else order[:, : k[li]])
            if bar is not None:
                bar.update()
    if bar is not None:
        bar.close()
    return accs


def _counts_for(store: UpdateStore, parts: list[LayerSpec], keep: Any, clip: bool = False) -> list[int]:
    """Per stored layer k' for a deletion-time keep (None: as recorded). A sharded store's parts are
    pruned each on its own, as they were recorded (FORMAT.md, "Parts")."""
    if keep is None:
        return [spec.k for spec in parts]
    names = [spec.name if spec.part is None else spec.part[0] for spec in parts]
    ratios = resolve_keep(keep, list(dict.fromkeys(names)))
    out = []
    for spec, name in zip(parts, names):
        k = kept_count(ratios[name], spec.numel)
        if k > spec.k and not clip:
            raise ConfigError(
                f"keep {ratios[name]} for layer {name!r} asks for {k} entries per step, but store "
                f"{store.path} recorded only {spec.k} (keep {spec.keep}); choose keep ≤ {spec.keep}"
            )
        out.append(min(k, spec.k))
    return out


def _max_abs(t: torch.Tensor) -> float:
    """max |t| (NaN if t holds one): one pass, no temporary. ``t.abs().max()`` and ``isfinite(t).all()``
    cost 2 and 10 ms on 4.2M entries, ``aminmax`` 0.6 ms (2-core CPU)."""
    lo, hi = (float(v) for v in torch.aminmax(t.reshape(-1)))
    return math.nan if math.isnan(lo) or math.isnan(hi) else max(-lo, hi)


def _new_values(store: UpdateStore, pairs: Pairs, deltas: list[torch.Tensor],
                max_update: float | None = None) -> list[torch.Tensor | None]:
    """θ − Δ per layer, in the parameter's dtype and device, refused if not finite or (``max_update``)
    if some |Δ| exceeds ``max_update × (max|θ| + 1)`` of its layer: no training run moves a weight that
    far, a forged or damaged store can (finite values up to 3e38 pass every checksum one recomputes)."""
    out: list[torch.Tensor | None] = []
    for (spec, param), delta in zip(pairs, deltas):
        p = local_tensor(param)  # an FSDP parameter: this rank's shard
        if max_update is not None and delta.numel():
            bound = max_update * (_max_abs(p.detach()) + 1.0)
            biggest = _max_abs(delta)
            if biggest > bound:
                raise CorruptStoreError(
                    f"unlearning layer {spec.name!r} of store {store.path} would change a weight by {biggest:.3g}, "
                    f"more than max_update={max_update:g} × (max|θ| + 1) = {bound:.3g}: the store is probably forged "
                    "or damaged; nothing was applied (pass max_update=None to apply it anyway)")
        d = delta.view(p.shape)
        if d.dtype == p.dtype and d.device == p.device:
            # into the accumulator, which nothing reads after this: no layer-sized allocation (on the
            # 4.2M-entry layer of benchmarks/readpath.py a new tensor cost 7.6 ms, mostly page faults)
            new = torch.sub(p.detach(), d, out=d)
        else:
            new = p.detach() - d.to(device=p.device, dtype=p.dtype)
        if new.numel() and not math.isfinite(_max_abs(new)):
            raise NonFiniteUpdateError(
                f"unlearning layer {spec.name!r} of store {store.path} gives non-finite values; "
                "nothing was applied (check the store with `updatestore info`)"
            )
        out.append(new)
    return out


#: Entries swapped at a time by ``_safe_apply`` (its one scratch buffer: 4 MiB of float32).
SWAP_CHUNK = 1 << 20


def _safe_apply(pairs: Pairs, new_values: list[torch.Tensor]) -> None:
    """Put the new values into the parameters; on any failure restore every parameter, bit for bit.

    Each parameter and its new values' buffer are swapped a chunk at a time through one small
    scratch buffer, so the buffer ends up holding the old values (kept until every layer is done)
    and applying allocates nothing the size of a layer: cloning each parameter first had cost a
    second copy of the model and, on the 4.2M-entry layer of ``benchmarks/readpath.py``, 7 ms of
    page faults. A failure at any point, an interrupt between two copies included, swaps back
    what was swapped (``state`` says which copy of which chunk came last).
    """
    done: list[tuple[torch.Tensor, torch.Tensor]] = []  # (parameter, buffer now holding its old values)
    state: tuple | None = None  # (parameter, buffer, scratch, lo, hi, copies of the chunk begun)
    scratch: torch.Tensor | None = None
    with torch.no_grad():
        try:
            for i, (_, param) in enumerate(pairs):
                t, new = local_tensor(param).detach(), new_values[i]
                if not (t.is_contiguous() and new.is_contiguous() and new.dtype == t.dtype
                        and new.device == t.device and new.shape == t.shape):
                    old = t.clone()  # not swappable in place (a strided parameter): keep a copy
                    t.copy_(new)
                    done.append((t, old))
                    new_values[i] = None
                    continue
                a, b = t.view(-1), new.view(-1)
                need = max(1, min(SWAP_CHUNK, a.numel()))
                if scratch is None or scratch.dtype != a.dtype or scratch.device != a.device or scratch.numel() < need:
                    scratch = torch.empty(need, dtype=a.dtype, device=a.device)
                for lo in range(0, a.numel(), SWAP_CHUNK):
                    hi = min(a.numel(), lo + SWAP_CHUNK)
                    s = scratch[: hi - lo]
                    state = (a, b, s, lo, hi, 0)
                    s.copy_(a[lo:hi])
                    state = (a, b, s, lo, hi, 1)
                    a[lo:hi].copy_(b[lo:hi])
                    state = (a, b, s, lo, hi, 2)
                    b[lo:hi].copy_(s)
                done.append((a, b))
                state = None
                new_values[i] = None
        except BaseException:
            if state is not None:  # the layer being swapped: its chunks before lo, and this one if begun
                a, b, s, lo, hi, begun = state
                if begun >= 1:
                    a[lo:hi].copy_(s)
                a[:lo].copy_(b[:lo])
            for a, old in done:
                a.copy_(old)
            raise


def amnesiac(model: torch.nn.Module, store: UpdateStore, sample_ids: Any = None, *, owners: Any = None,
             keep: float | Mapping[str, float] | Auto | None = None, device: str | torch.device | None = None,
             dry_run: bool = False, block_steps: int | None = None, progress: bool = False, ledger: bool = True,
             purge: bool = True, defer: bool = False, allow_unknown_model: bool = False,
             max_update: float | None = 1e3, **legacy: Any) -> UnlearnReport:
    """Forget ``sample_ids`` (and every sample of ``owners``) by subtracting the stored updates
    of every step that used them: θ' = θ − Σ_b Δθ_b, with Δθ_b as stored (all of it at
    keep = 1, the layer-wise top-k otherwise).

    Rows are read in blocks of ``block_steps`` steps (default: as many as hold
    ``BLOCK_BYTES`` of decoded rows) and scatter-added on ``device`` (CUDA when
    available), so memory does not grow with the number of steps hit. Every
    layer's result is checked finite before any parameter changes; a failure leaves
    the model as it was. Idempotent: steps the audit ledger shows were already
    subtracted from this very model (by a hash of its weights) are not subtracted
    again. ``ledger=True`` appends an audit entry; ``purge=True`` then erases the
    subtracted rows and the forgotten IDs from disk (both need ``"r+"``).

    Purging is irreversible, so it should follow the save of the unlearned model:
    ``defer=True`` changes only the model and writes nothing to the store until you call
    ``report.commit()`` after saving (it then appends the ledger entry and purges, as
    ``ledger``/``purge`` say). A crash before the commit leaves the store as it was: the
    same request on the original weights gives the same result. A model whose
    weights the store never saw (not at a checkpoint, not at the end of recording, not as an
    unlearning's result) is refused unless ``allow_unknown_model=True``. A layer whose summed update
    exceeds ``max_update`` × (its largest |weight| + 1) is refused as a forged or damaged store
    (``max_update=None`` turns the check off).

    ``keep`` chooses the pruning at deletion time: only the top-k' of each stored row
    (k' = ceil(keep × numel) ≤ the recorded k; a float or ``{pattern: ratio}``), or
    ``Auto(forget=..., validation=...)`` to try several ratios from one pass over the
    rows and pick one (see :class:`unlearn.Auto`; ``report.candidates`` has the table).

    >>> report = unlearn.amnesiac(model, store, [3, 17, 42], dry_run=True)  # doctest: +SKIP
    >>> print(report)                                                       # doctest: +SKIP
    amnesiac: 3/3 samples found; would subtract 5 of 420 steps (1.2%)
    """
    t0 = time.perf_counter()
    unexpected = sorted(set(legacy) - {"forget", "validation", "target", "candidates"})
    if unexpected:
        raise TypeError(f"amnesiac() got unexpected keyword arguments {unexpected}")
    if isinstance(keep, str):
        if keep != "auto":
            raise ConfigError(f"keep must be a ratio, a {{pattern: ratio}} mapping, None or Auto(...); got {keep!r}")
        keep = legacy_auto("keep", legacy.get("forget"), legacy.get("validation"), legacy.get("target"),
                           legacy.get("candidates"))
    elif legacy:
        raise ConfigError(f"{sorted(legacy)} only go with keep='auto'; pass keep=unlearn.Auto(...) instead")
    for name, flag in (("ledger", ledger), ("purge", purge), ("defer", defer), ("dry_run", dry_run)):
        if not isinstance(flag, bool):
            raise ConfigError(f"{name} must be True or False, got {flag!r}")
    if max_update is not None and (isinstance(max_update, bool) or not isinstance(max_update, (int, float))
                                   or not max_update > 0):
        raise ConfigError(f"max_update must be a positive number or None, got {max_update!r}")
    if block_steps is not None and (isinstance(block_steps, bool) or not isinstance(block_steps, int) or block_steps < 1):
        raise ConfigError(f"block_steps must be an int ≥ 1 (steps read per block) or None, got {block_steps!r}")
    pairs = store.check_model(model)
    # An FSDP model: every rank calls this and changes its own shards; rank 0 writes the ledger and purges.
    group = next((p.device_mesh.get_group() for _, p in pairs if is_sharded(p)), None)
    sharded = group is not None
    first = not sharded or torch.distributed.get_rank(group) == 0
    if sharded and isinstance(keep, Auto):
        raise ConfigError("keep=Auto(...) evaluates candidate models and needs an unsharded model; with FSDP, "
                          "pass a ratio (or None)")
    parts, targets = _targets(store, pairs)
    if block_steps is None:
        # Counting int64 positions for every layer made blocks of one step for a 29.5M-parameter GPT, and
        # the per-call cost of 100 layers then dominated unlearning (4.5 s against 1.8 s for 24 steps).
        step_bytes = sum(Rows.step_bytes(spec, store.value_dtype) for spec in parts)
        block_steps = max(1, min(4096, BLOCK_BYTES // max(1, step_bytes)))
    dev = pick_device(model, device)
    auto = isinstance(keep, Auto)
    ratios = keep.ratios(AUTO_CANDIDATES) if isinstance(keep, Auto) else [keep]
    ks = [_counts_for(store, parts, r, clip=auto) for r in ratios]
    best, table, applied, news = 0, [], False, None
    # The request's steps, statuses and rows come from one commit state: a "r" handle otherwise
    # re-reads the commit record on every query (8 times here, ~1 ms each).
    reading = False
    try:
        with store.pinned():
            req = resolve(model, store, sample_ids, owners, writes=not dry_run and (ledger or purge) and first,
                          allow_unknown_model=allow_unknown_model)
            read0, total = store.bytes_read, store.num_batches
            if not dry_run and req.hit.size:
                reading = True  # every rank of an FSDP model: the steps hit are the same on each
                news = [_new_values(store, pairs, _assemble(parts, targets, sums), max_update)
                        for sums in _accumulate(store, parts, req.hit, dev, block_steps, progress, ks)]
    except BaseException:  # leaving the block checks the store too (StoreChangedError)
        if sharded and reading:
            all_ok(False, group)
        raise
    if news is not None:
        if sharded and not all_ok(True, group):  # nothing is applied on any rank
            raise OtherRankError("unlearning failed on another rank (see its error); this rank's shards are unchanged")
        if isinstance(keep, Auto):
            def build(scratch: torch.nn.Module, ratio: float) -> None:
                params = {canonical_name(n): p for n, p in scratch.named_parameters()}
                with torch.no_grad():
                    for (spec, _), value in zip(pairs, news[ratios.index(ratio)]):
                        params[spec.name].copy_(value)

            best, table, _ = choose(model, keep, ratios, build)
        new_values = news[best]
        del news
        _safe_apply(pairs, new_values)
        applied = True
    bytes_read = store.bytes_read - read0  # before the purge, whose rewrites read chunks too
    method = "amnesiac" if all(s.k == s.numel for s in store.layers) else "partial amnesiac"
    kept: dict[str, int] = {}  # entries per step of each parameter, over all its parts
    for spec, k in zip(store.parts, _counts_for(store, list(store.parts), ratios[best], clip=auto)):
        name = spec.name if spec.part is None else spec.part[0]
        kept[name] = kept.get(name, 0) + k
    # hashed now (a deferred commit must log these weights, not what the model holds by then), and only
    # for the ledger: it reads every weight (11 of 450 ms on benchmarks/readpath.py's MLP). On every rank,
    # not only the one that writes it: an FSDP model's fingerprint gathers each parameter (a collective).
    after = weights_fingerprint(model) if applied and ledger else req.fingerprint

    def commit() -> tuple[int | None, bool]:
        entry = log(store, req, after, method=method, kept=kept) if applied and ledger and first else None
        return entry, purge and first and purge_request(store, req, entry)

    entry, purged, pending = None, False, None
    if defer and not dry_run:
        pending = commit
    elif not dry_run:
        entry, purged = commit()
    return UnlearnReport(
        method=method, requested=int(req.ids.size), found=int(req.found.sum()), unknown=req.unknown,
        steps_hit=req.hit, steps_total=total, steps_without_update=req.without_update,
        collateral=req.collateral, bytes_read=bytes_read, seconds=time.perf_counter() - t0, dry_run=dry_run,
        applied=applied, device=str(dev), keep={s.name: s.keep for s in store.layers},
        steps_already_subtracted=int(req.was_done.sum()), steps_unavailable=int(req.unavailable.size),
        already_forgotten=req.already_forgotten, purged=purged, ledger_entry=entry, candidates=table, kept=kept,
        steps_nonfinite=req.nonfinite, pending=pending,
    )
