"""Small reference models used by the demo, the tests and the benchmarks."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["DigitsCNN", "WideCNN"]


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
