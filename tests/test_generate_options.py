"""Generate as the user expects (issue 15 item 6) through the A1111 host, against the fake WebUI (whose processing
follows v1.10.1 for styles, hires fix, face restoration and tiling): what the tab's request asks for reaches
`StableDiffusionProcessingTxt2Img` and shows in the images and their infotexts. Also the Advanced accordion's
model to RAM / back to its device."""

from __future__ import annotations

import pytest
from webui_fixture import webui_fixture  # noqa: F401  (provides the `webui` fixture)

from lib_merge.core.recipe import Recipe
from lib_merge.service.merge_service import INFOTEXT_RECIPE, MergeService
from lib_merge.ui import values as uv
from lib_merge.ui.image_recipe import recipe_of_image


def service_of(webui):
    from lib_merge.hosts.a1111 import A1111Host

    return MergeService(A1111Host(webui.root), log_merges=False)


def params(info: str) -> dict[str, str]:
    last = info.splitlines()[-1]
    return dict(part.split(": ", 1) for part in last.split(", ") if ": " in part)


def test_hires_fix_batch_count_and_styles_reach_processing(webui):
    from modules import styles

    webui.shared.prompt_styles.styles["warm"] = styles.PromptStyle("warm", "warm light", "cold", None)
    service = service_of(webui)
    recipe = Recipe("modelA.safetensors", "modelB.safetensors", alpha=0.3)
    service.merge_and_load(recipe)
    request = uv.request_from_values("a cat", "", 5, "Euler a", 7, 64, 96, 11, 1, 2, uv.TXT2IMG, "on", ["warm"], "on",
                                     "Lanczos", 3, 0.4, 2, "")
    result = service.generate(request)
    assert len(result.images) == 3  # batch count 2: a grid, then the two images, as txt2img returns them
    for image in result.images[1:]:
        assert image.size == (max(8, 128 // 16), max(8, 192 // 16))  # the fake renders 1/16 of the hires size
    first = result.infotexts[1]
    assert first.splitlines()[0] == "a cat, warm light" and first.splitlines()[1] == "Negative prompt: cold"
    p = params(first)
    assert (p["Denoising strength"], p["Hires upscale"], p["Hires steps"], p["Hires upscaler"], p["Tiling"]) == \
        ("0.4", "2.0", "3", "Lanczos", "True")
    assert "Face restoration" not in p and p["Seed"] == "11" and params(result.infotexts[2])["Seed"] == "12"
    # the image's infotext gives the merge back (IDs from images)
    found = recipe_of_image({"parameters": first})
    assert found.values["alpha"] == 0.3 and INFOTEXT_RECIPE in first


def test_unset_switches_follow_the_webuis_settings(webui):
    webui.shared.opts.face_restoration = True
    service = service_of(webui)
    result = service.generate(uv.request_from_values("dog", width=64, height=64, txt2img_live=""))
    p = params(result.infotexts[0])
    assert p["Face restoration"] == "CodeFormer" and "Tiling" not in p and "Hires upscale" not in p
    assert len(result.images) == 1 and p["Size"] == "64x64"


def test_an_unknown_upscaler_fails_as_in_the_webui(webui):
    service = service_of(webui)
    with pytest.raises(Exception, match="could not find upscaler named Magic"):
        service.generate(uv.request_from_values("dog", enable_hr="on", hr_upscaler="Magic"))


def test_model_to_ram_and_back(webui, monkeypatch):
    from lib_merge.hosts.a1111 import A1111Host

    host = A1111Host(webui.root)
    model = webui.shared.sd_model
    moved = []
    monkeypatch.setattr(model, "to", lambda device: moved.append(str(device)) or model)
    host.unload_model()  # the WebUI's own unload_model_weights: to the CPU
    host.model_to_device()
    assert moved == ["cpu", str(webui.devices.device)] and webui.shared.sd_model is model
    assert host.list_upscalers()[:2] == ["Latent", "Latent (nearest)"] and "Lanczos" in host.list_upscalers()


def test_supermerger_history_is_found_beside_the_extension(webui, tmp_path):
    from lib_merge.hosts.a1111 import A1111Host

    extension = tmp_path / "extensions" / "block-merger"
    extension.mkdir(parents=True)
    host = A1111Host(extension)
    assert host.supermerger_history() is None
    log = tmp_path / "extensions" / "sd-webui-supermerger" / "mergehistory.csv"
    log.parent.mkdir()
    log.write_text("ID\n")
    assert host.supermerger_history() == log
