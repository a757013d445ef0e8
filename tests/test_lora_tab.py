"""The LoRA sub-tab's handlers (no browser) over the standalone host: the list and its filters, adding names, get
from prompt, the spec field's formats, the file tools with float64 expectations, history loading both ways, and
"Bake into the loaded model" refused with the host's reason where no model is loaded."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_rounded
from lora_helpers import rand, save_lora, tiny_model
from safetensors.torch import load_file

from lib_merge.core.arch import BLOCKS_26
from lib_merge.core.errors import MergeError
from lib_merge.hosts.standalone import StandaloneHost
from lib_merge.lora.blocks import split_specs
from lib_merge.lora.prompt import specs_from_prompt
from lib_merge.service.merge_service import MergeService
from lib_merge.ui.model_refresh import refresh_models
from lib_merge.ui.tab import Handlers
from lib_merge.ui.tab_lora import LoraHandlers, name_of

Q_K = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
Q = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
CONV_K = "lora_unet_down_blocks_0_resnets_0_conv1"
XL_K = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"


@pytest.fixture
def tab(tmp_path):
    models = tmp_path / "models"
    loras = models / "Lora"
    (loras / "styles").mkdir(parents=True)
    tiny_model(models / "base.safetensors", "sd1", seed=1)
    tiny_model(models / "tuned.safetensors", "sd1", seed=2)
    save_lora(loras / "plain.safetensors", {f"{Q_K}.lora_down.weight": rand((4, 40), 1),
                                            f"{Q_K}.lora_up.weight": rand((40, 4), 2),
                                            f"{Q_K}.alpha": torch.tensor(2.0)})
    save_lora(loras / "styles" / "conv.safetensors", {f"{CONV_K}.lora_down.weight": rand((2, 20, 3, 3), 3),
                                                      f"{CONV_K}.lora_up.weight": rand((20, 2, 1, 1), 4)})
    save_lora(loras / "xl.safetensors", {f"{XL_K}.lora_down.weight": rand((8, 1280), 5),
                                         f"{XL_K}.lora_up.weight": rand((1280, 8), 6)})
    (loras / "broken.safetensors").write_bytes(b"not a safetensors file")
    service = MergeService(StandaloneHost(models, tmp_path / "data"))
    return LoraHandlers(service)


def test_the_list_its_labels_and_filters(tab):
    labels = tab.choices()
    assert [name_of(label) for label in labels] == ["broken.safetensors", "plain.safetensors",
                                                    "styles/conv.safetensors", "xl.safetensors"]
    assert labels[0].startswith("broken.safetensors [unreadable: ")
    assert labels[1].startswith("plain.safetensors [LoRA, 4, ")
    assert [name_of(x) for x in tab.choices("LoCon")] == ["styles/conv.safetensors"]
    assert [name_of(x) for x in tab.choices("LoRA", "SDXL")] == [name_of(x) for x in tab.choices("LoRA")
                                                                  if "SDXL" in x]
    assert "xl.safetensors" not in [name_of(x) for x in tab.choices("All", "SD1")]
    assert [name_of(x) for x in tab.choices("All", "SDXL")][-1] == "xl.safetensors"


def test_adding_names_and_the_spec_field_formats(tab):
    labels = tab.choices()
    text = tab.add([labels[1], labels[2]], "", 0.75)
    assert text == "plain.safetensors:0.75\nstyles/conv.safetensors:0.75"
    assert tab.add([labels[1]], text, 1) == text  # already there
    assert split_specs("a:1, b:0.5:1,0,0,0,0,0,0,0,1,1,1,1\n# a comment\nc") == [
        "a:1", "b:0.5:1,0,0,0,0,0,0,0,1,1,1,1", "c"]
    specs = tab.tools.specs("plain:0.5\nconv:1:OUTD")  # bare stems resolve anywhere below the folder
    assert [(s.name, s.ratio, s.blocks) for s in specs] == [("plain", 0.5, ""), ("conv", 1.0, "OUTD")]


def test_get_from_prompt():
    prompt = ("a cat <lora:plain:0.6>, <lyco:conv:1:lbw=OUTD> <lora:x:0.5:1> <lora:y> "
              "<lora:z:0.8:lbw=1,0,0,0,0,0,0,0,1,1,1,1> <lora:p:1:INALL> <lora:u:te=0.2:unet=0.9>")
    uneven = ",".join("0.5" if label == "BASE" else "1" for label in BLOCKS_26)
    assert specs_from_prompt(prompt) == [
        "plain:0.6", "conv:1:OUTD", "x:1:" + uneven, "y:1", "z:0.8:1,0,0,0,0,0,0,0,1,1,1,1", "p:1:INALL",
        "u:1:" + ",".join("0.2" if label == "BASE" else "0.9" for label in BLOCKS_26)]
    text, message = LoraHandlers.from_prompt(prompt)
    assert text.splitlines()[0] == "plain:0.6" and "Took 7 LoRA(s)" in message
    assert "no <lora:" in LoraHandlers.from_prompt("a dog")[1]


def test_bake_to_a_file_merge_extract_and_history(tab):
    models = tab.host.models_folder()
    message = tab.bake_file("base.safetensors", "plain:0.5", "baked", "keep", False)
    assert "Saved" in message and "merge ID 1" in message and "plain x0.5: 1 of 1 modules applied" in message
    base, baked = load_file(models / "base.safetensors"), load_file(models / "baked.safetensors")
    lora = load_file(tab.host.resolve_lora("plain"))
    want = base[Q].double() + 0.5 * (2.0 / 4) * (lora[f"{Q_K}.lora_up.weight"].double() @
                                               lora[f"{Q_K}.lora_down.weight"].double())
    assert_rounded(baked[Q], want, base[Q].dtype, what=Q)
    assert [k for k in base if k != Q and not torch.equal(base[k], baked[k])] == []
    # the checkpoint dropdowns read again after the bake (what the tab chains to it): the new file is offered to
    # extract from, and the names already chosen stay
    updates = refresh_models(tab.host)("base.safetensors", "", "gone.safetensors")
    choices = updates[0]["choices"]
    assert {"base.safetensors", "baked.safetensors", "tuned.safetensors"} <= set(choices)
    assert choices[-1] == "gone.safetensors" and all(u["choices"] == choices for u in updates)
    assert [u["value"] for u in updates] == ["base.safetensors", None, "gone.safetensors"]
    assert "2 modules, rank 2-4" in tab.merge("plain:1\nconv:1", "concat", "both", "fp16", "new", False)
    assert (tab.host.lora_folder() / "both.safetensors").is_file()
    message = tab.extract("baked.safetensors", "base.safetensors", "back", 1.0, 1.0, "4", "", "fp32", False)
    assert "U-Net only" in message and (tab.host.lora_folder() / "back.safetensors").is_file()
    assert "Type: LoRA" in tab.inspect(["back.safetensors [LoRA, 4, SD1]"])
    rows = tab.service.history().rows()
    assert [r["mode"] for r in rows] == ["LoRA bake", "LoRA merge", "LoRA extract"]
    text, message = tab.from_history(1)
    assert text == f"{tab.host.resolve_lora('plain')}:0.5" and "lora bake 1" in message
    assert tab.from_history(2)[0].splitlines()[1].endswith("conv.safetensors:1")
    assert "extracted a LoRA from" in tab.from_history(-1)[1]
    with pytest.raises(MergeError, match="is a lora bake, not a merge: load it in the LoRA tab"):
        Handlers(tab.service).settings_from_id(1)
    with pytest.raises(MergeError, match="already exists"):
        tab.bake_file("base.safetensors", "plain:0.5", "baked", "keep", False)


@pytest.mark.parametrize("call, message", [
    (lambda t: t.bake_loaded("plain:1", ""), "No model is loaded outside the WebUI"),
    (lambda t: t.bake_file("base.safetensors", "xl:1", "out", "keep", False), "is for SDXL"),
    (lambda t: t.bake_file("base.safetensors", "plain:1", "", "keep", False), "Type a file name"),
    (lambda t: t.bake_file("", "plain:1", "out", "keep", False), "Choose the checkpoint"),
    (lambda t: t.merge("", "concat", "m", "fp16", "new", False), "No LoRA given"),
    (lambda t: t.extract("base.safetensors", "", "e", 1, 1, "8", "", "fp16", False), "Choose both models"),
    (lambda t: t.inspect([]), "Select a LoRA"),
    (lambda t: t.from_history("x"), "whole number"),
])
def test_bad_inputs_are_messages_and_write_nothing(tab, call, message):
    files = sorted(p.name for p in tab.host.models_folder().rglob("*"))
    with pytest.raises(MergeError, match=message):
        call(tab)
    assert sorted(p.name for p in tab.host.models_folder().rglob("*")) == files
    assert tab.service.history().rows() == []


def test_the_standalone_model_lists_leave_out_the_lora_folder(tmp_path):
    """models/Lora sits inside the models folder: its files are LoRAs, never checkpoints or VAEs to merge."""
    models = tmp_path / "models"
    (models / "Lora" / "styles").mkdir(parents=True)
    (models / "sub").mkdir()
    for name in ("a.safetensors", "sub/b.ckpt", "my_vae.safetensors", "Lora/l1.safetensors",
                 "Lora/styles/l2.safetensors", "Lora/vae_lora.safetensors"):
        (models / name).write_bytes(b"x")
    host = StandaloneHost(models)
    assert host.list_models() == ["a.safetensors", "sub/b.ckpt"]
    assert host.list_vaes() == ["my_vae.safetensors"]
    assert host.list_loras() == ["l1.safetensors", "styles/l2.safetensors", "vae_lora.safetensors"]


def test_the_list_reads_only_headers_and_says_the_same(tab, tmp_path):
    """The list's summaries come from the safetensors header (meta tensors, no data read) and equal a full read's,
    for LoRA, LoCon, LoHa and LoKr files."""
    from lib_merge.lora.formats import read_lora
    from lib_merge.lora.inspect import summarize

    loha = save_lora(tmp_path / "loha.safetensors", {f"{Q_K}.hada_w{i}_{s}": rand((40, 4) if s == "a" else (4, 40), i)
                                                     for i in (1, 2) for s in "ab"})
    lokr = save_lora(tmp_path / "lokr.safetensors", {f"{Q_K}.lokr_w1": rand((4, 4), 1),
                                                     f"{Q_K}.lokr_w2_a": rand((10, 2), 2),
                                                     f"{Q_K}.lokr_w2_b": rand((2, 10), 3)})
    folder = tab.host.lora_folder()
    for path in (folder / "plain.safetensors", folder / "styles" / "conv.safetensors", folder / "xl.safetensors",
                 loha, lokr):
        header = read_lora(path, shapes_only=True)
        assert {t.device.type for m in header.modules.values() for t in m.parts.values()} == {"meta"}
        assert summarize(header) == summarize(read_lora(path)), path.name
    assert [summarize(read_lora(p, shapes_only=True)).kind for p in (loha, lokr)] == ["LoHa", "LoKr"]
