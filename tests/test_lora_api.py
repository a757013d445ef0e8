"""The LoRA API routes (issue 14): bake into the loaded model, bake to a file, merge, extract, inspect, list, through
the routes the entry script registers on the fake WebUI; errors are HTTP 400 with the one-line message, nothing
written and the model unchanged; every operation leaves a history row."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_rounded
from safetensors.torch import load_file
from test_entry_script import routes
from test_lora_live import expect, loras_fixture  # noqa: F401  (the `loras` fixture)
from webui_fixture import webui_fixture  # noqa: F401  (provides the `webui` fixture)


@pytest.fixture(name="entry")
def entry_fixture(webui):
    """The entry script loaded and set up as test_entry_script's `entry` fixture does."""
    import test_entry_script

    return test_entry_script.entry.__wrapped__(webui)


def test_bake_into_the_loaded_model_through_the_api(webui, entry, loras):
    before = webui.live()
    out = routes(webui)[("POST", "/block-merger/lora/bake-loaded")]({"loras": ["style:0.7"], "name": "styled"})
    assert out["name"] == "styled" and len(out["hash"]) == 10 and out["history_id"] == 1
    assert out["recipe"]["loras"][0]["ratio"] == 0.7 and out["recipe"]["merge"] is None
    live = webui.live()
    for key, value in expect(before, loras["style"], 0.7).items():
        assert_rounded(live[key], value, before[key].dtype, what=key)
    assert webui.shared.state.begun[-1] == "Block Merger: LoRA bake"
    assert webui.call_queue.queue_lock.acquisitions == 1
    rows = routes(webui)[("GET", "/block-merger/history")]()["rows"]
    assert [r["mode"] for r in rows] == ["LoRA bake"]
    routes(webui)[("POST", "/block-merger/restore")]()
    assert all(torch.equal(v, before[k]) for k, v in webui.live().items())


def test_file_tools_through_the_api_each_with_a_history_row(webui, entry, loras):
    r = routes(webui)
    base = load_file(webui.a)
    baked = r[("POST", "/block-merger/lora/bake")]({"model": "modelA.safetensors", "loras": "style:0.5",
                                                    "name": "modelA-style"})
    assert baked["path"] == str(webui.folder / "modelA-style.safetensors")
    state = load_file(baked["path"])
    for key, value in expect(base, loras["style"], 0.5).items():
        assert_rounded(state[key], value, base[key].dtype, what=key)
    merged = r[("POST", "/block-merger/lora/merge")]({"loras": ["style:1", "detail:0.5"], "name": "both",
                                                      "save_dtype": "fp32"})
    lora_dir = webui.tmp / "Lora"
    assert merged["path"] == str(lora_dir / "both.safetensors") and merged["ranks"] == [4, 6]
    extracted = r[("POST", "/block-merger/lora/extract")]({"model_a": "modelA-style.safetensors",
                                                           "model_b": "modelA.safetensors", "name": "back",
                                                           "rank": 8})
    assert extracted["path"] == str(lora_dir / "back.safetensors") and extracted["text_encoder"] is True
    text = r[("GET", "/block-merger/lora/inspect")](name="back")["text"]
    assert "Type: LoRA" in text and "SD1" in text
    listed = {e["name"]: e for e in r[("GET", "/block-merger/lora/list")]()["loras"]}
    assert set(listed) == {"style.safetensors", "detail.safetensors", "both.safetensors", "back.safetensors"}
    assert listed["detail.safetensors"]["ranks"] == [2] and listed["style.safetensors"]["type"] == "LoRA"
    sdxl = [e["name"] for e in r[("GET", "/block-merger/lora/list")](family="SDXL")["loras"]]
    assert sdxl == sorted(n for n, e in listed.items() if "sdxl" in e["families"])  # tiny shapes fit several
    assert r[("GET", "/block-merger/lora/list")](kind="LyCORIS")["loras"] == []
    rows = r[("GET", "/block-merger/history")]()["rows"]
    assert [row["mode"] for row in rows] == ["LoRA bake", "LoRA merge", "LoRA extract"]
    assert webui.call_queue.queue_lock.acquisitions == 0  # file tools leave the loaded model alone


@pytest.mark.parametrize("route, body, message", [
    ("bake-loaded", {"loras": "style:abc"}, "'abc' is not a number"),
    ("bake-loaded", {"loras": "style:1:NOPE"}, "unknown block-weight preset 'NOPE'"),
    ("bake-loaded", {"loras": "nosuch:1"}, "Unknown LoRA 'nosuch'"),
    ("bake-loaded", {"loras": "style:1", "colour": "red"}, "Unknown fields: colour"),
    ("bake-loaded", {}, "Missing field(s): loras"),
    ("bake-loaded", {"loras": [1]}, "list of 'name:ratio"),
    ("bake", {"model": "modelA.safetensors", "loras": "style:1", "name": "modelB"}, "already exists"),
    ("bake", {"model": "nosuch", "loras": "style:1", "name": "x"}, "Unknown model"),
    ("merge", {"loras": "style:1", "name": "m", "rank": "many"}, "not a whole number or 'auto'"),
    ("merge", {"loras": "style:1", "name": "m", "overwrite": "yes"}, "true or false"),
    ("extract", {"model_a": "modelA.safetensors", "model_b": "modelB.safetensors", "name": "e", "alpha": "x"},
     "must be a number"),
    ("extract", {"model_a": "modelA.safetensors", "name": "e"}, "Missing field(s): model_b"),
])
def test_lora_api_errors_are_http_400_and_change_nothing(webui, entry, loras, route, body, message):
    before = webui.live()
    files = sorted(p.name for p in webui.tmp.rglob("*.safetensors"))
    with pytest.raises(Exception) as err:
        routes(webui)[("POST", f"/block-merger/lora/{route}")](body)
    assert err.value.status_code == 400 and message in err.value.detail, err.value.detail
    assert "\n" not in err.value.detail
    assert all(torch.equal(v, before[k]) for k, v in webui.live().items())
    assert sorted(p.name for p in webui.tmp.rglob("*.safetensors")) == files
    assert routes(webui)[("GET", "/block-merger/history")]()["rows"] == []
    assert not webui.call_queue.queue_lock.locked()
