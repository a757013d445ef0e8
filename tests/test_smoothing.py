"""lib_merge.core.smoothing against scipy: median3 bit for bit, smooth bit for bit (scipy's gaussian on our median).

Expectations come from scipy.ndimage itself (the seed's smoothAdd), never from lib_merge.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import scipy.ndimage
import torch

from lib_merge.core import smoothing

SHAPES = [
    (1,), (2,), (3,), (4,), (9,),
    (1, 77), (77, 1), (1, 1), (2, 2), (2, 3), (3, 3), (5, 7), (7, 5), (3, 40), (41, 2), (64, 33),
    (2, 2, 2), (3, 4, 5), (6, 1, 4), (5, 6, 7), (9, 8, 3), (4, 2, 11),
    (8, 4, 3, 3), (3, 3, 3, 3), (2, 2, 2, 2), (1, 2, 3, 1), (4, 1, 3, 3), (7, 6, 2, 3), (6, 7, 3, 2),
    (5, 9, 1, 1), (3, 8, 2, 2), (9, 4, 5, 3), (4, 5, 6, 7), (12, 10, 3, 3), (320, 4, 3, 3), (4, 33, 3, 3),
]


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint32)


def _values(rng: np.random.Generator, shape, kind: str) -> np.ndarray:
    if kind == "normal":
        return rng.standard_normal(shape).astype(np.float32)
    if kind == "binary":  # the 0-1 principle: a comparator network that gets every 0/1 input right is exact
        return rng.integers(0, 2, shape).astype(np.float32)
    if kind == "ties":  # integer-valued floats, many equal values
        return rng.integers(-3, 4, shape).astype(np.float32)
    if kind == "tiny":  # magnitudes spread over many exponents, negatives, denormals, exact zeros
        values = rng.standard_normal(shape) * np.exp2(rng.integers(-140, 40, shape))
        return np.where(rng.random(shape) < 0.1, 0.0, values).astype(np.float32)
    raise ValueError(kind)


def assert_median_exact(x: np.ndarray, threads: int = 1):
    expected = scipy.ndimage.median_filter(x, size=3)
    got = smoothing.median3(torch.from_numpy(x), threads=threads)
    assert got.dtype == torch.float32 and tuple(got.shape) == x.shape
    np.testing.assert_array_equal(_bits(got.numpy()), _bits(expected), err_msg=f"shape {x.shape}")


@pytest.mark.parametrize("kind", ["normal", "binary", "ties", "tiny"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_median3_matches_scipy_bit_for_bit(shape, kind):
    rng = np.random.default_rng(zlib.crc32(repr((shape, kind)).encode()))
    assert_median_exact(_values(rng, shape, kind))


def test_median3_constant_and_rank0():
    assert_median_exact(np.full((6, 5, 3, 3), 2.5, dtype=np.float32))
    x = torch.tensor(3.25)
    assert smoothing.median3(x).item() == 3.25 and smoothing.median3(x).dim() == 0


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_median3_across_chunks(monkeypatch, threads):
    """Chunks of few rows (so many chunks, an overlapping last chunk, odd row counts) and several threads."""
    monkeypatch.setattr(smoothing, "_TARGET_POSITIONS", 700)
    rng = np.random.default_rng(7)
    for shape in [(101, 30, 3, 3), (98, 30, 3, 3), (57, 64), (300, 9), (45, 20, 2)]:
        assert_median_exact(_values(rng, shape, "normal"), threads)
        assert_median_exact(_values(rng, shape, "ties"), threads)


def test_median3_default_chunks_real_shapes():
    """Real SD shapes, scaled: wider than one chunk's columns budget, several default-sized chunks."""
    rng = np.random.default_rng(3)
    for shape in [(160, 320, 3, 3), (1280, 96), (3000, 40)]:
        assert_median_exact(_values(rng, shape, "normal"), threads=2)


def test_median3_half_precision_is_exact():
    rng = np.random.default_rng(5)
    x = torch.from_numpy(_values(rng, (20, 12, 3, 3), "normal"))
    for dtype in (torch.float16, torch.bfloat16):
        xd = x.to(dtype)
        expected = torch.from_numpy(scipy.ndimage.median_filter(xd.float().numpy(), size=3)).to(dtype)
        got = smoothing.median3(xd)
        assert got.dtype == dtype and torch.equal(got, expected)


def test_median3_does_not_modify_input():
    x = torch.randn(10, 9, 3, 3)
    before = x.clone()
    smoothing.median3(x)
    assert torch.equal(x, before)


def test_many_channels_fall_back_to_scipy():
    rng = np.random.default_rng(11)
    assert_median_exact(_values(rng, (9, 9, 9, 9), "normal"))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(3,), (1, 77), (5, 7), (8, 4, 3, 3), (130, 40, 3, 3), (200, 17), (70, 6, 2)],
                         ids=lambda s: "x".join(map(str, s)))
def test_smooth_matches_scipy_pipeline_bit_for_bit(monkeypatch, shape, threads):
    monkeypatch.setattr(smoothing, "_GAUSS_BAND", 64)  # bands on small arrays too
    rng = np.random.default_rng(zlib.crc32(repr(shape).encode()))
    x = _values(rng, shape, "normal")
    expected = scipy.ndimage.gaussian_filter(scipy.ndimage.median_filter(x, size=3), sigma=1)
    got = smoothing.smooth(torch.from_numpy(x), threads=threads)
    assert got.dtype == torch.float32
    np.testing.assert_array_equal(_bits(got.numpy()), _bits(expected))


def test_smooth_rank0_and_dtype():
    assert smoothing.smooth(torch.tensor(1.5, dtype=torch.float16)).item() == 1.5
    x = torch.randn(6, 5, dtype=torch.float16)
    expected = scipy.ndimage.gaussian_filter(scipy.ndimage.median_filter(x.float().numpy(), size=3), sigma=1)
    np.testing.assert_array_equal(smoothing.smooth(x).numpy(), expected)


def test_network_building_blocks_are_exact():
    """merge and select on symbolic lists, evaluated on random sorted lists with ties; _trunc on plain lists."""
    rng = np.random.default_rng(2)
    for m, n in [(1, 1), (2, 3), (3, 6), (9, 9), (18, 9), (27, 27), (5, 12)]:
        net = smoothing._Net()
        a = [net.leaf(i) for i in range(m)]
        b = [net.leaf(m + i) for i in range(n)]
        merged = net.merge(a, b, "P")
        selects = {k: net.select(a, b, k, "P") for k in range(1, m + n + 1)}
        for _ in range(30):
            vals = np.concatenate([np.sort(rng.integers(0, 5, m)), np.sort(rng.integers(0, 5, n))]).tolist()

            def ev(ref, vals=vals, net=net):
                kind, x, y, _ = net.nodes[ref[0]]
                return vals[x] if kind == "leaf" else (min if kind == "min" else max)(ev(x), ev(y))

            assert [ev(r) for r in merged] == sorted(vals)
            assert all(ev(r) == sorted(vals)[k - 1] for k, r in selects.items())
    for _ in range(300):
        low, rest = sorted(rng.integers(0, 6, rng.integers(1, 12)).tolist()), rng.integers(0, 6, 7).tolist()
        for k in range(1, len(low) + len(rest) + 1):
            kept, kk = smoothing._trunc(low, k, len(rest))
            assert sorted(kept + rest)[kk - 1] == sorted(low + rest)[k - 1]
