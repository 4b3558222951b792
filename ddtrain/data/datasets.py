"""FashionMNIST: where it lives, checking it, fetching it, loading it, normalising batches.

Where the data comes from, first match wins:
  1. ``--data-dir DIR`` (the `data_dir` argument)
  2. ``$DDTRAIN_DATA``
  3. the user cache, ``$XDG_CACHE_HOME/ddtrain/fashion-mnist`` (default ``~/.cache/...``),
     where ``ddtrain data download`` puts it
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

The whole dataset stays in memory as uint8 (55 MB); batches are gathered as uint8 and
normalised to float32 on the device by `normalize_batch`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ddtrain.data.idx import (
    IMAGES_MAGIC,
    LABELS_MAGIC,
    parse_idx,
    read_bytes,
    read_header,
    sha256_of_decompressed,
)
from ddtrain.data.fashion_mnist import CLASSES, MEAN, NAME, STD
from ddtrain.data.transforms import NORMALIZE_MODES, normalize_batch, pixel_stats  # noqa: F401 (re-exported)
from ddtrain.errors import ConfigError, DataError


SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "DDTRAIN_DATA"
MIRRORS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
)
_OFFLINE_WAYS = (
    "point --data-dir or $DDTRAIN_DATA at a directory with the four IDX files; "
    "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu)"
)
HOW_TO_GET = f"get it one of three ways: {_OFFLINE_WAYS}; or `ddtrain data download`"


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


@dataclass
class Dataset:
    """A whole image-classification dataset in host memory.

    train_x: uint8 (N, H, W) or (N, H, W, C); may be read-only (it views the file's bytes).
    train_y: int64 (N,), values in [0, len(classes)).
    test_x, test_y: the same for the M test samples.
    mean, std: pixel statistics of the training images scaled to [0, 1], for
    ``normalize_batch(..., "standard")``.
    source: the directory the data was read from.
    """

    name: str
    source: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: list[str] = field(default_factory=lambda: list(CLASSES))
    mean: float = MEAN
    std: float = STD

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample, e.g. (28, 28) or (32, 32, 3)."""
        return tuple(self.train_x.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def check(self) -> None:
        """DataError unless shapes, dtypes and label ranges are consistent."""
        where = f"{self.name} in {self.source}"
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if x.dtype != np.uint8 or x.ndim not in (3, 4):
                raise DataError(f"{where}: {split} images must be uint8 (N, H, W[, C]), got {x.dtype} {x.shape}")
            if y.ndim != 1 or len(y) != len(x):
                raise DataError(f"{where}: {len(x)} {split} images but labels of shape {y.shape}")
            if len(y) and (y.min() < 0 or y.max() >= self.num_classes):
                raise DataError(
                    f"{where}: {split} labels span [{y.min()}, {y.max()}], expected [0, {self.num_classes})"
                )
        if self.test_x.shape[1:] != self.train_x.shape[1:]:
            raise DataError(f"{where}: train images {self.input_shape}, test images {self.test_x.shape[1:]}")


# ----------------------------------------------------------------------------- location


def cache_root() -> Path:
    """ddtrain's user cache directory: ``$XDG_CACHE_HOME/ddtrain`` or ``~/.cache/ddtrain``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ddtrain"


def cache_dir() -> Path:
    """Where ``ddtrain data download`` puts FashionMNIST."""
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
    """The directory to load FashionMNIST from. Raises DataError saying how to get it."""
    candidates = search(data_dir)
    for c in candidates:
        if c.ok:
            return c.path
        if c.strict:
            what = "does not exist" if not c.path.is_dir() else f"lacks {', '.join(c.missing)} (.gz or raw)"
            raise DataError(f"{c.how} {c.path}: {what}; {HOW_TO_GET}")
    searched = ", ".join(str(c.path) for c in candidates)
    raise DataNotFound(f"FashionMNIST not found (searched {searched}); {HOW_TO_GET}")


# ----------------------------------------------------------------------------- loading


def _check_hash(path: Path, expected: str, actual: str) -> None:
    if actual != expected:
        raise DataError(
            f"{path}: sha256 mismatch: expected {expected[:12]}..., got {actual[:12]}...; "
            f"the file is corrupt or not FashionMNIST: delete it and run `ddtrain data download`"
        )


def load_fashion_mnist(directory: str | os.PathLike, verify: bool = True) -> Dataset:
    """FashionMNIST from the four IDX files in `directory` (see `find_files`).

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
            _check_hash(path, f.sha256, hashlib.sha256(data).hexdigest())
        arrays[f.key] = arr
    ds = Dataset(
        name=NAME,
        source=str(directory),
        train_x=arrays["train_x"],
        train_y=arrays["train_y"].astype(np.int64),
        test_x=arrays["test_x"],
        test_y=arrays["test_y"].astype(np.int64),
    )
    ds.check()
    return ds


def load_dataset(
    name: str = NAME, data_dir: str | os.PathLike | None = None, train_samples: int | None = None,
    download_missing: Callable[[str], None] | None = None,
) -> Dataset:
    """The dataset `name`: "fashion-mnist" (found as `locate` says) or "torchvision:NAME".

    data_dir: for torchvision:NAME, torchvision's root (default: the user cache's
    ``torchvision/``; see ddtrain.data.torchvision_data).
    train_samples: keep only the first N training samples (views, no copy); None keeps all.
    download_missing: when FashionMNIST is found nowhere, download it into the user cache,
    reporting progress through this function (as torchvision's download=True); None: raise.
    Raises ConfigError for an unknown name or a bad train_samples, DataError for
    missing or bad data.
    """
    if name == NAME:
        try:
            directory = locate(data_dir)
        except DataNotFound:
            if download_missing is None:
                raise
            download_missing(f"FashionMNIST not found locally: downloading it into {cache_dir()}")
            directory = download(log=download_missing)
        ds = load_fashion_mnist(directory)
    elif name.startswith("torchvision:") and len(name) > len("torchvision:"):
        from ddtrain.data.torchvision_data import load_torchvision

        ds = load_torchvision(name.split(":", 1)[1], data_dir)
    else:
        raise ConfigError(f"unknown dataset {name!r}: use {NAME!r} or torchvision:NAME (torchvision:CIFAR10...)")
    if train_samples is not None:
        n = len(ds.train_x)
        if not 1 <= train_samples <= n:
            raise ConfigError(f"train_samples must be in [1, {n}] for {ds.name}, got {train_samples}")
        ds.train_x, ds.train_y = ds.train_x[:train_samples], ds.train_y[:train_samples]
    return ds


# ----------------------------------------------------------------------------- CLI helpers


def info(data_dir: str | os.PathLike | None = None) -> list[str]:
    """Lines for ``ddtrain data info``: where ddtrain looks, what it found, file headers.

    Never raises for missing or bad data: it reports them (``verify`` is the check).
    """
    lines = [f"dataset: {NAME}, {len(CLASSES)} classes: {', '.join(CLASSES)}", "search order:"]
    candidates = search(data_dir)
    for c in candidates:
        if c.ok or not c.files:
            state = "ok" if c.ok else "not found"
        else:
            state = f"incomplete, lacks {', '.join(c.missing)}"
        lines.append(f"  {c.how}: {c.path} ({state})")
    chosen = next((c for c in candidates if c.ok), None)
    if chosen is None:
        lines.append(f"using: none; {HOW_TO_GET}")
        return lines
    lines.append(f"using: {chosen.path} ({chosen.how})")
    for f in FILES:
        path = chosen.files[f.key]
        try:
            _, shape = read_header(path)
            desc = "x".join(map(str, shape)) + " uint8"
        except DataError as e:
            desc = f"BAD: {e}"
        lines.append(f"  {path.name:<30} {path.stat().st_size:>10} bytes  {desc}")
    return lines


def verify(data_dir: str | os.PathLike | None = None) -> list[str]:
    """Lines for ``ddtrain data verify``: each file's sha256 checked against the known-good table.

    Raises DataError (listing every bad file on one line) when any file fails, or when
    the data cannot be found.
    """
    directory = locate(data_dir)
    files = find_files(directory)
    lines, bad = [f"checking {directory}"], []
    for f in FILES:
        path = files[f.key]
        try:
            _check_hash(path, f.sha256, sha256_of_decompressed(path))
            lines.append(f"  ok  {path.name:<30} sha256 {f.sha256[:16]}...")
        except DataError as e:
            bad.append(str(e))
    if bad:
        raise DataError(" | ".join(bad))
    return lines


# ----------------------------------------------------------------------------- download


def download(
    dest: str | os.PathLike | None = None,
    mirrors: Sequence[str] = MIRRORS,
    timeout: float = 30.0,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Fetch the four ``.gz`` files into `dest` (default: the user cache) and return it.

    Each file is tried from each mirror in turn (URL = mirror + name + ".gz"), written
    under a temporary name, checked against the known-good sha256, then renamed into
    place, so an interrupted or corrupt download never leaves a file ddtrain would load.
    Files already present and valid are kept. urllib only; `timeout` seconds per
    connection and per read. log: called with progress lines (e.g. click.echo).
    Raises DataError when a file cannot be had from any mirror.
    """
    dest = Path(dest) if dest is not None else cache_dir()
    log = log or (lambda line: None)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{dest}: cannot create the download directory: {e.strerror or e}") from None
    have = find_files(dest)
    for f in FILES:
        if f.key in have and _is_valid(have[f.key], f):
            log(f"ok      {have[f.key]} (already there)")
            continue
        final = dest / f"{f.name}.gz"
        errors = []
        for mirror in mirrors:
            url = mirror.rstrip("/") + f"/{f.name}.gz"
            log(f"fetching {url}")
            err = _fetch(url, final, f, timeout)
            if err is None:
                log(f"  saved {final} (sha256 ok)")
                break
            log(f"  failed: {err}")
            errors.append(f"{url}: {err}")
        else:
            tried = "; ".join(errors) or "no mirror to try"
            raise DataError(f"could not download {f.name}.gz ({tried}); without internet: {_OFFLINE_WAYS}")
        stale = dest / f.name  # a raw file would shadow the new .gz: it failed its check
        if stale.exists():
            stale.unlink()
    return dest


def _is_valid(path: Path, f: IdxFile) -> bool:
    try:
        return sha256_of_decompressed(path) == f.sha256
    except DataError:
        return False


def _fetch(url: str, final: Path, f: IdxFile, timeout: float) -> str | None:
    """Download `url` to `final` via a temporary file; None on success, else why not."""
    # A hidden name that still ends in .gz, so it is read (and hashed) as gzip.
    tmp = final.with_name(f".{os.getpid()}.part.{final.name}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as out:
            shutil.copyfileobj(r, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        actual = sha256_of_decompressed(tmp)
        if actual != f.sha256:
            return f"sha256 mismatch: expected {f.sha256[:12]}..., got {actual[:12]}..."
        os.replace(tmp, final)
        return None
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code} {e.reason}"
    except urllib.error.URLError as e:
        return f"{e.reason}"
    except DataError as e:
        return str(e).split(": ", 1)[-1]
    except (OSError, ValueError) as e:  # timeouts, resets, bad URLs
        return f"{type(e).__name__}: {e}"
    finally:
        if tmp.exists():
            tmp.unlink()
