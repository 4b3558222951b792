"""FashionMNIST: what it is (names, classes, pixel statistics)."""

from __future__ import annotations

NAME = "fashion-mnist"
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
# Pixel statistics of the FashionMNIST training set, after scaling to [0, 1].
MEAN = 0.2860
STD = 0.3530
