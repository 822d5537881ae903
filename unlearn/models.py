"""Small reference models used by the demo, the tests and the benchmarks (built from configs, no downloads)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["DigitsCNN", "WideCNN", "GPTConfig", "GPT"]


class DigitsCNN(nn.Module):
    """A small CNN for 1×H×W images (≈ 38k parameters on 8×8 digits).

    >>> DigitsCNN()(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, in_hw: int = 8, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(2 * width * (in_hw // 2) ** 2, 64)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


class WideCNN(nn.Module):
    """A ResNet-18-sized plain CNN (≈ 11.0M parameters, like ResNet-18's 11.7M) for 3×32×32 inputs.

    >>> sum(p.numel() for p in WideCNN().parameters())
    10990154
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        chans = [3, 64, 128, 256, 512]
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, padding=1), nn.ReLU(),
                       nn.Conv2d(chans[i + 1], chans[i + 1], 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(512 * 2 * 2, 2048), nn.ReLU(), nn.Linear(2048, 1024), nn.ReLU(),
                                  nn.Linear(1024, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


@dataclass(frozen=True)
class GPTConfig:
    """A decoder-only transformer's shape. ``GPTConfig.gpt2_small()`` is GPT-2 small's (124M parameters)."""

    vocab: int = 8192
    context: int = 128
    layers: int = 8
    heads: int = 8
    width: int = 512

    @classmethod
    def gpt2_small(cls) -> "GPTConfig":
        return cls(vocab=50257, context=1024, layers=12, heads=12, width=768)


class _Block(nn.Module):
    def __init__(self, c: GPTConfig) -> None:
        super().__init__()
        self.heads = c.heads
        self.ln1, self.ln2 = nn.LayerNorm(c.width), nn.LayerNorm(c.width)
        self.qkv, self.proj = nn.Linear(c.width, 3 * c.width), nn.Linear(c.width, c.width)
        self.fc, self.out = nn.Linear(c.width, 4 * c.width), nn.Linear(4 * c.width, c.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, w))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """A GPT-2-style language model (pre-LayerNorm blocks, causal attention, tied embeddings);
    the default config has 29.5M parameters. ``forward(tokens)`` gives next-token logits.

    >>> sum(p.numel() for p in GPT().parameters())
    29479936
    >>> GPT(GPTConfig(vocab=32, context=8, layers=1, heads=2, width=16))(torch.zeros(2, 8, dtype=torch.long)).shape
    torch.Size([2, 8, 32])
    """

    def __init__(self, config: GPTConfig = GPTConfig()) -> None:
        super().__init__()
        self.config = config
        self.tok = nn.Embedding(config.vocab, config.width)
        self.pos = nn.Embedding(config.context, config.width)
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.layers))
        self.ln = nn.LayerNorm(config.width)
        nn.init.normal_(self.tok.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.ln(x) @ self.tok.weight.T  # tied: the output layer is the token embedding
