"""The store contract every backend must satisfy (zarr's ``StoreTests`` pattern).

A subclass says where a store lives (``make_location``) and whether it can be
written after it is finished (a zip cannot); every test below then runs on it and
compares against an independent oracle: the dense Δθ captured during training,
top-k'd with ``torch.topk`` (``conftest.oracle_after``), and brute-force scans of
the sample IDs.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import unlearn
from conftest import make_tiny, oracle_after, read_rows, steps_with, train
from updatestore import STATUS_PURGED, ReadOnlyStoreError, UpdateStore

KEEP = 0.3
STEPS = 9


def _ids(s):
    return np.arange(6) + 6 * (s % 3)


class StoreContract:
    #: False for backends that are read-only once written (a zip of a finished store).
    writable = True

    def make_location(self, request, tmp_path) -> tuple[str, dict | None]:
        """Where to create the store: ``(url_or_path, storage_options)``."""
        raise NotImplementedError

    def finish(self, url: str, tmp_path) -> str:
        """Turn a finished store into the form under test (e.g. zip it); returns where to open it."""
        return url

    @pytest.fixture
    def recorded(self, request, tmp_path):
        url, opts = self.make_location(request, tmp_path)
        model = make_tiny()
        with UpdateStore.create(url, model, keep=KEEP, value_dtype="float32", storage_options=opts) as store:
            oracle, all_ids = train(store, model, steps=STEPS, ids_fn=_ids)
        return self.finish(url, tmp_path), opts, model, oracle, all_ids

    def test_rows_are_the_topk_of_the_dense_oracle(self, recorded):
        url, opts, model, oracle, _ = recorded
        with UpdateStore.open(url, storage_options=opts) as store:
            assert store.num_batches == STEPS
            for spec in store.layers:
                values, pos = read_rows(store, spec.name, 0, STEPS)
                for s in range(STEPS):
                    true = oracle[s][spec.name].flatten()
                    want = true.abs().topk(spec.k).indices.sort().values
                    assert torch.equal(pos[s], want) and torch.equal(values[s], true[want]), (spec.name, s)

    def test_index_equals_a_brute_force_scan(self, recorded):
        url, opts, _, _, all_ids = recorded
        with UpdateStore.open(url, storage_options=opts) as store:
            for q in ([7], [0, 17], [999]):
                assert store.batches_containing(q).tolist() == steps_with(all_ids, q)
            assert store.samples_in(4).tolist() == all_ids[4].tolist()
            assert store.footprint().total_bytes > 0

    def test_unlearning_equals_the_oracle(self, recorded):
        url, opts, model, oracle, all_ids = recorded
        with UpdateStore.open(url, storage_options=opts) as store:
            m = copy.deepcopy(model)
            report = unlearn.amnesiac(m, store, [7], ledger=False, purge=False)
        want = oracle_after(model, oracle, steps_with(all_ids, [7]), KEEP)
        assert report.steps_hit.tolist() == steps_with(all_ids, [7]) and report.applied
        assert report.bytes_read > 0  # the rows came through the byte-counting wrapper
        for n, p in m.named_parameters():
            torch.testing.assert_close(p.detach(), want[n], rtol=0, atol=1e-6)

    def test_append_unlearn_ledger_purge(self, recorded):
        url, opts, model, _, all_ids = recorded
        if not self.writable:
            with UpdateStore.open(url, storage_options=opts) as store, pytest.raises(ReadOnlyStoreError):
                store.log_unlearning({"method": "none"})
            return
        with UpdateStore.open(url, "r+", storage_options=opts) as store:
            train(store, model, steps=3, seed=5, ids_fn=lambda s: [500 + s])
            hit = steps_with(all_ids, [7])
            report = unlearn.amnesiac(copy.deepcopy(model), store, [7])
            assert report.applied and report.purged and len(store.ledger()) == 1
            assert store.num_batches == STEPS + 3
        with UpdateStore.open(url, storage_options=opts) as store:
            assert store.batches_containing([7]).tolist() == []  # the ID is a tombstone now
            assert (store.step_status()[hit] == STATUS_PURGED).all()
            rows = store.read(hit)
            assert all(not r.values.any() for r in rows.values())
