"""X/Y/Z plots in the tab: axis syntax, cells, one merge per distinct recipe, labels, stop, memory."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import synth_family
from memory_host import MemoryHost, weights_digest
from PIL import Image

from lib_merge.core.arch import Arch
from lib_merge.core.engine import DictSink, plan_merge, run_merge
from lib_merge.core.errors import MergeError
from lib_merge.core.recipe import Recipe
from lib_merge.core.weights import Presets
from lib_merge.core.xyz import GenParams, check_axes, draw_grid, merge_order, parse_axis, plan_cells
from lib_merge.hosts.base import GenerationRequest
from lib_merge.io.checkpoint import open_checkpoint
from lib_merge.service.merge_service import MergeService
from lib_merge.ui.plot import run_plot

SD1 = Arch("sd1")
ROOT = Path(__file__).resolve().parent.parent
XL = Arch("sdxl")
PRESETS = Presets.load()


def axis(kind, text, arch=SD1):
    return parse_axis(kind, text, arch, PRESETS, random.Random(0))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    synth_family(root)
    return root


@pytest.fixture()
def service(folder):
    return MergeService(MemoryHost(folder, "a.safetensors"), log_merges=False)


def test_axis_syntax():
    assert axis("alpha", "0.1, 0.5,1").values == (0.1, 0.5, 1.0)
    assert axis("alpha and beta", "0.1 0.2, 0.3").values == ((0.1, 0.2), (0.3, 0.3))
    seeds = axis("seed", "-1, 5, -1").values
    assert seeds[1] == 5 and seeds[0] == seeds[2] != -1  # -1 is replaced once
    assert axis("mbw alpha", "FLAT_25\nALL_B").values[0] == PRESETS.get("FLAT_25")
    assert len(axis("mbw alpha and beta", "ALL_A\nALL_B").values) == 1
    assert axis("pinpoint blocks", "IN01 OUT02, IN03-IN05, NOT BASE IN00-OUT11").values == (
        frozenset({"IN01", "OUT02"}), frozenset({"IN03", "IN04", "IN05"}), frozenset())
    assert axis("exclude blocks", "VAE IN01, NOT VAE Adjust").values[1] == frozenset(SD1.blocks)
    assert axis("elemental", "IN01::0.5\nOUT02:attn:0.1\n\n\nM00::1").values == ("IN01::0.5\nOUT02:attn:0.1",
                                                                                 "M00::1")
    assert axis("prompt", "a cat\na dog\n").values == ("a cat", "a dog")
    assert axis("alpha", "  ") is None and axis("none", "0.5") is None
    assert axis("pinpoint blocks", "OUT08", XL).values == (frozenset({"OUT08"}),)


@pytest.mark.parametrize(("kind", "text", "message"), [
    ("alpha", "0.1, abc", "not a number"),
    ("alpha", "nan", "finite"),
    ("mbw alpha", "NOPE", "Unknown preset"),
    ("mbw alpha and beta", "ALL_A\nALL_B\nALL_A", "pairs"),
    ("pinpoint blocks", "IN12", "unknown block"),
    ("pinpoint blocks", "IN09", "unknown block"),  # not an SDXL block
    ("calcmode", "normal, cosineC", "unknown calc mode"),
    ("merge mode", "Weight sum, Add", "unknown merge mode"),
    ("pinpoint adjust", "IN, BRIGHT", "not one of"),
    ("pinpoint element", "OUT01:attn:0.5", "Blocks:Elements"),
    ("sideways", "1", "Unknown plot axis type"),
])
def test_bad_axis_text_is_refused(kind, text, message):
    with pytest.raises(MergeError, match=message):
        axis(kind, text, XL if text == "IN09" else SD1)


def test_same_axis_twice_and_pinpoint_without_ratio_are_refused():
    with pytest.raises(MergeError, match="used twice"):
        check_axes([axis("alpha", "0.1"), axis("alpha", "0.2"), None])
    with pytest.raises(MergeError, match="takes its ratios"):
        check_axes([axis("pinpoint blocks", "IN01"), axis("seed", "1"), None])


def test_cells_apply_every_axis_and_pinpoint_uses_the_alpha_value():
    base = Recipe("a", "b", weights_alpha=",".join(["0.5"] * 26))
    cells = plan_cells(base, GenParams(seed=7, prompt="p"), [axis("pinpoint blocks", "IN01, OUT11"),
                                                             axis("alpha", "0.2, 0.9"), axis("seed", "3, 4")],
                       SD1, PRESETS)
    assert len(cells) == 8
    by_pos = {(c.x, c.y, c.z): c for c in cells}
    weights = by_pos[(1, 1, 0)].recipe.weights_alpha.split(",")
    assert weights[SD1.blocks.index("OUT11")] == "0.9" and weights[SD1.blocks.index("IN01")] == "0.5"
    assert by_pos[(0, 0, 1)].gen == GenParams(seed=4, prompt="p")
    assert len(merge_order(cells)) == 4  # seeds share merges


def test_alpha_axis_while_mbw_is_on_and_useless_beta_are_refused():
    with pytest.raises(MergeError, match="no effect while block weights"):
        plan_cells(Recipe("a", "b", weights_alpha="FLAT_25"), GenParams(), [axis("alpha", "0.1")], SD1, PRESETS)
    with pytest.raises(MergeError, match="beta has no effect"):
        plan_cells(Recipe("a", "b"), GenParams(), [axis("beta", "0.1")], SD1, PRESETS)
    with pytest.raises(MergeError, match="Model C is required"):
        plan_cells(Recipe("a", "b"), GenParams(), [axis("merge mode", "Weight sum, Add difference")], SD1,
                   PRESETS)


def test_3x3x2_plot_cells_labels_and_one_merge_per_distinct_recipe(service, folder):
    host = service.host
    before = weights_digest(host.live)
    base = Recipe("a.safetensors", "b.safetensors", "c.safetensors", mode="sum Twice", alpha=0.5, beta=0.2)
    result = run_plot(service, base, GenerationRequest(prompt="cat", seed=11),
                      [("alpha", "0.1,0.5,0.9"), ("seed", "1,2,3"), ("beta", "0.0,0.4")])
    assert (result.cells_done, result.cells_total, result.merges) == (18, 18, 6)
    assert len(result.grids) == 2
    # every image came from the weights of exactly its recipe
    expected = {}
    with open_checkpoint(folder / "a.safetensors") as a, open_checkpoint(folder / "b.safetensors") as b, \
            open_checkpoint(folder / "c.safetensors") as c:
        from lib_merge.core.engine import Models
        for alpha in (0.1, 0.5, 0.9):
            for beta in (0.0, 0.4):
                r = Recipe("a", "b", "c", mode="sum Twice", alpha=alpha, beta=beta)
                state = run_merge(plan_merge(r, Models(a, b, c)), Models(a, b, c), DictSink())
                expected[(alpha, beta)] = weights_digest(state)
    seen = {(digest, seed) for digest, seed, _ in host.generated}
    assert seen == {(expected[(a, b)], s) for a in (0.1, 0.5, 0.9) for b in (0.0, 0.4) for s in (1, 2, 3)}
    assert weights_digest(host.live) == before and host.identity is None  # the base is back


def test_grid_has_x_y_and_z_labels():
    images = {(i, j): Image.new("RGB", (64, 48), (40 * i, 60 * j, 90)) for i in range(3) for j in range(2)}
    grid = draw_grid(images, axis("alpha", "0.1,0.5,0.9"), axis("seed", "1,2"), "calcmode = cosineA",
                     "a x (1-alpha) + b x alpha", (64, 48))
    assert grid.width > 3 * 64 and grid.height > 2 * 48
    pixels = grid.load()

    def ink(x0, y0, x1, y1):
        return sum(sum(pixels[x, y]) < 300 for x in range(x0, x1) for y in range(y0, y1))

    cells_top = grid.height - 2 * 48 - 30  # the caption sits below the cells
    assert ink(0, 0, grid.width, 18) > 0  # the Z title
    assert ink(grid.width - 64, 18, grid.width, cells_top) > 0  # the last X label, above its column
    assert ink(0, cells_top, grid.width - 3 * 64 - 1, cells_top + 96) > 0  # Y labels, left of the cells
    assert ink(0, grid.height - 20, grid.width, grid.height) > 0  # the merge formula caption


def test_stop_keeps_the_finished_part(service):
    host = service.host
    calls = []
    real = host.generate

    def generate(request):
        calls.append(1)
        if len(calls) == 4:
            host.request_stop()
        return real(request)

    host.generate = generate
    result = run_plot(service, Recipe("a.safetensors", "b.safetensors"), GenerationRequest(seed=1),
                      [("alpha", "0.1,0.2,0.3"), ("prompt", "x\ny"), ("none", "")])
    assert result.stopped and result.cells_done == 4 and result.cells_total == 6
    assert len(result.grids) == 1


def test_one_block_change_between_cells_reloads_only_that_block(service):
    host = service.host
    weights = [",".join(["0.5"] * 26), ",".join(["0.5"] * 20 + ["0.9"] + ["0.5"] * 5)]  # OUT06 differs
    run_plot(service, Recipe("a.safetensors", "b.safetensors"), GenerationRequest(seed=1),
             [("mbw alpha", "\n".join(weights)), ("none", ""), ("none", "")])
    out6 = sum(".output_blocks.6." in k for k in host.live)
    assert host.loads[0] == len(host.live) and host.loads[1] == out6


MEMORY_PROBE = """
import json, resource, sys
from memory_host import MemoryHost
from lib_merge.core.recipe import Recipe
from lib_merge.hosts.base import GenerationRequest
from lib_merge.service.merge_service import MergeService
from lib_merge.ui.plot import run_plot

service = MergeService(MemoryHost(sys.argv[1], "a.safetensors"), log_merges=False)


def plot(alphas, seeds):
    spec = [("alpha", ",".join(f"{i / alphas:.3f}" for i in range(alphas))), ("seed", seeds), ("none", "")]
    run_plot(service, Recipe("a.safetensors", "b.safetensors"), GenerationRequest(), spec)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux


print(json.dumps([plot(40, "1,2"), plot(50, "3,4")]))
"""


def test_memory_stays_flat_over_many_cells(folder):
    """Peak RSS after 80 cells and after 100 more, in a fresh interpreter where nothing else ran (within the test
    process the peak depends on what earlier tests left). Keeping a merge or an image per cell (~9 MB models)
    would add about 900 MB."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(p) for p in (ROOT, ROOT / "tests")))
    res = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(folder)], env=env, capture_output=True, text=True,
                         timeout=600, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr
    first, second = json.loads(res.stdout.splitlines()[-1])
    assert second - first < 50_000, (first, second)


def test_plot_puts_back_the_users_merge(service):
    host = service.host
    mine = Recipe("a.safetensors", "b.safetensors", alpha=0.3)
    service.merge_and_load(mine)
    before = weights_digest(host.live)
    run_plot(service, Recipe("a.safetensors", "b.safetensors"), GenerationRequest(seed=1),
             [("alpha", "0.6,0.9"), ("none", ""), ("none", "")])
    assert weights_digest(host.live) == before
    assert service.committed() == mine.validate()


def test_reconcile_merges_only_when_the_request_differs(service):
    host = service.host
    request = Recipe("a.safetensors", "b.safetensors", alpha=0.7)
    assert service.reconcile(request) is not None
    loads = len(host.loads)
    assert service.reconcile(request) is None and len(host.loads) == loads
    service.reconcile(None)  # nothing committed: back to the base checkpoint
    assert host.identity is None
