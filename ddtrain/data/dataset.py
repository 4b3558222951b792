"""`Dataset`: the in-memory image-classification dataset every loader returns.

The contract the trainer, the evaluator and the model builder rely on: images are
uint8 (N, C, H, W), channels first whatever the source stored, so `input_shape`
(C, H, W) is what `build_model` gets and a ``flatten`` layer sees C*H*W features
in channel-major order (FashionMNIST: (1, 28, 28), 784 features, the same order as
the IDX file). Labels are int64 class indices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ddtrain.errors import DataError


@dataclass
class Dataset:
    """A whole image-classification dataset in host memory.

    name: the name it was loaded by ("fashion-mnist", "torchvision:CIFAR10").
    source: the directory the data was read from.
    train_x: uint8 (N, C, H, W); may be read-only (FashionMNIST's views the file's bytes).
    train_y: int64 (N,), values in [0, len(classes)).
    test_x, test_y: the same for the M test samples, images of the same (C, H, W).
    classes: the class names, index = label.
    mean, std: pixel statistics of the training images scaled to [0, 1] (over all
    channels), for ``normalize_batch(..., "standard")``.
    """

    name: str
    source: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str]
    mean: float
    std: float

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one sample, (C, H, W): (1, 28, 28) for FashionMNIST, (3, 32, 32) for CIFAR10."""
        return tuple(int(s) for s in self.train_x.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def check(self) -> None:
        """DataError unless shapes, dtypes and label ranges are consistent."""
        where = f"{self.name} in {self.source}"
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if x.dtype != np.uint8 or x.ndim != 4:
                raise DataError(f"{where}: {split} images must be uint8 (N, C, H, W), got {x.dtype} {x.shape}")
            if y.ndim != 1 or len(y) != len(x):
                raise DataError(f"{where}: {len(x)} {split} images but labels of shape {y.shape}")
            if len(y) and (y.min() < 0 or y.max() >= self.num_classes):
                raise DataError(
                    f"{where}: {split} labels span [{y.min()}, {y.max()}], expected [0, {self.num_classes})"
                )
        if self.test_x.shape[1:] != self.train_x.shape[1:]:
            raise DataError(f"{where}: train images {self.input_shape}, test images {self.test_x.shape[1:]}")
