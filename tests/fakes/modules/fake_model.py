"""The fake's Stable Diffusion model: a tiny real torch module built from a checkpoint's own key layout.

Fake-only (the real model is ldm's LatentDiffusion built from a yaml config). Leaf modules are the classes the
built-in Lora extension patches (Linear, Conv2d, norms), with its backup attributes and its `_load_from_state_dict`
patch, so a test can tell a module `load_state_dict` (which resets the backup) from a raw `param.copy_` (which does
not, and lets a later LoRA change "restore" stale weights).
"""

from __future__ import annotations

import hashlib

import torch
from networks import network_reset_cached_weight

XL_MARKER = "conditioner.embedders.1.model.ln_final.weight"
SD1_MARKER = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
KEEP_FP32 = ("alphas_cumprod",)


class _LoraMixin:
    network_current_names = ()
    network_weights_backup = None
    network_bias_backup = None

    def _load_from_state_dict(self, *args, **kwargs):  # lora_patches.py patches exactly this method
        network_reset_cached_weight(self)
        return super()._load_from_state_dict(*args, **kwargs)


class LoraLinear(_LoraMixin, torch.nn.Linear):
    pass


class LoraConv2d(_LoraMixin, torch.nn.Conv2d):
    pass


class LoraNorm(_LoraMixin, torch.nn.LayerNorm):
    pass


LORA_TYPES = (LoraLinear, LoraConv2d, LoraNorm)


def _leaf(path: str, tensors: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> torch.nn.Module | None:
    names = set(tensors)
    if not names <= {"weight", "bias"} or "weight" not in names:
        return None
    shape = tensors["weight"][0]
    bias = "bias" in names
    if len(shape) == 2 and path.endswith(("token_embedding", "position_embedding")) and not bias:
        return torch.nn.Embedding(shape[0], shape[1])
    if len(shape) == 2:
        return LoraLinear(shape[1], shape[0], bias=bias)
    if len(shape) == 4:
        return LoraConv2d(shape[1], shape[0], kernel_size=tuple(shape[2:]), bias=bias)
    if len(shape) == 1:
        return LoraNorm(shape[0], elementwise_affine=True, bias=bias)
    return None


def _generic(tensors) -> torch.nn.Module:
    module = torch.nn.Module()
    for name, (shape, dtype) in tensors.items():
        t = torch.empty(shape, dtype=dtype)
        if dtype.is_floating_point:
            module.register_parameter(name, torch.nn.Parameter(t, requires_grad=False))
        else:
            module.register_buffer(name, t)
    return module


def config_of(spec) -> str:
    """The fake `used_config`: family, input channels and the shapes of every key (real configs fix all shapes)."""
    family = "sdxl" if XL_MARKER in spec else "sd1" if SD1_MARKER in spec else "other"
    channels = spec[CONV_IN][0][1] if CONV_IN in spec else 4
    h = hashlib.sha256(repr(sorted((k, tuple(v[0])) for k, v in spec.items() if "model" in k)).encode())
    return f"{family}-{channels}ch-{h.hexdigest()[:8]}.yaml"


class FakeSdModel(torch.nn.Module):
    """Checkpoint keys map 1:1 to parameter names (before the hijack). Root-level keys become buffers."""

    def __init__(self, spec: dict[str, tuple[tuple[int, ...], torch.dtype]]):
        super().__init__()
        with torch.device("meta"):  # built empty, as the WebUI builds on meta and then loads the weights
            self._build(spec)
        self.to_empty(device="cpu")
        for t in self.state_dict().values():
            t.zero_()
        self.requires_grad_(False)
        self.sd_checkpoint_info = None
        self.sd_model_checkpoint = None
        self.sd_model_hash = None
        self.is_sdxl = XL_MARKER in spec
        self.is_sd1 = SD1_MARKER in spec
        self.is_sd2 = False
        self.lowvram = False
        self.used_config = config_of(spec)
        self.cond_stage_model_empty_prompt = None

    def _build(self, spec) -> None:
        by_module: dict[str, dict] = {}
        for key, (shape, dtype) in spec.items():
            path, _, name = key.rpartition(".")
            by_module.setdefault(path, {})[name] = (tuple(shape), dtype)
        parents = {p.rpartition(".")[0] for p in by_module} | {
            q for p in by_module for q in _prefixes(p)}
        for path in sorted(by_module, key=lambda p: p.count(".")):
            tensors = by_module[path]
            if path == "":
                for name, (shape, dtype) in tensors.items():
                    self.register_buffer(name, torch.empty(shape, dtype=dtype))
                continue
            leaf = None if path in parents else _leaf(path, tensors)
            module = leaf if leaf is not None else _generic(tensors)
            self._place(path, module)

    def _place(self, path: str, module: torch.nn.Module) -> None:
        parent = self
        parts = path.split(".")
        for part in parts[:-1]:
            child = parent._modules.get(part)
            if child is None:
                child = torch.nn.Module()
                parent.add_module(part, child)
            parent = child
        existing = parent._modules.get(parts[-1])
        if existing is not None:  # a generic node created as a parent earlier: move its children over
            for name, child in existing._modules.items():
                module.add_module(name, child)
        parent.add_module(parts[-1], module)

    def half(self):
        """As the WebUI's load: everything fp16 except alphas_cumprod, which stays fp32."""
        kept = {name: buf.clone() for name, buf in self.named_buffers() if name in KEEP_FP32}
        super().half()
        for name, buf in kept.items():
            setattr(self, name, buf)
        return self

    # -- what processing uses ------------------------------------------------------------------------------------

    def text_encoders(self):
        """The text encoder modules as they are attached now (wrapped or not)."""
        if "cond_stage_model" in self._modules:
            return [self.cond_stage_model]
        if "conditioner" in self._modules:
            return list(self.conditioner.embedders._modules.values())
        return []

    def get_learned_conditioning(self, prompts):
        """A digest of the text encoder's weights and the prompt (what the real CLIP output depends on)."""
        h = hashlib.sha256()
        for encoder in self.text_encoders():
            for _, p in sorted(encoder.named_parameters(), key=lambda kv: _plain(kv[0])):
                h.update(_bytes(p))
        out = []
        for prompt in prompts:
            g = h.copy()
            g.update(prompt.encode())
            out.append(g.hexdigest())
        return out

    def weights_digest(self, part: str) -> str:
        h = hashlib.sha256()
        module = self.get_submodule(part)
        for _, p in sorted(module.named_parameters(), key=lambda kv: kv[0]):
            h.update(_bytes(p))
        return h.hexdigest()


def _prefixes(path: str):
    parts = path.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def _plain(name: str) -> str:
    return name.replace("wrapped.", "")


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
