"""Whole merges from files: streaming to disk, cancel and failure leave nothing, recipes round-trip through metadata."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from conftest import synth_family
from safetensors import safe_open
from safetensors.torch import load_file

from lib_merge.cli import synth
from lib_merge.core.engine import DictSink, Models, plan_merge, run_merge
from lib_merge.core.errors import MergeCancelled, MergeError
from lib_merge.core.recipe import Recipe
from lib_merge.io import write as checkpoint_write
from lib_merge.io.checkpoint import SaveOptions, open_checkpoint
from lib_merge.io.history import History
from lib_merge.service.pipeline import merge_to_file, open_models


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    return synth_family(tmp_path_factory.mktemp("sd1"))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return synth_family(tmp_path_factory.mktemp("sdxl"), "sdxl", factor=32)


def files_in(folder):
    return sorted(p.name for p in folder.iterdir())


def test_streamed_file_equals_in_memory_merge(sd1, tmp_path):
    recipe = Recipe(str(sd1[0]), str(sd1[1]), str(sd1[2]), mode="Add difference", alpha=0.3, weights_alpha="GRAD_A")
    out = merge_to_file(recipe, tmp_path / "m.safetensors").path
    with open_models(recipe.validate()) as models:
        plan = plan_merge(recipe, models)
        state = run_merge(plan, models, DictSink())
    saved = load_file(out)
    assert list(saved) == list(state)
    for key in state:
        assert torch.equal(saved[key], state[key]), key


def test_threads_give_identical_results(sd1, tmp_path):
    recipe = Recipe(str(sd1[0]), str(sd1[1]), mode="Weight sum", weights_alpha="COSINE")
    one = load_file(merge_to_file(recipe, tmp_path / "one.safetensors", threads=1).path)
    four = load_file(merge_to_file(recipe, tmp_path / "four.safetensors", threads=4).path)
    assert all(torch.equal(one[k], four[k]) for k in one)


def test_ckpt_output_is_a_plain_dict(sd1, tmp_path):
    recipe = Recipe(str(sd1[0]), str(sd1[1]), alpha=0.25)
    out = merge_to_file(recipe, tmp_path / "m.ckpt").path
    state = torch.load(out, weights_only=True)
    assert isinstance(state, dict) and "state_dict" not in state
    assert set(state) == set(load_file(sd1[0]))


def test_cancel_midway_leaves_no_file_and_inputs_untouched(sd1, tmp_path):
    before = [p.read_bytes() for p in sd1]
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 200

    with pytest.raises(MergeCancelled):
        merge_to_file(Recipe(str(sd1[0]), str(sd1[1])), tmp_path / "m.safetensors", cancel=cancel)
    assert len(calls) >= 201  # each worker checks before every key; the merge stopped at the first "yes"
    assert files_in(tmp_path) == []
    assert [p.read_bytes() for p in sd1] == before


def test_disk_full_midway_leaves_no_partial_file(sd1, tmp_path, monkeypatch):
    written = []
    real_write = checkpoint_write.SafetensorsStreamWriter.write

    def failing_write(self, key, tensor):
        written.append(key)
        if len(written) == 300:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(self, key, tensor)

    monkeypatch.setattr(checkpoint_write.SafetensorsStreamWriter, "write", failing_write)
    with pytest.raises(MergeError, match="No space left on device. Nothing was saved"):  # one clear line
        merge_to_file(Recipe(str(sd1[0]), str(sd1[1])), tmp_path / "m.safetensors")
    assert files_in(tmp_path) == []


def test_progress_reports_every_key(sd1, tmp_path):
    seen = []
    merge_to_file(Recipe(str(sd1[0]), str(sd1[1])), tmp_path / "m.safetensors",
                  progress=lambda done, total: seen.append((done, total)))
    total = len(load_file(sd1[0]))
    assert seen[-1] == (total, total)
    assert [d for d, _ in seen] == list(range(1, total + 1))


def test_recipe_round_trip_through_metadata_and_history(sd1, tmp_path):
    history = History(tmp_path / "history.csv")
    recipe = Recipe(str(sd1[0]), str(sd1[1]), str(sd1[2]), mode="sum Twice", alpha=0.4, beta=0.3,
                    weights_alpha="R," + ",".join(["0.5"] * 24) + ",U", elemental="OUT03-OUT05:attn:0.7",
                    adjust="1,0,0,2,0,0,0,1", inex="Exclude", inex_blocks=("IN02",), seed=-1)
    first = merge_to_file(recipe, tmp_path / "first.safetensors", history=history)
    assert first.plan.recipe.seed != -1  # randomness drew a seed, recorded for reproduction
    with safe_open(str(first.path), "pt") as f:
        stored = Recipe.from_json(f.metadata()["sd_merge_recipe"])
    assert stored == first.plan.recipe
    again = merge_to_file(stored, tmp_path / "again.safetensors")
    logged = Recipe.from_dict(history.recipe(-1))
    third = merge_to_file(logged, tmp_path / "third.safetensors")
    ref = load_file(first.path)
    for out in (again.path, third.path):
        state = load_file(out)
        assert all(torch.equal(ref[k], state[k]) for k in ref)


def test_sdxl_three_model_add_difference(sdxl, tmp_path):
    a, b, c = sdxl
    recipe = Recipe(str(a), str(b), str(c), mode="Add difference", alpha=0.6,
                    weights_alpha="1," + ",".join(["0.5"] * 25))  # 26 values, converted for SDXL
    result = merge_to_file(recipe, tmp_path / "xl.safetensors", SaveOptions(prune=True))
    assert result.plan.arch.is_sdxl
    out, ta, tb, tc = (load_file(p) for p in (result.path, a, b, c))
    key = "model.diffusion_model.output_blocks.8.0.in_layers.2.weight"  # OUT08 keeps its weight (0.5)
    expected = ta[key].double() + 0.5 * (tb[key].double() - tc[key].double())
    assert torch.allclose(out[key].double(), expected.half().double(), rtol=1e-3, atol=1e-4)
    clip = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"  # BASE = 1
    expected = ta[clip].double() + (tb[clip].double() - tc[clip].double())
    assert torch.allclose(out[clip].double(), expected.half().double(), rtol=1e-3, atol=1e-4)
    assert not any(k.startswith("cond_stage_model.") for k in out)


def test_inpainting_a_keeps_its_extra_channels(tmp_path):
    a = synth.make_checkpoint(tmp_path / "inpaint.safetensors", "sd1", factor=16, seed=1, in_channels=9)
    b = synth.make_checkpoint(tmp_path / "b.safetensors", "sd1", factor=16, seed=2)
    result = merge_to_file(Recipe(str(a), str(b), alpha=0.5), tmp_path / "m.safetensors")
    key = "model.diffusion_model.input_blocks.0.0.weight"
    ta, tb, out = load_file(a)[key], load_file(b)[key], load_file(result.path)[key]
    assert out.shape == ta.shape
    assert torch.equal(out[:, 4:], ta[:, 4:])
    expected = (ta[:, :4].double() + tb.double()) / 2
    assert torch.allclose(out[:, :4].double(), expected.half().double(), rtol=1e-3, atol=1e-4)
    with pytest.raises(MergeError, match="put the inpainting model in A"):
        merge_to_file(Recipe(str(b), str(a)), tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()


def test_bake_vae_and_reset_clip_ids(sd1, tmp_path):
    vae = {k.removeprefix("first_stage_model."): torch.full(v.shape, 0.125, dtype=v.dtype)
           for k, v in load_file(sd1[0]).items() if k.startswith("first_stage_model.")}
    synth.write_checkpoint(tmp_path / "vae.safetensors", vae)
    options = SaveOptions(bake_vae=str(tmp_path / "vae.safetensors"), reset_clip_ids=True)
    out = load_file(merge_to_file(Recipe(str(sd1[0]), str(sd1[1])), tmp_path / "m.safetensors", options).path)
    assert all(bool((v == 0.125).all()) for k, v in out.items() if k.startswith("first_stage_model."))
    ids = out["cond_stage_model.transformer.text_model.embeddings.position_ids"]
    assert torch.equal(ids, torch.arange(77)[None])


def test_metadata_names_each_input_by_sha256(sd1, tmp_path):
    import hashlib

    out = merge_to_file(Recipe(str(sd1[0]), str(sd1[1])), tmp_path / "m.safetensors").path
    with safe_open(str(out), "pt") as f:
        models = json.loads(f.metadata()["sd_merge_models"])
    expected = {hashlib.sha256(p.read_bytes()).hexdigest(): p.stem for p in sd1[:2]}
    assert {sha: entry["name"] for sha, entry in models.items()} == expected


def test_invalid_recipe_is_refused_before_files_are_opened(tmp_path):
    with pytest.raises(MergeError, match="cannot be used with"):
        merge_to_file(Recipe(str(tmp_path / "nope.safetensors"), "also-missing", "missing-too",
                             mode="Add difference", calc="cosineA"), tmp_path / "o.safetensors")
    with pytest.raises(MergeError, match="Model C is required"):
        merge_to_file(Recipe(str(tmp_path / "nope.safetensors"), "also-missing", calc="trainDifference"),
                      tmp_path / "o.safetensors")


def test_dict_sources_are_never_written(sd1):
    with open_checkpoint(sd1[0]) as a, open_checkpoint(sd1[1]) as b:
        from lib_merge.io.checkpoint import DictCheckpoint

        da = DictCheckpoint({k: a.get(k) for k in a.keys()}, "A")
        db = DictCheckpoint({k: b.get(k) for k in b.keys()}, "B")
    snapshot = {k: da.get(k).clone() for k in da.keys()}
    for calc in ("normal", "tensor", "self", "plus random"):
        plan = plan_merge(Recipe("A", "B", calc=calc, alpha=0.3, seed=5), Models(da, db))
        run_merge(plan, Models(da, db), DictSink())
    assert all(torch.equal(snapshot[k], da.get(k)) for k in snapshot)
