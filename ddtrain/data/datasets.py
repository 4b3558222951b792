"""The data layer's names under their old home, for the callers not yet moved.

The modules that own them, one job each:
  ddtrain.data.dataset         Dataset, the (N, C, H, W) container every loader returns
  ddtrain.data.registry        dataset names ("fashion-mnist", "torchvision:NAME") and load_dataset
  ddtrain.data.fashion_mnist   FashionMNIST's files, hashes, search order, load_fashion_mnist
  ddtrain.data.download        the downloader
  ddtrain.data.transforms      pixel_stats, normalize_batch
  ddtrain.data.cache           the user cache directory
New code imports from those; ddtrain.train.trainer and ddtrain.train.evaluate still
import load_dataset and normalize_batch from here.
"""

from ddtrain.data.cache import cache_root
from ddtrain.data.dataset import Dataset
from ddtrain.data.download import download
from ddtrain.data.fashion_mnist import (
    CLASSES,
    ENV_VAR,
    FILES,
    HOW_TO_GET,
    INPUT_SHAPE,
    MEAN,
    MIRRORS,
    NAME,
    STD,
    SYSTEM_DIR,
    Candidate,
    DataNotFound,
    IdxFile,
    cache_dir,
    find_files,
    load_fashion_mnist,
    locate,
    search,
)
from ddtrain.data.registry import load_dataset
from ddtrain.data.transforms import NORMALIZE_MODES, normalize_batch, pixel_stats

__all__ = [
    "CLASSES", "ENV_VAR", "FILES", "HOW_TO_GET", "INPUT_SHAPE", "MEAN", "MIRRORS", "NAME", "NORMALIZE_MODES",
    "STD", "SYSTEM_DIR", "Candidate", "DataNotFound", "Dataset", "IdxFile", "cache_dir", "cache_root",
    "download", "find_files", "load_dataset", "load_fashion_mnist", "locate", "normalize_batch",
    "pixel_stats", "search",
]  # fmt: skip
