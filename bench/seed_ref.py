"""A re-implementation of the seed's (SuperMerger's) merge algorithm, for benchmarking and cross-checking only.

Written from the behaviour spec (shared/reference/seed-behaviour.md §2 and §3), not from the seed's code. It keeps
the seed's *way* of working, because that is what the benchmarks compare against:

- every model is read whole with ``safetensors.torch.load_file`` (B first, then C, then A);
- Add difference runs "Stage 0": B's model weight/bias tensors are replaced by ``(B.fp32 - C.fp32).to(B.dtype)``;
- Stage 1 walks A's keys with the §2.2 filter and does a per-key fp32 round trip (new tensors for every key);
- Stage 2 copies B's (or B-C's) "model" keys that A lacks into the result.

Not reproduced: Adjust, Elemental, Include/Exclude, random weights, Flux, extract/tensor/self modes, GPU. The
HEAD-only bug that makes every SD1 merge raise ``'BASE' is not in list`` (#471) is not reproduced either; this follows
the behaviour before that commit.

    python bench/seed_ref.py A.safetensors B.safetensors [C.safetensors] --mode "Add difference" --alpha 0.5 \
        --out merged.safetensors
"""

from __future__ import annotations

import argparse
import re
import time
from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

MODES = ("Weight sum", "Add difference", "Triple sum", "sum Twice")
CALCS = ("normal", "cosineA", "cosineB", "trainDifference", "smoothAdd")

BLOCKS_26 = ("BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12)))
BLOCKS_XL = ("BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9)), "VAE")
XL_MARKER = "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.weight"

_IN = re.compile(r"\.input_blocks\.(\d+)\.")
_MID = re.compile(r"\.middle_block\.(\d+)\.")
_OUT = re.compile(r"\.output_blocks\.(\d+)\.")
_XL_PART = re.compile(r"input|mid|output")


# --------------------------------------------------------------------------------------------------- block mapping
def block_sd1(key: str) -> str:
    """§3.1: the 26-block label of an SD1/SD2 key."""
    if "time_embed" in key:
        return "IN00"
    if ".out." in key:
        return "OUT11"
    m = _IN.search(key)
    if m:
        return f"IN{int(m.group(1)):02d}"
    if _MID.search(key):
        return "M00"
    m = _OUT.search(key)
    if m:
        return f"OUT{int(m.group(1)):02d}"
    return "BASE"


def block_xl(key: str) -> str | None:
    """§3.2: the 20-block label of an SDXL key; None for "Not Merge"."""
    if "weight" not in key and "bias" not in key:
        return None
    if "label_emb" in key or "time_embed" in key:
        return "IN00"
    if "conditioner.embedders.0." in key or "conditioner.embedders.1." in key or "first_stage_model" in key:
        return "BASE"
    if "model.diffusion_model.out." in key:
        return "OUT08"
    m = _XL_PART.search(key)
    if not m:
        return None
    digits = re.sub(r"\D", "", key)
    if m.group(0) == "mid":
        return "M00"
    return ("IN0" if m.group(0) == "input" else "OUT0") + digits[0]


def parse_weights(weights: str | Sequence[float] | None, xl: bool) -> list[float] | None:
    """MBW weights (BASE first). 26 values; for XL, 26 are converted to 20 (+ the 0 VAE slot) as the seed does."""
    if weights is None:
        return None
    if isinstance(weights, str):
        weights = [float(w) for w in weights.split(",")]
    w = [float(x) for x in weights]
    base, rest = w[0], w[1:]
    if len(rest) not in (25, 19):
        raise ValueError(f"weights must have 26 or 20 values, got {len(w)}")
    if xl:
        if len(rest) == 25:
            rest = rest[0:9] + rest[12:22]
        rest = rest + [0.0]
    elif len(rest) != 25:
        raise ValueError("SD1/SD2 merges need 26 weights")
    return [base, *rest]


# --------------------------------------------------------------------------------------------------- helpers
def _differs_in_dim1(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dim() == b.dim()
        and a.dim() >= 2
        and a.shape[0] == b.shape[0]
        and a.shape[2:] == b.shape[2:]
        and (a.shape[1] != b.shape[1])
    )


def _assert_inpaint(a: torch.Tensor, b: torch.Tensor) -> None:
    ca, cb = a.shape[1], b.shape[1]
    if ca == 4 and cb in (8, 9):
        raise ValueError(
            "When merging inpainting (instruct-pix2pix) model with a normal one, A must be the inpainting "
            "(pix2pix) model."
        )
    if ca == 8 and cb == 4:
        return
    assert ca == 9 and cb == 4, (ca, cb)


def _cos_columns(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.CosineSimilarity(dim=0)(a, b)


def _cos_flat(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    fa, fb = a.flatten(), b.flatten()
    return torch.dot(fa, fb) / (torch.norm(fa) * torch.norm(fb))


def cosine_range(a_sd: dict, b_sd: dict, calc: str, keys: Iterable[str] | None = None) -> tuple[float, float]:
    """The cosine modes' range pre-pass (Stage "0/2"): collect per-column similarities over the whole model with
    np.append (the array is copied at every key), drop NaNs, trim below the 1st and above the 99th percentile
    (method='midpoint'), return (smin, smax)."""
    sims = np.array([], dtype=np.float32)
    for key in a_sd if keys is None else keys:
        if "model" not in key or key not in b_sd or "first_stage_model" in key:
            continue
        a = a_sd[key].to(torch.float32)
        b = b_sd[key].to(torch.float32)
        if a.shape != b.shape or a.dim() == 0:
            continue
        if calc == "cosineA":
            simab = _cos_columns(F.normalize(a, p=2, dim=0), F.normalize(b, p=2, dim=0))
            value = simab
        else:
            simab = _cos_columns(a, b)
            value = (simab + _cos_flat(a, b)) / 2
        sims = np.append(sims, value.numpy().flatten())
    sims = sims[~np.isnan(sims)]
    lo = np.percentile(sims, 1, method="midpoint")
    hi = np.percentile(sims, 99, method="midpoint")
    sims = np.delete(sims, np.where(sims < lo))
    sims = np.delete(sims, np.where(sims > hi))
    return float(np.min(sims)), float(np.max(sims))


def _cosine_merge(a: torch.Tensor, b: torch.Tensor, alpha: float, calc: str, smin: float, smax: float):
    af, bf = a.to(torch.float32), b.to(torch.float32)
    if calc == "cosineA":
        an, bn = F.normalize(af, p=2, dim=0), F.normalize(bf, p=2, dim=0)
        simab = _cos_columns(an, bn)
        mag = _cos_flat(an, bn)
        comb = (simab + mag) / 2
        k = (comb - smin) / (smax - smin) - abs(alpha)
    else:
        simab = _cos_columns(af, bf)
        mag = _cos_flat(af, bf)
        comb = (simab + mag) / 2
        k = (comb - smin) / (smax - smin) - alpha
    k = k.clip(0, 1)
    return torch.lerp(bf, af, k).to(a.dtype)


def _train_difference(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, alpha: float) -> torch.Tensor:
    bf, cf, af = b.to(torch.float32), c.to(torch.float32), a.to(torch.float32)
    d = bf - cf
    dac = torch.abs(bf - cf)
    dab = torch.abs(bf - af)
    scale = torch.where(dac + dab != 0, dab / (dac + dab), torch.tensor(0.0))
    new = torch.sign(d) * torch.abs(scale) * torch.abs(d)
    return a + new * (alpha * 1.8)  # not cast back: fp16 A + fp32 -> fp32


def _smooth_add(a: torch.Tensor, d: torch.Tensor, alpha: float) -> torch.Tensor:
    from scipy.ndimage import gaussian_filter, median_filter

    f = median_filter(d.to(torch.float32).cpu().numpy(), size=3)
    f = gaussian_filter(f, sigma=1)
    return a + alpha * torch.from_numpy(f)  # left in fp32


# --------------------------------------------------------------------------------------------------- the merge
def seed_merge(
    path_a,
    path_b,
    path_c=None,
    mode: str = "Weight sum",
    calc: str = "normal",
    alpha: float = 0.5,
    beta: float = 0.25,
    weights: str | Sequence[float] | None = None,
    weights_beta: str | Sequence[float] | None = None,
    keys: Iterable[str] | None = None,
    log=None,
) -> dict[str, torch.Tensor]:
    """Merge the way the seed does and return the merged state dict (A's dict, updated).

    ``weights``/``weights_beta``: MBW strings or lists (26 values, BASE first); the first value is the base ratio.
    ``keys``: optional subset of keys to run Stage 1 on (the others keep A's tensors), e.g. to time smoothAdd on
    a fraction of the model. ``log``: optional callable(str) receiving stage timings.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}")
    if calc not in CALCS:
        raise ValueError(f"unknown calcmode {calc!r}")
    if calc == "trainDifference":
        mode = "Add difference"
    t0 = time.perf_counter()

    def stage(msg):
        if log:
            log(f"{time.perf_counter() - t0:8.2f} s  {msg}")

    if mode != "Weight sum" and path_c is None:
        path_c = path_a  # the seed replaces an empty C by A
    b_sd = load_file(str(path_b), device="cpu")
    xl = XL_MARKER in b_sd
    wa = parse_weights(weights, xl)
    wb = parse_weights(weights_beta, xl) if weights_beta is not None else None
    base_alpha = wa[0] if wa else alpha
    base_beta = wb[0] if wb else beta
    labels = BLOCKS_XL if xl else BLOCKS_26
    stage("loaded B")

    c_sd = None
    if mode in ("Add difference", "Triple sum", "sum Twice"):
        c_sd = load_file(str(path_c), device="cpu")
        stage("loaded C")
        if mode == "Add difference" and calc != "trainDifference":
            for key in list(b_sd):  # Stage 0: B <- B - C
                if "model" in key and ("weight" in key or "bias" in key):
                    b = b_sd[key]
                    if key in c_sd:
                        c = c_sd[key]
                        if _differs_in_dim1(b, c) and b.shape[1] > c.shape[1]:
                            b = b[:, 0:4]
                        b_sd[key] = (b.to(torch.float32) - c.to(torch.float32)).to(b.dtype)
                    else:
                        b_sd[key] = torch.zeros_like(b, dtype=torch.float16)
            c_sd = None
            stage("stage 0 (B - C)")

    a_sd = load_file(str(path_a), device="cpu")
    stage("loaded A")

    subset = None if keys is None else set(keys)
    smin = smax = 0.0
    if calc in ("cosineA", "cosineB"):
        smin, smax = cosine_range(a_sd, b_sd, calc, None if subset is None else [k for k in a_sd if k in subset])
        stage(f"cosine range [{smin:.4f}, {smax:.4f}]")

    for key in list(a_sd):  # Stage 1
        if subset is not None and key not in subset:
            continue
        if "model" not in key or key not in b_sd:
            continue
        if "weight" not in key and "bias" not in key:
            continue
        if c_sd is not None and key not in c_sd:
            continue
        block = block_xl(key) if xl else block_sd1(key)
        if block is None:
            continue
        if calc in ("cosineA", "cosineB") and "first_stage_model" in key:
            continue
        if calc == "trainDifference" and torch.allclose(b_sd[key], c_sd[key], rtol=0, atol=0):
            c_sd[key] = a_sd[key]
            continue
        idx = labels.index(block)
        cur_alpha = base_alpha if idx == 0 or wa is None else wa[idx]
        cur_beta = base_beta if idx == 0 or wb is None else wb[idx]
        a, b = a_sd[key], b_sd[key]

        if calc == "normal":
            target = a
            inpaint = _differs_in_dim1(a, b)
            if inpaint:
                _assert_inpaint(a, b)
                target = a[:, 0:4]
            if mode == "Weight sum":
                if cur_alpha == 1:
                    result = b
                elif cur_alpha == 0:
                    continue
                else:
                    result = torch.lerp(target.to(torch.float32), b.to(torch.float32), cur_alpha).to(target.dtype)
            elif mode == "Add difference":
                result = torch.lerp(target, target + cur_alpha * b, 1.0)
            elif mode == "Triple sum":
                c = c_sd[key]
                s = cur_alpha + cur_beta
                if s == 0:
                    result = (1 - cur_alpha - cur_beta) * target + cur_alpha * b + cur_beta * c
                else:
                    result = torch.lerp(target, torch.lerp(b, c, cur_beta / s), s)
            else:  # sum Twice
                c = c_sd[key]
                result = torch.lerp(
                    torch.lerp(target.to(torch.float32), b.to(torch.float32), cur_alpha), c.to(torch.float32), cur_beta
                ).to(target.dtype)
            if inpaint:
                a[:, 0:4] = result
                result = a
        elif calc in ("cosineA", "cosineB"):
            result = _cosine_merge(a, b, cur_alpha, calc, smin, smax)
        elif calc == "trainDifference":
            result = _train_difference(a, b, c_sd[key], cur_alpha)
        else:  # smoothAdd: b is B - C here (in Weight sum mode it is B itself, as in the seed)
            result = _smooth_add(a, b, cur_alpha)
        a_sd[key] = result
    stage("stage 1")

    for key, value in b_sd.items():  # Stage 2
        if "model" in key and key not in a_sd and not key.endswith("embeddings.position_ids"):
            a_sd[key] = value
    stage("stage 2")
    return a_sd


def seed_save(state: dict[str, torch.Tensor], path, fp16: bool = False, metadata: dict | None = None) -> None:
    """The seed's save path (§6.3) without naming: XL drops cond_stage_model aliases; fp16 halves fp32/fp64/bf16
    "model" tensors; every tensor made contiguous; safetensors.torch.save_file."""
    xl = XL_MARKER in state
    out = {}
    for key, t in state.items():
        if xl and key.startswith("cond_stage_model."):
            continue
        if fp16 and "model" in key and t.dtype in (torch.float32, torch.float64, torch.bfloat16):
            t = t.half()
        out[key] = t.contiguous()
    save_file(out, str(path), metadata={"format": "pt", **(metadata or {})})


def main(argv=None):
    ap = argparse.ArgumentParser(description="The seed's merge, re-implemented for benchmarks.")
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("c", nargs="?")
    ap.add_argument("--mode", default="Weight sum", choices=MODES)
    ap.add_argument("--calc", default="normal", choices=CALCS)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--beta", type=float, default=0.25)
    ap.add_argument("--weights", default=None, help="26 comma-separated MBW weights, BASE first")
    ap.add_argument("--fraction", type=float, default=None, help="run Stage 1 on every n-th key only")
    ap.add_argument("--out", default=None)
    ap.add_argument("--fp16", action="store_true")
    args = ap.parse_args(argv)
    keys = None
    if args.fraction:
        from safetensors import safe_open

        with safe_open(args.a, framework="pt") as f:
            all_keys = list(f.keys())
        step = max(1, round(1 / args.fraction))
        keys = all_keys[::step]
    t = time.perf_counter()
    sd = seed_merge(
        args.a, args.b, args.c, args.mode, args.calc, args.alpha, args.beta, args.weights, keys=keys, log=print
    )
    t_merge = time.perf_counter() - t
    print(f"merge: {t_merge:.2f} s")
    if args.out:
        t = time.perf_counter()
        seed_save(sd, args.out, fp16=args.fp16)
        print(f"save: {time.perf_counter() - t:.2f} s")


if __name__ == "__main__":
    main()
