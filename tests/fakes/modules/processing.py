"""modules.processing: StableDiffusionProcessingTxt2Img, process_images, Processed, create_infotext.

The fake "samples" an image whose pixels are a digest of the weights actually loaded (UNet and VAE now, and the
text encoder through the conditioning cache, keyed like the real one on `shared.sd_model.sd_checkpoint_info`) and
the seed, so two images are equal exactly when they were made from the same weights.
"""

import hashlib
import json
import random
from dataclasses import dataclass

from modules import images, sd_models, shared
from modules.shared import opts, state
from PIL import Image


def quote(text):
    if "," not in str(text) and "\n" not in str(text) and ":" not in str(text):
        return text
    return json.dumps(text, ensure_ascii=False)


@dataclass(repr=False)
class StableDiffusionProcessing:
    sd_model: object = None
    outpath_samples: str = None
    outpath_grids: str = None
    prompt: str = ""
    prompt_for_display: str = None
    negative_prompt: str = ""
    styles: list = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    seed_enable_extras: bool = True
    sampler_name: str = None
    scheduler: str = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool = None
    tiling: bool = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    extra_generation_params: dict = None
    overlay_images: list = None
    eta: float = None
    do_not_reload_embeddings: bool = False
    denoising_strength: float = None
    override_settings: dict = None
    override_settings_restore_afterwards: bool = True
    sampler_index: int = None
    refiner_checkpoint: str = None
    refiner_switch_at: float = None
    disable_extra_networks: bool = False

    cached_c = [None, None]  # class-level, shared by every instance, as in the WebUI

    scripts = None
    script_args = None
    sd_model_name = None
    sd_model_hash = None
    closed = False

    def __post_init__(self):
        self.extra_generation_params = self.extra_generation_params or {}
        self.override_settings = self.override_settings or {}
        self.styles = self.styles or []

    def close(self):
        self.closed = True

    def get_conds_with_caching(self, prompts):
        key = (tuple(prompts), self.steps, shared.sd_model.sd_checkpoint_info)
        cache = StableDiffusionProcessing.cached_c
        if cache[0] is not None and cache[0] == key:
            return cache[1]
        cond = shared.sd_model.get_learned_conditioning(prompts)
        cache[0], cache[1] = key, cond
        return cond


@dataclass(repr=False)
class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    enable_hr: bool = False
    denoising_strength: float = 0.75
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str = None
    hr_sampler_name: str = None
    hr_scheduler: str = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    force_task_id: str = None


class Processed:
    def __init__(self, p, images_list, seed=-1, info="", subseed=None, all_prompts=None, all_negative_prompts=None,
                 all_seeds=None, all_subseeds=None, index_of_first_image=0, infotexts=None, comments=""):
        self.images = images_list
        self.prompt = p.prompt if not isinstance(p.prompt, list) else p.prompt[0]
        self.negative_prompt = p.negative_prompt
        self.seed = seed
        self.info = info
        self.infotexts = infotexts or [info] * len(images_list)
        self.all_seeds = all_seeds or [seed]
        self.index_of_first_image = index_of_first_image
        self.width, self.height = p.width, p.height
        self.sampler_name = p.sampler_name
        self.cfg_scale = p.cfg_scale
        self.steps = p.steps
        self.batch_size = p.batch_size
        self.sd_model_name = p.sd_model_name
        self.sd_model_hash = p.sd_model_hash
        self.extra_generation_params = p.extra_generation_params
        self.comments = comments


def create_infotext(p, prompt, seed, negative_prompt=None):
    params = {
        "Steps": p.steps,
        "Sampler": p.sampler_name,
        "Schedule type": p.scheduler,
        "CFG scale": p.cfg_scale,
        "Seed": seed,
        "Face restoration": opts.face_restoration_model if p.restore_faces else None,
        "Size": f"{p.width}x{p.height}",
        "Model hash": p.sd_model_hash if opts.add_model_hash_to_info else None,
        "Model": p.sd_model_name if opts.add_model_name_to_info else None,
        "Denoising strength": p.extra_generation_params.get("Denoising strength"),
        "Tiling": "True" if p.tiling else None,
        **p.extra_generation_params,
    }
    text = ", ".join(k if k == v else f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    negative_prompt = p.negative_prompt if negative_prompt is None else negative_prompt
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{text}"


def init_hires(p):
    """StableDiffusionProcessingTxt2Img.init/calculate_target_resolution for the hires fix (scale only): the
    infotext fields and the final size."""
    if not getattr(p, "enable_hr", False):
        return p.width, p.height
    p.extra_generation_params["Denoising strength"] = p.denoising_strength
    latent = shared.latent_upscale_modes.get(p.hr_upscaler or shared.latent_upscale_default_mode)
    if latent is None and not any(u.name == p.hr_upscaler for u in shared.sd_upscalers):
        raise Exception(f"could not find upscaler named {p.hr_upscaler}")
    p.extra_generation_params["Hires upscale"] = p.hr_scale
    if p.hr_second_pass_steps:
        p.extra_generation_params["Hires steps"] = p.hr_second_pass_steps
    if p.hr_upscaler is not None:
        p.extra_generation_params["Hires upscaler"] = p.hr_upscaler
    return int(p.width * p.hr_scale), int(p.height * p.hr_scale)


def render(sd_model, cond, seed, width, height):
    """The fake sampler + VAE decode: a colour from (cond, UNet, VAE, seed) and a seed stripe; with "Pad
    prompt/negative prompt" on, the model's empty-prompt conditioning too (the real one pads with it when the
    prompt and the negative prompt differ in length)."""
    h = hashlib.sha256()
    h.update(cond.encode())
    if opts.pad_cond_uncond:
        h.update(sd_model.cond_stage_model_empty_prompt.encode())
    h.update(sd_model.weights_digest("model.diffusion_model").encode())
    h.update(sd_model.weights_digest("first_stage_model").encode())
    h.update(str(seed).encode())
    d = h.digest()
    size = (max(8, width // 16), max(8, height // 16))
    image = Image.new("RGB", size, (d[0], d[1], d[2]))
    image.paste((d[3], d[4], d[5]), (0, 0, size[0], 2))
    return image


def setup_prompts(p):
    """StableDiffusionProcessing.setup_prompts: a list prompt is one prompt per image (the batch is sliced from
    it), a string is repeated batch_size * n_iter times; styles go on each."""
    all_prompts = p.prompt if isinstance(p.prompt, list) else p.batch_size * p.n_iter * [p.prompt]
    p.all_prompts = [shared.prompt_styles.apply_styles_to_prompt(x, p.styles) for x in all_prompts]


def process_images(p):
    if p.scripts is not None:
        p.scripts.before_process(p)
    stored = {k: opts.data[k] for k in p.override_settings if k in opts.data}
    try:
        sd_models.reload_model_weights()
        for k, v in p.override_settings.items():  # after before_process, without callbacks, as the real one
            opts.set(k, v, is_api=True, run_callbacks=False)
        return process_images_inner(p)
    finally:
        if p.override_settings_restore_afterwards:
            for k, v in stored.items():
                setattr(opts, k, v)


def process_images_inner(p):
    if state.job_count == -1:
        state.job_count = p.n_iter
    seed = p.seed if p.seed not in (-1, None) else random.randrange(2**32)
    p.sd_model_name = shared.sd_model.sd_checkpoint_info.name_for_extra
    p.sd_model_hash = shared.sd_model.sd_model_hash
    if p.scripts is not None:
        p.scripts.process(p)
    if p.restore_faces is None:
        p.restore_faces = opts.face_restoration
    if p.tiling is None:
        p.tiling = opts.tiling
    final_width, final_height = init_hires(p)
    setup_prompts(p)
    negative = shared.prompt_styles.apply_negative_styles_to_prompt(p.negative_prompt, p.styles)
    output, infotexts, seeds = [], [], []
    for n in range(p.n_iter):
        if state.interrupted or state.stopping_generation:
            break
        sd_models.reload_model_weights()
        prompts = p.all_prompts[n * p.batch_size:(n + 1) * p.batch_size]
        if len(prompts) == 0:
            break
        conds = p.get_conds_with_caching(prompts)
        for i, prompt in enumerate(prompts):
            s = seed + n * p.batch_size + i
            image = render(shared.sd_model, conds[i], s, final_width, final_height)
            info = create_infotext(p, prompt, s, negative)
            if not p.do_not_save_samples and opts.samples_save:
                images.save_image(image, p.outpath_samples, "", s, prompt, opts.samples_format, info=info, p=p)
            output.append(image)
            infotexts.append(info)
            seeds.append(s)
        state.nextjob()
    index_of_first_image = 0
    if len(output) > 1 and opts.return_grid:
        grid = images.image_grid(output, p.batch_size)
        output.insert(0, grid)
        infotexts.insert(0, infotexts[0])
        index_of_first_image = 1
        if not p.do_not_save_grid and opts.grid_save:
            images.save_image(grid, p.outpath_grids, "grid", seed, p.all_prompts[0], opts.grid_format,
                              info=infotexts[0], short_filename=True, grid=True, p=p)
    return Processed(p, output, seed, infotexts[0] if infotexts else "", all_seeds=seeds,
                     index_of_first_image=index_of_first_image, infotexts=infotexts)

