"""Layer-wise partial updates: each step changes only a fraction of each layer's entries.

Gogineni & Nadimi (2024) keep, per layer and per unlearning step, the entries
with the largest |gradient| ("M-max") and freeze the rest.
"""

from __future__ import annotations

import torch

from updatestore import ConfigError, canonical_name, check_ratio, kept_count, match_layers

__all__ = ["PartialUpdate"]


class PartialUpdate:
    """Masks gradients so that exactly ``ceil(ratio × numel)`` entries per layer move.

    Call :meth:`apply` after ``backward()`` and before ``optimizer.step()``.
    Layers not matched by ``layers`` (names, dotted suffixes or globs) are frozen
    for the step (their ``.grad`` is set to ``None``). With plain SGD the masked
    entries stay bit-identical; optimizers with momentum or weight decay can
    still move them.

    >>> model = torch.nn.Linear(10, 10)
    >>> mask = PartialUpdate(model, 0.1)
    >>> model(torch.randn(4, 10)).sum().backward(); mask.apply()
    >>> int((model.weight.grad != 0).sum())
    10
    """

    def __init__(self, model: torch.nn.Module, ratio: float, *, select: str = "mmax",
                 layers: list[str] | str | None = None, seed: int | None = None) -> None:
        self.ratio = check_ratio(ratio, "partial ratio")
        if select not in ("mmax", "random"):
            raise ConfigError(f"select must be 'mmax' (largest |gradient|) or 'random', got {select!r}")
        self.select = select
        named = [(canonical_name(n), p) for n, p in model.named_parameters() if p.requires_grad]
        chosen = set(match_layers([n for n, _ in named], layers))
        self._active = [(n, p, kept_count(self.ratio, p.numel())) for n, p in named if n in chosen]
        self._frozen = [p for n, p in named if n not in chosen]
        self._generator: torch.Generator | None = None
        self._seed = seed

    @property
    def layer_names(self) -> list[str]:
        return [n for n, _, _ in self._active]

    def _random(self, numel: int, k: int, device: torch.device) -> torch.Tensor:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self._seed if self._seed is not None else torch.seed())
        return torch.randperm(numel, generator=self._generator, device=device)[:k]

    @torch.no_grad()
    def apply(self) -> None:
        """Zero every gradient entry outside each layer's selected ``k``."""
        for p in self._frozen:
            p.grad = None
        for _, p, k in self._active:
            if p.grad is None or k >= p.numel():
                continue
            g = p.grad.view(-1)
            if self.select == "mmax":
                idx = torch.topk(g.abs(), k, sorted=False).indices
            else:
                idx = self._random(g.numel(), k, g.device)
            keep = torch.zeros_like(g, dtype=torch.bool)
            keep[idx] = True
            g.masked_fill_(~keep, 0)
