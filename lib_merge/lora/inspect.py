"""What a LoRA file is: kind, family, module counts, ranks, alphas and its training metadata, in words."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .detect import lora_families
from .formats import KIND_NAMES, LoraError, LoraFile, read_lora
from .keys import FAMILIES, FAMILY_NAMES, split_name

#: Training metadata worth a line each; long ones (tag frequencies, dataset dirs) are only counted.
SHOWN_METADATA = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args", "ss_base_model_version",
                  "ss_sd_model_name", "ss_output_name", "ss_training_comment", "ss_num_epochs", "ss_learning_rate",
                  "modelspec.title", "modelspec.architecture")


@dataclass(frozen=True)
class LoraSummary:
    """One line of the LoRA list: type (LoRA, LoCon, LoHa, ...), families, ranks."""

    name: str
    kind: str
    families: tuple[str, ...]
    ranks: tuple[int, ...]

    def label(self) -> str:
        fam = "/".join(FAMILY_NAMES[f] for f in self.families)
        rank = ",".join(str(r) for r in self.ranks)
        return f"{self.name} [{self.kind}{', ' + rank if rank else ''}, {fam}]"


def lora_kind(lora: LoraFile) -> str:
    """The seed's list types, finer: LoRA (attention only), LoCon (also 3x3 convs), LoHa, LoKr, ..., +DoRA."""
    kinds = {m.kind for m in lora.modules.values()}
    dora = any("dora_scale" in m.parts or "magnitude" in m.parts for m in lora.modules.values())
    if kinds == {"lora"}:
        conv = any(len(s) == 4 and s[2:] != (1, 1) for m in lora.modules.values() if (s := m.raw_shape))
        name = "LoCon" if conv else "LoRA"
    else:
        name = "+".join(KIND_NAMES.get(k, k) for k in sorted(kinds))
    return name + ("+DoRA" if dora else "")


def summarize(lora: LoraFile) -> LoraSummary:
    families, _ = lora_families(lora)
    return LoraSummary(lora.name, lora_kind(lora), tuple(f for f in FAMILIES if f in families), tuple(lora.ranks))


def describe_lora(path: str | Path) -> str:
    lora = read_lora(path)
    families, evidence = lora_families(lora)
    parts = {"unet": 0, "te1": 0, "te2": 0, None: 0}
    for name in lora.modules:
        split = split_name(name)
        parts[split[0] if split else None] += 1
    try:
        lora.check()
        problem = ""
    except LoraError as e:  # still described: what the file is helps to see what went wrong with it
        problem = str(e)
    alphas = sorted({m.alpha for m in lora.modules.values() if "alpha" in m.parts and m.parts["alpha"].numel() == 1})
    fam = " or ".join(FAMILY_NAMES[f] for f in FAMILIES if f in families)
    lines = [
        f"LoRA file: {lora.path} ({lora.path.stat().st_size / 1e6:.1f} MB)",
        f"Type: {lora_kind(lora)}",
        f"Model family: {fam}" + (f" ({evidence})" if evidence else " (its names and shapes fit all of these)"),
        f"Modules: {len(lora.modules)} (U-Net {parts['unet']}, text encoder {parts['te1']}"
        + (f", second text encoder {parts['te2']}" if parts["te2"] else "")
        + (f", {parts[None]} of unknown names" if parts[None] else "") + ")",
        f"Ranks: {', '.join(map(str, lora.ranks)) or 'none (full-rank kinds)'}",
        f"Alpha: {', '.join(f'{a:g}' for a in alphas) or 'not stored (scale 1)'}",
    ]
    if problem:
        lines.append(f"Cannot be used: {problem}")
    if lora.unknown_keys:
        lines.append(f"Keys of no known kind (ignored): {len(lora.unknown_keys)}, e.g. {lora.unknown_keys[0]}")
    shown = [f"  {k}: {lora.metadata[k][:200]}" for k in SHOWN_METADATA if lora.metadata.get(k)]
    others = len(lora.metadata) - len(shown)
    lines.append("Metadata:" if shown else "Metadata: none")
    lines += shown
    if others > 0 and shown:
        lines.append(f"  ... and {others} more entries")
    return "\n".join(lines)
