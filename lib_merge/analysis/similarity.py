"""How similar two or three models are, per key and per group (text encoder, merge blocks, VAE).

Measures, for each pair of models (X, Y):
- cosine similarity in percent of the flattened tensors, as the seed's Analysis computes it per key; a group's
  "mean" and "min" are over its keys, each key counting once whatever its size (the seed's Mean and Min methods);
- relative L2 distance ‖X−Y‖/‖X‖, per key and per group (over all the group's elements, so large tensors weigh
  as much as they hold). 0 means identical; a fine-tune is typically a few percent away from its base;
- "attn2": per group, the cosine of its cross-attention output weights (`attn2.to_out.0.weight`), the seed's
  third block method. SD1/SD2 have one such key per block (the seed's value); SDXL has up to ten, and their mean is
  given (the seed keyed them by fine label and so never found one for an SDXL block);
- optionally ASimilarity, the seed's attention probe per U-Net transformer block (see `attention`).

Models are streamed: one key of each model is read at a time; the sums are accumulated in float64 over chunks of
CHUNK elements (so a 40M-element embedding costs a few chunk copies, never a float64 copy of the tensor), so the
memory used is a few copies of the largest tensor in its own dtype, never a model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

import torch

from ..core.arch import Arch, detect_arch
from ..core.errors import MergeCancelled, MergeError
from ..io.checkpoint import open_checkpoint
from .attention import AttentionResult, attention_similarity, probes
from .groups import group_of, group_order

NAMES = "ABC"
CHUNK = 1 << 20
#: the key whose cosine is a block's "attn2" value
ATTN2_KEY = "attn2.to_out.0.weight"


@dataclass(frozen=True)
class PairMeasure:
    """Cosine similarity [%] and relative L2 distance of one pair; NaN where undefined (a zero tensor)."""

    cosine: float
    rel_l2: float


@dataclass(frozen=True)
class KeyResult:
    key: str
    group: str
    numel: int
    pairs: dict[str, PairMeasure]


@dataclass
class _GroupSums:
    cosines: list[float] = field(default_factory=list)
    attn2: list[float] = field(default_factory=list)
    sq_first: float = 0.0
    sq_diff: float = 0.0


@dataclass(frozen=True)
class GroupResult:
    """A group's keys and, per pair, mean and min of the key cosines [%], the group's relative L2 distance, the
    attn2 cosine [%] and the ASimilarity [%] (NaN where the group has no such key or the probe was not run)."""

    group: str
    keys: int
    mean_cosine: dict[str, float]
    min_cosine: dict[str, float]
    rel_l2: dict[str, float]
    attn2_cosine: dict[str, float]
    asimilarity: dict[str, float]


@dataclass(frozen=True)
class Comparison:
    paths: tuple[Path, ...]
    arch: Arch
    pairs: tuple[str, ...]
    keys: list[KeyResult]
    groups: list[GroupResult]
    missing: list[str]
    shape_mismatch: list[str]
    attention: AttentionResult | None = None  # None: ASimilarity was not asked for


def _pair_measure(x: torch.Tensor, y: torch.Tensor) -> tuple[PairMeasure, float, float]:
    """(measure, ‖x‖², ‖x−y‖²) of two flat tensors, summed in float64 chunk by chunk."""
    dot = sq_x = sq_y = sq_diff = 0.0
    for start in range(0, x.numel(), CHUNK):
        a = x[start:start + CHUNK].to(torch.float64)
        b = y[start:start + CHUNK].to(torch.float64)
        diff = a - b
        dot += float(torch.dot(a, b))
        sq_x += float(torch.dot(a, a))
        sq_y += float(torch.dot(b, b))
        sq_diff += float(torch.dot(diff, diff))
    cosine = 100.0 * dot / math.sqrt(sq_x * sq_y) if sq_x > 0 and sq_y > 0 else math.nan
    rel = math.sqrt(sq_diff / sq_x) if sq_x > 0 else math.nan
    return PairMeasure(cosine, rel), sq_x, sq_diff


def _arch_of_all(ckpts, paths) -> Arch:
    archs = [detect_arch(set(c.keys()), c.shape, str(p)) for c, p in zip(ckpts, paths, strict=True)]
    for name, arch, path in zip(NAMES[1:], archs[1:], paths[1:], strict=False):
        if arch.family != archs[0].family:
            raise MergeError(
                f"model {name} ({path}) is {arch.describe()} but model A is {archs[0].describe()}: "
                "analysis compares models of one architecture."
            )
    return archs[0]


def compare_models(paths: list[Path] | tuple[Path, ...], progress: Callable[[int, int], None] | None = None,
                   cancel: Callable[[], bool] | None = None, attention: bool = False) -> Comparison:
    """Compare two or three checkpoints key by key; keys are taken in model A's order. With `attention`, the
    ASimilarity probe runs afterwards (not for Flux: `attention` then stays an empty result).

    `progress(done, total)` is told before every key (and probe); `cancel()` is asked before every key, and True
    ends the analysis with MergeCancelled (nothing is written anywhere, so there is nothing to undo)."""
    paths = tuple(Path(p) for p in paths)
    if len(paths) not in (2, 3):
        raise MergeError(f"analysis compares two or three models, got {len(paths)}.")
    pairs = tuple(f"{NAMES[i]}-{NAMES[j]}" for i, j in combinations(range(len(paths)), 2))
    index_pairs = list(combinations(range(len(paths)), 2))
    with ExitStack() as stack:
        ckpts = [stack.enter_context(open_checkpoint(p)) for p in paths]
        arch = _arch_of_all(ckpts, paths)
        sums: dict[str, dict[str, _GroupSums]] = {}
        results, missing, mismatch = [], [], []
        keys = ckpts[0].keys()
        total = len(keys) + (len(probes(arch)) if attention else 0)
        for done, key in enumerate(keys):
            if cancel is not None and cancel():
                raise MergeCancelled(f"Analysis stopped after {done} of {len(keys)} tensors.")
            if progress is not None:
                progress(done, total)
            group = group_of(arch, key)
            if group is None or not ckpts[0].dtype(key).is_floating_point:
                continue
            if any(key not in c for c in ckpts[1:]):
                missing.append(key)
                continue
            shape = ckpts[0].shape(key)
            if any(c.shape(key) != shape or not c.dtype(key).is_floating_point for c in ckpts[1:]):
                mismatch.append(key)
                continue
            flat = [c.get(key).reshape(-1) for c in ckpts]
            measures = {}
            for name, (i, j) in zip(pairs, index_pairs, strict=True):
                measure, sq_first, sq_diff = _pair_measure(flat[i], flat[j])
                measures[name] = measure
                acc = sums.setdefault(group, {}).setdefault(name, _GroupSums())
                if not math.isnan(measure.cosine):
                    acc.cosines.append(measure.cosine)
                    if key.endswith(ATTN2_KEY):
                        acc.attn2.append(measure.cosine)
                acc.sq_first += sq_first
                acc.sq_diff += sq_diff
            results.append(KeyResult(key, group, flat[0].numel(), measures))
        probe = None
        if attention and results:
            steps = iter(range(len(keys), total))
            probe = attention_similarity(
                ckpts, arch, index_pairs, pairs, cancel=cancel,
                step=None if progress is None else lambda: progress(next(steps), total))
    if not results:
        raise MergeError(
            f"{paths[0]} and the other models share no model tensor of the same shape: nothing to compare."
        )
    counts: dict[str, int] = {}
    for r in results:
        counts[r.group] = counts.get(r.group, 0) + 1
    asim = probe.values if probe is not None else {}
    groups = [_group_result(g, counts[g], sums[g], pairs, asim.get(g, {})) for g in group_order(arch) if g in sums]
    return Comparison(paths, arch, pairs, results, groups, missing, mismatch, probe)


def _group_result(group: str, keys: int, sums: dict[str, _GroupSums], pairs, asim: dict[str, float]) \
        -> GroupResult:
    def mean(values):
        return sum(values) / len(values) if values else math.nan

    return GroupResult(
        group,
        keys,
        {p: mean(sums[p].cosines) for p in pairs},
        {p: min(sums[p].cosines, default=math.nan) for p in pairs},
        {p: math.sqrt(sums[p].sq_diff / sums[p].sq_first) if sums[p].sq_first > 0 else math.nan for p in pairs},
        {p: mean(sums[p].attn2) for p in pairs},
        {p: asim.get(p, math.nan) for p in pairs},
    )


def _num(value: float, digits: int) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def summary_lines(result: Comparison) -> list[str]:
    """The models, the architecture and what was compared or skipped (the head of every report)."""
    lines = [f"{NAMES[i]}: {p}" for i, p in enumerate(result.paths)]
    lines.append(f"Architecture: {result.arch.describe()}; {len(result.keys)} tensors compared")
    if result.missing:
        lines.append(f"Skipped {len(result.missing)} tensors missing from B or C (first: {result.missing[0]})")
    if result.shape_mismatch:
        lines.append(f"Skipped {len(result.shape_mismatch)} tensors of different shapes "
                     f"(first: {result.shape_mismatch[0]})")
    if result.attention is not None:
        if not probes(result.arch):
            lines.append(f"ASimilarity: not available for {result.arch.describe()} (it probes the self-attention "
                         "of SD's U-Net transformer blocks)")
        else:
            lines.append(f"ASimilarity: {len(result.attention.values)} transformer blocks probed")
            if result.attention.skipped:
                lines.append(f"ASimilarity skipped {len(result.attention.skipped)} blocks missing or of other "
                             f"shapes in a model: {', '.join(result.attention.skipped)}")
    return lines


def format_comparison(result: Comparison, per_key: bool = False) -> str:
    """A text table per group (and per key with `per_key`): for each pair cosine mean/min [%], relative L2,
    attn2 cosine [%] and, when it was run, ASimilarity [%]."""
    lines = summary_lines(result)
    asim = result.attention is not None
    head = f"{'group':<8}{'keys':>6}" + "".join(
        f"  {p + ' cos mean%':>14}{'min%':>9}{'rel L2':>9}{'attn2%':>9}" + (f"{'ASim%':>9}" if asim else "")
        for p in result.pairs)
    lines += ["", head]
    for g in result.groups:
        lines.append(f"{g.group:<8}{g.keys:>6}" + "".join(
            f"  {_num(g.mean_cosine[p], 3):>14}{_num(g.min_cosine[p], 3):>9}{_num(g.rel_l2[p], 4):>9}"
            f"{_num(g.attn2_cosine[p], 3):>9}" + (f"{_num(g.asimilarity[p], 3):>9}" if asim else "")
            for p in result.pairs))
    if per_key:
        lines += ["", f"{'group':<8}" + "".join(f"{p + ' cos%':>12}{'rel L2':>9}" for p in result.pairs) + "  key"]
        for r in result.keys:
            lines.append(f"{r.group:<8}" + "".join(
                f"{_num(r.pairs[p].cosine, 3):>12}{_num(r.pairs[p].rel_l2, 4):>9}" for p in result.pairs)
                + f"  {r.key}")
    return "\n".join(lines)
