"""`factorize`, the truncated SVD behind LoRA extraction and re-rank merges, and `factorize_product`, the same from a
change's own factors (re-rank merges of LoRA/LoCon modules), against float64 numpy SVDs of each test's
own matrix: the rank-r error is the Eckart–Young truncation error, the factors follow kohya's convention (up = U·S,
down = Vᵀ with orthonormal rows), for both routes (plain SVD for small layers, the Gram matrix's eigenvectors for the
others), tall, wide, square, 4-D conv, zero and rank-deficient inputs, and "auto" picks numpy's rank."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lib_merge.lora.formats import LoraError
from lib_merge.lora.lowrank import GRAM_MIN_LONG_SIDE, GRAM_MIN_SIDE, RankChoice, factorize, factorize_product

# (shape, route): each route is reached by a shape on its side of the size thresholds
SHAPES = [((1100, 60), "gram"), ((60, 1100), "gram"), ((520, 520), "gram"), ((40, 120, 3, 3), "gram"),
          ((90, 50), "svd"), ((50, 90), "svd"), ((70, 70), "svd"), ((30, 20, 3, 3), "svd")]


def _matrix(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)


def _route(shape) -> str:
    rows, cols = shape[0], int(np.prod(shape[1:]))
    return "gram" if min(rows, cols) >= GRAM_MIN_SIDE or max(rows, cols) >= GRAM_MIN_LONG_SIDE else "svd"


def _reference(mat: torch.Tensor) -> np.ndarray:
    return np.linalg.svd(mat.reshape(mat.shape[0], -1).double().numpy(), compute_uv=False)


def _product(up: torch.Tensor, down: torch.Tensor) -> np.ndarray:
    return up.reshape(up.shape[0], -1).double().numpy() @ down.reshape(down.shape[0], -1).double().numpy()


@pytest.mark.parametrize(("shape", "route"), SHAPES)
def test_shapes_reach_the_route_they_test(shape, route):
    assert _route(shape) == route


@pytest.mark.parametrize(("shape", "route"), SHAPES)
def test_rank_r_error_is_the_truncation_error_and_factors_are_u_s_and_vt(shape, route):
    mat = _matrix(shape, 1)
    s = _reference(mat)
    up, down = factorize(mat, RankChoice(8))
    flat = mat.reshape(shape[0], -1).double().numpy()
    assert up.dtype == down.dtype == torch.float32
    if len(shape) == 4:
        assert up.shape == (shape[0], 8, 1, 1) and down.shape == (8, *shape[1:])
    else:
        assert up.shape == (shape[0], 8) and down.shape == (8, shape[1])
    error = float(((flat - _product(up, down)) ** 2).sum())
    assert error == pytest.approx(float((s[8:] ** 2).sum()), rel=1e-5)
    d = down.reshape(8, -1).double().numpy()
    np.testing.assert_allclose(d @ d.T, np.eye(8), atol=1e-6)  # down = Vᵀ: orthonormal rows
    np.testing.assert_allclose(np.linalg.norm(up.reshape(shape[0], 8).double().numpy(), axis=0), s[:8],
                               rtol=0, atol=1e-6 * s[0])  # up = U·S: columns of length s_i


@pytest.mark.parametrize(("shape", "route"), SHAPES)
def test_known_spectrum_gives_the_exact_rank_r_matrix(shape, route):
    """M = U·diag(s)·Vᵀ with well separated singular values: the factors' product is U_r·S_r·V_rᵀ itself."""
    rows, cols = shape[0], int(np.prod(shape[1:]))
    rng = np.random.default_rng(2)
    k = min(rows, cols)
    u, _ = np.linalg.qr(rng.standard_normal((rows, k)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, k)))
    s = 0.9 ** np.arange(k) * 3.0
    mat = torch.from_numpy((u * s) @ v.T).float()
    up, down = factorize(mat.reshape(shape), RankChoice(6))
    want = (u[:, :6] * s[:6]) @ v[:, :6].T
    np.testing.assert_allclose(_product(up, down), want, rtol=0, atol=1e-5 * s[0])


@pytest.mark.parametrize(("shape", "route"), SHAPES)
def test_rank_at_or_above_the_size_gives_the_matrix_back(shape, route):
    mat = _matrix(shape, 3)
    size = min(shape[0], int(np.prod(shape[1:])))
    for asked in (size, size + 7):
        up, down = factorize(mat, RankChoice(asked))
        assert up.shape[1] == size and down.shape[0] == size
        flat = mat.reshape(shape[0], -1).double().numpy()
        np.testing.assert_allclose(_product(up, down), flat, rtol=0, atol=2e-5 * np.abs(flat).max())


@pytest.mark.parametrize(("shape", "route"), SHAPES)
def test_zero_matrix_gives_zero_factors_product(shape, route):
    up, down = factorize(torch.zeros(shape), RankChoice(8), clamp=0.99)
    assert torch.isfinite(up).all() and torch.isfinite(down).all()
    assert up.shape[1] == down.shape[0] == 8
    assert not np.any(_product(up, down))


@pytest.mark.parametrize(("shape", "route"), SHAPES)
def test_rank_deficient_matrix_is_exact_without_nan(shape, route):
    """Exact rank 3 asked at rank 8: the five extra singular values are 0 (no division by them), product exact."""
    rows, cols = shape[0], int(np.prod(shape[1:]))
    a, b = _matrix((rows, 3), 4).double(), _matrix((3, cols), 5).double()
    flat = (a @ b).numpy()
    up, down = factorize(torch.from_numpy(flat).float().reshape(shape), RankChoice(8))
    assert torch.isfinite(up).all() and torch.isfinite(down).all()
    assert up.shape[1] == 8
    np.testing.assert_allclose(_product(up, down), flat, rtol=0, atol=2e-5 * np.abs(flat).max())


@pytest.mark.parametrize(("shape", "route"), SHAPES)
@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99])
def test_auto_rank_is_the_float64_reference_rank(shape, route, energy):
    mat = _matrix(shape, 6)
    s2 = _reference(mat) ** 2
    expected = int(np.searchsorted(np.cumsum(s2) / s2.sum(), energy)) + 1  # smallest r keeping the fraction
    up, down = factorize(mat, RankChoice(None, energy))
    assert up.shape[1] == down.shape[0] == expected
    error = float(((mat.reshape(shape[0], -1).double().numpy() - _product(up, down)) ** 2).sum())
    assert error == pytest.approx(float(s2[expected:].sum()), rel=1e-5, abs=1e-10 * s2.sum())


def test_auto_rank_of_a_zero_matrix_is_one():
    up, down = factorize(torch.zeros(600, 600), RankChoice(None, 0.9))
    assert up.shape == (600, 1) and down.shape == (1, 600) and not np.any(_product(up, down))


def test_lowrank_method_is_exact_on_a_low_rank_matrix():
    a, b = _matrix((700, 5), 7).double(), _matrix((5, 300), 8).double()
    flat = (a @ b).numpy()
    up, down = factorize(torch.from_numpy(flat).float(), RankChoice(5), method="lowrank")
    assert up.shape == (700, 5)
    np.testing.assert_allclose(_product(up, down), flat, rtol=0, atol=2e-5 * np.abs(flat).max())


def test_clamp_caps_both_factors_at_the_quantile_of_their_values():
    mat = _matrix((1100, 60), 9)
    up, down = factorize(mat, RankChoice(8), clamp=0.9)
    values = torch.cat([up.flatten(), down.flatten()]).double().numpy()
    top = values.max()
    # the clamp is symmetric at the 0.9 quantile: about a tenth of the values sit on the upper bound
    assert np.mean(values == top) >= 0.09 and values.min() >= -top


@pytest.mark.parametrize(("shape", "route"), SHAPES)
def test_each_component_has_its_heavy_tail_positive(shape, route):
    up, down = factorize(_matrix(shape, 12), RankChoice(8))
    u, d = up.reshape(shape[0], 8).double().numpy(), down.reshape(8, -1).double().numpy()
    assert np.all((u ** 3).sum(axis=0) + (d ** 3).sum(axis=1) >= 0)


def test_orientation_lowers_the_clamp_loss_on_a_skewed_matrix():
    """Components whose large values are all negative: the 0.99 quantile of the signed values then is small and
    cuts them, unless each component is turned so its heavy tail is positive. Clamp error compared with numpy's
    SVD factors turned the other way, computed here in float64."""
    rng = np.random.default_rng(13)
    spikes = 0.05 * rng.standard_normal((600, 4))
    spikes[rng.choice(600, (30, 4)), np.arange(4)] = 1.0  # 30 large values of one sign per component: a heavy tail
    u, _ = np.linalg.qr(spikes)
    v, _ = np.linalg.qr(rng.standard_normal((300, 4)))
    flat = (u * [4.0, 3.0, 2.0, 1.0]) @ v.T
    up, down = factorize(torch.from_numpy(flat).float(), RankChoice(4), clamp=0.9)
    ours = np.linalg.norm(flat - _product(up, down))
    uu, ss, vh = np.linalg.svd(flat, full_matrices=False)
    fu, fd = uu[:, :4] * ss[:4], vh[:4]
    flip = -np.sign((fu ** 3).sum(0) + (fd ** 3).sum(1))  # heavy tails negative
    fu, fd = fu * flip, fd * flip[:, None]
    hi = np.quantile(np.concatenate([fu.ravel(), fd.ravel()]), 0.9)
    other = np.linalg.norm(flat - np.clip(fu, -hi, hi) @ np.clip(fd, -hi, hi))
    assert ours < other


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_change_is_refused(bad):
    mat = _matrix((600, 600), 10)
    mat[3, 4] = bad
    with pytest.raises(LoraError, match="NaN or infinite"):
        factorize(mat, RankChoice(8))


def test_unknown_method_is_refused():
    with pytest.raises(LoraError, match="Unknown SVD method 'qr'"):
        factorize(_matrix((10, 10), 11), RankChoice(2), method="qr")


# `factorize_product`: the same factors from the change's own factors (QR of each side, SVD of the small core)
PRODUCT_SHAPES = [((900, 24), (24, 700)), ((60, 24), (24, 1300)), ((40, 6, 1, 1), (6, 30, 1, 1)),
                  ((40, 6, 1, 1), (6, 20, 3, 3)), ((50, 12), (12, 50))]


def _factors(up_shape, down_shape, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _matrix(up_shape, seed), _matrix(down_shape, seed + 1)


@pytest.mark.parametrize(("up_shape", "down_shape"), PRODUCT_SHAPES)
@pytest.mark.parametrize("rank", [1, 5])
def test_product_rank_r_is_the_truncated_svd_of_the_product(up_shape, down_shape, rank):
    up, down = _factors(up_shape, down_shape, 10)
    flat = _product(up, down)
    s = np.linalg.svd(flat, compute_uv=False)
    new_up, new_down = factorize_product(up, down, RankChoice(rank))
    assert new_up.dtype == new_down.dtype == torch.float32
    change_shape = (up_shape[0], *down_shape[1:])
    if len(change_shape) == 4:
        assert new_up.shape == (up_shape[0], rank, 1, 1) and new_down.shape == (rank, *down_shape[1:])
    error = float(((flat - _product(new_up, new_down)) ** 2).sum())
    assert error == pytest.approx(float((s[rank:] ** 2).sum()), rel=1e-5)
    d = new_down.reshape(rank, -1).double().numpy()
    np.testing.assert_allclose(d @ d.T, np.eye(rank), atol=1e-6)  # down = Vᵀ: orthonormal rows
    np.testing.assert_allclose(np.linalg.norm(new_up.reshape(up_shape[0], rank).double().numpy(), axis=0),
                               s[:rank], rtol=0, atol=1e-6 * s[0])  # up = U·S


@pytest.mark.parametrize(("up_shape", "down_shape"), PRODUCT_SHAPES)
def test_product_matches_factorize_of_the_formed_change(up_shape, down_shape):
    """The same factors as the whole change's SVD (signs chosen alike), to float32 precision."""
    up, down = _factors(up_shape, down_shape, 20)
    change = torch.from_numpy(_product(up, down)).float().reshape(up_shape[0], *down_shape[1:])
    want_up, want_down = factorize(change, RankChoice(4))
    got_up, got_down = factorize_product(up, down, RankChoice(4))
    scale = float(want_up.abs().max())
    np.testing.assert_allclose(got_up.numpy(), want_up.numpy(), rtol=0, atol=1e-4 * scale)
    np.testing.assert_allclose(got_down.numpy(), want_down.numpy(), rtol=0, atol=1e-4)


def test_product_rank_above_the_inner_rank_gives_the_change_back_with_zero_components():
    up, down = _factors((300, 6), (6, 200), 30)
    flat = _product(up, down)
    new_up, new_down = factorize_product(up, down, RankChoice(10))
    assert new_up.shape == (300, 10) and new_down.shape == (10, 200)
    np.testing.assert_allclose(_product(new_up, new_down), flat, rtol=0, atol=1e-5 * np.abs(flat).max())
    assert not new_up[:, 6:].any() and not new_down[6:].any()  # the change's singular values past 6 are 0
    up_cap, down_cap = factorize_product(up[:8], down, RankChoice(50))  # capped at min(out, in) = 8
    assert up_cap.shape == (8, 8) and down_cap.shape == (8, 200)


def test_product_of_repeated_factors_is_exact_without_nan():
    """Two identical LoRAs side by side: the stacked factors are rank-deficient (QR's R is singular)."""
    up, down = _factors((120, 4), (4, 90), 40)
    both_up, both_down = torch.cat([up, 0.5 * up], 1), torch.cat([down, down], 0)
    flat = 1.5 * _product(up, down)
    new_up, new_down = factorize_product(both_up, both_down, RankChoice(8))
    assert torch.isfinite(new_up).all() and torch.isfinite(new_down).all()
    np.testing.assert_allclose(_product(new_up, new_down), flat, rtol=0, atol=1e-5 * np.abs(flat).max())
    zero_up, zero_down = factorize_product(torch.zeros(30, 4), torch.zeros(4, 20), RankChoice(None, 0.9))
    assert zero_up.shape == (30, 1) and not np.any(_product(zero_up, zero_down))


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99])
def test_product_auto_rank_is_the_float64_reference_rank(energy):
    up, down = _factors((400, 16), (16, 300), 50)
    flat = _product(up, down)
    s2 = np.linalg.svd(flat, compute_uv=False) ** 2
    expected = int(np.searchsorted(np.cumsum(s2) / s2.sum(), energy)) + 1
    new_up, new_down = factorize_product(up, down, RankChoice(None, energy))
    assert new_up.shape[1] == new_down.shape[0] == expected


def test_product_too_large_for_float32_is_refused():
    """Finite fp32 factors whose product overflows fp32 (1e30·1e30·2): a clear error, not inf factors."""
    up, down = torch.full((4, 2), 1e30), torch.full((2, 4), 1e30)
    with pytest.raises(LoraError, match="too large for float32"):
        factorize_product(up, down, RankChoice(2))
