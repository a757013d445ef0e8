"""scripts/block_merger.py loaded as the WebUI loads it, against the fake WebUI: every registration, the txt2img
hook (merges only when the requested recipe differs, never takes the queue lock) and the API routes (take it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch
from fakes.stubs import FakeApp
from webui_fixture import FAKES, ROOT, webui_fixture  # noqa: F401  (provides the `webui` fixture)

from lib_merge.core.recipe import Recipe
from lib_merge.hosts.base import GenerationRequest
from lib_merge.io.hashes import HashCache
from lib_merge.service.merge_service import INFOTEXT_FAILED, INFOTEXT_MERGE, INFOTEXT_RECIPE, MergeService

RECIPE = Recipe("modelA.safetensors", "modelB.safetensors", alpha=0.3)
UNET = "model.diffusion_model.input_blocks.1.1.proj_in.weight"


@pytest.fixture
def entry(webui):
    """The entry script loaded by the fake's load_scripts, settings registered, txt2img runner set up."""
    module = webui.load_entry_script()
    webui.script_callbacks.ui_settings_callback()
    webui.runner.initialize_scripts(is_img2img=False)
    webui.runner.setup_ui()
    return module


def routes(webui):
    """The routes as the WebUI started with `--api` serves them (without it, there are none)."""
    webui.shared.cmd_opts.api = True
    app = FakeApp()
    webui.script_callbacks.app_started_callback(None, app)
    return app.routes


# -- registration -----------------------------------------------------------------------------------------------


def test_every_registration(webui, entry):
    cb = webui.script_callbacks.callback_map
    assert [c.script for c in cb["callbacks_ui_tabs"]] == ["block_merger.py"]
    assert len(cb["callbacks_ui_settings"]) == 1 and len(cb["callbacks_app_started"]) == 1
    assert len(cb["callbacks_script_unloaded"]) == 1 and len(cb["callbacks_model_loaded"]) == 1

    ours = [d for d in webui.scripts.scripts_data if d.path.endswith("block_merger.py")]
    assert [d.script_class.__name__ for d in ours] == ["BlockMergerScript"]  # no stray base Script registered
    assert ours[0].basedir == str(ROOT) and ours[0].module.__name__ == "block_merger.py"
    assert "block_merger.py" not in sys.modules
    assert str(ROOT) not in sys.path[:1]  # the loader put sys.path back

    labels = webui.shared.opts.data_labels
    keys = ["block_merger_merge_device", "block_merger_threads", "block_merger_keep_models",
            "block_merger_history_file"]
    assert all(labels[k].section == ("block_merger", "Block Merger") for k in keys)
    assert all(labels[k].category_id == "sd" for k in keys)  # v1.10.1: not under "Uncategorized"
    assert labels["block_merger_merge_device"].component_args == {"choices": ["cpu", "cuda"]}

    script = webui.runner.alwayson_scripts[0]
    assert script.title() == "Block Merger" and script.args_to - script.args_from == 1
    img2img = webui.scripts.ScriptRunner()
    img2img.initialize_scripts(is_img2img=True)
    assert img2img.scripts == []
    field, key = script.infotext_fields[0]
    assert key({INFOTEXT_RECIPE: "{}"}) == "{}" and key({}) == ""  # pasting a plain image clears it

    tabs = webui.script_callbacks.ui_tabs_callback()
    assert [(title, elem) for _, title, elem in tabs] == [("Block Merger", "block_merger")]
    service = webui.ui.built[0]
    assert isinstance(service, MergeService) and type(service.host).__name__ == "A1111Host"
    assert webui.call_queue.queue_lock.acquisitions == 0  # building the tab takes no lock

    assert set(routes(webui)) == {("GET", "/block-merger/presets"), ("POST", "/block-merger/merge"),
                                  ("POST", "/block-merger/restore"), ("GET", "/block-merger/history"),
                                  *(("POST", f"/block-merger/lora/{p}") for p in ("bake-loaded", "bake", "merge",
                                                                                  "extract", "diff")),
                                  ("GET", "/block-merger/lora/inspect"), ("GET", "/block-merger/lora/list")}


def test_one_service_per_process(webui, entry):
    webui.script_callbacks.ui_tabs_callback()
    webui.script_callbacks.ui_tabs_callback()
    assert webui.ui.built[0] is webui.ui.built[1] is entry.EXTENSION.service()


def test_settings_reach_the_service(webui, entry):
    opts = webui.shared.opts
    service = entry.EXTENSION.service()
    assert service.threads is None and service.keep_models == 3
    opts.block_merger_threads = 4
    opts.block_merger_keep_models = 1
    opts.block_merger_history_file = str(webui.tmp / "log" / "merges.csv")
    opts.block_merger_merge_device = "cuda"
    service = entry.EXTENSION.service()
    assert service.threads == 4 and service.keep_models == 1 and service.device == "cuda"
    if not torch.cuda.is_available():
        with pytest.raises(Exception) as err:
            routes(webui)[("POST", "/block-merger/merge")](RECIPE.to_dict())
        assert err.value.status_code == 400 and "needs a CUDA GPU" in err.value.detail
    opts.block_merger_merge_device = "cpu"
    routes(webui)[("POST", "/block-merger/merge")](RECIPE.to_dict())
    assert (webui.tmp / "log" / "merges.csv").is_file()


def test_entry_script_imports_lib_merge_only_while_the_loader_allows(tmp_path):
    """In a fresh interpreter whose sys.path lacks the extension root (as in the WebUI), the script's top-level
    import works during loading and the tab callback's lazy `from lib_merge.ui.tab import build_tab` works
    afterwards."""
    code = f"""
import sys, types
sys.path = [p for p in sys.path if p not in ('', {str(ROOT)!r}, {os.getcwd()!r})]
sys.path.insert(0, {str(FAKES)!r})
sys.path.insert(0, {str(FAKES.parent)!r})
from fakes import stubs
sys.modules['gradio'] = stubs.make_gradio()
try:
    import lib_merge
    raise SystemExit('lib_merge importable before loading')
except ImportError:
    pass
from modules import scripts, script_callbacks
scripts.load_scripts([({str(ROOT / 'scripts' / 'block_merger.py')!r}, {str(ROOT)!r})])
assert {str(ROOT)!r} not in sys.path
import lib_merge.core.recipe  # a submodule resolves through the package after loading
ui = types.ModuleType('lib_merge.ui.tab'); ui.build_tab = lambda service: 'blocks'
sys.modules['lib_merge.ui.tab'] = ui
print(script_callbacks.ui_tabs_callback())
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "[('blocks', 'Block Merger', 'block_merger')]" in out.stdout


# -- the txt2img hook -------------------------------------------------------------------------------------------


def test_txt2img_recipe_merges_only_when_it_differs(webui, entry):
    base = webui.txt2img().images[0].tobytes()
    first = webui.txt2img(script_args=[RECIPE.to_json()])
    identity = entry.EXTENSION.host.loaded_identity()
    assert identity is not None and identity.name == RECIPE.title()
    assert first.images[0].tobytes() != base
    model_undos = webui.sd_hijack.model_hijack.undos
    again = webui.txt2img(script_args=[RECIPE.to_json()])  # the same recipe: no merge
    assert webui.sd_hijack.model_hijack.undos == model_undos
    assert entry.EXTENSION.host.loaded_identity() is identity
    assert again.images[0].tobytes() == first.images[0].tobytes()
    other = Recipe("modelA.safetensors", "modelB.safetensors", alpha=0.7)
    webui.shared.state.begin(job="txt2img")  # as wrap_gradio_gpu_call does: job_count -1, processing sets it
    third = webui.txt2img(script_args=[json.dumps({"recipe": other.to_dict()})])
    assert webui.sd_hijack.model_hijack.undos > model_undos
    assert f"Model: {other.title()}" in third.infotexts[0]
    assert third.images[0].tobytes() != first.images[0].tobytes()
    assert (webui.shared.state.job_count, webui.shared.state.textinfo) == (1, None)  # processing's own counts


def test_txt2img_infotext_carries_the_merge_even_without_a_request(webui, entry):
    routes(webui)[("POST", "/block-merger/merge")](RECIPE.to_dict())  # the user's own merge
    processed = webui.txt2img(script_args=[""])
    info = processed.infotexts[0]
    assert f"Model: {RECIPE.title()}" in info
    assert f"{INFOTEXT_MERGE}: " in info and f"{INFOTEXT_RECIPE}: " in info
    assert json.loads(processed.extra_generation_params[INFOTEXT_RECIPE])["alpha"] == 0.3


def test_a_requested_merge_is_transient_and_the_users_choice_comes_back(webui, entry):
    base = webui.txt2img(script_args=[""]).images[0].tobytes()
    requested = webui.txt2img(script_args=[RECIPE.to_json()])
    assert requested.images[0].tobytes() != base
    plain = webui.txt2img(script_args=[""])  # no request, nothing chosen by the user: the base comes back
    assert plain.images[0].tobytes() == base and INFOTEXT_MERGE not in plain.infotexts[0]
    assert entry.EXTENSION.host.loaded_identity() is None

    mine = Recipe("modelA.safetensors", "modelC.safetensors", alpha=0.6)
    routes(webui)[("POST", "/block-merger/merge")](mine.to_dict())  # the user's choice
    chosen = webui.txt2img(script_args=[""]).images[0].tobytes()
    webui.txt2img(script_args=[RECIPE.to_json()])
    back = webui.txt2img(script_args=[""])
    assert back.images[0].tobytes() == chosen and f"Model: {mine.title()}" in back.infotexts[0]


def test_choosing_another_checkpoint_replaces_the_users_merge(webui, entry):
    """After a merge, the user picks a checkpoint in the WebUI: generations use that checkpoint, not the merge."""
    routes(webui)[("POST", "/block-merger/merge")](RECIPE.to_dict())
    webui.shared.opts.sd_model_checkpoint = "modelC.safetensors"
    webui.sd_models.reload_model_weights()  # what the checkpoint dropdown does
    c_weights = webui.live()
    processed = webui.txt2img(script_args=[""])
    assert "Model: modelC" in processed.infotexts[0] and INFOTEXT_MERGE not in processed.infotexts[0]
    assert all(torch.equal(v, c_weights[k]) for k, v in webui.live().items())
    assert entry.EXTENSION.service().committed() is None


def test_a_plain_generation_has_no_merge_in_its_infotext(webui, entry):
    info = webui.txt2img(script_args=[""]).infotexts[0]
    assert INFOTEXT_MERGE not in info and "Model: modelA" in info


def test_a_recipe_set_on_p_by_another_script_is_honoured(webui, entry):
    p = webui.processing.StableDiffusionProcessingTxt2Img(prompt="x", seed=1, do_not_save_samples=True)
    p.scripts, p.script_args = webui.runner, [None, ""]
    p.block_merger_recipe = RECIPE.to_json()
    webui.processing.process_images(p)
    assert entry.EXTENSION.host.loaded_identity().name == RECIPE.title()


@pytest.mark.parametrize("request_text, reason", [
    (Recipe("modelA.safetensors", "modelB.safetensors", mode="Add difference").to_json(), "Model C is required"),
    ("{not json", "not valid JSON"),
    (Recipe("modelA.safetensors", "nosuch.safetensors").to_json(), "Unknown model 'nosuch.safetensors'"),
])
def test_a_bad_requested_recipe_is_reported_in_the_infotext(webui, entry, request_text, reason):
    """The WebUI's runner swallows a script's exception and generates anyway (the API answers 200): the infotext
    must say that the merge was not applied, and why; the model stays as it was."""
    before = webui.live()
    processed = webui.txt2img(script_args=[request_text])
    info = processed.infotexts[0]
    assert f"{INFOTEXT_FAILED}: " in info and reason in info
    assert INFOTEXT_MERGE + ":" not in info.replace(INFOTEXT_FAILED, "")  # no merge is loaded, none is claimed
    assert processed.extra_generation_params[INFOTEXT_FAILED].startswith("the merge was not applied")
    assert all(torch.equal(v, before[k]) for k, v in webui.live().items())
    assert webui.runner.reported == []  # handled, not an error trace in the console


def test_the_script_hook_never_takes_the_queue_lock(webui, entry):
    """txt2img runs under the queue lock; the hook merging inside it must not take it again (the fake's lock
    raises on re-entry, where the WebUI's would hang)."""
    lock = webui.call_queue.queue_lock
    result = {}

    def generate():
        with lock:  # what wrap_gradio_gpu_call does around txt2img
            try:
                result["processed"] = webui.txt2img(script_args=[RECIPE.to_json()])
            except BaseException as e:  # noqa: BLE001 - reported below
                result["error"] = e

    t = threading.Thread(target=generate)
    t.start()
    t.join(60)
    assert not t.is_alive() and "error" not in result, result.get("error")
    assert entry.EXTENSION.host.loaded_identity() is not None


def test_a_stop_during_the_hook_merge_cancels_it_and_keeps_the_model(webui, entry):
    before = webui.live()
    webui.shared.state.interrupted = True
    processed = webui.txt2img(script_args=[RECIPE.to_json()])
    assert "cancelled" in processed.extra_generation_params[INFOTEXT_FAILED]
    assert all(torch.equal(v, before[k]) for k, v in webui.live().items())


def test_the_finite_memory_is_kept_in_the_webuis_data_folder(webui, entry):
    """The first merge checks every piece of B for inf/NaN and remembers the file as finite: in the WebUI's data
    folder, so that the first merge after a restart does not check it again."""
    entry.EXTENSION.service().merge_and_load(RECIPE)
    cache = webui.tmp / "block_merger_hashes.json"  # the fixture's data folder
    assert HashCache(cache).all_finite(webui.b)  # a new cache object reads it from the file, as after a restart
    assert not (ROOT / "block_merger_hashes.json").exists()


# -- the empty-prompt conditioning (read by the WebUI only under "Pad prompt/negative prompt") --------------------

TEXT_ONLY = Recipe("modelA.safetensors", "modelB.safetensors", weights_alpha="1" + ",0" * 25)
OUT11_TOO = Recipe("modelA.safetensors", "modelB.safetensors", weights_alpha="1" + ",0" * 24 + ",0.5")
STALE = "block_merger_empty_prompt_stale"


def empty_prompt_now(webui):
    """What the WebUI's load computes for the model's current text encoder (sd_models.get_empty_cond, hijacked)."""
    return webui.sd_models.get_empty_cond(webui.shared.sd_model)


def test_padding_off_defers_the_empty_prompt_until_padding_is_switched_on(webui, entry):
    m = webui.shared.sd_model
    at_load = m.cond_stage_model_empty_prompt
    assert at_load == empty_prompt_now(webui)
    service = entry.EXTENSION.service()
    service.merge_and_load(TEXT_ONLY)
    assert getattr(m, STALE) and m.cond_stage_model_empty_prompt == at_load  # not computed: nothing reads it
    assert webui.shared.opts.set("pad_cond_uncond", True)  # the settings page and /sdapi/v1/options run onchange
    merged = m.cond_stage_model_empty_prompt
    assert not getattr(m, STALE) and merged == empty_prompt_now(webui) != at_load
    webui.shared.opts.set("pad_cond_uncond", False)
    assert service.merge_and_load(OUT11_TOO).recomputed < 100  # only OUT11 written: the text encoder is as it was
    assert not getattr(m, STALE) and m.cond_stage_model_empty_prompt == merged


def test_padding_on_computes_the_empty_prompt_with_the_merge(webui, entry):
    m = webui.shared.sd_model
    at_load = m.cond_stage_model_empty_prompt
    webui.shared.opts.set("pad_cond_uncond", True)
    entry.EXTENSION.service().merge_and_load(TEXT_ONLY)
    assert not getattr(m, STALE) and m.cond_stage_model_empty_prompt == empty_prompt_now(webui) != at_load


def test_a_generation_that_pads_through_its_overrides_gets_the_current_empty_prompt(webui, entry):
    m = webui.shared.sd_model
    at_load = m.cond_stage_model_empty_prompt
    entry.EXTENSION.service().merge_and_load(TEXT_ONLY)
    padded = webui.txt2img(script_args=[""], override_settings={"pad_cond_uncond": True})
    assert m.cond_stage_model_empty_prompt == empty_prompt_now(webui) != at_load
    assert webui.shared.opts.pad_cond_uncond is False  # the override was for that request only
    # the image depends on the empty prompt (the fake pads with it): the stale one would have given another
    m.cond_stage_model_empty_prompt = at_load
    stale = webui.txt2img(script_args=[""], override_settings={"pad_cond_uncond": True})
    assert padded.images[0].tobytes() != stale.images[0].tobytes()


def test_the_tabs_generation_pads_with_the_current_empty_prompt(webui, entry):
    m = webui.shared.sd_model
    entry.EXTENSION.service().merge_and_load(TEXT_ONLY)
    webui.shared.opts.data["pad_cond_uncond"] = True  # set without onchange (a settings file edited by hand)
    assert getattr(m, STALE)
    entry.EXTENSION.service().generate(GenerationRequest(prompt="a cat", steps=2, seed=3))
    assert not getattr(m, STALE) and m.cond_stage_model_empty_prompt == empty_prompt_now(webui)


def test_restore_gives_back_the_bases_empty_prompt(webui, entry):
    m = webui.shared.sd_model
    at_load = m.cond_stage_model_empty_prompt
    service = entry.EXTENSION.service()
    webui.shared.opts.set("pad_cond_uncond", True)
    service.merge_and_load(TEXT_ONLY)
    assert m.cond_stage_model_empty_prompt != at_load
    service.restore_base()  # in place: the text encoder written back, its empty prompt computed (padding is on)
    assert webui.shared.sd_model.cond_stage_model_empty_prompt == at_load


def test_the_reload_restore_marks_the_empty_prompt_it_keeps(webui, entry):
    """The fallback restore is the WebUI's forced reload, which keeps the merge's empty prompt: it is marked."""
    m = webui.shared.sd_model
    at_load = m.cond_stage_model_empty_prompt
    webui.shared.opts.set("pad_cond_uncond", True)
    entry.EXTENSION.service().merge_and_load(TEXT_ONLY)
    webui.shared.opts.set("pad_cond_uncond", False)
    entry.EXTENSION.host.restore_base()
    assert webui.shared.sd_model is m and getattr(m, STALE) and m.cond_stage_model_empty_prompt != at_load
    webui.shared.opts.set("pad_cond_uncond", True)
    assert m.cond_stage_model_empty_prompt == at_load


def test_closing_unchains_the_padding_watch(webui, entry):
    label = webui.shared.opts.data_labels["pad_cond_uncond"]
    assert label.onchange is not None
    webui.script_callbacks.script_unloaded_callback()
    assert label.onchange is None


# -- API --------------------------------------------------------------------------------------------------------


def test_api_merge_restore_history_presets(webui, entry):
    r = routes(webui)
    out = r[("POST", "/block-merger/merge")]({"recipe": RECIPE.to_dict(), "name": "api merge"})
    assert out["name"] == "api merge" and len(out["hash"]) == 10 and out["message"].startswith("Loaded api merge")
    assert out["recipe"]["model_b"] == "modelB.safetensors" and out["history_id"] == 1
    assert webui.shared.sd_model.sd_checkpoint_info.name_for_extra == "api merge"
    assert webui.shared.state.begun[-1] == "Block Merger: merge"
    history = r[("GET", "/block-merger/history")]()
    assert [row["name"] for row in history["rows"]] == ["api merge"]
    assert r[("GET", "/block-merger/history")](search="nothing-like-this")["rows"] == []
    restored = r[("POST", "/block-merger/restore")]()
    assert restored["message"].startswith("Restored modelA.safetensors")
    assert entry.EXTENSION.host.loaded_identity() is None
    presets = r[("GET", "/block-merger/presets")]()["presets"]
    assert presets and all(isinstance(v, str) for v in presets.values())
    assert webui.call_queue.queue_lock.acquisitions == 2  # merge and restore


@pytest.mark.parametrize("body, message", [
    ({"model_a": "modelA.safetensors", "model_b": "modelB.safetensors", "mode": "Add difference"},
     "Model C is required"),
    ({"recipe": "{broken"}, "not valid JSON"),
    ({"model_a": "nosuch.safetensors", "model_b": "modelB.safetensors"}, "nosuch"),
    ({"alpha": 0.5}, "model A"),
    ({"model_a": "modelA.safetensors", "colour": "red"}, "unknown fields"),
])
def test_api_errors_are_http_400_with_the_message(webui, entry, body, message):
    before = webui.live()
    with pytest.raises(Exception) as err:
        routes(webui)[("POST", "/block-merger/merge")](body)
    assert err.value.status_code == 400 and message in err.value.detail
    assert all(torch.equal(v, before[k]) for k, v in webui.live().items())
    assert not webui.call_queue.queue_lock.locked()


def test_api_merge_waits_for_a_running_generation(webui, entry):
    """The API handler takes the queue lock: while a generation holds it, the merge waits."""
    lock = webui.call_queue.queue_lock
    merge = routes(webui)[("POST", "/block-merger/merge")]
    done = threading.Event()
    result = {}

    def call():
        try:
            result["out"] = merge(RECIPE.to_dict())
        finally:
            done.set()

    lock.acquire()
    try:
        t = threading.Thread(target=call)
        t.start()
        time.sleep(0.5)
        assert not done.is_set()  # blocked on the lock
        assert entry.EXTENSION.host.loaded_identity() is None
    finally:
        lock.release()
    t.join(60)
    assert done.is_set() and result["out"]["name"] == RECIPE.title()


def test_api_merge_from_inside_a_generation_would_deadlock(webui, entry):
    """Proof that the API handler takes the lock: called by a thread that holds it, the fake lock refuses."""
    with webui.call_queue.queue_lock:
        with pytest.raises(RuntimeError, match="deadlock"):
            routes(webui)[("POST", "/block-merger/restore")]()


def test_script_unloaded_closes_the_service(webui, entry):
    service = entry.EXTENSION.service()
    service.merge_and_load(RECIPE)
    assert service._open
    webui.script_callbacks.script_unloaded_callback()
    assert not service._open


# -- install.py -------------------------------------------------------------------------------------------------


def run_install(tmp_path, missing=()):
    fake = tmp_path / "launcher"
    fake.mkdir(exist_ok=True)
    (fake / "launch.py").write_text(
        "import json, os\n"
        f"MISSING = {list(missing)!r}\n"
        "calls = []\n"
        "def is_installed(package):\n"
        "    calls.append(['is_installed', package])\n"
        "    return package not in MISSING\n"
        "def run_pip(command, desc=None, live=False):\n"
        "    calls.append(['run_pip', command, desc])\n"
        "import atexit\n"
        "atexit.register(lambda: print(json.dumps(calls)))\n")
    env = {**os.environ, "PYTHONPATH": str(fake)}
    out = subprocess.run([sys.executable, str(ROOT / "install.py")], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_install_does_nothing_when_the_webui_has_everything(tmp_path):
    calls = run_install(tmp_path)
    assert calls and all(c[0] == "is_installed" for c in calls)
    assert "torch" not in [c[1] for c in calls]  # the WebUI's own torch build is never touched


def test_install_installs_only_what_is_missing_with_our_ranges(tmp_path):
    calls = run_install(tmp_path, missing=["scipy"])
    pips = [c for c in calls if c[0] == "run_pip"]
    assert len(pips) == 1 and "scipy>=1.10" in pips[0][1] and "==" not in pips[0][1]
