"""Train the two small example models that dropcli's README and tests use.

Runs on CPU in a few seconds with fixed seeds, on scikit-learn's bundled ``load_digits``
(8x8 grey digits, no download):

* an MLP 64-128-64-10 with ReLU and ``nn.Dropout(0.2)`` after each hidden ReLU;
* a small CNN on the 1x8x8 images: (Conv-BN-ReLU) x2, MaxPool, ``nn.Dropout``, Linear head.

It writes, next to this file:

* ``digits_mlp.pt``   TorchScript (``torch.jit.trace`` in eval mode)
* ``digits_mlp.onnx`` ONNX, opset 17, input ``x`` with a dynamic batch axis
* ``digits_cnn.pt2``  ``torch.export`` program with a dynamic batch dimension
* ``digits_cnn.onnx`` ONNX, opset 17, input ``x`` with a dynamic batch axis
* ``digits_test.npz`` the 20% test split: ``x`` float32 [N, 64], ``x_img`` float32
  [N, 1, 8, 8], ``y`` int64

Usage (needs scikit-learn: ``pip install -e ".[examples]"``)::

    python examples/train_digits.py
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
SEED = 0
EPOCHS = 40
BATCH = 64


def set_seeds(seed: int = SEED) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)  # pixels are 0..16 -> [0, 1]
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, stratify=y, random_state=SEED)
    return x_tr, x_te, y_tr, y_te


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.act1 = nn.ReLU()
        self.drop1 = nn.Dropout(0.2)
        self.fc2 = nn.Linear(128, 64)
        self.act2 = nn.ReLU()
        self.drop2 = nn.Dropout(0.2)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop1(self.act1(self.fc1(x)))
        x = self.drop2(self.act2(self.fc2(x)))
        return self.head(x)


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.act2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.drop = nn.Dropout(0.25)
        self.head = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.flatten(self.pool(x))
        return self.head(self.drop(x))


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int = EPOCHS) -> nn.Module:
    set_seeds()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), BATCH):
            idx = perm[i:i + BATCH]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    pred = model(torch.from_numpy(x)).argmax(1).numpy()
    return float((pred == y).mean())


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), str(path), dynamo=False, opset_version=17,
            input_names=["x"], output_names=["logits"],
            dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}},
        )


def main() -> None:
    torch.set_num_threads(1)  # same float summation order on every machine
    torch.use_deterministic_algorithms(True)
    x_tr, x_te, y_tr, y_te = load_data()
    img_tr, img_te = x_tr.reshape(-1, 1, 8, 8), x_te.reshape(-1, 1, 8, 8)

    set_seeds()
    mlp = train(MLP(), x_tr, y_tr)
    set_seeds()
    cnn = train(CNN(), img_tr, y_tr)

    acc_mlp = accuracy(mlp, x_te, y_te)
    acc_cnn = accuracy(cnn, img_te, y_te)

    ex_flat = torch.from_numpy(x_te[:2])
    ex_img = torch.from_numpy(img_te[:2])
    with torch.no_grad():
        traced = torch.jit.trace(mlp, ex_flat)
    traced.save(str(HERE / "digits_mlp.pt"))
    export_onnx(mlp, ex_flat, HERE / "digits_mlp.onnx")

    ep = torch.export.export(cnn, (ex_img,), dynamic_shapes={"x": {0: torch.export.Dim.AUTO}})
    torch.export.save(ep, str(HERE / "digits_cnn.pt2"))
    export_onnx(cnn, ex_img, HERE / "digits_cnn.onnx")

    np.savez_compressed(HERE / "digits_test.npz", x=x_te, x_img=img_te, y=y_te)

    print(f"test examples: {len(y_te)}")
    print(f"MLP test accuracy: {acc_mlp:.4f}")
    print(f"CNN test accuracy: {acc_cnn:.4f}")
    for name in ("digits_mlp.pt", "digits_mlp.onnx", "digits_cnn.pt2", "digits_cnn.onnx", "digits_test.npz"):
        print(f"wrote examples/{name} ({(HERE / name).stat().st_size / 1024:.1f} KiB)")


if __name__ == "__main__":
    main()
