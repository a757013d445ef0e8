"""modules_forge.main_entry: the checkpoint dropdown writes the option and the loading parameters (no load yet)."""

from modules import sd_models, shared


def refresh_model_loading_parameters():
    info = sd_models.select_checkpoint()
    sd_models.model_data.forge_loading_parameters = dict(checkpoint_info=info, additional_modules=[],
                                                         unet_storage_dtype=None)


def checkpoint_change(name):
    shared.opts.set("sd_model_checkpoint", name) if hasattr(shared.opts, "set") else setattr(
        shared.opts, "sd_model_checkpoint", name)
    refresh_model_loading_parameters()
    return True
