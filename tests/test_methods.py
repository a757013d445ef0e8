"""Each merge method's kernel against its paper's definition, computed here independently in float64 (numpy) on
hand-sized tensors, with the edge cases: all-zero differences, sign-election ties, magnitude ties, p = 0, parallel
tensors for SLERP.

The random methods (DARE, DELLA) are checked against the documented stream: model i's draws for a key are
torch.rand(shape) from a generator seeded with the first 8 bytes (little-endian) of sha256("{seed}:{key}:{i}").
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch
from conftest import randn

from lib_merge.core import trim
from lib_merge.core.methods import METHODS, Params, merge_key


def run(name, base, models, **params):
    out = merge_key(METHODS[name], base, models, Params(**params))
    assert out.dtype == torch.float32
    return out.double().numpy()


def f64(t):
    return t.double().numpy()


def draws(seed, key, index, shape):
    digest = hashlib.sha256(f"{seed}:{key}:{index}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    return torch.rand(shape, generator=g, dtype=torch.float32).double().numpy()


def models3(shape=(6, 10), seed=0):
    base = randn(shape, seed)
    return base, [base + randn(shape, seed + i + 1, scale=0.3) for i in range(3)]


def close(out, expected, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(out, expected, rtol=rtol, atol=atol)


# -- references (float64, from the papers' definitions) ------------------------------------------------------------


def ref_trim(tau, density):
    """Keep the k = max(1, round(density·n)) largest |τ|, ties in favour of the lower flat index."""
    flat = tau.reshape(-1)
    k = max(1, round(density * flat.size))
    order = np.argsort(-np.abs(flat), kind="stable")
    out = np.zeros_like(flat)
    out[order[:k]] = flat[order[:k]]
    return out.reshape(tau.shape)


def ref_elect_mean(taus):
    taus = np.stack(taus)
    gamma = np.sign(taus.sum(0))
    agree = (np.sign(taus) == gamma) & (gamma != 0)
    count = agree.sum(0)
    return np.where(count > 0, (taus * agree).sum(0) / np.maximum(count, 1), 0.0)


# -- task arithmetic ---------------------------------------------------------------------------------------------


def test_task_arithmetic_is_base_plus_scaled_sum():
    base, ms = models3()
    out = run("task_arithmetic", base, ms, alpha=0.7, weights=(1.0, 0.5, -0.25))
    expected = f64(base) + 0.7 * sum(w * (f64(m) - f64(base)) for w, m in zip((1.0, 0.5, -0.25), ms, strict=True))
    close(out, expected)


def test_methods_never_modify_their_inputs():
    base, ms = models3()
    before = [base.clone(), *(m.clone() for m in ms)]
    for name, method in METHODS.items():
        chosen = ms[: method.max_models or 3][: max(method.min_models, min(3, method.max_models or 3))]
        run(name, base, chosen, alpha=0.6, density=0.5, drop=0.3, epsilon=0.1, seed=3, key="k")
        assert all(torch.equal(x, y) for x, y in zip(before, [base, *ms], strict=True)), name


# -- TIES ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_trim_elect_disjoint_mean(density):
    base, ms = models3()
    out = run("ties", base, ms, alpha=0.9, density=density)
    taus = [ref_trim(f64(m) - f64(base), density) for m in ms]
    close(out, f64(base) + 0.9 * ref_elect_mean(taus))


def test_ties_sign_election_by_mass_not_by_count():
    base = torch.zeros(3)
    # two small positive entries against one large negative one: the mass is negative, so -3 wins alone
    ms = [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([1.0, 0.0, 0.0]), torch.tensor([-3.0, 0.0, 0.0])]
    close(run("ties", base, ms, density=1.0), [-3.0, 0.0, 0.0])


def test_ties_exact_sign_tie_keeps_the_base():
    base = torch.tensor([0.5, 0.5])
    ms = [torch.tensor([2.5, 1.5]), torch.tensor([-1.5, 1.5])]  # entry 0: +2 and -2 tie; entry 1: +1, +1
    close(run("ties", base, ms, density=1.0), [0.5, 1.5])


def test_ties_magnitude_ties_keep_the_lower_index():
    base = torch.zeros(5)
    m = torch.tensor([1.0, 3.0, -3.0, 3.0, 2.0])  # density 0.4 keeps 2 of 5: the first two of three 3s
    close(run("ties", base, [m], density=0.4), [0.0, 3.0, -3.0, 0.0, 0.0])


def test_ties_all_zero_differences_give_the_base():
    base, _ = models3()
    assert np.array_equal(run("ties", base, [base.clone(), base.clone()], density=0.3), f64(base))


# -- TIES at the size where it streams: the sampled threshold, counted exactly ------------------------------------
# Keys of at least trim.SAMPLE_BELOW entries find each model's threshold from a sample and merge in trim.PIECE-sized
# pieces; these check the kept set against the definition (ref_trim: a full stable sort) across piece borders.

BIG = 3 * trim.PIECE + 12345  # four pieces, the last one short


def big_models(values, count=2, seed=0):
    """A base and `count` models whose task vectors take `values` uniformly. Everything lies on a grid of 1/1024 below
    1 in magnitude, so each difference is exact in fp16, fp32 and float64 alike, and ties are the same ties."""
    rng = np.random.default_rng(seed)
    base = torch.from_numpy(rng.integers(-512, 513, BIG) / 1024).float()
    return base, [base + torch.from_numpy(rng.choice(values, BIG)).float() for _ in range(count)]


GRID = np.arange(-512, 513) / 1024  # task vector values: 1025 of them, so every threshold has ties


def test_ties_trim_keeps_exactly_the_definitions_set_with_ties_spread_over_pieces():
    """One model onto a zero base: TIES is then the trimmed task vector itself, entry for entry. Magnitudes from
    eleven values, so thousands of entries tie at the threshold in every piece; the lowest indices among them stay."""
    assert BIG >= trim.SAMPLE_BELOW
    _, (m,) = big_models(np.arange(-5, 6) / 16, count=1)
    base = torch.zeros(BIG)
    for density in (0.3, 0.05, 0.5, 0.9999, 1 / BIG, 1.0):
        out = run("ties", base, [m], density=density)
        expected = ref_trim(f64(m), density)
        assert np.array_equal(out, expected), density
        assert np.count_nonzero(out) == min(max(1, round(density * BIG)), np.count_nonzero(f64(m)))


@pytest.mark.parametrize("weights", [(), (1.0, -0.75, 2.5)])
def test_ties_streamed_equals_the_definition_in_float64(weights):
    base, ms = big_models(GRID, count=3, seed=1)
    out = run("ties", base, ms, alpha=0.8, density=0.2, weights=weights)
    w = weights or (1.0, 1.0, 1.0)
    taus = [ref_trim(wi * (f64(m) - f64(base)), 0.2) for wi, m in zip(w, ms, strict=True)]
    close(out, f64(base) + 0.8 * ref_elect_mean(taus))


def test_ties_streamed_with_mostly_zero_differences():
    """Most of each task vector is 0 and density 0.5 keeps more than the rest: the threshold is 0, every nonzero
    entry stays; all-zero task vectors give the base."""
    base, ms = big_models(np.concatenate([np.zeros(9), [0.75, -0.25]]), count=2, seed=2)
    out = run("ties", base, ms, density=0.5)
    close(out, f64(base) + ref_elect_mean([f64(m) - f64(base) for m in ms]))
    assert np.array_equal(run("ties", base, [base.clone(), base.clone()], density=0.3), f64(base))


@pytest.mark.parametrize("sampled", ["zero", "large"])
def test_ties_threshold_is_exact_whatever_the_sample_says(sampled):
    """An adversarial key: every entry the sample looks at is 0 (or 100) and all others are not, so the sample's
    bracket misses the threshold; the counts notice and the threshold is taken over all entries instead."""
    positions = torch.randint(BIG, (trim.SAMPLE,), generator=torch.Generator().manual_seed(trim.SAMPLE_SEED))
    tau = torch.from_numpy(np.random.default_rng(3).uniform(1, 2, BIG).astype(np.float32))
    tau[positions] = 0.0 if sampled == "zero" else 100.0
    base = torch.zeros(BIG)
    for density in (0.2, 0.7):
        assert np.array_equal(run("ties", base, [tau], density=density), ref_trim(f64(tau), density))


def test_ties_rounds_into_a_given_output_as_once_from_fp32():
    """fp16 inputs, the result rounded piece by piece into an fp16 output (the engine's path): the same bits as the
    fp32 result rounded once; the inputs untouched."""
    base, ms = big_models(GRID / 2, count=2, seed=4)
    base, ms = base.half(), [m.half() for m in ms]
    before = [t.clone() for t in (base, *ms)]
    full = merge_key(METHODS["ties"], base, ms, Params(alpha=0.7, density=0.3))
    into = torch.empty(BIG, dtype=torch.float16)
    assert merge_key(METHODS["ties"], base, ms, Params(alpha=0.7, density=0.3), out=into) is into
    assert torch.equal(into, full.half()) and full.dtype == torch.float32
    assert all(torch.equal(x, y) for x, y in zip(before, (base, *ms), strict=True))
    taus = [ref_trim(f64(m) - f64(base), 0.3) for m in ms]
    close(full.double().numpy(), f64(base) + 0.7 * ref_elect_mean(taus))
    with pytest.raises(ValueError, match="does not write into"):
        merge_key(METHODS["dare"], base, ms, Params(drop=0.5), out=into)


# -- DARE, DARE-TIES -----------------------------------------------------------------------------------------------


def test_dare_drops_and_rescales_per_the_documented_stream():
    base, ms = models3()
    out = run("dare", base, ms, alpha=0.8, drop=0.6, seed=11, key="unet.w")
    expected = f64(base)
    for i, m in enumerate(ms):
        tau = f64(m) - f64(base)
        expected = expected + 0.8 * np.where(draws(11, "unet.w", i, tau.shape) >= 0.6, tau / 0.4, 0.0)
    close(out, expected)


def test_dare_with_p_zero_is_task_arithmetic():
    base, ms = models3()
    close(run("dare", base, ms, alpha=0.5, drop=0.0, seed=1, key="k"),
          f64(base) + 0.5 * sum(f64(m) - f64(base) for m in ms))


def test_dare_keeps_about_one_minus_p_and_the_expected_value():
    base = torch.zeros(200, 200)
    m = torch.ones(200, 200)
    out = run("dare", base, [m], drop=0.9, seed=5, key="big")
    kept = (out != 0).mean()
    assert abs(kept - 0.1) < 0.01  # 40 000 draws: 6 standard deviations
    assert np.allclose(out[out != 0], 10.0)
    assert abs(out.mean() - 1.0) < 0.1


def test_dare_depends_on_seed_key_and_model_only():
    base, ms = models3()
    one = run("dare", base, ms, drop=0.5, seed=2, key="a")
    assert np.array_equal(one, run("dare", base, ms, drop=0.5, seed=2, key="a"))
    assert not np.array_equal(one, run("dare", base, ms, drop=0.5, seed=2, key="b"))
    assert not np.array_equal(one, run("dare", base, ms, drop=0.5, seed=3, key="a"))


def test_dare_ties_elects_over_the_rescaled_survivors():
    base, ms = models3()
    out = run("dare_ties", base, ms, alpha=1.2, drop=0.5, seed=4, key="k")
    taus = []
    for i, m in enumerate(ms):
        tau = f64(m) - f64(base)
        taus.append(np.where(draws(4, "k", i, tau.shape) >= 0.5, tau / 0.5, 0.0))
    close(out, f64(base) + 1.2 * ref_elect_mean(taus))


# -- DELLA ---------------------------------------------------------------------------------------------------------


def ref_magprune(tau, drop, eps, u):
    rows = tau.reshape(tau.shape[0], -1) if tau.ndim >= 2 else tau.reshape(1, -1)
    n = rows.shape[1]
    ranks = np.argsort(np.argsort(np.abs(rows), axis=1, kind="stable"), axis=1, kind="stable")
    prob = drop - eps * (ranks - (n - 1) / 2) / n
    assert np.allclose(prob.mean(axis=1), drop)  # the spread keeps the mean drop probability
    return np.where(u.reshape(rows.shape) >= prob, rows / (1 - prob), 0.0).reshape(tau.shape)


@pytest.mark.parametrize("shape", [(6, 10), (4, 3, 3, 3), (12,)])
def test_della_magprune_elect_fuse(shape):
    base, ms = models3(shape)
    out = run("della", base, ms, alpha=0.9, density=0.4, epsilon=0.2, seed=9, key="k")
    taus = [ref_magprune(f64(m) - f64(base), 0.6, 0.2, draws(9, "k", i, shape)) for i, m in enumerate(ms)]
    close(out, f64(base) + 0.9 * ref_elect_mean(taus), rtol=1e-4)


def test_della_keeps_large_magnitudes_more_often():
    base = torch.zeros(400, 100)
    m = torch.arange(1, 101, dtype=torch.float32).repeat(400, 1)  # each row: magnitudes 1..100
    out = run("della", base, [m], density=0.5, epsilon=0.8, seed=1, key="k")
    kept = (out != 0).mean(axis=0)
    assert kept[:10].mean() < 0.2 and kept[-10:].mean() > 0.8  # keep probability 0.1 ... 0.9 across a row


# -- SLERP ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp_follows_the_great_circle(t):
    a, b = randn((5, 7), 1), randn((5, 7), 2)
    A, B = f64(a), f64(b)
    omega = math.acos(np.sum(A * B) / (np.linalg.norm(A) * np.linalg.norm(B)))
    expected = math.sin((1 - t) * omega) / math.sin(omega) * A + math.sin(t * omega) / math.sin(omega) * B
    close(run("slerp", a, [b], alpha=t), expected)


def test_slerp_keeps_the_norm_of_equal_norm_tensors():
    a, b = randn((64,), 3), randn((64,), 4)
    b = b * (a.norm() / b.norm())
    assert np.linalg.norm(run("slerp", a, [b], alpha=0.4)) == pytest.approx(float(a.norm()), rel=1e-5)


def test_slerp_parallel_and_zero_tensors_fall_back_to_lerp():
    a = randn((4, 4), 5)
    for b in (2.5 * a, -a, torch.zeros(4, 4)):
        close(run("slerp", a, [b], alpha=0.25), 0.75 * f64(a) + 0.25 * f64(b))


# -- Model Stock ---------------------------------------------------------------------------------------------------


def test_model_stock_ratio_from_the_mean_pairwise_angle():
    base, ms = models3((8, 8))
    shared = randn((8, 8), 50, scale=0.5)  # a common direction, so the angles are acute
    ms = [m + shared for m in ms]
    taus = [f64(m) - f64(base) for m in ms]
    cos = np.mean([np.sum(taus[i] * taus[j]) / (np.linalg.norm(taus[i]) * np.linalg.norm(taus[j]))
                   for i in range(3) for j in range(i + 1, 3)])
    assert 0 < cos < 1
    t = 3 * cos / (1 + 2 * cos)
    close(run("model_stock", base, ms), t * np.mean([f64(m) for m in ms], axis=0) + (1 - t) * f64(base))


def test_model_stock_identical_models_give_the_model_and_opposed_ones_the_base():
    base, ms = models3()
    close(run("model_stock", base, [ms[0], ms[0].clone()]), f64(ms[0]))  # cos 1: t = 1
    opposite = 2 * base - ms[0]  # τ₂ = −τ₁: cos −1, outside [0, 1], the base
    close(run("model_stock", base, [ms[0], opposite]), f64(base))
    close(run("model_stock", base, [base.clone(), ms[1]]), f64(base))  # a zero task vector has no angle


# -- geometric median ----------------------------------------------------------------------------------------------


def ref_weiszfeld(points, weights, iterations=100, tolerance=1e-6):
    """Weiszfeld from the weighted mean, distances floored at 1e-6, stopping on a step <= tolerance·‖m‖."""
    y = np.average(points, axis=0, weights=weights)
    for _ in range(iterations):
        d = np.maximum([np.linalg.norm(p - y) for p in points], 1e-6)
        step = np.average(points, axis=0, weights=np.asarray(weights) / d)
        moved, y = np.linalg.norm(step - y), step
        if moved <= tolerance * np.linalg.norm(y):
            break
    return y


def test_geometric_median_of_the_task_vectors():
    base, ms = models3((5, 6))
    ms.append(base + randn((5, 6), 40, scale=3.0))  # an outlier the median resists
    taus = np.stack([f64(m) - f64(base) for m in ms])
    expected = f64(base) + 0.8 * ref_weiszfeld(taus, [1.0, 1.5, 1.0, 1.0])
    close(run("geometric_median", base, ms, alpha=0.8, weights=(1.0, 1.5, 1.0, 1.0)), expected, rtol=1e-4,
          atol=1e-5)
    # converged: the exact median is no farther than the iterations' last steps
    converged = f64(base) + 0.8 * ref_weiszfeld(taus, [1.0, 1.5, 1.0, 1.0], 20000, 1e-12)
    close(expected, converged, rtol=1e-3, atol=1e-3)


def test_geometric_median_stops_after_a_fixed_number_of_iterations():
    base, ms = models3((5, 6))
    ms = [ms[0], ms[0].clone(), ms[1], ms[2]]  # the median sits on a point: Weiszfeld converges slowly there
    taus = np.stack([f64(m) - f64(base) for m in ms])
    close(run("geometric_median", base, ms), f64(base) + ref_weiszfeld(taus, [1.0] * 4), rtol=1e-4, atol=1e-5)


def test_geometric_median_with_alpha_one_is_the_models_median_and_minimises_distance():
    base, ms = models3((3, 4))
    out = run("geometric_median", base, ms)
    points = np.stack([f64(m) for m in ms])

    def cost(y):
        return sum(np.linalg.norm(p - y) for p in points)

    g = np.random.default_rng(0)
    assert all(cost(out) <= cost(out + 1e-3 * g.standard_normal(out.shape)) + 1e-6 for _ in range(20))


def test_geometric_median_of_one_model_and_of_equal_models():
    base, ms = models3()
    close(run("geometric_median", base, ms[:1]), f64(ms[0]))
    close(run("geometric_median", base, [ms[1], ms[1].clone(), ms[1].clone()]), f64(ms[1]))


# -- perpendicular -------------------------------------------------------------------------------------------------


def test_perpendicular_adds_the_orthogonal_part_of_the_second_difference():
    base, ms = models3()
    t1, t2 = f64(ms[0]) - f64(base), f64(ms[1]) - f64(base)
    perp = t2 - np.sum(t1 * t2) / np.sum(t1 * t1) * t1
    out = run("perpendicular", base, ms[:2], alpha=0.6)
    close(out, f64(ms[0]) + 0.6 * perp)
    assert abs(np.sum((out - f64(ms[0])) * t1)) < 1e-4 * np.linalg.norm(t1) * np.linalg.norm(t2)


def test_perpendicular_edge_cases():
    base, ms = models3()
    close(run("perpendicular", base, [base.clone(), ms[1]], alpha=0.5), 0.5 * f64(ms[1]) + 0.5 * f64(base))
    parallel = base + 3 * (ms[0] - base)  # τ₂ ∥ τ₁: nothing is left
    close(run("perpendicular", base, [ms[0], parallel]), f64(ms[0]), atol=1e-5)
