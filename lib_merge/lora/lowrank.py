"""Low-rank factors of a weight change by truncated SVD, shared by LoRA merging (re-rank) and extraction.

The truncation error of rank r is exactly the energy of the dropped singular values (Eckart–Young), so "auto"
picks the smallest rank that keeps a given fraction of ‖ΔW‖². The rank is capped at min(out, in·kh·kw), which
the seed does not do (its crash on SD1 `ff.net.0.proj` at dim 512+).
"""

from __future__ import annotations

from dataclasses import dataclass

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


def factorize(delta: torch.Tensor, choice: RankChoice, method: str = "full",
              clamp: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ΔW [out, in(, kh, kw)] -> (up [out, r(, 1, 1)], down [r, in(, kh, kw)]) with up @ down ≈ ΔW, in fp32.

    method "full" is an exact SVD; "lowrank" uses torch.svd_lowrank (randomised, for a fixed rank only).
    clamp: the seed's (kohya's) clamp of both factors to ±(that quantile of their values); None keeps them exact.
    """
    out = delta.shape[0]
    mat = delta.reshape(out, -1).float()
    if method == "lowrank" and choice.rank is not None:
        q = min(choice.rank + 8, min(mat.shape))
        u, s, v = torch.svd_lowrank(mat, q=q, niter=2)
        vh = v.T
    elif method in ("full", "lowrank"):
        u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    else:
        raise LoraError(f"Unknown SVD method {method!r}; use full or lowrank.")
    r = choose_rank(s, choice)
    up = (u[:, :r] * s[:r]).contiguous()
    down = vh[:r].contiguous()
    if clamp is not None and clamp < 1:
        values = torch.cat([up.flatten(), down.flatten()])
        if values.numel() > 16_000_000:  # torch.quantile's input limit: estimate from a strided sample
            values = values[:: values.numel() // 8_000_000 + 1]
        hi = float(torch.quantile(values, clamp))
        up, down = up.clamp(-hi, hi), down.clamp(-hi, hi)
    if delta.dim() == 4:
        return up.reshape(out, r, 1, 1), down.reshape(r, *delta.shape[1:])
    return up, down
