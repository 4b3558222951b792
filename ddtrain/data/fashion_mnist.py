"""FashionMNIST: its files and their known-good hashes, where ddtrain finds them, loading them.

Where the data comes from, first match wins:
  1. ``--data-dir DIR`` (the `data_dir` argument)
  2. ``$DDTRAIN_DATA``
  3. the user cache, ``$XDG_CACHE_HOME/ddtrain/fashion-mnist`` (default ``~/.cache/...``),
     where ``ddtrain data download`` puts it (ddtrain.data.download)
  4. ``/usr/share/datasets/fashion-mnist`` (Debian's package dataset-fashion-mnist)
A directory qualifies when it holds the four IDX files, each either gzip-compressed
(``NAME.gz``) or raw (``NAME``; raw is preferred, it loads faster). A directory named
by 1 or 2 must qualify: a typo there is an error, not a silent fall-through.

Every load checks the sha256 of each file's decompressed bytes against the
known-good table `FILES` (kept in the code, as torchvision keeps its checksums), so
a ``.gz`` and a gunzipped copy check the same. Hashing the 55 MB already in memory
costs a tenth of the gunzip (measured on the training images: 0.03 s against
0.21 s; a whole load, imports included, takes 0.4 s), so there is no stamp file to
go stale: every start is verified.

The images are returned as (N, 1, 28, 28) uint8 (`INPUT_SHAPE` per sample): a view
of the IDX file's (N, 28, 28) bytes with a channel axis, no copy; the whole dataset
stays in memory (55 MB).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ddtrain.data.cache import cache_root
from ddtrain.data.dataset import Dataset
from ddtrain.data.idx import IMAGES_MAGIC, LABELS_MAGIC, parse_idx, read_bytes, sha256_of_decompressed
from ddtrain.errors import DataError

NAME = "fashion-mnist"
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
CHANNELS, HEIGHT, WIDTH = 1, 28, 28
INPUT_SHAPE = (CHANNELS, HEIGHT, WIDTH)  # one sample, as `Dataset.input_shape` gives it
# Pixel statistics of the FashionMNIST training set, after scaling to [0, 1].
MEAN = 0.2860
STD = 0.3530

SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "DDTRAIN_DATA"
MIRRORS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
)
OFFLINE_WAYS = (
    "point --data-dir or $DDTRAIN_DATA at a directory with the four IDX files; "
    "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu)"
)
HOW_TO_GET = f"get it one of three ways: {OFFLINE_WAYS}; or `ddtrain data download`"


class DataNotFound(DataError):
    """No directory in the search order holds the dataset (as opposed to one that is broken)."""


@dataclass(frozen=True)
class IdxFile:
    """One file of the dataset: its key in `Dataset`, its IDX name, its known-good hash."""

    key: str  # train_x, train_y, test_x, test_y
    name: str  # without .gz
    sha256: str  # of the decompressed bytes
    magic: int


# The known-good table (as torchvision keeps one): sha256 of the decompressed files.
FILES = (
    IdxFile("train_x", "train-images-idx3-ubyte",
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888", IMAGES_MAGIC),
    IdxFile("train_y", "train-labels-idx1-ubyte",
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9", LABELS_MAGIC),
    IdxFile("test_x", "t10k-images-idx3-ubyte",
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b", IMAGES_MAGIC),
    IdxFile("test_y", "t10k-labels-idx1-ubyte",
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34", LABELS_MAGIC),
)  # fmt: skip


# ----------------------------------------------------------------------------- location


def cache_dir() -> Path:
    """Where ``ddtrain data download`` puts FashionMNIST: the user cache's ``fashion-mnist/``."""
    return cache_root() / NAME


@dataclass(frozen=True)
class Candidate:
    """One place searched for the data, and what was found there.

    how: which rule named it ("--data-dir", "$DDTRAIN_DATA", "user cache", "system").
    path: the directory (rules that do not apply, e.g. an unset variable, are left out).
    files: IdxFile.key -> path of the file found (raw preferred over .gz).
    strict: named explicitly by the user, so it must qualify.
    """

    how: str
    path: Path
    files: dict[str, Path]
    strict: bool

    @property
    def ok(self) -> bool:
        return len(self.files) == len(FILES)

    @property
    def missing(self) -> list[str]:
        return [f.name for f in FILES if f.key not in self.files]


def find_files(directory: Path) -> dict[str, Path]:
    """IdxFile.key -> the file for it in `directory` (raw ``NAME`` before ``NAME.gz``)."""
    found = {}
    for f in FILES:
        for candidate in (directory / f.name, directory / f"{f.name}.gz"):
            if candidate.is_file():
                found[f.key] = candidate
                break
    return found


def search(data_dir: str | os.PathLike | None = None) -> list[Candidate]:
    """The places searched, in order (see the module docstring), with what each holds.

    When data_dir or $DDTRAIN_DATA is given, only that one place is searched.
    """
    explicit = [("--data-dir", data_dir), ("$" + ENV_VAR, os.environ.get(ENV_VAR) or None)]
    for how, d in explicit:
        if d is not None:
            p = Path(d).expanduser()
            return [Candidate(how, p, find_files(p), strict=True)]
    places = [("user cache", cache_dir()), ("system", SYSTEM_DIR)]
    return [Candidate(how, p, find_files(p), strict=False) for how, p in places]


def locate(data_dir: str | os.PathLike | None = None) -> Path:
    """The directory to load FashionMNIST from.

    Raises DataNotFound when no place in the search order has it, DataError when an
    explicitly named place lacks it; both say how to get it.
    """
    candidates = search(data_dir)
    for c in candidates:
        if c.ok:
            return c.path
        if c.strict:
            what = "does not exist" if not c.path.is_dir() else f"lacks {', '.join(c.missing)} (.gz or raw)"
            raise DataError(f"{c.how} {c.path}: {what}; {HOW_TO_GET}")
    searched = ", ".join(str(c.path) for c in candidates)
    raise DataNotFound(f"FashionMNIST not found (searched {searched}); {HOW_TO_GET}")


# ----------------------------------------------------------------------------- checking and loading


def check_hash(path: Path, expected: str, actual: str) -> None:
    """DataError naming `path` unless the sha256 `actual` is the known-good `expected`."""
    if actual != expected:
        raise DataError(
            f"{path}: sha256 mismatch: expected {expected[:12]}..., got {actual[:12]}...; "
            f"the file is corrupt or not FashionMNIST: delete it and run `ddtrain data download`"
        )


def verify(data_dir: str | os.PathLike | None = None) -> tuple[Path, list[tuple[IdxFile, Path]]]:
    """Check every file's sha256 against the known-good table (for ``ddtrain data verify``).

    Returns (the directory `locate` chose, [(IdxFile, its path)] for the four files, all good).
    Raises DataError (listing every bad file on one line) when any file fails, or when
    the data cannot be found.
    """
    directory = locate(data_dir)
    files = find_files(directory)
    checked, bad = [], []
    for f in FILES:
        path = files[f.key]
        try:
            check_hash(path, f.sha256, sha256_of_decompressed(path))
            checked.append((f, path))
        except DataError as e:
            bad.append(str(e))
    if bad:
        raise DataError(" | ".join(bad))
    return directory, checked


def load_fashion_mnist(directory: str | os.PathLike, verify: bool = True) -> Dataset:
    """FashionMNIST from the four IDX files in `directory` (see `find_files`).

    Images come back (N, 1, 28, 28): the file's (N, 28, 28) viewed with a channel axis.
    verify: check each file's sha256 (about 0.03 s; on by default, off only for tests
    of deliberately altered files). Raises DataError naming the bad file.
    """
    directory = Path(directory)
    files = find_files(directory)
    arrays = {}
    for f in FILES:
        if f.key not in files:
            raise DataError(f"{directory / f.name}: missing (and no {f.name}.gz); {HOW_TO_GET}")
        path = files[f.key]
        data = read_bytes(path)
        # Structure first (magic, dimensions, length), so that a broken file is named for its
        # fault; a well-formed file with other content is then a checksum mismatch.
        arr = parse_idx(data, str(path), f.magic)
        if verify:
            check_hash(path, f.sha256, hashlib.sha256(data).hexdigest())
        arrays[f.key] = arr
    ds = Dataset(
        name=NAME,
        source=str(directory),
        train_x=_with_channel_axis(arrays["train_x"]),
        train_y=arrays["train_y"].astype(np.int64),
        test_x=_with_channel_axis(arrays["test_x"]),
        test_y=arrays["test_y"].astype(np.int64),
        classes=list(CLASSES),
        mean=MEAN,
        std=STD,
    )
    ds.check()
    return ds


def _with_channel_axis(images: np.ndarray) -> np.ndarray:
    """(N, H, W) -> (N, 1, H, W), a view (the IDX array is contiguous)."""
    return images.reshape(images.shape[0], CHANNELS, *images.shape[1:])
