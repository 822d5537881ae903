"""Callbacks for training frameworks; each module imports its framework lazily (on import of that module).

* :mod:`updatestore.integrations.lightning` — ``UpdateStoreCallback`` for PyTorch Lightning.
* :mod:`updatestore.integrations.transformers` — ``UpdateStoreCallback`` for the Hugging Face ``Trainer``.

Importing ``updatestore`` (or this package) imports neither framework.
"""

__all__: list[str] = []
