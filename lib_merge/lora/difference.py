"""Extract from two LoRAs (SuperMerger's `lmerge(merge=False)`, seed-lora-analysis.md §2.5): the features of LoRA C
that are like, or unlike, those of LoRA B, as one LoRA with B's layout and alphas.

Per factor tensor (up, down, Tucker mid), row by row: c = cos(x, y) clamped to [-1, 1], d = ((c+1)/2)^γ, and
out = lerp(x, y, α)·lerp(d, 1−d, β). α picks B (0) or C (1), β similar (0) or dissimilar (1) rows, γ how sharply;
the defaults 1, 1, 1 keep C's rows scaled by how unlike B's they are. Before that each input gets its ratio and
block weights, linear in ΔW as everywhere in Block Merger (√|ρ| on up, sign(ρ)·√|ρ| on down: the seed's "same to
Strength"; its default squares ρ).

Unlike the seed, the rows of a conv factor are its output channels over all its other axes (the seed takes the
last axis, the kernel width, so a 1×1 conv's "rows" are single numbers whose cosine is only their sign), and two
LoRAs that do not have the same modules, tensors and ranks, or other module kinds, are refused by name instead of
a KeyError. Factors are only defined up to an invertible r×r mixing, so the row-wise cosine of two independently
trained LoRAs depends on the bases their training happened to pick: the result is a heuristic, not a property of
the two ΔW.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.weights import Presets
from ..io.history import History
from .blocks import LoraSpec
from .combine import output_metadata, read_inputs
from .formats import KIND_NAMES, LoraError, LoraFile, LoraModule
from .keys import block_slot, kohya_name, module_id
from .save import SAVE_DTYPES, kohya_metadata, write_lora

FACTORS = {"up": "lora_up.weight", "down": "lora_down.weight", "mid": "lora_mid.weight"}
SCALARS = ("alpha", "scale")


@dataclass
class DifferenceResult:
    path: Path
    family: str
    modules: int
    ranks: list[int]
    history_id: int | None = None


def check_amounts(alpha: float, beta: float, gamma: float) -> None:
    """α and β are interpolation weights in [0, 1]; γ ≥ 0 is an exponent (the seed asserts the same, bare)."""
    for name, value, low, high in (("alpha", alpha, 0.0, 1.0), ("beta", beta, 0.0, 1.0), ("gamma", gamma, 0.0, None)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
                or value < low or (high is not None and value > high):
            where = f"between {low:g} and {high:g}" if high is not None else f"{low:g} or more"
            raise LoraError(f"{name} must be a number {where} for Extract from two LoRAs, not {value!r}.")


def factor_difference(x: torch.Tensor, y: torch.Tensor, alpha: float, beta: float, gamma: float) -> torch.Tensor:
    """lerp(x, y, α)·lerp(d, 1−d, β) with d = ((cos+1)/2)^γ per row (dim 0 against all other axes), in fp32.

    A zero row counts as orthogonal (cos 0). x and y must have the same shape."""
    x, y = x.float(), y.float()
    rows_x, rows_y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
    cos = torch.nn.functional.cosine_similarity(rows_x, rows_y, dim=1).clamp(-1.0, 1.0)
    d = ((cos + 1) / 2) ** gamma
    weight = torch.lerp(d, 1 - d, beta)
    return torch.lerp(x, y, alpha) * weight.reshape(-1, *[1] * (x.dim() - 1))


def _factor_scales(k: float) -> dict[str, float]:
    """Multipliers for up, down and mid whose product is k (the sign on down, as the seed's "same to Strength")."""
    root = math.sqrt(abs(k))
    return {"up": root, "down": math.copysign(root, k) if k else 0.0, "mid": 1.0}


def _plain_modules(lora: LoraFile, family: str, role: str) -> dict[str, LoraModule]:
    """module id -> module, refusing what has no per-factor meaning here."""
    out = {}
    for name, module in lora.modules.items():
        what = f"LoRA {role} ({lora.name}): module {name}"
        if module.kind != "lora":
            raise LoraError(f"{what} is {KIND_NAMES.get(module.kind, module.kind)}; Extract from two LoRAs compares "
                            f"LoRA/LoCon factors only. Merge or bake it instead.")
        extra = sorted(set(module.parts) - set(FACTORS) - set(SCALARS))
        if extra:
            kind = "DoRA" if {"dora_scale", "magnitude"} & set(extra) else f"a LoRA with {', '.join(extra)}"
            raise LoraError(f"{what} is {kind}, which has no per-factor form to compare; use plain LoRA/LoCon files.")
        mid = module_id(name, family)
        if mid is None:
            raise LoraError(f"{what} has a name of no known form (kohya, PEFT or ComfyUI); it cannot be matched to "
                            f"the other LoRA's modules.")
        out[mid] = module
    return out


def _missing(have: dict[str, LoraModule], lack: dict[str, LoraModule], have_name: str, lack_name: str) -> None:
    gone = sorted(set(have) - set(lack))
    if gone:
        more = f" and {len(gone) - 1} more" if len(gone) > 1 else ""
        raise LoraError(f"LoRA {have_name} has module {have[gone[0]].name}{more} that LoRA {lack_name} lacks; "
                        f"Extract from two LoRAs needs two LoRAs of the same layers (same targets and type).")


def _pair(b: LoraModule, c: LoraModule, names: tuple[str, str]) -> list[str]:
    """The factor parts of a module pair, checked to exist in both with the same rank and shape."""
    parts_b, parts_c = sorted(set(b.parts) & set(FACTORS)), sorted(set(c.parts) & set(FACTORS))
    if parts_b != parts_c:
        raise LoraError(f"Module {b.name} has parts {', '.join(parts_b)} in {names[0]} but {', '.join(parts_c)} in "
                        f"{names[1]} (one is a Tucker LoCon); use two LoRAs of the same type.")
    for part in parts_b:
        xb, xc = b.parts[part], c.parts[part]
        if (xb.shape[0], xb[0].numel() if xb.dim() else 0) != (xc.shape[0], xc[0].numel() if xc.dim() else 0):
            ranks = f"rank {b.rank} in {names[0]} and {c.rank} in {names[1]}" if b.rank != c.rank else \
                f"{part} {list(xb.shape)} in {names[0]} and {list(xc.shape)} in {names[1]}"
            raise LoraError(f"Module {b.name} has {ranks}; both LoRAs need the same rank and shapes for every "
                            f"module (re-rank one of them first: Merge LoRAs with only that LoRA, at the other's "
                            f"rank).")
    return parts_b


def _alpha_text(alphas: set[float], lora: LoraFile) -> str:
    if len(alphas) == 1:
        return f"{next(iter(alphas)):g}"
    return lora.metadata.get("ss_network_alpha", f"{max(alphas):g}")


def difference_to_file(specs: Sequence[LoraSpec], output: str | Path, *, alpha: float = 1.0, beta: float = 1.0,
                       gamma: float = 1.0, presets: Presets | None = None, dtype: str = "keep",
                       metadata: str = "new", overwrite: bool = False, history: History | None = None,
                       progress: Callable[[int, int], None] | None = None) -> DifferenceResult:
    """Write the LoRA of `specs` = [B, C] (see the module doc) to `output`; dtype "keep" saves in B's dtype.

    C is rescaled to B's alphas before the comparison: with s = alpha/rank, C's factors times √(s_C/s_B) give
    s_B·up'·down' = s_C·up·down, the same ΔW_C, so the output is written with B's alphas (what the seed's shared alpha
    dict amounts to), and α = 1, β = γ = 0 gives back exactly C's ΔW, α = β = γ = 0 exactly B's."""
    check_amounts(alpha, beta, gamma)
    if len(specs) != 2:
        raise LoraError(f"Extract from two LoRAs takes exactly two LoRAs, B then C ({len(specs)} given); list "
                        f"them as file:ratio[:block weights].")
    output, slots, loras, family = read_inputs(specs, output, overwrite, presets, "compared")
    mods_b, mods_c = (_plain_modules(lora, family, role) for lora, role in zip(loras, "BC", strict=True))
    names = (f"B ({loras[0].name})", f"C ({loras[1].name})")
    _missing(mods_b, mods_c, *names)
    _missing(mods_c, mods_b, *names[::-1])
    if dtype == "keep":
        first = next(iter(mods_b.values())).parts["down"].dtype
        dtype = next((k for k, v in SAVE_DTYPES.items() if v == first), "fp32")
    tensors: dict[str, torch.Tensor] = {}
    ranks, alphas = set(), set()
    for done, mid in enumerate(sorted(mods_b), 1):
        b, c = mods_b[mid], mods_c[mid]
        parts = _pair(b, c, names)
        slot = block_slot(mid, family)
        scale_b, scale_c = _factor_scales(slots[0][slot]), _factor_scales(slots[1][slot] * c.scale / b.scale)
        name = kohya_name(mid, family)
        for part in parts:
            x = b.parts[part].float() * scale_b[part]
            y = c.parts[part].float().reshape(x.shape) * scale_c[part]
            tensors[f"{name}.{FACTORS[part]}"] = factor_difference(x, y, alpha, beta, gamma)
        rank = int(b.parts["down"].shape[0])
        tensors[f"{name}.alpha"] = torch.tensor(b.scale * rank)
        ranks.add(rank)
        alphas.add(b.scale * rank)
        if progress is not None:
            progress(done, len(mods_b))
    recipe = {"operation": "lora diff", "mode": "LoRA diff", "alpha": alpha, "beta": beta, "gamma": gamma,
              "loras": [{"path": s.path, "ratio": s.ratio, "blocks": s.blocks} for s in specs]}
    base = kohya_metadata(family, output, str(max(ranks)), _alpha_text(alphas, loras[0]), recipe=recipe)
    if "ss_network_args" in loras[0].metadata:  # B's conv dims and the like: the output has B's layout
        base["ss_network_args"] = loras[0].metadata["ss_network_args"]
    write_lora(output, tensors, output_metadata(metadata, loras, specs, base, output), dtype, overwrite)
    history_id = None
    if history is not None:
        title = f"LoRA diff: {specs[1].name}:{specs[1].ratio:g} against {specs[0].name}:{specs[0].ratio:g}"
        history_id = history.append(title, {**recipe, "model_a": specs[0].path, "model_b": specs[1].path,
                                            "weights_alpha": specs[0].text(), "weights_beta": specs[1].text()})
    return DifferenceResult(output, family, len(mods_b), sorted(ranks), history_id)
