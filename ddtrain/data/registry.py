"""Dataset names: the one place a ``--dataset`` / ``data.dataset`` name is resolved and loaded.

Known names:
  fashion-mnist      the FashionMNIST IDX files (ddtrain.data.fashion_mnist), found in the
                     search order there, or downloaded into the user cache when asked
  torchvision:NAME   any torchvision image dataset (ddtrain.data.torchvision_data), e.g.
                     torchvision:CIFAR10; torchvision is needed only for the first load

`resolve` checks a name without loading anything (the config validation uses it),
`load_dataset` loads it, `input_shape` gives its per-sample (C, H, W) shape (for
FashionMNIST without touching a file).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from ddtrain.errors import ConfigError

if TYPE_CHECKING:
    from ddtrain.data.dataset import Dataset

# No numpy at import: config validation calls `resolve` before the BLAS thread count is set.
# The loaders are imported when a dataset is loaded.
FASHION_MNIST = "fashion-mnist"  # = ddtrain.data.fashion_mnist.NAME (a test holds them equal)
TORCHVISION = "torchvision"
TORCHVISION_PREFIX = TORCHVISION + ":"


def resolve(name: str) -> tuple[str, str]:
    """(family, argument) of a dataset name: ("fashion-mnist", "") or ("torchvision", "CIFAR10").

    Raises ConfigError for any other name (including an empty torchvision:).
    """
    if name == FASHION_MNIST:
        return FASHION_MNIST, ""
    family, sep, arg = name.partition(":")
    if sep and family == TORCHVISION and arg:
        return TORCHVISION, arg
    raise ConfigError(
        f"unknown dataset {name!r}: use {FASHION_MNIST!r} or {TORCHVISION_PREFIX}NAME ({TORCHVISION_PREFIX}CIFAR10...)"
    )


def load_dataset(
    name: str = FASHION_MNIST, data_dir: str | os.PathLike | None = None, train_samples: int | None = None,
    download_missing: Callable[[str], None] | None = None,
) -> Dataset:
    """The dataset `name` (see the module docstring), images (N, C, H, W) uint8.

    data_dir: FashionMNIST's --data-dir (see ddtrain.data.fashion_mnist), or for
    torchvision:NAME torchvision's root (default: the user cache's ``torchvision/``).
    train_samples: keep only the first N training samples (views, no copy); None keeps all.
    download_missing: when FashionMNIST is found nowhere, download it into the user cache,
    reporting progress through this function (as torchvision's download=True); None: raise.
    Raises ConfigError for an unknown name or a bad train_samples, DataError for
    missing or bad data.
    """
    family, arg = resolve(name)
    if family == FASHION_MNIST:
        ds = _load_fashion_mnist(data_dir, download_missing)
    else:
        from ddtrain.data.torchvision_data import load_torchvision

        ds = load_torchvision(arg, data_dir)
    if train_samples is not None:
        n = len(ds.train_x)
        if not 1 <= train_samples <= n:
            raise ConfigError(f"train_samples must be in [1, {n}] for {ds.name}, got {train_samples}")
        ds.train_x, ds.train_y = ds.train_x[:train_samples], ds.train_y[:train_samples]
    return ds


def input_shape(name: str, data_dir: str | os.PathLike | None = None) -> tuple[int, int, int]:
    """Per-sample (C, H, W) of dataset `name`, what `build_model` takes as in_shape.

    FashionMNIST's is a constant (no file is read); a torchvision dataset is loaded
    (its converted arrays) to learn it. Raises as `load_dataset` does.
    """
    family, _ = resolve(name)
    if family == FASHION_MNIST:
        from ddtrain.data.fashion_mnist import INPUT_SHAPE

        return INPUT_SHAPE
    return load_dataset(name, data_dir).input_shape


def _load_fashion_mnist(data_dir, download_missing) -> Dataset:
    from ddtrain.data import fashion_mnist

    try:
        directory = fashion_mnist.locate(data_dir)
    except fashion_mnist.DataNotFound:
        if download_missing is None:
            raise
        from ddtrain.data.download import download  # urllib only when it is needed

        download_missing(f"FashionMNIST not found locally: downloading it into {fashion_mnist.cache_dir()}")
        directory = download(log=download_missing)
    return fashion_mnist.load_fashion_mnist(directory)
