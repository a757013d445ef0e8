"""Generate the full-size synthetic benchmark checkpoints into bench/cache/ (idempotent: existing files are kept).

    python bench/make_models.py                 # SD1.5 A/B/C, fp16
    python bench/make_models.py sdxl            # SDXL A/B/C, fp16 (about 6.9 GB each)
    python bench/make_models.py sd1 --factor 8  # smaller variants, e.g. for quick runs

A is fresh (seed 0); B and C are A plus 0.1 * N(0, 0.02) noise with seeds 1 and 2, like two fine-tunes of one base.
Each file is streamed key by key (B and C read A's tensors from A's file), so memory stays at a few hundred MB.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lib_merge.cli import synth  # noqa: E402

CACHE = ROOT / "bench" / "cache"
NOISE = 0.1
SEEDS = {"A": 0, "B": 1, "C": 2}


def model_path(family: str, which: str, factor: int = 1, cache: Path = CACHE) -> Path:
    """Path of a benchmark model, e.g. bench/cache/sd1_A.safetensors (factor 1) or sd1_f8_A.safetensors."""
    tag = family if factor == 1 else f"{family}_f{factor}"
    return cache / f"{tag}_{which}.safetensors"


def make_models(family: str = "sd1", factor: int = 1, cache: Path = CACHE, verbose: bool = True) -> dict[str, Path]:
    cache.mkdir(parents=True, exist_ok=True)
    paths = {w: model_path(family, w, factor, cache) for w in SEEDS}
    need = sum(n * dt.itemsize for n, dt in _sizes(family, factor))
    missing = [w for w, p in paths.items() if not p.exists()]
    free = shutil.disk_usage(cache).free
    if missing and free < need * len(missing) * 1.1:
        raise SystemExit(f"not enough disk space: need {need * len(missing) / 1e9:.1f} GB, {free / 1e9:.1f} GB free")
    for which, path in paths.items():
        if path.exists():
            if verbose:
                print(f"{path.name}: exists ({path.stat().st_size / 1e9:.2f} GB), kept")
            continue
        t0 = time.perf_counter()
        base = None if which == "A" else paths["A"]
        synth.make_checkpoint(
            path,
            family,
            factor=factor,
            dtype=torch.float16,
            seed=SEEDS[which],
            base=base,
            noise=NOISE if base is not None else 0.0,
            metadata={"synthetic": f"block-merger bench {family} {which} factor {factor}"},
        )
        if verbose:
            dt = time.perf_counter() - t0
            print(f"{path.name}: generated in {dt:.1f} s, {path.stat().st_size / 1e9:.3f} GB")
    return paths


def _sizes(family, factor):
    for shape, dt in synth.layout_shapes(family, factor).values():
        n = 1
        for d in shape:
            n *= d
        yield n, dt


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("families", nargs="*", default=["sd1"], choices=["sd1", "sdxl"])
    ap.add_argument("--factor", type=int, default=1)
    args = ap.parse_args(argv)
    for family in args.families:
        make_models(family, args.factor)


if __name__ == "__main__":
    main()
