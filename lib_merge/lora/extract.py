"""Extract a LoRA from two checkpoints: ΔW = α·A − β·B per layer, factored by truncated SVD.

The layers are the ones kohya's trainer targets (attention Linear/1×1 layers of the U-Net's transformers and the
text encoders' attention/MLP Linears; with a conv rank also the resnet, down- and upsampler convs), read one key
at a time from both files, so memory stays at a few layers whatever the model size. The text encoders are left
out when no layer of theirs changed by more than `te_threshold` (kohya's current 0.01; the seed's copy uses 0.1).
Factors get alpha = rank (scale 1), kohya names and `ss_*` metadata, so the WebUI's Lora extension loads them.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.arch import detect_arch
from ..core.errors import MergeError
from ..io.checkpoint import open_checkpoint
from ..io.history import History
from .formats import LoraError
from .keys import Target, checkpoint_targets, kohya_name
from .lowrank import RankChoice, factorize
from .save import add_factors, check_lora_output, kohya_metadata, write_lora

TE_THRESHOLD = 0.01
_ATTENTION = re.compile(r"_transformer_blocks_\d+_|_proj_in$|_proj_out$")
_CONV = re.compile(r"_(in_layers_2|out_layers_3|skip_connection|emb_layers_1|op|conv)$")
_TEXT = re.compile(r"_(self_attn_[qkvo]\w*_proj|mlp_fc[12])$")


def extract_kind(mid: str) -> str | None:
    """"attn" (Linear/1x1, the default targets), "conv" (resnets and samplers, with a conv rank), "te", or None.

    Only meaningful for weights of 2+ dimensions (norm weights share these names' prefixes)."""
    component, rest = mid.split(":", 1)
    if component != "unet":
        return "te" if _TEXT.search(rest) else None
    if _ATTENTION.search(rest):
        return "attn"
    if _CONV.search(rest) and rest.startswith(("input_blocks", "middle_block", "output_blocks")):
        return "conv"
    return None


@dataclass
class ExtractResult:
    path: Path
    family: str
    modules: int
    text_encoder: bool
    ranks: list[int]
    history_id: int | None = None


def _difference(a, b, target: Target, alpha: float, beta: float) -> torch.Tensor:
    wa, wb = a.get(target.key).float(), b.get(target.key).float()
    if target.rows:
        wa, wb = wa[target.rows[0]:target.rows[1]], wb[target.rows[0]:target.rows[1]]
    return alpha * wa - beta * wb


def _same_file(a: str | Path, b: str | Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # a missing file is reported when it is opened
        return False


def _no_change(alpha: float, beta: float) -> LoraError:
    return LoraError(f"{alpha:g}·A − {beta:g}·B is zero in every layer a LoRA can hold (the same model twice?); "
                     "there is no change to extract.")


def extract_to_file(model_a: str | Path, model_b: str | Path, output: str | Path, *, alpha: float = 1.0,
                    beta: float = 1.0, rank: RankChoice | None = None, conv_rank: RankChoice | None = None,
                    method: str = "full", clamp: float | None = 0.99, te_threshold: float = TE_THRESHOLD,
                    dtype: str = "fp16", overwrite: bool = False, history: History | None = None,
                    progress: Callable[[int, int], None] | None = None) -> ExtractResult:
    """Write the LoRA of α·A − β·B to `output`; A and B must be the same architecture.

    clamp: the quantile (in (0.5, 1]) the factors are clamped at, as kohya does; None or 1 keeps them exact."""
    rank = rank or RankChoice()
    for name, value in (("alpha", alpha), ("beta", beta)):
        if not math.isfinite(value):
            raise LoraError(f"The extraction's {name} must be a finite number, not {value}.")
    if clamp is not None and not 0.5 < clamp <= 1:  # at or below the median the bound is <= 0: factors destroyed
        raise LoraError(f"The clamp quantile must be above 0.5 and at most 1 (1 keeps the factors exact), not {clamp}.")
    clamp = None if clamp == 1 else clamp
    if alpha == beta and _same_file(model_a, model_b):  # known before reading a layer
        raise _no_change(alpha, beta)
    output = check_lora_output(output, [model_a, model_b], overwrite)
    with contextlib.ExitStack() as stack:
        a = stack.enter_context(open_checkpoint(model_a))
        b = stack.enter_context(open_checkpoint(model_b))
        arch_a = detect_arch(set(a.keys()), a.shape, a.name)
        arch_b = detect_arch(set(b.keys()), b.shape, b.name)
        if arch_a.family != arch_b.family:
            raise MergeError(f"{a.name} is {arch_a.describe()} and {b.name} is {arch_b.describe()}; a LoRA can only "
                             f"be extracted from two models of the same family.")
        family = arch_a.family
        wanted = {"attn", "te"} | ({"conv"} if conv_rank is not None else set())
        targets = {mid: t for mid, t in checkpoint_targets(a.keys(), a.shape, family).items()
                   if extract_kind(mid) in wanted and len(a.shape(t.key)) >= 2}
        for t in targets.values():
            if t.key not in b or b.shape(t.key) != a.shape(t.key):
                raise MergeError(f"{b.name} has no tensor {t.key} of {a.name}'s shape {list(a.shape(t.key))}; "
                                 f"the two models do not have the same layout.")
        te = [mid for mid in targets if extract_kind(mid) == "te"]
        keep_te = any(float(_difference(a, b, targets[m], alpha, beta).abs().max()) > te_threshold for m in te)
        order = [m for m in sorted(targets) if keep_te or extract_kind(m) != "te"]
        tensors: dict[str, torch.Tensor] = {}
        ranks = set()
        changed = False
        for done, mid in enumerate(order, 1):
            choice = conv_rank if extract_kind(mid) == "conv" else rank
            diff = _difference(a, b, targets[mid], alpha, beta)
            changed = changed or bool(diff.any())
            up, down = factorize(diff, choice, method, clamp, what=f"{alpha:g}·A − {beta:g}·B of {targets[mid].key}")
            ranks.add(add_factors(tensors, kohya_name(mid, family), up, down))
            if progress is not None:
                progress(done, len(order))
    if not tensors:
        raise LoraError("The two models have no layer a LoRA can hold; nothing was extracted.")
    if not changed:
        raise _no_change(alpha, beta)
    recipe = {"operation": "lora extract", "mode": "LoRA extract", "model_a": str(model_a), "model_b": str(model_b),
              "alpha": alpha, "beta": beta, "rank": rank.describe(),
              "conv_rank": conv_rank.describe() if conv_rank else None, "method": method, "clamp": clamp}
    dim = str(rank.rank) if rank.rank is not None else str(max(ranks))
    conv = conv_rank.describe() if conv_rank else None
    write_lora(output, tensors, kohya_metadata(family, output, dim, dim, conv, recipe), dtype, overwrite)
    history_id = None
    if history is not None:
        history_id = history.append(f"LoRA extract: {alpha:g}*{Path(model_a).stem} - {beta:g}*{Path(model_b).stem}",
                                    recipe)
    return ExtractResult(output, family, len(tensors) // 3, keep_te, sorted(ranks), history_id)
