"""Reading IDX files (the MNIST family's format), gzip-compressed or raw.

An IDX file is a 4-byte magic ``00 00 TT NN`` (TT: element type, NN: number of
dimensions), NN big-endian uint32 dimension sizes, then the elements in C order.
Only TT = 0x08 (unsigned byte) occurs in MNIST-like data and only it is read here:
magic 2051 (0x00000803) is an image file (N, rows, cols), 2049 (0x00000801) a label
file (N,).

Every problem (unreadable file, bad gzip, bad magic, wrong dimensions, truncated or
overlong payload) is a `DataError` with one line that starts with the file's path
and says what is wrong, so a user can tell which download to redo.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import zlib

import numpy as np

from ddtrain.errors import DataError

IMAGES_MAGIC = 2051  # 0x00000803: ubyte, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: ubyte, 1 dimension
UBYTE = 0x08
_TYPE_NAMES = {0x08: "ubyte", 0x09: "sbyte", 0x0B: "int16", 0x0C: "int32", 0x0D: "float32", 0x0E: "float64"}


def is_gzip_name(path: str | os.PathLike) -> bool:
    """True when the file name says gzip (``.gz``); the content must then be gzip."""
    return os.fspath(path).endswith(".gz")


def read_bytes(path: str | os.PathLike) -> bytes:
    """The decompressed content of `path` (gunzipped when its name ends in ``.gz``).

    Raises DataError when the file cannot be read or its gzip stream is corrupt,
    truncated, or followed by garbage.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"{os.fspath(path)}: cannot read: {e.strerror or e}") from None
    if not is_gzip_name(path):
        return data
    try:
        # zlib directly (wbits=31: one gzip member) tells a cut stream (not eof) from
        # bytes after the member (unused_data), which gzip.decompress does not say.
        d = zlib.decompressobj(wbits=31)
        out = d.decompress(data)
        if not d.eof:
            raise DataError(f"{os.fspath(path)}: bad gzip data: compressed stream is truncated")
        if d.unused_data:
            # Concatenated gzip members are legal gzip; real downloads never have them,
            # but accept them rather than reject a file gzip(1) itself reads.
            out += gzip.decompress(d.unused_data)
        return out
    except DataError:
        raise
    except (zlib.error, OSError, EOFError) as e:
        raise DataError(f"{os.fspath(path)}: bad gzip data: {e}") from None


def parse_idx(data: bytes, name: str = "<bytes>", expect_magic: int | None = None) -> np.ndarray:
    """The array held by the IDX bytes `data` (already decompressed).

    Returns a read-only uint8 array of the header's shape that views `data` (no copy);
    (N, rows, cols) for magic 2051, (N,) for magic 2049, any rank for other ubyte IDX.
    name: what to call the data in error messages (the file's path).
    expect_magic: IMAGES_MAGIC or LABELS_MAGIC to insist on images or labels; None: any.
    Raises DataError for a bad magic, a non-ubyte element type, or a payload whose
    length differs from what the header's dimensions say, checked in that order (a
    wrong magic is named as such, not as the length its dimensions would imply).
    """
    if len(data) < 4:
        raise DataError(f"{name}: truncated: {len(data)} bytes, an IDX header needs at least 4")
    zero, dtype, ndim = struct.unpack_from(">HBB", data, 0)
    magic = int.from_bytes(data[:4], "big")
    if zero != 0:
        hint = " (gzip-compressed? name it .gz)" if data[:2] == b"\x1f\x8b" else ""
        raise DataError(f"{name}: bad magic 0x{magic:08x}, not an IDX file{hint}")
    if dtype != UBYTE:
        what = _TYPE_NAMES.get(dtype, f"unknown type 0x{dtype:02x}")
        raise DataError(f"{name}: IDX element type {what} (magic {magic}); only ubyte (0x08) is supported")
    if ndim == 0:
        raise DataError(f"{name}: bad magic {magic}: IDX with 0 dimensions")
    check_magic(ndim, expect_magic, name)
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(
            f"{name}: truncated: magic {magic} needs a {header}-byte header, file has {len(data)} bytes"
        )
    shape = struct.unpack_from(f">{ndim}I", data, 4)
    expected = 1
    for s in shape:
        expected *= s
    payload = len(data) - header
    if payload != expected:
        what = "truncated" if payload < expected else "trailing bytes"
        dims = "x".join(map(str, shape))
        raise DataError(
            f"{name}: {what}: header says {dims} = {expected} bytes, file has {payload} after the header"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_idx(path: str | os.PathLike, expect_magic: int | None = None) -> np.ndarray:
    """The uint8 array stored in the IDX file `path` (``.gz`` or raw).

    expect_magic: IMAGES_MAGIC or LABELS_MAGIC to insist on images (N, rows, cols) or
    labels (N,); None accepts any ubyte IDX.
    Returns a read-only array viewing the decompressed bytes (one copy: the gunzip).
    Raises DataError (one line, naming the file) for anything wrong with the file.
    """
    return parse_idx(read_bytes(path), os.fspath(path), expect_magic)


def check_magic(ndim: int, expect_magic: int | None, name: str) -> None:
    """DataError unless a ubyte IDX of `ndim` dimensions is what `expect_magic` stands for."""
    if expect_magic is None:
        return
    want = {IMAGES_MAGIC: (3, "images (N, rows, cols)"), LABELS_MAGIC: (1, "labels (N,)")}[expect_magic]
    if ndim != want[0]:
        raise DataError(
            f"{name}: bad magic {0x800 + ndim}: expected {expect_magic} ({want[1]}), "
            f"file has {ndim} dimensions"
        )


def sha256_of_decompressed(path: str | os.PathLike) -> str:
    """Hex sha256 of the decompressed content of `path` (raw files: of the file).

    Decompresses exactly as `read_bytes` does (so the two never disagree about what
    a file holds) and raises DataError as it does.
    """
    return hashlib.sha256(read_bytes(path)).hexdigest()


def read_header(path: str | os.PathLike) -> tuple[int, tuple[int, ...]]:
    """(magic, shape) from the header of `path` alone: cheap, for ``ddtrain data info``.

    Does not check the payload length (`read_idx` does). Raises DataError.
    """
    name = os.fspath(path)
    try:
        opener = gzip.open if is_gzip_name(path) else open
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4:
                raise DataError(f"{name}: truncated: {len(head)} bytes, an IDX header needs at least 4")
            ndim = head[3]
            head += f.read(4 * ndim)
    except DataError:
        raise
    except (zlib.error, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{name}: bad gzip data: {e}") from None
    except OSError as e:
        raise DataError(f"{name}: cannot read: {e.strerror or e}") from None
    if head[:2] != b"\0\0" or head[2] != UBYTE or ndim == 0:
        parse_idx(head, name)  # raises the same message read_idx would
    if len(head) < 4 + 4 * ndim:
        raise DataError(f"{name}: truncated: header of {4 + 4 * ndim} bytes, file has {len(head)}")
    return int.from_bytes(head[:4], "big"), struct.unpack_from(f">{ndim}I", head, 4)
