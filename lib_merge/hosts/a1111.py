"""Block Merger inside the AUTOMATIC1111 WebUI: `A1111Host` (the `Host` protocol over the WebUI's `modules`) and
`Extension`, the one object per process that the entry script holds (the lazily made MergeService, the settings,
the txt2img hook and the API handlers).

This is the only module that imports `modules.*`; only the entry script (inside the WebUI) and the tests (against
the fake under tests/fakes) import it. The live swap follows the integration reference §3.5, without its state dict:
between `undo_hijack` and `hijack` (so the text encoder's own tensors are reached), after the last generation's LoRA
is taken out of the weights and the Lora extension's backups are dropped, the engine writes the merge straight into
the model's parameters, on the device they live on (medvram/lowvram models are first gathered on the CPU). The model
then gets a new, unregistered CheckpointInfo that keeps the base file name, so the WebUI's `reload_model_weights()`
calls leave the merge in place. fp8 weight storage and merges of another architecture are loaded by rebuilding the
model with `load_model` instead (see `IN_PLACE_REFUSED`).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import os
import sys
import threading
from collections.abc import Iterator, Mapping
from hmac import compare_digest
from pathlib import Path

import torch
from modules import (
    call_queue,
    devices,
    images,
    lowvram,
    paths,
    processing,
    script_callbacks,
    scripts,
    sd_hijack,
    sd_models,
    sd_unet,
    sd_vae,
    shared,
)

from ..core.arch import BLOCKS_26, BLOCKS_XL
from ..core.errors import MergeError
from ..core.recipe import Recipe, json_object
from ..io.hashes import HashCache
from ..io.read import file_identity
from ..lora.files import find_lora, list_lora_files
from ..service.as_loaded import AsLoaded
from ..service.lora_service import LoraTools, is_lora_record
from ..service.merge_service import INFOTEXT_FAILED, INFOTEXT_MERGE, INFOTEXT_RECIPE, MergeService
from . import webui_xyz
from .base import GenerationRequest, GenerationResult, LiveWeights, MergeIdentity

SECTION = ("block_merger", "Block Merger")
OPT_DEVICE = "block_merger_merge_device"
OPT_THREADS = "block_merger_threads"
OPT_KEEP = "block_merger_keep_models"
OPT_HISTORY = "block_merger_history_file"
DEFAULTS = {OPT_DEVICE: "cpu", OPT_THREADS: 0, OPT_KEEP: 3, OPT_HISTORY: ""}
#: in the WebUI's data folder: file hashes and which files a merge found finite, kept across restarts
HASH_CACHE = "block_merger_hashes.json"
TITLE = "Block Merger"  # the tab's and the txt2img script's title
TAB = (TITLE, "block_merger")  # title, elem_id

#: set on the CheckpointInfo objects of merges (never on registered ones)
IDENTITY_ATTR = "block_merger_identity"
BASE_ATTR = "block_merger_base"
#: a recipe requested on a processing object by other code (e.g. an X/Y/Z axis), read by the txt2img hook
REQUEST_ATTR = "block_merger_recipe"
#: set on the model when its text encoder changed since its empty-prompt conditioning was computed
EMPTY_PROMPT_STALE = "block_merger_empty_prompt_stale"
#: the one WebUI setting under which that conditioning is read ("Pad prompt/negative prompt")
PADDING = "pad_cond_uncond"

MODEL_PARTS = ("model.diffusion_model.", "cond_stage_model.", "conditioner.", "first_stage_model.")
VAE_PART = "first_stage_model."
TEXT_PARTS = ("cond_stage_model.", "conditioner.")
#: what a complete checkpoint has: conv_in, the U-Net's output and one of the WebUI's text-encoder detection keys
COMPLETE_UNET = ("model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.out.2.weight")
TEXT_MARKERS = (
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
    "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
    "conditioner.embedders.1.model.ln_final.weight",
)
#: why a merge is not written into the model's tensors (it is then loaded whole, rebuilding the model)
IN_PLACE_REFUSED = {
    "fp8": "(fp8 weight storage is on: the model was rebuilt from the merge with the WebUI's own loader, which casts "
           "the weights to fp8 and keeps its fp16 cache right; this needs a second copy of the weights in RAM while "
           "loading.)",
    "architecture": "(The merge has another architecture than the loaded model ({key} differs): the model was "
                    "rebuilt for it.)",
}
UI_DEFAULTS = {  # ui-config.json keys (v1.8+ first, older second) and the WebUI's own defaults
    "steps": (("customscript/sampler.py/txt2img/Sampling steps/value", "txt2img/Sampling steps/value"), 20),
    "sampler": (("customscript/sampler.py/txt2img/Sampling method/value", "txt2img/Sampling method/value"),
                "DPM++ 2M"),
    "scheduler": (("customscript/sampler.py/txt2img/Schedule type/value", "txt2img/Schedule type/value"), ""),
    "cfg_scale": (("txt2img/CFG Scale/value",), 7.0),
    "width": (("txt2img/Width/value",), 512),
    "height": (("txt2img/Height/value",), 512),
}


def option(key: str):
    """Our settings, read as `opts.data.get` because they have no default before the settings UI is built."""
    return shared.opts.data.get(key, DEFAULTS[key])


def _pads(override_settings: Mapping | None = None) -> bool:
    """Whether a generation (with these per-request settings) pads cond/uncond with the empty prompt."""
    return bool((override_settings or {}).get(PADDING, getattr(shared.opts, PADDING, False)))


def take_out_networks(m) -> None:
    """Put back the weights the built-in Lora extension patched (from its own backups) and drop every backup.

    A merge writes the parameters directly, so the extension's backups (copies of the pre-merge weights, kept also
    after a LoRA is removed) would otherwise bring old weights back at the next LoRA change; and a LoRA of the last
    generation left in the weights would be merged in, then applied again. The next generation applies its LoRAs
    afresh, as after a checkpoint change.
    """
    try:
        import networks  # extensions-builtin/Lora, on sys.path when that extension is enabled
    except ImportError:
        return
    restore = getattr(networks, "network_restore_weights_from_backup", None)
    with torch.no_grad():
        for module in m.modules():
            if restore is not None and getattr(module, "network_current_names", ()):
                restore(module)
            if getattr(module, "network_weights_backup", None) is not None or \
                    getattr(module, "network_bias_backup", None) is not None or \
                    getattr(module, "network_current_names", ()):
                # set here, not through network_reset_cached_weight: some WebUI versions' one keeps the bias backup
                module.network_current_names = ()
                module.network_weights_backup = None
                module.network_bias_backup = None


@contextlib.contextmanager
def _checkpoint_state(m) -> Iterator[Mapping[str, torch.Tensor]]:
    """The model's tensors by checkpoint key: its state dict with the hijack's wrappers taken off meanwhile."""
    sd_hijack.model_hijack.undo_hijack(m)
    try:
        yield m.state_dict()
    finally:
        sd_hijack.model_hijack.hijack(m)


def loadable(key: str, external_vae: bool) -> bool:
    """Keys the live model takes from a merge: model weights only (no schedule buffers, EMA or position ids), and
    no VAE weights while the user has an external VAE loaded."""
    if not key.startswith(MODEL_PARTS) or key.endswith("position_ids"):
        return False
    return not (external_vae and key.startswith(VAE_PART))


def _is_checkpoint_file(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith((".ckpt", ".safetensors")) and not name.endswith((".vae.ckpt", ".vae.safetensors"))


def is_complete(state: Mapping[str, torch.Tensor]) -> bool:
    return all(k in state for k in COMPLETE_UNET) and any(k in state for k in TEXT_MARKERS)


def merged_info(base, identity: MergeIdentity):
    """A new CheckpointInfo for a merge: copied from the base's (same file name, so reloads are no-ops), named after
    the merge, hashed by its recipe, not registered anywhere."""
    info = copy.copy(base)
    info.name = info.name_for_extra = info.model_name = identity.name
    info.title = info.short_title = f"{identity.name} [{identity.short_hash}]"
    info.shorthash = identity.short_hash
    info.sha256 = _recipe_sha256(identity)
    info.hash = identity.short_hash[:8]
    info.ids = []
    info.metadata = {"sd_merge_recipe": json.loads(identity.recipe_json)}
    setattr(info, IDENTITY_ATTR, identity)
    setattr(info, BASE_ATTR, base)
    return info


def _recipe_sha256(identity: MergeIdentity) -> str | None:
    with contextlib.suppress(MergeError, TypeError, ValueError):
        full = Recipe.from_json(identity.recipe_json).fingerprint()
        if full.startswith(identity.short_hash):
            return full
    return None


class _ConsoleBar:
    """The console's progress bar (tqdm, as the WebUI's own), one per task text."""

    def __init__(self):
        self._bar = None
        self._key = None

    def update(self, done: int, total: int, text: str) -> None:
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover - tqdm ships with the WebUI
            return
        if self._bar is None or self._key != (text, total) or done < self._bar.n:
            self.close()
            self._bar, self._key = tqdm(total=total, desc=text, leave=False), (text, total)
        self._bar.update(done - self._bar.n)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class A1111Host:
    """The Host protocol over the running WebUI (see lib_merge.hosts.base.Host for the contract of each method)."""

    generation_unavailable: str | None = None
    live_model_unavailable: str | None = None

    def __init__(self, root: Path):
        self.root = Path(root)
        self._bar = _ConsoleBar()
        self._installed = None  # the CheckpointInfo of the merge this host loaded last, while it is in place
        self.busy = 0  # >0 while this host itself loads weights (model-loaded callbacks are then its own)

    # -- models -----------------------------------------------------------------------------------------------

    def _rescan(self) -> bool:
        """Rescan the model folders when files were added or removed (as the WebUI's refresh button does)."""
        registered = {os.path.abspath(i.filename) for i in sd_models.checkpoints_list.values()}
        on_disk = set()
        for folder in {self.models_folder(), Path(sd_models.model_path)}:
            if folder.is_dir():
                on_disk |= {os.path.abspath(p) for p in folder.rglob("*") if _is_checkpoint_file(p)}
        if (on_disk - registered) or any(not os.path.exists(f) for f in registered):
            sd_models.list_models()
            return True
        return False

    def list_models(self) -> list[str]:
        self._rescan()
        return list(sd_models.checkpoint_tiles())

    def resolve_model(self, name: str) -> Path:
        info = sd_models.get_closet_checkpoint_match(name) if name else None
        if info is None and name and self._rescan():
            info = sd_models.get_closet_checkpoint_match(name)
        if info is None:
            raise MergeError(f"Unknown model {name!r}: it is not one of the WebUI's checkpoints "
                             f"(choose one from the list, or press refresh after adding files).")
        return Path(info.filename)

    def list_vaes(self) -> list[str]:
        with contextlib.suppress(Exception):
            sd_vae.refresh_vae_list()
        return list(sd_vae.vae_dict)

    def resolve_vae(self, name: str) -> Path:
        path = sd_vae.vae_dict.get(name)
        if path is None:
            raise MergeError(f"Unknown VAE {name!r}: choose one of the WebUI's VAEs ({', '.join(sd_vae.vae_dict)}).")
        return Path(path)

    def models_folder(self) -> Path:
        return Path(shared.cmd_opts.ckpt_dir or sd_models.model_path)

    def lora_folder(self) -> Path:
        """The built-in Lora extension's folder (`--lora-dir`, which that extension adds; models/Lora by default)."""
        return Path(getattr(shared.cmd_opts, "lora_dir", None) or Path(paths.models_path) / "Lora")

    def list_loras(self) -> list[str]:
        return list_lora_files(self.lora_folder())

    def resolve_lora(self, name: str) -> Path:
        return find_lora(self.lora_folder(), name)

    def history_path(self) -> Path:
        configured = str(option(OPT_HISTORY) or "").strip()
        path = Path(configured).expanduser() if configured else Path("mergehistory.csv")
        return path if path.is_absolute() else Path(paths.data_path) / path  # never inside the extension

    # -- the loaded model -------------------------------------------------------------------------------------

    def _model(self):
        m = shared.sd_model
        if m is None:
            raise MergeError("No model is loaded in the WebUI; choose a checkpoint first.")
        return m

    def model_blocks(self) -> tuple[str, ...]:
        """The block labels of the loaded model's family (for X/Y/Z block axes)."""
        return BLOCKS_XL if getattr(shared.sd_model, "is_sdxl", False) else BLOCKS_26

    def model_title(self) -> str:
        m = sd_models.model_data.sd_model
        info = getattr(m, "sd_checkpoint_info", None)
        return getattr(info, "title", "") or ""

    def base_title(self) -> str:
        """The registered checkpoint under the loaded model (under a merge: the checkpoint it was loaded over)."""
        info = getattr(sd_models.model_data.sd_model, "sd_checkpoint_info", None)
        return getattr(getattr(info, BASE_ATTR, info), "title", "") or ""

    def live_weights(self) -> contextlib.AbstractContextManager[Mapping[str, torch.Tensor]]:
        return _checkpoint_state(self._model())

    def note_as_loaded(self, m) -> AsLoaded | None:
        """The tensors of `m`, which the WebUI just loaded from its checkpoint by itself (see service.as_loaded);
        None when they may not hold the file's values: loaded from the WebUI's RAM cache of checkpoints (which may
        predate the file), or stored as fp8. An external VAE's tensors are left out."""
        if int(getattr(shared.opts, "sd_checkpoint_cache", 0) or 0) > 0 or getattr(devices, "fp8", False):
            return None
        path = Path(m.sd_checkpoint_info.filename)
        try:
            identity = file_identity(os.stat(path))
        except OSError:  # gone since: nothing to vouch for
            return None
        external_vae = sd_vae.loaded_vae_file is not None
        with _checkpoint_state(m) as tensors:
            return AsLoaded.note(path, identity, {k: t for k, t in tensors.items() if loadable(k, external_vae)})

    def loaded_identity(self) -> MergeIdentity | None:
        m = sd_models.model_data.sd_model
        info = getattr(m, "sd_checkpoint_info", None)
        if info is None or info is not self._installed:
            return None
        return getattr(info, IDENTITY_ATTR, None)

    @contextlib.contextmanager
    def writable_weights(self, shapes: Mapping[str, tuple[int, ...]] | None = None) -> Iterator[LiveWeights]:
        """The model's parameters by checkpoint key (loadable keys only), with UNet replacements, the hijack and
        LoRA patches off; a medvram/lowvram model is gathered on the CPU first (its hooks move parts back as
        needed). Refused under fp8 storage or when a planned key has no tensor of its shape."""
        m = self._model()
        if getattr(devices, "fp8", False):
            yield LiveWeights({}, refused=IN_PLACE_REFUSED["fp8"])
            return
        self.busy += 1
        sd_unet.apply_unet("None")
        sd_hijack.model_hijack.undo_hijack(m)
        try:
            take_out_networks(m)
            if getattr(m, "lowvram", False):
                lowvram.send_everything_to_cpu()
            external_vae = sd_vae.loaded_vae_file is not None
            live = {k: v for k, v in m.state_dict(keep_vars=True).items() if loadable(k, external_vae)}
            misfit = next((k for k, shape in (shapes or {}).items() if loadable(k, external_vae) and
                           (k not in live or tuple(live[k].shape) != tuple(shape))), None)
            if misfit is not None:
                yield LiveWeights({}, refused=IN_PLACE_REFUSED["architecture"].format(key=misfit))
                return
            info = m.sd_checkpoint_info
            base = getattr(info, BASE_ATTR, info)
            on_device = {t.device for t in live.values() if t.device.type != "cpu"}
            yield LiveWeights({k: v.detach() for k, v in live.items()},
                              Path(base.filename) if base is not None else None,
                              next(iter(on_device)) if len(on_device) == 1 else None)
        finally:
            try:
                self._rehijack(m)
            finally:
                self.busy -= 1

    def weights_written(self, identity: MergeIdentity | None, keys) -> None:
        self.busy += 1
        try:
            m = self._model()
            current = m.sd_checkpoint_info
            base = getattr(current, BASE_ATTR, current)
            info = merged_info(base, identity) if identity is not None else self._registered(base)
            self._adopt(m, info, base)
            if any(k.startswith(TEXT_PARTS) for k in keys):
                self._text_encoder_replaced(m)
            script_callbacks.model_loaded_callback(m)
            devices.torch_gc()
        finally:
            self.busy -= 1

    def _registered(self, base):
        """The base's CheckpointInfo as the WebUI has it registered now (a model-list refresh makes new objects)."""
        selected = sd_models.get_closet_checkpoint_match(base.title)
        return selected if selected is not None and selected.filename == base.filename else base

    def load_weights(self, state: Mapping[str, torch.Tensor], identity: MergeIdentity | None) -> None:
        self.busy += 1
        try:
            self._load_weights(state, identity)
        finally:
            self.busy -= 1

    def _load_weights(self, state: Mapping[str, torch.Tensor], identity: MergeIdentity | None) -> None:
        """Where `writable_weights` refuses: rebuild the model with `load_model` (identity only for an empty state)."""
        m = self._model()
        current = m.sd_checkpoint_info
        base = getattr(current, BASE_ATTR, current)
        info = merged_info(base, identity) if identity is not None else base
        if not state:
            self._adopt(m, info, base)
            return
        sd_unet.apply_unet("None")
        sd_hijack.model_hijack.undo_hijack(m)
        try:
            take_out_networks(m)
            live = m.state_dict()
            changed = [k for k, v in state.items() if loadable(k, False) and
                       (k not in live or tuple(live[k].shape) != tuple(v.shape))]
            if changed and not is_complete(state):
                raise MergeError(f"The merge does not fit the loaded model ({changed[0]} differs) and is not a "
                                 f"complete checkpoint; nothing was loaded.")
        except BaseException:
            self._rehijack(m)
            raise
        m = self._rebuild(m, state, live, info, base, architecture_changed=bool(changed))
        self._adopt(m, info, base)
        devices.torch_gc()

    def _rehijack(self, m) -> None:
        """Hijack and UNet replacement back on. Nothing moved the model's tensors (they are written in place; a
        medvram/lowvram model's hooks move its parts), so there is no `m.to(device)`, which walks every module."""
        sd_hijack.model_hijack.hijack(m)
        sd_unet.apply_unet()

    def _rebuild(self, m, state, live, info, base, architecture_changed: bool):
        """fp8 storage or another architecture: rebuild with `load_model` from a complete state dict (the merge over
        the current weights, or the merge alone for another architecture). On failure the previous model is rebuilt
        from a CPU copy of its weights."""
        previous_info, previous_hash = m.sd_checkpoint_info, m.sd_model_hash
        previous = {k: v.detach().to("cpu", copy=True) for k, v in live.items()}
        if architecture_changed:
            full = {k: v for k, v in state.items() if not k.startswith("model_ema.")}
        else:
            full = {**previous, **{k: v for k, v in state.items() if loadable(k, False)}}
        try:
            with self._loading_as_base(info, base):
                sd_models.load_model(checkpoint_info=info, already_loaded_state_dict=full)
        except BaseException as e:
            with self._loading_as_base(previous_info, base):
                sd_models.load_model(checkpoint_info=previous_info, already_loaded_state_dict=previous)
            sd_models.model_data.sd_model.sd_model_hash = previous_hash
            if isinstance(e, Exception):
                raise MergeError(f"Loading the merge failed ({e}); the previous model was put back.") from e
            raise
        finally:
            sd_unet.apply_unet()
        return sd_models.model_data.sd_model

    @contextlib.contextmanager
    def _loading_as_base(self, info, base):
        """While `load_model` runs, the merge's info carries the base's name and hashes, so `calculate_shorthash`
        finds the base's cached hash instead of hashing the file under the merge's name and registering the merge;
        `SkipWritingToConfig` keeps the user's checkpoint setting. Anything registered anyway is put back."""
        fields = ("name", "sha256", "shorthash", "title", "short_title", "ids")
        saved = {f: getattr(info, f) for f in fields}
        if info is not base:
            for f in fields:
                setattr(info, f, copy.copy(getattr(base, f)))
        try:
            with sd_models.SkipWritingToConfig():
                yield
        finally:
            if info is not base:
                for f, value in saved.items():
                    setattr(info, f, value)
                for registry in (sd_models.checkpoints_list, sd_models.checkpoint_aliases):
                    for key, value in list(registry.items()):
                        if value is info:
                            registry[key] = base

    def _adopt(self, m, info, base) -> None:
        m.sd_checkpoint_info = info
        m.sd_model_checkpoint = base.filename
        identity = getattr(info, IDENTITY_ATTR, None) if info is not base else None
        m.sd_model_hash = identity.short_hash if identity is not None else base.shorthash
        self._installed = info if identity is not None else None

    def _text_encoder_replaced(self, m) -> None:
        """The empty-prompt conditioning depends on the text encoder just replaced. The WebUI reads it only to pad
        cond/uncond under "Pad prompt/negative prompt" (off by default), and computing it runs the text encoder
        (0.2 s of CLIP on a CPU, a fifth of a merge). So it is computed now only when padding is on; otherwise the
        model is marked and `refresh_empty_prompt` computes it before the first generation that pads, or when the
        setting is turned on. (The WebUI's own checkpoint switch never recomputes it.)"""
        if _pads():
            self._refresh_empty_prompt(m)
        else:
            setattr(m, EMPTY_PROMPT_STALE, True)

    def refresh_empty_prompt(self, override_settings: Mapping | None = None) -> None:
        """Before a generation (`override_settings`: its per-request settings, applied by the WebUI only after the
        scripts' before_process) and when the padding setting changes: compute the marked model's empty prompt if
        padding will read it."""
        if self.empty_prompt_due(override_settings):
            self.busy += 1
            try:
                self._refresh_empty_prompt(sd_models.model_data.sd_model)
            finally:
                self.busy -= 1

    def empty_prompt_due(self, override_settings: Mapping | None = None) -> bool:
        m = sd_models.model_data.sd_model
        return m is not None and getattr(m, EMPTY_PROMPT_STALE, False) and _pads(override_settings)

    def _refresh_empty_prompt(self, m) -> None:
        get_empty_cond = getattr(sd_models, "get_empty_cond", None)
        if get_empty_cond is None or not hasattr(m, "cond_stage_model_empty_prompt"):
            return
        with devices.autocast(), torch.no_grad():
            m.cond_stage_model_empty_prompt = get_empty_cond(m)
        setattr(m, EMPTY_PROMPT_STALE, False)

    def restore_base(self) -> None:
        """The WebUI's forced reload; it keeps the merge's empty-prompt conditioning, which is marked stale."""
        self.busy += 1
        try:
            sd_models.reload_model_weights(forced_reload=True)
            self._text_encoder_replaced(self._model())
        finally:
            self._installed = None
            self.busy -= 1

    # -- generation -------------------------------------------------------------------------------------------

    def txt2img_defaults(self) -> dict:
        """txt2img's defaults as the user configured them in ui-config.json, else the WebUI's own."""
        config: dict = {}
        path = getattr(shared.cmd_opts, "ui_config_file", None)
        if path and os.path.isfile(path):
            with contextlib.suppress(OSError, ValueError):
                with open(path, encoding="utf8") as f:
                    config = json.load(f)
        out = {}
        for field, (keys, default) in UI_DEFAULTS.items():
            out[field] = next((config[k] for k in keys if config.get(k) not in (None, "")), default)
        return out

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """txt2img with the loaded model: the request's values (the tab filled its blanks from the live txt2img
        tab), the rest from txt2img's saved defaults; restore faces / tiling left unset follow the WebUI's own
        settings, as txt2img's do."""
        d = self.txt2img_defaults()
        opts = shared.opts
        hires = {}
        if request.enable_hr:
            hires = dict(enable_hr=True, hr_scale=float(request.hr_scale or 2.0),
                         hr_upscaler=request.hr_upscaler or None, hr_second_pass_steps=int(request.hr_steps or 0),
                         denoising_strength=float(request.denoising_strength or 0.7))
        p = processing.StableDiffusionProcessingTxt2Img(
            sd_model=shared.sd_model,
            outpath_samples=opts.outdir_samples or opts.outdir_txt2img_samples,
            outpath_grids=opts.outdir_grids or opts.outdir_txt2img_grids,
            prompt=list(request.prompts) or request.prompt,  # a list: one image each (setup_prompts)
            negative_prompt=request.negative_prompt,
            styles=list(request.styles),
            seed=request.seed if request.seed is not None else -1,
            sampler_name=request.sampler or d["sampler"],
            batch_size=len(request.prompts) or max(1, request.batch_size or 1),
            n_iter=1 if request.prompts else max(1, request.batch_count or 1),
            steps=int(request.steps or d["steps"]),
            cfg_scale=float(request.cfg_scale or d["cfg_scale"]),
            width=int(request.width or d["width"]),
            height=int(request.height or d["height"]),
            restore_faces=request.restore_faces,
            tiling=request.tiling,
            extra_generation_params=dict(request.extra_params),
            do_not_save_samples=False,
            do_not_save_grid=False,
            **hires,
        )
        scheduler = request.scheduler or ("" if request.sampler else d["scheduler"])
        if scheduler:
            p.scheduler = scheduler
        p.scripts = None  # the txt2img extensions' hooks need their own UI arguments; ours must not re-merge
        self.refresh_empty_prompt()
        with contextlib.closing(p):
            processed = processing.process_images(p)
        return GenerationResult(list(processed.images), list(processed.infotexts), processed.seed,
                                processed.index_of_first_image)

    def unload_model(self) -> None:
        """The WebUI's "Unload SD checkpoint to RAM": the model (merge included) moves to the CPU, freeing VRAM."""
        sd_models.unload_model_weights()

    def model_to_device(self) -> None:
        """The WebUI's "Load SD checkpoint to VRAM": back to where it computes."""
        if shared.sd_model is None:
            raise MergeError("No model is loaded; choose a checkpoint in the WebUI.")
        sd_models.send_model_to_device(shared.sd_model)

    def supermerger_history(self) -> Path | None:
        """SuperMerger's merge log, when SuperMerger is installed beside this extension (IDs from images reads
        the recipes of its images there)."""
        path = self.root.parent / "sd-webui-supermerger" / "mergehistory.csv"
        return path if path.is_file() else None

    def list_styles(self) -> list[str]:
        return list(shared.prompt_styles.styles)

    def list_upscalers(self) -> list[str]:
        """Hires fix upscalers, as txt2img lists them (latent modes first)."""
        return [*shared.latent_upscale_modes, *(u.name for u in shared.sd_upscalers)]

    def save_grid(self, image, info: str) -> Path | None:
        opts = shared.opts
        if not opts.grid_save:
            return None
        outdir = opts.outdir_grids or opts.outdir_txt2img_grids
        path, _ = images.save_image(image, outdir, "xyz_grid", extension=opts.grid_format, info=info,
                                    short_filename=True, grid=True)
        return Path(path)

    # -- exclusivity and progress -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """The WebUI's queue lock (not re-entrant): tab and API handlers only, never inside a generation."""
        with call_queue.queue_lock:
            yield

    @contextlib.contextmanager
    def job(self, title: str) -> Iterator[None]:
        shared.state.begin(job=title)
        try:
            yield
        finally:
            self._bar.close()
            shared.state.end()

    def progress(self, done: int, total: int, text: str) -> None:
        """The WebUI's progress bar (as the sampling steps of the current job) and the console's."""
        state = shared.state
        state.textinfo = f"{text}: {done}/{total}"
        state.sampling_step, state.sampling_steps = done, total
        if state.job_count <= 0:
            state.job_count, state.job_no = 1, 0
        self._bar.update(done, total, text)

    @contextlib.contextmanager
    def progress_kept(self) -> Iterator[None]:
        """Inside a generation: report a merge, then give processing its own job counts back."""
        state = shared.state
        fields = ("job_count", "job_no", "sampling_step", "sampling_steps", "textinfo")
        saved = {f: getattr(state, f) for f in fields}
        try:
            yield
        finally:
            self._bar.close()
            for f, value in saved.items():
                setattr(state, f, value)

    def request_stop(self) -> None:
        shared.state.interrupt()

    def interrupted(self) -> bool:
        return bool(shared.state.interrupted)


def parse_request(data) -> tuple[Recipe, str]:
    """A recipe as the API, txt2img's field and the history give it: a recipe object or its JSON, or
    {"recipe": <that>, "name": "merge name"}."""
    if isinstance(data, (bytes, str)):
        data = json_object(data)
    if not isinstance(data, dict):
        raise MergeError("A recipe must be a JSON object.")
    name = ""
    if "recipe" in data and "model_a" not in data:
        name = str(data.get("name") or "")
        return parse_request(data["recipe"])[0], name
    if is_lora_record(data):
        raise MergeError(f"This is the record of a {data['operation']}, not a merge recipe; one generation cannot "
                         f"ask for it. Bake LoRAs in the Block Merger tab's LoRA sub-tab, or put <lora:name:1> in "
                         f"the prompt.")
    if not data.get("model_a"):
        raise MergeError("The recipe names no model A (field model_a).")
    try:
        return Recipe.from_dict(data), name
    except TypeError as e:
        raise MergeError(f"Invalid recipe: {e}.") from e


class Extension:
    """Everything the entry script registers, bound to one host and one lazily created MergeService."""

    def __init__(self, root: Path, host_class: type[A1111Host] = A1111Host):
        self.root = Path(root)
        self.host = host_class(self.root)
        self._service: MergeService | None = None
        self._lora_tools: LoraTools | None = None
        self._guard = threading.Lock()
        self._padding_watch = self._watch_padding()

    def _watch_padding(self):
        """Chain onto the padding setting's onchange (the settings page and /sdapi/v1/options run it) so that a
        stale empty-prompt conditioning is computed when padding is switched on; `close` unchains."""
        label = shared.opts.data_labels.get(PADDING)
        if label is None:
            return None
        previous = label.onchange

        def changed():
            if previous is not None:
                previous()
            if self.host.empty_prompt_due():
                with self.host.lock():  # as the WebUI's own checkpoint onchange: never while a generation runs
                    self.host.refresh_empty_prompt()

        label.onchange = changed
        return label, previous, changed

    def service(self) -> MergeService:
        with self._guard:
            if self._service is None:  # the hash cache on disk: a restarted WebUI's first merge checks nothing again
                self._service = MergeService(self.host, hashes=HashCache(Path(paths.data_path) / HASH_CACHE))
            service = self._service
        service.threads = int(option(OPT_THREADS) or 0) or None
        service.keep_models = max(1, int(option(OPT_KEEP) or 1))
        service.device = str(option(OPT_DEVICE) or "cpu")
        return service

    def lora_tools(self) -> LoraTools:
        service = self.service()
        with self._guard:
            if self._lora_tools is None:
                self._lora_tools = LoraTools(service)
            return self._lora_tools

    def model_loaded(self, sd_model) -> None:
        """The WebUI loaded a checkpoint by itself (at start, or the user chose another one): that is now the user's
        choice, and its tensors are noted so that the first merge need not read them again from the file."""
        if not self.host.busy and self.host.loaded_identity() is None:
            self.service().base_loaded(self.host.note_as_loaded(sd_model))

    def close(self) -> None:
        if self._padding_watch is not None:
            label, previous, ours = self._padding_watch
            if label.onchange is ours:
                label.onchange = previous
            self._padding_watch = None
        if self._service is not None:
            self._service.close()

    # -- settings ---------------------------------------------------------------------------------------------

    def add_settings(self) -> None:
        import gradio as gr

        opts = shared.opts
        # v1.6+ puts sections under categories (else "Uncategorized"); older OptionInfo has no category_id
        category = {"category_id": "sd"} if "category_id" in inspect.signature(shared.OptionInfo).parameters else {}

        def info(*args, **kw):
            return shared.OptionInfo(*args, **kw, **category)

        opts.add_option(OPT_DEVICE, info(
            DEFAULTS[OPT_DEVICE], "Merge device", gr.Radio, {"choices": ["cpu", "cuda"]}, section=SECTION,
        ).info("cuda computes each tensor on the GPU (needs one); the merged model is the same either way"))
        opts.add_option(OPT_THREADS, info(
            DEFAULTS[OPT_THREADS], "Merge threads (0: automatic)", gr.Slider,
            {"minimum": 0, "maximum": 64, "step": 1}, section=SECTION))
        opts.add_option(OPT_KEEP, info(
            DEFAULTS[OPT_KEEP], "Source models kept open between merges", gr.Slider,
            {"minimum": 1, "maximum": 16, "step": 1}, section=SECTION))
        opts.add_option(OPT_HISTORY, info(
            DEFAULTS[OPT_HISTORY], "Merge history file", section=SECTION,
        ).info("empty: mergehistory.csv in the WebUI's data folder; a relative path is taken from there"))

    # -- the txt2img hook (runs inside a generation: the queue lock is already held) ---------------------------

    def before_process(self, p, requested=None) -> None:
        """Make the model what this generation asks for: the requested recipe (merged only when it is not loaded
        already; a transient merge), or without a request the user's own choice (their merge or the base). The
        infotext then names whatever merge is loaded."""
        try:
            recipe = self._requested_recipe(p, requested)
            with self.host.progress_kept():
                self.service().reconcile(recipe)
        except Exception as e:  # noqa: BLE001 - the WebUI's runner would swallow it and generate anyway
            # so the caller (an API client, an X/Y/Z cell) sees it in the infotext, not only in the console
            reason = str(e) if isinstance(e, MergeError) else f"{type(e).__name__}: {e}"
            p.extra_generation_params[INFOTEXT_FAILED] = f"the merge was not applied: {reason}"
            print(f"Block Merger: the requested merge was not applied: {reason}", file=sys.stderr)
        self.host.refresh_empty_prompt(getattr(p, "override_settings", None))
        identity = self.host.loaded_identity()
        if identity is not None:
            p.extra_generation_params[INFOTEXT_MERGE] = identity.name
            p.extra_generation_params[INFOTEXT_RECIPE] = identity.recipe_json

    def _requested_recipe(self, p, requested) -> Recipe | None:
        """The recipe a generation asks for (its field, a script's attribute, X/Y/Z cells), or None."""
        recipe = self._field_recipe(p, requested)
        base = recipe or self.service().committed()
        history = self.service().history()
        return webui_xyz.requested_recipe(p, base, self.host.base_title(), self.host.model_blocks(),
                                          lambda merge_id: Recipe.from_dict(history.recipe(merge_id))) or recipe

    @staticmethod
    def _field_recipe(p, requested) -> Recipe | None:
        requested = getattr(p, REQUEST_ATTR, None) or requested
        blank = requested is None or (isinstance(requested, str) and not requested.strip())
        return None if blank else parse_request(requested)[0]

    def check_xyz_plot(self, p, sample: dict) -> None:
        """Refuse an X/Y/Z plot whose Block Merger cells cannot make a merge (before its first image): with no merge
        made yet, an Alpha axis alone has no model B, and every cell would quietly show the base model."""
        ours = next((s for s in getattr(getattr(p, "scripts", None), "alwayson_scripts", ())
                     if getattr(s, "title", lambda: "")() == TITLE), None)
        field = p.script_args[ours.args_from] if ours is not None and len(p.script_args) > ours.args_from else None
        cell = copy.copy(p)
        setattr(cell, webui_xyz.REQUEST_ATTR, sample)
        try:
            self._requested_recipe(cell, field).validate(self.service().presets)
        except MergeError as e:
            base = self._field_recipe(p, field) or self.service().committed()
            hint = (" No merge is made yet for the axes to vary: make one in the Block Merger tab (Merge) first, put "
                    "a recipe in txt2img's Block Merger field, or add [Block Merger] Model A/Model B axes."
                    if base is None else "")
            raise MergeError(f"X/Y/Z plot refused: the Block Merger axes cannot make a merge: {e}{hint}") from e

    # -- axes in the WebUI's X/Y/Z plot ----------------------------------------------------------------------

    def register_xyz_axes(self) -> bool:
        """Add our axes to the built-in X/Y/Z script (loaded before extensions); idempotent, so the entry script
        calls it at import (API-only mode builds the UI early) and again in on_before_ui."""
        xyz = next((d.module for d in scripts.scripts_data
                    if d.script_class.__module__ in ("xyz_grid.py", "scripts.xyz_grid")), None)
        if xyz is None:
            return False
        options = webui_xyz.axis_options(xyz, self.host.resolve_model, self.host.list_models,
                                         lambda: self.service().presets, self.check_xyz_plot)
        return webui_xyz.register(xyz, options)

    # -- API handlers (outside generations: they take the queue lock) -----------------------------------------

    def api_presets(self) -> dict:
        presets = self.service().presets
        return {"presets": {name: presets.get(name) for name in presets.names(None)}}

    def api_merge(self, body) -> dict:
        recipe, name = parse_request(body)
        with self.host.lock(), self.host.job("Block Merger: merge"):
            outcome = self.service().merge_and_load(recipe, name)
        identity = outcome.identity
        return {"name": identity.name, "hash": identity.short_hash, "message": outcome.message(),
                "history_id": outcome.history_id, "recipe": json.loads(identity.recipe_json)}

    def api_restore(self) -> dict:
        with self.host.lock(), self.host.job("Block Merger: restore"):
            self.service().restore_base()
        return {"message": f"Restored {self.host.model_title()}."}

    def api_history(self, limit: int = 50, search: str = "", mode: str = "and") -> dict:
        history = self.service().history()
        rows = history.search(search, mode) if search.strip() else history.rows(limit)
        return {"rows": rows[-limit:] if limit > 0 else rows}

    # LoRA tools: bodies are checked field by field (an unknown field is an error, not ignored)

    def api_lora_bake_loaded(self, body) -> dict:
        args = lora_body(body, {"loras": None, "name": ""})
        with self.host.lock(), self.host.job("Block Merger: LoRA bake"):
            outcome = self.lora_tools().bake_loaded(args["loras"], args["name"])
        identity = outcome.identity
        return {"name": identity.name, "hash": identity.short_hash, "message": outcome.message(),
                "history_id": outcome.history_id, "recipe": json.loads(identity.recipe_json)}

    def api_lora_bake(self, body) -> dict:
        args = lora_body(body, {"model": None, "loras": None, "name": None, "save_dtype": "keep", "overwrite": False})
        with self.host.job("Block Merger: LoRA bake to file"):
            result = self.lora_tools().bake_to_file(args["model"], args["loras"], args["name"], args["save_dtype"],
                                                    args["overwrite"])
        return {"path": str(result.path), "history_id": result.history_id,
                "loras": [use.summary() for use in result.plan.uses]}

    def api_lora_merge(self, body) -> dict:
        args = lora_body(body, {"loras": None, "name": None, "rank": "concat", "save_dtype": "fp16",
                                "metadata": "new", "overwrite": False})
        with self.host.job("Block Merger: LoRA merge"):
            result = self.lora_tools().merge(args["loras"], args["rank"], args["name"], args["save_dtype"],
                                             args["metadata"], args["overwrite"])
        return {"path": str(result.path), "history_id": result.history_id, "modules": result.modules,
                "ranks": result.ranks}

    def api_lora_extract(self, body) -> dict:
        args = lora_body(body, {"model_a": None, "model_b": None, "name": None, "alpha": 1.0, "beta": 1.0,
                                "rank": "128", "conv_rank": "", "save_dtype": "fp16", "overwrite": False})
        with self.host.job("Block Merger: LoRA extract"):
            result = self.lora_tools().extract(args["model_a"], args["model_b"], args["name"], args["alpha"],
                                               args["beta"], str(args["rank"]), str(args["conv_rank"] or ""),
                                               args["save_dtype"], args["overwrite"])
        return {"path": str(result.path), "history_id": result.history_id, "modules": result.modules,
                "text_encoder": result.text_encoder, "ranks": result.ranks}

    def api_lora_diff(self, body) -> dict:
        args = lora_body(body, {"loras": None, "name": None, "alpha": 1.0, "beta": 1.0, "gamma": 1.0,
                                "save_dtype": "fp16", "metadata": "new", "overwrite": False})
        with self.host.job("Block Merger: LoRA diff"):
            result = self.lora_tools().difference(args["loras"], args["name"], args["alpha"], args["beta"],
                                                  args["gamma"], args["save_dtype"], args["metadata"],
                                                  args["overwrite"])
        return {"path": str(result.path), "history_id": result.history_id, "modules": result.modules,
                "ranks": result.ranks}

    def api_lora_inspect(self, name: str) -> dict:
        return {"name": name, "text": self.lora_tools().inspect(name)}

    def api_lora_list(self, kind: str = "All", family: str = "All") -> dict:
        entries = self.lora_tools().catalog(kind, family)
        return {"loras": [{"name": e.name, "label": e.label(), "type": e.summary.kind if e.summary else None,
                           "families": list(e.summary.families) if e.summary else [],
                           "ranks": list(e.summary.ranks) if e.summary else []} for e in entries]}

    def add_api_routes(self, app) -> None:
        """The REST routes, added as the WebUI adds its own API (modules/api/api.py): not at all unless the API is
        on (`--api`, or `--nowebui`, which serves only the API), and behind `--api-auth`'s credentials when it is
        set. Merge and restore take the queue lock (they wait for a running generation)."""
        options = api_route_options()
        if options is None:
            return
        from fastapi import HTTPException

        def call(handler, *args):
            try:
                return handler(*args)
            except MergeError as e:
                raise HTTPException(status_code=400, detail=str(e)) from e

        def presets():
            return call(self.api_presets)

        def merge(body: dict):
            return call(self.api_merge, body)

        def restore():
            return call(self.api_restore)

        def history(limit: int = 50, search: str = "", mode: str = "and"):
            return call(self.api_history, limit, search, mode)

        app.add_api_route("/block-merger/presets", presets, methods=["GET"], **options)
        app.add_api_route("/block-merger/merge", merge, methods=["POST"], **options)
        app.add_api_route("/block-merger/restore", restore, methods=["POST"], **options)
        app.add_api_route("/block-merger/history", history, methods=["GET"], **options)
        for path, handler in (("bake-loaded", self.api_lora_bake_loaded), ("bake", self.api_lora_bake),
                              ("merge", self.api_lora_merge), ("extract", self.api_lora_extract),
                              ("diff", self.api_lora_diff)):
            app.add_api_route(f"/block-merger/lora/{path}", _post_route(call, handler), methods=["POST"], **options)

        def lora_inspect(name: str = ""):
            return call(self.api_lora_inspect, name)

        def lora_list(kind: str = "All", family: str = "All"):
            return call(self.api_lora_list, kind, family)

        app.add_api_route("/block-merger/lora/inspect", lora_inspect, methods=["GET"], **options)
        app.add_api_route("/block-merger/lora/list", lora_list, methods=["GET"], **options)


def _post_route(call, handler):
    """A FastAPI POST endpoint taking a JSON object body (a plain function: FastAPI reads its annotation)."""

    def route(body: dict):
        return call(handler, body)

    return route


def lora_body(body, fields: dict) -> dict:
    """A LoRA route's JSON body with its defaults; None marks a required field. `loras` may be a list of specs or one
    text (a spec per line). Raises MergeError naming an unknown, missing or mistyped field."""
    if not isinstance(body, dict):
        raise MergeError("The body must be a JSON object.")
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise MergeError(f"Unknown fields: {', '.join(unknown)} (known: {', '.join(fields)}).")
    missing = [k for k, v in fields.items() if v is None and body.get(k) in (None, "", [])]
    if missing:
        raise MergeError(f"Missing field(s): {', '.join(missing)}.")
    args = {**fields, **body}
    loras = args.get("loras")
    if isinstance(loras, list):
        if not all(isinstance(item, str) for item in loras):
            raise MergeError("Field loras must be a list of 'name:ratio[:block weights]' strings.")
        args["loras"] = "\n".join(loras)
    for key, default in fields.items():
        value = args[key]
        if key == "loras" or default is None:
            if not isinstance(value, str):
                raise MergeError(f"Field {key} must be a string.")
        elif isinstance(default, bool) and not isinstance(value, bool):
            raise MergeError(f"Field {key} must be true or false.")
        elif isinstance(default, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise MergeError(f"Field {key} must be a number.")
        elif isinstance(default, str) and not isinstance(value, (str, int)) or isinstance(value, bool) and \
                not isinstance(default, bool):
            raise MergeError(f"Field {key} must be a string.")
    return args


def api_route_options() -> dict | None:
    """None when the WebUI serves no API; else add_api_route's extra arguments: none, or with `--api-auth user:pass,
    ...` a dependency that asks for those HTTP Basic credentials exactly as the WebUI's `Api.auth` does."""
    cmd_opts = shared.cmd_opts
    if not (getattr(cmd_opts, "api", False) or getattr(cmd_opts, "nowebui", False)):
        return None
    auth = getattr(cmd_opts, "api_auth", None)
    if not auth:
        return {}
    from fastapi import Depends, HTTPException
    from fastapi.security import HTTPBasic

    credentials = dict(pair.split(":", 1) for pair in auth.split(",") if ":" in pair)

    def check(given=Depends(HTTPBasic())) -> bool:  # noqa: B008 (FastAPI's idiom); no annotation: see the module's
        # `from __future__ import annotations`, which would leave FastAPI a string it cannot resolve
        expected = credentials.get(given.username)
        if expected is not None and compare_digest(given.password.encode(), expected.encode()):
            return True
        raise HTTPException(status_code=401, detail="Incorrect username or password",
                            headers={"WWW-Authenticate": "Basic"})

    return {"dependencies": [Depends(check)]}

