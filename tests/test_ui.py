"""The merge tab: widget values -> Recipe, slider <-> text sync, the chart, and the handlers over a fake host.

The Blocks are built with the WebUI's gradio (3.41.2); the handlers run against tiny synthetic models with a host
whose lock is not re-entrant, so a handler that takes the lock twice (or Stop taking it at all) is caught.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
from pathlib import Path

import pytest
from safetensors import safe_open

from lib_merge.cli import synth
from lib_merge.core.arch import BLOCKS_26, BLOCKS_XL
from lib_merge.core.errors import MergeError
from lib_merge.core.kernels import CALC_MODES, MERGE_MODES
from lib_merge.core.weights import Presets
from lib_merge.hosts.base import GenerationResult
from lib_merge.hosts.standalone import StandaloneHost
from lib_merge.service.merge_service import MergeService
from lib_merge.ui.chart import weights_svg
from lib_merge.ui.values import (
    SD1,
    SDXL,
    adjust_to_text,
    calc_info,
    convert_block_type,
    history_table,
    pair_problem,
    recipe_from_values,
    request_from_values,
    save_options_from_values,
    sliders_to_text,
    text_to_adjust,
    text_to_sliders,
    values_from_recipe,
)

gr = pytest.importorskip("gradio")

PRESETS = Presets.load()
W26 = ",".join(f"{i / 25:.2f}" for i in range(26))
XL_IDX = [BLOCKS_26.index(b) for b in BLOCKS_XL]


def values(**kw):
    base = dict(model_a="a.safetensors", model_b="b.safetensors", model_c="c.safetensors", presets=PRESETS)
    base.update(kw)
    return base


# --------------------------------------------------------------------------------------------------------------
# recipe_from_values


def _expected_pair(mode, calc):
    """Which (mode, calc) pairs the spec allows: normal with all four; cosine/tensor/self/random with Weight sum;
    smoothAdd with Add difference; trainDifference and extract switch to Add difference by themselves."""
    if calc == "normal":
        return mode
    if calc in ("trainDifference", "extract"):
        return "Add difference"
    if calc in ("smoothAdd", "smoothAdd MT"):
        return mode if mode == "Add difference" else None
    return mode if mode == "Weight sum" else None


@pytest.mark.parametrize("calc", list(CALC_MODES))
@pytest.mark.parametrize("mode", list(MERGE_MODES))
def test_recipe_for_every_mode_and_calc(mode, calc):
    expected = _expected_pair(mode, calc)
    kw = values(mode=mode, calc=calc, alpha=0.3, beta=0.2, gamma=0.5, seed=7.0)
    if expected is None:
        with pytest.raises(MergeError, match="cannot be used with"):
            recipe_from_values(**kw)
        assert "Not possible" in calc_info(mode, calc)
        assert pair_problem(mode, calc)
        return
    r = recipe_from_values(**kw)
    assert (r.mode, r.calc, r.alpha, r.beta, r.gamma, r.seed) == (expected, calc, 0.3, 0.2, 0.5, 7)
    assert isinstance(r.seed, int)
    assert r.model_a == "a.safetensors"
    assert r.model_b == ("" if calc in ("self", "plus random") else "b.safetensors")
    assert r.model_c == ("c.safetensors" if expected in ("Add difference", "Triple sum", "sum Twice") else "")
    assert r.weights_alpha == "" and not r.mbw
    if expected != mode:
        assert "always merges as **Add difference**" in calc_info(mode, calc)


def test_mbw_off_ignores_the_weight_fields():
    r = recipe_from_values(**values(use_mbw=False, weights_alpha="not numbers", weights_beta="1,2"))
    assert r.weights_alpha == r.weights_beta == "" and r.alpha == 0.5


def test_mbw_on_takes_the_26_weights():
    r = recipe_from_values(**values(use_mbw=True, weights_alpha=W26, weights_beta=W26, mode="Triple sum"))
    assert r.mbw and r.weights_alpha == W26 and r.weights_beta == W26


def test_sdxl_block_type_gives_20_values():
    w20 = ",".join(["0.1"] * 10 + ["0.9"] * 10)
    r = recipe_from_values(**values(use_mbw=True, weights_alpha=w20, block_type=SDXL))
    assert r.weights_alpha.split(",") == ["0.1"] * 10 + ["0.9"] * 10
    with pytest.raises(MergeError, match="20 values .*SDXL layout.*block type is SD1"):
        recipe_from_values(**values(use_mbw=True, weights_alpha=w20, block_type=SD1))


def test_preset_selection_becomes_its_values():
    r = recipe_from_values(**values(use_mbw=True, weights_alpha="GRAD_V"))
    assert r.weights_alpha == PRESETS.get("GRAD_V") and len(r.weights_alpha.split(",")) == 26
    with pytest.raises(MergeError, match="Unknown preset 'NOPE'"):
        recipe_from_values(**values(use_mbw=True, weights_alpha="NOPE"))


@pytest.mark.parametrize("count", [25, 27, 19, 1])
def test_wrong_number_of_weights_is_explained(count):
    with pytest.raises(MergeError, match=f"have {count} values; give 26"):
        recipe_from_values(**values(use_mbw=True, weights_alpha=",".join(["0.5"] * count)))


def test_other_messages():
    with pytest.raises(MergeError, match="Model A is required"):
        recipe_from_values(**values(model_a=None))
    with pytest.raises(MergeError, match="Model C is required"):
        recipe_from_values(**values(model_c=None, mode="Add difference"))
    with pytest.raises(MergeError, match="MBW is on but the block weights for alpha are empty"):
        recipe_from_values(**values(use_mbw=True, weights_alpha=""))
    with pytest.raises(MergeError, match="Include is on|Include/Exclude is Include"):
        recipe_from_values(**values(inex="Include"))
    with pytest.raises(MergeError, match="Adjust needs 8"):
        recipe_from_values(**values(adjust="1,2,3"))
    with pytest.raises(MergeError, match="alpha is empty"):
        recipe_from_values(**values(alpha=None))
    with pytest.raises(MergeError, match="extract needs alpha and beta between 0 and 1"):
        recipe_from_values(**values(calc="extract", alpha=1.5))


def test_train_difference_with_weight_sum_says_it_implies_add_difference():
    with pytest.raises(MergeError) as err:
        recipe_from_values(**values(mode="Weight sum", calc="trainDifference", model_c=""))
    assert "Model C is required" in str(err.value)
    assert "trainDifference always merges as Add difference" in str(err.value)
    with pytest.raises(MergeError) as plain:  # chosen directly: nothing is implied
        recipe_from_values(**values(mode="Add difference", model_c=""))
    assert "always merges" not in str(plain.value)


def test_inex_elemental_adjust_pass_through():
    r = recipe_from_values(**values(inex="Exclude", inex_blocks=["IN01", "OUT02", "VAE"], inex_elements="attn, norm",
                                    elemental="OUT06:attn:0.5\nIN04::0.2", adjust="1,0,0,0,0,0,0,2"))
    assert r.inex == "Exclude" and r.inex_blocks == ("IN01", "OUT02", "VAE")
    assert r.inex_elements == ("attn", "norm")
    assert r.elemental == "OUT06:attn:0.5\nIN04::0.2" and r.adjust == "1,0,0,0,0,0,0,2"
    off = recipe_from_values(**values(inex="Off", inex_blocks=["IN01"], inex_elements="attn"))
    assert off.inex_blocks == () and off.inex_elements == ()


def test_values_from_recipe_round_trip():
    r = recipe_from_values(**values(mode="sum Twice", alpha=0.1, beta=0.7, use_mbw=True, weights_alpha=W26,
                                    inex="Include", inex_blocks=["M00"], inex_elements="attn", seed=3))
    back = values_from_recipe(r.to_dict())
    assert recipe_from_values(**back, presets=PRESETS) == r
    assert back["block_type"] == SD1 and back["use_mbw"] is True
    xl = recipe_from_values(**values(use_mbw=True, weights_alpha=",".join(["0.2"] * 20), block_type=SDXL))
    assert values_from_recipe(xl.to_dict())["block_type"] == SDXL


def test_save_options_and_generation_request():
    opts, flags = save_options_from_values(["prune", "Reset CLIP ids", "overwrite"], "fp16", "None")
    assert (opts.dtype, opts.prune, opts.reset_clip_ids, opts.bake_vae) == ("fp16", True, True, None)
    assert flags == {"overwrite": True, "safetensors": False, "metadata": False, "save model": False,
                     "log ratios": False}
    req = request_from_values("cat", "dog", 0, "", 0, 512.0, 0, -1.0, 2)
    assert (req.prompt, req.steps, req.width, req.height, req.seed, req.batch_size) == ("cat", 0, 512, 0, -1, 2)
    with pytest.raises(MergeError, match="multiples of 8"):
        request_from_values(width=500)
    with pytest.raises(MergeError, match="Batch size"):
        request_from_values(batch_size=-1)  # 0 is "as in txt2img"


# --------------------------------------------------------------------------------------------------------------
# slider <-> text sync and the chart


def test_sliders_to_text_and_back():
    sliders = [i / 25 for i in range(26)]
    text = sliders_to_text(sliders, SD1)
    assert text.split(",")[:3] == ["0", "0.04", "0.08"] and len(text.split(",")) == 26
    assert text_to_sliders(text, SD1, [0.5] * 26) == pytest.approx(sliders)
    xl = sliders_to_text(sliders, SDXL)
    assert xl.split(",") == [sliders_to_text(sliders, SD1).split(",")[i] for i in XL_IDX]
    # 20 values fill the SDXL sliders and keep the hidden ones
    back = text_to_sliders(",".join(["1"] * 20), SDXL, [0.5] * 26)
    assert [back[i] for i in XL_IDX] == [1.0] * 20
    assert [back[i] for i in range(26) if i not in XL_IDX] == [0.5] * 6


def test_text_to_sliders_while_typing_and_special_values():
    assert text_to_sliders("0.5,0.5,0.", SD1, [0.5] * 26) is None
    assert text_to_sliders(",".join(["x"] * 26), SD1, [0.5] * 26) is None
    r = text_to_sliders(",".join(["R"] + ["5"] * 25), SD1, [0.3] * 26)
    assert r[0] == 0.3 and r[1] == 2.0  # R keeps the slider; 5 is clamped to the slider's maximum
    assert text_to_sliders("GRAD_V", SD1, [0.5] * 26, PRESETS) == pytest.approx(
        [float(v) for v in PRESETS.get("GRAD_V").split(",")])


def test_block_type_switch_converts_the_text():
    text = ",".join(str(i) for i in range(26))
    xl = convert_block_type(text, SDXL, [0.5] * 26)
    assert xl.split(",") == [str(i) for i in XL_IDX]
    current = [float(i) for i in range(26)]
    back = convert_block_type(",".join(["9"] * 20), SD1, current)
    assert [back.split(",")[i] for i in range(26) if i not in XL_IDX] == ["10", "11", "12", "23", "24", "25"]
    assert convert_block_type("GRAD_V", SDXL, current) == "GRAD_V"


def test_adjust_sync():
    assert adjust_to_text([0] * 8) == ""
    assert adjust_to_text([1, 0, 0, 0.5, 0, 0, 0, -2]) == "1,0,0,0.5,0,0,0,-2"
    assert text_to_adjust("") == [0.0] * 8
    assert text_to_adjust("1,2,3") is None
    assert text_to_adjust("9,0,0,0,0,0,0,-20") == [6.0, 0, 0, 0, 0, 0, 0, -10.0]


def test_chart():
    svg = weights_svg(W26, "", SD1, PRESETS)
    assert svg.count("<circle") == 26 and all(f">{b}</text>" in svg for b in BLOCKS_26)
    both = weights_svg("GRAD_V", "FLAT_25", SD1, PRESETS)
    assert both.count("<circle") == 52 and ">beta</text>" in both
    xl = weights_svg(",".join(["0.3"] * 20), "", SDXL, PRESETS)
    assert xl.count("<circle") == 20 and ">IN09<" not in xl
    assert "<svg" not in weights_svg("0.1,0.2", "", SD1, PRESETS)
    assert "off" in weights_svg(W26, "", SD1, PRESETS, enabled=False)


def test_history_table():
    rows = [{"id": i, "time": "t", "name": f"m{i}", "mode": "Weight sum"} for i in range(1, 80)]
    table = history_table(rows, 50)
    assert len(table) == 50 and table[0][0] == "79" and table[-1][0] == "30"
    assert history_table([]) == [[""] * 11]


# --------------------------------------------------------------------------------------------------------------
# the Blocks and the handlers


class FakeHost(StandaloneHost):
    """A folder host with a "loaded model": load/restore/generate work, and the lock is not re-entrant."""

    generation_unavailable = None
    live_model_unavailable = None

    def __init__(self, folder: Path):
        super().__init__(folder)
        self.identity = None
        self.state: dict = {}
        self._lock = threading.Lock()
        self.requests = []
        self.jobs = []

    @contextlib.contextmanager
    def lock(self):
        if not self._lock.acquire(blocking=False):
            raise RuntimeError("the lock was taken twice")
        try:
            yield
        finally:
            self._lock.release()

    @contextlib.contextmanager
    def job(self, title):
        self.jobs.append(title)
        with super().job(title):
            yield

    def load_weights(self, state, identity):
        assert self._lock.locked(), "load_weights outside the lock"
        self.state.update(state)
        self.identity = identity

    def loaded_identity(self):
        return self.identity

    def restore_base(self):
        assert self._lock.locked()
        self.identity = None

    def generate(self, request):
        from PIL import Image

        assert self._lock.locked(), "generate outside the lock"
        self.requests.append(request)
        return GenerationResult([Image.new("RGB", (8, 8), "red")] * request.batch_size, ["merged infotext"], 42)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ui_models")
    base = synth.make_checkpoint(folder / "base.safetensors", "sd1", factor=16, seed=1)
    synth.make_checkpoint(folder / "a.safetensors", "sd1", factor=16, seed=2, base=base, noise=1.0)
    synth.make_checkpoint(folder / "b.safetensors", "sd1", factor=16, seed=3, base=base, noise=1.0)
    return folder


@pytest.fixture
def folder(model_dir, tmp_path):
    for p in model_dir.iterdir():  # hard links (the host refuses paths that resolve outside its folder)
        try:
            os.link(p, tmp_path / p.name)
        except OSError:
            shutil.copy(p, tmp_path / p.name)
    return tmp_path


def test_blocks_build_under_the_webui_gradio(folder):
    from lib_merge.ui.tab import build_tab

    assert gr.__version__ == "3.41.2", "the tab is tested with the WebUI's pinned gradio"
    tab = build_tab(MergeService(StandaloneHost(folder)))
    assert isinstance(tab, gr.Blocks)
    ids = {b.elem_id for b in tab.blocks.values() if getattr(b, "elem_id", None)}
    for label in BLOCKS_26:
        assert f"bm_w_{label}" in ids
    for name in ("bm_model_a", "bm_model_b", "bm_model_c", "bm_mode", "bm_calc", "bm_alpha", "bm_beta", "bm_use_mbw",
                 "bm_block_type", "bm_preset", "bm_weights_alpha", "bm_weights_beta", "bm_chart", "bm_elemental",
                 "bm_adjust", "bm_inex", "bm_inex_blocks", "bm_inex_elements", "bm_save_flags", "bm_save_dtype",
                 "bm_bake_vae", "bm_custom_name", "bm_gamma", "bm_seed", "bm_merge", "bm_merge_gen", "bm_generate",
                 "bm_stop", "bm_save_current", "bm_restore", "bm_save_file", "bm_merge_id", "bm_load_settings",
                 "bm_history", "bm_search", "bm_search_mode", "bm_prompt", "bm_negative", "bm_steps", "bm_sampler",
                 "bm_cfg", "bm_width", "bm_height", "bm_gen_seed", "bm_batch", "bm_message", "bm_gallery",
                 "bm_infotext", "bm_inspect_model", "bm_inspect_out"):
        assert name in ids, name
    for name in (f"bm_adj_{n}" for n in ("IN", "OUT", "OUT2", "CONT", "BRI", "COL1", "COL2", "COL3")):
        assert name in ids
    by_id = {b.elem_id: b for b in tab.blocks.values() if getattr(b, "elem_id", None)}
    assert sorted(by_id["bm_model_a"].choices) == ["a.safetensors", "b.safetensors", "base.safetensors"]
    assert (by_id["bm_alpha"].minimum, by_id["bm_alpha"].maximum, by_id["bm_alpha"].step) == (-1, 2, 0.001)
    assert (by_id["bm_alpha"].value, by_id["bm_beta"].value) == (0.5, 0.25)
    # standalone: the buttons that need a loaded model are disabled, and the reason is shown
    assert by_id["bm_merge"].interactive is False and by_id["bm_generate"].interactive is False
    assert by_id["bm_save_file"].interactive is not False
    note = by_id["bm_unavailable"].value
    assert StandaloneHost.live_model_unavailable in note and StandaloneHost.generation_unavailable in note
    # the stop button must not wait in the queue behind a running merge
    stop = next(d for d in tab.dependencies if by_id["bm_stop"]._id in d["targets"])
    assert stop["queue"] is False


def test_blocks_render_inside_another_blocks(folder):
    """The WebUI renders each extension's Blocks inside its own."""
    from lib_merge.ui.app import build_app

    app = build_app(MergeService(FakeHost(folder)))
    by_id = {b.elem_id: b for b in app.blocks.values() if getattr(b, "elem_id", None)}
    assert by_id["bm_merge"].interactive is not False and "bm_unavailable" in by_id


def test_a_fresh_page_shows_the_model_loaded_now(folder):
    """A merge made after the tab was built (through the API, say): a page opened later shows it, not the base."""
    from lib_merge.core.recipe import Recipe
    from lib_merge.ui.app import build_app

    service = MergeService(FakeHost(folder), presets=PRESETS)
    app = build_app(service)  # rendered inside another Blocks, as in the WebUI
    by_id = {b.elem_id: b for b in app.blocks.values() if getattr(b, "elem_id", None)}
    assert by_id["bm_loaded"].value == "The base checkpoint (no merge)."
    with service.host.lock():
        outcome = service.merge_and_load(Recipe("a.safetensors", "b.safetensors", alpha=0.25))
    on_load = [(i, d) for i, d in enumerate(app.dependencies)
               if d["trigger"] == "load" and not d["targets"] and by_id["bm_loaded"]._id in d["outputs"]]
    assert len(on_load) == 1, "nothing recomputes the loaded model when a page opens"
    index, dep = on_load[0]
    shown = dict(zip(dep["outputs"], app.fns[index].fn(), strict=True))
    assert shown[by_id["bm_loaded"]._id] == f"{outcome.identity.name} (recipe {outcome.identity.short_hash})"
    table = shown[by_id["bm_history"]._id]
    assert table[0][2] == outcome.identity.name  # the history table is read again too


def _handlers(host):
    from lib_merge.ui.tab import Handlers

    return Handlers(MergeService(host, presets=PRESETS))


def test_handlers_merge_generate_save_restore(folder):
    from lib_merge.ui.tab import handler_values

    host = FakeHost(folder)
    h = _handlers(host)
    v = handler_values(model_a="a.safetensors", model_b="b.safetensors", use_mbw=True, weights_alpha="GRAD_V",
                       custom_name="tabmerge", save_flags=["safetensors", "save metadata", "save model"],
                       prompt="a cat", batch_size=2, width=512)
    result = h.merge(v)
    assert "Loaded tabmerge" in result.message and "Saved" in result.message
    assert host.identity.name == "tabmerge" and host.state
    saved = folder / "tabmerge.safetensors"
    with safe_open(saved, "pt") as f:
        recipe = json.loads(f.metadata()["sd_merge_recipe"])
    assert recipe["weights_alpha"] == PRESETS.get("GRAD_V")
    assert "tabmerge" in h.loaded_model()

    gen = h.merge_and_generate(dict(v, save_flags=["safetensors"], alpha=0.2))
    assert len(gen.images) == 2 and gen.infotext == "merged infotext"
    assert host.requests[-1].prompt == "a cat" and host.requests[-1].width == 512
    assert host.requests[-1].extra_params["Merge"] == "tabmerge"

    with pytest.raises(MergeError, match="exists") as taken:
        h.save_current(dict(v, save_flags=["safetensors"]))
    assert "Custom name" in str(taken.value) and "overwrite" in str(taken.value)
    assert "--overwrite" not in str(taken.value)  # the tab's controls, not the CLI's
    assert "Saved" in h.save_current(dict(v, save_flags=["safetensors", "overwrite"])).message
    assert "Restored" in h.restore(v).message and host.identity is None
    assert host.jobs and set(host.jobs) == {"Block Merger"}


def test_save_current_then_merge_to_file_get_readable_distinct_names(folder):
    """No custom name, the same recipe saved twice (Save current merge, then Merge to file), with model names as
    the WebUI's dropdowns give them (`name [hash]`): both saves succeed, under readable, distinct names."""
    from lib_merge.ui.tab import handler_values

    host = FakeHost(folder)
    host.resolve_model = lambda title: folder / title.split(" [")[0]  # as the WebUI resolves its titles
    h = _handlers(host)
    v = handler_values(model_a="a.safetensors [0123456789]", model_b="b.safetensors [0123456789]", alpha=0.3)
    h.merge(v)
    first = h.save_current(v).message
    second = h.save_to_file(v).message
    names = [m.split("Saved ", 1)[1].split(" (", 1)[0] for m in (first, second)]
    assert names[0] != names[1]
    assert [Path(n).name for n in names] == ["ax_1-0.3_+bx0.3.safetensors", "ax_1-0.3_+bx0.3-2.safetensors"]
    assert all(Path(n).is_file() for n in names)


def test_handlers_standalone_and_load_settings(folder):
    from lib_merge.ui.tab import handler_values

    h = _handlers(StandaloneHost(folder))
    v = handler_values(model_a="a.safetensors", model_b="b.safetensors", model_c="base.safetensors",
                       mode="Add difference", calc="trainDifference", alpha=0.7, custom_name="filemerge")
    with pytest.raises(MergeError, match="No model is loaded outside the WebUI"):
        h.merge(v)
    with pytest.raises(MergeError, match="needs the Stable Diffusion WebUI"):
        h.generate(v)
    result = h.save_to_file(v)
    assert "Saved" in result.message and "merge ID 1" in result.message
    assert (folder / "filemerge.safetensors").is_file()
    merge_id, loaded = h.settings_from_id(-1)
    assert merge_id == 1  # -1 resolved: the message names the merge itself
    assert (loaded["mode"], loaded["calc"], loaded["alpha"], loaded["model_c"]) == (
        "Add difference", "trainDifference", 0.7, "base.safetensors")
    rows = h.history_rows()
    assert rows[0][0] == "1" and rows[0][4] == "trainDifference"
    assert h.history_rows("trainDifference nothing", "and") == [[""] * 11]
    assert h.history_rows("trainDifference nothing", "or")[0][0] == "1"
    with pytest.raises(MergeError, match="No merge with ID 5"):
        h.settings_from_id(5)
    assert "Architecture: SD1" in h.inspect("filemerge.safetensors")
    with pytest.raises(MergeError, match="Unknown model"):
        h.inspect("nothing.safetensors")


def test_stop_does_not_take_the_lock(folder):
    host = FakeHost(folder)
    h = _handlers(host)
    with host.lock():  # a merge is running
        done = []
        t = threading.Thread(target=lambda: done.append(h.stop()))
        t.start()
        t.join(5)
        assert done and "Stopping" in done[0]
    assert host.interrupted()


def test_errors_become_messages_not_tracebacks(folder, caplog):
    from lib_merge.ui.tab import error_message, make_action

    h = _handlers(StandaloneHost(folder))

    def boom(values):
        raise ZeroDivisionError("division by zero")

    run = make_action(h, boom)
    from lib_merge.ui.tab import handler_values

    out = run(*handler_values().values())
    assert out[0].startswith("Unexpected error (ZeroDivisionError: division by zero)")
    assert "Traceback" not in out[0]
    out = make_action(h, h.save_to_file)(*handler_values(model_a="a.safetensors", use_mbw=True,
                                                         weights_alpha=",".join(["1"] * 25)).values())
    assert out[0] == "Error: Block weights for alpha have 25 values; give 26 (BASE, IN00-IN11, M00, OUT00-OUT11), " \
                     "for SDXL 20 (BASE, IN00-IN08, M00, OUT00-OUT08) or the 110 extended SDXL weights, or for " \
                     "Flux 61 (CLIP, T5, IN, D00-D18, S00-S37, OUT)."
    assert error_message(MergeError("x")) == "Error: x"


# --------------------------------------------------------------------------------------------------------------
# the standalone app's command line


def _run_cli(*args, timeout=600):
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    return subprocess.run([sys.executable, "-m", "lib_merge", *args], cwd=root, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_ui_command_refuses_a_missing_folder(tmp_path):
    result = _run_cli("ui", "--models", str(tmp_path / "nothing"), "--data", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: Models folder {tmp_path / 'nothing'} does not exist."


def test_demo_ui_serves_the_tab(tmp_path):
    """`python -m lib_merge demo --ui` makes the demo models and serves the tab on them."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = Path(__file__).resolve().parent.parent
    log = (tmp_path / "demo.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "lib_merge", "demo", "--ui", "--keep", str(tmp_path / "demo"),
                             "--port", str(port)], cwd=root, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=dict(os.environ, GRADIO_ANALYTICS_ENABLED="False"))
    try:
        end = time.monotonic() + 600  # a hang guard only: a busy machine starts slowly
        while True:
            assert proc.poll() is None, (tmp_path / "demo.log").read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/config", timeout=2) as r:
                    config = json.loads(r.read())
                break
            except OSError:
                assert time.monotonic() < end, "the app did not start"
                time.sleep(0.5)
        ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
        assert {"bm_save_file", "bm_chart", "bm_w_OUT11", "bm_inspect"} <= ids
        names = next(c["props"]["choices"] for c in config["components"] if c["props"].get("elem_id") == "bm_model_a")
        flat = [n if isinstance(n, str) else n[0] for n in names]
        assert {"model_a.safetensors", "model_b.safetensors", "base.safetensors"} <= set(flat)
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()


def test_xyz_plot_button_runs_the_plot_under_the_lock(tmp_path):
    """The tab's plot over a host that generates: grids come back, one merge per distinct recipe."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from memory_host import MemoryHost

    from lib_merge.cli import synth
    from lib_merge.service.merge_service import MergeService
    from lib_merge.ui.tab import Handlers, handler_values

    a = synth.make_checkpoint(tmp_path / "a.safetensors", "sd1", factor=16, seed=1)
    synth.make_checkpoint(tmp_path / "b.safetensors", "sd1", factor=16, seed=2, base=a, noise=0.5)
    host = MemoryHost(tmp_path, "a.safetensors")
    handlers = Handlers(MergeService(host, log_merges=False))
    values = handler_values(model_a="a.safetensors", model_b="b.safetensors", x_type="alpha", x_values="0.2,0.8",
                            y_type="seed", y_values="1,2")
    result = handlers.plot(values)
    assert "4 of 4 cells, 2 merges, 1 grid(s)" in result.message
    assert len(result.images) == 1 and result.images[0].width > 2 * 64
    assert result.infotext and result.infotext.splitlines()[0] == "a x (1-0.5) + b x 0.5  |  X: alpha, Y: seed"
    bad = handler_values(model_a="a.safetensors", model_b="b.safetensors", x_type="alpha", x_values="0.2",
                         y_type="alpha", y_values="0.3")
    with pytest.raises(MergeError, match="used twice"):
        handlers.plot(bad)
