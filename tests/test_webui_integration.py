"""The WebUI's own pins where installed (gradio 3.41.2, fastapi 0.94.0, httpx 0.24.1): the real tab built by the entry
script over A1111Host in the fake WebUI, its handlers under the queue lock, and the API routes over HTTP."""

from __future__ import annotations

import importlib
import sys
import threading
import time

import pytest
from webui_fixture import webui_fixture  # noqa: F401  (provides the `webui` fixture)

from lib_merge.core.recipe import Recipe

RECIPE = Recipe("modelA.safetensors", "modelB.safetensors", alpha=0.3)


@pytest.fixture
def real_ui(webui, monkeypatch):
    gr = pytest.importorskip("gradio")
    if getattr(gr, "__stub__", False):
        pytest.skip("gradio is not installed")
    import lib_merge.ui

    monkeypatch.delitem(sys.modules, "lib_merge.ui.tab")
    monkeypatch.delattr(lib_merge.ui, "tab")
    return importlib.import_module("lib_merge.ui.tab")


def values(**kw):
    base = {"model_a": "modelA.safetensors", "model_b": "modelB.safetensors", "model_c": None,
            "mode": "Weight sum", "calc": "normal", "alpha": 0.3, "beta": 0.25, "use_mbw": False,
            "weights_alpha": "", "weights_beta": "", "block_type": "SD1", "elemental": "", "adjust": "",
            "inex": "Off", "inex_blocks": [], "inex_elements": [], "gamma": 0.3, "seed": -1, "save_flags": [],
            "save_dtype": "keep", "bake_vae": None, "custom_name": "", "prompt": "a cat", "negative_prompt": "",
            "steps": 0, "sampler": "", "cfg_scale": 0, "width": 0, "height": 0, "gen_seed": 3, "batch_size": 1}
    return {**base, **kw}


def test_the_real_tab_builds_over_the_webui_host(webui, real_ui):
    webui.load_entry_script()
    (blocks, title, elem_id), = webui.script_callbacks.ui_tabs_callback()
    assert type(blocks).__name__ == "Blocks" and (title, elem_id) == ("Block Merger", "block_merger")
    assert webui.call_queue.queue_lock.acquisitions == 0


def test_tab_handlers_merge_and_generate_under_the_queue_lock(webui, real_ui):
    module = webui.load_entry_script()
    handlers = real_ui.Handlers(module.EXTENSION.service())
    lock = webui.call_queue.queue_lock
    result = {}
    done = threading.Event()

    def click():
        try:
            result["out"] = handlers.merge_and_generate(values())
        finally:
            done.set()

    with lock:  # a txt2img generation is running
        t = threading.Thread(target=click)
        t.start()
        time.sleep(0.5)
        assert not done.is_set()  # the tab waits for it
    t.join(60)
    out = result["out"]
    assert "Loaded" in out.message and out.images
    assert f"Model: {RECIPE.title()}" in out.infotext and "Merge recipe: " in out.infotext
    assert webui.shared.state.begun[-1] == "Block Merger"
    assert lock.acquisitions == 2
    restored = handlers.restore(values())
    assert "Restored" in restored.message and module.EXTENSION.host.loaded_identity() is None


def test_api_routes_over_http(webui):
    fastapi = pytest.importorskip("fastapi")
    if getattr(fastapi, "__stub__", False):
        pytest.skip("fastapi is not installed")
    testclient = pytest.importorskip("fastapi.testclient")
    webui.load_entry_script()
    webui.shared.cmd_opts.api = True
    app = fastapi.FastAPI()
    webui.script_callbacks.app_started_callback(None, app)
    client = testclient.TestClient(app)
    r = client.post("/block-merger/merge", json={"recipe": RECIPE.to_dict(), "name": "over http"})
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "over http"
    r = client.post("/block-merger/merge", json={"model_a": "modelA.safetensors", "mode": "Add difference",
                                                 "model_b": "modelB.safetensors"})
    assert r.status_code == 400 and "Model C is required" in r.json()["detail"]
    r = client.get("/block-merger/history", params={"limit": 5})
    assert r.status_code == 200 and [row["name"] for row in r.json()["rows"]] == ["over http"]
    assert client.get("/block-merger/presets").json()["presets"]
    r = client.post("/block-merger/restore")
    assert r.status_code == 200 and r.json()["message"].startswith("Restored")
