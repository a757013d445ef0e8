"""modules.shared: opts, state, cmd_opts, and `sd_model` as a module property that loads the model lazily."""

import argparse
import os
import sys
import types

from modules import options, paths, shared_state, styles
from modules.options import OptionInfo  # noqa: F401  (the real shared re-exports it)

cmd_opts = argparse.Namespace(
    ckpt_dir=None, ckpt=None, no_half=False, no_half_vae=False, lowvram=False, medvram=False, nowebui=False,
    api=False, ui_config_file=os.path.join(paths.data_path, "ui-config.json"), data_dir=paths.data_path,
)

_defaults = {
    "sd_model_checkpoint": OptionInfo(None, "Stable Diffusion checkpoint"),
    "sd_checkpoint_hash": OptionInfo("", "SHA256 of the checkpoint"),
    "sd_vae": OptionInfo("Automatic", "SD VAE"),
    "sd_unet": OptionInfo("Automatic", "SD Unet"),
    "fp8_storage": OptionInfo("Disable", "FP8 weight"),
    "outdir_samples": OptionInfo("", "Output directory for images"),
    "outdir_txt2img_samples": OptionInfo("outputs/txt2img-images", "txt2img output"),
    "outdir_grids": OptionInfo("", "Output directory for grids"),
    "outdir_txt2img_grids": OptionInfo("outputs/txt2img-grids", "txt2img grids"),
    "samples_format": OptionInfo("png", "File format for images"),
    "grid_format": OptionInfo("png", "File format for grids"),
    "grid_save": OptionInfo(True, "Always save all generated image grids"),
    "samples_save": OptionInfo(True, "Always save all generated images"),
    "return_grid": OptionInfo(True, "Show grid in gallery"),
    "add_model_hash_to_info": OptionInfo(True, "Add model hash to infotext"),
    "add_model_name_to_info": OptionInfo(True, "Add model name to infotext"),
    "face_restoration": OptionInfo(False, "Restore faces"),
    "face_restoration_model": OptionInfo("CodeFormer", "Face restoration model"),
    "tiling": OptionInfo(False, "Tiling"),
    "pad_cond_uncond": OptionInfo(False, "Pad prompt/negative prompt"),
}

opts = options.Options(_defaults)
state = shared_state.State()
hide_dirs = {}
weight_load_location = None
prompt_styles = styles.StyleDatabase([])
latent_upscale_default_mode = "Latent"
latent_upscale_modes = {"Latent": {"mode": "bilinear", "antialias": False},
                        "Latent (nearest)": {"mode": "nearest", "antialias": False}}
sd_upscalers = [types.SimpleNamespace(name=n) for n in ("None", "Lanczos", "Nearest")]


class _Shared(types.ModuleType):
    """The real `shared` module swaps its class too (`shared_items.Shared`), so `shared.sd_model` triggers a load."""

    @property
    def sd_model(self):
        from modules import sd_models

        return sd_models.model_data.get_sd_model()

    @sd_model.setter
    def sd_model(self, value):
        from modules import sd_models

        sd_models.model_data.set_sd_model(value)


sys.modules[__name__].__class__ = _Shared
