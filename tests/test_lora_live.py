"""LoRAs baked into the loaded model (issue 14, item 2), against the fake WebUI: only the touched tensors change,
in the model's own storage, by W + ratio·(alpha/rank)·up·down computed here in float64; a fault or Stop anywhere
leaves the model bit-identical; restore gives the base back; a bake composes with a merge and the record names both.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import assert_rounded
from lora_helpers import rand, save_lora
from test_host_a1111 import RECIPE, assert_live_is, expected, host_of, image_bytes
from test_live_merge import Fault, assert_same, fail_at, model_storages
from webui_fixture import webui_fixture  # noqa: F401  (provides the `webui` fixture)

from lib_merge.core.errors import MergeCancelled, MergeError
from lib_merge.core.recipe import Recipe
from lib_merge.hosts.base import GenerationRequest
from lib_merge.service.lora_service import LoraTools
from lib_merge.service.merge_service import INFOTEXT_RECIPE, MergeService

Q_K = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
Q = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
OUT_K = "lora_unet_up_blocks_2_attentions_0_transformer_blocks_0_attn1_to_v"
OUT = "model.diffusion_model.output_blocks.6.1.transformer_blocks.0.attn1.to_v.weight"
FC_K = "lora_te_text_model_encoder_layers_0_mlp_fc1"
FC = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
TARGETS = {Q_K: Q, OUT_K: OUT, FC_K: FC}


def factors(shape, rank, seed):
    return rand((rank, shape[1]), seed), rand((shape[0], rank), seed + 1)


@pytest.fixture(name="loras")
def loras_fixture(webui):
    """Two LoRAs in the WebUI's Lora folder for model A's shapes: `style` (Q, OUT and a text-encoder layer, alpha 2
    of rank 4) and `detail` (Q only, rank 2, no alpha). Returns {name: {checkpoint key: (down, up, scale)}}."""
    folder = webui.tmp / "Lora"
    folder.mkdir()
    webui.shared.cmd_opts.lora_dir = str(folder)
    live = webui.live()
    made = {}
    for name, modules, rank, alpha, seed in (("style", (Q_K, OUT_K, FC_K), 4, 2.0, 10), ("detail", (Q_K,), 2, None,
                                                                                          40)):
        tensors, parts = {}, {}
        for i, module in enumerate(modules):
            down, up = factors(tuple(live[TARGETS[module]].shape), rank, seed + 2 * i)
            tensors[f"{module}.lora_down.weight"], tensors[f"{module}.lora_up.weight"] = down, up
            if alpha is not None:
                tensors[f"{module}.alpha"] = torch.tensor(alpha)
            parts[TARGETS[module]] = (down, up, (alpha if alpha is not None else rank) / rank)
        save_lora(folder / f"{name}.safetensors", tensors)
        made[name] = parts
    return made


def service_of(webui, **kw):
    return MergeService(host_of(webui), **{"log_merges": False, **kw})


def expect(before, lora, ratio):
    """The baked tensors in float64: W + ratio·scale·up·down."""
    return {key: before[key].double() + ratio * scale * (up.double() @ down.double())
            for key, (down, up, scale) in lora.items()}


def assert_baked(webui, before, wanted):
    live = webui.live()
    for key, value in wanted.items():
        assert_rounded(live[key], value, before[key].dtype, what=key)
    assert [k for k in before if k not in wanted and not torch.equal(live[k], before[k])] == []


def test_bake_changes_only_the_touched_tensors_in_place_and_the_images(webui, loras):
    tools = LoraTools(service_of(webui))
    model = webui.shared.sd_model
    storages = model_storages(model)
    before = webui.live()
    base_image = image_bytes(webui.txt2img())
    outcome = tools.bake_loaded("style:0.7")
    assert webui.shared.sd_model is model and model_storages(model) == storages
    assert_baked(webui, before, expect(before, loras["style"], 0.7))
    assert sorted(outcome.bake.plan.changes) == sorted([Q, OUT, FC])
    assert "style x0.7: 3 of 3 modules applied" in outcome.message()
    assert image_bytes(webui.txt2img()) != base_image
    identity = tools.host.loaded_identity()
    assert identity.name == "modelA + style:0.7"
    record = json.loads(identity.recipe_json)
    assert record["merge"] is None and record["loras"][0]["ratio"] == 0.7
    assert record["model_a"] == str(webui.a)
    info = tools.service.generate(GenerationRequest("a cat")).infotexts[0]
    assert identity.name in info and f"Model hash: {identity.short_hash}" in info
    assert f"{INFOTEXT_RECIPE}: " in info and "lora bake" in info


def test_two_bakes_stack_and_restore_gives_the_base_back_bit_for_bit(webui, loras):
    service = service_of(webui)
    tools = LoraTools(service)
    before = webui.live()
    base_image = image_bytes(webui.txt2img())
    tools.bake_loaded("style:0.5")
    middle = webui.live()
    tools.bake_loaded("detail:-1.5")
    wanted = expect(middle, loras["detail"], -1.5)
    live = webui.live()
    assert_rounded(live[Q], wanted[Q], before[Q].dtype, what=Q)
    assert torch.equal(live[OUT], middle[OUT]) and torch.equal(live[FC], middle[FC])
    assert service.host.loaded_identity().name == "modelA + style:0.5 + detail:-1.5"
    assert [s.name for b in service.baked_loras() for s in b.specs] == ["style", "detail"]
    service.restore_base()
    assert_same(webui.live(), before)
    assert service.host.loaded_identity() is None
    assert image_bytes(webui.txt2img()) == base_image


def test_a_bake_composes_with_a_merge_and_the_record_and_history_name_both(webui, loras):
    service = service_of(webui, log_merges=True)
    tools = LoraTools(service)
    service.merge_and_load(RECIPE)
    merged = webui.live()
    assert_live_is(webui, expected(webui, RECIPE))
    # 17 LBW values (BASE IN01 IN02 IN04 IN05 IN07 IN08 M00 OUT03..OUT11): BASE 0, IN04 0.5, OUT06 1, times 0.8
    blocks = ["0"] * 17
    blocks[3], blocks[11] = "0.5", "1"
    outcome = tools.bake_loaded("style:0.8:" + ",".join(blocks))
    want = {**expect(merged, {Q: loras["style"][Q]}, 0.4), **expect(merged, {OUT: loras["style"][OUT]}, 0.8)}
    assert_baked(webui, merged, want)
    record = json.loads(service.host.loaded_identity().recipe_json)
    assert Recipe.from_dict(record["merge"]).alpha == RECIPE.alpha
    assert [record["merge"][k] for k in ("model_a", "model_b")] == ["modelA.safetensors", "modelB.safetensors"]
    assert record["loras"] == [{"path": str(tools.host.resolve_lora("style")), "ratio": 0.8,
                                "blocks": ",".join(blocks)}]
    row = service.history().get(outcome.history_id)
    assert row["mode"] == "LoRA bake" and row["recipe"]["merge"] == record["merge"]
    assert row["recipe"]["target"] == "loaded model"
    # a generation without a request keeps the merge and the LoRAs
    webui.txt2img()
    assert_baked(webui, merged, want)
    # a new merge replaces everything (computed in full, not incrementally from the merge under the LoRAs)
    other = Recipe("modelA.safetensors", "modelC.safetensors", alpha=0.4)
    service.merge_and_load(other)
    assert_live_is(webui, expected(webui, other))
    assert service.baked_loras() == []


def test_a_transient_merge_then_reconcile_bakes_the_users_loras_again(webui, loras):
    service = service_of(webui)
    tools = LoraTools(service)
    service.merge_and_load(RECIPE)
    tools.bake_loaded("style:1")
    chosen = webui.live()
    service.reconcile(Recipe("modelA.safetensors", "modelC.safetensors", alpha=0.9))  # an X/Y/Z cell
    assert not torch.equal(webui.live()[Q], chosen[Q])
    service.reconcile(None)
    assert_same(webui.live(), chosen)


@pytest.mark.parametrize("where", ["first key", "middle", "after all keys"])
@pytest.mark.parametrize("previous", ["base", "merge", "merge and a LoRA"])
def test_a_fault_mid_bake_leaves_the_model_bit_identical(webui, loras, monkeypatch, where, previous):
    service = service_of(webui)
    tools = LoraTools(service)
    if previous != "base":
        service.merge_and_load(RECIPE)
    if previous == "merge and a LoRA":
        tools.bake_loaded("detail:0.9")
    before, identity = webui.live(), service.host.loaded_identity()
    progress = fail_at(where, service.host, monkeypatch)
    with pytest.raises(Fault):
        service.bake_loras(tools.specs("style:0.6"), progress=progress)
    assert_same(webui.live(), before)
    assert service.host.loaded_identity() == identity
    assert webui.sd_hijack.model_hijack.is_hijacked(webui.shared.sd_model)
    monkeypatch.undo()
    tools.bake_loaded("style:0.6")  # the service still knows what is loaded
    assert_baked(webui, before, expect(before, loras["style"], 0.6))


def test_stop_mid_bake_puts_back_and_says_so(webui, loras):
    service = service_of(webui)
    tools = LoraTools(service)
    before = webui.live()
    calls = []

    def stop_after_one():
        calls.append(1)
        return len(calls) > 1

    with pytest.raises(MergeCancelled, match="previous weights were put back"):
        tools.bake_loaded("style:1", cancel=stop_after_one)
    assert_same(webui.live(), before)
    assert service.host.loaded_identity() is None


@pytest.fixture(name="bad")
def bad_fixture(webui, loras):
    folder = webui.tmp / "Lora"
    te2 = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    save_lora(folder / "xl.safetensors", {f"{te2}.lora_down.weight": rand((4, 1280), 3),
                                          f"{te2}.lora_up.weight": rand((1280, 4), 4)})
    save_lora(folder / "foreign.safetensors", {"lora_foo_bar.lora_down.weight": rand((4, 40), 5),
                                               "lora_foo_bar.lora_up.weight": rand((40, 4), 6)})
    save_lora(folder / "nan.safetensors", {f"{Q_K}.lora_down.weight": torch.full((4, 40), math.nan),
                                           f"{Q_K}.lora_up.weight": rand((40, 4), 9)})
    return folder


@pytest.mark.parametrize("spec,message", [
    ("xl:1", "is for SDXL"),
    ("foreign:1", "has no module that matches"),
    ("nan:1", "NaN"),
    ("style:strong", "'strong' is not a number"),
    ("style:1:NOPE", "unknown block-weight preset 'NOPE'"),
    ("style:1:" + ",".join(["1"] * 18), "18 block weights given"),
    ("missing:1", "Unknown LoRA 'missing'"),
    ("style:1\nnan:0.5", "NaN"),  # the second LoRA is bad: the first is not baked either
])
def test_bad_inputs_are_one_clear_message_and_the_model_is_unchanged(webui, bad, spec, message):
    service = service_of(webui, log_merges=True)
    tools = LoraTools(service)
    service.merge_and_load(RECIPE)
    before, identity = webui.live(), service.host.loaded_identity()
    rows = len(service.history().rows())
    with pytest.raises(MergeError, match=message) as caught:
        tools.bake_loaded(spec)
    assert "\n" not in str(caught.value)
    assert_same(webui.live(), before)
    assert service.host.loaded_identity() == identity
    assert len(service.history().rows()) == rows


def test_saving_the_merge_with_loras_baked_in_is_refused_clearly(webui, loras):
    service = service_of(webui)
    service.merge_and_load(RECIPE)
    LoraTools(service).bake_loaded("style:1")
    with pytest.raises(MergeError, match="LoRAs are baked into the loaded model"):
        service.save_loaded("x")


def test_the_bake_record_is_refused_as_a_generation_request_with_the_reason(webui, loras):
    from lib_merge.hosts.a1111 import parse_request

    service = service_of(webui)
    LoraTools(service).bake_loaded("style:1")
    with pytest.raises(MergeError, match="record of a lora bake, not a merge recipe"):
        parse_request(service.host.loaded_identity().recipe_json)
