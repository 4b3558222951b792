"""``--dataset torchvision:NAME``: any torchvision image-classification dataset, optional.

torchvision is needed once per dataset: the first load converts it to plain uint8
arrays in ``ROOT/NAME.ddtrain.npz`` (ROOT: --data-dir, else the user cache's
``torchvision/``), and later loads read that file with numpy alone
(``allow_pickle=False``: a data file cannot run code). torchvision is imported only
inside the functions here, so ddtrain never depends on it.

Supported: datasets whose constructor takes ``(root, train=bool, download=bool)`` or
``(root, split="train"|"test", download=bool)`` and whose items are (PIL image, int
label): MNIST, KMNIST, QMNIST, FashionMNIST, CIFAR10, CIFAR100, SVHN, USPS, ...
Images are stored and returned channels first, (N, C, H, W) as `Dataset` says: the
conversion turns torchvision's (N, H, W) and (N, H, W, C) (PIL's layout) into it once,
so no batch ever transposes. Converted files written before that layout was fixed
(no ``layout`` entry: (N, H, W) or (N, H, W, C)) are converted on their first load and
rewritten.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ddtrain.data.cache import cache_root
from ddtrain.data.dataset import Dataset
from ddtrain.data.transforms import pixel_stats
from ddtrain.errors import DataError

_KEYS = ("train_x", "train_y", "test_x", "test_y")
LAYOUT = "NCHW"  # of the images in a converted file; written as its ``layout`` entry


def npz_path(name: str, root: str | os.PathLike | None = None) -> Path:
    """Where the converted arrays of torchvision dataset `name` live."""
    return Path(root or cache_root() / "torchvision") / f"{name}.ddtrain.npz"


def load_torchvision(name: str, root: str | os.PathLike | None = None, download: bool = True) -> Dataset:
    """torchvision's dataset `name` as a `Dataset`, converting it on first use.

    root: the torchvision root directory (holds torchvision's own files and the
    converted .npz); default the user cache's ``torchvision/``.
    download: let torchvision download missing files (only on first use).
    Raises DataError when torchvision is missing, the name is unknown, or the
    dataset cannot be read.
    """
    root = Path(root or cache_root() / "torchvision")
    path = npz_path(name, root)
    if not path.exists():
        return convert(name, root, download)
    return _read_npz(name, path)


def convert(name: str, root: str | os.PathLike, download: bool = True) -> Dataset:
    """Read `name` through torchvision, write ``ROOT/NAME.ddtrain.npz``, return the Dataset.

    When ROOT is not writable the arrays are still returned, just not kept.
    """
    try:
        import torchvision.datasets as tvd
    except ImportError:
        raise DataError(
            f"--dataset torchvision:{name} needs torchvision: pip install torchvision"
        ) from None
    cls = getattr(tvd, name, None)
    if not isinstance(cls, type):
        raise DataError(f"torchvision.datasets has no dataset {name!r} (names are case-sensitive: CIFAR10)")
    root = Path(root)
    arrays = {}
    for split in ("train", "test"):
        ds = _open(cls, name, root, split, download)
        arrays[f"{split}_x"], arrays[f"{split}_y"] = _to_arrays(ds, name)
    classes = list(getattr(ds, "classes", None) or map(str, range(int(arrays["train_y"].max()) + 1)))
    mean, std = pixel_stats(arrays["train_x"])
    result = Dataset(f"torchvision:{name}", str(root), classes=classes, mean=mean, std=std, **arrays)
    result.check()
    _write_npz(npz_path(name, root), result)
    return result


def _open(cls, name: str, root: Path, split: str, download: bool):
    try:
        try:
            return cls(str(root), train=split == "train", download=download)
        except TypeError:
            return cls(str(root), split=split, download=download)
    except TypeError as e:
        raise DataError(f"torchvision:{name}: its constructor needs arguments ddtrain lacks ({e})") from None
    except Exception as e:  # torchvision raises RuntimeError, URLError, OSError...
        raise DataError(f"torchvision:{name} ({split}) in {root}: {type(e).__name__}: {e}") from None


def _to_arrays(ds, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, C, H, W), labels int64 (N,)) of a torchvision dataset.

    Fast path: the dataset's own ``data``/``targets`` arrays, (N, H, W), (N, H, W, C)
    (CIFAR) or (N, C, H, W) (SVHN), used only when, read channels first, they agree
    with what indexing returns for the first sample. Otherwise every item is read
    (slow, but once).
    """
    n = len(ds)
    if n == 0:
        raise DataError(f"torchvision:{name}: empty dataset")
    first = _image_array(ds[0][0], name)
    data = getattr(ds, "data", None)
    targets = getattr(ds, "targets", None)
    if targets is None:
        targets = getattr(ds, "labels", None)
    if data is not None and targets is not None:
        x = np.asarray(data)
        if x.dtype == np.uint8 and len(x) == n and len(targets) == n:
            for chw in _channels_first_readings(x):
                if np.array_equal(chw[0], first):
                    return np.ascontiguousarray(chw), np.asarray(targets, dtype=np.int64)
    x = np.empty((n, *first.shape), dtype=np.uint8)
    y = np.empty(n, dtype=np.int64)
    for i in range(n):
        img, label = ds[i]
        x[i] = _image_array(img, name)
        y[i] = int(label)
    return x, y


def _channels_first_readings(x: np.ndarray) -> list[np.ndarray]:
    """Views of a dataset's image array (N, ...) as (N, C, H, W), each a way it may be stored."""
    if x.ndim == 3:
        return [x[:, None]]  # (N, H, W): one channel
    if x.ndim == 4:
        return [x.transpose(0, 3, 1, 2), x]  # (N, H, W, C) as PIL gives it, or already (N, C, H, W)
    return []


def _image_array(img, name: str) -> np.ndarray:
    """One item's image (PIL (H, W) or (H, W, C)) as a uint8 (C, H, W) view."""
    a = np.asarray(img)
    if a.dtype != np.uint8 or a.ndim not in (2, 3):
        raise DataError(f"torchvision:{name}: items are {a.dtype} {a.shape}, not uint8 images (H, W[, C])")
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _write_npz(path: Path, ds: Dataset) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.savez(
                f,
                **{k: getattr(ds, k) for k in _KEYS},
                classes=np.array(ds.classes, dtype=np.str_),
                layout=np.str_(LAYOUT),
                mean=np.float64(ds.mean),
                std=np.float64(ds.std),
            )
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only root: the conversion is simply redone next time
    finally:
        if tmp.exists():
            tmp.unlink()


def _read_npz(name: str, path: Path) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in _KEYS}
            classes = [str(c) for c in z["classes"]]
            mean, std = float(z["mean"]), float(z["std"])
            layout = str(z["layout"]) if "layout" in z.files else None
    except Exception as e:  # BadZipFile, KeyError, ValueError (pickled object arrays)...
        raise DataError(f"{path}: unreadable ({type(e).__name__}: {e}); delete it to convert again") from None
    if layout not in (None, LAYOUT):
        raise DataError(f"{path}: images stored as {layout}, ddtrain reads {LAYOUT}; delete it to convert again")
    if layout is None:  # written before the layout was fixed: channels last, or no channel axis
        for k in ("train_x", "test_x"):
            readings = _channels_first_readings(arrays[k])  # the first: how ddtrain wrote them
            if readings:
                arrays[k] = np.ascontiguousarray(readings[0])
    ds = Dataset(f"torchvision:{name}", str(path.parent), classes=classes, mean=mean, std=std, **arrays)
    ds.check()
    if layout is None:
        _write_npz(path, ds)  # converted once: the next load reads channels first directly
    return ds
