"""Random merges ("Let the Dice roll") and the 110 extended SDXL weights.

Expected values come from numpy's documented generator (`np.random.RandomState(seed).rand`, which the seed system
seeds with the weight seed) and the formulas of seed-behaviour.md §4.4, written out here; SDXL fine labels come from
conftest's independent `sdxl_labels`, and the 110-label order is spelled out from §3.3.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import SD1_LABELS, XL_LABELS, merge, sd1_block, sd1_model, sdxl_labels, xl_model
from safetensors.torch import save_file

from lib_merge.core.arch import Arch
from lib_merge.core.errors import MergeError
from lib_merge.core.random_weights import RandomSpec, apply, resolve
from lib_merge.core.recipe import Recipe
from lib_merge.core.weights import Presets

SD1, XL = Arch("sd1"), Arch("sdxl")
SEED = 1234567


def draws(seed, n=3000):
    return np.random.RandomState(seed).rand(n)


def nums(text):
    return [float(t) for t in text.split(",")]


def fine_110():
    """§3.3's list, written out."""
    def tb(prefix, n):
        return [prefix] + [f"{prefix}{i}" for i in range(n)]
    return (["CLIPL", "CLIPG", "IN0", "IN00", "IN10", "IN20", "IN30", "IN40"] + tb("IN41", 2) + ["IN50"]
            + tb("IN51", 2) + ["IN60", "IN70"] + tb("IN71", 10) + ["IN80"] + tb("IN81", 10)
            + ["MID00"] + tb("MID10", 10) + ["MID20"]
            + ["OUT00"] + tb("OUT01", 10) + ["OUT10"] + tb("OUT11", 10) + ["OUT20"] + tb("OUT21", 10) + ["OUT22"]
            + ["OUT30"] + tb("OUT31", 2) + ["OUT40"] + tb("OUT41", 2) + ["OUT50"] + tb("OUT51", 2) + ["OUT52"]
            + ["OUT60", "OUT70", "OUT80", "OUT9", "TIME", "LABEL", "VAE"])


def test_r_u_x_d_follow_the_seed_formulas():
    r = draws(SEED)
    got = resolve(RandomSpec("R"), SEED, SD1)
    assert nums(got.weights_alpha) == [round(r[i], 3) for i in range(26)] and got.weights_beta == ""
    got = resolve(RandomSpec("U", decimals=4), SEED, SD1)
    assert nums(got.weights_alpha) == [round(1.5 - 2 * r[i], 4) for i in range(26)]
    upper = [0.1 * (i % 10) + 0.2 for i in range(26)]
    got = resolve(RandomSpec("X", upper=",".join(map(str, upper)), lower="-0.5"), SEED, SD1)
    assert nums(got.weights_alpha) == [round((-0.5 - upper[i]) * r[i] + upper[i], 3) for i in range(26)]
    got = resolve(RandomSpec("D", upper="0.5", lower="0.4"), SEED, SD1)
    assert nums(got.weights_alpha) == [round(0.5 + 0.4 * (r[i] - 0.5), 3) for i in range(26)]


def test_beta_draws_at_offset_50_and_after_alpha_for_110_values():
    r = draws(SEED)
    got = resolve(RandomSpec("R", targets=("alpha", "beta")), SEED, SD1)
    assert nums(got.weights_beta) == [round(r[i + 50], 3) for i in range(26)]
    got = resolve(RandomSpec("R", targets=("alpha", "beta"), extended=True), SEED, XL)
    assert len(nums(got.weights_alpha)) == 110
    assert nums(got.weights_beta) == [round(r[i + 110], 3) for i in range(110)]  # the seed overlapped these


def test_sdxl_gets_20_values_and_26_value_limits_are_converted():
    r = draws(7)
    upper = [round(0.01 * i, 2) for i in range(26)]
    got = resolve(RandomSpec("X", upper=",".join(map(str, upper)), lower="0"), 7, XL)
    kept = [upper[i] for i in (*range(10), *range(13, 23))]  # BASE, IN00-IN08, M00, OUT00-OUT08
    assert nums(got.weights_alpha) == [round(-kept[i] * r[i] + kept[i], 3) for i in range(20)]


def test_clamps_round_and_literals_in_a_custom_template():
    r = draws(99)
    template = ["R"] * 26
    template[3], template[4] = "0.25", "U"
    got = resolve(RandomSpec("custom", template=",".join(template), clamp_upper="0.6", clamp_lower="0.2",
                             decimals=2), 99, SD1)
    want = []
    for i, t in enumerate(template):
        v = 0.25 if t == "0.25" else (1.5 - 2 * r[i] if t == "U" else r[i])
        want.append(round(min(max(v, 0.2), 0.6), 2))
    assert nums(got.weights_alpha) == want


def test_lower_limit_with_probability_uses_the_seeded_second_stream():
    r = draws(5)
    p = np.random.RandomState([5, 1]).rand(3000)  # numpy's init_by_array with the weight seed and stream 1
    got = resolve(RandomSpec("X", upper="1", lower="0.2R0.5"), 5, SD1)
    want = [round((0.2 - 1) * r[i] + 1, 3) if p[i] < 0.5 else 0.0 for i in range(26)]
    assert nums(got.weights_alpha) == want and 0 < want.count(0.0) < 26
    assert resolve(RandomSpec("X", upper="1", lower="0.2R0.5"), 5, SD1) == got  # reproducible


def test_e_modes_zero_the_block_and_add_elemental_rules_drawn_per_key():
    template = ["0.5"] * 26
    template[SD1_LABELS.index("IN04")] = "ER"
    template[SD1_LABELS.index("OUT06")] = "EX"
    template[SD1_LABELS.index("M00")] = "EU"
    spec = RandomSpec("custom", template=",".join(template), upper="0.9", lower="0.1")
    got = resolve(spec, 42, SD1)
    values = nums(got.weights_alpha)
    assert values[SD1_LABELS.index("IN04")] == values[SD1_LABELS.index("OUT06")] == 0.0
    assert sorted(got.elemental.split(",")) == sorted(["IN04::R", "M00::U", "OUT06::X[0.1 0.9]"])
    # the engine draws each key of those blocks from the same seed at key index + 100 (§4.1)
    a, b = sd1_model(0), sd1_model(1)
    recipe = apply(Recipe("A", "B"), spec, 42, SD1)
    assert recipe.seed == 42 and recipe.extra["random"]["seed"] == 42
    plan, _ = merge(a, b, **{k: getattr(recipe, k) for k in ("weights_alpha", "elemental", "seed")})
    r = draws(42, max(3000, len(a) + 101))
    checked = 0
    for job in plan.jobs:
        if job.kind != "merge":
            continue
        index = list(a).index(job.key)
        block = sd1_block(job.key)
        if block == "IN04":
            assert job.alpha == round(r[index + 100], 3), job.key
        elif block == "M00":
            assert job.alpha == round(1 - 2 * r[index + 100], 3), job.key
        elif block == "OUT06":
            assert job.alpha == round((0.1 - 0.9) * r[index + 100] + 0.9, 3), job.key
        else:
            assert job.alpha == 0.5, job.key
            continue
        checked += 1
    assert checked >= 8


def test_all_r_u_x_presets_resolve_and_x_in_block_weights_draws_between_limits():
    presets = Presets({})
    assert presets.resolve("ALL_X") == ",".join(["X"] * 26)
    r = draws(3, 3000)
    a, b = sd1_model(0), sd1_model(1)
    plan, _ = merge(a, b, weights_alpha="ALL_X", seed=3)
    by_block = {sd1_block(j.key): j.alpha for j in plan.jobs if j.kind == "merge"}
    for block, alpha in by_block.items():
        i = SD1_LABELS.index(block)
        assert alpha == round((0 - 1) * r[i] + 1, 3)
    got = resolve(RandomSpec("custom", template="ALL_U"), 3, SD1, presets)
    assert nums(got.weights_alpha) == [round(1.5 - 2 * r[i], 3) for i in range(26)]


@pytest.mark.parametrize("spec, arch, message", [
    (RandomSpec("Q"), SD1, "Random mode 'Q'"),
    (RandomSpec("custom"), SD1, "needs a template"),
    (RandomSpec("custom", template="R,U"), SD1, "template has 2 values"),
    (RandomSpec("custom", template=",".join(["R"] * 25 + ["Z"])), SD1, "'Z' is not a number"),
    (RandomSpec("X", upper="1,2"), SD1, "upper limit has 2 values"),
    (RandomSpec("X", lower="0R1.5"), SD1, "between 0 and 1"),
    (RandomSpec("R", extended=True), SD1, "SDXL only"),
    (RandomSpec("R", targets=()), SD1, "alpha and/or beta"),
    (RandomSpec("R", decimals=11), SD1, "0-10 decimals"),
])
def test_bad_specs_are_refused_with_a_message(spec, arch, message):
    with pytest.raises(MergeError, match=message):
        resolve(spec, 1, arch)


def test_seed_out_of_range_is_refused():
    with pytest.raises(MergeError, match="whole number from 0"):
        resolve(RandomSpec("R"), -1, SD1)


# -- the 110 extended SDXL weights ---------------------------------------------------------------------------


def test_110_label_order_matches_the_reference():
    from lib_merge.core.arch import BLOCKS_XL_FINE

    assert list(BLOCKS_XL_FINE) == fine_110()


def test_110_weights_set_each_sdxl_key_by_its_fine_label():
    a, b = xl_model(0), xl_model(1)
    values = [round(0.001 * (i + 1), 3) for i in range(110)]
    plan, _ = merge(a, b, weights_alpha=",".join(map(str, values)))
    labels = fine_110()
    merged = [j for j in plan.jobs if j.kind == "merge"]
    assert len(merged) >= 12
    for job in merged:
        fine, _ = sdxl_labels(job.key)
        want = values[0] if fine == "VAE" else values[labels.index(fine)]
        assert job.alpha == want, (job.key, fine)


def test_110_beta_weights_set_beta_not_alpha():
    """The seed assigned current_alpha for 110 beta values."""
    a, b, c = xl_model(0), xl_model(1), xl_model(2)
    alpha = [0.1] * 110
    beta = [round(0.002 * i, 3) for i in range(110)]
    plan, _ = merge(a, b, c, mode="sum Twice", weights_alpha=",".join(map(str, alpha)),
                    weights_beta=",".join(map(str, beta)))
    labels = fine_110()
    for job in (j for j in plan.jobs if j.kind == "merge"):
        fine, _ = sdxl_labels(job.key)
        assert job.alpha == 0.1 and job.beta == (beta[0] if fine == "VAE" else beta[labels.index(fine)])


@pytest.mark.parametrize("model", [sd1_model, None])
def test_110_weights_on_sd1_or_flux_give_a_clear_message(model):
    """The seed's #471: every SD1 merge raised ValueError: 'BASE' is not in list."""
    from lib_merge.core.weights import parse_block_weights

    if model is None:
        with pytest.raises(MergeError, match="110 values, the extended SDXL fine blocks; this model is Flux"):
            parse_block_weights(",".join(["0.5"] * 110), Arch("flux"), "alpha")
        return
    with pytest.raises(MergeError, match="110 values, the extended SDXL fine blocks; this model is SD1 and needs 26"):
        merge(model(0), model(1), weights_alpha=",".join(["0.5"] * 110))


def test_20_block_weights_still_work_for_sdxl():
    a, b = xl_model(0), xl_model(1)
    values = [round(0.01 * (i + 1), 2) for i in range(20)]
    plan, _ = merge(a, b, weights_alpha=",".join(map(str, values)))
    for job in (j for j in plan.jobs if j.kind == "merge"):
        assert job.alpha == values[XL_LABELS.index(sdxl_labels(job.key)[1])]


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "lib_merge", *args], capture_output=True, text=True, timeout=300)


def test_cli_random_merge_is_reproduced_from_its_seed_and_110_values_on_sd1_exit_2(tmp_path):
    from safetensors import safe_open

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({k: v.contiguous() for k, v in sd1_model(0).items()}, a)
    save_file({k: v.contiguous() for k, v in sd1_model(1).items()}, b)
    common = ["merge", "--model-a", str(a), "--model-b", str(b), "--random", "X", "--upper", "0.9",
              "--lower", "0.1", "--seed", "777", "--no-history", "--quiet"]
    first = _run_cli(*common, "--output", str(tmp_path / "r1.safetensors"))
    assert first.returncode == 0, first.stderr
    r = draws(777)
    want = ",".join(repr(round((0.1 - 0.9) * r[i] + 0.9, 3)) for i in range(26))
    assert f"Random weights (seed 777): alpha {want}" in first.stdout
    second = _run_cli(*common, "--output", str(tmp_path / "r2.safetensors"))
    assert second.returncode == 0, second.stderr
    with safe_open(tmp_path / "r1.safetensors", "pt") as f1, safe_open(tmp_path / "r2.safetensors", "pt") as f2:
        assert list(f1.keys()) == list(f2.keys())
        for key in f1.keys():
            assert f1.get_tensor(key).equal(f2.get_tensor(key)), key
    bad = _run_cli("merge", "--model-a", str(a), "--model-b", str(b), "--mbw", ",".join(["0.5"] * 110),
                   "--output", str(tmp_path / "bad.safetensors"), "--no-history", "--quiet")
    assert bad.returncode == 2 and "110 values" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad.safetensors").exists()
    bad = _run_cli("merge", "--model-a", str(a), "--model-b", str(b), "--random", "Q", "--output",
                   str(tmp_path / "q.safetensors"), "--no-history")
    assert bad.returncode == 2 and "Random mode 'Q'" in bad.stderr
