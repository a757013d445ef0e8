"""Low-rank factors of a weight change by truncated SVD, shared by LoRA merging (re-rank) and extraction: of the
change itself (`factorize`), or of a change given as factors (`factorize_product`, which never forms it).

The truncation error of rank r is exactly the energy of the dropped singular values (Eckart–Young), so "auto"
picks the smallest rank that keeps a given fraction of ‖ΔW‖². The rank is capped at min(out, in·kh·kw), which
the seed does not do (its crash on SD1 `ff.net.0.proj` at dim 512+).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import scipy.linalg
import scipy.linalg.blas
import torch

from .formats import LoraError


@dataclass(frozen=True)
class RankChoice:
    """A fixed rank, or `auto` by the fraction of ‖ΔW‖² the factors must keep."""

    rank: int | None = 128
    energy: float = 0.99

    @classmethod
    def parse(cls, text: str | int | None, energy: float = 0.99, default: int | None = 128) -> RankChoice:
        if not 0 < energy <= 1:
            raise LoraError(f"The energy fraction for rank auto must be in (0, 1], not {energy}.")
        if text is None or text == "":
            return cls(default, energy)
        if str(text).strip().lower() == "auto":
            return cls(None, energy)
        try:
            rank = int(text)
        except ValueError:
            raise LoraError(f"Rank {text!r} is not a whole number or 'auto'.") from None
        if rank < 1:
            raise LoraError(f"Rank must be at least 1, not {rank}.")
        return cls(rank, energy)

    def describe(self) -> str:
        return f"auto ({self.energy:g} of the energy)" if self.rank is None else str(self.rank)


def choose_rank(singular: torch.Tensor, choice: RankChoice) -> int:
    limit = singular.numel()
    if choice.rank is not None:
        return max(1, min(choice.rank, limit))
    energy = singular.double() ** 2
    total = float(energy.sum())
    if total == 0:
        return 1
    kept = torch.cumsum(energy, 0) / total
    return max(1, min(limit, int((kept < choice.energy - 1e-12).sum()) + 1))


# Below these sizes a plain SVD is as fast as the Gram route or faster (one thread, CPU s, median of 7; speed of the
# Gram route over the SVD: 320x320 0.68x, 768x320 0.80x, 320x768 1.5x, 384x384 0.90x, 448x448 1.04x, 512x512 1.25x,
# 320x1280 2.2x, 640x640 1.5x, 768x768 1.8x).
GRAM_MIN_SIDE = 512
GRAM_MIN_LONG_SIDE = 1024


def _svd_factors(mat: torch.Tensor, choice: RankChoice) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    r = choose_rank(s, choice)
    return u[:, :r] * s[:r], vh[:r]


def _gram_factors(mat: torch.Tensor, choice: RankChoice) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact top-r singular subspace from the eigenvectors of the float64 Gram matrix of the short side.

    For M [m, n] with m >= n, G = MᵀM = V S² Vᵀ, so the top-r eigenvectors of G are M's top-r right singular
    vectors: down = Vᵀ (unit rows), up = M·V = U·S. For m < n, G = MMᵀ gives U, and down = UᵀM = S·Vᵀ has its rows
    scaled to unit length (a zero row, from a zero singular value, stays zero: no division by ~0). Either way
    up @ down = M·V·Vᵀ (or U·Uᵀ·M), an orthogonal projection onto the top-r subspace, so the error is the
    Eckart–Young truncation error. Accuracy: the eigenvalues of G = M's squared singular values carry an error of
    about eps64·s_max², so a singular value is off by at most ~sqrt(eps64)·s_max ≈ 1.5e-8·s_max, no worse than a
    float32 SVD (eps32·s_max ≈ 6e-8·s_max); measured on 1100×600 and 600×1100 float32 matrices with s from 1 down to
    1e-12: sqrt(λ) within 3e-9·s_max of numpy's float64 SVD, torch's float32 SVD within 4e-7·s_max, and the rank-16
    and rank-128 errors equal to Eckart–Young's to 9 digits. The factors are rounded to float32 anyway.
    Only the top-r eigenpairs are computed (LAPACK's MRRR, `evr`), which is what makes this faster than a full SVD:
    m·n² FLOPs for G (one triangle) plus an n×n tridiagonal reduction, against a full bidiagonalisation of M.
    "auto" needs every eigenvalue to pick r, so it takes them all (divide and conquer, `evd`): as fast as all
    eigenvalues alone followed by the top-r pairs, measured.
    """
    m64 = mat.double()
    tall = m64.shape[0] >= m64.shape[1]
    # BLAS syrk fills only G's upper triangle, half a matrix product's FLOPs (1.7-1.9x faster, measured); Mᵀ of a
    # C-ordered M is the Fortran-ordered matrix BLAS takes without a copy
    gram = scipy.linalg.blas.dsyrk(1.0, m64.numpy().T, trans=0 if tall else 1)
    n = gram.shape[0]
    if choice.rank is None:
        values, vectors = scipy.linalg.eigh(gram, lower=False, driver="evd", overwrite_a=True, check_finite=False)
        r = choose_rank(torch.from_numpy(values[::-1].clip(min=0) ** 0.5), choice)
        vectors = vectors[:, n - r:]
    else:
        r = min(choice.rank, n)
        _, vectors = scipy.linalg.eigh(gram, lower=False, subset_by_index=[n - r, n - 1], driver="evr",
                                       overwrite_a=True, check_finite=False)
    basis = torch.from_numpy(vectors[:, ::-1].copy())  # largest first, as an SVD orders them
    if tall:
        return m64 @ basis, basis.T
    rows = basis.T @ m64
    norms = rows.norm(dim=1)
    return basis * norms, rows / torch.where(norms > 0, norms, 1.0)[:, None]


def _orient(up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each component (a column of up with its row of down: the product stays the same) so that the third
    moment of its values is positive.

    An SVD's signs are arbitrary, and the seed's clamp is not symmetric in them: it bounds the values at ±(their 0.99
    quantile), so a component whose heavy tail is negative loses more to it. With heavy tails on the positive side the
    clamp cuts less: on 30 layers of the SD1.5 bench pair, relative error 0.76421 against 0.76453 with LAPACK's signs
    (0.76455 with each component's largest value made positive instead). Deterministic either way.
    """
    sign = torch.where((up ** 3).sum(0) + (down ** 3).sum(1) < 0, -1.0, 1.0)
    return up * sign, down * sign[:, None]


def factorize(delta: torch.Tensor, choice: RankChoice, method: str = "full", clamp: float | None = None,
              what: str = "The weight change") -> tuple[torch.Tensor, torch.Tensor]:
    """ΔW [out, in(, kh, kw)] -> (up [out, r(, 1, 1)], down [r, in(, kh, kw)]) with up @ down ≈ ΔW, in fp32.

    method "full" is the exact truncated SVD (up = U·S, down = Vᵀ with unit rows, as kohya's extraction): a plain
    SVD for small layers, the top-r eigenvectors of the Gram matrix for the others (`_gram_factors`: the same
    subspace, 1.5-5.7x faster per layer, 6.8x on the whole SD1.5 extraction against kohya's full-matrix SVDs, in
    bench/LORA_EXTRACT.md); "lowrank" uses torch.svd_lowrank (randomised, for a fixed rank only; "auto" falls back
    to "full").
    clamp: the seed's (kohya's) clamp of both factors to ±(that quantile of their values); None keeps them exact.
    Each component's sign is chosen for the clamp (`_orient`).
    what: names ΔW in the error raised when it has NaN or infinite values.
    """
    if method not in ("full", "lowrank"):
        raise LoraError(f"Unknown SVD method {method!r}; use full or lowrank.")
    out = delta.shape[0]
    mat = delta.reshape(out, -1).float()
    if not bool(torch.isfinite(mat).all()):
        raise LoraError(f"{what} has NaN or infinite values; check the models (or LoRAs) it comes from.")
    if method == "lowrank" and choice.rank is not None:
        q = min(choice.rank + 8, min(mat.shape))
        u, s, v = torch.svd_lowrank(mat, q=q, niter=2)
        r = choose_rank(s, choice)
        up, down = u[:, :r] * s[:r], v[:, :r].T
    elif min(mat.shape) >= GRAM_MIN_SIDE or max(mat.shape) >= GRAM_MIN_LONG_SIDE:
        up, down = _gram_factors(mat, choice)
    else:
        up, down = _svd_factors(mat, choice)
    return _finished(up, down, tuple(delta.shape), clamp)


def factorize_product(up: torch.Tensor, down: torch.Tensor, choice: RankChoice) -> tuple[torch.Tensor, torch.Tensor]:
    """`factorize(up @ down, choice)` for a change given as factors (up [out, R(, 1, 1)], down [R, in(, kh, kw)]:
    the merged LoRAs' factors side by side), without forming the change.

    With up = Qu·Ru and downᵀ = Qd·Rd (thin QR), up·down = Qu·(Ru·Rdᵀ)·Qdᵀ, so the SVD of the small core,
    Ru·Rdᵀ = X·S·Yᵀ, is the change's own: U = Qu·X, the same S, V = Qd·Y, and its other singular values are 0.
    In float64, O((out + in)·R²) against the O(out·in·min(out, in)) of an SVD of the whole change: re-ranking a
    rank-32 SD1.5 LoRA (264 modules) to 16 took 1.5 s instead of 29.1 s, with the same Eckart–Young error. A rank
    above R gets zero components, as the whole change's SVD gives them (its remaining singular values are 0).
    """
    out, n = up.shape[0], math.prod(down.shape[1:])
    u, d = up.reshape(out, -1).double(), down.reshape(down.shape[0], -1).double()
    qu, ru = torch.linalg.qr(u)
    qd, rd = torch.linalg.qr(d.T)
    x, s, yh = torch.linalg.svd(ru @ rd.T)
    r = choose_rank(s, choice)
    width = r if choice.rank is None else min(choice.rank, out, n)
    new_up, new_down = u.new_zeros(out, width), u.new_zeros(width, n)
    new_up[:, :r] = (qu @ x[:, :r]) * s[:r]
    new_down[:r] = yh[:r] @ qd.T
    if not bool(torch.isfinite(new_up.float()).all()):
        raise LoraError("The merged change is too large for float32; check the LoRAs' ratios.")
    return _finished(new_up, new_down, (out, *down.shape[1:]), None)


def _finished(up: torch.Tensor, down: torch.Tensor, shape: tuple[int, ...], clamp: float | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors in fp32, each component's sign chosen (`_orient`), clamped, in the change's kernel shape."""
    up, down = _orient(up.float(), down.float())
    up, down = up.contiguous(), down.contiguous()
    r = up.shape[1]
    if clamp is not None and clamp < 1:
        values = torch.cat([up.flatten(), down.flatten()])
        if values.numel() > 16_000_000:  # torch.quantile's input limit: estimate from a strided sample
            values = values[:: values.numel() // 8_000_000 + 1]
        hi = float(torch.quantile(values, clamp))
        up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
    if len(shape) == 4:
        return up.reshape(shape[0], r, 1, 1), down.reshape(r, *shape[1:])
    return up, down
