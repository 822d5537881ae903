"""Layer-wise pruning of an update to its largest-magnitude entries, on the tensor's device."""

from __future__ import annotations

import torch

__all__ = ["prune_topk", "radix_select", "device_select", "DEVICE_SELECT"]

#: When a CPU float32 layer comes here (the recorder's fused CPU path, ``_select``, takes them
#: unless some parameter lives elsewhere), layers with at least this many entries use radix
#: selection (4× faster than ``torch.topk`` + sort at 4M entries); smaller ones and GPUs use topk.
RADIX_MIN_NUMEL = 65536


def _split(keys: torch.Tensor, nbins: int, k: int) -> tuple[int, int]:
    """The bin holding the k-th largest key, and how many keys lie in higher bins."""
    cum = torch.bincount(keys, minlength=nbins).flip(0).cumsum(0)
    j = int(torch.searchsorted(cum, torch.tensor(k, device=cum.device)))
    return nbins - 1 - j, int(cum[j - 1]) if j else 0


def radix_select(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted positions of the ``k`` largest |x| of a 1-D float32 tensor, in O(n).

    |x| as int32 bits orders like |x| itself; two 16-bit histogram passes find
    the k-th largest exactly, and ties at the threshold are taken in position
    order. No sort of the kept set is needed: ``nonzero`` returns it sorted.

    >>> radix_select(torch.tensor([0.1, -3.0, 0.2, 2.0]), 2).tolist()
    [1, 3]
    """
    bits = flat.abs().view(torch.int32)
    hi = bits >> 16
    b, above = _split(hi, 1 << 15, k)
    mask = hi > b
    need = k - above
    cand = (hi == b).nonzero().squeeze(1)
    if need == len(cand):
        mask[cand] = True
    elif need:
        low = bits[cand] & 0xFFFF
        b2, above2 = _split(low, 1 << 16, need)
        mask[cand[low > b2]] = True
        ties = cand[low == b2]
        mask[ties[: need - above2]] = True
    return mask.nonzero().squeeze(1)


#: How a layer off the CPU picks its top-k, without a host synchronisation (static shapes only):
#: ``"topk"`` (``torch.topk`` of |Δ|, then a sort of the k positions) or ``"sort"`` (a full sort
#: of |Δ|, then the same). ``benchmarks/gpu.py`` times both on the card it runs on; "topk" stays
#: the default until a GPU measurement says otherwise.
DEVICE_SELECT = "topk"


def device_select(flat: torch.Tensor, k: int, method: str = DEVICE_SELECT) -> torch.Tensor:
    """Sorted positions of the ``k`` largest |x| of a 1-D tensor, by ``method`` (see ``DEVICE_SELECT``).

    >>> device_select(torch.tensor([0.1, -3.0, 0.2, 2.0]), 2, "sort").tolist()
    [1, 3]
    """
    if method == "topk":
        idx = torch.topk(flat.abs(), k, sorted=False).indices
    elif method == "sort":
        idx = torch.sort(flat.abs(), descending=True).indices[:k]
    else:
        raise ValueError(f"method must be 'topk' or 'sort', got {method!r}")
    return torch.sort(idx).values


def prune_topk(delta: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``k`` largest-|Δ| entries of ``delta`` (flattened), sorted by position.

    Runs on ``delta``'s device. Returns ``(values, positions)``; when ``k`` covers
    the whole tensor, ``positions`` is ``None`` and ``values`` is the flat tensor.

    >>> v, p = prune_topk(torch.tensor([0.1, -3.0, 0.2, 2.0]), 2)
    >>> v.tolist(), p.tolist()
    ([-3.0, 2.0], [1, 3])
    """
    flat = delta.reshape(-1)
    if k >= flat.numel():
        return flat, None
    if flat.device.type == "cpu" and flat.dtype == torch.float32 and flat.numel() >= RADIX_MIN_NUMEL:
        idx = radix_select(flat, k)
    else:
        idx = device_select(flat, k)
    return flat[idx], idx
