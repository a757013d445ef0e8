"""Save-time transforms (dtype, prune, bake VAE, reset CLIP ids) as pure per-key functions.

The engine streams the output, so it must know the final header before any tensor is computed (`plan_output`)
and then transform each tensor as it arrives (`finalize_tensor`). Both derive their answers from the same
helpers, so the header and the data cannot disagree. Rules follow the seed's `savemodel`, with its bugs fixed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.arch import FLUX_PARTS, is_model_key
from ..core.errors import MergeError
from ..core.finite import all_finite
from .format import CheckpointError
from .read import Checkpoint, open_checkpoint

SAVE_DTYPES: dict[str, torch.dtype | None] = {
    "keep": None,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp32": torch.float32,
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_WARNING = ("{count} of {total} tensors are saved in fp8 ({names}): 3 (e4m3fn) or 2 (e5m2) mantissa bits, so "
               "small merge differences round away; save as bf16 or fp16 to keep the merge's precision.")
VAE_PREFIX = "first_stage_model."
PRUNE_KEEP = ("diffusion_model.", "first_stage_model.", "cond_stage_model.")
PRUNE_KEEP_SDXL = ("diffusion_model.", "first_stage_model.", "conditioner.")
CLIP_POSITION_ID_KEYS = (
    "cond_stage_model.transformer.text_model.embeddings.position_ids",
    "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
)
CLIP_TOKENS = 77

Entry = tuple[str, torch.dtype, tuple[int, ...]]


@dataclass(frozen=True)
class SaveOptions:
    """How to write the merged model: target float dtype, pruning, a VAE to bake in, CLIP position-id repair, and
    whether model A's `.yaml` config goes beside the output (the seed's "copy config")."""

    dtype: str = "keep"
    prune: bool = False
    bake_vae: str | Path | None = None
    reset_clip_ids: bool = False
    copy_config: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in SAVE_DTYPES:
            raise MergeError(f"Unknown save dtype {self.dtype!r}; choose one of {', '.join(SAVE_DTYPES)}.")


def model_config(model: Path) -> Path | None:
    """The `.yaml` config beside a checkpoint, or None: the WebUI reads a checkpoint's config (SD2 v-prediction,
    inpainting, instruct-pix2pix) from the `.yaml` of the same name, so "copy config" puts model A's beside a merge
    of it, to load as its base did."""
    config = model.with_suffix(".yaml")
    return config if config.is_file() else None


def open_vae(opts: SaveOptions) -> Checkpoint | None:
    """Open the VAE named in the options (the caller closes it), or None when no VAE is to be baked."""
    return open_checkpoint(opts.bake_vae) if opts.bake_vae else None


def converted_dtype(key: str, dtype: torch.dtype, opts: SaveOptions) -> torch.dtype:
    """The dtype a tensor is saved in: only floating tensors of the model (not schedule buffers) change; fp8
    tensors too (the merge computes them in fp32 and rounds once into the saved dtype)."""
    target = SAVE_DTYPES[opts.dtype]
    if target is None or not is_model_key(key) or not dtype.is_floating_point:
        return dtype
    return target


def precision_warnings(planned: Sequence[Entry]) -> list[str]:
    """What the user should know about the saved precision: fp8 output (chosen, or kept from fp8 inputs)."""
    fp8 = [dtype for _, dtype, _ in planned if dtype in FP8_DTYPES]
    if not fp8:
        return []
    names = ", ".join(sorted({str(d).removeprefix("torch.") for d in fp8}))
    return [FP8_WARNING.format(count=len(fp8), total=len(planned), names=names)]


def is_kept(key: str, is_sdxl: bool, opts: SaveOptions) -> bool:
    """Whether a key appears in the output at all."""
    if is_sdxl and key.startswith("cond_stage_model."):
        return False  # in SDXL these only alias conditioner.* tensors
    if opts.prune:
        keep = PRUNE_KEEP_SDXL if is_sdxl else PRUNE_KEEP
        return any(p in key for p in keep) or key.startswith(FLUX_PARTS)
    return True


def _vae_label(vae: Checkpoint) -> str:
    return str(vae.path) if vae.path is not None else vae.name


def _vae_key(key: str, vae: Checkpoint) -> str:
    """The VAE file's key for model key `first_stage_model.X`: prefixed `first_stage_model.X` or bare `X`."""
    if key in vae:
        return key
    bare = key[len(VAE_PREFIX) :]
    if bare in vae:
        return bare
    raise CheckpointError(
        f"VAE {_vae_label(vae)} has no tensor {bare!r} (model key {key!r}); it does not fit this model. "
        "Choose a VAE made for this model type."
    )


def _check_vae_shape(key: str, shape: tuple[int, ...], vae: Checkpoint, vae_key: str) -> None:
    vshape = tuple(vae.shape(vae_key))
    if vshape != tuple(shape):
        raise CheckpointError(
            f"VAE {_vae_label(vae)}: tensor {vae_key!r} has shape {list(vshape)} but the model's {key!r} has "
            f"{list(shape)}; this VAE does not fit this model. Choose a VAE made for this model type."
        )


def _bakes(key: str, vae: Checkpoint | None) -> bool:
    return vae is not None and key.startswith(VAE_PREFIX)


def _require_vae(opts: SaveOptions, vae: Checkpoint | None) -> None:
    if opts.bake_vae and vae is None:
        raise ValueError("SaveOptions.bake_vae is set: open it (open_vae) and pass the checkpoint as `vae`.")


def plan_output(
    entries: Sequence[tuple[str, torch.dtype, Sequence[int]]],
    is_sdxl: bool,
    opts: SaveOptions,
    vae: Checkpoint | None = None,
) -> list[Entry]:
    """The final (key, dtype, shape) list of the saved file, in input order; checks the VAE fits up front."""
    _require_vae(opts, vae)
    out: list[Entry] = []
    for key, dtype, shape in entries:
        shape = tuple(int(d) for d in shape)
        if not is_kept(key, is_sdxl, opts):
            continue
        if _bakes(key, vae):
            _check_vae_shape(key, shape, vae, _vae_key(key, vae))
        if opts.reset_clip_ids and key in CLIP_POSITION_ID_KEYS:
            out.append((key, torch.int64, (1, CLIP_TOKENS)))
            continue
        out.append((key, converted_dtype(key, dtype, opts), shape))
    return out


def finalize_tensor(key: str, tensor: torch.Tensor, opts: SaveOptions, vae: Checkpoint | None = None) -> torch.Tensor:
    """Transform one output tensor as `plan_output` promised; never modifies `tensor` in place."""
    _require_vae(opts, vae)
    if opts.reset_clip_ids and key in CLIP_POSITION_ID_KEYS:
        return torch.arange(CLIP_TOKENS, dtype=torch.int64)[None]
    if _bakes(key, vae):
        vkey = _vae_key(key, vae)
        _check_vae_shape(key, tuple(tensor.shape), vae, vkey)
        baked = vae.get(vkey)
        # The baked tensor takes the model's dtype for that key, so "keep" keeps the model's precision layout.
        tensor = _cast(key, baked, tensor.dtype) if baked.dtype != tensor.dtype else baked
    target = converted_dtype(key, tensor.dtype, opts)
    if target != tensor.dtype:
        tensor = _cast(key, tensor, target)
    return tensor.contiguous()


def _cast(key: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` in `dtype`, refusing values that overflow it (finite before, inf after): never saved silently."""
    cast = tensor.to(dtype)
    if not all_finite(cast) and all_finite(tensor):
        name = next((n for n, d in SAVE_DTYPES.items() if d == dtype), str(dtype).removeprefix("torch."))
        raise CheckpointError(f"Saving {key} as {name} gives inf/NaN: its values exceed the range of {name}. "
                              "Nothing was saved; save in fp32 or keep the models' precision.")
    return cast


def clip_id_problems(position_ids: torch.Tensor) -> list[int]:
    """Positions 0..76 whose CLIP position id is not its own index (broken merges drift to 76.99… etc.)."""
    flat = position_ids.detach().reshape(-1).to(torch.float64)
    wrong = [i for i in range(min(flat.numel(), CLIP_TOKENS)) if flat[i].item() != i]
    wrong.extend(range(flat.numel(), CLIP_TOKENS))  # missing positions are wrong too
    return wrong
