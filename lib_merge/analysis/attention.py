"""ASimilarity: how alike two models' self-attention *behaves*, block by block, on a fixed random input.

This is the seed's "ASimilarity" analysis mode (after JosephusCheung's ASimilarityCalculatior), which the seed's
README recommends because it tracks the difference in the images better than weight cosines do. For each probed
block, with the first transformer block's self-attention weights Wq, Wk, Wv (each C×C):

    X = randn(C, C)                       (C tokens of width C; torch's generator seeded 2244096, drawn in
                                           block order, as the seed draws them)
    Q = X·Wqᵀ,  K = X·Wkᵀ,  V = X·Wvᵀ
    P = softmax(Q·Kᵀ) over the last axis  (the seed has no 1/√d scale; kept, or the numbers would differ)
    out[i, k] = P[i, k] · Σ_j V[j, k]     (the seed's einsum "ik,jk->ik": V's column sums, not P·V)

and the block's similarity is the mean over rows i of cos(out_X[i, :], out_Y[i, :]) in percent.

Differences from the seed: the weights and X are taken to float64 before any product (the seed multiplies in the
model's dtype, where softmax of unscaled logits saturates early); SDXL works (its transformer blocks sit at
IN04/05/07/08, M00 and OUT00-05; the seed's fixed SD1 key list raised KeyError there); a block missing from a
model is skipped and named instead of crashing; and three models give three pairs.
Only 3 tensors per block and model are read, one block at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..core.arch import Arch
from ..core.errors import MergeCancelled
from ..io.read import Checkpoint

PROBE_SEED = 2244096
UNET = "model.diffusion_model."
#: the transformer blocks probed, in the seed's order (SD1/SD2) and at SDXL's attention blocks
SD_PROBES = (*(f"input_blocks.{i}.1" for i in (1, 2, 4, 5, 7, 8)), "middle_block.1",
             *(f"output_blocks.{i}.1" for i in range(3, 12)))
XL_PROBES = (*(f"input_blocks.{i}.1" for i in (4, 5, 7, 8)), "middle_block.1",
             *(f"output_blocks.{i}.1" for i in range(6)))


def probe_keys(block: str) -> tuple[str, str, str]:
    """The q, k, v weights of the block's first self-attention."""
    return tuple(f"{UNET}{block}.transformer_blocks.0.attn1.to_{w}.weight" for w in "qkv")


def probes(arch: Arch) -> tuple[str, ...]:
    """The probed blocks of an architecture; none for Flux (its blocks are no U-Net transformer blocks)."""
    if arch.is_flux:
        return ()
    return XL_PROBES if arch.is_sdxl else SD_PROBES


def attention_output(x: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, wv: torch.Tensor) -> torch.Tensor:
    """The probe's output for input `x` (all float64)."""
    q, k, v = x @ wq.T, x @ wk.T, x @ wv.T
    return torch.softmax(q @ k.T, dim=-1) * v.sum(dim=0)


def mean_row_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of the cosine of a's and b's rows, in percent; rows where either is zero are left out
    (NaN when none is left)."""
    dots = (a * b).sum(dim=1)
    norms = a.norm(dim=1) * b.norm(dim=1)
    valid = norms > 0
    if not bool(valid.any()):
        return math.nan
    return 100.0 * float((dots[valid] / norms[valid]).mean())


@dataclass(frozen=True)
class AttentionResult:
    values: dict[str, dict[str, float]]  # block label -> pair -> similarity %
    skipped: list[str]  # probed blocks some model lacks (or has in another shape)


def _square_and_alike(ckpts: Sequence[Checkpoint], keys: tuple[str, ...]) -> bool:
    shape = ckpts[0].shape(keys[0]) if keys[0] in ckpts[0] else None
    if shape is None or len(shape) != 2 or shape[0] != shape[1]:
        return False
    return all(k in c and c.shape(k) == shape for c in ckpts for k in keys)


def attention_similarity(ckpts: Sequence[Checkpoint], arch: Arch, index_pairs: Sequence[tuple[int, int]],
                         pair_names: Sequence[str], step: Callable[[], None] | None = None,
                         cancel: Callable[[], bool] | None = None) -> AttentionResult:
    """ASimilarity of every pair of the open checkpoints, per probed block (labelled with its merge block).
    `step()` is called after each block; `cancel()` asked before each, True raising MergeCancelled."""
    generator = torch.Generator().manual_seed(PROBE_SEED)
    values: dict[str, dict[str, float]] = {}
    skipped: list[str] = []
    for block in probes(arch):
        if cancel is not None and cancel():
            raise MergeCancelled(f"Analysis stopped at the ASimilarity probe of {block}.")
        keys = probe_keys(block)
        if not _square_and_alike(ckpts, keys):
            skipped.append(block)
        else:
            width = ckpts[0].shape(keys[0])[0]
            x = torch.randn(width, width, generator=generator).to(torch.float64)
            outs = [attention_output(x, *(c.get(k).to(torch.float64) for k in keys)) for c in ckpts]
            values[arch.block_of(keys[0])[1]] = {
                name: mean_row_cosine(outs[i], outs[j]) for name, (i, j) in zip(pair_names, index_pairs, strict=True)}
        if step is not None:
            step()
    return AttentionResult(values, skipped)
