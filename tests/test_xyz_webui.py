"""Block Merger's axes in the WebUI's X/Y/Z plot, against a fake xyz_grid module with the real AxisOption shape."""

from __future__ import annotations

import copy
import types

import pytest

from lib_merge.core.arch import BLOCKS_26
from lib_merge.core.errors import MergeError
from lib_merge.core.recipe import Recipe
from lib_merge.core.weights import Presets
from lib_merge.hosts.webui_xyz import PREFIX, axis_options, register, requested_recipe


class AxisOption:  # the WebUI's signature: AxisOption(label, type, apply, format_value=..., confirm=None, cost=0.0,
    def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None, prepare=None):
        self.label, self.type, self.apply, self.confirm = label, type, apply, confirm
        self.cost, self.choices, self.prepare = cost, choices, prepare


def fake_xyz():
    return types.SimpleNamespace(AxisOption=AxisOption, axis_options=[AxisOption("Checkpoint name", str, None,
                                                                                 cost=1.0)])


def resolve(name):
    if name not in ("a", "b", "c"):
        raise MergeError(f"Unknown model {name!r}")
    return name


def options(xyz, check=lambda p, sample: None):
    return axis_options(xyz, resolve, lambda: ["a", "b", "c"], Presets.load, check)


def by_label(xyz, suffix):
    return next(o for o in xyz.axis_options if o.label == PREFIX + suffix)


def test_axes_registered_exactly_once_with_merges_outermost():
    xyz = fake_xyz()
    assert register(xyz, options(xyz)) is True
    assert register(xyz, options(xyz)) is False  # on_before_ui after import: no duplicates
    labels = [o.label for o in xyz.axis_options]
    assert len(labels) == len(set(labels)) == 24
    for suffix in ("Model A", "Model B", "Model C", "Merge mode", "Calc mode", "Alpha", "Beta",
                   "Block weights (| separated)", "Pinpoint block (BLOCK=value)", "Elemental (| separated)",
                   "Method", "Density", "Drop", "Epsilon"):
        assert by_label(xyz, suffix).cost > 1.0  # above "Checkpoint name": merges in the outer loops


def test_apply_records_a_new_request_dict_per_cell():
    xyz = fake_xyz()
    register(xyz, options(xyz))
    p = types.SimpleNamespace()
    by_label(xyz, "Model B").apply(p, "b", ["b", "c"])
    cell = copy.copy(p)  # the WebUI copies p shallowly per cell
    by_label(xyz, "Alpha").apply(cell, 0.25, [0.25])
    assert p.block_merger_xyz == {"model_b": "b"}
    assert cell.block_merger_xyz == {"model_b": "b", "alpha": 0.25}


def test_the_first_cell_checks_a_sample_of_every_axis_once():
    """confirm runs for X, Y and Z before any cell: each records a sample, and the first cell's first apply hands
    all of them to the check (which refuses by raising, ending the plot before an image)."""
    checked = []
    xyz = fake_xyz()
    register(xyz, options(xyz, lambda p, sample: checked.append(sample)))
    p = types.SimpleNamespace()
    by_label(xyz, "Alpha").confirm(p, [0.2, 0.8])
    by_label(xyz, "Model B").confirm(p, ["b", "c"])
    for x in (0.2, 0.8):
        cell = copy.copy(p)
        by_label(xyz, "Alpha").apply(cell, x, [0.2, 0.8])
        by_label(xyz, "Model B").apply(cell, "b", ["b", "c"])
    assert checked == [{"alpha": 0.2, "model_b": "b"}]

    def refuse(p, sample):
        raise MergeError("no model B")

    xyz = fake_xyz()
    register(xyz, options(xyz, refuse))
    p = types.SimpleNamespace()
    by_label(xyz, "Alpha").confirm(p, [0.2])
    with pytest.raises(MergeError, match="no model B"):
        by_label(xyz, "Alpha").apply(copy.copy(p), 0.2, [0.2])


def test_confirm_and_prepare_refuse_bad_values():
    xyz = fake_xyz()
    register(xyz, options(xyz))
    with pytest.raises(MergeError, match="Unknown model 'zzz'"):
        by_label(xyz, "Model A").confirm(None, ["a", "zzz"])
    with pytest.raises(MergeError, match="Unknown preset"):
        by_label(xyz, "Block weights (| separated)").confirm(None, ["NOPE"])
    assert by_label(xyz, "Block weights (| separated)").prepare("GRAD_V | 0,1,1 ") == ["GRAD_V", "0,1,1"]
    with pytest.raises(MergeError, match="BLOCK=value"):
        by_label(xyz, "Pinpoint block (BLOCK=value)").prepare("OUT05")


def test_requested_recipe_builds_on_the_users_merge():
    base = Recipe("a", "b", weights_alpha=",".join(["0.5"] * 26))
    p = types.SimpleNamespace(block_merger_xyz={"calc": "cosineA", "pinpoint": "OUT05=0.9"})
    recipe = requested_recipe(p, base, "a", BLOCKS_26)
    assert recipe.calc == "cosineA"
    assert recipe.weights_alpha.split(",")[BLOCKS_26.index("OUT05")] == "0.9"
    assert requested_recipe(types.SimpleNamespace(), base, "a", BLOCKS_26) is None
    plain = requested_recipe(types.SimpleNamespace(block_merger_xyz={"model_b": "b"}), None, "a", BLOCKS_26)
    assert (plain.model_a, plain.model_b) == ("a", "b")
    with pytest.raises(MergeError, match="not one of"):
        requested_recipe(types.SimpleNamespace(block_merger_xyz={"pinpoint": "OUT12=1"}), base, "a", BLOCKS_26)
