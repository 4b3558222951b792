"""Pixel statistics and batch normalisation (unit, standard), on the CPU and the GPU."""

from __future__ import annotations

import numpy as np
import pytest

from ddtrain.data.fashion_mnist import MEAN, STD
from ddtrain.data.transforms import normalize_batch, pixel_stats
from ddtrain.errors import ConfigError


def test_pixel_stats_match_the_published_constants(fmnist):
    mean, std = pixel_stats(fmnist.train_x)
    assert round(mean, 4) == MEAN and round(std, 4) == STD


def test_normalize_unit_and_standard():
    x = np.arange(256, dtype=np.uint8).reshape(4, 1, 8, 8)
    unit = normalize_batch(x, "unit")
    assert unit.dtype == np.float32 and unit.shape == x.shape
    np.testing.assert_array_equal(unit, x.astype(np.float32) / np.float32(255))
    assert unit[0, 0, 0, 0] == 0 and unit[-1, -1, -1, -1] == 1
    std = normalize_batch(x, "standard")
    expected = (x.astype(np.float32) / np.float32(255) - np.float32(MEAN)) / np.float32(STD)
    np.testing.assert_array_equal(std, expected)
    custom = normalize_batch(x, "standard", mean=0.5, std=0.25)
    np.testing.assert_allclose(custom, (x / 255 - 0.5) / 0.25, rtol=1e-6, atol=1e-6)


def test_standard_mode_centres_the_real_data(fmnist):
    z = normalize_batch(fmnist.train_x[:20000], "standard")
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01


def test_normalize_writes_into_out_of_any_shape(fmnist):
    x = fmnist.train_x[:16]  # (16, 1, 28, 28), read-only
    buf = np.full((32, 784), np.nan, dtype=np.float32)
    out = normalize_batch(x, "unit", out=buf[:16])
    assert out.shape == (16, 784) and np.shares_memory(out, buf)
    np.testing.assert_array_equal(buf[:16].reshape(x.shape), normalize_batch(x, "unit"))
    assert np.isnan(buf[16:]).all()
    for bad in (np.empty((16, 784), np.float64), np.empty((16, 783), np.float32), np.empty((784, 16), np.float32).T):
        with pytest.raises(ValueError, match="out must be"):
            normalize_batch(x, "unit", out=bad)
    with pytest.raises(ConfigError, match="normalize must be one of standard, unit"):
        normalize_batch(x, "minmax")


@pytest.mark.gpu
def test_normalize_on_the_gpu_matches_the_cpu(fmnist):
    from ddtrain.backend import resolve_backend

    be = resolve_backend("auto")
    if not be.is_gpu:
        pytest.skip("needs CuPy and a CUDA device")
    x = np.ascontiguousarray(fmnist.train_x[:64])
    buf = be.xp.empty((64, 784), dtype=be.xp.float32)
    for mode in ("unit", "standard"):
        out = normalize_batch(be.from_host(x), mode, out=buf)
        assert out is buf
        np.testing.assert_array_equal(be.to_host(out).reshape(x.shape), normalize_batch(x, mode))
