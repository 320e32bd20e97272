"""Small models built by the tests, and helpers that save them in every format."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, d_in: int = 64, hidden: int = 32, d_out: int = 10, p: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.act1 = nn.ReLU()
        self.drop = nn.Dropout(p) if p > 0 else nn.Identity()
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, d_out)

    def forward(self, x):
        x = self.drop(self.act1(self.fc1(x)))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


class CNN(nn.Module):
    """Conv-BN-ReLU x2, pool, linear head. Input 1x8x8 (digits)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.drop = nn.Dropout(p) if p > 0 else nn.Identity()
        self.head = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = self.features(x)
        return self.head(self.drop(torch.flatten(x, 1)))


class PoolCNN(nn.Module):
    """Conv-ReLU-MaxPool, then Conv-BN-ReLU-AvgPool, then a Linear head: a CNN with both kinds
    of pooling (for the pooling-dropout variants) and convs followed by an activation or a
    BatchNorm. Input 1x8x8 (digits)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AvgPool2d(2),
        )
        self.head = nn.Linear(16 * 2 * 2, 10)

    def forward(self, x):
        return self.head(torch.flatten(self.features(x), 1))


class ResBlock(nn.Module):
    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(c)
        self.head = nn.Linear(c * 8 * 8, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        x = torch.relu(x + y)
        return self.head(torch.flatten(x, 1))


class LSTMNet(nn.Module):
    def __init__(self, d_in: int = 8, hidden: int = 16, d_out: int = 3):
        super().__init__()
        self.lstm = nn.LSTM(d_in, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, d_out)

    def forward(self, x):
        y, _ = self.lstm(x)
        return self.head(torch.tanh(self.fc(y[:, -1])))


class GRUNet(nn.Module):
    """A GRU classifier: two stacked bidirectional GRU layers, a head on the last step."""

    def __init__(self, d_in: int = 8, hidden: int = 16, d_out: int = 3):
        super().__init__()
        self.gru = nn.GRU(d_in, hidden, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(2 * hidden, d_out)

    def forward(self, x):
        y, _ = self.gru(x)
        return self.head(y[:, -1])


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorm layers non-trivial running statistics, so eval mode matters."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def save_as(model: nn.Module, example: torch.Tensor, path: Path, fmt: str) -> Path:
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "torchscript":
            torch.jit.save(torch.jit.trace(model, (example,)), str(path))
        elif fmt == "export":
            ep = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
            torch.export.save(ep, str(path))
        elif fmt == "pickle":
            torch.save(model, str(path))
        elif fmt == "state_dict":
            torch.save(model.state_dict(), str(path))
        elif fmt == "onnx":
            torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "N"}, "y": {0: "N"}}, opset_version=17)
        else:
            raise ValueError(fmt)
    return path
