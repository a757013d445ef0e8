"""Block Merger inside Stable Diffusion WebUI Forge: `ForgeHost`, the A1111 host with Forge's way of reaching and
changing the loaded model. Everything else (checkpoint lists, txt2img, the queue lock, progress, settings, the API)
is the same `modules` surface in both WebUIs, so it is inherited.

This module and hosts/a1111.py are the only ones importing the WebUI's code. Chosen at load time by a capability
probe (`is_forge`: `sd_models.forge_model_reload` exists), never by version strings.

Merges are written in place, as in A1111: `writable_weights` hands the engine the modules' own tensors by checkpoint
key, so no second copy of the model is made; a failed or cancelled merge is put back by the service (recomputed from
the previous merge or copied from the base file), and restore copies the base file's tensors back in place.

Forge internals relied on (HEAD dfdcbab6, see ../shared/reference/webui-integration.md §8):
- `shared.sd_model` is a `ForgeDiffusionEngine`, not an `nn.Module`; its weights live in
  `forge_objects_original.unet.model.diffusion_model`, `.clip.cond_stage_model` and `.vae.first_stage_model`, named
  as its `save_checkpoint` writes them (`model.diffusion_model.*`, `text_encoders.*`, `vae.*`). SD checkpoints'
  CLIP-L and VAE keys are renamed to those (`KEY_RENAMES`, as huggingface_guess's SD15/SDXL `process_clip_state_dict`
  and `vae_key_prefix` do); SDXL's OpenCLIP-G is converted by Forge into other names and shapes (q/k/v split), so a
  merge leaves it as loaded.
- `process_images` sets `forge_objects = forge_objects_original.shallow_copy()` every batch and
  `forge_objects_after_applying_lora` after LoRAs: shallow copies share the modules, so weights changed in place in
  those modules survive the per-batch reset.
- `sd_models.forge_model_reload()` reloads from the file only when `str(model_data.forge_loading_parameters)` differs
  from `model_data.forge_hash`; the merge leaves both alone, so the per-batch reloads keep it, and a changed
  checkpoint option reloads the chosen file (the merge is then gone, as the user asked). `restore_base` (used when
  the weights cannot be copied back in place) forces that reload by clearing `forge_hash`. The additional modules in
  `forge_loading_parameters` (a VAE or text encoder chosen beside the checkpoint) are left alone.
- The conditioning cache is keyed on `sd_model.sd_checkpoint_info`: each merge gets a new CheckpointInfo object.
- LoRAs: `backend.patcher.lora.LoraLoader` (one per module, `module.lora_loader`) keeps the pre-LoRA Parameter
  objects in `backup` and puts them back (replacing the LoRA'd ones) on its next `refresh`; a merge written over
  LoRA'd weights would be undone then. So the merge first takes LoRAs out (`refresh` with no patches, forced) and
  resets `sd_model.current_lora_hash` so the next generation's `load_networks` applies them again, on top of the
  merge, with fresh backups.
- `forge_model_reload` and `forge_loader` run under `torch.inference_mode`: the parameters are inference tensors,
  written through plain tensors on the same storage (`writable`).
- nf4/gguf storage (`bnb_quantized`, `gguf_cls` on the parameter) cannot take a merge in place: refused.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from modules import sd_models

from ..core.arch import BLOCKS_26, BLOCKS_FLUX, BLOCKS_XL
from ..core.errors import MergeError
from ..io.read import open_checkpoint
from .a1111 import BASE_ATTR, A1111Host, merged_info
from .base import LiveWeights, MergeIdentity

#: checkpoint key prefix -> Forge's name for the same tensor (SD checkpoints name their parts differently)
KEY_RENAMES = (
    ("cond_stage_model.transformer.", "text_encoders.clip_l.transformer."),
    ("conditioner.embedders.0.transformer.", "text_encoders.clip_l.transformer."),
    ("first_stage_model.", "vae."),
)
UNET_PREFIX = "model.diffusion_model."
#: prefixes of keys that already say which part they belong to (anything else is a bare diffusion model's key)
NAMED_PARTS = ("model.", "text_encoders.", "vae.", "cond_stage_model.", "conditioner.", "first_stage_model.")
PARTS = ((UNET_PREFIX, "unet", "diffusion_model"), ("text_encoders.", "clip", "cond_stage_model"),
         ("vae.", "vae", "first_stage_model"))
NO_LORA = str([])  # ForgeDiffusionEngine.current_lora_hash with no LoRA applied


def is_forge() -> bool:
    """The capability probe: Forge loads models through `forge_model_reload` (A1111 has no such function)."""
    return hasattr(sd_models, "forge_model_reload")


def forge_key(key: str) -> str:
    """The name Forge's modules give a checkpoint key (a bare diffusion model's keys, e.g. BFL's Flux files, get
    the U-Net prefix, as Forge's `preprocess_state_dict` gives them)."""
    for old, new in KEY_RENAMES:
        if key.startswith(old):
            return new + key[len(old):]
    if not key.startswith(NAMED_PARTS):
        return UNET_PREFIX + key
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


def external_parts() -> tuple[str, ...]:
    """Forge name prefixes whose weights came from the additional modules the user chose beside the checkpoint (a VAE
    or text encoder file) rather than from the checkpoint: merges and restores leave them alone, as A1111's host
    leaves an external VAE alone. A file that cannot be read counts as both."""
    parts: set[str] = set()
    for path in sd_models.model_data.forge_loading_parameters.get("additional_modules") or ():
        try:
            with open_checkpoint(path) as module:
                vae = any(k.endswith("decoder.conv_in.weight") for k in module.keys())
        except (MergeError, OSError, ValueError):
            parts.update(("vae.", "text_encoders."))
            continue
        parts.add("vae." if vae else "text_encoders.")
    return tuple(sorted(parts))


def writable_tensors(m, keys: Iterable[str], skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Checkpoint key -> the model's floating-point tensor of that name, for those of `keys` the model holds (no
    position ids, no parts named in `skip`)."""
    live = live_tensors(m)
    out = {}
    for key in keys:
        name = forge_key(key)
        t = live.get(name)
        if t is not None and t.is_floating_point() and not key.endswith("position_ids") and \
                not name.startswith(skip):
            out[key] = t
    return out


def writable(t: torch.Tensor) -> torch.Tensor:
    """A tensor the engine may write into, on `t`'s own memory. Forge loads models under `torch.inference_mode`, so
    their parameters are inference tensors, which refuse in-place writes outside inference mode (a thread-local
    mode, and the engine writes from its worker threads); a plain tensor set on the same storage takes them."""
    if not t.is_inference():
        return t.detach()
    alias = torch.empty(0, dtype=t.dtype, device=t.device)
    with torch.no_grad():
        alias.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())
    return alias


def is_quantized(t: torch.Tensor) -> bool:
    """nf4/fp4 (bitsandbytes) and gguf parameters: their storage is not the weight itself."""
    return hasattr(t, "bnb_quantized") or hasattr(t, "gguf_cls")


def copy_in(targets: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> None:
    """Copy `state` into `targets` (cast to their dtype); on failure the keys written get their old values back."""
    pairs = [(targets[k], v) for k, v in state.items() if k in targets]
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

    def note_as_loaded(self, m) -> None:
        """Nothing is vouched for: Forge's loader may convert a checkpoint's tensors on the way in (dtypes, quantized
        storage, the user's extra modules), so the first merge reads model A from its file."""
        return None

    @contextlib.contextmanager
    def writable_weights(self, shapes: Mapping[str, tuple[int, ...]] | None = None) -> Iterator[LiveWeights]:
        """The modules' own tensors by checkpoint key (the merge's keys and the base file's), LoRAs taken out first.

        A merge that does not fit the loaded model, or a model stored quantized (nf4/gguf), is refused with a
        MergeError before anything is computed: unlike A1111 there is no loader to rebuild the model from a state
        dict (Forge's loader takes a file path). Without `shapes` (restore, rollback) a quantized model is only
        marked refused, so restore goes through Forge's own reload."""
        m = self._model()
        self.busy += 1
        try:
            take_out_loras(m)
            info = m.sd_checkpoint_info
            base = getattr(info, BASE_ATTR, info)
            base_file = Path(base.filename) if base is not None and base.filename else None
            keys = set(shapes or ())
            if base_file is not None and base_file.is_file():
                with open_checkpoint(base_file) as ckpt:
                    keys.update(ckpt.keys())
            tensors = writable_tensors(m, keys, external_parts())
            quantized = next((k for k, t in tensors.items() if is_quantized(t)), None)
            if quantized is not None:
                if shapes is not None:
                    raise MergeError(f"{quantized} is stored quantized (nf4/gguf) in the loaded model; merging into "
                                     f"such a model is not supported: save the merge and load it as a checkpoint.")
                yield LiveWeights({}, refused="(Forge: the model is stored quantized; reloaded from its file.)")
                return
            misfit = next((k for k, shape in (shapes or {}).items()
                           if k in tensors and tuple(tensors[k].shape) != tuple(shape)), None)
            if misfit is not None:
                raise MergeError(f"The merge does not fit the loaded model ({misfit} is {list(shapes[misfit])}, "
                                 f"the model's {list(tensors[misfit].shape)}); choose model A in Forge's checkpoint "
                                 f"list first, or save the merge and load it as a checkpoint.")
            if shapes and not any(k in tensors for k in shapes):
                raise MergeError("None of the merged tensors belongs to the loaded model; choose the merge's base "
                                 "checkpoint in Forge first.")
            on_device = {t.device for t in tensors.values() if t.device.type != "cpu"}
            yield LiveWeights({k: writable(t) for k, t in tensors.items()}, base_file,
                              next(iter(on_device)) if len(on_device) == 1 else None)
        finally:
            self.busy -= 1

    def weights_written(self, identity: MergeIdentity | None, keys) -> None:
        self.busy += 1
        try:
            self._adopt_identity(self._model(), identity)
        finally:
            self.busy -= 1

    def _load_weights(self, state: Mapping[str, torch.Tensor], identity: MergeIdentity | None) -> None:
        """Only where writable_weights marks the model refused (quantized, no merge possible) or for an identity
        alone: a non-empty state is copied through the same checked in-place path, with the old values put back
        on failure."""
        m = self._model()
        if state:
            with self.writable_weights({k: tuple(v.shape) for k, v in state.items()}) as live:
                copy_in(live.tensors, state)
        self._adopt_identity(m, identity)

    def _adopt_identity(self, m, identity: MergeIdentity | None) -> None:
        """The merge's CheckpointInfo (or the base's registered one) on the model, so infotexts name it and the
        conditioning cache (keyed on sd_checkpoint_info) is not reused across merges."""
        current = m.sd_checkpoint_info
        base = getattr(current, BASE_ATTR, current)
        info = merged_info(base, identity) if identity is not None else self._registered(base)
        m.sd_checkpoint_info = info
        m.sd_model_hash = identity.short_hash if identity is not None else base.shorthash
        self._installed = info if identity is not None else None

    def restore_base(self) -> None:
        """Where the weights cannot be copied back in place: reload the selected checkpoint the way Forge does
        (forge_model_reload, forced)."""
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
