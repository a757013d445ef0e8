"""modules.sd_models (v1.10.1 semantics) over the fake model.

Kept faithful where integrations break: CheckpointInfo fields and identity semantics (no __eq__), registration and
`calculate_shorthash` (hashes the file and re-registers under the new title), `reload_model_weights` returning at
once when `sd_model.sd_model_checkpoint == info.filename`, in-place loading with unhijack/hijack for the same config
and a full rebuild otherwise, `load_model` trashing the old model to "meta" first and consuming the state dict it is
given, `opts.sd_model_checkpoint` written unless `SkipWritingToConfig`, fp8 storage, the external VAE re-applied.
"""

import collections
import os
import re
import sys

import safetensors.torch
import torch
from modules import devices, hashes, paths, script_callbacks, sd_hijack, sd_unet, sd_vae, shared
from modules.fake_model import FakeSdModel, config_of

model_dir = "Stable-diffusion"
model_path = os.path.abspath(os.path.join(paths.models_path, model_dir))

checkpoints_list = {}
checkpoint_aliases = {}
checkpoints_loaded = collections.OrderedDict()

events = []  # fake-only: ("load_model", title) / ("reload", title) / ("reload_skipped", title) ...


def replace_key(d, key, new_key, value):
    keys = list(d.keys())
    d[new_key] = value
    if key not in keys:
        return d
    index = keys.index(key)
    keys[index] = new_key
    new_d = {k: d[k] for k in keys}
    d.clear()
    d.update(new_d)
    return d


def read_metadata_from_safetensors(filename):
    """The header's __metadata__, read by hand as the WebUI does (a file with truncated data still has one)."""
    import json

    with open(filename, mode="rb") as file:
        metadata_len = int.from_bytes(file.read(8), "little")
        json_start = file.read(2)
        assert metadata_len > 2 and json_start in (b'{"', b"{'"), f"{filename} is not a safetensors file"
        res = {}
        json_obj = json.loads(json_start + file.read(metadata_len - 2))
        for k, v in json_obj.get("__metadata__", {}).items():
            res[k] = v
            if isinstance(v, str) and v[0:1] == "{":
                try:
                    res[k] = json.loads(v)
                except Exception:
                    pass
        return res


class CheckpointInfo:
    def __init__(self, filename):
        self.filename = filename
        abspath = os.path.abspath(filename)
        abs_ckpt_dir = os.path.abspath(shared.cmd_opts.ckpt_dir) if shared.cmd_opts.ckpt_dir is not None else None
        self.is_safetensors = os.path.splitext(filename)[1].lower() == ".safetensors"
        if abs_ckpt_dir and abspath.startswith(abs_ckpt_dir):
            name = abspath.replace(abs_ckpt_dir, "")
        elif abspath.startswith(model_path):
            name = abspath.replace(model_path, "")
        else:
            name = os.path.basename(filename)
        if name.startswith("\\") or name.startswith("/"):
            name = name[1:]
        self.metadata = {}
        if self.is_safetensors:
            try:
                self.metadata = read_metadata_from_safetensors(filename)
            except Exception as e:  # the WebUI reports it (errors.display) and goes on
                print(f"reading metadata for {filename}: {e}", file=sys.stderr)
        self.modelspec_thumbnail = None
        self.name = name
        self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
        self.model_name = os.path.splitext(name.replace("/", "_").replace("\\", "_"))[0]
        self.hash = model_hash(filename)
        self.sha256 = hashes.sha256_from_cache(self.filename, f"checkpoint/{name}")
        self.shorthash = self.sha256[0:10] if self.sha256 else None
        self.title = name if self.shorthash is None else f"{name} [{self.shorthash}]"
        self.short_title = (self.name_for_extra if self.shorthash is None
                            else f"{self.name_for_extra} [{self.shorthash}]")
        self.ids = [self.hash, self.model_name, self.title, name, self.name_for_extra, f"{name} [{self.hash}]"]
        if self.shorthash:
            self.ids += [self.shorthash, self.sha256, f"{self.name} [{self.shorthash}]",
                         f"{self.name_for_extra} [{self.shorthash}]"]

    def register(self):
        checkpoints_list[self.title] = self
        for id_ in self.ids:
            checkpoint_aliases[id_] = self

    def calculate_shorthash(self):
        self.sha256 = hashes.sha256(self.filename, f"checkpoint/{self.name}")
        if self.sha256 is None:
            return
        shorthash = self.sha256[0:10]
        if self.shorthash == self.sha256[0:10]:
            return self.shorthash
        self.shorthash = shorthash
        if self.shorthash not in self.ids:
            self.ids += [self.shorthash, self.sha256, f"{self.name} [{self.shorthash}]",
                         f"{self.name_for_extra} [{self.shorthash}]"]
        old_title = self.title
        self.title = f"{self.name} [{self.shorthash}]"
        self.short_title = f"{self.name_for_extra} [{self.shorthash}]"
        replace_key(checkpoints_list, old_title, self.title, self)
        self.register()
        return self.shorthash


def model_hash(filename):
    """The legacy 8-hex hash of 64 KB at offset 1 MB (empty for the fake's tiny files, as the real one would be)."""
    try:
        with open(filename, "rb") as file:
            import hashlib

            m = hashlib.sha256()
            file.seek(0x100000)
            m.update(file.read(0x10000))
            return m.hexdigest()[0:8]
    except FileNotFoundError:
        return "NOFILE"


def checkpoint_tiles(use_short=False):
    return [x.short_title if use_short else x.title for x in checkpoints_list.values()]


def list_models():
    checkpoints_list.clear()
    checkpoint_aliases.clear()
    found = []
    for root in [model_path] + ([shared.cmd_opts.ckpt_dir] if shared.cmd_opts.ckpt_dir else []):
        if os.path.isdir(root):
            for dirpath, _, files in os.walk(root):
                found += [os.path.join(dirpath, f) for f in files if f.endswith((".ckpt", ".safetensors"))
                          and not f.endswith((".vae.ckpt", ".vae.safetensors"))]
    for filename in sorted(found, key=str.lower):
        CheckpointInfo(filename).register()


re_strip_checksum = re.compile(r"\s*\[[^]]+]\s*$")


def get_closet_checkpoint_match(search_string):
    if not search_string:
        return None
    info = checkpoint_aliases.get(search_string, None)
    if info is not None:
        return info
    found = sorted([i for i in checkpoints_list.values() if search_string in i.title], key=lambda x: len(x.title))
    if found:
        return found[0]
    without = re.sub(re_strip_checksum, "", search_string)
    found = sorted([i for i in checkpoints_list.values() if without in i.title], key=lambda x: len(x.title))
    return found[0] if found else None


def select_checkpoint():
    model_checkpoint = shared.opts.sd_model_checkpoint
    info = checkpoint_aliases.get(model_checkpoint, None)
    if info is not None:
        return info
    if len(checkpoints_list) == 0:
        raise FileNotFoundError("No checkpoints found.")
    info = next(iter(checkpoints_list.values()))
    if model_checkpoint is not None:
        print(f"Checkpoint {model_checkpoint} not found; loading fallback {info.title}", file=sys.stderr)
    return info


checkpoint_dict_replacements_sd1 = {
    "cond_stage_model.transformer.embeddings.": "cond_stage_model.transformer.text_model.embeddings.",
    "cond_stage_model.transformer.encoder.": "cond_stage_model.transformer.text_model.encoder.",
    "cond_stage_model.transformer.final_layer_norm.": "cond_stage_model.transformer.text_model.final_layer_norm.",
}


def get_state_dict_from_checkpoint(pl_sd):
    pl_sd = pl_sd.pop("state_dict", pl_sd)
    sd = {}
    for k, v in pl_sd.items():
        for text, replacement in checkpoint_dict_replacements_sd1.items():
            if k.startswith(text):
                k = replacement + k[len(text):]
        sd[k] = v
    pl_sd.clear()
    pl_sd.update(sd)
    return pl_sd


def read_state_dict(checkpoint_file, print_global_state=False, map_location=None):
    if checkpoint_file.lower().endswith(".safetensors"):
        pl_sd = safetensors.torch.load_file(checkpoint_file, device=map_location or "cpu")
    else:
        pl_sd = torch.load(checkpoint_file, map_location=map_location or "cpu", weights_only=True)
    return get_state_dict_from_checkpoint(pl_sd)


def get_checkpoint_state_dict(checkpoint_info, timer=None):
    checkpoint_info.calculate_shorthash()
    if checkpoint_info in checkpoints_loaded:
        return checkpoints_loaded[checkpoint_info]
    return read_state_dict(checkpoint_info.filename)


class SkipWritingToConfig:
    skip = False
    previous = None

    def __enter__(self):
        self.previous = SkipWritingToConfig.skip
        SkipWritingToConfig.skip = True
        return self

    def __exit__(self, exc_type, exc_value, exc_traceback):
        SkipWritingToConfig.skip = self.previous


def check_fp8(model):
    if model is None:
        return None
    if shared.opts.fp8_storage == "Enable":
        return True
    if getattr(model, "is_sdxl", False) and shared.opts.fp8_storage == "Enable for SDXL":
        return True
    return False


def load_model_weights(model, checkpoint_info, state_dict, timer=None):
    sd_model_hash = checkpoint_info.calculate_shorthash()
    if devices.fp8:
        model.half()  # prevent loading into fp8
    if not SkipWritingToConfig.skip:
        shared.opts.data["sd_model_checkpoint"] = checkpoint_info.title
    if state_dict is None:
        state_dict = get_checkpoint_state_dict(checkpoint_info, timer)
    model.load_state_dict(state_dict, strict=False)
    if shared.cmd_opts.no_half:  # the WebUI on a CPU: an fp16 file's values widened exactly
        model.float()
    else:
        model.half()
    if check_fp8(model):
        devices.fp8 = True
        first_stage = model.first_stage_model  # the VAE stays fp16
        model.first_stage_model = None
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                module.to(torch.float8_e4m3fn)
        model.first_stage_model = first_stage
    else:
        devices.fp8 = False
    model.sd_model_hash = sd_model_hash
    model.sd_model_checkpoint = checkpoint_info.filename
    model.sd_checkpoint_info = checkpoint_info
    shared.opts.data["sd_checkpoint_hash"] = checkpoint_info.sha256
    sd_vae.delete_base_vae()
    sd_vae.clear_loaded_vae()
    vae_file, vae_source = sd_vae.resolve_vae(checkpoint_info.filename).tuple()
    sd_vae.load_vae(model, vae_file, vae_source)


class SdModelData:
    def __init__(self):
        self.sd_model = None
        self.loaded_sd_models = []
        self.was_loaded_at_least_once = False
        self.vae_reloads = 0

    def get_sd_model(self):
        if self.was_loaded_at_least_once:
            return self.sd_model
        if self.sd_model is None:
            load_model()
        return self.sd_model

    def set_sd_model(self, v, already_loaded=False):
        self.sd_model = v
        if already_loaded:
            self.was_loaded_at_least_once = True
        if v is not None and v not in self.loaded_sd_models:
            self.loaded_sd_models.insert(0, v)
        self.loaded_sd_models[:] = [m for m in self.loaded_sd_models if m is v]


model_data = SdModelData()


def send_model_to_cpu(m):
    if m is not None and not m.lowvram:
        m.to(devices.cpu)


def send_model_to_device(m):
    m.to(devices.device)


def send_model_to_trash(m):
    m.to(device="meta")
    devices.torch_gc()


def get_empty_cond(sd_model):
    return sd_model.get_learned_conditioning([""])[0]


def load_model(checkpoint_info=None, already_loaded_state_dict=None):
    checkpoint_info = checkpoint_info or select_checkpoint()
    events.append(("load_model", checkpoint_info.title))
    if model_data.sd_model:
        send_model_to_trash(model_data.sd_model)
        model_data.sd_model = None
        devices.torch_gc()
    if already_loaded_state_dict is not None:
        state_dict = already_loaded_state_dict
    else:
        state_dict = get_checkpoint_state_dict(checkpoint_info)
    spec = {k: (tuple(v.shape), v.dtype) for k, v in state_dict.items()}
    sd_model = FakeSdModel(spec)
    load_model_weights(sd_model, checkpoint_info, state_dict)
    state_dict.clear()  # LoadStateDictOnMeta pops every key: the caller's dict is consumed
    sd_model.to(devices.device)
    sd_hijack.model_hijack.hijack(sd_model)
    sd_model.eval()
    model_data.set_sd_model(sd_model)
    model_data.was_loaded_at_least_once = True
    script_callbacks.model_loaded_callback(sd_model)
    with devices.autocast(), torch.no_grad():
        sd_model.cond_stage_model_empty_prompt = get_empty_cond(sd_model)
    return sd_model


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    checkpoint_info = info or select_checkpoint()
    if not sd_model:
        sd_model = model_data.sd_model
    if sd_model is None:
        current_checkpoint_info = None
    else:
        current_checkpoint_info = sd_model.sd_checkpoint_info
        if check_fp8(sd_model) != devices.fp8:
            forced_reload = True
        elif sd_model.sd_model_checkpoint == checkpoint_info.filename and not forced_reload:
            events.append(("reload_skipped", checkpoint_info.title))
            return sd_model
    events.append(("reload", checkpoint_info.title))
    if sd_model is not None:
        sd_unet.apply_unet("None")
        send_model_to_cpu(sd_model)
        sd_hijack.model_hijack.undo_hijack(sd_model)
    state_dict = get_checkpoint_state_dict(checkpoint_info)
    spec = {k: (tuple(v.shape), v.dtype) for k, v in state_dict.items()}
    if sd_model is None or config_of(spec) != sd_model.used_config:
        if sd_model is not None:
            send_model_to_trash(sd_model)
        load_model(checkpoint_info, already_loaded_state_dict=state_dict)
        return model_data.sd_model
    try:
        load_model_weights(sd_model, checkpoint_info, state_dict)
    except Exception:
        load_model_weights(sd_model, current_checkpoint_info, None)
        raise
    finally:
        sd_hijack.model_hijack.hijack(sd_model)
        if not sd_model.lowvram:
            sd_model.to(devices.device)
    script_callbacks.model_loaded_callback(sd_model)
    model_data.set_sd_model(sd_model)
    sd_unet.apply_unet()
    return sd_model


def unload_model_weights(sd_model=None, info=None):
    send_model_to_cpu(sd_model or shared.sd_model)
    return sd_model
