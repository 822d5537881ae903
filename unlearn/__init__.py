"""unlearn: forget samples from a model trained with an ``updatestore`` attached.

* :func:`amnesiac` — subtract the stored (pruned) updates of the steps that used the samples.
* :func:`label_flip`, :func:`gradient_ascent`, :func:`finetune` — loop-based methods, each
  with layer-wise partial updates (``partial=ratio``).
* :class:`Auto` — choose the ratio automatically (``keep=Auto(...)``, ``partial=Auto(...)``).
* :func:`evaluate` — accuracies, a membership-inference attack, gaps to a retrained model.
* :mod:`unlearn.data` — bundled digits, MNIST-format IDX files, forget splits.

It uses only ``updatestore``'s public API.
"""

from .choice import Auto
from .errors import NonFiniteUpdateError, UnknownModelError, UnlearnError
from .evaluate import evaluate, membership_attack, param_distance
from .methods import LoopReport, amnesiac, finetune, gradient_ascent, label_flip
from .metrics import accuracy
from .partial import PartialUpdate
from .report import UnlearnReport

__all__ = [
    "amnesiac",
    "UnlearnReport",
    "Auto",
    "PartialUpdate",
    "label_flip",
    "gradient_ascent",
    "finetune",
    "LoopReport",
    "accuracy",
    "evaluate",
    "membership_attack",
    "param_distance",
    "UnlearnError",
    "NonFiniteUpdateError",
    "UnknownModelError",
]
