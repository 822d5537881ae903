"""unlearn: forget samples from a model trained with an ``updatestore`` attached.

* :func:`amnesiac` — subtract the stored (pruned) updates of the steps that used the samples.
* :func:`label_flip`, :func:`gradient_ascent`, :func:`finetune` — loop-based methods, each
  with layer-wise partial updates (``partial=ratio``).
* :func:`evaluate` — accuracies, a membership-inference attack, gaps to a retrained model.
* :mod:`unlearn.data` — bundled digits, MNIST-format IDX files, forget splits.
"""

from .amnesiac import amnesiac
from .evaluate import evaluate, membership_attack, param_distance
from .loops import LoopReport, accuracy, finetune, gradient_ascent, label_flip
from .partial import PartialUpdate
from .report import UnlearnReport

__all__ = [
    "amnesiac",
    "UnlearnReport",
    "PartialUpdate",
    "label_flip",
    "gradient_ascent",
    "finetune",
    "LoopReport",
    "accuracy",
    "evaluate",
    "membership_attack",
    "param_distance",
]
