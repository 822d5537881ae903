"""updatestore: layer-wise pruned per-step parameter updates in a Zarr v3 store.

>>> from updatestore import UpdateStore
"""

__version__ = "0.1.0"

from .config import StoreConfig  # noqa: E402
from .errors import (  # noqa: E402
    ConfigError,
    CorruptStoreError,
    ModelMismatchError,
    NonFiniteUpdateError,
    NotAStoreError,
    ReadOnlyStoreError,
    RecorderError,
    SampleIdError,
    StoreExistsError,
    StoreNotFoundError,
    UnlearnError,
    UnsupportedFormatError,
    UpdateStoreError,
    WriterError,
)
from .footprint import Footprint  # noqa: E402
from .lock import StoreLockedError  # noqa: E402
from .layout import (  # noqa: E402
    FORMAT_VERSION,
    STATUS_NOT_STORED,
    STATUS_PURGED,
    STATUS_RECORDED,
    STATUS_SKIPPED,
    LayerSpec,
)
from .recorder import Recorder  # noqa: E402
from .sampler import OwnerBatchSampler  # noqa: E402
from .store import UpdateStore  # noqa: E402

__all__ = [
    "__version__",
    "FORMAT_VERSION",
    "STATUS_SKIPPED",
    "STATUS_RECORDED",
    "STATUS_NOT_STORED",
    "STATUS_PURGED",
    "UpdateStore",
    "Recorder",
    "OwnerBatchSampler",
    "StoreConfig",
    "LayerSpec",
    "Footprint",
    "UpdateStoreError",
    "StoreNotFoundError",
    "StoreExistsError",
    "NotAStoreError",
    "UnsupportedFormatError",
    "ConfigError",
    "ModelMismatchError",
    "ReadOnlyStoreError",
    "RecorderError",
    "SampleIdError",
    "WriterError",
    "CorruptStoreError",
    "StoreLockedError",
    "UnlearnError",
    "NonFiniteUpdateError",
]
