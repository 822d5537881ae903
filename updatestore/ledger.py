"""The audit ledger: one entry per unlearning, stored in the store itself (JSON attributes).

Read, append and update go through :class:`~updatestore.UpdateStore` (``ledger()``,
``log_unlearning()``, ``update_ledger()``); the helpers here compute what an entry holds.

Sample IDs are kept only as SHA-256 digests, so purging a request's IDs from the
sample index also removes them in clear from disk. (A digest of a small integer
can be reversed by enumerating the ID space; it keeps IDs out of plain sight, no more.)
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
import zarr

from ._format import LEDGER, LEDGER_COUNT
from ._params import canonical_name
from .errors import CorruptStoreError, NotAStoreError

__all__ = ["weights_fingerprint", "hash_ids", "ledger_ids", "KEYED_FIELD", "UNKEYED_FIELD", "lineage_entries", "subtracted_in_lineage", "ids_in_ledger", "now",
           "read_entries", "append_entry", "update_entry"]


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of every parameter's name, dtype, shape and bytes (the model's exact state).

    >>> len(weights_fingerprint(torch.nn.Linear(2, 2)))
    64
    """
    h = hashlib.sha256()
    for name, p in model.named_parameters():  # canonical names: a compiled module is the same model
        name = canonical_name(name)
        # A DTensor (FSDP2) is gathered whole, one parameter at a time (a collective: every rank
        # calls this), so the fingerprint does not depend on how the model is sharded.
        t = (p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach()).cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():  # hashed in place: a bytes copy of the weights doubled the time
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


#: Ledger field of keyed digests (stores since 0.2) and of the unkeyed ones (older stores).
KEYED_FIELD, UNKEYED_FIELD = "sample_id_hmac", "sample_id_sha256"


def hash_ids(ids: Iterable[int], key: str | None = None) -> list[str]:
    """Short digests of sample IDs, as the ledger stores them: HMAC-SHA-256 under the store's
    ``ledger_key`` (``store.meta["ledger_key"]``, since 0.2), or plain SHA-256 without a key
    (stores from 0.1, whose ledgers an enumeration of small ID spaces can read).

    >>> hash_ids([7])[0] != hash_ids([7], key="00" * 32)[0]
    True
    """
    if key is None:
        return [hashlib.sha256(f"updatestore-id:{int(i)}".encode()).hexdigest()[:32] for i in ids]
    secret = bytes.fromhex(key)
    return [hmac.new(secret, f"updatestore-id:{int(i)}".encode(), hashlib.sha256).hexdigest()[:32] for i in ids]


def ledger_ids(ids: Iterable[int], key: str | None) -> dict[str, list[str]]:
    """The ledger entry's field of digests for ``ids``: keyed when the store has a key."""
    return {KEYED_FIELD if key else UNKEYED_FIELD: hash_ids(ids, key)}


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def lineage_entries(entries: list[dict[str, Any]], fingerprint: str) -> list[int]:
    """Indices of the ledger entries in the chain that produced the model ``fingerprint``, newest first.

    >>> lineage_entries([{"model_before": "a", "model_after": "b", "steps": [1]}], "b")
    [0]
    """
    after = {e.get("model_after"): i for i, e in enumerate(entries) if e.get("steps")}
    out: list[int] = []
    fp = fingerprint
    while fp in after and after[fp] not in out:
        out.append(after[fp])
        fp = entries[after[fp]].get("model_before")
    return out


def subtracted_in_lineage(entries: list[dict[str, Any]], fingerprint: str) -> set[int]:
    """Steps already subtracted from the model whose weights hash to ``fingerprint``.

    Follows the chain of ledger entries whose ``model_after`` is the current
    model, then their ``model_before``, and so on. A model the ledger never saw
    (a fresh copy of the trained weights) has had nothing subtracted.
    """
    after = {e.get("model_after"): e for e in entries if e.get("steps")}
    steps: set[int] = set()
    seen: set[str] = set()
    fp = fingerprint
    while fp in after and fp not in seen:
        seen.add(fp)
        entry = after[fp]
        steps.update(int(s) for s in entry["steps"])
        fp = entry.get("model_before")
    return steps


def ids_in_ledger(entries: list[dict[str, Any]], ids: np.ndarray, key: str | None = None) -> np.ndarray:
    """Mask over ``ids``: which appear in some ledger entry (``key``: the store's ``ledger_key``)."""
    plain = {h for e in entries for h in e.get(UNKEYED_FIELD, [])}
    keyed = {h for e in entries for h in e.get(KEYED_FIELD, [])}
    ids = list(ids)
    found = np.array([h in plain for h in hash_ids(ids)], dtype=bool)
    if key and keyed:
        found |= np.array([h in keyed for h in hash_ids(ids, key)], dtype=bool)
    return found


def read_entries(root: zarr.Group, where: str) -> list[dict[str, Any]]:
    """The ledger's entries (empty when nothing was unlearned yet).

    Stores written since 0.2 count the entries beside the commit record; a ledger holding
    fewer (deleted, or replaced by an older copy) is corruption: read as empty, it would let
    the same steps be subtracted again.
    """
    entries = LEDGER.read_list(root, NotAStoreError(f"{where}: the audit ledger (ledger/zarr.json) is damaged"))
    written = LEDGER_COUNT.read(root)
    if written is not None and len(entries) < written[0]:
        raise CorruptStoreError(
            f"{where}: the audit ledger holds {len(entries)} entries but {written[0]} were written (ledger/zarr.json "
            "was deleted or replaced by an older copy); restore it from a backup before unlearning again")
    return entries


def append_entry(root: zarr.Group, where: str, entry: dict[str, Any]) -> int:
    """Append ``entry``; returns its index."""
    entries = read_entries(root, where)
    entries.append(dict(entry))
    LEDGER.write(root, entries)  # one atomic write of the whole ledger
    # Then the count (a crash between leaves the ledger one ahead of it, which reads fine).
    LEDGER_COUNT.write(root, len(entries))
    return len(entries) - 1


def update_entry(root: zarr.Group, where: str, index: int, **fields: Any) -> None:
    """Set ``fields`` on entry ``index``."""
    entries = read_entries(root, where)
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(entries):
        raise IndexError(f"{where}: the audit ledger has no entry {index!r} ({len(entries)} entries)")
    entries[index] = dict(entries[index], **fields)
    LEDGER.write(root, entries)  # one atomic write of the whole ledger
