"""modules.sd_vae: external VAE files. When one is loaded (`loaded_vae_file` not None) it replaces the checkpoint's
first_stage_model weights; `load_model_weights` re-applies the user's choice after every checkpoint load."""

import os

from modules import shared

vae_dict = {}  # name -> file
base_vae = None
loaded_vae_file = None
checkpoint_info = None


class VaeResolution:
    def __init__(self, vae, source):
        self.vae, self.source = vae, source

    def tuple(self):
        return self.vae, self.source


def refresh_vae_list():
    pass


def resolve_vae(checkpoint_file):
    choice = shared.opts.sd_vae
    if choice in vae_dict:
        return VaeResolution(vae_dict[choice], "from settings")
    return VaeResolution(None, None)


def load_vae_dict(filename, map_location=None):
    import safetensors.torch

    return safetensors.torch.load_file(filename)


def store_base_vae(model):
    global base_vae
    base_vae = {k: v.detach().clone() for k, v in model.first_stage_model.state_dict().items()}


def delete_base_vae():
    global base_vae
    base_vae = None


def clear_loaded_vae():
    global loaded_vae_file
    loaded_vae_file = None


def load_vae(model, vae_file=None, vae_source="from unknown source"):
    global loaded_vae_file
    if vae_file:
        if base_vae is None:
            store_base_vae(model)
        model.first_stage_model.load_state_dict(load_vae_dict(vae_file))
        loaded_vae_file = vae_file
    elif base_vae is not None:
        model.first_stage_model.load_state_dict(base_vae)
        loaded_vae_file = None
    model.first_stage_model.to(model.first_stage_model.decoder.conv_in.weight.dtype)


def reload_vae_weights(sd_model=None, vae_file=None):
    from modules import sd_models

    sd_model = sd_model or shared.sd_model
    vae_file = vae_file or resolve_vae(sd_model.sd_checkpoint_info.filename).vae
    if loaded_vae_file == vae_file:
        return sd_model
    load_vae(sd_model, vae_file)
    sd_models.model_data.vae_reloads += 1
    return sd_model


def vae_name(path):
    return os.path.splitext(os.path.basename(path))[0]
