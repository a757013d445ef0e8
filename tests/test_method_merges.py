"""Merge methods end to end: the generalised recipe (base plus N models) beside the classic one, the engine's plan
and streaming, per-block parameters, the CLI and the MergeService. Expectations are float64 formulas computed here."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import numpy as np
import pytest
import torch
from conftest import SD1_LABELS, SD1_POS, UNET, MemorySource, assert_rounded, sd1_block, sd1_model, selected
from memory_host import MemoryHost
from test_cli import run
from test_methods import draws, ref_elect_mean, ref_trim

from lib_merge.core.engine import DictSink, KeyMerger, Models, ScratchPool, merge_to_dict, plan_merge, run_merge
from lib_merge.core.errors import MergeError
from lib_merge.core.recipe import Recipe
from lib_merge.core.weights import Presets
from lib_merge.core.xyz import GenParams, parse_axis, plan_cells
from lib_merge.io.checkpoint import open_checkpoint
from lib_merge.io.history import History
from lib_merge.service.merge_service import MergeService

CLASSIC_FIELDS = {"type", "model_a", "model_b", "model_c", "mode", "calc", "alpha", "beta", "weights_alpha",
                  "weights_beta", "elemental", "adjust", "inex", "inex_blocks", "inex_elements", "gamma", "seed",
                  "extra"}
W26 = ",".join(f"{0.05 + 0.03 * i:.2f}" for i in range(26))
KEY = UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"


@pytest.fixture(scope="module")
def family():
    base = sd1_model(0, torch.float16)
    return base, [sd1_model(i, torch.float16, base=base) for i in (1, 2, 3)]


def method_merge(base, models, threads=1, keys=None, **recipe):
    recipe.setdefault("models", tuple(f"M{i}" for i in range(len(models))))
    r = Recipe("base", **recipe)
    if keys is not None:
        base = {k: base[k] for k in keys}
    sources = Models(MemorySource(base, "base"), others=tuple(MemorySource(m, f"M{i}") for i, m in enumerate(models)))
    return merge_to_dict(r, sources, threads=threads)


# -- the recipe ----------------------------------------------------------------------------------------------------


def test_classic_recipe_json_keeps_its_fields_and_reads_back():
    r = Recipe("a.safetensors", "b.safetensors", "c.safetensors", mode="Add difference", alpha=0.3, seed=5)
    data = r.to_dict()
    assert set(data) == CLASSIC_FIELDS
    assert Recipe.from_dict(data) == r and Recipe.from_dict(data).fingerprint() == r.fingerprint()
    old = {k: v for k, v in data.items() if k != "extra"}  # a recipe saved before methods existed
    assert Recipe.from_json(json.dumps(old)) == r


def test_method_recipe_round_trips_through_json():
    r = Recipe("base.safetensors", method="ties", models=("m1.safetensors", "m2.safetensors"),
               model_weights=(1.0, 0.5), density=0.3, weights_density=W26, elemental_drop="OUT06:attn:0.5")
    data = json.loads(r.to_json())
    assert data["method"] == "ties" and data["models"] == ["m1.safetensors", "m2.safetensors"]
    assert Recipe.from_json(r.to_json()) == r
    assert r.model_names() == ["base.safetensors", "m1.safetensors", "m2.safetensors"]
    assert r.title() == "ties(base; m1, m2) x 0.5"


BAD_RECIPES = [
    (dict(method="average"), "Unknown merge method"),
    (dict(method="slerp", models=("x", "y")), "exactly 1"),
    (dict(method="perpendicular", models=("x",)), "exactly 2"),
    (dict(method="model_stock", models=("x",)), "at least 2"),
    (dict(method="ties", models=("x",), model_b="b"), "not models B and C"),
    (dict(method="ties", models=("x",), calc="cosineA"), "takes none"),
    (dict(method="ties", models=("x", "y"), model_weights=(1.0,)), "one model weight per model"),
    (dict(method="slerp", models=("x",), model_weights=(0.5,)), "no per-model weights"),
    (dict(method="ties", models=("x",), density=math.nan), "finite"),
    (dict(models=("x",)), "needs a merge method"),
    (dict(method="ties", models=("x",), weights_density="NO_SUCH_PRESET"), "Unknown preset"),
]


@pytest.mark.parametrize(("fields", "message"), BAD_RECIPES, ids=[m for _, m in BAD_RECIPES])
def test_bad_method_recipes_are_refused(fields, message):
    with pytest.raises(MergeError, match=message):
        Recipe("base", **fields).validate()


@pytest.mark.parametrize(("fields", "message"), [
    (dict(method="ties", density=0.0), "density in \\(0, 1\\]"),
    (dict(method="dare", drop=1.0), "drop in \\[0, 1\\)"),
    (dict(method="della", density=0.5, epsilon=1.2), "epsilon"),
    (dict(method="ties", weights_density=W26.replace("0.05,", "1.5,", 1)), "block BASE: 1.5"),
    (dict(method="ties", weights_density="0.5,0.5"), "26"),
    (dict(method="dare", elemental_drop="OUT06:attn"), "Blocks:Elements:Ratio"),
])
def test_parameters_out_of_range_are_refused_before_any_data_is_read(family, fields, message):
    base, models = family
    with pytest.raises(MergeError, match=message):
        method_merge(base, models[:2], **fields)


def test_a_model_of_another_shape_is_refused(family):
    base, models = family
    other = dict(models[0])
    other[KEY] = torch.zeros(4, 8, dtype=torch.float16)
    with pytest.raises(MergeError, match="Models do not match"):
        method_merge(base, [models[1], other], method="task_arithmetic")


# -- the engine ----------------------------------------------------------------------------------------------------


def test_task_arithmetic_merge_of_three_models(family):
    base, models = family
    plan, out = method_merge(base, models, method="task_arithmetic", alpha=0.4, model_weights=(1.0, 0.5, 2.0))
    assert list(out) == list(base)
    for key, tensor in out.items():
        if selected(key, base):
            expected = base[key].double() + 0.4 * sum(
                w * (m[key].double() - base[key].double()) for w, m in zip((1.0, 0.5, 2.0), models, strict=True))
            assert_rounded(tensor, expected, torch.float16, what=key)
        else:
            assert torch.equal(tensor, base[key]), key  # position ids, schedule buffers: the base's
    assert torch.equal(out[SD1_POS], base[SD1_POS])


def test_density_per_block_and_by_elemental_rule(family):
    base, models = family
    rule = "OUT06:attn2:0.9"
    plan, out = method_merge(base, models[:2], method="ties", alpha=1.0, weights_density=W26, elemental_density=rule)
    densities = [float(v) for v in W26.split(",")]
    for job in plan.jobs:
        if job.kind != "merge":
            continue
        expected = 0.9 if sd1_block(job.key) == "OUT06" and "attn2" in job.key else \
            densities[SD1_LABELS.index(sd1_block(job.key))]
        assert job.density == expected, job.key
    for key in (KEY, UNET + "output_blocks.6.1.transformer_blocks.0.attn2.to_k.weight"):
        density = next(j.density for j in plan.jobs if j.key == key)
        taus = [ref_trim(m[key].double().numpy() - base[key].double().numpy(), density) for m in models[:2]]
        expected = base[key].double() + torch.from_numpy(ref_elect_mean(taus))
        assert_rounded(out[key], expected, torch.float16, what=key)


def test_alpha_block_weights_apply_to_methods(family):
    base, models = family
    plan, out = method_merge(base, models[:1], method="task_arithmetic", weights_alpha=W26)
    alphas = [float(v) for v in W26.split(",")]
    for key in (KEY, UNET + "middle_block.1.proj_out.weight"):
        alpha = alphas[SD1_LABELS.index(sd1_block(key))]
        expected = base[key].double() + alpha * (models[0][key].double() - base[key].double())
        assert_rounded(out[key], expected, torch.float16, what=key)


def test_random_methods_do_not_depend_on_threads_or_key_order(family):
    base, models = family
    recipe = dict(method="dare_ties", alpha=1.0, drop=0.5, seed=7)
    _, one = method_merge(base, models, **recipe)
    _, two = method_merge(base, models, threads=2, **recipe)
    _, backwards = method_merge(base, models, keys=list(reversed(base)), **recipe)
    for key in base:
        assert torch.equal(one[key], two[key]) and torch.equal(one[key], backwards[key]), key
    # and the draws are the documented ones: key name, seed, model index
    taus = []
    for i, m in enumerate(models):
        tau = m[KEY].double().numpy() - base[KEY].double().numpy()
        taus.append(np.where(draws(7, KEY, i, tau.shape) >= 0.5, tau / 0.5, 0.0))
    assert_rounded(one[KEY], base[KEY].double() + torch.from_numpy(ref_elect_mean(taus)), torch.float16)


def test_a_random_method_draws_a_seed_once_and_records_it(family):
    base, models = family
    plan, first = method_merge(base, models[:2], method="dare")
    assert plan.recipe.seed != -1
    _, again = method_merge(base, models[:2], method="dare", seed=plan.recipe.seed)
    assert all(torch.equal(first[k], again[k]) for k in base)


class CountingSource(MemorySource):
    def __init__(self, mapping, name):
        super().__init__(mapping, name)
        self.reads: list[str] = []

    def get(self, key, out=None):
        self.reads.append(key)
        return super().get(key, out)


@pytest.mark.parametrize("count", [1, 2, 4])
def test_an_n_model_merge_streams_one_key_per_model(family, count):
    """Each model's tensor of a key is read once, into that model's one key-sized buffer: the memory a merge holds
    beyond the output is one key's tensors per model, whatever the models' size."""
    base, models = family
    models = (models * 2)[:count]
    sources = [CountingSource(m, f"M{i}") for i, m in enumerate(models)]
    recipe = Recipe("base", method="task_arithmetic", models=tuple(f"M{i}" for i in range(count)))
    ms = Models(CountingSource(base, "base"), others=tuple(sources))
    plan = plan_merge(recipe, ms)
    sizes = KeyMerger(plan, ms).scratch_sizes()
    largest = max(t.numel() * t.element_size() for t in base.values())
    assert {s for s in sizes if re.fullmatch(r"m\d+", s)} == {f"m{i}" for i in range(count)}
    assert all(sizes[f"m{i}"] <= largest for i in range(count))
    run_merge(plan, ms, DictSink(), threads=1, scratch=ScratchPool())
    merged = [j.key for j in plan.jobs if j.kind == "merge"]
    for src in sources:
        assert src.reads == merged  # once each, in order, as the keys stream


def test_inputs_are_never_modified(family):
    base, models = family
    before = [{k: v.clone() for k, v in m.items()} for m in (base, *models)]
    for method in ("ties", "della", "geometric_median", "model_stock"):
        method_merge(base, models, method=method, density=0.5, seed=1)
    for old, new in zip(before, (base, *models), strict=True):
        assert all(torch.equal(old[k], new[k]) for k in old)


# -- CLI, files, history, service ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from lib_merge.cli import synth

    folder = tmp_path_factory.mktemp("method-models")
    base = synth.make_checkpoint(folder / "base.safetensors", "sd1", factor=32, seed=1)
    for i in (1, 2, 3):
        synth.make_checkpoint(folder / f"m{i}.safetensors", "sd1", factor=32, seed=i + 1, base=base, noise=0.5)
    return folder


def test_cli_ties_writes_the_engines_result_with_recipe_and_history(files, tmp_path):
    out = tmp_path / "ties.safetensors"
    history = tmp_path / "history.csv"
    res = run("merge", "--method", "ties", "--base", str(files / "base.safetensors"),
              "--model", str(files / "m1.safetensors"), "--model", str(files / "m2.safetensors"),
              "--density", "0.3", "--alpha", "0.8", "--output", str(out), "--history", str(history),
              "--no-metadata", cwd=tmp_path, env_home=tmp_path / "data")
    assert res.returncode == 0, res.stderr
    assert "ties(base; m1, m2) x 0.8" in res.stdout
    recipe = Recipe("", method="ties", models=(), alpha=0.8, density=0.3)
    with open_checkpoint(files / "base.safetensors") as b, open_checkpoint(files / "m1.safetensors") as m1, \
            open_checkpoint(files / "m2.safetensors") as m2, open_checkpoint(out) as o:
        recipe = Recipe(str(files / "base.safetensors"), method="ties", alpha=0.8, density=0.3,
                        models=(str(files / "m1.safetensors"), str(files / "m2.safetensors")))
        _, expected = merge_to_dict(recipe, Models(b, others=(m1, m2)))
        assert set(o.keys()) == set(expected)
        assert all(torch.equal(o.get(k), expected[k]) for k in expected)
    logged = History(history).recipe(1)
    assert logged["method"] == "ties" and len(logged["models"]) == 2 and logged["density"] == 0.3


def test_cli_slerp_takes_t_and_writes_recipe_metadata(files, tmp_path):
    out = tmp_path / "slerp.safetensors"
    res = run("merge", "--method", "slerp", "--base", str(files / "base.safetensors"), "--model",
              str(files / "m1.safetensors"), "--t", "0.3", "--output", str(out), "--no-history",
              cwd=tmp_path, env_home=tmp_path / "data")
    assert res.returncode == 0, res.stderr
    with open_checkpoint(out) as o:
        meta = json.loads(o.metadata["sd_merge_recipe"])
        assert meta["method"] == "slerp" and meta["alpha"] == 0.3
        assert len(json.loads(o.metadata["sd_merge_models"])) == 2  # the base and the model, by hash


CLI_ERRORS = [
    (["--method", "ties", "--model", "{m1}"], "needs a base model"),
    (["--method", "ties", "--base", "{base}", "--model", "{m1}", "--t", "0.5"], "--t is slerp's"),
    (["--method", "slerp", "--base", "{base}", "--model", "{m1}", "--t", "0.5", "--alpha", "0.4"], "disagree"),
    (["--method", "ties", "--base", "{base}", "--model-a", "{base}", "--model", "{m1}"], "--model-a/-b/-c"),
    (["--base", "{base}", "--model", "{m1}"], "go with --method"),
    (["--method", "nope", "--base", "{base}", "--model", "{m1}"], "Unknown merge method"),
    (["--method", "dare", "--base", "{base}", "--model", "{m1}", "--drop", "1"], "drop in [0, 1)"),
    (["--method", "ties", "--base", "{base}", "--model", "{m1}", "--model-weights", "1,x"], "not a number"),
    (["--method", "ties", "--base", "{base}", "--model", "{folder}/missing.safetensors"], "does not exist"),
    (["--method", "perpendicular", "--base", "{base}", "--model", "{m1}"], "exactly 2"),
]


@pytest.mark.parametrize(("args", "message"), CLI_ERRORS, ids=[m for _, m in CLI_ERRORS])
def test_cli_method_errors_are_one_line_exit_2(files, tmp_path, args, message):
    values = {"base": files / "base.safetensors", "m1": files / "m1.safetensors", "folder": files}
    out = tmp_path / "o.safetensors"
    res = run("merge", *(a.format(**values) for a in args), "--output", str(out), "--no-history",
              cwd=tmp_path, env_home=tmp_path / "data")
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert message in lines[0]
    assert not out.exists()


def test_merge_service_loads_a_method_recipe_from_json(files):
    service = MergeService(MemoryHost(files, "base.safetensors"), log_merges=False)
    recipe = Recipe.from_json(json.dumps({"type": "block-merger", "model_a": "base.safetensors",
                                          "method": "model_stock", "models": ["m1.safetensors", "m2.safetensors",
                                                                              "m3.safetensors"]}))
    outcome = service.merge_and_load(recipe)
    assert outcome.plan.recipe.method == "model_stock"
    with open_checkpoint(files / "base.safetensors") as b, open_checkpoint(files / "m1.safetensors") as m1, \
            open_checkpoint(files / "m2.safetensors") as m2, open_checkpoint(files / "m3.safetensors") as m3:
        _, expected = merge_to_dict(outcome.plan.recipe, Models(b, others=(m1, m2, m3)))
    live = service.host.live
    assert all(torch.equal(live[k], expected[k]) for k in expected)
    service.close()


# -- X/Y/Z plots ---------------------------------------------------------------------------------------------------


def test_plot_axes_for_method_parameters():
    import random

    from lib_merge.core.arch import Arch

    arch, presets = Arch("sd1"), Presets.load()
    density = parse_axis("density", "0.1, 0.5", arch, presets, random.Random(0))
    methods = parse_axis("method", "ties, della", arch, presets, random.Random(0))
    base = Recipe("base", method="ties", models=("m1", "m2"))
    cells = plan_cells(base, GenParams(), [density, methods], arch, presets)
    assert [(c.recipe.method, c.recipe.density) for c in cells] == [
        ("ties", 0.1), ("ties", 0.5), ("della", 0.1), ("della", 0.5)]
    mbw = parse_axis("mbw drop", "FLAT_25", arch, presets, random.Random(0))
    cells = plan_cells(dataclasses.replace(base, method="dare"), GenParams(), [mbw], arch, presets)
    assert cells[0].recipe.weights_drop == presets.get("FLAT_25")
    with pytest.raises(MergeError, match="unknown merge method"):
        parse_axis("method", "ties, average", arch, presets, random.Random(0))
    with pytest.raises(MergeError, match="belong to the merge methods"):
        plan_cells(Recipe("a", "b"), GenParams(), [density], arch, presets)
    with pytest.raises(MergeError, match=r"density=0: ties needs density in \(0, 1\]"):
        plan_cells(base, GenParams(), [parse_axis("density", "0.1, 0", arch, presets, random.Random(0))],
                   arch, presets)
