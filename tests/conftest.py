"""Tiny real models built in the tests, and their calibration data."""

from __future__ import annotations

import os

os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "900")

import nncf  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402


def randomize_batch_norms(bns: list[nn.BatchNorm2d]) -> None:
    """Statistics and affine parameters away from the identity, the same for every run."""
    gen = torch.Generator().manual_seed(0)
    for bn in bns:
        bn.running_mean.uniform_(-0.1, 0.1, generator=gen)
        bn.running_var.uniform_(0.5, 1.5, generator=gen)
        bn.weight.data.uniform_(0.5, 1.5, generator=gen)
        bn.bias.data.uniform_(-0.1, 0.3, generator=gen)


class TinyNet(nn.Module):
    """conv/BN/ReLU, max-pool, depthwise/BN/ReLU6, pointwise conv/BN with a residual add, a
    zero-padded conv without BN, global pooling and a linear head: the shapes AdaQuant meets."""

    def __init__(self, zero_channel: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 16, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.grouped = nn.Conv2d(16, 32, 3, groups=4)
        self.fc = nn.Linear(32, 10)
        randomize_batch_norms([self.bn0, self.bn1, self.bn2])
        if zero_channel:
            with torch.no_grad():
                self.dw.weight[3].zero_()
                self.pw.weight[5].zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        x = F.max_pool2d(x, 2)
        y = F.relu6(self.bn1(self.dw(x)))
        x = x + self.bn2(self.pw(y))
        x = F.relu(self.grouped(F.pad(x, (1, 1, 1, 1))))
        return self.fc(x.mean((2, 3)))


class ResNetBlocks(nn.Module):
    """Two residual blocks, ResNet style: one with an identity shortcut, one whose 1x1
    shortcut conv runs after the main branch (as in torchvision), each add followed by ReLU."""

    def __init__(self) -> None:
        super().__init__()

        def conv_bn(cin: int, cout: int, k: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout))

        self.stem = conv_bn(3, 16, 3)
        self.a1, self.a2 = conv_bn(16, 16, 3), conv_bn(16, 16, 3)
        self.b1, self.b2 = conv_bn(16, 32, 3, 2), conv_bn(32, 32, 3)
        self.shortcut = conv_bn(16, 32, 1, 2)
        self.fc = nn.Linear(32, 10)
        randomize_batch_norms([m for m in self.modules() if isinstance(m, nn.BatchNorm2d)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(self.a2(F.relu(self.a1(x))) + x)
        y = self.b2(F.relu(self.b1(x)))
        x = F.relu(y + self.shortcut(x))
        return self.fc(x.mean((2, 3)))


def make_images(n: int, seed: int) -> torch.Tensor:
    """Smooth random 3x16x16 images (low-frequency noise, like natural images after resizing)."""
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.randn(n, 3, 4, 4, generator=g), size=16, mode="bilinear", align_corners=False)


@pytest.fixture
def tiny_model() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture
def calib_data() -> torch.Tensor:
    return make_images(256, seed=1)


@pytest.fixture
def calib_dataset(calib_data: torch.Tensor) -> nncf.Dataset:
    return nncf.Dataset([calib_data[i : i + 32] for i in range(0, len(calib_data), 32)])


@pytest.fixture
def test_data() -> torch.Tensor:
    return make_images(128, seed=2)
