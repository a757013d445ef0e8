"""A1111Host and the entry script against the faithful fake WebUI (tests/fakes/modules).

Expected weights come from the engine run on the checkpoint files directly (merge_to_dict), then cast to the live
model's dtype; images are compared with images generated after loading the same weights by hand.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import torch
from conftest import assert_rounded
from webui_fixture import webui_fixture  # noqa: F401  (provides the `webui` fixture)

from lib_merge.core.engine import Models, merge_to_dict
from lib_merge.core.errors import MergeCancelled, MergeError
from lib_merge.core.recipe import Recipe
from lib_merge.hosts.base import GenerationRequest
from lib_merge.io.checkpoint import open_checkpoint
from lib_merge.service.merge_service import INFOTEXT_MERGE, INFOTEXT_RECIPE, MergeService

TEXT = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
UNET = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
VAE = "first_stage_model.decoder.conv_in.weight"


def host_of(webui):
    from lib_merge.hosts.a1111 import A1111Host

    return A1111Host(webui.root)


def service_of(webui, **kw):
    return MergeService(host_of(webui), log_merges=False, **kw)


def expected(webui, recipe: Recipe) -> dict[str, torch.Tensor]:
    """The merge computed straight from the files (no host involved)."""
    names = [recipe.model_a, recipe.model_b, recipe.model_c]
    paths = [webui.folder / n if n else None for n in names]
    ckpts = [open_checkpoint(p) if p else None for p in paths]
    try:
        plan_recipe = Recipe(**{**recipe.__dict__, "model_a": str(paths[0]), "model_b": str(paths[1] or ""),
                                "model_c": str(paths[2] or "")})
        _, state = merge_to_dict(plan_recipe, Models(*ckpts))
        return {k: v.clone() for k, v in state.items()}
    finally:
        for c in ckpts:
            if c is not None:
                c.close()


def assert_live_is(webui, state, keys=None):
    live = webui.live()
    for key in keys or state:
        if key in live and key.startswith(("model.", "cond_stage_model.", "first_stage_model.")) \
                and not key.endswith("position_ids"):
            assert torch.equal(live[key], state[key].to(live[key].dtype)), key


def image_bytes(processed):
    return [im.tobytes() for im in processed.images]


RECIPE = Recipe("modelA.safetensors", "modelB.safetensors", alpha=0.3)


# -- the swap ---------------------------------------------------------------------------------------------------


def test_merge_is_loaded_in_place_and_images_show_it(webui):
    base_image = image_bytes(webui.txt2img())
    model = webui.shared.sd_model
    service = service_of(webui)
    outcome = service.merge_and_load(RECIPE)
    assert webui.shared.sd_model is model  # in place: no rebuild
    assert ("load_model", ) not in [e[:1] for e in webui.sd_models.events[1:]]
    want = expected(webui, RECIPE)
    assert_live_is(webui, want)
    merged_image = image_bytes(webui.txt2img())
    assert merged_image != base_image

    # the same weights loaded by hand into a fresh model give the same image
    webui.sd_models.load_model(webui.sd_models.select_checkpoint(), already_loaded_state_dict=dict(want))
    webui.processing.StableDiffusionProcessing.cached_c[:] = [None, None]
    assert image_bytes(webui.txt2img()) == merged_image
    assert outcome.identity.name == RECIPE.title()


def test_text_encoder_only_merge_reaches_the_text_encoder_and_the_conditioning(webui):
    """Only BASE (the text encoder) merged: the image changes only if the swap undid the hijack (else the text
    encoder keys are silently skipped) and gave the model a new info object (else the cached conditioning of the
    base is reused)."""
    base_image = image_bytes(webui.txt2img())
    before = webui.live()
    recipe = Recipe("modelA.safetensors", "modelB.safetensors", weights_alpha="1" + ",0" * 25)
    service_of(webui).merge_and_load(recipe)
    after = webui.live()
    assert not torch.equal(after[TEXT], before[TEXT])
    assert torch.equal(after[UNET], before[UNET])
    assert_live_is(webui, expected(webui, recipe))
    assert image_bytes(webui.txt2img()) != base_image
    assert webui.sd_hijack.model_hijack.is_hijacked(webui.shared.sd_model)


def test_merge_survives_reload_model_weights_and_keeps_the_users_settings(webui):
    service = service_of(webui)
    title = webui.shared.opts.sd_model_checkpoint
    registered = dict(webui.sd_models.checkpoints_list)
    aliases = dict(webui.sd_models.checkpoint_aliases)
    service.merge_and_load(RECIPE)
    merged = webui.live()
    webui.sd_models.reload_model_weights()
    webui.txt2img()  # calls reload_model_weights() at its start and per batch
    assert webui.sd_models.events[-1][0] == "reload_skipped"
    assert all(torch.equal(v, merged[k]) for k, v in webui.live().items())
    info = webui.shared.sd_model.sd_checkpoint_info
    assert info.name_for_extra == RECIPE.title() and info not in registered.values()
    assert webui.shared.sd_model.sd_model_checkpoint == str(webui.a)
    assert webui.shared.opts.sd_model_checkpoint == title
    assert webui.sd_models.checkpoints_list == registered and webui.sd_models.checkpoint_aliases == aliases
    assert service.host.loaded_identity().name == RECIPE.title()
    assert info.metadata["sd_merge_recipe"]["model_b"] == "modelB.safetensors"


def test_restore_brings_back_the_exact_base_weights_and_identity(webui):
    base = webui.live()
    base_info = webui.shared.sd_model.sd_checkpoint_info
    service = service_of(webui)
    service.merge_and_load(RECIPE)
    service.restore_base()
    restored = webui.live()
    assert all(torch.equal(restored[k], v) for k, v in base.items())
    assert webui.shared.sd_model.sd_checkpoint_info is webui.sd_models.select_checkpoint()
    assert webui.shared.sd_model.sd_checkpoint_info.filename == base_info.filename
    assert service.host.loaded_identity() is None


def test_incremental_remerge_loads_only_the_changed_keys(webui):
    service = service_of(webui)
    weights = ["0.5"] * 26
    service.merge_and_load(Recipe("modelA.safetensors", "modelB.safetensors", weights_alpha=",".join(weights)))
    weights[20] = "0.9"  # OUT07
    second = Recipe("modelA.safetensors", "modelB.safetensors", weights_alpha=",".join(weights))
    outcome = service.merge_and_load(second)
    assert 0 < outcome.recomputed < 100
    assert_live_is(webui, expected(webui, second))


def test_a_title_a_bare_name_and_a_file_name_are_one_recipe(webui):
    """The tab names models by WebUI title (`modelA.safetensors [hash]`), the API often by a bare `modelA`: the
    same merge is one recipe (one fingerprint), so merging it again recomputes nothing and is titled the same."""
    service = service_of(webui)
    titles = {t.split(" [")[0]: t for t in host_of(webui).list_models()}
    assert titles["modelA.safetensors"] != "modelA.safetensors"  # the fake gives titles with a hash, as the WebUI
    first = service.merge_and_load(Recipe(titles["modelA.safetensors"], titles["modelB.safetensors"], alpha=0.3))
    assert first.plan.recipe.model_a == "modelA.safetensors" and first.plan.recipe.model_b == "modelB.safetensors"
    for names in (("modelA", "modelB"), ("modelA.safetensors", "modelB.safetensors")):
        again = service.merge_and_load(Recipe(*names, alpha=0.3))
        assert again.recomputed == 0 and again.identity == first.identity
    assert_live_is(webui, expected(webui, RECIPE))


# -- failures and cancel leave the old weights ------------------------------------------------------------------


@pytest.fixture
def merged(webui):
    """Model with a first merge loaded; returns (service, weights, identity)."""
    service = service_of(webui)
    service.merge_and_load(RECIPE)
    return service, webui.live(), service.host.loaded_identity()


def assert_unchanged(webui, service, weights, identity):
    after = webui.live()
    assert after.keys() == weights.keys()
    assert all(torch.equal(after[k], v) for k, v in weights.items())
    assert service.host.loaded_identity() is identity


def test_stop_before_merging_leaves_the_old_weights(webui, merged):
    service, weights, identity = merged
    service.host.request_stop()
    with pytest.raises(MergeCancelled):
        service.merge_and_load(Recipe("modelA.safetensors", "modelC.safetensors", alpha=0.8))
    assert_unchanged(webui, service, weights, identity)


def test_stop_while_merging_leaves_the_old_weights(webui, merged):
    service, weights, identity = merged
    host = service.host

    def progress(done, total):
        if done == 50:
            host.request_stop()

    with pytest.raises(MergeCancelled):
        service.merge_and_load(Recipe("modelA.safetensors", "modelC.safetensors", alpha=0.8), progress=progress,
                               )
    assert_unchanged(webui, service, weights, identity)


def test_truncated_model_leaves_the_old_weights(webui, merged):
    service, weights, identity = merged
    broken = webui.folder / "broken.safetensors"
    data = webui.c.read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(MergeError):
        service.merge_and_load(Recipe("modelA.safetensors", "broken.safetensors", alpha=0.8))
    assert_unchanged(webui, service, weights, identity)


@pytest.mark.parametrize("recipe", [
    Recipe("modelA.safetensors", "modelB.safetensors", mode="Add difference"),  # no model C
    Recipe("modelA.safetensors", "nosuchmodel.safetensors"),
    Recipe("modelA.safetensors", "modelB.safetensors", weights_alpha="0.5,0.5"),
])
def test_invalid_recipes_leave_the_old_weights(webui, merged, recipe):
    service, weights, identity = merged
    with pytest.raises(MergeError):
        service.merge_and_load(recipe)
    assert_unchanged(webui, service, weights, identity)


def test_unknown_model_error_names_the_model(webui):
    with pytest.raises(MergeError, match="nosuchmodel"):
        host_of(webui).resolve_model("nosuchmodel.safetensors")


def test_a_partial_state_of_another_shape_is_refused_before_touching_the_model(webui, merged):
    service, weights, identity = merged
    bad = {UNET: torch.zeros(3, 3), TEXT: torch.zeros_like(weights[TEXT])}
    with pytest.raises(MergeError, match="does not fit"):
        service.host.load_weights(bad, identity)
    assert_unchanged(webui, service, weights, identity)
    assert webui.sd_hijack.model_hijack.is_hijacked(webui.shared.sd_model)


# -- WebUI features the swap must respect -----------------------------------------------------------------------


def test_lora_backups_are_reset_by_the_swap(webui):
    model = webui.shared.sd_model
    webui.extra_networks.activate(model, ("style",))
    assert webui.extra_networks.backups(model)
    service_of(webui).merge_and_load(RECIPE)
    assert webui.extra_networks.backups(model) == []
    webui.extra_networks.activate(model, ())  # the next generation without the LoRA
    assert_live_is(webui, expected(webui, RECIPE))


def test_a_lora_applied_before_an_incremental_remerge_is_not_baked_in(webui):
    """A re-merge loads only the changed keys; the modules it does not touch held the LoRA of the last generation
    and must get their own weights back, so the next generation applies the LoRA once, or not at all."""
    service = service_of(webui)
    model = webui.shared.sd_model
    weights = ["0.5"] * 26
    service.merge_and_load(Recipe("modelA.safetensors", "modelB.safetensors", weights_alpha=",".join(weights)))
    webui.extra_networks.activate(model, ("style",))  # a generation with <lora:style>
    weights[20] = "0.9"  # OUT07 only
    second = Recipe("modelA.safetensors", "modelB.safetensors", weights_alpha=",".join(weights))
    assert service.merge_and_load(second).recomputed < 100
    webui.extra_networks.activate(model, ())  # the next generation, without the LoRA
    assert_live_is(webui, expected(webui, second))
    webui.extra_networks.activate(model, ("style",))
    webui.extra_networks.activate(model, ())
    assert_live_is(webui, expected(webui, second))


def test_a_failed_partial_load_with_a_lora_applied_leaves_consistent_weights(webui, monkeypatch):
    """The LoRA is taken out before loading; when the load then fails, the old merge stays, without the LoRA in it
    and without a backup, so the next generation applies the LoRA afresh."""
    service = service_of(webui)
    model = webui.shared.sd_model
    service.merge_and_load(RECIPE)
    clean = webui.live()
    webui.extra_networks.activate(model, ("style",))
    original = type(model).load_state_dict
    calls = []

    def failing(self, state, strict=True, **kw):
        calls.append(len(state))
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory")
        return original(self, state, strict=strict, **kw)

    monkeypatch.setattr(type(model), "load_state_dict", failing)
    with pytest.raises(MergeError, match="put back"):
        service.host.load_weights({UNET: torch.zeros_like(clean[UNET])}, service.host.loaded_identity())
    monkeypatch.setattr(type(model), "load_state_dict", original)
    after = webui.live()  # once: each call clones the whole model
    assert all(torch.equal(after[k], v) for k, v in clean.items())
    assert webui.extra_networks.backups(model) == []


def test_the_fake_catches_a_raw_copy(webui):
    """Why the swap must use load_state_dict: a raw param.copy_ keeps the LoRA backup, which later comes back."""
    model = webui.shared.sd_model
    webui.extra_networks.activate(model, ("style",))
    want = expected(webui, RECIPE)
    with torch.no_grad():
        for name, param in model.model.diffusion_model.named_parameters():
            param.copy_(want["model.diffusion_model." + name])
    webui.extra_networks.activate(model, ())
    assert not torch.equal(webui.live()[UNET], want[UNET].half())


def test_an_external_vae_is_kept(webui):
    vae_file = webui.tmp / "external.vae.safetensors"
    import safetensors.torch

    with open_checkpoint(webui.c) as c:
        safetensors.torch.save_file({k[len("first_stage_model."):]: c.get(k) for k in c.keys()
                                     if k.startswith("first_stage_model.")}, str(vae_file))
    webui.sd_vae.vae_dict["external.vae.safetensors"] = str(vae_file)
    webui.shared.opts.sd_vae = "external.vae.safetensors"
    webui.sd_vae.reload_vae_weights()
    assert webui.sd_vae.loaded_vae_file == str(vae_file)
    vae_before = webui.live()[VAE]
    outcome = service_of(webui).merge_and_load(RECIPE)
    live = webui.live()
    assert torch.equal(live[VAE], vae_before)
    # said, not silent: the VAE's merged tensors are not the loaded model's (the note names one)
    assert "not part of the loaded model, e.g. first_stage_model." in outcome.message()
    assert torch.equal(live[UNET], expected(webui, RECIPE)[UNET].half())


def test_without_an_external_vae_the_vae_is_merged(webui):
    service_of(webui).merge_and_load(RECIPE)
    assert torch.equal(webui.live()[VAE], expected(webui, RECIPE)[VAE].half())


def test_fp8_falls_back_to_load_model_with_a_complete_state(webui):
    webui.shared.opts.fp8_storage = "Enable"
    webui.sd_models.reload_model_weights()  # the WebUI reloads when the fp8 setting changes
    assert webui.devices.fp8
    first = webui.shared.sd_model
    title = webui.shared.opts.sd_model_checkpoint
    registered = dict(webui.sd_models.checkpoints_list)
    hashed = list(webui.hashes.computed)
    service = service_of(webui)
    service.merge_and_load(RECIPE)
    assert webui.sd_models.events[-1][0] == "load_model"
    model = webui.shared.sd_model
    assert model is not first
    want = expected(webui, RECIPE)
    live = webui.live()
    assert live[UNET].dtype == torch.float8_e4m3fn
    assert torch.equal(live[UNET].float(), want[UNET].half().to(torch.float8_e4m3fn).float())
    assert torch.equal(live[VAE], want[VAE].half())
    assert model.sd_checkpoint_info.name_for_extra == RECIPE.title()
    assert model.sd_model_checkpoint == str(webui.a)
    assert webui.shared.opts.sd_model_checkpoint == title
    assert webui.sd_models.checkpoints_list == registered
    assert webui.hashes.computed == hashed  # the base file was not hashed again under the merge's name
    webui.txt2img()
    assert webui.shared.sd_model is model  # the merge survived process_images' reload
    # incremental re-merge under fp8: changed keys over the current weights, still complete
    second = Recipe("modelA.safetensors", "modelB.safetensors", alpha=0.3, weights_alpha="0.3" + ",0.3" * 24 + ",1")
    service.merge_and_load(second)
    assert torch.equal(webui.live()[VAE], want[VAE].half())


def test_another_architecture_rebuilds_the_model(webui):
    from lib_merge.cli import synth

    xa = synth.make_checkpoint(webui.folder / "xlA.safetensors", "sdxl", factor=16, seed=5)
    synth.make_checkpoint(webui.folder / "xlB.safetensors", "sdxl", factor=16, seed=6, base=xa, noise=1.0)
    service = service_of(webui)
    recipe = Recipe("xlA.safetensors", "xlB.safetensors", alpha=0.4)
    service.merge_and_load(recipe)
    model = webui.shared.sd_model
    assert model.is_sdxl and model.sd_model_checkpoint == str(webui.a)
    assert service.host.loaded_identity().name == recipe.title()
    webui.txt2img()
    assert webui.shared.sd_model is model
    service.restore_base()
    assert webui.shared.sd_model.is_sd1
    assert webui.shared.sd_model.sd_checkpoint_info is webui.sd_models.select_checkpoint()


# -- generation -------------------------------------------------------------------------------------------------


def test_generate_uses_txt2img_defaults_saves_like_txt2img_and_names_the_merge(webui):
    (webui.tmp / "ui-config.json").write_text(json.dumps({
        "customscript/sampler.py/txt2img/Sampling steps/value": 9, "txt2img/CFG Scale/value": 4.5,
        "txt2img/Width/value": 640, "customscript/sampler.py/txt2img/Sampling method/value": "Euler a"}))
    service = service_of(webui)
    outcome = service.merge_and_load(RECIPE)
    result = service.generate(GenerationRequest(prompt="a cat", seed=11, extra_params={"Note": "x"}))
    info = result.infotexts[0]
    assert "Steps: 9" in info and "Sampler: Euler a" in info and "CFG scale: 4.5" in info and "Size: 640x512" in info
    assert f"Model: {outcome.identity.name}" in info and f"Model hash: {outcome.identity.short_hash}" in info
    assert f"{INFOTEXT_MERGE}: " in info and f"{INFOTEXT_RECIPE}: " in info and "Note: x" in info
    assert result.seed == 11 and len(result.images) == 1
    path, saved_info, grid = webui.images.saved[-1]
    assert path.startswith(webui.shared.opts.outdir_txt2img_samples) and saved_info == info and not grid
    from PIL import Image

    assert Image.open(path).info["parameters"] == info


def test_generate_with_explicit_parameters_and_a_batch(webui):
    result = service_of(webui).generate(GenerationRequest(prompt="p", steps=3, sampler="DDIM", cfg_scale=2,
                                                          width=256, height=128, seed=5, batch_size=2))
    assert len(result.images) == 3  # grid first, as txt2img returns it
    assert "Steps: 3" in result.infotexts[1] and "Size: 256x128" in result.infotexts[1]
    assert any(grid for _, _, grid in webui.images.saved)


def test_save_grid_follows_the_grid_setting(webui):
    from PIL import Image

    host = host_of(webui)
    path = host.save_grid(Image.new("RGB", (8, 8)), "grid info")
    assert path is not None and path.is_file() and str(path).startswith(webui.shared.opts.outdir_txt2img_grids)
    webui.shared.opts.grid_save = False
    assert host.save_grid(Image.new("RGB", (8, 8)), "grid info") is None


def test_job_progress_and_stop(webui):
    host = host_of(webui)
    state = webui.shared.state
    state.interrupted = True
    with host.job("Block Merger: merge"):
        assert state.job == "Block Merger: merge" and not host.interrupted()
        host.progress(5, 10, "Merging")
        assert state.textinfo == "Merging: 5/10" and (state.sampling_step, state.sampling_steps) == (5, 10)
        assert state.job_count == 1 and state.job_no == 0
        host.request_stop()
        assert host.interrupted()
    assert state.active == 0


def test_models_vaes_folders_and_history_path(webui):
    host = host_of(webui)
    assert [t.split(" [")[0] for t in host.list_models()] == ["modelA.safetensors", "modelB.safetensors",
                                                             "modelC.safetensors"]
    assert host.resolve_model("modelB") == webui.b
    (webui.folder / "new.safetensors").write_bytes(webui.c.read_bytes())
    assert host.resolve_model("new.safetensors").name == "new.safetensors"  # found after a rescan
    assert any(t.startswith("new.safetensors") for t in host.list_models())
    webui.sd_vae.vae_dict["v.safetensors"] = "/x/v.safetensors"
    assert host.list_vaes() == ["v.safetensors"] and str(host.resolve_vae("v.safetensors")) == "/x/v.safetensors"
    with pytest.raises(MergeError, match="nope"):
        host.resolve_vae("nope")
    assert host.models_folder() == webui.folder
    webui.shared.cmd_opts.ckpt_dir = str(webui.tmp)
    assert host.models_folder() == webui.tmp
    from modules import paths

    webui.shared.opts.data["block_merger_history_file"] = ""
    assert host.history_path() == Path(paths.data_path) / "mergehistory.csv"  # the WebUI's data, not the extension
    webui.shared.opts.data["block_merger_history_file"] = "logs/h.csv"
    assert host.history_path() == Path(paths.data_path) / "logs" / "h.csv"
    webui.shared.opts.data["block_merger_history_file"] = str(webui.tmp / "h.csv")
    assert host.history_path() == webui.tmp / "h.csv"


def test_identity_only_loads(webui):
    host = host_of(webui)
    from lib_merge.hosts.base import MergeIdentity

    identity = MergeIdentity("named", "0123456789", RECIPE.to_json())
    before = webui.live()
    host.load_weights({}, identity)
    assert host.loaded_identity() is identity and webui.shared.sd_model.sd_model_hash == "0123456789"
    host.load_weights({}, None)
    assert host.loaded_identity() is None
    assert webui.shared.sd_model.sd_checkpoint_info is webui.sd_models.select_checkpoint()
    assert all(torch.equal(v, before[k]) for k, v in webui.live().items())


def test_live_weights_are_checkpoint_keyed(webui):
    host = host_of(webui)
    with host.live_weights() as live:
        assert TEXT in live and UNET in live
    assert webui.sd_hijack.model_hijack.is_hijacked(webui.shared.sd_model)


def test_lock_is_the_queue_lock(webui):
    host = host_of(webui)
    with host.lock():
        assert webui.call_queue.queue_lock.locked()
        with pytest.raises(RuntimeError, match="deadlock"):
            with host.lock():
                pass
    assert not webui.call_queue.queue_lock.locked()


def test_threads_flag_does_not_leak_between_calls(webui):
    done = threading.Event()
    host = host_of(webui)

    def work():
        with host.lock():
            done.set()

    t = threading.Thread(target=work)
    t.start()
    t.join(5)
    assert done.is_set()


# -- issue 13: files that change, histories that cannot take a row, results that overflow ----------------------


@pytest.mark.parametrize("how", ["rewritten in place", "replaced"])
def test_a_model_changed_on_disk_between_merges_is_read_anew(webui, tmp_path, how):
    """The service keeps models open between merges; a file changed since (cp onto it, or a new file renamed over
    it) must be read through its new header, never at the old offsets."""
    from safetensors.torch import load_file, save_file

    service = service_of(webui)
    service.merge_and_load(RECIPE)  # B is now open and kept
    new_b = {k: v.float().add(0.25).half() if v.is_floating_point() else v for k, v in load_file(webui.c).items()}
    staged = tmp_path / "staged.safetensors"
    save_file(new_b, staged, metadata={"pad": "x" * 4099})  # a longer header: every tensor's offset moves
    if how == "rewritten in place":
        inode = webui.b.stat().st_ino
        with open(webui.b, "r+b") as f:
            f.truncate(0)
            f.write(staged.read_bytes())
        assert webui.b.stat().st_ino == inode
    else:
        os.replace(staged, webui.b)
    service.merge_and_load(Recipe("modelA.safetensors", "modelB.safetensors", alpha=0.6))
    live, a = webui.live(), load_file(webui.a)
    for key in (UNET, TEXT):
        assert_rounded(live[key], a[key].double() * 0.4 + new_b[key].double() * 0.6, live[key].dtype, what=key)


def test_a_history_that_is_a_model_is_refused_before_merging(webui, merged):
    service, weights, identity = merged
    logging = MergeService(service.host, log_merges=True)
    webui.shared.opts.data["block_merger_history_file"] = str(webui.c)
    before = webui.c.read_bytes()
    with pytest.raises(MergeError, match="history"):
        logging.merge_and_load(Recipe("modelA.safetensors", "modelC.safetensors", alpha=0.8))
    assert webui.c.read_bytes() == before
    assert_unchanged(webui, service, weights, identity)


@pytest.mark.parametrize("recipe", [
    Recipe("modelA.safetensors", "modelC.safetensors", alpha=1e30),
    Recipe("modelA.safetensors", "modelB.safetensors", "modelC.safetensors", mode="Add difference", alpha=-1e30),
    Recipe("modelA.safetensors", "modelB.safetensors", "modelC.safetensors", mode="Add difference",
           calc="trainDifference", alpha=1e30),
])
def test_a_merge_that_overflows_leaves_the_old_weights(webui, merged, recipe):
    service, weights, identity = merged
    with pytest.raises(MergeError, match="inf/NaN"):
        service.merge_and_load(recipe)
    assert_unchanged(webui, service, weights, identity)
