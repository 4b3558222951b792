"""Augmentation: a pure function of (seed, epoch, global index); crop and flip as torchvision's."""

import numpy as np
import pytest

from ddtrain.data.augment import augment, augment_params


def images(n=12, c=2, h=7, w=5, seed=0):
    return np.random.default_rng(seed).standard_normal((n, c, h, w)).astype(np.float32) + 3.0  # no zeros


def reference(x, dy, dx, flip, pad, fill=0.0):
    """Per sample: np.pad with `fill`, the window at (dy, dx), then a left-right mirror."""
    _, _, h, w = x.shape
    out = np.empty_like(x)
    for n in range(len(x)):
        padded = np.pad(x[n], ((0, 0), (pad, pad), (pad, pad)), constant_values=fill)
        crop = padded[:, dy[n]:dy[n] + h, dx[n]:dx[n] + w]
        out[n] = crop[:, :, ::-1] if flip[n] else crop
    return out


@pytest.mark.parametrize("pad, hflip, fill", [(2, True, 0.0), (3, False, 0.0), (0, True, 0.0), (1, True, -0.8)])
def test_each_sample_is_padded_cropped_and_flipped(pad, hflip, fill):
    x, idx = images(), np.arange(100, 112)
    out = np.full_like(x, np.nan)
    augment(out, x, idx, seed=3, epoch=1, crop_pad=pad, hflip=hflip, fill=fill)
    dy, dx, flip = augment_params(idx, 3, 1, pad, hflip)
    assert dy.max() <= 2 * pad and dx.min() >= 0 and (flip.any() if hflip else not flip.any())
    np.testing.assert_allclose(out, reference(x, dy, dx, flip, pad, fill), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("splits", [[12], [6, 6], [1, 4, 7], [5, 0, 7]])
def test_any_split_of_the_batch_gives_the_same_rows(splits):
    x = images()
    idx = np.random.default_rng(1).permutation(1000)[:12]
    whole = np.empty_like(x)
    augment(whole, x, idx, seed=7, epoch=4, crop_pad=2, hflip=True)
    offset, parts = 0, []
    for k in splits:
        part = np.empty_like(x[offset:offset + k])
        augment(part, x[offset:offset + k], idx[offset:offset + k], seed=7, epoch=4, crop_pad=2, hflip=True)
        parts.append(part)
        offset += k
    np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_draws_depend_on_seed_epoch_and_index_only():
    idx = np.arange(5000)
    dy, dx, flip = augment_params(idx, 0, 0, 2, True)
    again = augment_params(idx[::-1].copy(), 0, 0, 2, True)
    np.testing.assert_array_equal(again[0][::-1], dy)  # a sample's draw does not depend on its position
    for seed, epoch in ((0, 1), (1, 0)):
        other = augment_params(idx, seed, epoch, 2, True)
        assert (other[0] != dy).mean() > 0.7 and (other[2] != flip).mean() > 0.4
    # every offset occurs, about equally often; offsets and flips are not correlated
    for a in (dy, dx):
        counts = np.bincount(a, minlength=5)
        assert counts.min() > 0.8 * 1000 and counts.max() < 1.2 * 1000
    assert 0.45 < flip.mean() < 0.55
    assert abs(np.corrcoef(dy, dx)[0, 1]) < 0.05 and abs(np.corrcoef(dy, flip)[0, 1]) < 0.05
    assert not augment_params(idx, 0, 0, 2, False)[2].any()


def test_no_crop_no_flip_is_a_copy_and_bad_arguments_are_refused():
    x = images()
    out = np.empty_like(x)
    augment(out, x, np.arange(12), 0, 0, crop_pad=0, hflip=False)
    np.testing.assert_array_equal(out, x)
    with pytest.raises(ValueError, match="indices for 12 samples"):
        augment(out, x, np.arange(5), 0, 0, 2, True)
    with pytest.raises(ValueError, match="crop_pad"):
        augment(out, x, np.arange(12), 0, 0, -1, True)


def test_a_steady_state_augmentation_allocates_nothing_and_equals_the_function():
    """Augmentation works in its own reused arrays: after the first batch of a shape, a call
    allocates nothing batch-sized, and gives what augment() without them gives."""
    import tracemalloc

    from ddtrain.data.augment import Augmentation
    x = np.random.default_rng(1).standard_normal((128, 1, 28, 28)).astype(np.float32)
    idx = np.arange(1000, 1128)
    aug = Augmentation(seed=5, crop_pad=2, hflip=True, fill=-0.8)
    aug(x, idx, epoch=0)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for epoch in (1, 2):
            out = aug(x, idx, epoch)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Batch-sized arrays are 400 kB (the images) and 800 kB (the gather's int64 index); numpy's
    # own ufunc buffers (8192 elements per operand, for casts and broadcasts) are freed at once.
    assert peak - base < 200_000, f"an augmentation call allocated {peak - base} bytes at its peak"
    expected = np.empty_like(x)
    augment(expected, x, idx, seed=5, epoch=2, crop_pad=2, hflip=True, fill=-0.8)
    np.testing.assert_array_equal(out, expected)
