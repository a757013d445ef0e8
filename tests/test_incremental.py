"""Merging into existing tensors and re-merging only what a recipe change touches."""

from __future__ import annotations

import pytest
import torch

from lib_merge.cli import synth
from lib_merge.core.engine import DictSink, Models, TensorSink, changed_jobs, plan_merge, run_merge
from lib_merge.core.recipe import Recipe
from lib_merge.io.checkpoint import DictCheckpoint

W = ["0.5"] * 26


def weights(**changes: str) -> str:
    labels = ["BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12))]
    values = list(W)
    for label, value in changes.items():
        values[labels.index(label)] = value
    return ",".join(values)


@pytest.fixture(scope="module")
def models():
    a = synth.make_state_dict("sd1", factor=16, seed=1)
    b = synth.make_state_dict("sd1", factor=16, seed=2, base=a, noise=0.5)
    c = synth.make_state_dict("sd1", factor=16, seed=3, base=a, noise=0.5)
    return Models(DictCheckpoint(a, "A"), DictCheckpoint(b, "B"), DictCheckpoint(c, "C"))


def full(recipe, models):
    return run_merge(plan_merge(recipe, models), models, DictSink())


def test_tensor_sink_writes_into_existing_tensors_cast_to_their_dtype(models):
    recipe = Recipe("A", "B", weights_alpha=weights())
    expected = full(recipe, models)
    live = {k: torch.zeros(v.shape, dtype=torch.float32 if v.is_floating_point() else v.dtype)
            for k, v in expected.items()}
    pointers = {k: v.data_ptr() for k, v in live.items()}
    run_merge(plan_merge(recipe, models), models, TensorSink(live))
    assert {k: v.data_ptr() for k, v in live.items()} == pointers
    for key, value in expected.items():
        assert torch.equal(live[key], value.to(live[key].dtype)), key


@pytest.mark.parametrize("mode", ["Weight sum", "Add difference"])
def test_one_block_change_recomputes_only_that_block(models, mode):
    old = Recipe("A", "B", "C", mode=mode, weights_alpha=weights())
    new = Recipe("A", "B", "C", mode=mode, weights_alpha=weights(OUT04="0.9"))
    old_plan, new_plan = plan_merge(old, models), plan_merge(new, models)
    live = full(old, models)
    delta = changed_jobs(old_plan, new_plan)
    assert delta.jobs and all(".output_blocks.4." in job.key for job in delta.jobs)
    assert len(delta.jobs) == sum(".output_blocks.4." in k and "model" in k for k in live)
    run_merge(delta, models, TensorSink(live))
    expected = full(new, models)
    assert all(torch.equal(live[k], expected[k]) for k in expected)


def test_adjust_change_touches_only_the_six_adjust_keys(models):
    old = Recipe("A", "B", alpha=0.4)
    new = Recipe("A", "B", alpha=0.4, adjust="1,0,0,0,0,0,0,2")
    delta = changed_jobs(plan_merge(old, models), plan_merge(new, models))
    assert sorted(j.key.rsplit("diffusion_model.", 1)[1] for j in delta.jobs) == [
        "input_blocks.0.0.bias", "input_blocks.0.0.weight", "out.0.bias", "out.0.weight", "out.2.bias",
        "out.2.weight"]


def test_other_models_need_a_full_merge(models):
    with pytest.raises(ValueError, match="full merge"):
        changed_jobs(plan_merge(Recipe("A", "B"), models),
                     plan_merge(Recipe("A", "B", "C", mode="Add difference"), models))


def test_scratch_pool_reuses_buffers_between_runs(models):
    from lib_merge.core.engine import ScratchPool

    pool = ScratchPool()
    old = Recipe("A", "B", "C", mode="Add difference", weights_alpha=weights())
    new = Recipe("A", "B", "C", mode="Add difference", weights_alpha=weights(OUT04="0.9"))
    old_plan, new_plan = plan_merge(old, models), plan_merge(new, models)
    live = run_merge(old_plan, models, DictSink(), threads=1, scratch=pool)
    (first,) = pool._idle
    pointers = {slot: buf.data_ptr() for slot, buf in first._buffers.items()}
    run_merge(changed_jobs(old_plan, new_plan), models, TensorSink(live), threads=1, scratch=pool)
    (again,) = pool._idle
    assert again is first and {slot: buf.data_ptr() for slot, buf in again._buffers.items()} == pointers
    expected = full(new, models)
    assert all(torch.equal(live[k], expected[k]) for k in expected)
