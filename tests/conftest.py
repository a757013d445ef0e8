"""Shared test helpers: an in-memory checkpoint source, hand-built state dicts with real key names, the spec's block
mapping written out independently of lib_merge.core.arch, and dtype-aware comparisons against float64 expectations.

Nothing here calls the merge kernels: expectations in the tests are computed by hand from
/work/shared/reference/seed-behaviour.md, and these helpers only build inputs and compare.
"""

from __future__ import annotations

import re

import torch

from lib_merge.core.engine import Models, merge_to_dict
from lib_merge.core.recipe import Recipe

UNET = "model.diffusion_model."
SD1_TOKEN = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
SD1_POS = "cond_stage_model.transformer.text_model.embeddings.position_ids"
XL_MARKER = "conditioner.embedders.1.model.ln_final.weight"
CONV_IN = UNET + "input_blocks.0.0.weight"
ADJUST_KEYS = (
    UNET + "input_blocks.0.0.weight",
    UNET + "input_blocks.0.0.bias",
    UNET + "out.0.weight",
    UNET + "out.0.bias",
    UNET + "out.2.weight",
    UNET + "out.2.bias",
)
SD1_LABELS = ("BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12)))
XL_LABELS = ("BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9)))


class MemorySource:
    """The engine's source protocol over a plain dict. `get` hands out the stored tensor itself (no copy), so a
    merge that wrote into its inputs would be caught by the tests that compare inputs before and after."""

    def __init__(self, mapping, name="memory"):
        self.name = name
        self._tensors = dict(mapping)

    def keys(self):
        return list(self._tensors)

    def __contains__(self, key):
        return key in self._tensors

    def shape(self, key):
        return tuple(self._tensors[key].shape)

    def dtype(self, key):
        return self._tensors[key].dtype

    def get(self, key, out=None):
        return self._tensors[key]

    def get_span(self, key, start, stop, out=None):
        return self._tensors[key].reshape(-1)[start:stop]


def merge(a, b=None, c=None, clone=True, **recipe):
    """Run a merge of plain dicts; returns (plan, state).

    By default the engine gets copies of the inputs, so a math test's expectation (computed from the caller's
    dicts) cannot be spoiled by an engine that writes into its inputs; the tests of input immutability pass
    clone=False.
    """
    if clone:
        a, b, c = (clone_all(m) if m is not None else None for m in (a, b, c))
    recipe.setdefault("model_b", "B" if b is not None else "")
    recipe.setdefault("model_c", "C" if c is not None else "")
    r = Recipe("A", **recipe)
    models = Models(
        MemorySource(a, "A"),
        MemorySource(b, "B") if b is not None else None,
        MemorySource(c, "C") if c is not None else None,
    )
    return merge_to_dict(r, models)


# --------------------------------------------------------------------------------------------------------------
# inputs


def randn(shape, seed, dtype=torch.float32, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift).to(dtype)


# key -> shape for a small SD1 model (real key names; values are random)
SD1_SHAPES = {
    SD1_TOKEN: (16, 8),
    SD1_POS: (1, 77),
    "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": (8, 8),
    "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.out_proj.bias": (8,),
    "cond_stage_model.transformer.text_model.final_layer_norm.weight": (8,),
    UNET + "time_embed.0.weight": (16, 8),
    UNET + "time_embed.0.bias": (16,),
    UNET + "input_blocks.0.0.weight": (8, 4, 3, 3),
    UNET + "input_blocks.0.0.bias": (8,),
    UNET + "input_blocks.3.0.op.weight": (8, 8, 3, 3),
    UNET + "input_blocks.4.1.norm.weight": (8,),
    UNET + "input_blocks.4.1.proj_in.weight": (8, 8),
    UNET + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight": (8, 8),
    UNET + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (8, 8),
    UNET + "input_blocks.4.1.transformer_blocks.0.attn1.to_out.0.weight": (8, 8),
    UNET + "input_blocks.5.0.in_layers.2.weight": (8, 8, 3, 3),
    UNET + "input_blocks.11.0.out_layers.3.bias": (8,),
    UNET + "middle_block.1.proj_out.weight": (8, 8),
    UNET + "middle_block.1.proj_out.bias": (8,),
    UNET + "middle_block.2.emb_layers.1.weight": (8, 16),
    UNET + "output_blocks.0.0.skip_connection.bias": (8,),
    UNET + "output_blocks.2.1.conv.weight": (8, 8, 3, 3),
    UNET + "output_blocks.6.1.transformer_blocks.0.attn1.to_q.weight": (8, 8),
    UNET + "output_blocks.6.1.transformer_blocks.0.attn2.to_k.weight": (8, 8),
    UNET + "output_blocks.6.1.transformer_blocks.0.ff.net.2.bias": (8,),
    UNET + "out.0.weight": (8,),
    UNET + "out.0.bias": (8,),
    UNET + "out.2.weight": (4, 8, 3, 3),
    UNET + "out.2.bias": (4,),
    "first_stage_model.decoder.conv_in.weight": (8, 4, 3, 3),
    "first_stage_model.encoder.norm_out.bias": (8,),
    "alphas_cumprod": (10,),
}


def sd1_model(seed=0, dtype=torch.float32, base=None, noise=0.3, shapes=None):
    """A small SD1 state dict. With `base`, every float tensor is base + noise*N(0,1) (a "fine-tune"); position_ids
    stays arange(77) and alphas_cumprod stays fp32. Keys are in SD1_SHAPES order."""
    out = {}
    for i, (key, shape) in enumerate((shapes or SD1_SHAPES).items()):
        if key.endswith("position_ids"):
            out[key] = torch.arange(77, dtype=torch.int64).reshape(1, 77)
            continue
        dt = torch.float32 if "model" not in key else dtype
        fresh = randn(shape, seed * 1000 + i, torch.float64)
        if base is None:
            out[key] = fresh.to(dt)
        else:
            out[key] = (base[key].double() + noise * fresh).to(dt)
    return out


def xl_model(seed=0, dtype=torch.float32, base=None, noise=0.3):
    """A small SDXL state dict (real SDXL key names)."""
    shapes = {
        XL_MARKER: (8,),
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (16, 8),
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids": (1, 77),
        "conditioner.embedders.1.model.text_projection": (8, 8),
        "conditioner.embedders.1.model.positional_embedding": (77, 8),
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": (24, 8),
        UNET + "label_emb.0.0.weight": (16, 8),
        UNET + "time_embed.0.weight": (16, 8),
        UNET + "input_blocks.0.0.weight": (8, 4, 3, 3),
        UNET + "input_blocks.0.0.bias": (8,),
        UNET + "input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight": (8, 8),
        UNET + "middle_block.1.proj_in.weight": (8, 8),
        UNET + "output_blocks.0.1.proj_in.weight": (8, 8),
        UNET + "output_blocks.1.0.in_layers.2.weight": (8, 8, 3, 3),
        UNET + "output_blocks.5.1.transformer_blocks.0.attn2.to_k.weight": (8, 8),
        UNET + "out.0.weight": (8,),
        UNET + "out.0.bias": (8,),
        UNET + "out.2.weight": (4, 8, 3, 3),
        UNET + "out.2.bias": (4,),
        "first_stage_model.decoder.conv_in.weight": (8, 4, 3, 3),
    }
    return sd1_model(seed, dtype, base, noise, shapes)


def synth_family(folder, family="sd1", factor=16):
    """Tiny checkpoint files a, b, c in `folder`: B and C are fine-tunes of A (A plus noise), as real models are."""
    from lib_merge.cli import synth

    a = synth.make_checkpoint(folder / "a.safetensors", family, factor=factor, seed=1)
    b = synth.make_checkpoint(folder / "b.safetensors", family, factor=factor, seed=2, base=a, noise=0.5)
    c = synth.make_checkpoint(folder / "c.safetensors", family, factor=factor, seed=3, base=a, noise=0.5)
    return a, b, c


def clone_all(state):
    return {k: v.clone() for k, v in state.items()}


def assert_unchanged(before, after):
    assert list(before) == list(after)
    for key in before:
        assert after[key].dtype == before[key].dtype, key
        assert torch.equal(after[key], before[key]), f"input tensor {key} was modified"


# --------------------------------------------------------------------------------------------------------------
# the spec's selection rule (§2.2) and block mapping (§3.1, §3.2), written out independently


def has_weight_or_bias(key):
    return "weight" in key or "bias" in key


def selected(key, b, c=None):
    """§2.2 for normal mode: contains 'model', present in B (and C when used), and is a weight or bias."""
    return "model" in key and key in b and (c is None or key in c) and has_weight_or_bias(key)


def sd1_block(key):
    """§3.1."""
    if "time_embed" in key:
        return "IN00"
    if ".out." in key:
        return "OUT11"
    if m := re.search(r"\.input_blocks\.(\d+)\.", key):
        return f"IN{int(m.group(1)):02d}"
    if re.search(r"\.middle_block\.(\d+)\.", key):
        return "M00"
    if m := re.search(r"\.output_blocks\.(\d+)\.", key):
        return f"OUT{int(m.group(1)):02d}"
    return "BASE"


def sdxl_labels(key):
    """§3.2: (fine label, 20-block label), or None for "Not Merge"."""
    if not has_weight_or_bias(key):
        return None
    if "label_emb" in key:
        return "LABEL", "IN00"
    if "time_embed" in key:
        return "TIME", "IN00"
    if "conditioner.embedders.0." in key:
        return "CLIPL", "BASE"
    if "conditioner.embedders.1." in key:
        return "CLIPG", "BASE"
    if "first_stage_model" in key:
        return "VAE", "BASE"
    if "model.diffusion_model" not in key:
        return None
    if "model.diffusion_model.out." in key:
        return "OUT9", "OUT08"
    part = re.findall(r"input|mid|output", key)[0].upper().replace("PUT", "")
    digits = re.sub(r"\D", "", key)
    nums = digits[:1] + "0" if part == "MID" else digits[:2]
    tb = re.findall(r"transformer_blocks\.(\d+)\.", key)
    fine = part + nums + (tb[0] if tb else "")
    return fine, ("M00" if part == "MID" else f"{part}0{nums[0]}")


# --------------------------------------------------------------------------------------------------------------
# comparisons

_FORMATS = {torch.float16: (10, -14), torch.bfloat16: (7, -126), torch.float32: (23, -126), torch.float64: (52, -1022),
            torch.float8_e4m3fn: (3, -6), torch.float8_e5m2: (2, -14)}


def ulp(x, dtype):
    """Spacing of `dtype` numbers at the magnitude of each element of the float64 tensor `x`."""
    bits, emin = _FORMATS[dtype]
    _, e = torch.frexp(x.double())
    exp = torch.clamp(e.to(torch.int64) - 1, min=emin) - bits
    return torch.pow(torch.tensor(2.0, dtype=torch.float64), exp.double())


def assert_rounded(out, expected, dtype, ulps=None, atol=1e-6, what=""):
    """`out` has `dtype` and lies within `ulps` units in the last place (of `dtype`) of the float64 `expected`.

    One ulp is what rounding an exact result once into `dtype` may cost (half an ulp) plus the fp32 working
    precision; `atol` covers fp32 cancellation where the result is much smaller than its terms. fp32 outputs get a
    few ulps since several fp32 operations are chained.
    """
    assert out.dtype == dtype, f"{what}: dtype {out.dtype}, expected {dtype}"
    assert tuple(out.shape) == tuple(expected.shape), f"{what}: shape {tuple(out.shape)} != {tuple(expected.shape)}"
    if ulps is None:
        ulps = 8 if dtype == torch.float32 else 1
    exp = expected.double()
    err = (out.double() - exp).abs()
    tol = ulps * ulp(exp, dtype) + atol
    bad = err > tol
    if bad.any():
        i = int(torch.argmax((err - tol).reshape(-1)))
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {bad.numel()} elements off by more than {ulps} ulp; worst: got "
            f"{out.double().reshape(-1)[i].item()!r}, expected {exp.reshape(-1)[i].item()!r}"
        )


def assert_same(out, ref, what=""):
    """Bit-exact equality, dtype included."""
    assert out.dtype == ref.dtype, f"{what}: dtype {out.dtype} != {ref.dtype}"
    assert torch.equal(out, ref), f"{what}: values differ"
