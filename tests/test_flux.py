"""Flux (dev and schnell): detection from the keys, the seed's 61 blocks (§3.4) for every key of a real Flux-dev
layout, merges against float64 expectations, separate text encoder / VAE files, the CLI, and streaming memory.

The block rule is written out here independently of lib_merge.core.arch, from seed-behaviour.md §3.4.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import assert_rounded, assert_same
from safetensors.torch import load_file

from lib_merge.cli import synth
from lib_merge.cli.main import main
from lib_merge.core.arch import detect_arch
from lib_merge.core.engine import Models, merge_to_dict, plan_merge
from lib_merge.core.errors import MergeError
from lib_merge.core.recipe import Recipe
from lib_merge.io.checkpoint import DictCheckpoint, open_checkpoint

LAYOUT = Path(__file__).resolve().parents[2] / "shared" / "model_layouts" / "flux-dev.json"
LABELS = ("CLIP", "T5", "IN", *(f"D{i:02d}" for i in range(19)), *(f"S{i:02d}" for i in range(38)), "OUT")
FACTOR = 64  # Flux-dev's 16.9 B parameters / 64 per large dimension: a few MB per model
PREFIXES = {"diffuser": "model.diffusion_model.", "clip_l": "text_encoders.clip_l.transformer.",
            "t5xxl": "text_encoders.t5xxl.transformer.", "vae": "vae."}


def seed_block(key):
    """§3.4: t5xxl -> T5; text_encoders.clip -> CLIP; double_blocks.N -> DNN; single_blocks.N -> SNN; any `_in`
    -> IN; final_layer -> OUT; vae -> not merged (None)."""
    if "vae" in key:
        return None
    if "t5xxl" in key:
        return "T5"
    if "text_encoders.clip" in key:
        return "CLIP"
    if m := re.search(r"double_blocks\.(\d+)\.", key):
        return f"D{int(m.group(1)):02d}"
    if m := re.search(r"single_blocks\.(\d+)\.", key):
        return f"S{int(m.group(1)):02d}"
    if "_in" in key:
        return "IN"
    if "final_layer" in key:
        return "OUT"
    raise AssertionError(f"§3.4 gives no block for {key}")


def layout():
    return json.loads(LAYOUT.read_text())["components"]


def shapes_of(keys_shapes):
    return lambda k: tuple(keys_shapes[k])


def full_layout_keys(strip=None, component=None):
    out = {}
    for name, comp in layout().items():
        if component is not None and name != component:
            continue
        for key, spec in comp.items():
            out[key[len(PREFIXES[name]):] if strip else key] = spec["shape"]
    return out


# -- detection and block mapping over the full-size layout (headers only, nothing allocated) ------------------------


def test_every_key_of_the_full_flux_dev_layout_gets_the_seeds_block():
    keys = full_layout_keys()
    arch = detect_arch(set(keys), shapes_of(keys))
    assert (arch.family, arch.flavour, arch.describe()) == ("flux", "dev", "Flux dev")
    assert arch.blocks == LABELS and len(arch.blocks) == 61
    seen = set()
    for key in keys:
        expected = seed_block(key)
        got = arch.block_of(key)
        assert (got[1] if got else None) == expected, key
        if expected:
            seen.add(expected)
    assert seen == set(LABELS)  # every one of the 61 blocks holds keys
    assert sum(1 for k in keys if arch.block_of(k) is None) == len(layout()["vae"])


def test_schnell_is_dev_without_guidance_in():
    keys = {k: s for k, s in full_layout_keys().items() if "guidance_in" not in k}
    arch = detect_arch(set(keys), shapes_of(keys))
    assert (arch.family, arch.flavour) == ("flux", "schnell")
    assert synth.layout_shapes("flux-schnell").keys() == keys.keys()


@pytest.mark.parametrize("component,block", [("diffuser", None), ("t5xxl", "T5"), ("clip_l", "CLIP"), ("vae", None)])
def test_separate_files_with_bare_keys(component, block):
    """Black Forest Labs' diffusion model and the separately distributed CLIP-L, T5-XXL and autoencoder files."""
    bare = full_layout_keys(strip=True, component=component)
    prefixed = full_layout_keys(component=component)
    arch = detect_arch(set(bare), shapes_of(bare))
    assert arch.family == "flux"
    assert arch.flavour == ("dev" if component == "diffuser" else "")
    for (key, _), full_key in zip(bare.items(), prefixed, strict=True):
        got = arch.block_of(key)
        assert (got[1] if got else None) == (seed_block(full_key) if block is None else block), key


def test_sd_files_are_not_taken_for_flux():
    for family in ("sd1", "sdxl"):
        keys = {k: s for k, (s, _) in synth.layout_shapes(family, 16).items()}
        assert detect_arch(set(keys), shapes_of(keys)).family == family
    sd_vae = {k[len("first_stage_model."):]: s for k, (s, _) in synth.layout_shapes("sd1", 16).items()
              if k.startswith("first_stage_model.")}
    with pytest.raises(MergeError, match="not a Stable Diffusion"):
        detect_arch(set(sd_vae), shapes_of(sd_vae))


# -- merges ------------------------------------------------------------------------------------------------------


def flux_pair(family="flux-dev", dtype=torch.bfloat16, components=None):
    a = synth.make_state_dict(family, FACTOR, dtype, seed=1, components=components)
    b = synth.make_state_dict(family, FACTOR, dtype, seed=2, base=a, noise=0.5, components=components)
    return a, b


def weights61():
    return [round(0.01 * i + 0.1, 2) for i in range(61)]


@pytest.mark.parametrize("family", ["flux-dev", "flux-schnell"])
def test_mbw_merge_puts_each_block_weight_on_its_keys(family):
    a, b = flux_pair(family)
    w = weights61()
    plan, state = merge_to_dict(Recipe("A", "B", weights_alpha=",".join(map(str, w))),
                                Models(DictCheckpoint(a, "A"), DictCheckpoint(b, "B")))
    assert plan.arch.flavour == family.split("-")[1]
    merged = 0
    for key in a:
        block = seed_block(key)
        if block is None:
            assert_same(state[key], a[key], key)  # the VAE is not merged
            continue
        alpha = w[LABELS.index(block)]
        exp = (1 - alpha) * a[key].double() + alpha * b[key].double()
        assert_rounded(state[key], exp, a[key].dtype, what=key)
        merged += 1
    assert merged == plan.merged == len(a) - sum(1 for k in a if k.startswith("vae."))


@pytest.mark.parametrize("mode", ["Add difference", "Triple sum", "sum Twice"])
def test_three_model_modes_on_flux(mode):
    a, b = flux_pair()
    c = synth.make_state_dict("flux-dev", FACTOR, torch.bfloat16, seed=3, base=a, noise=0.5)
    _, state = merge_to_dict(Recipe("A", "B", "C", mode=mode, alpha=0.4, beta=0.3),
                             Models(DictCheckpoint(a, "A"), DictCheckpoint(b, "B"), DictCheckpoint(c, "C")))
    for key in a:
        if seed_block(key) is None:
            continue
        ta, tb, tc = a[key].double(), b[key].double(), c[key].double()
        exp = {"Add difference": ta + 0.4 * (tb - tc), "Triple sum": 0.3 * ta + 0.4 * tb + 0.3 * tc,
               "sum Twice": 0.7 * (0.6 * ta + 0.4 * tb) + 0.3 * tc}[mode]
        assert_rounded(state[key], exp, torch.bfloat16, what=key)


@pytest.mark.parametrize("component,label", [("t5xxl", "T5"), ("clip_l", "CLIP")])
def test_separate_text_encoder_files_merge_with_their_block_weight(component, label):
    a, b = (({k[len(PREFIXES[component]):]: v for k, v in m.items()})
            for m in flux_pair(dtype=torch.float16, components=[component]))
    w = weights61()
    plan, state = merge_to_dict(Recipe("A", "B", weights_alpha=",".join(map(str, w))),
                                Models(DictCheckpoint(a, "A"), DictCheckpoint(b, "B")))
    alpha = w[LABELS.index(label)]
    assert plan.merged == len(a)
    for key in a:
        assert_rounded(state[key], (1 - alpha) * a[key].double() + alpha * b[key].double(), torch.float16, what=key)


def test_block_weight_counts_are_checked_against_the_family():
    a, b = flux_pair(components=["diffuser"])
    models = Models(DictCheckpoint(a, "A"), DictCheckpoint(b, "B"))
    with pytest.raises(MergeError, match="this model is Flux dev and needs 61"):
        plan_merge(Recipe("A", "B", weights_alpha=",".join(["0.5"] * 26)), models)
    sd_a = synth.make_state_dict("sd1", factor=16, seed=1)
    sd = Models(DictCheckpoint(sd_a, "A"), DictCheckpoint(sd_a, "B"))
    with pytest.raises(MergeError, match="61 values, but this model is SD1"):
        plan_merge(Recipe("A", "B", weights_alpha=",".join(["0.5"] * 61)), sd)
    with pytest.raises(MergeError, match="is SD1 but model A is Flux"):
        plan_merge(Recipe("A", "B"), Models(DictCheckpoint(a, "A"), DictCheckpoint(sd_a, "B")))
    with pytest.raises(MergeError, match="Flux has none"):
        plan_merge(Recipe("A", "B", adjust="1,0,0,0,0,0,0,0"), models)


def test_elemental_and_include_exclude_use_flux_labels():
    a, b = flux_pair(components=["diffuser"])
    models = Models(DictCheckpoint(a, "A"), DictCheckpoint(b, "B"))
    plan = plan_merge(Recipe("A", "B", alpha=0.5, elemental="D03-D04:img_attn:0.9", inex="Include",
                             inex_blocks=("D00-D05",)), models)
    for job in plan.jobs:
        block = seed_block(job.key)
        if block not in {f"D{i:02d}" for i in range(6)}:
            assert job.kind == "a", job.key
        elif block in ("D03", "D04") and "img_attn" in job.key:
            assert (job.kind, job.alpha) == ("merge", 0.9), job.key
        else:
            assert (job.kind, job.alpha) == ("merge", 0.5), job.key


# -- the command line ----------------------------------------------------------------------------------------------


@pytest.fixture
def flux_files(tmp_path):
    a = synth.make_checkpoint(tmp_path / "a.safetensors", "flux-dev", FACTOR, torch.bfloat16, seed=1,
                              components=["diffuser"])
    b = synth.make_checkpoint(tmp_path / "b.safetensors", "flux-dev", FACTOR, torch.bfloat16, seed=2, base=a,
                              noise=0.5, components=["diffuser"])
    return a, b


def test_cli_merges_flux_with_61_weights_and_presets(flux_files, tmp_path, capsys):
    a, b = flux_files
    out = tmp_path / "m.safetensors"
    assert main(["merge", "--model-a", str(a), "--model-b", str(b), "--mbw", "FLUX_DOUBLE_B", "--output", str(out),
                 "--no-history", "--no-metadata", "--quiet"]) == 0
    assert "Flux dev" in capsys.readouterr().out
    ta, tb, to = load_file(a), load_file(b), load_file(out)
    for key in ta:
        expected = tb[key] if seed_block(key).startswith("D") else ta[key]  # the preset's 1s and 0s
        assert_same(to[key], expected, key)
    code = main(["merge", "--model-a", str(a), "--model-b", str(b), "--mbw", ",".join(["1"] * 26),
                 "--output", str(tmp_path / "x.safetensors"), "--no-history", "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "needs 61" in err and not (tmp_path / "x.safetensors").exists()


def test_cli_inspect_names_flux(flux_files, capsys):
    assert main(["inspect", str(flux_files[0])]) == 0
    assert "Flux dev" in capsys.readouterr().out


# -- streaming: peak memory does not grow with the model ----------------------------------------------------------

PEAK_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    from lib_merge.core.recipe import Recipe
    from lib_merge.service.pipeline import merge_to_file
    a, b, out = sys.argv[1:4]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    merge_to_file(Recipe(a, b, alpha=0.3), out, metadata=False, threads=1)
    print(json.dumps({"before": before, "after": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
""")


def _peak_kib(a, b, out):
    run = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(a), str(b), str(out)], capture_output=True,
                         text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    data = json.loads(run.stdout.strip().splitlines()[-1])
    return data["after"] - data["before"]


def test_two_model_flux_merge_memory_does_not_grow_with_the_model(tmp_path):
    """One key at a time: a model four times larger (same keys, each 4x bigger) needs no more than the extra size of
    its largest key's buffers, far from the 4x larger models (measured in subprocesses, peak RSS growth)."""
    sizes = {}
    for factor in (32, 16):
        folder = tmp_path / str(factor)
        folder.mkdir()
        a = synth.make_checkpoint(folder / "a.safetensors", "flux-dev", factor, torch.bfloat16, seed=1,
                                  components=["diffuser"])
        b = synth.make_checkpoint(folder / "b.safetensors", "flux-dev", factor, torch.bfloat16, seed=2,
                                  components=["diffuser"])
        with open_checkpoint(a) as ckpt:
            largest = max(ckpt.dtype(k).itemsize * torch.Size(ckpt.shape(k)).numel() for k in ckpt.keys())
        sizes[factor] = (a.stat().st_size, largest, _peak_kib(a, b, folder / "m.safetensors") * 1024)
    (small, _, peak_small), (big, largest_big, peak_big) = sizes[32], sizes[16]
    assert big > 3.5 * small
    # growth of the peak stays within a few of the largest key's buffers, never the models' growth
    assert peak_big - peak_small < 8 * largest_big
    assert peak_big - peak_small < (big - small) / 2
