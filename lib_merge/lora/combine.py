"""Merge several LoRAs into one: exact concatenation, or an SVD re-rank of the summed change.

Every input module contributes c·ΔW with c = ratio(block)·scale, linear in the ratio as at generation time (the
seed's plain merge multiplies both factors and so scales by ratio², with cross terms between LoRAs: §2.4.3).
- concat: up = [c₁·up₁ | c₂·up₂ | …], down = [down₁; down₂; …], alpha = Σ ranks, so scale 1 and
  up @ down = Σ cᵢ·ΔWᵢ exactly; ranks add up. Tucker LoCons are folded into plain LoCon factors first.
- rank N / auto: ΔW = Σ cᵢ·ΔWᵢ in fp32, then truncated SVD (LoHa, LoKr and full modules too).
(IA)³ and DoRA changes depend on the model's own weights, so they cannot become a model-free LoRA: refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.weights import Presets
from ..io.history import History
from .blocks import LoraSpec, load_presets
from .detect import lora_families
from .formats import LoraError, LoraFile, LoraModule, read_lora
from .keys import FAMILIES, FAMILY_NAMES, block_slot, kohya_name, module_id
from .lowrank import RankChoice, factorize, factorize_product
from .save import add_factors, check_lora_output, kohya_metadata, write_lora

METADATA_MODES = ("new", "new-without-name", "merge", "save-all", "first")


@dataclass
class Term:
    module: LoraModule
    coefficient: float


@dataclass
class CombineResult:
    path: Path
    family: str
    modules: int
    ranks: list[int]
    unmatched: dict[str, list[str]] = field(default_factory=dict)
    history_id: int | None = None


def common_family(loras: Sequence[LoraFile], doing: str = "merged") -> str:
    """The family all inputs fit (SD1 naming when nothing tells SD1 from SD2; their names are the same)."""
    possible = set(FAMILIES)
    for lora in loras:
        fits, _ = lora_families(lora)
        if not possible & fits:
            others = ", ".join(f"{x.name} ({'/'.join(FAMILY_NAMES[f] for f in FAMILIES if f in lora_families(x)[0])})"
                               for x in loras)
            raise LoraError(f"These LoRAs are for different model families and cannot be {doing}: {others}.")
        possible &= fits
    return next(f for f in FAMILIES if f in possible)


def read_inputs(specs: Sequence[LoraSpec], output: str | Path, overwrite: bool, presets: Presets | None,
                doing: str = "merged") -> tuple[Path, list[dict[str, float]], list[LoraFile], str]:
    """The checked output path, each spec's ratio per block slot, the LoRA files (checked) and their family:
    everything refused before any work is done."""
    output = check_lora_output(output, [s.path for s in specs], overwrite)
    presets = presets or load_presets()
    slots = [s.slot_ratios(presets) for s in specs]
    loras = [read_lora(s.path) for s in specs]
    for lora in loras:
        lora.check()
    return output, slots, loras, common_family(loras, doing)


def _plain_factors(module: LoraModule) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) in fp32 with up @ down = ΔW_raw; a Tucker mid is folded into down (kernel on the down side)."""
    up, down = module.parts["up"].float(), module.parts["down"].float()
    if "mid" in module.parts:
        mid = module.parts["mid"].float()
        down = torch.einsum("nmkl,mi->nikl", mid, down.reshape(down.shape[0], -1))
        up = up.reshape(up.shape[0], -1, 1, 1)
    return up, down


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 4 else t.reshape(*t.shape, 1, 1)


def _concat(mid: str, terms: list[Term]) -> tuple[torch.Tensor, torch.Tensor]:
    ups, downs = [], []
    for term in terms:
        if term.module.kind != "lora":
            raise LoraError(f"module {term.module.name} is {term.module.kind}; concat merges LoRA/LoCon modules "
                            f"only. Use a rank (--rank N or auto) to merge it by SVD.")
        up, down = _plain_factors(term.module)
        ups.append(up * (term.coefficient * term.module.scale))
        downs.append(down)
    if any(t.dim() == 4 for t in ups + downs):  # mix of linear and 1x1 factors for the same conv weight
        ups, downs = [_as_4d(u) for u in ups], [_as_4d(d) for d in downs]
    try:
        return torch.cat(ups, dim=1), torch.cat(downs, dim=0)
    except RuntimeError:
        raise LoraError(f"The LoRAs' modules for {mid} have different shapes "
                        f"({', '.join(str(list(d.shape)) for d in downs)}); they are not for the same model.") from None


def _summed_delta(mid: str, terms: list[Term]) -> torch.Tensor:
    total = None
    for term in terms:
        raw = term.module.raw_delta(torch.empty(0))
        change = raw * (term.coefficient * term.module.scale)
        if total is not None and total.numel() == change.numel() and total.shape != change.shape:
            change = change.reshape(total.shape)
        if total is not None and total.shape != change.shape:
            raise LoraError(f"The LoRAs' modules for {mid} change weights of different shapes "
                            f"({list(total.shape)} and {list(change.shape)}); they are not for the same model.")
        total = change if total is None else total + change
    return total


def _merged_tags(loras: list[LoraFile]) -> dict[str, str]:
    """`ss_tag_frequency` of all inputs: a dataset folder's counts come from the first input that has it."""
    tags: dict = {}
    for lora in loras:
        try:
            theirs = json.loads(lora.metadata.get("ss_tag_frequency", "{}"))
        except ValueError:
            theirs = {}
        for folder, counts in (theirs.items() if isinstance(theirs, dict) else ()):
            tags.setdefault(folder, counts)
    return {"ss_tag_frequency": json.dumps(tags)} if tags else {}


def output_metadata(mode: str, loras: list[LoraFile], specs: Sequence[LoraSpec], base: dict[str, str],
                     output: Path) -> dict[str, str]:
    """The seed's metadata choices (§2.7), without mutating the inputs' own dicts."""
    if mode not in METADATA_MODES:
        raise LoraError(f"Unknown metadata mode {mode!r}; choose one of {', '.join(METADATA_MODES)}.")
    if mode in ("new", "new-without-name"):
        meta = dict(base)
    else:
        meta = dict(loras[0].metadata)
        if mode in ("merge", "save-all"):
            for i, (lora, spec) in enumerate(zip(loras, specs, strict=True)):
                meta[f"sshs_cp{i}"] = json.dumps({**lora.metadata, "sshs_ratio": f"{spec.ratio:g}",
                                                  "sshs_blocks": spec.blocks, "ss_output_name": lora.name})
        if mode == "merge":
            meta.update(_merged_tags(loras))
        # what the file now is (the seed left the first input's dim and alpha, wrong after a re-rank)
        for key in ("ss_network_module", "ss_network_dim", "ss_network_alpha", "block_merger_recipe"):
            meta[key] = base[key]
    if mode == "new-without-name":
        meta.pop("ss_output_name", None)
    else:
        meta["ss_output_name"] = output.stem
    return meta


def combine_to_file(specs: Sequence[LoraSpec], output: str | Path, rank: RankChoice | None = None, *,
                    presets: Presets | None = None, dtype: str = "fp16", metadata: str = "new",
                    overwrite: bool = False, history: History | None = None,
                    progress: Callable[[int, int], None] | None = None) -> CombineResult:
    """Merge the LoRAs of `specs` into one file; rank None = exact concat, else SVD to that RankChoice."""
    if len(specs) < 1:
        raise LoraError("No LoRA given; add the LoRAs to merge as file:ratio[:block weights].")
    output, slots, loras, family = read_inputs(specs, output, overwrite, presets)
    grouped: dict[str, list[Term]] = {}
    unmatched: dict[str, list[str]] = {}
    for lora, spec, ratios in zip(loras, specs, slots, strict=True):
        for name, module in lora.modules.items():
            mid = module_id(name, family)
            if mid is None:
                unmatched.setdefault(spec.text(), []).append(name)
                continue
            if module.kind == "ia3" or "dora_scale" in module.parts or "magnitude" in module.parts:
                what = "(IA)3" if module.kind == "ia3" else "DoRA"
                raise LoraError(f"LoRA {lora.name}: module {name} is {what}, whose change depends on the model's "
                                f"weights; bake it into a checkpoint instead of merging it into a LoRA.")
            grouped.setdefault(mid, []).append(Term(module, ratios[block_slot(mid, family)]))
    if not grouped:
        raise LoraError("None of the LoRAs has a module of a known name; they are not Stable Diffusion LoRAs.")
    tensors: dict[str, torch.Tensor] = {}
    ranks = set()
    for done, (mid, terms) in enumerate(sorted(grouped.items()), 1):
        terms = [t for t in terms if t.coefficient != 0]
        if terms:
            if rank is None:
                up, down = _concat(mid, terms)
            elif all(t.module.kind == "lora" and "bias" not in t.module.parts for t in terms):
                up, down = factorize_product(*_concat(mid, terms), rank)  # exact, and never forms ΔW
            else:
                up, down = factorize(_summed_delta(mid, terms), rank)
                first = terms[0].module.parts.get("up")
                if first is not None and first.dim() == 2 and up.dim() == 4 and down.shape[2:] == (1, 1):
                    up, down = up.reshape(up.shape[:2]), down.reshape(down.shape[:2])
            ranks.add(add_factors(tensors, kohya_name(mid, family), up, down))
        if progress is not None:
            progress(done, len(grouped))
    if not tensors:
        raise LoraError("Every module has ratio 0 after block weights; the merged LoRA would be empty.")
    recipe = {"operation": "lora merge", "mode": "LoRA merge", "rank": "concat" if rank is None else rank.describe(),
              "loras": [{"path": s.path, "ratio": s.ratio, "blocks": s.blocks} for s in specs]}
    dim = str(max(ranks))
    meta = output_metadata(metadata, loras, specs, kohya_metadata(family, output, dim, dim, recipe=recipe), output)
    write_lora(output, tensors, meta, dtype, overwrite)
    history_id = None
    if history is not None:
        title = "LoRA merge: " + " + ".join(f"{s.name}:{s.ratio:g}" for s in specs)
        history_id = history.append(title, {**recipe, "model_a": " + ".join(s.path for s in specs),
                                            "weights_alpha": " ".join(s.text() for s in specs)})
    return CombineResult(output, family, len(tensors) // 3, sorted(ranks), unmatched, history_id)
