"""IDX reading: the real files, and every kind of broken file giving a one-line DataError."""

from __future__ import annotations

import gzip
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ddtrain.data.fashion_mnist import FILES, find_files
from ddtrain.data.idx import (
    IMAGES_MAGIC,
    LABELS_MAGIC,
    parse_idx,
    read_bytes,
    read_header,
    read_idx,
    sha256_of_decompressed,
)
from ddtrain.errors import DataError


def idx_bytes(arr: np.ndarray) -> bytes:
    """`arr` (uint8) encoded as IDX."""
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + np.ascontiguousarray(arr, dtype=np.uint8).tobytes()


def write(path: Path, data: bytes, gz: bool | None = None) -> Path:
    gz = path.name.endswith(".gz") if gz is None else gz
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def assert_one_line_error(excinfo, path, *phrases):
    msg = str(excinfo.value)
    assert "\n" not in msg
    assert msg.startswith(str(path)), msg
    for p in phrases:
        assert p in msg, msg


# ----------------------------------------------------------------------------- the real files


def test_real_files_shapes_labels_and_checksums(fmnist_dir):
    files = find_files(fmnist_dir)
    shapes = {"train_x": (60000, 28, 28), "train_y": (60000,), "test_x": (10000, 28, 28), "test_y": (10000,)}
    for f in FILES:
        arr = read_idx(files[f.key], expect_magic=f.magic)
        assert arr.shape == shapes[f.key] and arr.dtype == np.uint8
        assert sha256_of_decompressed(files[f.key]) == f.sha256
        assert read_header(files[f.key]) == (f.magic, shapes[f.key])
    train_y = read_idx(files["train_y"])
    assert np.bincount(train_y).tolist() == [6000] * 10
    assert np.bincount(read_idx(files["test_y"])).tolist() == [1000] * 10
    sums = fmnist_dir / "SHA256SUMS.decompressed"  # published next to the shared copy
    if sums.exists():
        published = dict(reversed(line.split()) for line in sums.read_text().splitlines() if line.strip())
        assert {f.name: f.sha256 for f in FILES} == published


def test_read_idx_is_a_view_of_the_decompressed_bytes(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    out = read_idx(write(tmp_path / "a-idx3-ubyte.gz", idx_bytes(a)), IMAGES_MAGIC)
    np.testing.assert_array_equal(out, a)
    assert not out.flags.writeable and not out.flags.owndata


def test_raw_and_gz_read_the_same(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    raw = read_idx(write(tmp_path / "x", idx_bytes(a)))
    gz = read_idx(write(tmp_path / "x.gz", idx_bytes(a)))
    np.testing.assert_array_equal(raw, a)
    np.testing.assert_array_equal(gz, a)
    assert sha256_of_decompressed(tmp_path / "x") == sha256_of_decompressed(tmp_path / "x.gz")


def test_generic_ubyte_idx_of_any_rank(tmp_path):
    for shape in [(4,), (2, 3), (2, 3, 4, 5)]:
        a = np.arange(np.prod(shape), dtype=np.uint8).reshape(shape)
        np.testing.assert_array_equal(read_idx(write(tmp_path / "g.gz", idx_bytes(a))), a)


# ----------------------------------------------------------------------------- broken files


def test_bad_magic(tmp_path):
    p = write(tmp_path / "bad.gz", b"\x12\x34\x08\x01" + b"\0" * 8)
    with pytest.raises(DataError) as e:
        read_idx(p)
    assert_one_line_error(e, p, "bad magic 0x12340801")


def test_gzip_content_in_a_raw_name_gets_a_hint(tmp_path):
    p = tmp_path / "train-labels-idx1-ubyte"
    p.write_bytes(gzip.compress(idx_bytes(np.zeros(3, np.uint8))))
    with pytest.raises(DataError) as e:
        read_idx(p)
    assert_one_line_error(e, p, "bad magic", "name it .gz")


def test_unsupported_element_type(tmp_path):
    p = write(tmp_path / "f.gz", b"\0\0\x0d\x01" + struct.pack(">I", 1) + b"\0" * 4)
    with pytest.raises(DataError) as e:
        read_idx(p)
    assert_one_line_error(e, p, "float32", "only ubyte")


def test_wrong_dimensions_for_the_expected_kind(tmp_path):
    labels = write(tmp_path / "train-labels-idx1-ubyte.gz", idx_bytes(np.zeros(6, np.uint8)))
    with pytest.raises(DataError) as e:
        read_idx(labels, expect_magic=IMAGES_MAGIC)
    assert_one_line_error(e, labels, "bad magic 2049", "expected 2051")
    images = write(tmp_path / "train-images-idx3-ubyte.gz", idx_bytes(np.zeros((2, 2, 2), np.uint8)))
    with pytest.raises(DataError) as e:
        read_idx(images, expect_magic=LABELS_MAGIC)
    assert_one_line_error(e, images, "bad magic 2051", "expected 2049")


def test_truncated_payload(tmp_path):
    data = idx_bytes(np.zeros((3, 2, 2), np.uint8))[:-7]
    p = write(tmp_path / "train-images-idx3-ubyte.gz", data)
    with pytest.raises(DataError) as e:
        read_idx(p)
    assert_one_line_error(e, p, "truncated: header says 3x2x2 = 12 bytes, file has 5")


def test_truncated_header(tmp_path):
    p = write(tmp_path / "h.gz", b"\0\0\x08\x03" + b"\0" * 5)
    with pytest.raises(DataError) as e:
        read_idx(p)
    assert_one_line_error(e, p, "truncated", "16-byte header")
    with pytest.raises(DataError):
        read_header(p)


def test_trailing_bytes(tmp_path):
    p = write(tmp_path / "l", idx_bytes(np.zeros(4, np.uint8)) + b"xx")
    with pytest.raises(DataError) as e:
        read_idx(p)
    assert_one_line_error(e, p, "trailing bytes: header says 4 = 4 bytes, file has 6")


@pytest.mark.parametrize(
    "content, phrase",
    [
        (b"not gzip at all", "bad gzip data"),
        (gzip.compress(b"\0\0\x08\x01\0\0\0\x05hello" * 100)[:40], "truncated"),
        (gzip.compress(idx_bytes(np.zeros(2, np.uint8))) + b"garbage!", "bad gzip data"),
        (b"", "bad gzip data"),
    ],
    ids=["not-gzip", "cut-stream", "trailing-garbage", "empty"],
)
def test_bad_gzip(tmp_path, content, phrase):
    p = tmp_path / "t10k-labels-idx1-ubyte.gz"
    p.write_bytes(content)
    for fn in (read_idx, sha256_of_decompressed):
        with pytest.raises(DataError) as e:
            fn(p)
        assert_one_line_error(e, p, phrase)


def test_concatenated_gzip_members_are_one_file(tmp_path):
    data = idx_bytes(np.arange(10, dtype=np.uint8))
    p = tmp_path / "c.gz"
    p.write_bytes(gzip.compress(data[:7]) + gzip.compress(data[7:]))
    np.testing.assert_array_equal(read_idx(p), np.arange(10))


def test_missing_file(tmp_path):
    p = tmp_path / "nope.gz"
    with pytest.raises(DataError) as e:
        read_bytes(p)
    assert_one_line_error(e, p, "cannot read")


# ----------------------------------------------------------------------------- fuzz

_idx_like = st.one_of(
    st.binary(max_size=64),
    # valid-looking headers with arbitrary dims and payloads, the interesting region
    st.builds(
        lambda t, nd, dims, payload: bytes([0, 0, t, nd]) + struct.pack(f">{len(dims)}I", *dims) + payload,
        st.sampled_from([0x08, 0x08, 0x09, 0x0D, 0x42]),
        st.integers(0, 4),
        st.lists(st.integers(0, 6), max_size=4),
        st.binary(max_size=200),
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_idx_like)
def test_arbitrary_bytes_only_raise_data_error(data):
    try:
        arr = parse_idx(data, "fuzz")
    except DataError as e:
        assert "\n" not in str(e) and str(e).startswith("fuzz: ")
    else:
        assert arr.dtype == np.uint8 and arr.size == len(data) - 4 - 4 * arr.ndim


@settings(max_examples=100, deadline=None)
@given(_idx_like, st.booleans(), st.booleans())
def test_arbitrary_files_only_raise_data_error(data, gz_name, gz_content):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / ("f.gz" if gz_name else "f")
        p.write_bytes(gzip.compress(data) if gz_content else data)
        for fn in (read_idx, read_header, sha256_of_decompressed):
            try:
                fn(p)
            except DataError as e:
                assert "\n" not in str(e) and str(e).startswith(str(p))
