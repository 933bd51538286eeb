import pytest
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)  # grouped: must stay dense
        self.proj = nn.Linear(8 * 4 * 4, 32)


class ToyNet(nn.Module):
    """Nested modules, a ModuleList, a Sequential, Linear and Conv2d layers."""

    def __init__(self):
        super().__init__()
        self.block = Block()
        self.mlp = nn.ModuleList([nn.Linear(32, 24), nn.Linear(24, 24)])
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(24, 5))

    def forward(self, x):
        b = self.block
        h = torch.relu(b.dw(torch.relu(b.conv(x))))
        h = b.proj(torch.nn.functional.adaptive_avg_pool2d(h, 4).flatten(1))
        for layer in self.mlp:
            h = torch.relu(layer(h))
        return self.head(h)


@pytest.fixture
def toy():
    torch.manual_seed(0)
    return ToyNet()


@pytest.fixture
def toy_input():
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
