"""Run Rand, the new plot axes, the reservation queue, plot presets and the extended-weights editor helpers.

Random weights are checked against numpy's documented generator (np.random.RandomState(seed).rand, the seed
system's table) with §4.4's formulas written out here; images come from tests/memory_host.py, whose pictures encode
the weights that were loaded, so a cell can be told apart and reproduced.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import SD1_LABELS, synth_family
from memory_host import MemoryHost, weights_digest
from PIL import Image

from lib_merge.core.arch import BLOCKS_XL, BLOCKS_XL_FINE, Arch
from lib_merge.core.errors import MergeError
from lib_merge.core.random_weights import RandomSpec
from lib_merge.core.recipe import Recipe
from lib_merge.core.weights import Presets
from lib_merge.core.xyz import GenParams, parse_axis, plan_cells
from lib_merge.io.plot_presets import SHIPPED, PlotPresets
from lib_merge.service.merge_service import MergeService
from lib_merge.ui import random_panel as rp
from lib_merge.ui.plot import changed_share
from lib_merge.ui.plot_queue import PlotQueue
from lib_merge.ui.tab import Handlers, handler_values

SD1 = Arch("sd1")
PRESETS = Presets.load()


def axis(kind, text):
    return parse_axis(kind, text, SD1, PRESETS, random.Random(0))


def expected_r(seed, count=26, offset=0, decimals=3):
    r = np.random.RandomState(seed).rand(3000)
    return [round(float(r[i + offset]), decimals) for i in range(count)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("rand_models")
    synth_family(root)
    return root


@pytest.fixture()
def tools(models, tmp_path):
    import os

    for p in models.iterdir():
        os.link(p, tmp_path / p.name)
    host = MemoryHost(tmp_path, "a.safetensors")
    return rp.PlotTools(Handlers(MergeService(host)))


def values(**extra):
    dice = {**rp.DICE_DEFAULTS, **{k: v for k, v in extra.items() if k.startswith("rand_")}}
    rest = {k: v for k, v in extra.items() if not k.startswith("rand_")}
    return {**handler_values(model_a="a.safetensors", model_b="b.safetensors", gen_seed=11, **rest), **dice}


# -- Run Rand -------------------------------------------------------------------------------------------------


def test_run_rand_cells_have_their_own_seed_logged_and_one_cell_is_reproduced_bit_for_bit(tools):
    h, host = tools.h, tools.h.host
    before = len(h.service.history().rows())
    result = tools.run_rand(values(rand_count=4))
    assert "4 of 4 cells, 4 merges" in result.message
    rows = h.service.history().rows()[before:]
    assert len(rows) == 4
    seeds = [row["recipe"]["seed"] for row in rows]
    assert len(set(seeds)) == 4
    for row, seed in zip(rows, seeds, strict=True):
        recipe = row["recipe"]
        assert recipe["weights_alpha"] == ",".join(repr(v) for v in expected_r(seed))
        assert recipe["extra"]["random"]["seed"] == seed and recipe["extra"]["random"]["mode"] == "R"
        assert f"seed {seed}" in result.infotext  # listed with the cell
    # the grid: one row of 4 cells, each with its own seed label strip above it (no X axis labels)
    (grid,) = result.images
    assert grid.size[0] == 4 * 64 and grid.size[1] > 48
    digests = [d for d, _, _ in host.generated[-4:]]
    assert len(set(digests)) == 4
    # reproduce cell 3 from its seed alone: a random merge with that seed gives the same tensors
    logged = Recipe.from_dict({k: v for k, v in rows[2]["recipe"].items() if k != "type"})
    h.service.merge_and_load(logged, log=False)
    cell_state = {k: v.clone() for k, v in host.live.items()}
    h.service.restore_base()
    assert weights_digest(host.live) != digests[2]
    message = tools.random_merge(values(rand_seed=seeds[2])).message
    assert f"Weight seed {seeds[2]}" in message
    assert weights_digest(host.live) == digests[2]
    for key, tensor in cell_state.items():
        assert torch.equal(host.live[key], tensor), key


def test_run_rand_with_a_seed_is_repeatable_and_wraps_rows_of_ten(tools):
    host = tools.h.host
    result = tools.run_rand(values(rand_count=12, rand_seed=500, rand_mode="U"))
    assert "12 of 12 cells" in result.message
    (grid,) = result.images
    assert grid.size[0] == 10 * 64  # 10 wide, 2 rows
    rows = tools.h.service.history().rows()[-12:]
    assert [r["recipe"]["seed"] for r in rows] == list(range(500, 512))
    r = np.random.RandomState(505).rand(3000)
    assert rows[5]["recipe"]["weights_alpha"] == ",".join(repr(round(1.5 - 2 * float(r[i]), 3)) for i in range(26))
    first = [d for d, _, _ in host.generated[-12:]]
    tools.run_rand(values(rand_count=12, rand_seed=500, rand_mode="U"))
    assert [d for d, _, _ in host.generated[-12:]] == first


@pytest.mark.parametrize("extra, message", [
    (dict(rand_count=0), "Num of cells must be a whole number from 1"),
    (dict(rand_count=2.5), "Num of cells must be a whole number"),
    (dict(rand_seed=2**32 - 1, rand_count=3), "passes"),
    (dict(rand_mode="custom"), "needs a template"),
    (dict(rand_targets=[]), "alpha and/or beta"),
    (dict(rand_extend=True), "SDXL only"),
])
def test_run_rand_refuses_bad_settings_before_merging(tools, extra, message):
    host = tools.h.host
    before = weights_digest(host.live), len(host.generated)
    with pytest.raises(MergeError, match=message):
        tools.run_rand(values(**extra))
    assert (weights_digest(host.live), len(host.generated)) == before


# -- axes -----------------------------------------------------------------------------------------------------


def test_random_axis_with_explicit_seeds_and_counts():
    cells = plan_cells(Recipe("a", "b"), GenParams(), [axis("random", "#5, #6")], SD1, PRESETS,
                       RandomSpec("X", upper="0.8", lower="0.2"))
    assert [c.label for c in cells] == ["seed 5", "seed 6"]
    r = np.random.RandomState(6).rand(3000)
    assert cells[1].recipe.weights_alpha == ",".join(repr(round((0.2 - 0.8) * float(r[i]) + 0.8, 3))
                                                      for i in range(26))
    assert len(axis("random", "7").values) == 7
    for bad, message in (("0", "from 1 to"), ("1, 2", "#123"), ("#-1", "not between"), ("x", "not a number")):
        with pytest.raises(MergeError, match=message):
            axis("random", bad)


def test_add_include_add_elemental_twice_prompts_and_merge_id():
    base = Recipe("a", "b", inex="Include", inex_blocks=("IN01",), elemental="OUT00::0.3")
    cells = plan_cells(base, GenParams(prompt="p"), [axis("add exclude", "OUT02, IN05 IN06")], SD1, PRESETS)
    assert [(c.recipe.inex, c.recipe.inex_blocks) for c in cells] == [
        ("Exclude", ("IN01", "OUT02")), ("Exclude", ("IN01", "IN05", "IN06"))]
    cells = plan_cells(base, GenParams(), [axis("add elemental", "IN04::0.1\n\nIN05::0.2"),
                                           axis("add elemental", "M00::0.7")], SD1, PRESETS)
    assert [c.recipe.elemental for c in cells] == ["OUT00::0.3,IN04::0.1,M00::0.7", "OUT00::0.3,IN05::0.2,M00::0.7"]
    cells = plan_cells(base, GenParams(prompt="p"), [axis("prompt2", "a cat,\nsitting\n\na dog")], SD1, PRESETS)
    assert [c.gen.prompt for c in cells] == ["a cat,\nsitting", "a dog"]
    cells = plan_cells(base, GenParams(), [axis("prompt3", "one\ntwo\n\nthree")], SD1, PRESETS)
    assert [c.gen.prompts for c in cells] == [("one", "two"), ("three",)]
    logged = {3: Recipe("x", "y", alpha=0.1), 4: Recipe("x", "z", alpha=0.9)}
    cells = plan_cells(base, GenParams(), [axis("merge ID", "3, 4"), axis("alpha", "0.2")], SD1, PRESETS,
                       logged=logged.__getitem__)
    assert [(c.recipe.model_b, c.recipe.alpha) for c in cells] == [("y", 0.2), ("z", 0.2)]
    with pytest.raises(MergeError, match="used twice"):
        plan_cells(base, GenParams(), [axis("add include", "IN01"), axis("add include", "IN02")], SD1, PRESETS)


def test_effective_axis_has_a_baseline_and_needs_alpha():
    eff = axis("effective", "OUT06:attn, IN04:ff")
    assert eff.labels == ("baseline", "OUT06:attn", "IN04:ff")
    cells = plan_cells(Recipe("a", "b"), GenParams(), [eff, axis("alpha", "0.3")], SD1, PRESETS)
    assert [c.recipe.elemental for c in cells] == ["", "OUT06:attn:0.3", "IN04:ff:0.3"]
    with pytest.raises(MergeError, match="takes its ratios"):
        plan_cells(Recipe("a", "b"), GenParams(), [eff], SD1, PRESETS)


def test_changed_share_counts_pixels_over_the_threshold():
    base = Image.new("RGB", (4, 5), (100, 100, 100))
    other = base.copy()
    for x, y, colour in ((0, 0, (121, 100, 100)), (1, 0, (100, 80, 100)), (2, 0, (100, 100, 79)),
                         (3, 3, (110, 110, 110))):
        other.putpixel((x, y), colour)
    share, diff = changed_share(other, base)
    assert share == pytest.approx(100 * 2 / 20)  # 21 and 21 differ by more than 20; 20 and 10 do not
    assert diff.getpixel((0, 0)) == (255 - 21, 255, 255) and diff.getpixel((1, 1)) == (255, 255, 255)


def test_effective_plot_labels_cells_with_their_difference(tools):
    result = tools.h.plot(values(x_type="effective", x_values="OUT06:attn", y_type="alpha", y_values="0, 1"))
    assert "4 of 4 cells" in result.message
    assert len(result.images) == 2  # the grid and the grid of differences


def test_prompt3_cell_is_a_batch_of_its_prompts(tools):
    host = tools.h.host
    result = tools.h.plot(values(x_type="prompt3", x_values="a\nb\nc", y_type="alpha", y_values="0.3"))
    assert [p for _, _, p in host.generated[-3:]] == ["a", "b", "c"]
    assert result.images[0].size[0] >= 3 * 64


def test_merge_id_axis_replays_logged_merges(tools):
    h = tools.h
    first = h.merge(values(alpha=0.2)).message
    second = h.merge(values(alpha=0.8)).message
    ids = [int(m.split("merge ID ")[1].split(")")[0].rstrip(",;")) for m in (first, second)]
    digests = []
    for merge_id in ids:
        h.service.merge_and_load(Recipe.from_dict({k: v for k, v in h.service.history().recipe(merge_id).items()
                                                   if k != "type"}), log=False)
        digests.append(weights_digest(h.host.live))
    h.plot(values(x_type="merge ID", x_values=", ".join(map(str, ids)), y_type="none"))
    assert [d for d, _, _ in h.host.generated[-2:]] == digests
    with pytest.raises(MergeError, match="not a merge ID"):
        h.plot(values(x_type="merge ID", x_values="abc"))


# -- queue ----------------------------------------------------------------------------------------------------


def test_queue_runs_in_order_skips_removed_and_goes_on_after_an_error(tools):
    host = tools.h.host
    tools.reserve(values(x_type="alpha", x_values="0.1", prompt="first"))
    tools.reserve(values(x_type="alpha", x_values="0.2", prompt="removed"))
    tools.reserve(values(x_type="calcmode", x_values="nonsense", prompt="broken"))
    tools.reserve(values(x_type="alpha", x_values="0.3", prompt="last"))
    tools.queue.remove(2)
    with pytest.raises(MergeError, match="No queued plot #9"):
        tools.queue.remove(9)
    result = tools.run_queue()
    assert [p for _, _, p in host.generated[-2:]] == ["first", "last"]
    table = {row[0]: row[1] for row in tools.queue.table()}
    assert table == {"1": "finished", "3": "error", "4": "finished"}
    assert "#3 error: " in result.message and "unknown calc mode" in result.message
    assert len(result.images) == 2
    with pytest.raises(MergeError, match="only waiting plots"):
        tools.queue.remove(1)
    assert "No plot is waiting" in tools.run_queue().message


def test_queue_is_per_tab_and_remove_all_waiting():
    one, two = PlotQueue(), PlotQueue()
    one.add({"x_type": "alpha"})
    one.add({"x_type": "beta"})
    assert len(two.table()) == 1 and two.table()[0][0] == ""
    one.remove(-1)
    assert one.table()[0][0] == ""


def test_reserved_run_rand_keeps_its_dice(tools):
    tools.reserve(values(rand_count=2, rand_seed=40), run_rand=True)
    tools.run_queue()
    rows = tools.h.service.history().rows()[-2:]
    assert [r["recipe"]["seed"] for r in rows] == [40, 41]


# -- plot presets ---------------------------------------------------------------------------------------------


def test_plot_presets_write_only_the_user_file(tmp_path):
    shipped_before = SHIPPED.read_bytes()
    presets = PlotPresets(tmp_path / "user.json")
    assert "Run Rand 4" in presets.names()
    presets.save("mine", {"x_type": "alpha", "x_values": "0.1,0.9", "y_type": "none"})
    presets.save("alpha sweep", {"x_type": "beta", "x_values": "0.5"})  # shadows the shipped one
    assert presets.get("mine")["x_values"] == "0.1,0.9" and presets.get("alpha sweep")["x_type"] == "beta"
    presets.delete("alpha sweep")
    assert presets.get("alpha sweep")["x_type"] == "alpha"  # the shipped one is back
    with pytest.raises(MergeError, match="shipped plot preset"):
        presets.delete("alpha sweep")
    with pytest.raises(MergeError, match="Give the plot preset a name"):
        presets.save("  ", {})
    with pytest.raises(MergeError, match="No plot preset named"):
        presets.get("nope")
    assert SHIPPED.read_bytes() == shipped_before
    (tmp_path / "bad.json").write_text("[1, 2")
    with pytest.raises(MergeError, match="Cannot read the plot presets file"):
        PlotPresets(tmp_path / "bad.json").names()
    with pytest.raises(MergeError, match="cannot be the shipped one"):
        PlotPresets(SHIPPED)


# -- Set X / extended editor ----------------------------------------------------------------------------------


def test_set_axis_appends_the_weights_line():
    assert rp.set_axis("alpha", "0.1, 0.2", "FLAT_25") == ("mbw alpha", "FLAT_25")
    assert rp.set_axis("mbw alpha", "GRAD_V\n", "0,1") == ("mbw alpha", "GRAD_V\n0,1")
    assert rp.set_axis("none", "", "0,1", "mbw beta") == ("mbw beta", "0,1")
    with pytest.raises(MergeError, match="empty"):
        rp.set_axis("alpha", "", " ")


def test_extended_editor_expands_groups_and_joins():
    twenty = [f"{i / 100:g}" for i in range(20)]
    text = rp.expand_to_fine(",".join(twenty))
    tokens = text.split(",")
    assert len(tokens) == 110
    assert tokens[BLOCKS_XL_FINE.index("IN713")] == twenty[BLOCKS_XL.index("IN07")]
    assert tokens[BLOCKS_XL_FINE.index("VAE")] == tokens[BLOCKS_XL_FINE.index("CLIPG")] == twenty[0]
    assert tokens[BLOCKS_XL_FINE.index("TIME")] == twenty[BLOCKS_XL.index("IN00")]
    assert tokens[BLOCKS_XL_FINE.index("OUT9")] == twenty[BLOCKS_XL.index("OUT08")]
    twenty_six = [f"{i}" for i in range(26)]
    assert rp.expand_to_fine(",".join(twenty_six)).split(",")[BLOCKS_XL_FINE.index("OUT52")] == \
        twenty_six[SD1_LABELS.index("OUT05")]
    groups = rp.group_texts(text)
    assert len(groups) == 20 and groups[BLOCKS_XL.index("M00")].count(",") == 12
    groups[BLOCKS_XL.index("IN04")] = "9,8,7,6"  # IN40, IN41, IN410, IN411
    joined = rp.join_groups(groups, text).split(",")
    assert [joined[BLOCKS_XL_FINE.index(x)] for x in ("IN40", "IN41", "IN410", "IN411")] == ["9", "8", "7", "6"]
    groups[0] = "1,2"
    with pytest.raises(MergeError, match="BASE takes 3 values"):
        rp.join_groups(groups, text)
    with pytest.raises(MergeError, match="Give 20 SDXL"):
        rp.expand_to_fine("1,2,3")
    assert rp.group_texts("1,2") is None


def test_tab_builds_with_the_new_controls(models):
    import gradio as gr

    from lib_merge.hosts.standalone import StandaloneHost
    from lib_merge.ui.tab import build_tab

    tab = build_tab(MergeService(StandaloneHost(models)))
    ids = {b.elem_id for b in tab.blocks.values() if getattr(b, "elem_id", None)}
    for name in ("bm_rand_run", "bm_rand_merge", "bm_rand_mode", "bm_rand_seed", "bm_set_x", "bm_set_y",
                 "bm_queue_add", "bm_queue_run", "bm_queue", "bm_xyz_preset", "bm_ext_text", "bm_ext_IN07"):
        assert name in ids, name
    assert isinstance(tab, gr.Blocks)


# -- the WebUI's X/Y/Z axes -----------------------------------------------------------------------------------


def _cell_request(**fields):
    import types

    from lib_merge.hosts.webui_xyz import REQUEST_ATTR

    p = types.SimpleNamespace()
    setattr(p, REQUEST_ATTR, fields)
    return p


def test_webui_axes_for_inex_elemental_random_and_merge_id():
    from lib_merge.core.arch import BLOCKS_26
    from lib_merge.hosts.webui_xyz import requested_recipe

    base = Recipe("a", "b", inex="Exclude", inex_blocks=("IN01",), elemental="OUT00::0.3")
    got = requested_recipe(_cell_request(**{"add exclude": "OUT02 IN05-IN06"}), base, "a", BLOCKS_26)
    assert (got.inex, got.inex_blocks) == ("Exclude", ("IN01", "IN05", "IN06", "OUT02"))
    got = requested_recipe(_cell_request(include="M00 VAE"), base, "a", BLOCKS_26)
    assert (got.inex, got.inex_blocks) == ("Include", ("M00", "VAE"))
    got = requested_recipe(_cell_request(**{"add elemental": "IN04::0.1\nIN05::0.2"}), base, "a", BLOCKS_26)
    assert got.elemental == "OUT00::0.3,IN04::0.1,IN05::0.2"
    got = requested_recipe(_cell_request(random=9), base, "a", BLOCKS_26)
    assert got.seed == 9 and got.weights_alpha == ",".join(repr(v) for v in expected_r(9))
    dice = dict(RandomSpec("D", upper="0.5", lower="0.2", decimals=2).to_dict())
    drawn = Recipe("a", "b", extra={"random": dice})  # a random merge's recipe: its dice settings are reused
    got = requested_recipe(_cell_request(random=9), drawn, "a", BLOCKS_26)
    r = np.random.RandomState(9).rand(3000)
    assert got.weights_alpha == ",".join(repr(round(0.5 + 0.2 * (float(r[i]) - 0.5), 2)) for i in range(26))
    logged = {5: Recipe("x", "y", alpha=0.7)}
    got = requested_recipe(_cell_request(**{"merge ID": 5, "alpha": 0.1}), base, "a", BLOCKS_26, logged.__getitem__)
    assert (got.model_a, got.model_b, got.alpha) == ("x", "y", 0.1)
    with pytest.raises(MergeError, match="unknown block"):
        requested_recipe(_cell_request(include="IN99"), base, "a", BLOCKS_26)
    with pytest.raises(MergeError, match="needs the merge history"):
        requested_recipe(_cell_request(**{"merge ID": 5}), base, "a", BLOCKS_26)
