"""`python -m lib_merge demo`: a first minute with Block Merger, on small synthetic models it makes itself.

It merges with a block-weight preset and with trainDifference, then shows, per block, how far each result moved
from model A, so a new user sees what block weights do without any files of their own.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ..core.arch import detect_arch
from ..core.recipe import Recipe
from ..io.checkpoint import SaveOptions, open_checkpoint
from ..service.pipeline import merge_to_file
from . import synth

BAR = 30


def block_shift(path_a: Path, path_b: Path, path_out: Path) -> dict[str, tuple[float, float]]:
    """Per block: the result's distance from A relative to A's norm (%), and how far along A->B it lies (0..1)."""
    with open_checkpoint(path_a) as a, open_checkpoint(path_b) as b, open_checkpoint(path_out) as out:
        arch = detect_arch(set(a.keys()), a.shape)
        sums: dict[str, list[float]] = {}
        for key in a.keys():
            labels = arch.block_of(key)
            if labels is None or "model" not in key or not a.dtype(key).is_floating_point:
                continue
            ta, tb, tr = (t.get(key).double() for t in (a, b, out))
            s = sums.setdefault(labels[1], [0.0, 0.0, 0.0, 0.0])
            s[0] += float((tr - ta).square().sum())
            s[1] += float(ta.square().sum())
            s[2] += float(((tr - ta) * (tb - ta)).sum())
            s[3] += float((tb - ta).square().sum())
    return {label: (100 * (d / n) ** 0.5 if n else 0.0, p / q if q else 0.0)
            for label, (d, n, p, q) in ((lb, sums[lb]) for lb in arch.blocks if lb in sums)}


def _report(title: str, shifts: dict[str, tuple[float, float]], towards_b: bool) -> None:
    print(f"\n{title}")
    print(f"  {'block':<6} {'moved from A':>12}   " + ("share of the way to B" if towards_b else ""))
    top = max((s for s, _ in shifts.values()), default=0.0) or 1.0
    for label, (moved, share) in shifts.items():
        bar = "#" * round(BAR * (share if towards_b else moved / top))
        extra = f"{share:5.2f} {bar}" if towards_b else bar
        print(f"  {label:<6} {moved:11.2f}%   {extra}")


def run_demo(folder: Path | None = None) -> None:
    with tempfile.TemporaryDirectory(prefix="block-merger-demo-") as tmp:
        work = folder or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        print(f"Making three small synthetic SD1 checkpoints in {work} ...")
        base = synth.make_checkpoint(work / "base.safetensors", "sd1", factor=8, seed=1)
        model_a = synth.make_checkpoint(work / "model_a.safetensors", "sd1", factor=8, seed=2, base=base, noise=1.0)
        model_b = synth.make_checkpoint(work / "model_b.safetensors", "sd1", factor=8, seed=3, base=base, noise=1.0)
        with open_checkpoint(model_a) as ckpt:
            arch = detect_arch(set(ckpt.keys()), ckpt.shape)
            print(f"  {arch.describe()}, {len(ckpt.keys())} tensors each, {torch.float16} weights")

        preset = "GRAD_V"
        out1 = work / "weight_sum_grad_v.safetensors"
        merge_to_file(Recipe(str(model_a), str(model_b), mode="Weight sum", weights_alpha=preset), out1,
                      overwrite=True, metadata=False)
        _report(f"1. Weight sum A x (1-w) + B x w with the block-weight preset {preset} -> {out1.name}\n"
                f"   Each block lands exactly its preset weight of the way from A to B:",
                block_shift(model_a, model_b, out1), towards_b=True)

        out2 = work / "train_difference.safetensors"
        merge_to_file(Recipe(str(model_a), str(model_b), str(base), mode="Add difference", calc="trainDifference",
                             alpha=1.0, weights_alpha="0,0,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1,1,1,1,1"),
                      out2, SaveOptions(dtype="fp16"), overwrite=True, metadata=False)
        _report(f"2. trainDifference: A + 1.8 x (B - base) x |B-A| / (|B-base| + |B-A|), alpha 1 on M00 and the OUT "
                f"blocks only -> {out2.name}\n   Only the blocks with weight 1 move:",
                block_shift(model_a, model_b, out2), towards_b=False)
        print("\nTry it on your own models:\n  python -m lib_merge merge --model-a A.safetensors --model-b "
              "B.safetensors --mode \"Weight sum\" --mbw GRAD_V --output merged.safetensors")
