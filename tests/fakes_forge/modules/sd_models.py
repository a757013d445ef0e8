"""modules.sd_models as Forge has it: A1111's checkpoint registry (CheckpointInfo, list_models, select_checkpoint,
... from the A1111 fake), the A1111 loading API stubbed out (`load_model`, `reload_model_weights`,
`load_model_weights`, `read_state_dict` return None), `model_data` with `forge_loading_parameters` and `forge_hash`, and
`forge_model_reload`, which loads from the file only when the parameters' string differs from `forge_hash`. The
loader splits a checkpoint into Forge's parts and names: U-Net `model.diffusion_model.*`, text encoders
(`cond_stage_model.transformer.*` -> `clip_l.transformer.*`), VAE (`first_stage_model.*`); fp16 storage, VAE fp32."""

import os

import safetensors.torch
import torch

from modules import script_callbacks, shared
from modules.forge_model import ForgeEngine, Tree

_A1111 = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "fakes", "modules", "sd_models.py")
with open(_A1111, encoding="utf-8") as _f:
    exec(compile(_f.read(), _A1111, "exec"))  # the shared registry code, in this module's namespace

events = []  # fake-only: ("forge_load", title), ("forge_reload_skipped", title)


def load_model(checkpoint_info=None, already_loaded_state_dict=None):
    pass


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    pass


def load_model_weights(model, checkpoint_info, state_dict, timer=None):
    pass


def read_state_dict(checkpoint_file, print_global_state=False, map_location=None):
    pass


def get_empty_cond(sd_model):
    pass


class FakeInitialModel:
    def __init__(self):
        self.cond_stage_model = None
        self.chunk_length = 75


class SdModelData:
    def __init__(self):
        self.sd_model = FakeInitialModel()
        self.forge_loading_parameters = {}
        self.forge_hash = ""

    def get_sd_model(self):
        return self.sd_model

    def set_sd_model(self, v):
        self.sd_model = v


model_data = SdModelData()


def forge_loader(path, additional_state_dicts=()):
    """backend.loader.forge_loader: a file path (and additional module files) in, a ForgeDiffusionEngine out. As
    backend/loader.py: a file with no `model.diffusion_model.` key is a bare diffusion model (every key gets that
    prefix, preprocess_state_dict); an additional file with `decoder.conv_in.weight` is a VAE that replaces the
    checkpoint's (replace_state_dict)."""
    state = safetensors.torch.load_file(path)
    if not any(k.startswith("model.diffusion_model") for k in state):
        state = {f"model.diffusion_model.{k}": v for k, v in state.items()}
    for extra in additional_state_dicts or ():
        module = safetensors.torch.load_file(extra)
        if "decoder.conv_in.weight" in module:
            state = {k: v for k, v in state.items() if not k.startswith(("first_stage_model.", "vae."))}
            state.update({"first_stage_model." + k: v for k, v in module.items()})
    unet, clip, vae = {}, {}, {}
    for key, tensor in state.items():
        if not tensor.is_floating_point():
            continue
        if key.startswith("model.diffusion_model."):
            unet[key[len("model.diffusion_model."):]] = tensor.half()
        elif key.startswith("cond_stage_model.transformer."):
            clip["clip_l.transformer." + key[len("cond_stage_model.transformer."):]] = tensor.half()
        elif key.startswith("text_encoders."):
            clip[key[len("text_encoders."):]] = tensor.half()
        elif key.startswith(("first_stage_model.", "vae.")):
            vae[key.split(".", 1)[1]] = tensor.float()
    return ForgeEngine(Tree.from_flat(unet), Tree.from_flat(clip), Tree.from_flat(vae))


@torch.inference_mode()  # as Forge's: the parameters it loads are inference tensors
def forge_model_reload():
    current_hash = str(model_data.forge_loading_parameters)
    if model_data.forge_hash == current_hash:
        events.append(("forge_reload_skipped", model_data.forge_loading_parameters["checkpoint_info"].title))
        return model_data.sd_model, False
    model_data.sd_model = None
    checkpoint_info = model_data.forge_loading_parameters["checkpoint_info"]
    sd_model = forge_loader(checkpoint_info.filename, model_data.forge_loading_parameters.get("additional_modules"))
    sd_model.extra_generation_params = {}
    sd_model.sd_checkpoint_info = checkpoint_info
    sd_model.filename = checkpoint_info.filename
    sd_model.sd_model_hash = checkpoint_info.calculate_shorthash()
    shared.opts.data["sd_checkpoint_hash"] = checkpoint_info.sha256
    model_data.set_sd_model(sd_model)
    events.append(("forge_load", checkpoint_info.title))
    script_callbacks.model_loaded_callback(sd_model)
    model_data.forge_hash = current_hash
    return sd_model, True
