"""Unlearning methods: one module each. Store-based methods share ``unlearn.request``;
loop-based ones share ``methods._loop``."""

from .amnesiac import amnesiac
from .finetune import finetune
from .gradient_ascent import gradient_ascent
from .label_flip import label_flip
from ._loop import LoopReport

__all__ = ["amnesiac", "label_flip", "gradient_ascent", "finetune", "LoopReport"]
