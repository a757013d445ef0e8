"""The Merge tab's remaining SuperMerger helpers (issue 15): Load from ID and the E-list in the dice panel, random
axes on X and Y at once, the plot queue kept across restarts, the generation defaults, the axis helpers and the
settings as text.

Expected weights come from numpy's RandomState(seed).rand (the seed system's table) with seed-behaviour.md §4.4's
formulas written out here, and from the merge formula A(1-a)+Ba in float64; images come from tests/memory_host.py,
whose pictures encode the weights that were loaded.
"""

from __future__ import annotations

import csv
import json
import os
import random
import types

import numpy as np
import pytest
import torch
from conftest import synth_family
from memory_host import MemoryHost, weights_digest

from lib_merge.core.arch import BLOCKS_26, Arch
from lib_merge.core.errors import MergeError
from lib_merge.core.recipe import Recipe
from lib_merge.core.weights import Presets
from lib_merge.core.xyz import GenParams, parse_axis, plan_cells
from lib_merge.io.checkpoint import open_checkpoint
from lib_merge.io.elist import elemental_from_elist, read_elist
from lib_merge.service.merge_service import MergeService
from lib_merge.ui import dice_extras, recipe_text, xyz_helpers
from lib_merge.ui import random_panel as rp
from lib_merge.ui.gen_defaults import GenDefaults
from lib_merge.ui.plot_queue import PlotQueue
from lib_merge.ui.tab import Handlers, handler_values

SD1 = Arch("sd1")
PRESETS = Presets.load()


def table(seed):
    return np.random.RandomState(seed).rand(3000)


def combined(*seeds):
    """A cell's seed with random axes on X and Y: numpy's SeedSequence over the axes' seeds, X first."""
    return int(np.random.SeedSequence(list(seeds)).generate_state(1, np.uint32)[0])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tab2_models")
    synth_family(root)
    return root


def _tools(models, folder):
    for p in models.iterdir():
        if not (folder / p.name).exists():
            os.link(p, folder / p.name)
    return rp.PlotTools(Handlers(MergeService(MemoryHost(folder, "a.safetensors"))))


@pytest.fixture()
def tools(models, tmp_path):
    return _tools(models, tmp_path)


def values(**extra):
    dice = {**rp.DICE_DEFAULTS, **{k: v for k, v in extra.items() if k.startswith("rand_")}}
    rest = {k: v for k, v in extra.items() if not k.startswith("rand_")}
    return {**handler_values(model_a="a.safetensors", model_b="b.safetensors", gen_seed=11, **rest), **dice}


def keys_of(folder, name="a.safetensors"):
    with open_checkpoint(folder / name) as ckpt:
        return list(ckpt.keys()), {k: ckpt.get(k).double() for k in ckpt.keys()}


# -- random axes on X and Y ----------------------------------------------------------------------------------


def test_random_on_x_and_y_gives_every_cell_its_own_seed_drawn_from_both():
    axes = [parse_axis("random", "#5, #6", SD1, PRESETS, random.Random(0)),
            parse_axis("random", "#7, #8, #9", SD1, PRESETS, random.Random(0))]
    cells = plan_cells(Recipe("a", "b"), GenParams(), axes, SD1, PRESETS)
    assert [(c.x, c.y) for c in cells] == [(x, y) for y in range(3) for x in range(2)]
    seeds = {(c.x, c.y): c.recipe.seed for c in cells}
    for c in cells:
        seed = combined((5, 6)[c.x], (7, 8, 9)[c.y])
        assert c.recipe.seed == seed and c.label == f"seed {seed}"
        assert c.recipe.weights_alpha == ",".join(repr(round(float(r), 3)) for r in table(seed)[:26])
    assert len(set(seeds.values())) == 6
    again = plan_cells(Recipe("a", "b"), GenParams(), axes, SD1, PRESETS)
    assert [c.recipe for c in again] == [c.recipe for c in cells]
    # a lone random axis keeps its own seeds (Run Rand and earlier plots unchanged)
    lone = plan_cells(Recipe("a", "b"), GenParams(), axes[:1], SD1, PRESETS)
    assert [c.recipe.seed for c in lone] == [5, 6]


def test_a_random_x_and_y_plot_runs_and_a_cell_is_reproduced_from_its_label(tools):
    h, host = tools.h, tools.h.host
    specs = [("random", "#21, #22"), ("random", "#31, #32"), ("none", "")]
    result = h.plot(values(), specs, rp.spec_from_values(values(rand_mode="X", rand_upper="0.9", rand_lower="0.1")))
    assert "4 of 4 cells, 4 merges" in result.message
    rows = h.service.history().rows()[-4:]
    expected = [combined(x, y) for y in (31, 32) for x in (21, 22)]
    assert [r["recipe"]["seed"] for r in rows] == expected
    for seed in expected:
        assert f"seed {seed}" in result.infotext
    digests = [d for d, _, _ in host.generated[-4:]]
    assert len(set(digests)) == 4
    cell = 2  # x = 21, y = 32
    r = table(expected[cell])
    assert rows[cell]["recipe"]["weights_alpha"] == ",".join(repr(round((0.1 - 0.9) * float(r[i]) + 0.9, 3))
                                                             for i in range(26))
    message = tools.random_merge(values(rand_mode="X", rand_upper="0.9", rand_lower="0.1",
                                        rand_seed=expected[cell])).message
    assert f"Weight seed {expected[cell]}" in message
    assert weights_digest(host.live) == digests[cell]


def test_the_webui_random_axis_on_x_and_y_combines_the_seeds():
    from lib_merge.hosts.webui_xyz import REQUEST_ATTR, _set, requested_recipe

    apply = _set("random", lambda p, sample: None)
    p = types.SimpleNamespace()
    apply(p, 21, [21, 22])  # the X/Y/Z script applies X, then Y, to a copy of p per cell
    apply(p, 31, [31, 32])
    assert getattr(p, REQUEST_ATTR) == {"random": (21, 31)}
    got = requested_recipe(p, Recipe("a", "b"), "a", BLOCKS_26)
    seed = combined(21, 31)
    assert got.seed == seed and got.weights_alpha == ",".join(repr(round(float(r), 3)) for r in table(seed)[:26])


def test_other_axes_still_refuse_to_repeat():
    axes = [parse_axis("calcmode", "normal", SD1, PRESETS, random.Random(0))] * 2
    with pytest.raises(MergeError, match="'calcmode' is used twice"):
        plan_cells(Recipe("a", "b"), GenParams(), axes, SD1, PRESETS)


# -- Load from ID -------------------------------------------------------------------------------------------


def test_upper_limit_from_merge_id_and_an_x_merge_with_it(tools):
    h = tools.h
    weights = [round(0.04 * i, 2) for i in range(26)]
    text = ",".join(map(str, weights))
    h.merge(values(use_mbw=True, weights_alpha=text))
    mbw_id = h.service.history().rows()[-1]["id"]
    h.merge(values(alpha=0.37))
    assert dice_extras.upper_from_id(h, -1) == (
        "0.37", f"Upper limit: merge {mbw_id + 1} used no block weights; its alpha 0.37 for every block.")
    upper, message = dice_extras.upper_from_id(h, mbw_id)
    assert [float(v) for v in upper.split(",")] == weights and str(mbw_id) in message
    # X draws between the lower limit (0) and that upper limit, block by block
    tools.random_merge(values(rand_mode="X", rand_upper=upper, rand_lower="0", rand_seed=9))
    r = table(9)
    logged = h.service.history().rows()[-1]["recipe"]["weights_alpha"]
    assert logged == ",".join(repr(round((0 - weights[i]) * float(r[i]) + weights[i], 3)) for i in range(26))


@pytest.mark.parametrize("merge_id, message", [
    ("x", "Merge ID must be a whole number"),
    (999, "999"),
])
def test_upper_limit_from_an_unusable_id_says_why(tools, merge_id, message):
    tools.h.merge(values(alpha=0.2))
    with pytest.raises(MergeError, match=message):
        dice_extras.upper_from_id(tools.h, merge_id)


def test_upper_limit_refuses_random_tokens(tools):
    h = tools.h
    h.merge(values(use_mbw=True, weights_alpha=",".join(["R"] * 26), seed=3))
    logged = h.service.history().rows()[-1]["recipe"]["weights_alpha"]
    assert "R" in logged  # the history keeps the tokens (the seed makes them repeatable)
    with pytest.raises(MergeError, match="random tokens"):
        dice_extras.upper_from_id(h, -1)


# -- E-list ---------------------------------------------------------------------------------------------------


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_e_list_holds_every_merged_key_and_loads_back_into_the_same_merge(tools, tmp_path):
    h, host = tools.h, tools.h.host
    template = ["0.3"] * 26
    er = {"IN04": "ER", "OUT05": "ER"}
    for block, token in er.items():
        template[BLOCKS_26.index(block)] = token
    message = tools.random_merge(values(rand_mode="custom", rand_template=",".join(template), rand_seed=77,
                                        **{dice_extras.SAVE_ELIST: True})).message
    path = message.split("E-list saved: ")[1].splitlines()[0]
    assert os.path.dirname(path) == str(tmp_path / "block_merger_elists") and path.endswith("-seed77.csv")
    random_state = {k: v.clone() for k, v in host.live.items()}
    rows = _read_csv(path)
    order, a = keys_of(tmp_path)
    _, b = keys_of(tmp_path, "b.safetensors")
    r = table(77)
    assert rows and {row["elemental"] for row in rows} == {"yes", "no"}
    for row in rows:
        key, alpha = row["key"], float(row["alpha"])
        if row["elemental"] == "yes":
            assert row["block"] in er and alpha == round(float(r[order.index(key) + 100]), 3)
        else:
            assert row["block"] not in er and alpha == 0.3
        expected = a[key] * (1 - alpha) + b[key] * alpha  # float64, the Weight sum formula
        eps = 2.0 ** -10 if random_state[key].dtype == torch.float16 else 1e-6  # rounded once to the model's dtype
        assert torch.allclose(random_state[key].double(), expected, rtol=eps, atol=1e-7), key
    # loaded back: its rules, with the other blocks' numbers, give the random merge again, bit for bit
    text, note = dice_extras.load_elist(path)
    assert note.startswith(f"Loaded {sum(row['elemental'] == 'yes' for row in rows)} Elemental rules")
    h.service.restore_base()
    plain = ",".join("0" if t == "ER" else t for t in template)
    h.merge(values(use_mbw=True, weights_alpha=plain, elemental=text))
    for key, tensor in random_state.items():
        assert torch.equal(host.live[key], tensor), key


@pytest.mark.parametrize("data, message", [
    (b"\xff\xfe junk", "not an E-list CSV"),
    (b"a,b,c\n", "first line must be key,block,alpha,beta,elemental"),
    (b"key,block,alpha,beta,elemental\nk.weight,OUT05,zero,0.2,yes\n", "must be numbers"),
    (b"key,block,alpha,beta,elemental\nk.weight,OUT05,0.1,0.2\n", "4 fields"),
    (b"key,block,alpha,beta,elemental\nk:x,OUT05,0.1,0.2,yes\n", "is not a key"),
    (b"key,block,alpha,beta,elemental\nk.weight,OUT05,0.1,0.2,no\n", "no key whose alpha an Elemental rule set"),
])
def test_a_bad_e_list_is_refused_with_its_reason(data, message):
    with pytest.raises(MergeError, match=message):
        elemental_from_elist(read_elist(data, "x.csv"), "x.csv")


def test_an_e_list_too_long_for_the_elemental_field_says_so():
    lines = ["key,block,alpha,beta,elemental"] + [f"model.diffusion_model.k{i:05d}.weight,OUT05,0.1,0.2,yes"
                                                  for i in range(400)]
    with pytest.raises(MergeError, match="holds at most 10,000"):
        elemental_from_elist(read_elist("\n".join(lines).encode()))


def test_loading_no_e_list_file_says_so():
    with pytest.raises(MergeError, match="Choose an E-list"):
        dice_extras.load_elist(None)


# -- the queue kept across restarts ---------------------------------------------------------------------------


def test_the_queue_survives_a_restart_and_a_running_plot_waits_again(tmp_path):
    path = tmp_path / "queue.json"
    queue = PlotQueue(path)
    assert queue.add({"x_type": "alpha", "x_values": "0.1"}) == 1
    assert queue.add({"x_type": "beta", "x_values": "0.2"}, {"mode": "R"}) == 2
    queue.add({"x_type": "seed", "x_values": "1"})
    queue.remove(1)
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert [(e["number"], e["status"], e["values"]["x_type"], e["extra"]) for e in saved] == [
        (2, "waiting", "beta", {"mode": "R"}), (3, "waiting", "seed", None)]
    assert [p.name for p in tmp_path.iterdir()] == ["queue.json"]  # written atomically: no temporary left
    saved[0]["status"] = "running"  # the WebUI stopped while #2 ran
    path.write_text(json.dumps(saved), encoding="utf-8")
    again = PlotQueue(path)
    assert [row[:3] for row in again.table()] == [["2", "waiting", "beta: 0.2"], ["3", "waiting", "seed: 1"]]
    assert again.add({"x_type": "alpha"}) == 4 and again.notice == ""


@pytest.mark.parametrize("content", [b"{not json", b'{"a": 1}', b'[{"number": 1, "status": "waiting"}]',
                                     b'[{"number": 1, "status": "odd", "values": {}}]',
                                     b'[{"number": 1, "status": "waiting", "values": {}},'
                                     b' {"number": 1, "status": "waiting", "values": {}}]'])
def test_a_damaged_queue_file_is_set_aside_with_a_message(tmp_path, content):
    path = tmp_path / "queue.json"
    path.write_bytes(content)
    queue = PlotQueue(path)
    assert queue.table() == [["", "", "", "", "", ""]]
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("queue.json.damaged-")]
    assert len(aside) == 1 and aside[0].read_bytes() == content and not path.exists()
    assert "could not be read" in queue.notice and aside[0].name in queue.notice
    queue.add({"x_type": "alpha"})  # a fresh file; the notice has done its work
    assert json.loads(path.read_text(encoding="utf-8"))[0]["number"] == 1 and queue.notice == ""


def test_a_queue_file_that_cannot_be_written_keeps_the_queue_in_memory(tmp_path):
    (tmp_path / "file").write_text("x")
    queue = PlotQueue(tmp_path / "file" / "queue.json")  # its folder is a file
    assert queue.add({"x_type": "alpha"}) == 1
    assert "cannot be written" in queue.notice and queue.table()[0][:2] == ["1", "waiting"]


def test_a_queue_entry_must_be_plain_data(tmp_path):
    with pytest.raises(MergeError, match="cannot be queued"):
        PlotQueue(tmp_path / "q.json").add({"x_type": object()})


def test_a_reserved_run_rand_runs_after_a_restart_with_its_dice(models, tmp_path):
    first = _tools(models, tmp_path)
    assert "Plot #1 is queued" in first.reserve(values(rand_count=2, rand_seed=40, rand_mode="U"), run_rand=True)
    restarted = _tools(models, tmp_path)  # a new tab over the same history folder
    result = restarted.run_queue()
    assert result.message.startswith("#1 finished")
    rows = restarted.h.service.history().rows()[-2:]
    assert [r["recipe"]["seed"] for r in rows] == [40, 41]
    r = table(41)
    assert rows[1]["recipe"]["weights_alpha"] == ",".join(repr(round(1.5 - 2 * float(r[i]), 3)) for i in range(26))
    assert PlotQueue(tmp_path / rp.PLOT_QUEUE_FILE).table()[0][:2] == ["1", "finished"]


# -- generation defaults ----------------------------------------------------------------------------------------


def test_generation_defaults_save_forget_and_a_damaged_file(tmp_path):
    store = GenDefaults(tmp_path / "g.json", {"prompt": "", "steps": 0, "styles": []})
    assert store.current() == ({"prompt": "", "steps": 0, "styles": []}, "")
    store.save({"prompt": "a cat", "steps": 12, "styles": ["s1"]})
    assert json.loads((tmp_path / "g.json").read_text()) == {"prompt": "a cat", "steps": 12, "styles": ["s1"]}
    assert store.current() == ({"prompt": "a cat", "steps": 12, "styles": ["s1"]}, "")
    assert store.forget() is True and store.forget() is False
    assert store.current()[0]["prompt"] == ""
    with pytest.raises(ValueError, match="unknown fields"):
        store.save({"prompt": "x", "steps": 1, "styles": [], "nonsense": 1})
    (tmp_path / "g.json").write_text('{"steps": {"deep": 1}}')
    values_now, notice = store.current()
    assert values_now["steps"] == 0 and "moved to g.json.damaged-" in notice


def _app(models, folder):
    from lib_merge.ui.tab import build_tab

    tools = _tools(models, folder)
    tab = build_tab(tools.h.service)
    by_id = {b.elem_id: b for b in tab.blocks.values() if getattr(b, "elem_id", None)}
    return tab, by_id


def _event(tab, by_id, elem_id, trigger="click"):
    """(the handler, its input ids, its output ids) of an event of the element `elem_id`."""
    index, dep = next((i, d) for i, d in enumerate(tab.dependencies)
                      if by_id[elem_id]._id in d["targets"] and d["trigger"] == trigger)
    return tab.fns[index].fn, dep["inputs"], dep["outputs"]


def _ids(by_id, *names):
    return [by_id[n]._id for n in names]


def test_the_tab_sets_resets_and_applies_generation_defaults(models, tmp_path):
    tab, by_id = _app(models, tmp_path)
    fn, inputs, _ = _event(tab, by_id, "bm_gen_set_default")
    names = {b._id: b.elem_id for b in by_id.values()}
    given = {"bm_prompt": "a lab cat", "bm_steps": 7, "bm_width": 320, "bm_styles": []}
    args = [given.get(names[i], by_id[names[i]].value) for i in inputs]
    assert "Saved these generation parameters" in fn(*args)
    # a page opened later puts the saved values in (and leaves the rest alone)
    loads = [(i, d) for i, d in enumerate(tab.dependencies) if d["trigger"] == "load"
             and by_id["bm_prompt"]._id in d["outputs"]]
    assert len(loads) == 1
    index, dep = loads[0]
    shown = dict(zip(dep["outputs"], tab.fns[index].fn(), strict=True))
    assert shown[by_id["bm_prompt"]._id]["value"] == "a lab cat" and shown[by_id["bm_steps"]._id]["value"] == 7
    # reset current: the saved defaults; after reset default: the tab's own
    fn, _, outputs = _event(tab, by_id, "bm_gen_reset_current")
    shown = dict(zip(outputs, fn(), strict=True))
    assert shown[by_id["bm_width"]._id]["value"] == 320
    forget, _, _ = _event(tab, by_id, "bm_gen_reset_default")
    assert "Forgot" in forget()
    shown = dict(zip(outputs, fn(), strict=True))
    assert shown[by_id["bm_width"]._id]["value"] == 0 and shown[by_id["bm_prompt"]._id]["value"] == ""


# -- axis helpers and settings as text --------------------------------------------------------------------------


def test_axis_helpers_add_the_selection_and_draw_distinct_seeds():
    assert xyz_helpers.add_to_axis("", "IN01 IN02") == "IN01 IN02"
    assert xyz_helpers.add_to_axis("OUT05, ", "IN01 IN02") == "OUT05, IN01 IN02"
    with pytest.raises(MergeError, match="Nothing is selected"):
        xyz_helpers.add_to_axis("0.1", " ")
    draws = iter([7, 7, 9, 11])
    assert xyz_helpers.random_seeds(3, lambda: next(draws)) == "7, 9, 11"
    for bad in (0, 2.5, "x", 101):
        with pytest.raises(MergeError, match="whole number from 1 to 100"):
            xyz_helpers.random_seeds(bad)
    seeds = [int(s) for s in xyz_helpers.random_seeds(5).split(",")]
    assert len(set(seeds)) == 5 and all(0 <= s < 2**32 for s in seeds)


def test_axis_helper_buttons_in_the_tab(models, tmp_path):
    tab, by_id = _app(models, tmp_path)
    fn, _, _ = _event(tab, by_id, "bm_xyz_pick_blocks", "change")
    assert fn(["IN01", "OUT05"]) == "IN01 OUT05"
    fn, _, outputs = _event(tab, by_id, "bm_xyz_add_y")
    assert outputs == _ids(by_id, "bm_y_values", "bm_message")
    assert fn("normal", "cosineA,tensor")[0] == "normal, cosineA,tensor"
    fn, _, outputs = _event(tab, by_id, "bm_xyz_seeds")
    kind, text, _ = fn(4)
    assert kind == "seed" and len(set(text.split(", "))) == 4


def test_settings_as_text_round_trip(tools):
    from lib_merge.ui.tab import RECIPE_KEYS

    h = tools.h
    given = values(alpha=0.31, mode="Add difference", model_c="c.safetensors", elemental="OUT05::0.2",
                   use_mbw=True, weights_alpha=",".join(["0.6"] * 26), inex="Exclude", inex_blocks=["IN01"])
    text = recipe_text.recipe_text(h, {k: given[k] for k in RECIPE_KEYS})
    data = json.loads(text)
    assert (data["model_a"], data["model_c"], data["alpha"], data["mode"], data["elemental"]) == (
        "a.safetensors", "c.safetensors", 0.31, "Add difference", "OUT05::0.2")
    assert data["weights_alpha"] == ",".join(["0.6"] * 26) and data["inex_blocks"] == ["IN01"]
    back = recipe_text.values_from_text(text)
    for key in ("model_a", "model_b", "model_c", "mode", "alpha", "use_mbw", "weights_alpha", "elemental", "inex",
                "inex_blocks"):
        assert back[key] == given[key], key
    assert Recipe.from_json(text).fingerprint() == h.recipe(given).validate(h.service.presets).fingerprint()


@pytest.mark.parametrize("text, message", [
    ("", "Paste a recipe"),
    ("{oops", "not valid JSON"),
    ("[1]", "must be an object"),
    ('{"operation": "lora bake"}', "not a merge recipe"),
    ('{"model_a": "a", "colour": 1}', "unknown fields: colour"),
])
def test_pasted_settings_that_are_not_a_recipe_are_refused(text, message):
    if "operation" in text:
        from lib_merge.service.lora_service import LORA_RECORD_OPERATIONS

        text = json.dumps({"operation": sorted(LORA_RECORD_OPERATIONS)[0]})
    with pytest.raises(MergeError, match=message):
        recipe_text.values_from_text(text)


def test_copying_settings_that_cannot_merge_says_why(tools):
    with pytest.raises(MergeError):
        recipe_text.recipe_text(tools.h, values(calc="nonsense"))
