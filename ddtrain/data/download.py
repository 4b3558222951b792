"""``ddtrain data download``: FashionMNIST from its upstream mirrors into the user cache.

Only urllib. Nothing unverified is ever left where ddtrain would load it: each file is
written under a temporary name, checked against the known-good sha256 of
ddtrain.data.fashion_mnist.FILES, and only then renamed into place.
"""

from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from ddtrain.data.fashion_mnist import FILES, MIRRORS, OFFLINE_WAYS, IdxFile, cache_dir, find_files
from ddtrain.data.idx import sha256_of_decompressed
from ddtrain.errors import DataError


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
    Files already present and valid are kept. `timeout` seconds per connection and per
    read. log: called with progress lines (the CLI passes click.echo).
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
            raise DataError(f"could not download {f.name}.gz ({tried}); without internet: {OFFLINE_WAYS}")
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
