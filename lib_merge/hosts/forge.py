"""Block Merger inside Stable Diffusion WebUI Forge: `ForgeHost`, the A1111 host with Forge's way of reaching and
changing the loaded model. Everything else (checkpoint lists, txt2img, the queue lock, progress, settings, the API)
is the same `modules` surface in both WebUIs, so it is inherited.

This module and hosts/a1111.py are the only ones importing the WebUI's code. Chosen at load time by a capability
probe (`is_forge`: `sd_models.forge_model_reload` exists), never by version strings.

Forge internals relied on (HEAD dfdcbab6, see ../shared/reference/webui-integration.md §8):
- `shared.sd_model` is a `ForgeDiffusionEngine`, not an `nn.Module`; its weights live in
  `forge_objects_original.unet.model.diffusion_model`, `.clip.cond_stage_model` and `.vae.first_stage_model`, named
  as its `save_checkpoint` writes them (`model.diffusion_model.*`, `text_encoders.*`, `vae.*`).
- `process_images` sets `forge_objects = forge_objects_original.shallow_copy()` every batch and
  `forge_objects_after_applying_lora` after LoRAs: shallow copies share the modules, so weights changed in place in
  those modules survive the per-batch reset.
- `sd_models.forge_model_reload()` reloads from the file only when `str(model_data.forge_loading_parameters)` differs
  from `model_data.forge_hash`; the merge leaves both alone, so the per-batch reloads keep it, and a changed
  checkpoint option reloads the chosen file (the merge is then gone, as the user asked). Restore forces that
  reload by clearing `forge_hash`.
- LoRAs: `backend.patcher.lora.LoraLoader` (one per module, `module.lora_loader`) keeps the pre-LoRA weights in
  `backup` and puts them back on its next `refresh`; a merge written over LoRA'd weights would be undone then. So the
  merge first takes LoRAs out (`refresh` with no patches, forced) and sets `sd_model.current_lora_hash` so the next
  generation's `load_networks` applies them again, on top of the merge, with fresh backups.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from modules import sd_models, shared

from ..core.arch import BLOCKS_26, BLOCKS_FLUX, BLOCKS_XL
from ..core.errors import MergeError
from .a1111 import BASE_ATTR, A1111Host, merged_info
from .base import LiveWeights, MergeIdentity

#: checkpoint key prefix -> Forge's name for the same tensor (SD checkpoints name their parts differently)
KEY_RENAMES = (
    ("cond_stage_model.transformer.", "text_encoders.clip_l.transformer."),
    ("conditioner.embedders.0.transformer.", "text_encoders.clip_l.transformer."),
    ("first_stage_model.", "vae."),
)
PARTS = (("model.diffusion_model.", "unet", "diffusion_model"), ("text_encoders.", "clip", "cond_stage_model"),
         ("vae.", "vae", "first_stage_model"))
NO_LORA = str([])  # ForgeDiffusionEngine.current_lora_hash with no LoRA applied


def is_forge() -> bool:
    """The capability probe: Forge loads models through `forge_model_reload` (A1111 has no such function)."""
    return hasattr(sd_models, "forge_model_reload")


def forge_key(key: str) -> str:
    """The name Forge's modules give a checkpoint key."""
    for old, new in KEY_RENAMES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _modules(m) -> list[tuple[str, torch.nn.Module]]:
    objects = getattr(m, "forge_objects_original", None)
    if objects is None:
        raise MergeError("No model is loaded in Forge yet; generate once or choose a checkpoint first.")
    out = []
    for prefix, name, attr in PARTS:
        part = getattr(objects, name, None)
        holder = getattr(part, "model", part) if name == "unet" else part
        module = getattr(holder, attr, None)
        if module is not None:
            out.append((prefix, module))
    return out


def live_tensors(m) -> dict[str, torch.Tensor]:
    """The loaded model's parameters and buffers by Forge's checkpoint names (save_checkpoint's prefixes)."""
    out = {}
    for prefix, module in _modules(m):
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            out[prefix + name] = tensor
    return out


def take_out_loras(m) -> None:
    """Put the pre-LoRA weights back (each LoraLoader's own backups) and make the next generation apply its LoRAs
    again, over whatever this host writes now."""
    for _, module in _modules(m):
        loader = getattr(module, "lora_loader", None)
        if loader is not None and (loader.backup or getattr(loader, "online_backup", None)):
            loader.refresh(lora_patches={}, force_refresh=True)
    if hasattr(m, "current_lora_hash"):
        m.current_lora_hash = NO_LORA
        objects = m.forge_objects_original
        m.forge_objects_after_applying_lora = objects.shallow_copy()


class ForgeHost(A1111Host):
    """The Host protocol over a running Forge (see lib_merge.hosts.base.Host; the rest is A1111Host's)."""

    def _model(self):
        m = sd_models.model_data.sd_model
        if getattr(m, "forge_objects_original", None) is None:  # Forge loads lazily (FakeInitialModel at start)
            m, _ = sd_models.forge_model_reload()
        if m is None:
            raise MergeError("No model is loaded in Forge; choose a checkpoint first.")
        return m

    def model_blocks(self) -> tuple[str, ...]:
        m = sd_models.model_data.sd_model
        if getattr(m, "is_sdxl", False):
            return BLOCKS_XL
        if getattr(m, "forge_objects_original", None) is not None and any(
                ".double_blocks." in k for k in live_tensors(m)):
            return BLOCKS_FLUX
        return BLOCKS_26

    @contextlib.contextmanager
    def live_weights(self) -> Iterator[Mapping[str, torch.Tensor]]:
        yield live_tensors(self._model())

    @contextlib.contextmanager
    def writable_weights(self, shapes: Mapping[str, tuple[int, ...]] | None = None) -> Iterator[LiveWeights]:
        """Not yet the A1111 host's write-in-place path (its LoRA, hijack and lowvram handling is A1111's): Forge
        takes the merge through `load_weights`, which copies it into the forge_objects' modules."""
        yield LiveWeights({}, refused="(Forge: the merge was copied into the model's modules from a merged state)")

    def _load_weights(self, state: Mapping[str, torch.Tensor], identity: MergeIdentity | None) -> None:
        m = self._model()
        current = m.sd_checkpoint_info
        base = getattr(current, BASE_ATTR, current)
        info = merged_info(base, identity) if identity is not None else base
        if state:
            self._write(m, state)
        m.sd_checkpoint_info = info
        m.sd_model_hash = identity.short_hash if identity is not None else base.shorthash
        self._installed = info if identity is not None else None
        clear = getattr(getattr(shared, "sd_model", None), "clear_prompt_cache", None)
        if callable(clear):
            clear()

    def _write(self, m, state: Mapping[str, torch.Tensor]) -> None:
        """Copy the merge into the modules' own tensors (cast to their dtype); checked in full before the first write,
        and on failure the written keys get their previous values back."""
        take_out_loras(m)
        live = live_tensors(m)
        pairs = []
        for key, value in state.items():
            target = live.get(forge_key(key))
            if target is None:
                continue  # schedule buffers, EMA, position ids, parts this Forge model does not hold
            if tuple(target.shape) != tuple(value.shape):
                raise MergeError(f"The merge does not fit the loaded model ({key} is {list(value.shape)}, the model's "
                                 f"{list(target.shape)}); load the merged model as a checkpoint instead.")
            if not target.dtype.is_floating_point or hasattr(target, "bnb_quantized") or \
                    hasattr(target, "gguf_cls"):
                raise MergeError(f"{key} is stored quantized in the loaded model; merging into nf4/gguf models is "
                                 f"not supported: save the merge and load it as a checkpoint.")
            pairs.append((target, value))
        if state and not pairs:
            raise MergeError("None of the merged tensors belongs to the loaded model; choose the merge's base "
                             "checkpoint in Forge first.")
        previous = [t.detach().to("cpu", copy=True) for t, _ in pairs]
        try:
            with torch.no_grad():
                for target, value in pairs:
                    target.copy_(value)
        except BaseException as e:
            with torch.no_grad():
                for (target, _), old in zip(pairs, previous, strict=True):
                    target.copy_(old)
            if isinstance(e, Exception):
                raise MergeError(f"Loading the merge failed ({e}); the previous weights were put back.") from e
            raise

    def restore_base(self) -> None:
        """Reload the selected checkpoint from its file the way Forge does (forge_model_reload, forced)."""
        self.busy += 1
        try:
            sd_models.model_data.forge_hash = None
            sd_models.forge_model_reload()
        finally:
            self._installed = None
            self.busy -= 1

    def generate(self, request):
        """Forge runs generations on its main thread (modules_forge.main_thread); ours goes the same way."""
        try:
            from modules_forge import main_thread
        except ImportError:
            return super().generate(request)
        return main_thread.run_and_wait_result(super().generate, request)
