"""Run under the torchvision venv by test_torchvision.py: dump what torchvision sees.

    $DDTRAIN_TV_PYTHON tests/data/tv_dump.py ROOT OUT      (PYTHONPATH = the repository)

ROOT holds ROOT/FashionMNIST/raw/<gunzipped IDX files> (torchvision's layout; it
cannot download here). Writes to OUT, as .npy:
  {train,test}_{x,y}   torchvision.datasets.FashionMNIST's .data / .targets
  unit, standard       the first 256 training images through ToTensor, and through
                       ToTensor + Normalize((0.2860,), (0.3530,)), shape (256, 1, 28, 28)
  fake_rgb_x, fake_rgb_y, fake_gray_x   torchvision FakeData images as ddtrain's item-by-item
                       conversion stores them, (N, C, H, W) (no .data attribute: the slow path)
and converts the dataset with ddtrain.data.torchvision_data.convert (writing
ROOT/FashionMNIST.ddtrain.npz), so the test can load it without torchvision.
"""

import sys
from pathlib import Path

import numpy as np
import torch
from torchvision import datasets, transforms

from ddtrain.data.fashion_mnist import MEAN, STD
from ddtrain.data.torchvision_data import _to_arrays, convert

root, out = sys.argv[1], Path(sys.argv[2])
for split in ("train", "test"):
    ds = datasets.FashionMNIST(root, train=split == "train", download=False)
    np.save(out / f"{split}_x.npy", ds.data.numpy())
    np.save(out / f"{split}_y.npy", ds.targets.numpy())

pipelines = {
    "unit": transforms.ToTensor(),
    "standard": transforms.Compose([transforms.ToTensor(), transforms.Normalize((MEAN,), (STD,))]),
}
for name, tf in pipelines.items():
    ds = datasets.FashionMNIST(root, train=True, download=False, transform=tf)
    np.save(out / f"{name}.npy", torch.stack([ds[i][0] for i in range(256)]).numpy())

convert("FashionMNIST", root, download=False)

rgb = datasets.FakeData(size=20, image_size=(3, 32, 20), num_classes=4, random_offset=1)
np.save(out / "fake_rgb_x.npy", _to_arrays(rgb, "FakeData")[0])
np.save(out / "fake_rgb_y.npy", _to_arrays(rgb, "FakeData")[1])
np.save(out / "fake_rgb_ref.npy", np.asarray(rgb[7][0]))  # PIL -> (H, W, C)
gray = datasets.FakeData(size=5, image_size=(1, 28, 28), num_classes=3)
np.save(out / "fake_gray_x.npy", _to_arrays(gray, "FakeData")[0])
