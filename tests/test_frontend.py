"""The tab's front-end files (javascript/block_merger.js, style.css) against the tab they serve, without a browser:
every hint names an element (or an option) the tab really has and every control has a hint, so the hints cannot go
stale; every style rule stays inside the tab; the standalone app serves both files; and the question before "Merge
to file" replaces a file is asked exactly when it would replace one. The browser side is in test_browser.py."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from lib_merge.cli import synth
from lib_merge.core.arch import BLOCKS_26
from lib_merge.core.kernels import CALC_MODES, MERGE_MODES
from lib_merge.hosts.standalone import StandaloneHost
from lib_merge.service.merge_service import MergeService

gr = pytest.importorskip("gradio")

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "javascript" / "block_merger.js"
STYLE = ROOT / "style.css"
#: hidden helpers of "Merge to file" (nothing to hover), not controls; Markdown notes are text, not controls
HIDDEN = {"bm_overwrite_target", "bm_overwrite_ok", "bm_txt2img_live", "bm_lora_prompt"}


def js_object(name: str) -> dict:
    """The `const name = {...};` literal of the page script (written as JSON so that it can be read here)."""
    found = re.search(r"const " + name + r" = (\{.*?\n    \});", SCRIPT.read_text(encoding="utf-8"), re.S)
    assert found, f"{name} not found in {SCRIPT}"
    return json.loads(found.group(1))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("frontend_models")
    base = synth.make_checkpoint(folder / "base.safetensors", "sd1", factor=16, seed=1)
    synth.make_checkpoint(folder / "a.safetensors", "sd1", factor=16, seed=2, base=base, noise=1.0)
    return folder


@pytest.fixture
def folder(model_dir, tmp_path):
    for p in model_dir.iterdir():
        try:
            os.link(p, tmp_path / p.name)
        except OSError:
            shutil.copy(p, tmp_path / p.name)
    return tmp_path


@pytest.fixture(scope="module")
def components(model_dir):
    """The built tab's components by elem_id."""
    from lib_merge.ui.tab import build_tab

    tab = build_tab(MergeService(StandaloneHost(model_dir)))
    return {b.elem_id: b for b in tab.blocks.values() if getattr(b, "elem_id", None)}


def test_every_hint_names_an_element_of_the_tab(components):
    titles = js_object("blockMergerTitles")
    missing = sorted(set(titles) - set(components))
    assert not missing, f"hints for elements the tab does not have: {missing}"
    assert all(isinstance(text, str) and len(text) > 10 for text in titles.values())
    # the formulas of the merge modes are the ones the engine documents
    options = js_object("blockMergerOptionTitles")
    assert options["bm_mode"]["Weight sum"] == "A*(1-alpha)+B*alpha"
    assert options["bm_mode"]["Add difference"].startswith("A+(B-C)*alpha")
    for elem_id, hints in options.items():
        assert elem_id in components, elem_id
        choices = {value for _, value in components[elem_id].choices}
        assert set(hints) <= choices, f"{elem_id}: hints for options it does not offer: {set(hints) - choices}"
    assert set(options["bm_mode"]) == set(MERGE_MODES)
    assert set(options["bm_calc"]) == set(CALC_MODES)


def test_every_control_has_a_hint(components):
    titles = js_object("blockMergerTitles")
    controls = {elem_id for elem_id, c in components.items()
                if elem_id.startswith("bm_") and elem_id not in HIDDEN
                and isinstance(c, gr.components.IOComponent | gr.Button) and not isinstance(c, gr.Markdown)}
    assert {f"bm_w_{label}" for label in BLOCKS_26} <= controls
    assert "bm_save_file" in controls and "bm_alpha" in controls
    assert not sorted(controls - set(titles)), f"controls without a hint: {sorted(controls - set(titles))}"


def test_style_is_scoped_to_the_tab(components):
    from lib_merge.ui.tab import ROOT_ID

    # the root is the WebUI's container of the tab: "tab_" + the elem_id the host registers the tab under
    tree = ast.parse((ROOT / "lib_merge" / "hosts" / "a1111.py").read_text(encoding="utf-8"))
    tab_id = next(ast.literal_eval(node.value.elts[1]) for node in tree.body  # TAB = (title, elem_id)
                  if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "TAB")
    assert ROOT_ID == f"tab_{tab_id}"

    css = re.sub(r"/\*.*?\*/", "", STYLE.read_text(encoding="utf-8"), flags=re.S)
    selectors = [s.strip() for head in re.findall(r"([^{}]+)\{", css) for s in head.split(",")]
    assert len(selectors) > 40
    outside = [s for s in selectors if not s.startswith(f"#{ROOT_ID} ")]
    assert not outside, f"rules that reach outside the tab: {outside}"
    unknown = sorted({i for s in selectors for i in re.findall(r"#(bm_\w+)", s)} - set(components))
    assert not unknown, f"style.css names elements the tab does not have: {unknown}"
    for label in BLOCKS_26:  # every block slider has its place in the U
        assert re.search(rf"#bm_w_{label} \{{ grid-area: {label}; \}}", css), label


def test_the_standalone_app_serves_the_front_end_files(folder):
    from lib_merge.ui.app import build_app, build_service
    from lib_merge.ui.tab import ROOT_ID, js_event

    app = build_app(build_service(folder, folder / "data"))
    assert STYLE.read_text(encoding="utf-8") in app.css
    loads = [d for d in app.dependencies if d.get("trigger") == "load" and d.get("js")]
    assert len(loads) == 1 and SCRIPT.read_text(encoding="utf-8") in loads[0]["js"]
    assert loads[0]["js"].startswith("() => {")
    ids = {b.elem_id for b in app.blocks.values() if getattr(b, "elem_id", None)}
    assert ROOT_ID in ids
    # gradio 3 calls the page-side function of an event `_js`, gradio 4 `js`
    assert js_event("() => 1") == ({"_js": "() => 1"} if gr.__version__.startswith("3.") else {"js": "() => 1"})


def test_overwrite_is_asked_only_when_a_file_would_be_replaced(folder):
    from lib_merge.ui import values as uv
    from lib_merge.ui.tab import Handlers, handler_values

    h = Handlers(MergeService(StandaloneHost(folder)))
    flags = [*uv.DEFAULT_SAVE_FLAGS, "overwrite"]
    v = dict(model_a="a.safetensors", model_b="base.safetensors", custom_name="again")
    assert h.overwrite_target(handler_values(**v, save_flags=flags)) == ""  # nothing there yet
    h.save_to_file(handler_values(**v))
    target = folder / "again.safetensors"
    assert target.is_file()
    assert h.overwrite_target(handler_values(**v, save_flags=flags)) == str(target)
    # without "overwrite" the merge refuses by itself: nothing to ask
    assert h.overwrite_target(handler_values(**v)) == ""
    # .ckpt when safetensors is off: another file, not there
    assert h.overwrite_target(handler_values(**v, save_flags=["overwrite"])) == ""
    # the name made from the recipe, when no custom name is given
    auto = h.save_to_file(handler_values(model_a="a.safetensors", model_b="base.safetensors"))
    path = Path(auto.message.split("Saved ", 1)[1].split(" (", 1)[0])
    assert path.is_file()
    # a name made from the recipe never replaces a file (the next free `name-2` is taken): nothing to ask
    assert h.overwrite_target(handler_values(model_a="a.safetensors", model_b="base.safetensors",
                                             save_flags=flags)) == ""
