"""ForgeHost against the faithful fake of Forge (tests/fakes_forge): merges go into forge_objects' modules in place,
survive Forge's per-batch reset and its forge_model_reload, go away on a changed checkpoint option, restore gives
the base back bit for bit, LoRAs applied by Forge on top still work and come off, and the entry script picks the
Forge host by its capability probe.

Expected weights come from the engine run on the files directly (merge_to_dict), cast to the live dtype; images are
digests of the weights the fake sampler used (base images are made before any merge)."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import safetensors.torch
import torch
from fakes import stubs

from lib_merge.cli import synth
from lib_merge.core.engine import Models, merge_to_dict
from lib_merge.core.errors import MergeCancelled, MergeError
from lib_merge.core.recipe import Recipe
from lib_merge.io.checkpoint import open_checkpoint
from lib_merge.service.merge_service import MergeService

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ENTRY = ROOT / "scripts" / "block_merger.py"
UNET = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
TEXT = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
#: Forge's names for checkpoint keys (written out here independently of lib_merge.hosts.forge)
FORGE_NAMES = (("model.diffusion_model.", "unet", ""), ("cond_stage_model.transformer.", "clip", "clip_l.transformer."),
               ("first_stage_model.", "vae", ""), ("text_encoders.", "clip", ""), ("vae.", "vae", ""))


def purge():
    for name in list(sys.modules):
        if name in ("modules", "modules_forge", "lib_merge.hosts.a1111", "lib_merge.hosts.forge") or \
                name.startswith(("modules.", "modules_forge.")):
            del sys.modules[name]
    import lib_merge.hosts

    for attr in ("a1111", "forge"):
        if hasattr(lib_merge.hosts, attr):
            delattr(lib_merge.hosts, attr)


def live(m):
    """Checkpoint key -> the tensor in the model's modules (read through Forge's names)."""
    objects = m.forge_objects_original
    modules = {"unet": objects.unet.model.diffusion_model, "clip": objects.clip.cond_stage_model,
               "vae": objects.vae.first_stage_model}
    out = {}
    for prefix, part, inner in FORGE_NAMES:
        for name, p in modules[part].named_parameters():
            if inner and not name.startswith(inner):
                continue
            out.setdefault(prefix + name[len(inner):], p.detach().clone())
    return out


@pytest.fixture
def forge(tmp_path, monkeypatch):
    purge()
    monkeypatch.syspath_prepend(str(HERE / "fakes"))
    monkeypatch.syspath_prepend(str(HERE / "fakes_forge"))
    if importlib.util.find_spec("gradio") is None:
        monkeypatch.setitem(sys.modules, "gradio", stubs.make_gradio())
    if importlib.util.find_spec("fastapi") is None:
        monkeypatch.setitem(sys.modules, "fastapi", stubs.make_fastapi())
    from modules import paths, processing, script_callbacks, scripts, sd_models, shared
    from modules_forge import main_entry, main_thread

    paths.data_path = str(tmp_path)  # the WebUI's data folder (our hash cache, the default history)

    folder = tmp_path / "models" / "Stable-diffusion"
    folder.mkdir(parents=True)
    sd_models.model_path = str(folder)
    a = synth.make_checkpoint(folder / "modelA.safetensors", "sd1", factor=16, seed=1)
    synth.make_checkpoint(folder / "modelB.safetensors", "sd1", factor=16, seed=2, base=a, noise=1.0)
    synth.make_checkpoint(folder / "modelC.safetensors", "sd1", factor=16, seed=3, base=a, noise=1.0)
    shared.opts.outdir_txt2img_samples = str(tmp_path / "out")
    shared.opts.outdir_txt2img_grids = str(tmp_path / "grids")
    shared.cmd_opts.ui_config_file = str(tmp_path / "ui-config.json")
    shared.opts.data["block_merger_history_file"] = str(tmp_path / "mergehistory.csv")
    sd_models.list_models()
    shared.opts.sd_model_checkpoint = "modelA.safetensors"
    main_entry.refresh_model_loading_parameters()  # Forge selects A at start; the first generation loads it
    ns = types.SimpleNamespace(folder=folder, tmp=tmp_path, processing=processing, sd_models=sd_models,
                               shared=shared, scripts=scripts, script_callbacks=script_callbacks,
                               main_entry=main_entry, main_thread=main_thread, runner=scripts.ScriptRunner())

    def txt2img(seed=7, n_iter=1, loras=(), script_args=None):
        p = processing.StableDiffusionProcessingTxt2Img(prompt="a cat", seed=seed, steps=4, sampler_name="Euler",
                                                        n_iter=n_iter, do_not_save_samples=True,
                                                        do_not_save_grid=True)
        p.forge_loras = list(loras)
        if script_args is not None:
            p.scripts = ns.runner
            p.script_args = [None, *script_args]
        return [im.tobytes() for im in processing.process_images(p).images]

    ns.txt2img = txt2img
    yield ns
    purge()


def host_of(forge):
    from lib_merge.hosts.forge import ForgeHost

    return ForgeHost(ROOT)


def expected(forge, recipe):
    paths = [forge.folder / n if n else None for n in (recipe.model_a, recipe.model_b, recipe.model_c)]
    ckpts = [open_checkpoint(p) if p else None for p in paths]
    try:
        r = Recipe(**{**recipe.__dict__, "model_a": str(paths[0]), "model_b": str(paths[1] or ""),
                      "model_c": str(paths[2] or "")})
        return {k: v.clone() for k, v in merge_to_dict(r, Models(*ckpts))[1].items()}
    finally:
        for c in ckpts:
            if c is not None:
                c.close()


def assert_live_is(m, state):
    now = live(m)
    checked = 0
    for key, value in state.items():
        if key in now:
            assert torch.equal(now[key], value.to(now[key].dtype)), key
            checked += 1
    assert checked > 100


RECIPE = Recipe("modelA.safetensors", "modelB.safetensors", alpha=0.3)


def test_merge_goes_into_forge_objects_and_survives_batches_and_reloads(forge):
    base = forge.txt2img(n_iter=2)
    m = forge.shared.sd_model
    service = MergeService(host_of(forge), log_merges=False)
    service.merge_and_load(RECIPE)
    assert forge.shared.sd_model is m
    assert_live_is(m, expected(forge, RECIPE))
    loads = [e for e in forge.sd_models.events if e[0] == "forge_load"]
    merged = forge.txt2img(n_iter=2)  # forge_model_reload at start and per batch; forge_objects reset per batch
    assert [e for e in forge.sd_models.events if e[0] == "forge_load"] == loads  # no reload from the file
    assert merged != base and merged == forge.txt2img(n_iter=2)
    assert_live_is(forge.shared.sd_model, expected(forge, RECIPE))
    assert service.host.loaded_identity() is not None
    assert m.sd_checkpoint_info.name_for_extra == service.host.loaded_identity().name


def test_restore_gives_the_base_image_back_bit_for_bit(forge):
    base = forge.txt2img()
    service = MergeService(host_of(forge), log_merges=False)
    service.merge_and_load(RECIPE)
    assert forge.txt2img() != base
    service.restore_base()
    assert forge.txt2img() == base
    assert service.host.loaded_identity() is None


def test_changed_checkpoint_option_reloads_and_the_merge_is_gone(forge):
    forge.txt2img()
    service = MergeService(host_of(forge), log_merges=False)
    service.merge_and_load(RECIPE)
    forge.main_entry.checkpoint_change("modelB.safetensors")
    forge.txt2img()
    assert forge.sd_models.events[-1][0] in ("forge_load", "forge_reload_skipped")
    assert ("forge_load", forge.sd_models.checkpoint_aliases["modelB.safetensors"].title) in forge.sd_models.events
    assert service.host.loaded_identity() is None
    with open_checkpoint(forge.folder / "modelB.safetensors") as b:
        now = live(forge.shared.sd_model)
        assert torch.equal(now[UNET], b.get(UNET).half())


def test_one_block_re_merge_recomputes_only_that_block(forge):
    forge.txt2img()
    service = MergeService(host_of(forge), log_merges=False)
    weights = ["0.3"] * 26
    service.merge_and_load(Recipe("modelA.safetensors", "modelB.safetensors", weights_alpha=",".join(weights)))
    weights[5] = "0.9"  # IN04
    second = Recipe("modelA.safetensors", "modelB.safetensors", weights_alpha=",".join(weights))
    outcome = service.merge_and_load(second)
    assert 0 < outcome.recomputed < len(outcome.plan.jobs)
    assert_live_is(forge.shared.sd_model, expected(forge, second))


def test_loras_applied_by_forge_work_on_the_merge_and_come_off(forge):
    delta = {UNET[len("model.diffusion_model."):]: torch.full((20, 20, 1, 1), 0.25)}
    forge.txt2img(loras=[("lora1", 1.0, delta)])  # a LoRA is in the weights (backed up by Forge's LoraLoader)
    service = MergeService(host_of(forge), log_merges=False)
    service.merge_and_load(RECIPE)
    want = expected(forge, RECIPE)
    assert_live_is(forge.shared.sd_model, want)  # the LoRA was taken out before writing: the merge alone
    plain = forge.txt2img()
    with_lora = forge.txt2img(loras=[("lora1", 1.0, delta)])
    assert with_lora != plain
    lora_weight = live(forge.shared.sd_model)[UNET]
    assert torch.equal(lora_weight, (want[UNET].half().float() + 0.25).half())  # applied on top of the merge
    assert forge.txt2img() == plain  # and it comes off again: Forge's backup holds the merge, not the base
    assert_live_is(forge.shared.sd_model, want)


def test_a_merge_that_does_not_fit_is_refused_and_nothing_changes(forge):
    forge.txt2img()
    host = host_of(forge)
    before = live(forge.shared.sd_model)
    with pytest.raises(MergeError, match="does not fit"):
        host.load_weights({UNET: torch.zeros(20, 20, 1, 1), TEXT: torch.zeros(3, 3)}, None)
    after = live(forge.shared.sd_model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_cancel_leaves_the_model_unchanged(forge):
    base = forge.txt2img()
    service = MergeService(host_of(forge), log_merges=False)
    with pytest.raises(MergeCancelled):
        service.merge_and_load(RECIPE, cancel=lambda: True)
    assert forge.txt2img() == base and service.host.loaded_identity() is None


def test_generation_goes_through_forges_main_thread(forge):
    from lib_merge.hosts.base import GenerationRequest

    forge.txt2img()
    host = host_of(forge)
    result = host.generate(GenerationRequest(prompt="a cat", steps=2, width=64, height=64, seed=3))
    assert len(result.images) == 1 and "generate" in forge.main_thread.calls


def test_entry_script_picks_the_forge_host_and_the_always_on_script_merges(forge):
    from lib_merge.hosts.forge import ForgeHost

    base = forge.txt2img()
    forge.scripts.load_scripts([(str(ENTRY), str(ROOT))])
    module = forge.scripts.loaded_scripts[str(ENTRY)]
    assert isinstance(module.EXTENSION.host, ForgeHost)
    forge.runner.initialize_scripts(is_img2img=False)
    forge.runner.setup_ui()
    merged = forge.txt2img(script_args=[json.dumps(RECIPE.to_dict())])
    assert merged != base
    assert_live_is(forge.shared.sd_model, expected(forge, RECIPE))
    assert forge.txt2img(script_args=[""]) == base  # no request: the user's choice (the base) comes back


def test_flux_in_forge(forge):
    folder = forge.folder
    a = synth.make_checkpoint(folder / "fluxA.safetensors", "flux-dev", 64, torch.bfloat16, seed=1,
                              components=["diffuser", "clip_l", "vae"])
    synth.make_checkpoint(folder / "fluxB.safetensors", "flux-dev", 64, torch.bfloat16, seed=2, base=a, noise=0.5,
                          components=["diffuser", "clip_l", "vae"])
    forge.sd_models.list_models()
    forge.main_entry.checkpoint_change("fluxA.safetensors")
    forge.txt2img()
    host = host_of(forge)
    from lib_merge.core.arch import BLOCKS_FLUX

    assert host.model_blocks() == BLOCKS_FLUX
    recipe = Recipe("fluxA.safetensors", "fluxB.safetensors", weights_alpha=",".join(["0.2"] * 30 + ["0.7"] * 31))
    MergeService(host, log_merges=False).merge_and_load(recipe)
    assert_live_is(forge.shared.sd_model, expected(forge, recipe))


def params_of(m):
    """Checkpoint key -> the model's Parameter object itself (not a copy)."""
    objects = m.forge_objects_original
    modules = {"unet": objects.unet.model.diffusion_model, "clip": objects.clip.cond_stage_model,
               "vae": objects.vae.first_stage_model}
    out = {}
    for prefix, part, inner in FORGE_NAMES[:3]:
        for name, p in modules[part].named_parameters():
            if not inner or name.startswith(inner):
                out[prefix + name[len(inner):]] = p
    return out


def test_the_merge_is_written_into_the_models_own_tensors_no_second_copy(forge, monkeypatch):
    forge.txt2img()
    m = forge.shared.sd_model
    before = {k: (p, p.data_ptr()) for k, p in params_of(m).items()}
    host = host_of(forge)
    monkeypatch.setattr(host, "load_weights", lambda *a: pytest.fail("the whole merge was built and loaded"))
    MergeService(host, log_merges=False).merge_and_load(RECIPE)
    after = params_of(m)
    assert all(after[k] is p and p.data_ptr() == ptr for k, (p, ptr) in before.items())
    assert_live_is(m, expected(forge, RECIPE))


def test_restore_copies_the_base_back_in_place_without_a_reload(forge):
    base = forge.txt2img()
    service = MergeService(host_of(forge), log_merges=False)
    service.merge_and_load(RECIPE)
    assert forge.txt2img() != base
    loads = [e for e in forge.sd_models.events if e[0] == "forge_load"]
    service.restore_base()
    assert [e for e in forge.sd_models.events if e[0] == "forge_load"] == loads
    assert forge.txt2img() == base
    with open_checkpoint(forge.folder / "modelA.safetensors") as a:
        assert_live_is(forge.shared.sd_model, {k: a.get(k) for k in a.keys()})


def test_a_vae_chosen_beside_the_checkpoint_is_neither_merged_nor_restored_over(forge):
    vae_path = forge.tmp / "external.vae.safetensors"
    vae = {k[len("first_stage_model."):]: torch.randn(v.shape, generator=torch.Generator().manual_seed(5))
           for k, v in expected(forge, RECIPE).items() if k.startswith("first_stage_model.")}
    safetensors.torch.save_file(vae, vae_path)
    forge.main_entry.module_list["external.vae.safetensors"] = str(vae_path)
    forge.main_entry.modules_change(["external.vae.safetensors"])
    forge.txt2img()
    want_vae = {"first_stage_model." + k: v for k, v in vae.items()}
    assert_live_is(forge.shared.sd_model, want_vae)
    service = MergeService(host_of(forge), log_merges=False)
    service.merge_and_load(RECIPE)
    assert_live_is(forge.shared.sd_model, want_vae)
    assert_live_is(forge.shared.sd_model, {k: v for k, v in expected(forge, RECIPE).items()
                                           if not k.startswith("first_stage_model.")})
    service.restore_base()
    assert_live_is(forge.shared.sd_model, want_vae)


def test_a_quantized_model_is_refused_before_anything_is_computed(forge):
    forge.txt2img()
    m = forge.shared.sd_model
    params_of(m)[UNET].gguf_cls = object()  # how Forge marks a gguf parameter
    before = live(m)
    service = MergeService(host_of(forge), log_merges=False)
    with pytest.raises(MergeError, match="quantized"):
        service.merge_and_load(RECIPE)
    after = live(m)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert service.host.loaded_identity() is None


def test_bare_flux_diffusion_models_merge_into_forges_prefixed_names(forge):
    folder = forge.folder
    prefix = "model.diffusion_model."
    bare = {}
    for name, seed in (("fluxA", 1), ("fluxB", 2)):
        full = synth.make_checkpoint(forge.tmp / f"{name}-full.safetensors", "flux-dev", 64, torch.bfloat16,
                                     seed=seed, components=["diffuser"])
        with open_checkpoint(full) as ckpt:
            bare[name] = {k[len(prefix):]: ckpt.get(k) for k in ckpt.keys() if k.startswith(prefix)}
        safetensors.torch.save_file(bare[name], folder / f"{name}.safetensors")
    forge.sd_models.list_models()
    forge.main_entry.checkpoint_change("fluxA.safetensors")
    forge.txt2img()
    recipe = Recipe("fluxA.safetensors", "fluxB.safetensors", alpha=0.25)
    MergeService(host_of(forge), log_merges=False).merge_and_load(recipe)
    now = live(forge.shared.sd_model)
    checked = 0
    for key, a in bare["fluxA"].items():  # float64 from the formula; the model stores fp16 (one rounding or two)
        want = a.double() * 0.75 + bare["fluxB"][key].double() * 0.25
        got = now[prefix + key].double()
        assert torch.allclose(got, want, rtol=2 ** -7, atol=1e-6), key
        checked += not torch.equal(a, bare["fluxB"][key])
    assert checked > 100


def test_a_merge_cancelled_half_way_puts_the_previous_merge_back_in_place(forge):
    forge.txt2img()
    service = MergeService(host_of(forge), log_merges=False, threads=1)
    service.merge_and_load(RECIPE)
    merged = forge.txt2img()
    asked = []

    def cancel_later():  # lets a few hundred keys be written first
        asked.append(1)
        return len(asked) > 300

    other = Recipe("modelA.safetensors", "modelC.safetensors", alpha=0.8)
    with pytest.raises(MergeCancelled):
        service.merge_and_load(other, cancel=cancel_later)
    assert len(asked) > 300  # it did stop half-way, after writing
    assert_live_is(forge.shared.sd_model, expected(forge, RECIPE))
    assert forge.txt2img() == merged
