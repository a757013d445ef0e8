"""Analysis (how similar models are) and Elements (every key with its block), library and CLI.

Expected values are computed here in float64 from the formulas (cosine of the flattened tensors in percent,
relative L2 distance ‖X−Y‖/‖X‖), with the block mapping written out in conftest, never by calling the analysis.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import sd1_block, sd1_model, sdxl_labels, xl_model
from safetensors.torch import save_file

from lib_merge.analysis import compare_models, list_elements
from lib_merge.core.errors import MergeError

ROOT = Path(__file__).resolve().parent.parent
UNET = "model.diffusion_model."
ZERO_KEY = UNET + "middle_block.1.proj_out.bias"
DROPPED_FROM_C = UNET + "output_blocks.0.0.skip_connection.bias"
RESHAPED_IN_B = UNET + "input_blocks.3.0.op.weight"


def file_order(path):
    """Keys in the order their data lies in the file (the order the checkpoint reader gives), from the raw header."""
    raw = Path(path).read_bytes()
    header = json.loads(raw[8 : 8 + struct.unpack("<Q", raw[:8])[0]])
    header.pop("__metadata__", None)
    return sorted(header, key=lambda k: header[k]["data_offsets"][0])


def save(state, path):
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def sd1_files(tmp_path_factory):
    """A (fp16, one all-zero bias), B and C fine-tunes of A; C lacks one key, B has one key of another shape."""
    folder = tmp_path_factory.mktemp("analysis")
    a = sd1_model(0, torch.float16)
    a[ZERO_KEY] = torch.zeros_like(a[ZERO_KEY])
    b = sd1_model(1, torch.float16, base=a)
    b[RESHAPED_IN_B] = b[RESHAPED_IN_B].reshape(8, 8, 9)
    c = sd1_model(2, torch.float32, base=a, noise=0.6)
    del c[DROPPED_FROM_C]
    paths = {name: save(state, folder / f"{name}.safetensors") for name, state in (("a", a), ("b", b), ("c", c))}
    xl = save(xl_model(3, torch.float16), folder / "xl.safetensors")
    return {"paths": paths, "states": {"a": a, "b": b, "c": c}, "xl": xl, "folder": folder}


def expected_group(key):
    if key.startswith("cond_stage_model."):
        return "TE"
    if key.startswith("first_stage_model."):
        return "VAE"
    return sd1_block(key)


def compared_keys(files, names):
    """The keys the analysis must compare, in A's file order: model keys of A with float values, present with A's
    shape in all."""
    states = files["states"]
    a = states[names[0]]
    out = []
    for key in file_order(files["paths"][names[0]]):
        t = a[key]
        if "model" not in key or not t.is_floating_point():
            continue
        if all(key in states[n] and states[n][key].shape == t.shape for n in names[1:]):
            out.append(key)
    return out


def cosine_and_rel(x, y):
    x, y = x.double().reshape(-1), y.double().reshape(-1)
    nx, ny = x.norm().item(), y.norm().item()
    cos = 100 * torch.dot(x, y).item() / (nx * ny) if nx > 0 and ny > 0 else math.nan
    rel = (x - y).norm().item() / nx if nx > 0 else math.nan
    return cos, rel


def close(got, want):
    if math.isnan(want):
        return math.isnan(got)
    return got == pytest.approx(want, rel=1e-5, abs=1e-4)


def test_per_key_measures_and_skipped_keys(sd1_files):
    states, paths = sd1_files["states"], sd1_files["paths"]
    result = compare_models([paths["a"], paths["b"], paths["c"]])
    keys = compared_keys(sd1_files, ["a", "b", "c"])
    assert [r.key for r in result.keys] == keys
    assert result.pairs == ("A-B", "A-C", "B-C")
    assert result.missing == [DROPPED_FROM_C]
    assert result.shape_mismatch == [RESHAPED_IN_B]
    for r in result.keys:
        assert r.group == expected_group(r.key)
        for pair, (x, y) in {"A-B": "ab", "A-C": "ac", "B-C": "bc"}.items():
            cos, rel = cosine_and_rel(states[x][r.key], states[y][r.key])
            assert close(r.pairs[pair].cosine, cos), (r.key, pair)
            assert close(r.pairs[pair].rel_l2, rel), (r.key, pair)
    zero = next(r for r in result.keys if r.key == ZERO_KEY)
    assert math.isnan(zero.pairs["A-B"].cosine) and math.isnan(zero.pairs["A-B"].rel_l2)
    assert not math.isnan(zero.pairs["B-C"].cosine)


def test_per_block_aggregates(sd1_files):
    states, paths = sd1_files["states"], sd1_files["paths"]
    result = compare_models([paths["a"], paths["b"]])
    a, b = states["a"], states["b"]
    by_group: dict[str, list[str]] = {}
    for key in compared_keys(sd1_files, ["a", "b"]):
        by_group.setdefault(expected_group(key), []).append(key)
    order = ["TE", "IN00", "IN01", "IN02", "IN03", "IN04", "IN05", "IN06", "IN07", "IN08", "IN09", "IN10", "IN11",
             "M00", *(f"OUT{i:02d}" for i in range(12)), "VAE"]
    assert [g.group for g in result.groups] == [g for g in order if g in by_group]
    for g in result.groups:
        keys = by_group[g.group]
        assert g.keys == len(keys)
        cosines = [c for c in (cosine_and_rel(a[k], b[k])[0] for k in keys) if not math.isnan(c)]
        mean = sum(cosines) / len(cosines) if cosines else math.nan
        assert close(g.mean_cosine["A-B"], mean), g.group
        assert close(g.min_cosine["A-B"], min(cosines) if cosines else math.nan), g.group
        sq_diff = sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in keys)
        sq_a = sum(float((a[k].double() ** 2).sum()) for k in keys)
        assert close(g.rel_l2["A-B"], math.sqrt(sq_diff / sq_a)), g.group
    m00 = next(g for g in result.groups if g.group == "M00")
    assert m00.keys == 3  # the zero bias is counted and in the L2 sums, but has no cosine


def test_sdxl_text_encoders_are_groups_of_their_own(sd1_files, tmp_path):
    a = xl_model(5, torch.float16)
    b = xl_model(6, torch.float16, base=a)
    result = compare_models([save(a, tmp_path / "a.safetensors"), save(b, tmp_path / "b.safetensors")])
    expected = {}
    for key, t in a.items():
        labels = sdxl_labels(key)
        if labels is None or "model" not in key or not t.is_floating_point():
            continue
        fine, block = labels
        group = {"CLIPL": "TE-L", "CLIPG": "TE-G", "VAE": "VAE"}.get(fine, block)
        expected[key] = group
    assert {r.key: r.group for r in result.keys} == expected
    assert {"TE-L", "TE-G", "VAE"} <= {g.group for g in result.groups}
    for r in result.keys:
        cos, rel = cosine_and_rel(a[r.key], b[r.key])
        assert close(r.pairs["A-B"].cosine, cos) and close(r.pairs["A-B"].rel_l2, rel), r.key


def test_identical_models_are_100_percent_and_distance_0(sd1_files):
    path = sd1_files["paths"]["c"]
    result = compare_models([path, path])
    for g in result.groups:
        assert g.mean_cosine["A-B"] == pytest.approx(100.0, abs=1e-3)
        assert g.rel_l2["A-B"] == 0.0


def test_mismatched_architectures_and_counts_are_refused(sd1_files):
    paths = sd1_files["paths"]
    with pytest.raises(MergeError, match="is SDXL but model A is SD1"):
        compare_models([paths["a"], sd1_files["xl"]])
    with pytest.raises(MergeError, match="two or three"):
        compare_models([paths["a"]])


def test_elements_list_every_key_with_block_shape_and_dtype(sd1_files):
    state = sd1_files["states"]["c"]
    elements = list_elements(sd1_files["paths"]["c"])
    order = file_order(sd1_files["paths"]["c"])
    assert [e.key for e in elements] == order
    for e in elements:
        t = state[e.key]
        assert e.shape == tuple(t.shape)
        assert e.dtype == str(t.dtype).replace("torch.", "")
        assert e.block == (sd1_block(e.key) if "model" in e.key else "")
    attn = list_elements(sd1_files["paths"]["c"], "ATTN2")
    assert [e.key for e in attn] == [k for k in order if "attn2" in k]
    assert [e.index for e in attn] == [i for i, k in enumerate(order) if "attn2" in k]
    out11 = list_elements(sd1_files["paths"]["c"], "out11")
    assert [e.key for e in out11] == [k for k in order if "model" in k and sd1_block(k) == "OUT11"]


def test_elements_give_sdxl_fine_labels(sd1_files):
    state = xl_model(3, torch.float16)
    for e in list_elements(sd1_files["xl"]):
        labels = sdxl_labels(e.key) if "model" in e.key else None
        assert (e.fine, e.block) == (labels or ("", "")), e.key
    fine = list_elements(sd1_files["xl"], "IN411")
    assert [e.key for e in fine] == [k for k in file_order(sd1_files["xl"]) if (sdxl_labels(k) or ("",))[0] == "IN411"]
    assert fine
    assert len(list_elements(sd1_files["xl"])) == len(state)


# ----------------------------------------------------------------------------------------------------------------
# the CLI


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), XDG_DATA_HOME=str(cwd / "data"))
    return subprocess.run([sys.executable, "-m", "lib_merge", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def table_row(stdout: str, first: str) -> list[str]:
    return next(line.split() for line in stdout.splitlines() if line.split()[:1] == [first])


def test_cli_analyze_prints_blocks_and_keys(sd1_files, tmp_path):
    paths, states = sd1_files["paths"], sd1_files["states"]
    before = {n: p.read_bytes() for n, p in paths.items()}
    res = run("analyze", str(paths["a"]), str(paths["b"]), "--per-key", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    a, b = states["a"], states["b"]
    keys = [k for k in compared_keys(sd1_files, ["a", "b"]) if expected_group(k) == "OUT06"]
    cos = [cosine_and_rel(a[k], b[k])[0] for k in keys]
    sq_diff = sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in keys)
    sq_a = sum(float((a[k].double() ** 2).sum()) for k in keys)
    row = table_row(res.stdout, "OUT06")
    assert row[:2] == ["OUT06", str(len(keys))]
    want = (sum(cos) / len(cos), min(cos), math.sqrt(sq_diff / sq_a))
    assert all(abs(float(got) - w) <= tol for got, w, tol in zip(row[2:5], want, (6e-4, 6e-4, 6e-5), strict=True)), row
    assert row[5] == "n/a"  # OUT06 of these models has no attn2.to_out.0.weight (test_analysis_attention covers it)
    for key in compared_keys(sd1_files, ["a", "b"]):
        row = next(line.split() for line in res.stdout.splitlines() if line.endswith("  " + key))
        c, r = cosine_and_rel(a[key], b[key])
        assert row[0] == expected_group(key)
        if math.isnan(c):
            assert row[1:3] == ["n/a", "n/a"], key
        else:  # printed to 3 and 4 decimals
            assert abs(float(row[1]) - c) <= 6e-4 and abs(float(row[2]) - r) <= 6e-5, key
    assert {n: p.read_bytes() for n, p in paths.items()} == before


def test_cli_analyze_three_models_has_three_pairs(sd1_files, tmp_path):
    paths = sd1_files["paths"]
    res = run("analyze", str(paths["a"]), str(paths["b"]), str(paths["c"]), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert len(table_row(res.stdout, "TE")) == 2 + 3 * 4  # cos mean, min, rel L2, attn2 per pair
    assert "Skipped 1 tensors missing from B or C" in res.stdout
    assert "Skipped 1 tensors of different shapes" in res.stdout


def test_cli_inspect_keys_with_filter(sd1_files, tmp_path):
    res = run("inspect", "--keys", str(sd1_files["paths"]["a"]), "--filter", "proj_out", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    keys = [k for k in file_order(sd1_files["paths"]["a"]) if "proj_out" in k]
    listed = [line.split() for line in res.stdout.splitlines()[1:-1]]
    assert [row[-1] for row in listed] == keys
    assert [row[1] for row in listed] == [sd1_block(k) for k in keys]
    assert res.stdout.splitlines()[-1] == f"{len(keys)} keys"


@pytest.mark.parametrize("args, message", [
    (("analyze", "{a}", "{missing}"), "does not exist"),
    (("analyze", "{a}", "{xl}"), "is SDXL but model A is SD1"),
    (("analyze", "{a}"), "two or three models, got 1"),
    (("analyze", "{a}", "{a}", "{a}", "{a}"), "two or three models, got 4"),
    (("analyze", "{a}", "{junk}"), ""),
    (("inspect", "--keys", "{missing}"), "does not exist"),
    (("inspect", "{a}", "--filter", "attn"), "use it with --keys"),
])
def test_cli_bad_input_is_one_line_and_exit_2(sd1_files, tmp_path, args, message):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    names = {"a": sd1_files["paths"]["a"], "xl": sd1_files["xl"], "missing": tmp_path / "none.safetensors",
             "junk": junk}
    res = run(*(arg.format(**names) for arg in args), cwd=tmp_path)
    assert res.returncode == 2
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr
