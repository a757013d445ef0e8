"""One pure function per merge formula, and the registry of which merge mode each calc mode accepts.

Kernels take the tensors of one key (any float dtype, never modified) and plain numbers, and return a new tensor;
the engine casts it to the destination dtype once. Where the seed computes in fp32 we do too; where it rounds several
times in fp16 we compute in fp32 and round once (results differ from the seed only by that rounding).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import smoothing

WEIGHT_SUM, ADD_DIFF, TRIPLE_SUM, SUM_TWICE = "Weight sum", "Add difference", "Triple sum", "sum Twice"
MERGE_MODES = (WEIGHT_SUM, ADD_DIFF, TRIPLE_SUM, SUM_TWICE)
MODE_FORMULAS = {
    WEIGHT_SUM: "A*(1-alpha)+B*alpha",
    ADD_DIFF: "A+(B-C)*alpha",
    TRIPLE_SUM: "A*(1-alpha-beta)+B*alpha+C*beta",
    SUM_TWICE: "(A*(1-alpha)+B*alpha)*(1-beta)+C*beta",
}
SELF_SKIP = ("to_out", "proj_out", "norm")
#: dtypes torch computes lerp in directly (fp16/bf16 in fp32 internally, rounded once); fp8 has no kernels
LERP_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class CalcMode:
    """What a calc mode needs: the merge modes it accepts, the mode it implies, and which models it reads."""

    name: str
    modes: tuple[str, ...]
    summary: str
    implies: str | None = None  # the seed switches these to Add difference by itself
    uses_b: bool = True
    uses_beta: bool = False
    skip_vae: bool = False  # cosine leaves the VAE alone
    skip_self_keys: bool = False  # self/random leave to_out, proj_out and norm alone
    selects: bool = False  # takes some of A's values and some of B's: an input's inf/NaN may not reach the result


CALC_MODES: dict[str, CalcMode] = {c.name: c for c in (
    CalcMode("normal", MERGE_MODES, "the merge mode's formula"),
    CalcMode("cosineA", (WEIGHT_SUM,), "per-column ratio from A/B cosine similarity, favouring A's structure",
             skip_vae=True),
    CalcMode("cosineB", (WEIGHT_SUM,), "per-column ratio from raw A/B cosine similarity, favouring B's structure",
             skip_vae=True),
    CalcMode("trainDifference", (ADD_DIFF,), "A + 1.8*alpha*(B-C)*|B-A|/(|B-C|+|B-A|)", implies=ADD_DIFF),
    CalcMode("smoothAdd", (ADD_DIFF,), "A + alpha*gaussian(median(B-C))"),
    CalcMode("smoothAdd MT", (ADD_DIFF,), "smoothAdd computed on all cores"),
    CalcMode("extract", (ADD_DIFF,), "features of B-A / C-A selected by their cosine similarity (gamma)",
             implies=ADD_DIFF, uses_beta=True),
    CalcMode("tensor", (WEIGHT_SUM,), "rows [beta, beta+alpha) of dim 0 taken from B", uses_beta=True,
             selects=True),
    CalcMode("tensor2", (WEIGHT_SUM,), "like tensor, slicing dim 1 of matrices and convolutions", uses_beta=True,
             selects=True),
    CalcMode("self", (WEIGHT_SUM,), "A*alpha (B unused)", uses_b=False, skip_self_keys=True),
    CalcMode("plus random", (WEIGHT_SUM,), "A + alpha*N(0,1) noise, seeded (B unused)", uses_b=False,
             skip_self_keys=True),
)}


class Fp32:
    """fp32 working buffers for one key or piece: reusable ones when given (no fresh memory, and no hidden
    conversion copies, which torch makes when an fp32 tensor meets an fp16 operand), else newly allocated. Both ways
    run the same operations, so the bits are the same."""

    def __init__(self, *buffers: torch.Tensor, mask: torch.Tensor | None = None):
        self.buffers, self._mask = buffers, mask

    def acc(self, x: torch.Tensor) -> torch.Tensor:
        """The accumulator: an fp32 copy of x that may be modified."""
        return x.to(torch.float32, copy=True) if not self.buffers else self.buffers[0].copy_(x)

    def operand(self, x: torch.Tensor) -> torch.Tensor:
        """x as fp32 for reading (x itself when it is fp32; else the second buffer, so use it before asking for the
        next)."""
        if x.dtype == torch.float32:
            return x
        return x.float() if len(self.buffers) < 2 else self.buffers[1].copy_(x)

    def spare(self, index: int, like: torch.Tensor) -> torch.Tensor:
        """Another fp32 buffer shaped like `like`, to write into."""
        if len(self.buffers) > 2 + index:
            return self.buffers[2 + index]
        return torch.empty(like.shape, dtype=torch.float32, device=like.device)

    def nonzero(self, x: torch.Tensor) -> torch.Tensor:
        return x != 0 if self._mask is None else torch.ne(x, 0, out=self._mask)


def _emit(result: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """The result, copied (and cast) into `out` when one is given."""
    if out is None or result is out:
        return result
    return out.copy_(result)


def weight_sum(a, b, alpha: float, out=None) -> torch.Tensor:
    """A(1-α)+Bα as torch.lerp; on the CPU an fp16/bf16 lerp computes in fp32 and rounds once, like the seed's path.
    fp8 inputs (no fp8 arithmetic in torch), mixed dtypes and fp8 outputs go through fp32 and are rounded once into
    the output (an fp16/bf16 result rounded again into fp8 could land on the wrong side of a tie)."""
    if alpha == 0:
        return _emit(a, out)
    if alpha == 1:
        return _emit(b, out)
    if a.dtype == b.dtype and a.dtype in LERP_DTYPES and (out is None or out.dtype in LERP_DTYPES):
        if out is not None and out.dtype == a.dtype:
            return torch.lerp(a, b, alpha, out=out)
        return _emit(torch.lerp(a, b, alpha), out)
    return _emit(torch.lerp(a.float(), b.float(), alpha), out)


def add_difference(a, b, c, alpha: float, out=None, work: Fp32 | None = None) -> torch.Tensor:
    """A + α(B-C), in fp32, rounded once into the output."""
    work = work or Fp32()
    acc = work.acc(b)
    acc.sub_(work.operand(c)).mul_(alpha)
    return _emit(acc.add_(work.operand(a)), out)


def triple_sum(a, b, c, alpha: float, beta: float, out=None, work: Fp32 | None = None) -> torch.Tensor:
    """A(1-α-β) + Bα + Cβ, in fp32."""
    work = work or Fp32()
    acc = work.acc(a).mul_(1 - alpha - beta)
    acc.add_(work.operand(b), alpha=alpha)
    return _emit(acc.add_(work.operand(c), alpha=beta), out)


def sum_twice(a, b, c, alpha: float, beta: float, out=None, work: Fp32 | None = None) -> torch.Tensor:
    """(A(1-α)+Bα)(1-β)+Cβ, in fp32."""
    work = work or Fp32()
    acc = work.acc(a).mul_(1 - alpha)
    acc.add_(work.operand(b), alpha=alpha).mul_(1 - beta)
    return _emit(acc.add_(work.operand(c), alpha=beta), out)


def normal(mode: str, a, b, c, alpha: float, beta: float, out=None, work: Fp32 | None = None) -> torch.Tensor:
    """The merge mode's own formula; `out` and `work` are optional reusable buffers (the result lands in `out`)."""
    if mode == WEIGHT_SUM:
        return weight_sum(a, b, alpha, out)
    if mode == ADD_DIFF:
        return add_difference(a, b, c, alpha, out, work)
    if mode == TRIPLE_SUM:
        return triple_sum(a, b, c, alpha, beta, out, work)
    return sum_twice(a, b, c, alpha, beta, out, work)


def cosine_similarity(a: torch.Tensor, b: torch.Tensor, normalize: bool,
                      work: Fp32 | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column cosine (dim 0) and its mean with the whole-tensor cosine: (simab, comb) of the seed's cosine modes.
    `work` (four buffers shaped like `a`) holds the fp32 and normalised copies."""
    work = work or Fp32()
    a, b = work.acc(a), work.operand(b)
    if normalize:
        a, b = F.normalize(a, p=2, dim=0, out=work.spare(0, a)), F.normalize(b, p=2, dim=0, out=work.spare(1, b))
    simab = F.cosine_similarity(a, b, dim=0)
    mag = torch.dot(a.reshape(-1), b.reshape(-1)) / (torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b))
    return simab, (simab + mag) / 2


def similarity_range(values: np.ndarray) -> tuple[float, float]:
    """Drop NaNs, then values under the 1st percentile, then (of the rest) over the 99th; return (min, max)."""
    values = values[~np.isnan(values)]
    if values.size:
        values = values[values >= np.percentile(values, 1, method="midpoint")]
        values = values[values <= np.percentile(values, 99, method="midpoint")]
    if not values.size:
        raise ValueError("no finite similarity values")
    return float(values.min()), float(values.max())


def cosine_merge(a, b, comb: torch.Tensor, alpha: float, smin: float, smax: float, out=None,
                 work: Fp32 | None = None) -> torch.Tensor:
    """(1-k)B + kA with k = clip(norm(comb) - α); α is |α| for cosineA, as given for cosineB (the caller decides).

    A degenerate range (every column equally similar) counts as fully similar instead of dividing by zero.
    """
    work = work or Fp32()
    scaled = (comb - smin) / (smax - smin) if smax > smin else torch.ones_like(comb)
    k = (scaled - alpha).clip(0, 1)
    acc = work.acc(b)
    return _emit(torch.lerp(acc, work.operand(a), k, out=acc), out)


def train_difference(a, b, c, alpha: float, out=None, work: Fp32 | None = None) -> torch.Tensor:
    """A + 1.8α(B-C)|B-A|/(|B-C|+|B-A|), zero where both distances are zero; in fp32, in four buffers."""
    work = work or Fp32()
    tb = work.acc(b)
    diff = torch.sub(tb, work.operand(c), out=work.spare(0, tb))  # B-C
    ta = work.operand(a)
    dist = torch.sub(tb, ta, out=tb).abs_()  # |B-A|
    total = torch.abs(diff, out=work.spare(1, tb)).add_(dist)
    scale = torch.where(work.nonzero(total), dist.div_(total), total.new_zeros(()), out=total)
    diff.mul_(scale).mul_(alpha * 1.8)
    return _emit(torch.add(ta, diff, out=diff), out)


def smooth_add(a, b, c, alpha: float, workers: smoothing.Workers | None = None) -> torch.Tensor:
    """A + α·gaussian(median(B-C)): N-dimensional median filter (size 3) then gaussian (sigma 1), scipy's 'reflect'
    edges; `smoothing` computes exactly scipy's result (one thread per key: the engine runs keys on all cores)."""
    diff = b.float() - c.float()
    return a.float() + alpha * smoothing.smooth(diff, threads=1, workers=workers).to(diff.device)


def extract(a, b, c, alpha: float, beta: float, gamma: float) -> torch.Tensor:
    """A + lerp(B-A, C-A, α) * lerp(d, 1-d, β), d = ((cos(B-A, C-A) along the last axis + 1)/2)^γ."""
    base = a.float()
    da, db = b.float() - base, c.float() - base
    if base.dim() == 0:
        return base + torch.lerp(da, db, alpha)
    cos = F.cosine_similarity(da, db, dim=-1).clamp(-1, 1).unsqueeze(-1)
    d = ((cos + 1) / 2) ** gamma
    return base + torch.lerp(da, db, alpha) * torch.lerp(d, 1 - d, beta)


def tensor_swap(a, b, alpha: float, beta: float, by_columns: bool) -> torch.Tensor:
    """Exchange a window of rows (tensor) or of dim-1 slices (tensor2) between A and B, without interpolation.

    With α+β ≤ 1, B supplies [int(nβ), int(n(α+β))); otherwise the result is B with A in [int(n(α+β-1)), int(nβ)),
    i.e. B's window of length α starting at β wraps around. tensor2 slices dim 1 of 2-D+ tensors, sized by dim 1 only
    when it is over 100 (else by dim 0), as the seed does.
    """
    if a.dim() == 0:
        return a
    dim = 1 if by_columns and a.dim() > 1 else 0
    n = a.shape[1] if dim == 1 and a.shape[1] > 100 else a.shape[0]
    if alpha + beta <= 1:
        base, other, start, end = a, b, int(n * beta), int(n * (alpha + beta))
    else:
        base, other, start, end = b, a, int(n * (alpha + beta - 1)), int(n * beta)
    out = base.to(a.dtype, copy=True)
    window = [slice(None)] * dim + [slice(start, end)]
    out[tuple(window)] = other[tuple(window)]
    return out


def scale_self(a, alpha: float, out=None, work: Fp32 | None = None) -> torch.Tensor:
    return _emit((work or Fp32()).acc(a).mul_(alpha), out)


def key_generator(seed: int, key: str) -> torch.Generator:
    """A generator seeded from (seed, key), so random noise is reproducible whatever the order keys run in."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def plus_random(a, alpha: float, seed: int, key: str) -> torch.Tensor:
    noise = torch.randn(a.shape, generator=key_generator(seed, key), dtype=torch.float32)  # CPU: same on any device
    return a.float() + noise.to(a.device) * alpha
