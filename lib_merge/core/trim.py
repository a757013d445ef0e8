"""TIES' trim step, exact and streamed: which entries of each task vector τ are among its k largest magnitudes,
found without partitioning all n of them, and applied a cache-sized piece at a time.

The k-th largest magnitude t is an order statistic; a full partition (introselect over a copy of all n entries) was
most of TIES' time on a large key. Here a fixed pseudo-random sample of the magnitudes brackets t between two sample
values, lo < t ≤ hi, with overwhelming probability; one streamed pass then counts the entries above hi exactly and
collects only those inside (lo, hi] (a percent or two of n), and t is the right order statistic among those. The
counts make the answer exact whatever the sample: when t is not inside the bracket, it is taken over all n
magnitudes instead (slower, same value). The sample decides how fast, never what is kept.

The kept set is the definition's: every entry with |τ| > t and, of those with |τ| = t, the first in flat index order
until k are kept. NaN magnitudes rank above every number (numpy's order) and are always kept; a NaN threshold (k
or more NaN) keeps everything. A dropped entry is multiplied by 0 (a float mask: comparisons into float tensors are
several times faster than into bool ones on a CPU), so it may become −0 where the definition's zero is +0; TIES'
election never tells the two apart.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

#: entries per piece when a key streams: a piece's fp32 temporaries for a few models stay in the CPU cache
PIECE = 1 << 17
#: magnitudes sampled to bracket the threshold; keys of fewer than SAMPLE_BELOW entries take the full selection
SAMPLE, SAMPLE_BELOW = 1 << 16, 1 << 18
#: the bracket reaches this many standard deviations of the sample's count (plus SLACK places) either side
SPREAD, SLACK = 5.0, 16
SAMPLE_SEED = 0x7135  # fixed, so a key's timing repeats; what is kept never depends on it

#: τ of one model over entries [start, stop) of the flat key: (model index, start, stop) -> fp32 tensor
Piece = Callable[[int, int, int], torch.Tensor]
#: τ of one model at the given flat positions: (model index, positions) -> fp32 tensor
Gather = Callable[[int, torch.Tensor], torch.Tensor]


def kept_count(n: int, density: float) -> int:
    """k = max(1, round(density·n)): how many entries TIES' trim keeps."""
    return max(1, round(density * n))


@dataclass
class Cut:
    """One task vector's trim: entries with |τ| < threshold are dropped; of those with |τ| = threshold, the first
    `keep` in flat index order are kept and the rest dropped. Applied to consecutive pieces in index order, it counts
    down `keep` and `left` (the ties not yet seen)."""

    threshold: float
    keep: int
    left: int

    def apply_(self, tau: torch.Tensor, mag: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        """Trim the next piece of τ in place (flat, in index order); `mag` and `at`: scratch of its size."""
        t = self.threshold
        if math.isnan(t):
            return tau
        torch.abs(tau, out=mag)
        if self.keep >= self.left:  # every tie still to come is kept
            return tau.mul_(torch.ge(mag, t, out=mag))
        if self.keep == 0:
            return tau.mul_(torch.gt(mag, t, out=mag))
        here = int(torch.eq(mag, t, out=at).sum())
        self.left -= here
        if here <= self.keep:
            self.keep -= here
            return tau.mul_(torch.ge(mag, t, out=mag))
        first_dropped = int(torch.nonzero(at)[self.keep])
        self.keep = 0
        torch.ge(mag[:first_dropped], t, out=mag[:first_dropped])
        torch.gt(mag[first_dropped:], t, out=mag[first_dropped:])
        return tau.mul_(mag)


def full_cut(mag: torch.Tensor, k: int) -> Cut:
    """The cut from all n magnitudes (flat, fp32): t the k-th largest by numpy's introselect (NaN ranks largest;
    kthvalue, the same order statistic, on a device)."""
    n = mag.numel()
    if mag.device.type == "cpu":
        t = float(np.partition(mag.numpy(), n - k)[n - k])
    else:
        t = float(torch.kthvalue(mag, n - k + 1).values)
    return Cut(t, k - int((mag > t).sum()), int((mag == t).sum()))


class Bracket:
    """One task vector's sampled selection (CPU): lo < t ≤ hi expected from the sample; pieces of |τ| added in any
    order count the entries above hi and collect those in (lo, hi]; `cut` is then exact, or None when t is outside
    the bracket or a magnitude is not finite."""

    def __init__(self, sample: np.ndarray, n: int, k: int):
        s = sample.size
        ordered = np.sort(sample)
        place = (n - k) / n * s  # t's expected place in the ascending sample
        margin = SPREAD * math.sqrt(s * (k / n) * (1 - k / n)) + SLACK  # a binomial count's deviation
        low, high = math.floor(place - margin), math.ceil(place + margin)
        self.lo = float(ordered[low]) if low >= 0 else -1.0  # -1: below every magnitude
        self.hi = float(ordered[high]) if high < s else math.inf
        self.n, self.k = n, k
        self.above, self.inside, self.finite = 0, [], bool(np.isfinite(ordered[-1]))

    def add(self, mag: np.ndarray, over: np.ndarray, under: np.ndarray) -> None:
        """Count and collect a piece of |τ| (`over`, `under`: bool scratch of its size)."""
        if not self.finite:
            return
        if not math.isfinite(float(mag.sum())):  # inf/NaN (or an overflowing sum): the full selection decides
            self.finite = False
            return
        np.greater(mag, self.hi, out=over)
        self.above += int(np.count_nonzero(over))
        np.greater(mag, self.lo, out=under)
        self.inside.append(mag[np.logical_xor(under, over, out=under)])  # lo < |τ| ≤ hi

    def cut(self) -> Cut | None:
        if not self.finite:
            return None
        inside = np.concatenate(self.inside)
        rank = self.k - self.above  # t is the rank-th largest inside the bracket
        if rank <= 0:
            return None
        if rank > inside.size:  # t ≤ lo: known only when lo = 0, where t = 0 and every other entry is 0
            if self.lo != 0:
                return None
            return Cut(0.0, rank - inside.size, self.n - self.above - inside.size)
        t = float(np.partition(inside, inside.size - rank)[inside.size - rank])
        return Cut(t, self.k - self.above - int(np.count_nonzero(inside > t)), int(np.count_nonzero(inside == t)))


def cuts(n: int, k: int, count: int, piece: Piece, gather: Gather, device: torch.device) -> list[Cut]:
    """The exact cut of each of `count` task vectors of n entries, keeping k (< n) of each. τ is read through
    `piece` (pieces in order, every model per piece; the result may be overwritten) and `gather` (the sample)."""
    if n < SAMPLE_BELOW or device.type != "cpu":
        return [full_cut(piece(i, 0, n).abs_(), k) for i in range(count)]
    positions = torch.randint(n, (SAMPLE,), generator=torch.Generator().manual_seed(SAMPLE_SEED))
    brackets = [Bracket(gather(i, positions).abs_().numpy(), n, k) for i in range(count)]
    over, under = np.empty(min(n, PIECE), bool), np.empty(min(n, PIECE), bool)
    for start, stop in pieces(n, device):
        for i, b in enumerate(brackets):
            if b.finite:
                b.add(piece(i, start, stop).abs_().numpy(), over[: stop - start], under[: stop - start])
    found = [b.cut() for b in brackets]
    return [c if c is not None else full_cut(piece(i, 0, n).abs_(), k) for i, c in enumerate(found)]


def pieces(n: int, device: torch.device) -> Sequence[tuple[int, int]]:
    """[start, stop) of the pieces a key of n entries streams in (the whole key on a device)."""
    step = PIECE if device.type == "cpu" else max(n, 1)
    return [(s, min(n, s + step)) for s in range(0, n, step)]
