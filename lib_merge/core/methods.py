"""Merge methods over a base and N models: one pure kernel per published method, and their registry.

Every kernel takes one key's tensors already in fp32 (the base and the N models, never modified) and the key's
parameters, and returns a new fp32 tensor; the engine rounds it to the output dtype once. Methods built on task
vectors work on τᵢ = wᵢ·(Mᵢ − base), wᵢ the per-model weight (1 unless given). Random methods draw from one generator
per (seed, key, model), so a result does not depend on the order keys run in or on the number of threads.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from . import trim
from .errors import MergeError
from .kernels import key_generator

#: Weiszfeld's algorithm: at most this many iterations, distances floored at this value (a point on the estimate),
#: and it stops early once a step moves the estimate by at most this fraction of its norm.
MEDIAN_ITERATIONS, MEDIAN_EPS, MEDIAN_TOLERANCE = 100, 1e-6, 1e-6
#: SLERP falls back to linear interpolation when the normalised tensors' dot product exceeds this (nearly parallel).
SLERP_PARALLEL = 0.9995


@dataclass(frozen=True)
class Params:
    """One key's parameters: alpha is λ (the task vector's scale) or SLERP's t; density the fraction kept (TIES,
    DELLA); drop the drop probability p (DARE); epsilon DELLA's spread of drop probabilities."""

    alpha: float = 1.0
    density: float = 1.0
    drop: float = 0.0
    epsilon: float = 0.0
    weights: tuple[float, ...] = ()  # per model; () = all 1
    seed: int = 0
    key: str = ""

    def weight(self, index: int) -> float:
        return self.weights[index] if self.weights else 1.0

    def generator(self, index: int) -> torch.Generator:
        """Model `index`'s random draws for this key: seeded from (seed, key, index) only."""
        return key_generator(self.seed, f"{self.key}:{index}")


def task_vectors(base: torch.Tensor, models: Sequence[torch.Tensor], p: Params) -> list[torch.Tensor]:
    """τᵢ = wᵢ(Mᵢ − base), new tensors."""
    out = []
    for i, m in enumerate(models):
        tau = torch.sub(m, base)
        w = p.weight(i)
        out.append(tau if w == 1 else tau.mul_(w))
    return out


def dare_(tau: torch.Tensor, drop: float, generator: torch.Generator) -> torch.Tensor:
    """DARE on τ, in place: each entry dropped with probability p (uniform draw u < p), survivors scaled by
    1/(1 − p)."""
    if drop == 0:
        return tau
    u = torch.rand(tau.shape, generator=generator, dtype=torch.float32).to(tau.device)
    return tau.div_(1 - drop).masked_fill_(u < drop, 0)


def magprune_(tau: torch.Tensor, drop: float, epsilon: float, generator: torch.Generator) -> torch.Tensor:
    """DELLA's MAGPRUNE on τ, in place: within each row (dim-0 slice; 0-D/1-D tensors are one row) of n entries, rank
    r = 0..n−1 by ascending magnitude (ties in index order); entry i is dropped with pᵢ = p − ε(rᵢ − (n−1)/2)/n
    (smaller magnitude, higher drop probability, mean p) and a survivor is scaled by 1/(1 − pᵢ)."""
    rows = tau.view(tau.shape[0], -1) if tau.dim() >= 2 else tau.view(1, -1)
    n = rows.shape[1]
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    positions = torch.arange(n, dtype=torch.float32, device=rows.device).expand_as(rows)
    prob = torch.empty_like(rows).scatter_(1, order, positions)  # the ranks: an inverse permutation, not a 2nd sort
    del order
    prob.sub_((n - 1) / 2).mul_(epsilon).div_(n).neg_().add_(drop)  # p − ε(r − (n−1)/2)/n, in this order
    u = torch.rand(rows.shape, generator=generator, dtype=torch.float32).to(tau.device)
    dropped = u < prob
    rows.div_(prob.neg_().add_(1))  # 1 − pᵢ
    return tau.masked_fill_(dropped.view(tau.shape), 0)


def elect_and_mean(taus: Sequence[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """TIES' elect and disjoint merge: γ = sgn(Σᵢ τᵢ) per entry (the sign with more mass; an exact tie gives 0), then
    the mean of the entries whose sign is γ (0 where none agrees), into `out` (default: a new tensor). One set of
    buffers for all models."""
    elected = torch.zeros_like(taus[0])
    for tau in taus:
        elected.add_(tau)
    elected.sign_()
    kept, count, scratch = torch.zeros_like(elected), torch.zeros_like(elected), torch.empty_like(elected)
    agree = torch.empty(elected.shape, dtype=torch.bool, device=elected.device)
    zero = elected.new_zeros(())
    for tau in taus:
        torch.gt(torch.mul(tau, elected, out=scratch), 0, out=agree)  # sign(τ) = γ ≠ 0 (γ is exactly −1, 0 or 1)
        kept.add_(torch.where(agree, tau, zero, out=scratch))
        count.add_(agree)
    return torch.div(kept, count.clamp_(min=1), out=kept if out is None else out)


def _elect_and_mean_finite(taus: Sequence[torch.Tensor], out: torch.Tensor, work: Sequence[torch.Tensor]) -> bool:
    """elect_and_mean into `out` with float 0/1 masks (four buffers in `work`), for finite τ: the same values, as
    τ·1 = τ and τ·0 = ±0 adds nothing, and several times faster on a CPU than masks of bool. False, with `out` not
    yet written, when a τ holds inf/NaN (where τ·0 would be NaN)."""
    elected, kept, count, agree = work
    elected.copy_(taus[0])  # Σᵢ τᵢ in order (the reference's 0 + τ₀ differs only in the sign of a zero)
    for tau in taus[1:]:
        elected.add_(tau)
    if not math.isfinite(float(elected.sum())):  # a finite sum: every τ finite (else inf/NaN reach their sum)
        return False
    elected.sign_()
    kept.zero_()
    count.zero_()
    for tau in taus:
        torch.gt(torch.mul(tau, elected, out=agree), 0, out=agree)  # sign(τ) = γ ≠ 0, as 1.0 or 0.0
        kept.addcmul_(tau, agree)  # τ·agree is exact: one rounding, as adding τ where it agrees
        count.add_(agree)
    torch.div(kept, count.clamp_(min=1), out=out)
    return True


def _onto_base(base: torch.Tensor, tau: torch.Tensor, alpha: float) -> torch.Tensor:
    """base + λ·τ, written into τ (the same two roundings as the expression)."""
    return (tau if alpha == 1 else tau.mul_(alpha)).add_(base)


def task_arithmetic(base, models, p: Params) -> torch.Tensor:
    """base + λ Σᵢ wᵢ(Mᵢ − base). Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023
    (arXiv:2212.04089)."""
    out = base.clone()
    for tau in task_vectors(base, models, p):
        out.add_(tau, alpha=p.alpha)
    return out


def ties(base, models, p: Params, out: torch.Tensor | None = None) -> torch.Tensor:
    """TIES-merging: trim each τᵢ to its top-k% magnitudes (k = density), elect the sign by mass, average the agreeing
    entries (disjoint mean), base + λ·τ. Yadav et al., "TIES-Merging: Resolving Interference When Merging Models",
    NeurIPS 2023 (arXiv:2306.01708), Algorithm 1.

    Streamed: each model's threshold is found first (core.trim, exact), then the key is merged a cache-sized piece at
    a time, τᵢ computed afresh per piece from the inputs in any float dtype: the same operations per entry as on whole
    fp32 tensors, so the same bits, without key-sized temporaries. With `out` (the key's shape, any float dtype), each
    piece is rounded into it at once (the engine's one rounding) and no fp32 result is made."""
    n, count, device = base.numel(), len(models), base.device
    flat, others = base.reshape(-1), [m.reshape(-1) for m in models]
    size = min(n, trim.PIECE) if device.type == "cpu" else n
    buffers = torch.empty((count + 8, size), dtype=torch.float32, device=device)
    taus, (base32, mag, at, merged, *work) = buffers[:count], buffers[count:]

    def fp32(t: torch.Tensor, buffer: torch.Tensor | None) -> torch.Tensor:
        if t.dtype == torch.float32:
            return t
        return t.float() if buffer is None else buffer[: t.numel()].copy_(t)

    def piece(i: int, start: int, stop: int, b: torch.Tensor | None = None) -> torch.Tensor:
        """τᵢ over [start, stop) in model i's buffer (new tensors for a whole key larger than a piece)."""
        fits = stop - start <= size
        b = fp32(flat[start:stop], base32 if fits else None) if b is None else b
        out = taus[i][: stop - start] if fits else torch.empty(stop - start, dtype=torch.float32, device=device)
        tau = torch.sub(fp32(others[i][start:stop], out), b, out=out)
        w = p.weight(i)
        return tau if w == 1 else tau.mul_(w)

    def gather(i: int, positions: torch.Tensor) -> torch.Tensor:
        tau = torch.sub(others[i][positions].float(), flat[positions].float())
        w = p.weight(i)
        return tau if w == 1 else tau.mul_(w)

    k = trim.kept_count(n, p.density)
    cuts = trim.cuts(n, k, count, piece, gather, device) if k < n else [None] * count
    dest = torch.empty(n, dtype=torch.float32, device=device) if out is None else out.view(-1)
    for start, stop in trim.pieces(n, device):
        length = stop - start
        b = fp32(flat[start:stop], base32)
        pieces = [piece(i, start, stop, b) for i in range(count)]
        for tau, cut in zip(pieces, cuts, strict=True):
            if cut is not None:
                cut.apply_(tau, mag[:length], at[:length])
        result = merged[:length]
        if not _elect_and_mean_finite(pieces, result, [w[:length] for w in work]):
            elect_and_mean(pieces, result)
        dest[start:stop] = _onto_base(b, result, p.alpha)
    return dest.view(base.shape) if out is None else out


def dare(base, models, p: Params) -> torch.Tensor:
    """DARE then task arithmetic: base + λ Σᵢ DARE(τᵢ, p). Yu et al., "Language Models are Super Mario: Absorbing
    Abilities from Homologous Models as a Free Lunch", ICML 2024 (arXiv:2311.03099), eq. 1-2."""
    out = base.clone()
    for i, tau in enumerate(task_vectors(base, models, p)):
        out.add_(dare_(tau, p.drop, p.generator(i)), alpha=p.alpha)
    return out


def dare_ties(base, models, p: Params) -> torch.Tensor:
    """DARE's drop and rescale in place of TIES' trim, then TIES' sign election and disjoint mean: base + λ·τ
    (Yu et al. 2024, section 4.3, "DARE + TIES-Merging")."""
    taus = [dare_(t, p.drop, p.generator(i)) for i, t in enumerate(task_vectors(base, models, p))]
    return _onto_base(base, elect_and_mean(taus), p.alpha)


def della(base, models, p: Params) -> torch.Tensor:
    """DELLA-merging: MAGPRUNE (drop probability p = 1 − density, spread ε by magnitude rank, rescale 1/(1 − pᵢ)),
    elect the sign by mass, fuse by the disjoint mean, base + λ·τ. Deep, Bhardwaj and Poria, "DELLA-Merging: Reducing
    Interference in Model Merging through Magnitude-Based Sampling", 2024 (arXiv:2406.11617), section 3."""
    drop = 1 - p.density
    taus = [magprune_(t, drop, p.epsilon, p.generator(i)) for i, t in enumerate(task_vectors(base, models, p))]
    return _onto_base(base, elect_and_mean(taus), p.alpha)


def slerp(base, models, p: Params) -> torch.Tensor:
    """Spherical linear interpolation from the base to the one model, per tensor: with Ω the angle between the two
    flattened tensors, sin((1−t)Ω)/sin Ω · base + sin(tΩ)/sin Ω · M; linear interpolation where they are nearly
    parallel (cos Ω > 0.9995) or one is zero. Shoemake, "Animating Rotation with Quaternion Curves", SIGGRAPH 1985."""
    (model,) = models
    t = p.alpha
    na, nb = torch.linalg.vector_norm(base), torch.linalg.vector_norm(model)
    if na == 0 or nb == 0:
        return torch.lerp(base, model, t)
    dot = float(torch.sum(base * model) / (na * nb))
    if abs(dot) > SLERP_PARALLEL:
        return torch.lerp(base, model, t)
    omega = math.acos(dot)
    s = math.sin(omega)
    return base * (math.sin((1 - t) * omega) / s) + model * (math.sin(t * omega) / s)


def model_stock(base, models, p: Params) -> torch.Tensor:
    """Model Stock: with θ the mean pairwise angle between the task vectors (cos θ averaged over all pairs),
    t = N cos θ / (1 + (N−1) cos θ) and the result t·mean(Mᵢ) + (1 − t)·base, per tensor. Jang, Yun and Han, "Model
    Stock: All we need is just a few fine-tuned models", ECCV 2024 (arXiv:2403.19522), eq. 5. A zero task vector has
    no angle (cos taken as 0), and a negative mean cosine, outside the paper's range t ∈ [0, 1], is taken as 0: the
    base."""
    taus = task_vectors(base, models, p)
    norms = [torch.linalg.vector_norm(t) for t in taus]
    cosines = []
    for i in range(len(taus)):
        for j in range(i + 1, len(taus)):
            denom = norms[i] * norms[j]
            cosines.append(float(torch.sum(taus[i] * taus[j]) / denom) if denom > 0 else 0.0)
    cos = max(0.0, sum(cosines) / len(cosines))
    n = len(taus)
    t = n * cos / (1 + (n - 1) * cos)
    mean = torch.zeros_like(base)
    for tau in taus:
        mean.add_(tau)
    return base + (t / n) * mean


def geometric_median(base, models, p: Params) -> torch.Tensor:
    """base + λ·m, m the geometric median of the task vectors (weights wᵢ) by Weiszfeld's algorithm: start at the
    weighted mean, then m ← Σ(wᵢ/dᵢ)τᵢ / Σ(wᵢ/dᵢ), dᵢ = max(‖τᵢ − m‖, 1e-6), at most 100 times, stopping once a step
    moves m by no more than 1e-6·‖m‖. With λ = 1 this is the geometric median of the models themselves. Weiszfeld,
    "Sur le point pour lequel la somme des distances de n points donnés est minimum", 1937; for merging as in
    Pillutla, Kakade and Harchaoui, "Robust Aggregation for Federated Learning", 2022 (arXiv:1912.13445)."""
    taus = task_vectors(base, models, dataclasses.replace(p, weights=()))  # the weights weigh the points
    weights = [p.weight(i) for i in range(len(taus))]

    def average(coefficients: Sequence[float]) -> torch.Tensor:
        acc = torch.zeros_like(base)
        for c, tau in zip(coefficients, taus, strict=True):
            acc.add_(tau, alpha=c)
        return acc.div_(sum(coefficients))

    median = average(weights)
    for _ in range(MEDIAN_ITERATIONS):
        step = average([w / max(float(torch.linalg.vector_norm(tau - median)), MEDIAN_EPS)
                        for w, tau in zip(weights, taus, strict=True)])
        moved = float(torch.linalg.vector_norm(step - median))
        median = step
        if moved <= MEDIAN_TOLERANCE * float(torch.linalg.vector_norm(median)):
            break
    return base + p.alpha * median


def perpendicular(base, models, p: Params) -> torch.Tensor:
    """M₁ + λ·(τ₂ − (⟨τ₂,τ₁⟩/⟨τ₁,τ₁⟩)·τ₁) with τᵢ = Mᵢ − base: the second model's difference with its component
    along the first's removed (one Gram–Schmidt step over the flattened tensor), added to the first model; with
    τ₁ = 0 nothing is removed. The method is sd-mecha's `add_perpendicular` (no paper)."""
    first, _ = models
    tau1, tau2 = task_vectors(base, models, p)
    norm = float(torch.sum(tau1 * tau1))
    if norm > 0:
        tau2 = tau2 - (float(torch.sum(tau2 * tau1)) / norm) * tau1
    return first + p.alpha * tau2


@dataclass(frozen=True)
class Method:
    """A method: its kernel, how many models it takes (beside the base), which parameters it reads."""

    name: str
    kernel: Callable[[torch.Tensor, Sequence[torch.Tensor], Params], torch.Tensor]
    formula: str
    source: str
    min_models: int = 1
    max_models: int | None = None
    params: tuple[str, ...] = ("alpha",)
    weighted: bool = True  # takes per-model weights
    random: bool = False
    drops: bool = False  # leaves entries of the task vectors out (DARE's random drops; the sign election, where a
    # NaN τ agrees with no sign): an input's inf/NaN may not reach the result
    default_alpha: float = 1.0
    streams: bool = False  # the kernel reads its inputs a piece at a time, in their own float dtype

    def takes(self, count: int) -> bool:
        return count >= self.min_models and (self.max_models is None or count <= self.max_models)

    def count_text(self) -> str:
        if self.max_models == self.min_models:
            return f"exactly {self.min_models}"
        return f"at least {self.min_models}" if self.max_models is None else \
            f"{self.min_models} to {self.max_models}"


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("task_arithmetic", task_arithmetic, "base + λ·Σ wᵢ(Mᵢ − base)", "Ilharco et al. 2023, arXiv:2212.04089"),
    Method("ties", ties, "base + λ·disjoint_mean(elect(trim_k(τᵢ)))", "Yadav et al. 2023, arXiv:2306.01708",
           params=("alpha", "density"), drops=True, streams=True),
    Method("dare", dare, "base + λ·Σ DARE_p(τᵢ)", "Yu et al. 2024, arXiv:2311.03099", params=("alpha", "drop"),
           random=True, drops=True),
    Method("dare_ties", dare_ties, "base + λ·disjoint_mean(elect(DARE_p(τᵢ)))", "Yu et al. 2024, arXiv:2311.03099",
           params=("alpha", "drop"), random=True, drops=True),
    Method("della", della, "base + λ·disjoint_mean(elect(MAGPRUNE_{1−k,ε}(τᵢ)))",
           "Deep et al. 2024, arXiv:2406.11617", params=("alpha", "density", "epsilon"), random=True,
           drops=True),
    Method("slerp", slerp, "sin((1−t)Ω)/sin Ω·base + sin(tΩ)/sin Ω·M", "Shoemake 1985", max_models=1,
           weighted=False, default_alpha=0.5),
    Method("model_stock", model_stock, "t·mean(Mᵢ) + (1−t)·base, t = N cos θ/(1+(N−1) cos θ)",
           "Jang et al. 2024, arXiv:2403.19522", min_models=2, params=(), weighted=False),
    Method("geometric_median", geometric_median, "base + λ·geomedian_w(τᵢ) (Weiszfeld)",
           "Weiszfeld 1937; Pillutla et al. 2022, arXiv:1912.13445"),
    Method("perpendicular", perpendicular, "M₁ + λ·(τ₂ − proj_τ₁ τ₂)", "sd-mecha add_perpendicular",
           min_models=2, max_models=2, weighted=False),
)}


def get_method(name: str) -> Method:
    method = METHODS.get(name)
    if method is None:
        raise MergeError(f"Unknown merge method {name!r}; use one of: {', '.join(METHODS)}.")
    return method


def check_params(method: Method, alpha: float, density: float, drop: float, epsilon: float, where: str) -> None:
    """Refuse parameters outside a method's domain (where: e.g. "block IN03") with the range to use."""
    if "density" in method.params and not 0 < density <= 1:
        raise MergeError(f"{method.name} needs density in (0, 1] (the fraction kept); {where}: {density}.")
    if "drop" in method.params and not 0 <= drop < 1:
        raise MergeError(f"{method.name} needs drop in [0, 1) (the drop probability); {where}: {drop}.")
    if "epsilon" in method.params:
        p = 1 - density
        if epsilon < 0 or p - epsilon / 2 < 0 or p + epsilon / 2 >= 1:
            raise MergeError(f"{method.name} needs 0 <= epsilon, 1 - density - epsilon/2 >= 0 and "
                             f"1 - density + epsilon/2 < 1 (drop probabilities within [0, 1)); {where}: "
                             f"density {density}, epsilon {epsilon}.")
    if method.name == "slerp" and not math.isfinite(alpha):
        raise MergeError(f"slerp needs a finite t; {where}: {alpha}.")


def merge_key(method: Method, base: torch.Tensor, models: Sequence[torch.Tensor], p: Params,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """The method on fp32 copies of one key's tensors (the inputs are never modified), a new fp32 tensor. A streaming
    kernel converts each piece itself, without key-sized copies, and with `out` (only for them: the key's shape, any
    float dtype, on the inputs' device) writes the result rounded into it instead."""
    if method.streams:
        return method.kernel(base, models, p, out=out)
    if out is not None:
        raise ValueError(f"{method.name} does not write into a given tensor")
    base = base.to(torch.float32)
    models = [m.to(torch.float32) for m in models]
    return method.kernel(base, models, p)
