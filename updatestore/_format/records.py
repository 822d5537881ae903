"""Checked records: small attribute documents that vouch for data, written in one atomic put.

Each record is a JSON attribute set on one group, with a check value over its
fields; a record whose check fails reads as ``None`` and the caller decides
whether that is corruption (the commit record) or a cache to rebuild (the index).
Zarr's ``update_attributes`` rewrites the group's ``zarr.json`` once, so a
record is never torn (``attrs.update()`` writes once per key and tore it).
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass
from typing import Any

import zarr

from ..errors import NotAStoreError

__all__ = ["CountRecord", "JsonRecord", "COUNTS", "GENERATION", "bump_generation", "read_state", "OWNER_COUNT", "INDEX_RECORD", "LEDGER", "LEDGER_COUNT", "LINEAGE", "META",
           "sha256_json", "read_counts", "part_record"]


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def _group(root: zarr.Group, path: str) -> zarr.Group:
    return root if path == "" else root[path]


@dataclass(frozen=True)
class CountRecord:
    """Non-negative integers with a CRC-32 of ``"tag:v1:v2..."``."""

    group: str
    tag: str
    fields: tuple[str, ...]
    check_key: str = "check"

    def _check(self, values: tuple[int, ...]) -> int:
        return zlib.crc32(":".join([self.tag, *map(str, values)]).encode())

    def read(self, root: zarr.Group) -> tuple[int, ...] | None:
        """The record's values, or ``None`` if it is missing, unreadable or fails its check."""
        try:
            attrs = dict(_group(root, self.group).attrs)
        except Exception:  # noqa: BLE001 - missing or unparsable zarr.json: no valid record
            return None
        return self.parse(attrs)

    def parse(self, attrs: dict[str, Any]) -> tuple[int, ...] | None:
        """The record's values in attributes already read, or ``None``."""
        values = tuple(attrs.get(f) for f in self.fields)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
            return None
        return values if attrs.get(self.check_key) == self._check(values) else None  # type: ignore[arg-type]

    def write(self, root: zarr.Group, *values: int) -> None:
        attrs = dict(zip(self.fields, (int(v) for v in values)))
        _group(root, self.group).update_attributes({**attrs, self.check_key: self._check(tuple(attrs.values()))})


@dataclass(frozen=True)
class JsonRecord:
    """One JSON value under ``key`` with its sha256 under ``check_key``."""

    group: str
    key: str
    check_key: str

    def read(self, root: zarr.Group) -> tuple[bool, Any]:
        """``(present, value)``: ``(False, None)`` when the group does not exist, ``value`` ``None``
        when it exists but is unreadable or fails its check."""
        try:
            if self.group and self.group not in root:
                return False, None
            attrs = dict(_group(root, self.group).attrs)
        except Exception:  # noqa: BLE001 - a damaged zarr.json: present, but not valid
            return True, None
        if self.key not in attrs:
            return False, None
        value = attrs[self.key]
        return True, value if attrs.get(self.check_key) == sha256_json(value) else None

    def write(self, root: zarr.Group, value: Any) -> None:
        if self.group and self.group not in root:
            root.create_group(self.group)
        _group(root, self.group).update_attributes({self.key: value, self.check_key: sha256_json(value)})

    def read_list(self, root: zarr.Group, damaged: Exception) -> list[Any]:
        """The record's list (empty when the group does not exist yet); ``damaged`` is raised otherwise."""
        present, value = self.read(root)
        if present and not isinstance(value, list):
            raise damaged
        return value if present else []


#: The commit record: readers trust exactly these many steps and sample IDs.
COUNTS = CountRecord("steps", "updatestore", ("num_steps", "num_samples"))
#: Bumped by every change that is not an append (purge, rollback): long-lived readers reload then.
GENERATION = CountRecord("steps", "generation", ("generation",), check_key="generation_check")
#: Rows of the owner table that are committed.
OWNER_COUNT = CountRecord("owners", "owners", ("count",))
#: Steps and samples the persisted sorted index covers (a cache: invalid means rebuild).
INDEX_RECORD = CountRecord("index", "index", ("steps", "samples"))
#: The audit ledger's entries.
LEDGER = JsonRecord("ledger", "entries", "check")
#: How many ledger entries were written (since 0.2), kept beside the commit record: a deleted or
#: replaced-by-older ledger then reads as corruption, not as "nothing was unlearned yet".
LEDGER_COUNT = CountRecord("steps", "ledger", ("ledger_entries",), check_key="ledger_check")
#: The lineage: where the recorded model's weights were at checkpoints and closes, and rollbacks.
LINEAGE = JsonRecord("lineage", "events", "check")
def part_record(rank: int) -> CountRecord:
    """Format 3: the steps whose rows ``rank`` has written durably (its parts). The commit record never
    runs ahead of the smallest of these, so a committed step is complete in every part."""
    return CountRecord(f"parts/{rank}", "part", ("num_steps",))


#: The store's self-description in the root group.
META = JsonRecord("", "updatestore", "updatestore_sha256")


def bump_generation(root: zarr.Group) -> None:
    """Tell readers that committed data changed in place (a purge, a rollback)."""
    GENERATION.write(root, (GENERATION.read(root) or (0,))[0] + 1)


def read_state(root: zarr.Group, where: str) -> tuple[int, int, int]:
    """Committed ``(num_steps, num_samples, generation)`` from one read of the commit record's group."""
    try:
        attrs = dict(root[COUNTS.group].attrs)
    except Exception:  # noqa: BLE001 - reported by read_counts with its message
        attrs = {}
    counts = COUNTS.parse(attrs)
    if counts is None:
        return (*read_counts(root, where), 0)
    return counts[0], counts[1], (GENERATION.parse(attrs) or (0,))[0]


def read_counts(root: zarr.Group, where: str) -> tuple[int, int]:
    """Committed ``(num_steps, num_samples)``, or ``NotAStoreError``."""
    counts = COUNTS.read(root)
    if counts is None:
        try:
            attrs = dict(root[COUNTS.group].attrs)
        except Exception as exc:
            raise NotAStoreError(f"{where}: the commit record (steps/zarr.json) is missing or damaged: {exc}") from exc
        raise NotAStoreError(f"{where}: invalid commit record num_steps={attrs.get('num_steps')!r} "
                             f"num_samples={attrs.get('num_samples')!r}")
    return counts  # type: ignore[return-value]
