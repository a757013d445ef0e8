"""Correctness of what was timed: which keys each contender saves, and how two results are compared (max abs
difference, fp16 ulps), with the exact float64 formula where one exists; also the key subsets the tasks use."""

from __future__ import annotations

from pathlib import Path


def _ulp16(x):
    """fp16 ulp at |x| (subnormal spacing below 2^-14)."""
    import torch

    e = torch.floor(torch.log2(x.abs().clamp_min(2.0**-14)))
    return torch.pow(2.0, e - 10)


def compare(test: dict, ref: dict) -> dict:
    """Over the keys both hold: max abs difference; the largest difference in fp16 ulps of the reference element
    (strict: near-zero elements have tiny ulps) and in fp16 ulps at the key's largest magnitude (its scale); the
    share of elements that differ; how many keys are bit-identical."""
    import torch

    keys = [k for k in ref if k in test and test[k].is_floating_point() and ref[k].is_floating_point()]
    worst, ulps_el, ulps_key, identical, shape_mismatch, differ, total = 0.0, 0.0, 0.0, 0, [], 0, 0
    for k in keys:
        t, r = test[k].double(), ref[k].double()
        if t.shape != r.shape:
            shape_mismatch.append(k)
            continue
        if not r.numel():
            continue
        d = (t - r).abs()
        worst = max(worst, d.max().item())
        ulps_el = max(ulps_el, (d / _ulp16(r)).max().item())
        ulps_key = max(ulps_key, (d.max() / _ulp16(r.abs().max())).item())
        differ += int((d != 0).sum())
        total += d.numel()
        identical += bool(test[k].dtype == ref[k].dtype and torch.equal(test[k], ref[k]))
    return {"keys": len(keys), "max_abs": worst, "max_ulps": ulps_el, "max_ulps_key": ulps_key,
            "differ": differ / total if total else 0.0, "identical": identical, "shape_mismatch": shape_mismatch}


def load_checks(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path)) if path and Path(path).exists() else {}


def extract_keys(path, keys, dest) -> None:
    """Copy `keys` of an output file into a small check file."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        have = set(f.keys())
        save_file({k: f.get_tensor(k).contiguous() for k in keys if k in have}, str(dest))


def formula_add_difference(paths, keys, alpha) -> dict:
    """A + α(B − C) in float64 from the inputs (the exact value both engines round)."""
    from safetensors import safe_open

    out = {}
    with safe_open(paths["A"], "pt") as fa, safe_open(paths["B"], "pt") as fb, safe_open(paths["C"], "pt") as fc:
        for k in keys:
            out[k] = fa.get_tensor(k).double() + alpha * (fb.get_tensor(k).double() - fc.get_tensor(k).double())
    return out


# -------------------------------------------------------------------------------------------- model facts
def shapes_of(path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


CHECK_PATTERNS = (
    "model.diffusion_model.time_embed.0.weight",
    ".0.in_layers.2.weight",  # a 3x3 conv in a ResBlock (4-D)
    "attn1.to_q.weight",
    "model.diffusion_model.middle_block.1.proj_in.bias",
    ".0.out_layers.3.weight",
    "mlp.fc1.weight",  # text encoder
    "first_stage_model.decoder.up.1.block.0.conv1.weight",  # VAE
    "model.diffusion_model.out.2.weight",
)


def pick_check_keys(shapes: dict) -> list[str]:
    keys = []
    for pat in CHECK_PATTERNS:
        for k, s in shapes.items():
            if pat in k and len(s) > 0 and k not in keys:
                keys.append(k)
                break
    return keys


def merge_candidates(shapes: dict) -> list[str]:
    """Keys the seed's Stage 1 merges (§2.2 filter), in A's order."""
    return [k for k in shapes if "model" in k and ("weight" in k or "bias" in k)]


def smooth_subset(shapes: dict, step: int) -> list[str]:
    """Every `step`-th key of each tensor rank (so 3x3 convs and matrices are both represented), in A's order."""
    cands = merge_candidates(shapes)
    chosen = set()
    for rank in sorted({len(shapes[k]) for k in cands}):
        chosen.update([k for k in cands if len(shapes[k]) == rank][step // 2::step])
    return [k for k in cands if k in chosen]
