"""Our method kernels against sd-mecha's implementations of the same methods (a second reference), on tensors of a
tiny synthetic SD1 checkpoint; skipped when sd-mecha is not installed.

sd-mecha's kernels are called directly on the tensors (`__wrapped__`, the function under its `merge_method`
decorator): a whole-checkpoint sd-mecha merge takes about a minute even for tiny models on a loaded machine (bench/
mecha_ref.py does those, for the benchmark). Where the definitions differ, the test says how and checks the part
that is the same.
"""

from __future__ import annotations

import math

import pytest
import torch

from lib_merge.cli import synth
from lib_merge.core.methods import METHODS, Params, merge_key

pytest.importorskip("sd_mecha")
from sd_mecha.extensions.builtin.merge_methods import linear, ties  # noqa: E402

KEYS = (
    "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",  # 2-D
    "model.diffusion_model.input_blocks.5.0.in_layers.2.weight",  # convolution
    "model.diffusion_model.middle_block.1.proj_out.bias",  # 1-D
)


@pytest.fixture(scope="module")
def tensors():
    base = synth.make_state_dict("sd1", factor=64, seed=0)
    models = [synth.make_state_dict("sd1", factor=64, seed=i, base=base, noise=0.5) for i in (1, 2, 3)]
    return [(base[k].float(), [m[k].float() for m in models]) for k in KEYS]


def ours(name, base, models, **params):
    return merge_key(METHODS[name], base, models, Params(**params))


def test_ties_with_everything_kept_is_the_same(tensors):
    """With k = 1 both keep every entry; sign election by mass (sd-mecha's vote_sgn=True) and the disjoint mean are
    then the same computation."""
    for base, models in tensors:
        theirs = base + ties.ties_sum.__wrapped__(*(m - base for m in models), k=1.0, vote_sgn=True)
        assert torch.allclose(ours("ties", base, models, density=1.0), theirs, rtol=1e-6, atol=1e-6)


def test_ties_trim_differs_by_at_most_one_entry_per_model(tensors):
    """sd-mecha keeps the entries >= the int((1 − k)·n)-th smallest magnitude, i.e. n − int((1 − k)·n) + 1 of them;
    we keep round(k·n). Each model's task vector may keep one entry more there, so the results differ in at most
    one entry per model."""
    for base, models in tensors:
        theirs = base + ties.ties_sum.__wrapped__(*(m - base for m in models), k=0.25, vote_sgn=True)
        mine = ours("ties", base, models, density=0.25)
        differ = int((~torch.isclose(mine, theirs, rtol=1e-6, atol=1e-6)).sum())
        assert differ <= len(models)
        assert differ < mine.numel() // 4


def test_geometric_median_agrees_within_the_iterations_tolerance(tensors):
    """Both run Weiszfeld from the mean with distances floored at 1e-6 and at most 100 iterations; sd-mecha stops on
    a relative objective change of 1e-20 (in practice never), we on a step of 1e-6·‖m‖. With λ = 1 ours is the
    median of the models themselves, which is what sd-mecha's is."""
    for base, models in tensors:
        theirs = ties.geometric_median.__wrapped__(*models, eps=1e-6, maxiter=100, ftol=1e-20)
        assert torch.allclose(ours("geometric_median", base, models), theirs, rtol=1e-3, atol=1e-4)


def test_model_stock_agrees_on_one_row_with_two_models(tensors):
    """sd-mecha (after mergekit) takes cos θ per row (last dim) and between consecutive models only; the paper's is
    per layer over all pairs. For two models and a 1-D tensor (one row) both are the same cosine."""
    base, models = tensors[2]
    deltas = [m - base for m in models[:2]]
    cos = float(torch.nn.functional.cosine_similarity(deltas[0], deltas[1], dim=0))
    assert cos > 0  # inside the paper's range, where we do not clamp
    theirs = base + ties.model_stock.__wrapped__(*deltas, cos_eps=1e-6)
    assert torch.allclose(ours("model_stock", base, models[:2]), theirs, rtol=1e-5, atol=1e-6)


def test_perpendicular_is_sd_mechas_add_perpendicular(tensors):
    for base, models in tensors:
        m1, m2 = models[:2]
        theirs = m1 + 0.7 * linear.perpendicular_component.__wrapped__(m1 - base, m2 - base)
        assert torch.allclose(ours("perpendicular", base, [m1, m2], alpha=0.7), theirs, rtol=1e-5, atol=1e-5)


def test_slerp_agrees_for_equal_norms(tensors):
    """sd-mecha interpolates the normalised tensors and scales by lerp(‖A‖, ‖B‖, t); Shoemake's formula applied to
    the tensors themselves (ours, and mergekit's) gives the same result when the norms are equal."""
    for base, models in tensors:
        other = models[0] * (base.norm() / models[0].norm())
        theirs = linear.slerp.__wrapped__(base, other, alpha=0.3)
        assert torch.allclose(ours("slerp", base, [other], alpha=0.3), theirs, rtol=1e-5, atol=1e-5)
        # with unequal norms sd-mecha's result has the interpolated norm; ours does not
        theirs = linear.slerp.__wrapped__(base, models[0], alpha=0.5)
        assert math.isclose(float(theirs.norm()), float((base.norm() + models[0].norm()) / 2), rel_tol=1e-4)


def test_dare_drops_at_the_same_rate():
    """sd-mecha's dropout draws with numpy and averages the kept deltas over the models that kept an entry (for one
    model: DARE); the draws differ, so with one model only the statistics can agree: about 1 − p kept, each kept
    entry scaled by 1/(1 − p). With p = 0 both are the plain difference."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(200, 200, generator=g)  # 40 000 draws: the kept fraction's deviation is 0.0015
    models = [base + 0.1 * torch.randn(200, 200, generator=g)]
    delta = models[0] - base
    theirs = ties.dropout.__wrapped__(delta, probability=0.9, seed=3)
    mine = ours("dare", base, models, drop=0.9, seed=3, key=KEYS[0]) - base
    for result in (theirs, mine):
        kept = result != 0
        assert abs(float(kept.float().mean()) - 0.1) < 0.01
        assert torch.allclose(result[kept], delta[kept] / 0.1, rtol=1e-4, atol=1e-5)
    assert torch.allclose(ties.dropout.__wrapped__(delta, probability=0.0, seed=3),
                          ours("dare", base, models[:1], drop=0.0) - base, atol=1e-6)
