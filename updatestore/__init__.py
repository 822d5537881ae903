"""updatestore: layer-wise pruned per-step parameter updates in a Zarr v3 store.

Everything public is re-exported here (``__all__``); modules starting with ``_``
are internal and may change between releases.

>>> from updatestore import UpdateStore
"""

__version__ = "0.2.0"

from ._format import (  # noqa: E402
    FORMAT_VERSION,
    PURGED_ID,
    STATUS_NONFINITE,
    STATUS_NOT_STORED,
    STATUS_PURGED,
    STATUS_RECORDED,
    STATUS_SKIPPED,
    LayerSpec,
)
from ._index import as_sample_ids  # noqa: E402
from ._params import canonical_name  # noqa: E402
from ._reader import Rows  # noqa: E402
from .config import StoreConfig, check_ratio, kept_count, match_layers, resolve_keep  # noqa: E402
from .errors import (  # noqa: E402
    ConfigError,
    CorruptStoreError,
    ModelMismatchError,
    NotAStoreError,
    OtherRankError,
    ReadOnlyStoreError,
    RecorderError,
    SampleIdError,
    StepError,
    StoreBehindCheckpointError,
    StoreChangedError,
    StoreExistsError,
    StoreLockedError,
    StoreNotFoundError,
    UnsupportedFormatError,
    UpdateStoreError,
    WriterError,
)
from .footprint import Footprint  # noqa: E402
from .ids import WithIds  # noqa: E402
from .ledger import hash_ids, ids_in_ledger, subtracted_in_lineage, weights_fingerprint  # noqa: E402
from .recorder import Recorder  # noqa: E402
from .sampler import OwnerBatchSampler  # noqa: E402
from .store import UpdateStore  # noqa: E402

__all__ = [
    "__version__",
    # the store and recording
    "UpdateStore", "Recorder", "Rows", "OwnerBatchSampler", "WithIds", "StoreConfig", "LayerSpec", "Footprint",
    # format constants
    "FORMAT_VERSION", "STATUS_SKIPPED", "STATUS_RECORDED", "STATUS_NOT_STORED", "STATUS_PURGED", "STATUS_NONFINITE", "PURGED_ID",
    # helpers shared with unlearning methods
    "as_sample_ids", "canonical_name", "check_ratio", "kept_count", "match_layers", "resolve_keep",
    "weights_fingerprint", "hash_ids", "subtracted_in_lineage", "ids_in_ledger",
    # errors
    "UpdateStoreError", "StoreNotFoundError", "StoreExistsError", "NotAStoreError", "UnsupportedFormatError",
    "ConfigError", "ModelMismatchError", "ReadOnlyStoreError", "RecorderError", "SampleIdError", "StepError",
    "WriterError", "CorruptStoreError", "StoreLockedError", "StoreBehindCheckpointError", "OtherRankError",
    "StoreChangedError",
]
