"""A tiny ForgeDiffusionEngine: not an nn.Module; `forge_objects` (unet patcher, clip, vae) hold real modules named as
Forge names them (save_checkpoint's prefixes), each module with a LoraLoader that backs weights up and puts the
backups back (replacing the Parameter objects) on its next refresh, as backend/patcher/lora.py does."""

import hashlib

import torch


class Tree(torch.nn.Module):
    """A module whose parameters carry dotted names (built from a flat state dict)."""

    @classmethod
    def from_flat(cls, flat):
        root = cls()
        for name, tensor in flat.items():
            *path, leaf = name.split(".")
            module = root
            for part in path:
                if not hasattr(module, part):
                    module.add_module(part, cls())
                module = getattr(module, part)
            module.register_parameter(leaf, torch.nn.Parameter(tensor, requires_grad=False))
        return root


def set_attr_raw(module, key, value):
    *path, leaf = key.split(".")
    for part in path:
        module = getattr(module, part)
    module._parameters[leaf] = value


class LoraLoader:
    def __init__(self, model):
        self.model = model
        self.backup = {}
        self.online_backup = []
        self.loaded_hash = str([])
        self.refreshes = 0

    @torch.no_grad()
    def refresh(self, lora_patches, offload_device="cpu", force_refresh=False):
        hashes = str(list(lora_patches.keys()))
        if hashes == self.loaded_hash and not force_refresh:
            return
        self.refreshes += 1
        for key, weight in self.backup.items():  # restore: the backed-up tensors replace the parameters
            set_attr_raw(self.model, key, torch.nn.Parameter(weight, requires_grad=False))
        self.backup = {}
        params = dict(self.model.named_parameters())
        for (_, strength, _, _), patches in lora_patches.items():
            for key, delta in patches.items():
                weight = params[key]
                if key not in self.backup:
                    self.backup[key] = weight.detach().to(offload_device, copy=True)
                merged = (weight.float() + strength * delta.float()).to(weight.dtype)
                set_attr_raw(self.model, key, torch.nn.Parameter(merged, requires_grad=False))
                params[key] = dict(self.model.named_parameters())[key]
        self.loaded_hash = hashes


class Patcher:
    """ModelPatcher: clones share the module (and its LoraLoader); LoRA patches live on the clone."""

    def __init__(self, module):
        self.module = module
        if not hasattr(module, "lora_loader"):
            module.lora_loader = LoraLoader(module)
        self.lora_patches = {}

    def clone(self):
        n = type(self).__new__(type(self))
        n.__dict__.update(self.__dict__)
        n.lora_patches = self.lora_patches.copy()
        return n

    def add_patches(self, *, filename, patches, strength_patch=1.0, strength_model=1.0, online_mode=False):
        names = {k for k, _ in self.module.named_parameters()}
        self.lora_patches[(filename, strength_patch, strength_model, online_mode)] = {
            k: v for k, v in patches.items() if k in names}

    def refresh_loras(self):
        self.module.lora_loader.refresh(lora_patches=self.lora_patches)


class UnetPatcher(Patcher):
    def __init__(self, diffusion_model):
        self.model = torch.nn.Module()
        self.model.diffusion_model = diffusion_model
        super().__init__(diffusion_model)


class CLIP(Patcher):
    def __init__(self, cond_stage_model):
        self.cond_stage_model = cond_stage_model
        super().__init__(cond_stage_model)


class VAE(Patcher):
    def __init__(self, first_stage_model):
        self.first_stage_model = first_stage_model
        super().__init__(first_stage_model)


class ForgeObjects:
    def __init__(self, unet, clip, vae, clipvision=None):
        self.unet, self.clip, self.vae, self.clipvision = unet, clip, vae, clipvision

    def shallow_copy(self):
        return ForgeObjects(self.unet, self.clip, self.vae, self.clipvision)


def _digest(h, module):
    for _, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())


class ForgeEngine:
    """What processing uses: get_learned_conditioning (CLIP weights), weights_digest (UNet/VAE of the CURRENT
    forge_objects, i.e. with LoRAs), is_sdxl; no state_dict/load_state_dict/to."""

    def __init__(self, unet, clip, vae):
        self.forge_objects = ForgeObjects(UnetPatcher(unet), CLIP(clip), VAE(vae))
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.current_lora_hash = str([])
        self.is_sdxl = False

    def get_learned_conditioning(self, prompts):
        h = hashlib.sha256()
        _digest(h, self.forge_objects.clip.cond_stage_model)
        return [hashlib.sha256(h.digest() + p.encode()).hexdigest() for p in prompts]

    def weights_digest(self, part):
        h = hashlib.sha256()
        objects = self.forge_objects
        _digest(h, objects.unet.model.diffusion_model if part == "model.diffusion_model" else
                objects.vae.first_stage_model)
        return h.hexdigest()
