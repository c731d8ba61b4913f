"""A ResNet-20 style network for 28x28 grey images, and the script that trains it on Fashion-MNIST.

``python -m nncf_calibtip.zoo.resnet`` trains it (a few minutes on 2 cores) and caches the
state dict under ``data/models``; :func:`load_pretrained` loads it with ``weights_only=True``
and trains it first when the cache is empty.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nncf_calibtip.zoo import fashion_mnist
from nncf_calibtip.zoo.task import Task


class BasicBlock(nn.Module):
    """Two 3x3 conv/BN layers with a ReLU between and an identity (or 1x1 conv) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + self.shortcut(x))


class ResNet20(nn.Module):
    """ResNet-20 (3 stages of 3 basic blocks, 16/32/64 channels): 22 conv/linear layers."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        layers: list[nn.Module] = []
        cin = 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(3):
                layers.append(BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def checkpoint_path() -> Path:
    """Where the trained state dict is cached."""
    return fashion_mnist.data_root().parent / "models" / "resnet20_fashion_mnist.pt"


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random 2-pixel shifts and horizontal flips (reflection padding keeps the background)."""
    n = x.shape[0]
    padded = F.pad(x, (2, 2, 2, 2), mode="replicate")
    dx, dy = torch.randint(0, 5, (2,), generator=generator).tolist()
    x = padded[:, :, dy : dy + 28, dx : dx + 28]
    flip = torch.rand(n, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def train(epochs: int = 4, batch_size: int = 128, seed: int = 0, log: bool = True) -> ResNet20:
    """Train ResNet-20 on the 60,000 Fashion-MNIST training images (SGD, one-cycle schedule)."""
    torch.manual_seed(seed)
    data = fashion_mnist.load()
    x = torch.from_numpy(fashion_mnist.normalize(data.x_train))
    y = torch.from_numpy(data.y_train.astype(np.int64))
    model = ResNet20()
    steps = epochs * (len(x) // batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=steps, pct_start=0.2)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        total, correct = 0.0, 0
        for i in range(len(x) // batch_size):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            xb, yb = _augment(x[idx], g), y[idx]
            out = model(xb)
            loss = F.cross_entropy(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            correct += (out.argmax(1) == yb).sum().item()
        if log:
            seen = (len(x) // batch_size) * batch_size
            print(
                f"epoch {epoch + 1}/{epochs}: loss {total / seen:.4f} train acc {correct / seen:.4f} "
                f"({time.perf_counter() - start:.0f} s)",
                flush=True,
            )
    return model.eval()


def load_pretrained(train_if_missing: bool = True) -> ResNet20:
    """Load the cached trained model (``weights_only=True``), training it first if needed."""
    path = checkpoint_path()
    if not path.is_file():
        if not train_if_missing:
            msg = f"{path} not found: run `python -m nncf_calibtip.zoo.resnet` to train it."
            raise FileNotFoundError(msg)
        model = train()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(path)
    model = ResNet20()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def task(train_if_missing: bool = True, with_test: bool = True) -> Task:
    """The trained model with its calibration pool (training images) and held-out test set."""
    data = fashion_mnist.load()
    n_test = len(data.y_test) if with_test else 0
    return Task(
        name="resnet20",
        dataset="fashion_mnist",
        model=load_pretrained(train_if_missing),
        calibration_pool=fashion_mnist.normalize(data.x_train),
        x_test=fashion_mnist.normalize(data.x_test[:n_test]),
        y_test=data.y_test[:n_test].astype(np.int64),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--force", action="store_true", help="retrain even when a checkpoint is cached")
    args = parser.parse_args()
    path = checkpoint_path()
    if path.is_file() and not args.force:
        print(f"{path} exists; use --force to retrain")
        return
    model = train(epochs=args.epochs)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    data = fashion_mnist.load()
    with torch.no_grad():
        x = torch.from_numpy(fashion_mnist.normalize(data.x_test))
        pred = torch.cat([model(x[i : i + 1000]).argmax(1) for i in range(0, len(x), 1000)])
    acc = (pred.numpy() == data.y_test).mean()
    print(f"saved {path}; test accuracy {acc:.4f}")


if __name__ == "__main__":
    main()
