"""modules_forge.main_entry: the checkpoint dropdown writes the option and the loading parameters (no load yet)."""

from modules import sd_models, shared

module_list = {}  # Forge: file name -> path of the VAE / text encoder files one may choose beside a checkpoint


def refresh_model_loading_parameters():
    info = sd_models.select_checkpoint()
    sd_models.model_data.forge_loading_parameters = dict(checkpoint_info=info,
                                                         additional_modules=list(getattr(
                                                             shared.opts, "forge_additional_modules", [])),
                                                         unet_storage_dtype=None)


def modules_change(names):
    """The VAE / Text Encoder dropdown: the option holds the files' paths; no load yet, as checkpoint_change."""
    shared.opts.forge_additional_modules = [module_list[name] for name in names]
    refresh_model_loading_parameters()
    return True


def checkpoint_change(name):
    shared.opts.set("sd_model_checkpoint", name) if hasattr(shared.opts, "set") else setattr(
        shared.opts, "sd_model_checkpoint", name)
    refresh_model_loading_parameters()
    return True
