"""Trainable parameters, and matching a model to the layers a store recorded."""

from __future__ import annotations

import torch

from ._format import LayerSpec
from .errors import ModelMismatchError

__all__ = ["canonical_name", "trainable", "named_shapes", "match_model"]

#: ``torch.compile`` wraps a module as ``OptimizedModule`` whose parameters live under this attribute.
_COMPILED = "_orig_mod"


def canonical_name(name: str) -> str:
    """A parameter's name without ``torch.compile``'s ``_orig_mod.`` components, so that a store
    created on a compiled module opens with the plain one and vice versa.

    >>> canonical_name("_orig_mod.fc.weight"), canonical_name("block._orig_mod.fc.bias")
    ('fc.weight', 'block.fc.bias')
    """
    return ".".join(part for part in name.split(".") if part != _COMPILED)


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters a store records: those that require grad and are not empty, by canonical name."""
    return [(canonical_name(n), p) for n, p in model.named_parameters() if p.requires_grad and p.numel() > 0]


def named_shapes(params: list[tuple[str, torch.nn.Parameter]]) -> list[tuple[str, tuple[int, ...], str]]:
    return [(n, tuple(p.shape), str(p.dtype).removeprefix("torch.")) for n, p in params]


def match_model(specs: tuple[LayerSpec, ...], model: torch.nn.Module,
                where: str) -> list[tuple[LayerSpec, torch.nn.Parameter]]:
    """Pair each stored layer with the model's parameter, or explain the mismatch."""
    params = dict(trainable(model))
    out = []
    for spec in specs:
        p = params.pop(spec.name, None)
        if p is None:
            raise ModelMismatchError(
                f"store {where} was recorded for a model with layer {spec.name!r} of shape "
                f"{spec.shape}; this model has no trainable parameter of that name"
            )
        if tuple(p.shape) != spec.shape:
            raise ModelMismatchError(
                f"store {where} was recorded for a model with layer {spec.name!r} of shape "
                f"{spec.shape}; this model has {tuple(p.shape)}"
            )
        out.append((spec, p))
    if params:
        raise ModelMismatchError(
            f"this model has trainable parameter(s) {sorted(params)} that store {where} "
            "does not record; freeze them (requires_grad=False) or create a store for this model"
        )
    return out
