"""modules.processing as Forge runs it: A1111's processing classes and infotext (from the A1111 fake), and Forge's
`process_images`: `forge_model_reload()` at the start and at every batch, `forge_objects` reset from
`forge_objects_original.shallow_copy()` every batch, LoRAs applied by `load_networks` (patcher clones, a
`current_lora_hash` check) and set as `forge_objects_after_applying_lora`, patches refreshed into the weights when
the model is used (memory_management.load_model_gpu). A LoRA request is `p.forge_loras = [(name, strength,
{forge key: delta})]`; the conditioning cache also keys on the LoRA hash, as Forge's keys on extra networks."""

import os

from modules import sd_models, shared

_A1111 = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "fakes", "modules",
                      "processing.py")
with open(_A1111, encoding="utf-8") as _f:
    exec(compile(_f.read(), _A1111, "exec"))


def _get_conds_with_caching(self, prompts):
    key = (tuple(prompts), self.steps, shared.sd_model.sd_checkpoint_info, shared.sd_model.current_lora_hash)
    cache = StableDiffusionProcessing.cached_c  # noqa: F821  (defined by the A1111 code above)
    if cache[0] is not None and cache[0] == key:
        return cache[1]
    cond = shared.sd_model.get_learned_conditioning(prompts)
    cache[0], cache[1] = key, cond
    return cond


def _clear_prompt_cache(self):
    StableDiffusionProcessing.cached_c[0] = None  # noqa: F821


StableDiffusionProcessing.get_conds_with_caching = _get_conds_with_caching  # noqa: F821
StableDiffusionProcessing.clear_prompt_cache = _clear_prompt_cache  # noqa: F821


def load_networks(m, loras):
    compiled = str([(name, strength) for name, strength, _ in loras])
    if m.current_lora_hash == compiled:
        return
    m.current_lora_hash = compiled
    m.forge_objects.unet = m.forge_objects_original.unet
    m.forge_objects.clip = m.forge_objects_original.clip
    for name, strength, patches in loras:
        for part in ("unet", "clip"):
            patcher = getattr(m.forge_objects, part).clone()
            patcher.add_patches(filename=name, patches=patches, strength_patch=strength)
            setattr(m.forge_objects, part, patcher)
    m.forge_objects_after_applying_lora = m.forge_objects.shallow_copy()


def process_images(p):
    if p.scripts is not None:
        p.scripts.before_process(p)
    p.sd_model, _ = sd_models.forge_model_reload()  # manage_model_and_prompt_cache
    return process_images_inner(p)


def _batch_model(p):
    """The start of one batch in Forge's process_images_inner."""
    sd_models.forge_model_reload()
    m = shared.sd_model
    m.forge_objects = m.forge_objects_original.shallow_copy()
    load_networks(m, getattr(p, "forge_loras", []))
    m.forge_objects = m.forge_objects_after_applying_lora.shallow_copy()
    for part in ("unet", "clip"):
        getattr(m.forge_objects, part).refresh_loras()
    return m


_a1111_inner = process_images_inner  # noqa: F821


def process_images_inner(p):  # noqa: F811
    sd_models.reload_model_weights = lambda *a, **k: _batch_model(p)  # the A1111 loop's per-batch hook
    try:
        return _a1111_inner(p)
    finally:
        sd_models.reload_model_weights = _stub_reload


def _stub_reload(*args, **kwargs):
    pass
