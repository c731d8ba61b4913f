"""A model with its data: what a sample or a benchmark row needs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn


@dataclass
class Task:
    """A trained FP model, a pool of unlabeled calibration inputs and a labelled test set.

    :param name: Model name (benchmark JSON ``model``).
    :param dataset: Data set name (benchmark JSON ``dataset``).
    :param model: FP torch model in eval mode.
    :param calibration_pool: Model inputs calibration samples are drawn from (training data).
    :param x_test: Held-out model inputs, never used for calibration.
    :param y_test: Their class ids.
    """

    name: str
    dataset: str
    model: nn.Module
    calibration_pool: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
