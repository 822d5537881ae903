"""``bitmap``: one bit per entry of the layer, set where the entry was kept.

Packed most-significant-bit first (``numpy.packbits``), ``ceil(numel / 8)`` bytes a row.
"""

from __future__ import annotations

import numpy as np

from .base import CorruptRowError

__all__ = ["Bitmap", "bitmap_nbytes"]


def bitmap_nbytes(numel: int) -> int:
    return (numel + 7) // 8


class Bitmap:
    name = "bitmap"
    stored = True
    shuffle = "noshuffle"  # bit-shuffle was 10 % larger (benchmarks/storage.py --encodings)
    # Blosc's own block size (0) cuts a 512 KiB row into small zstd frames; one 512 KiB block
    # decompressed 1.8× faster (889 vs 502 MB/s) and stored 2.7 % fewer bytes, compressed 1.2×
    # faster (keep-0.1 rows of the 4.2M-entry layer of benchmarks/readpath.py, one thread).
    blocksize = 1 << 19

    def width(self, numel: int, k: int) -> int:
        return bitmap_nbytes(numel)

    def dtype(self, numel: int) -> np.dtype:
        return np.dtype("uint8")

    def encode(self, positions: np.ndarray, numel: int) -> np.ndarray:
        # The reference for one row; the writer packs a whole step at once (``_jit.encode_positions``).
        mask = np.zeros(bitmap_nbytes(numel) * 8, dtype=bool)
        mask[positions] = True
        return np.packbits(mask)

    def check(self, rows: np.ndarray, numel: int, k: int) -> None:
        """Every row holds exactly k bits, none in the padding after entry numel-1."""
        bm = np.asarray(rows, dtype=np.uint8)
        pad = (-numel) % 8
        # counted eight bytes at a time: 3.6× faster than per byte (48 rows of 4.2M entries: 3.5 vs 12.6 ms)
        w = bm.shape[-1] // 8 * 8
        if bm.size and ((np.bitwise_count(bm[:, :w].view(np.uint64)).sum(axis=1, dtype=np.int64)
                         + np.bitwise_count(bm[:, w:]).sum(axis=1, dtype=np.int64) != k).any() or (
                pad and (bm[:, -1] & ((1 << pad) - 1)).any())):
            raise CorruptRowError(f"bitmap rows do not each hold exactly {k} entries below {numel}")

    def decode(self, rows: np.ndarray, numel: int, k: int) -> np.ndarray:
        # Unpacks a few rows at a time (≤ 32 MiB of bits) and takes flatnonzero:
        # 10× faster than unpacking only the non-zero bytes, with bounded memory.
        bm = np.asarray(rows, dtype=np.uint8)
        self.check(bm, numel, k)
        n = bm.shape[0]
        out = np.empty((n, k), dtype=np.int64)
        step = max(1, (32 << 20) // max(1, numel))
        for a in range(0, n, step):
            part = bm[a : a + step]
            m = len(part)
            flat = np.flatnonzero(np.unpackbits(part, axis=1, count=numel).view(bool))
            out[a : a + m] = flat.reshape(m, k) - (np.arange(m, dtype=np.int64) * numel)[:, None]
        return out
