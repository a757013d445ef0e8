"""sd-mecha runs of the merges Block Merger also does, for side-by-side benchmarks and cross-checks.

Written against sd-mecha 1.1.8 (PyPI). See bench/MECHA_NOTES.md for what corresponds to what and how the math
compares with the seed's. Every function takes safetensors paths and either writes ``output`` (a .safetensors path,
streamed by sd-mecha) or, with ``output=None``, returns the merged state dict in memory.

    python bench/mecha_ref.py weight_sum A B --weights 0.5,0.1,...  --out merged.safetensors
    python bench/mecha_ref.py add_difference A B C --alpha 0.5 --out merged.safetensors
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sd_mecha  # noqa: E402
from seed_ref import BLOCKS_26, block_sd1  # noqa: E402

MECHA_VERSION = "1.1.8"


class _Silent:
    """A do-nothing progress bar (sd-mecha's ``tqdm`` argument), so benchmarks don't pay for terminal output."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, *args, **kwargs):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def close(self):
        pass


def run(recipe, output=None, *, output_dtype=torch.float16, threads=None, progress=False, **merge_kw):
    """Execute a recipe. ``output``: a .safetensors path (streamed to disk; returns None) or None (returns a dict
    without sd-mecha's ``__metadata__`` entry)."""
    kw = dict(output_dtype=output_dtype, **merge_kw)
    if threads is not None:
        kw["threads"] = threads
    if not progress:
        kw["tqdm"] = _Silent
    if output is not None:
        sd_mecha.merge(recipe, output=Path(output), **kw)
        return None
    out = sd_mecha.merge(recipe, **kw)
    out.pop("__metadata__", None)
    return out


def _models(*paths):
    return [sd_mecha.model(Path(p)) for p in paths]


def parse_weights(weights: str | Sequence[float]) -> list[float]:
    if isinstance(weights, str):
        weights = weights.split(",")
    w = [float(x) for x in weights]
    if len(w) != 26:
        raise ValueError(f"SD1 block weights need 26 values (BASE first), got {len(w)}")
    return w


def sd1_block_alpha(weights: str | Sequence[float], mapping: str = "seed", keys_from=None):
    """A 26-value SD1 block-weight list as an sd-mecha parameter.

    ``mapping="mecha"`` uses sd-mecha's own ``sd1-supermerger_blocks`` config converted to ``sd1-ldm`` (its
    converter sends ``time_embed`` to BASE, the seed sends it to IN00). ``mapping="seed"`` builds a per-key dict
    with the seed's mapping (bench/seed_ref.block_sd1), which needs the key list (``keys_from``: a safetensors path).
    """
    w = parse_weights(weights)
    if mapping == "mecha":
        blocks = dict(zip(BLOCKS_26, w, strict=True))
        return sd_mecha.convert(sd_mecha.literal(blocks, config="sd1-supermerger_blocks"), "sd1-ldm")
    if mapping != "seed":
        raise ValueError("mapping must be 'seed' or 'mecha'")
    from safetensors import safe_open

    with safe_open(str(keys_from), framework="pt") as f:
        keys = list(f.keys())
    per_key = {k: w[BLOCKS_26.index(block_sd1(k))] for k in keys}
    return sd_mecha.literal(per_key, config="sd1-ldm")


def _alpha(alpha, weights, mapping, path_a):
    return alpha if weights is None else sd1_block_alpha(weights, mapping, keys_from=path_a)


def weight_sum(path_a, path_b, alpha=0.5, weights=None, mapping="seed", output=None, **kw):
    """Seed "Weight sum" (normal): sd_mecha.weighted_sum = lerp(A, B, α) in fp32, cast to fp16."""
    a, b = _models(path_a, path_b)
    return run(sd_mecha.weighted_sum(a, b, alpha=_alpha(alpha, weights, mapping, path_a)), output, **kw)


def add_difference(path_a, path_b, path_c, alpha=0.5, weights=None, mapping="seed", output=None, **kw):
    """Seed "Add difference" (normal): sd_mecha.add_difference(A, B, C) = A + α·(B − C) in fp32, one rounding."""
    a, b, c = _models(path_a, path_b, path_c)
    return run(sd_mecha.add_difference(a, b, c, alpha=_alpha(alpha, weights, mapping, path_a)), output, **kw)


def train_difference(path_a, path_b, path_c, alpha=0.5, weights=None, mapping="seed", output=None, **kw):
    """Seed "trainDifference": A + (B − C)·train_difference_mask(A, B, C, α), the mask being
    1.8·α·|B − A| / (|B − A| + |B − C|). The seed leaves the result in fp32; pass ``output_dtype=torch.float32``
    to compare exactly."""
    a, b, c = _models(path_a, path_b, path_c)
    mask = sd_mecha.train_difference_mask(a, b, c, alpha=_alpha(alpha, weights, mapping, path_a))
    return run(sd_mecha.add_difference(a, b, c, alpha=mask), output, **kw)


def sum_twice(path_a, path_b, path_c, alpha=0.5, beta=0.25, output=None, **kw):
    """Seed "sum Twice": lerp(lerp(A, B, α), C, β); sd-mecha nests weighted_sum (fp32 inside, one rounding)."""
    a, b, c = _models(path_a, path_b, path_c)
    return run(sd_mecha.weighted_sum(sd_mecha.weighted_sum(a, b, alpha=alpha), c, alpha=beta), output, **kw)


def triple_sum(path_a, path_b, path_c, alpha=0.5, beta=0.25, output=None, **kw):
    """Seed "Triple sum": (1 − α − β)A + αB + βC, written as lerp(A, lerp(B, C, β/(α+β)), α+β) like the seed, but
    sd-mecha computes it in fp32 (the seed in native fp16)."""
    if alpha + beta == 0:
        raise ValueError("alpha + beta must not be 0")
    a, b, c = _models(path_a, path_b, path_c)
    inner = sd_mecha.weighted_sum(b, c, alpha=beta / (alpha + beta))
    return run(sd_mecha.weighted_sum(a, inner, alpha=alpha + beta), output, **kw)


def cosine(path_a, path_b, alpha=0.0, variant="a", output=None, **kw):
    """sd-mecha's add_cosine_a / add_cosine_b. NOT the seed's cosineA/cosineB: no model-wide similarity range
    (smin/smax) pre-pass, cosine_a has no magnitude term, and the VAE is merged too. Kept for timing only."""
    a, b = _models(path_a, path_b)
    method = sd_mecha.add_cosine_a if variant == "a" else sd_mecha.add_cosine_b
    return run(method(a, b, alpha=alpha), output, **kw)


def add_difference_sdxl(path_a, path_b, path_c, alpha=0.5, output=None, **kw):
    """Three-model Add difference on SDXL (sdxl-sgm config, detected from the keys)."""
    return add_difference(path_a, path_b, path_c, alpha=alpha, output=output, **kw)


def _deltas(base, models):
    return [sd_mecha.subtract(m, base) for m in models]


def _add(base, delta, alpha):
    """base + α·delta (sd-mecha's node for a weight plus a delta; the public wrapper wants three models)."""
    from sd_mecha.extensions.builtin.merge_methods import linear

    return linear.add_difference(base, delta, alpha=alpha)


def task_arithmetic(path_base, *paths, alpha=1.0, output=None, **kw):
    """base + α·Σ(Mᵢ − base), as chained add_difference nodes (fp32 inside, one rounding)."""
    base, *models = _models(path_base, *paths)
    recipe = base
    for delta in _deltas(base, models):
        recipe = _add(recipe, delta, alpha)
    return run(recipe, output, **kw)


def ties(path_base, *paths, alpha=1.0, k=0.2, output=None, **kw):
    """TIES with the paper's election by mass (vote_sgn=True; sd-mecha's default elects by count of signs). sd-mecha
    trims to the entries >= the int((1 − k)·n)-th smallest magnitude: one more entry than round(k·n) when k·n is whole,
    where Block Merger keeps exactly round(k·n)."""
    base, *models = _models(path_base, *paths)
    delta = sd_mecha.ties_sum(*_deltas(base, models), k=k, vote_sgn=True)
    return run(_add(base, delta, alpha), output, **kw)


def dare(path_base, *paths, alpha=1.0, probability=0.9, seed=0, output=None, **kw):
    """sd-mecha's dropout ("n-supermario"): each model's delta dropped with probability p (numpy draws) and the kept
    deltas averaged over the models that kept an entry, rescaled by 1/(1 − p). With one model this is DARE; with N it
    is a mean where DARE's paper sums (task arithmetic)."""
    base, *models = _models(path_base, *paths)
    return run(sd_mecha.dropout(base, *models, probability=probability, alpha=alpha, seed=seed), output, **kw)


def dare_ties(path_base, *paths, alpha=1.0, probability=0.9, seed=0, output=None, **kw):
    """sd-mecha's add_ties_with_dare: dropout masks, TIES (k = 1, sign by mass), then one global 1/(1 − p)."""
    base, *models = _models(path_base, *paths)
    return run(sd_mecha.add_ties_with_dare(base, *models, probability=probability, alpha=alpha, seed=seed, k=1.0,
                                           vote_sgn=True), output, **kw)


def geometric_median(*paths, output=None, **kw):
    """Weiszfeld over the models themselves (eps 1e-6, at most 100 iterations, objective tolerance 1e-20)."""
    return run(sd_mecha.geometric_median(*_models(*paths)), output, **kw)


def model_stock(path_base, *paths, output=None, **kw):
    """sd-mecha's n_model_stock (after mergekit): cos θ per row (last dim) between consecutive models only."""
    base, *models = _models(path_base, *paths)
    return run(sd_mecha.n_model_stock(base, *models), output, **kw)


def slerp(path_a, path_b, alpha=0.5, output=None, **kw):
    """SLERP of the normalised tensors, scaled by lerp(‖A‖, ‖B‖, t) (Block Merger interpolates the raw tensors)."""
    a, b = _models(path_a, path_b)
    return run(sd_mecha.slerp(a, b, alpha=alpha), output, **kw)


def perpendicular(path_base, path_1, path_2, alpha=1.0, output=None, **kw):
    """add_perpendicular(A=M₁, B=M₂, C=base): M₁ + α·perp(M₂ − base wrt M₁ − base)."""
    base, m1, m2 = _models(path_base, path_1, path_2)
    return run(sd_mecha.add_perpendicular(m1, m2, base, alpha=alpha), output, **kw)


OPS = {
    "weight_sum": weight_sum,
    "add_difference": add_difference,
    "train_difference": train_difference,
    "sum_twice": sum_twice,
    "triple_sum": triple_sum,
    "cosine": cosine,
    "add_difference_sdxl": add_difference_sdxl,
}


def main(argv=None):
    ap = argparse.ArgumentParser(description="sd-mecha reference merges for benchmarks.")
    ap.add_argument("op", choices=sorted(OPS))
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--beta", type=float, default=None, help="beta for sum_twice / triple_sum")
    ap.add_argument("--weights", default=None, help="26 SD1 block weights, BASE first")
    ap.add_argument("--mapping", default="seed", choices=["seed", "mecha"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="output .safetensors (default: merge in memory)")
    args = ap.parse_args(argv)
    kw = {"output": args.out, "threads": args.threads}
    if args.op in ("weight_sum", "add_difference", "train_difference"):
        kw.update(weights=args.weights, mapping=args.mapping)
    if args.beta is not None and args.op in ("sum_twice", "triple_sum"):
        kw["beta"] = args.beta
    if args.out and os.path.exists(args.out):
        os.remove(args.out)
    t = time.perf_counter()
    result = OPS[args.op](*args.paths, alpha=args.alpha, **kw)
    dt = time.perf_counter() - t
    where = args.out or f"memory ({len(result)} keys)"
    print(f"sd-mecha {sd_mecha.__dict__.get('__version__', MECHA_VERSION)} {args.op}: {dt:.2f} s -> {where}")


if __name__ == "__main__":
    main()
