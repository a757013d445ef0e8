"""Synthetic Stable Diffusion checkpoints with the real key names and shape structure.

Used by the tests (tiny models: every large dimension divided by a factor, a few MB) and by the benchmarks
(full-size models, written key by key so that no fp32 copy of the whole model is ever held).

The key lists come from ``lib_merge/data/{sd1-ldm,sdxl-sgm,flux-dev}.json``, which record every key, shape and stored
dtype of real SD1 (LDM layout), SDXL (SGM layout) and Flux-dev (all-in-one: diffusion model, CLIP-L, T5-XXL and VAE)
checkpoints. Flux-schnell is Flux-dev without `guidance_in`; `components` picks parts of a Flux file (e.g. only
"diffuser", as the separately distributed diffusion models are).

Values are deterministic: every key draws from its own ``torch.Generator`` seeded from ``(seed, key name)``, so a key's
values do not depend on which other keys exist or in which order they are generated.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import torch

from ..core.arch import is_model_key

__all__ = [
    "FAMILIES",
    "load_layout",
    "scaled_shape",
    "layout_shapes",
    "make_tensor",
    "iter_state_dict",
    "make_state_dict",
    "write_checkpoint",
    "stream_checkpoint",
    "make_checkpoint",
]

DATA = Path(__file__).resolve().parent.parent / "data"
FAMILIES = {"sd1": "sd1-ldm", "sdxl": "sdxl-sgm", "flux-dev": "flux-dev", "flux-schnell": "flux-dev"}
FLUX_COMPONENTS = ("diffuser", "clip_l", "t5xxl", "vae")

CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
STD = 0.02  # standard deviation of ordinary weights
BIAS_STD = 0.01
SMALL_DIM = 64  # dimensions below this are structural (kernels, latent channels) and never scaled
TOKENS = 77  # CLIP's context length: kept at every factor as well

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64}
_NORM = re.compile(r"(norm|ln_)")
# Special scalar buffers found in real files (values of the kind real checkpoints carry).
_CONSTANTS = {
    "logit_scale": 4.6052,  # ln(100), CLIP's learned temperature
    "edm_vpred.sigma_max": 120.0,
    "edm_vpred.sigma_min": 0.002,
}


def _family_file(family: str) -> Path:
    name = FAMILIES.get(family, family)
    if name not in FAMILIES.values():
        raise ValueError(f"unknown model family {family!r}; expected one of {sorted(FAMILIES)}")
    return DATA / f"{name}.json"


def load_layout(family: str, components: Iterable[str] | None = None) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every key of a real checkpoint of ``family`` ("sd1", "sdxl", "flux-dev", "flux-schnell") -> (shape, stored
    torch dtype); with ``components``, only those parts of the layout file (Flux: diffuser, clip_l, t5xxl, vae).

    Keys come in the order of the layout file, component by component (text encoder(s), VAE, U-Net).
    """
    with open(_family_file(family), encoding="utf-8") as f:
        data = json.load(f)
    parts = data["components"]
    unknown = set(components or ()) - set(parts)
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)} of {family}; it has {sorted(parts)}")
    out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for name, component in parts.items():
        if components is not None and name not in components:
            continue
        for key, spec in component.items():
            if family == "flux-schnell" and ".guidance_in." in key:
                continue
            out[key] = (tuple(int(d) for d in spec["shape"]), _TORCH_DTYPES[spec["dtype"]])
    return out


def scaled_shape(shape: Iterable[int], factor: int) -> tuple[int, ...]:
    """Divide every dimension >= 64 by ``factor`` (320 -> 40 for factor 8); keep the small structural ones (3x3
    kernels, 4 latent channels, 1) and the 77-token context length."""
    if factor < 1:
        raise ValueError("factor must be >= 1")
    return tuple(max(1, d // factor) if d >= SMALL_DIM and d != TOKENS else d for d in shape)


def _is_buffer(key: str) -> bool:
    """Keys outside any module (schedule buffers, EDM parameters): the seed never merges them; real fp16 files keep
    them in fp32."""
    return not is_model_key(key)


def layout_shapes(
    family: str, factor: int = 1, dtype: torch.dtype = torch.float16, in_channels: int = 4,
    components: Iterable[str] | None = None,
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """key -> (shape, dtype) of the checkpoint :func:`make_state_dict` produces with the same arguments."""
    out = {}
    for key, (shape, stored) in load_layout(family, components).items():
        shape = scaled_shape(shape, factor)
        if key == CONV_IN and in_channels != shape[1]:
            shape = (shape[0], in_channels, *shape[2:])
        if not stored.is_floating_point:
            dt = stored
        elif _is_buffer(key):
            dt = torch.float32
        else:
            dt = dtype
        out[key] = (shape, dt)
    return out


def _generator(seed: int, key: str, salt: int = 0) -> torch.Generator:
    mixed = (seed * 0x9E3779B1 + zlib.crc32(key.encode("utf-8")) * 0x85EBCA6B + salt) & 0x7FFF_FFFF_FFFF_FFFF
    return torch.Generator().manual_seed(mixed)


def make_tensor(key: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """A plausible fresh tensor for ``key``: int keys are ``arange`` (position_ids), norm weights ~1, biases small,
    everything else N(0, 0.02). Generated in fp32 and cast once to ``dtype``."""
    if not dtype.is_floating_point:
        n = 1
        for d in shape:
            n *= d
        return torch.arange(n, dtype=dtype).reshape(shape)
    leaf = key.rsplit(".", 1)[-1]
    for name, value in _CONSTANTS.items():
        if key.endswith(name):
            return torch.full(shape, value, dtype=torch.float32).to(dtype)
    t = torch.empty(shape, dtype=torch.float32)
    g = _generator(seed, key)
    if leaf == "bias" or leaf.endswith("_bias"):
        t.normal_(0.0, BIAS_STD, generator=g)
    elif leaf == "weight" and len(shape) == 1 and _NORM.search(key):
        t.normal_(1.0, STD, generator=g)
    elif _is_buffer(key):
        t.uniform_(0.0, 1.0, generator=g)
    else:
        t.normal_(0.0, STD, generator=g)
    return t.to(dtype)


def _perturb(key: str, ref: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, seed: int, noise: float):
    """``ref`` (a tensor of the base model) + noise * N(0, 0.02), computed in fp32 for this key only."""
    if tuple(ref.shape) != shape:
        # The inpainting / pix2pix case: the base's conv_in is narrower or wider in dimension 1.
        if len(shape) == ref.dim() and shape[0] == ref.shape[0] and shape[2:] == tuple(ref.shape[2:]):
            fresh = make_tensor(key, shape, torch.float32, seed)
            n = min(shape[1], ref.shape[1])
            fresh[:, :n] = ref[:, :n].float()
            ref = fresh
        else:
            raise ValueError(f"{key}: base has shape {tuple(ref.shape)}, expected {shape}")
    if not dtype.is_floating_point or _is_buffer(key) or noise == 0:
        return ref.to(dtype, copy=True)
    x = ref.to(torch.float32, copy=True)
    eps = torch.empty(shape, dtype=torch.float32)
    eps.normal_(0.0, STD, generator=_generator(seed, key, salt=1))
    x.add_(eps, alpha=noise)
    return x.to(dtype)


def iter_state_dict(
    family: str,
    factor: int = 1,
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
    base: Mapping[str, torch.Tensor] | None = None,
    noise: float = 0.0,
    in_channels: int = 4,
    components: Iterable[str] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """A synthetic checkpoint of ``family`` ("sd1", "sdxl", "flux-dev", "flux-schnell") with every key of the real
    layout, as ``(key, tensor)`` one key at a time (a full-size model never has to be in memory at once).

    - ``factor``: divide each dimension >= 64 by it (8 or 16 give models of a few MB; 1 is full size).
    - ``dtype``: the dtype of floating-point model tensors. Integer keys (position_ids) stay int64 and schedule
      buffers (keys without "model") stay fp32, as in real files.
    - ``base``: another state dict of the same layout; the result is ``base + noise * N(0, 0.02)`` per float model
      key (fine-tunes lie close to their base). Integer keys and buffers are copied from ``base``.
    - ``in_channels``: 9 (inpainting) or 8 (instruct-pix2pix) widens dimension 1 of the U-Net's conv_in.
    - ``components``: only these parts of the layout (Flux: "diffuser", "clip_l", "t5xxl", "vae").
    """
    for key, (shape, dt) in layout_shapes(family, factor, dtype, in_channels, components).items():
        if base is None:
            yield key, make_tensor(key, shape, dt, seed)
        else:
            yield key, _perturb(key, base[key], shape, dt, seed, noise)


def make_state_dict(*args, **kwargs) -> dict[str, torch.Tensor]:
    """:func:`iter_state_dict` (same arguments) gathered into a dict: for small models."""
    return dict(iter_state_dict(*args, **kwargs))


def write_checkpoint(path: str | os.PathLike, state: Mapping[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Save a state dict with ``safetensors.torch.save_file``."""
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)


def stream_checkpoint(
    path: str | os.PathLike,
    specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    produce: Callable[[str], torch.Tensor],
    metadata: dict | None = None,
) -> None:
    """Write a safetensors file key by key: ``produce(key)`` is called once per key of ``specs`` (key -> (shape,
    dtype)) and its tensor is written and dropped, so only one tensor is held at a time (atomically, through the
    project's own streamed writer)."""
    from ..io.checkpoint import SafetensorsStreamWriter, atomic_output

    entries = [(key, dt, shape) for key, (shape, dt) in specs.items()]
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    with atomic_output(path, overwrite=True) as tmp, SafetensorsStreamWriter(tmp, entries, meta) as writer:
        for key in specs:
            writer.write(key, produce(key))


class _Reader(Mapping):
    """A checkpoint's tensors as a read-only mapping, loaded one at a time (a base that stays on disk)."""

    def __init__(self, source):
        self._source = source

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._source:
            raise KeyError(key)
        return self._source.get(key)

    def __iter__(self):
        return iter(self._source.keys())

    def __len__(self) -> int:
        return len(self._source)


def make_checkpoint(
    path: str | os.PathLike,
    family: str,
    factor: int = 1,
    dtype: torch.dtype = torch.float16,
    seed: int = 0,
    base: Mapping[str, torch.Tensor] | str | os.PathLike | None = None,
    noise: float = 0.0,
    in_channels: int = 4,
    metadata: dict | None = None,
    components: Iterable[str] | None = None,
) -> Path:
    """Generate and write a synthetic checkpoint, streaming key by key (peak memory: one tensor plus its fp32
    working copy). ``base`` may be a state dict or the path of a safetensors file to derive from."""
    if isinstance(base, (str, os.PathLike)):
        from ..io.checkpoint import open_checkpoint

        with open_checkpoint(base) as source:
            return make_checkpoint(path, family, factor, dtype, seed, _Reader(source), noise, in_channels, metadata,
                                   components)
    specs = layout_shapes(family, factor, dtype, in_channels, components)
    if base is None:
        produce = lambda key: make_tensor(key, specs[key][0], specs[key][1], seed)  # noqa: E731
    else:
        produce = lambda key: _perturb(key, base[key], specs[key][0], specs[key][1], seed, noise)  # noqa: E731
    stream_checkpoint(path, specs, produce, metadata)
    return Path(path)
