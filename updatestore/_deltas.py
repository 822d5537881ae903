"""Each step's Δθ: the snapshot before the optimizer step, and every layer's pruned change after it.

On the CPU (float32 parameters) every layer lives in one flat buffer: a snapshot is one
``torch._foreach_copy_`` into per-layer views of it, −Δθ one ``_foreach_sub_`` in place (the old
``cat`` + ``sub`` wrote and read a second flat copy: 48 → 11 µs on the digits CNN, 8.4 → 3.9 ms on
the 11M CNN, whose step is memory-bound), and the top-k of every layer one compiled call
(``_select``), instead of ~5 torch ops per layer (measured on the digits CNN's 8 layers: the
top-k went from 1.25 to 0.34 ms a step; ``benchmarks/speed.py`` prints the recorder's share). Elsewhere
(a GPU, other dtypes) each layer is pruned on its device by ``_pruning.prune_topk``.

On a GPU nothing here waits for the device: Δθ and its top-k are computed on the training
stream, and ``stage`` copies the pruned rows into pinned host memory on a side stream and
returns a CUDA event that the writer thread polls before it reads them (no host
synchronisation on the training thread; ``tests/test_gpu.py`` runs it under
``torch.cuda.set_sync_debug_mode("error")``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ._format import LayerSpec
from ._pruning import prune_topk
from ._select import Segments
from .distributed import is_sharded, local_tensor

__all__ = ["Deltas", "fusable", "stage"]

Row = tuple[torch.Tensor, "torch.Tensor | None"]


def fusable(tensors: list[torch.Tensor]) -> bool:
    """Whether these parameters take the fused CPU path: float32 tensors on the CPU."""
    return bool(tensors) and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


class Deltas:
    """Snapshots ``params`` (``(spec, parameter)`` pairs) and prunes their change since the snapshot."""

    def __init__(self, params: list[tuple[LayerSpec, Any]]) -> None:
        self._params = params
        self._flat: bool | None = None  # decided at the first snapshot, from where the parameters live
        self._before: Any = None
        # Unsharded parameters go to the (no-grad) copies and subtractions as they are: a ``detach()`` each
        # was 16 dispatches a step, ~20 µs on the 8-layer digits CNN after a training step (caches cold). The
        # Parameter objects, not their tensors of today, are kept: ``p.data = ...`` later is still seen.
        self._direct = None if any(is_sharded(p) for _, p in params) else [p for _, p in params]

    def _tensors(self) -> list[torch.Tensor]:
        if self._direct is not None:
            return self._direct
        return [local_tensor(p).detach() for _, p in self._params]

    @torch.no_grad()
    def snapshot(self) -> None:
        tensors = self._tensors()
        if self._flat is None:
            self._flat = fusable(tensors)
            if self._flat:
                sizes = np.array([t.numel() for t in tensors], dtype=np.int64)
                ks = np.array([spec.k for spec, _ in self._params], dtype=np.int64)
                self._starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
                self._sizes, self._ks = sizes, ks
                sp = self._sparse = ks < sizes
                self._all_sparse = bool(sp.all())
                self._select = Segments(self._starts[sp], sizes[sp], ks[sp])
                self._before = torch.empty(int(sizes.sum()), dtype=torch.float32)
                self._neg = self._before.numpy()  # the same memory
                # the parameters' shapes over the flat buffer (a copy into them follows each parameter's
                # logical order, so strided parameters land flattened as reshape(-1) would)
                self._views = [self._before[a:a + n].view(t.shape)
                               for a, n, t in zip(self._starts.tolist(), sizes.tolist(), tensors)]
            else:
                self._before = [t.clone() for t in tensors]
                return
        if self._flat:
            torch._foreach_copy_(self._views, tensors)
        else:
            for buf, t in zip(self._before, tensors):
                buf.copy_(t)

    @torch.no_grad()
    def pruned(self) -> list[Row]:
        """Every layer's ``(values, positions)`` (``positions`` ``None`` for a dense layer) of θ now − θ at
        the snapshot; the tensors are new (the snapshot buffer is reused by the next snapshot)."""
        if not self._flat:
            tensors = self._tensors()
            rows = []
            for buf, t, (spec, _) in zip(self._before, tensors, self._params):
                delta = torch.sub(t, buf, out=buf)  # into the snapshot buffer: no allocation
                vals, pos = prune_topk(delta, spec.k)
                rows.append((vals.clone() if pos is None else vals, pos))  # a dense row is that buffer
            return rows
        vals, pos = self._fused()
        rows, o, p = [], 0, 0
        for k, sparse in zip(self._ks.tolist(), self._sparse.tolist()):
            rows.append((torch.from_numpy(vals[o:o + k]), torch.from_numpy(pos[p:p + k]) if sparse else None))
            o, p = o + k, p + (k if sparse else 0)
        return rows

    @property
    def fused(self) -> bool:
        """Whether :meth:`pruned_flat` applies (float32 parameters on the CPU; known after the first snapshot)."""
        return bool(self._flat)

    @torch.no_grad()
    def pruned_flat(self) -> tuple[np.ndarray, np.ndarray]:
        """The rows of :meth:`pruned` as two new arrays, for the fused path only: every layer's kept values
        (float32; a dense layer's are all its entries) and every sparse layer's positions (int64), in layer
        order — what the writer encodes with one call per step (``StepRecord.flat``)."""
        if not self._flat:
            raise RuntimeError("internal: pruned_flat() on parameters that are not fused")
        return self._fused()

    def _fused(self) -> tuple[np.ndarray, np.ndarray]:
        torch._foreach_sub_(self._views, self._tensors())  # the buffer now holds before − after = −Δθ
        neg = self._neg
        # |−Δθ| = |Δθ|: the same entries; 0 − (b − a) is a − b bit for bit, zeros included (−(b − a) would
        # turn a == b into −0.0). The kernel negates as it copies (a NumPy call more cost ~60 µs a step here).
        if self._all_sparse:
            pos, vals = self._select(neg, negate=True)
            return vals, pos
        pos, vals = self._select(neg)
        pieces, o = [], 0  # dense layers' values are all their entries, in layer order
        for a, n, k, sparse in zip(self._starts, self._sizes, self._ks, self._sparse):
            pieces.append(vals[o:o + k] if sparse else neg[a:a + n])
            o += k if sparse else 0
        return np.subtract(np.float32(0), np.concatenate(pieces)), pos


def stage(rows: list[Row]) -> tuple[list[Row], Any]:
    """Rows on the host, and an event to wait for before reading them (``None``: readable now).

    CUDA rows are copied into pinned host tensors on a side stream that first waits for the
    training stream; ``record_stream`` keeps the device tensors' memory from being reused
    before those copies ran. Rows elsewhere (CPU, other devices) are returned as they are.
    """
    cuda = [v for v, _ in rows if v.device.type == "cuda"]
    if not cuda:
        return rows, None
    device = cuda[0].device
    main = torch.cuda.current_stream(device)
    side = _side_stream(device)
    side.wait_stream(main)
    out = []
    with torch.cuda.stream(side):
        for vals, pos in rows:
            host = []
            for t in (vals, pos):
                if t is None or t.device.type != "cuda":
                    host.append(t)
                    continue
                h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                h.copy_(t, non_blocking=True)
                t.record_stream(side)
                host.append(h)
            out.append((host[0], host[1]))
    ready = torch.cuda.Event()
    ready.record(side)
    return out, ready


_streams: dict[int, Any] = {}


def _side_stream(device: torch.device) -> Any:
    # One copy stream per device for the process: creating a stream per step would leak them.
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _streams.get(index)
    if stream is None:
        stream = _streams[index] = torch.cuda.Stream(device=index)
    return stream
