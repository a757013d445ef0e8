"""The seed's two other analysis measures, ASimilarity (an attention probe per U-Net transformer block) and the
"attn2" block method, and the analysis saved as CSV (library, CLI and the Analysis sub-tab's handler).

Expected values are computed here in float64 with numpy from the definitions in seed-lora-analysis.md §3.1 (the
probe's X drawn from torch's generator seeded 2244096, block by block, as the seed draws it), the probed blocks and
block labels written out here, never by calling the analysis.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import sd1_block, sdxl_labels, synth_family
from safetensors.torch import load_file, save_file

from lib_merge.analysis.similarity import compare_models
from lib_merge.analysis.table_csv import save_csv
from lib_merge.core.errors import MergeCancelled, MergeError

ROOT = Path(__file__).resolve().parent.parent
UNET = "model.diffusion_model."
SD_PROBED = ["input_blocks.1.1", "input_blocks.2.1", "input_blocks.4.1", "input_blocks.5.1", "input_blocks.7.1",
             "input_blocks.8.1", "middle_block.1"] + [f"output_blocks.{i}.1" for i in range(3, 12)]
XL_PROBED = ["input_blocks.4.1", "input_blocks.5.1", "input_blocks.7.1", "input_blocks.8.1", "middle_block.1"] + [
    f"output_blocks.{i}.1" for i in range(6)]


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    folder = tmp_path_factory.mktemp("asim_sd1")
    synth_family(folder)
    return folder


@pytest.fixture(scope="module")
def xl(tmp_path_factory):
    folder = tmp_path_factory.mktemp("asim_xl")
    synth_family(folder, "sdxl", factor=32)
    return folder


def states(folder, names):
    return [load_file(str(folder / f"{n}.safetensors")) for n in names]


def probe_out(x, wq, wk, wv):
    q, k, v = x @ wq.T, x @ wk.T, x @ wv.T
    s = q @ k.T
    e = np.exp(s - s.max(axis=1, keepdims=True))
    p = e / e.sum(axis=1, keepdims=True)
    return p * v.sum(axis=0)[None, :]  # out[i,k] = P[i,k] * sum_j V[j,k]


def row_cosine_mean(a, b):
    cos = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return 100.0 * float(cos.mean())


def expected_asim(models, blocks):
    """block path -> [similarity % of each pair (i, j)], drawing X block by block from one generator."""
    gen = torch.Generator().manual_seed(2244096)
    out = {}
    for block in blocks:
        keys = [f"{UNET}{block}.transformer_blocks.0.attn1.to_{w}.weight" for w in "qkv"]
        if not all(k in m for m in models for k in keys):
            continue
        width = models[0][keys[0]].shape[0]
        x = torch.randn(width, width, generator=gen).double().numpy()
        outs = [probe_out(x, *(m[k].double().numpy() for k in keys)) for m in models]
        out[block] = [row_cosine_mean(outs[i], outs[j]) for i in range(len(outs)) for j in range(i + 1, len(outs))]
    return out


def cosine(x, y):
    x, y = x.double().flatten(), y.double().flatten()
    return 100.0 * float(x @ y) / math.sqrt(float(x @ x) * float(y @ y))


def test_asimilarity_per_block_equals_the_float64_probe_sd1(sd1):
    models = states(sd1, "abc")
    result = compare_models([sd1 / "a.safetensors", sd1 / "b.safetensors", sd1 / "c.safetensors"], attention=True)
    want = expected_asim(models, SD_PROBED)
    assert len(want) == 16
    by_group = {g.group: g for g in result.groups}
    got_blocks = {g.group for g in result.groups if not math.isnan(g.asimilarity["A-B"])}
    assert got_blocks == {sd1_block(f"{UNET}{b}.x") for b in SD_PROBED}
    for block, values in want.items():
        g = by_group[sd1_block(f"{UNET}{block}.x")]
        for pair, value in zip(("A-B", "A-C", "B-C"), values, strict=True):
            assert g.asimilarity[pair] == pytest.approx(value, rel=1e-9, abs=1e-9), (block, pair)
    # blocks without a transformer block have no ASimilarity; the probe reads the models' own values
    assert math.isnan(by_group["IN00"].asimilarity["A-B"]) and result.attention.skipped == []
    assert 0 < by_group["OUT11"].asimilarity["A-C"] < 100
    # the same model twice is 100% alike
    same = compare_models([sd1 / "a.safetensors", sd1 / "a.safetensors"], attention=True)
    assert all(g.asimilarity["A-B"] == pytest.approx(100.0) for g in same.groups if not math.isnan(
        g.asimilarity["A-B"]))


def test_asimilarity_works_on_sdxl_at_its_transformer_blocks(xl):
    models = states(xl, "ab")
    result = compare_models([xl / "a.safetensors", xl / "b.safetensors"], attention=True)
    want = expected_asim(models, XL_PROBED)
    assert len(want) == len(XL_PROBED)
    by_group = {g.group: g for g in result.groups}
    labels = {sdxl_labels(f"{UNET}{b}.transformer_blocks.0.attn1.to_q.weight")[1]: v for b, v in want.items()}
    assert sorted(labels) == ["IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04",
                              "OUT05"]
    for label, (value,) in labels.items():
        assert by_group[label].asimilarity["A-B"] == pytest.approx(value, rel=1e-9, abs=1e-9), label
    assert {g.group for g in result.groups if not math.isnan(g.asimilarity["A-B"])} == set(labels)


def test_asimilarity_skips_and_names_a_block_a_model_lacks(sd1, tmp_path):
    b = load_file(str(sd1 / "b.safetensors"))
    gone = f"{UNET}input_blocks.4.1.transformer_blocks.0.attn1.to_k.weight"
    del b[gone]
    save_file(b, str(tmp_path / "b.safetensors"))
    models = [load_file(str(sd1 / "a.safetensors")), b]
    result = compare_models([sd1 / "a.safetensors", tmp_path / "b.safetensors"], attention=True)
    assert result.attention.skipped == ["input_blocks.4.1"]
    want = expected_asim(models, SD_PROBED)
    assert "input_blocks.4.1" not in want
    by_group = {g.group: g for g in result.groups}
    assert math.isnan(by_group["IN04"].asimilarity["A-B"])
    for block, (value,) in want.items():
        assert by_group[sd1_block(f"{UNET}{block}.x")].asimilarity["A-B"] == pytest.approx(value, rel=1e-9)


def test_without_asimilarity_nothing_is_probed_and_progress_counts_the_probes(sd1):
    paths = [sd1 / "a.safetensors", sd1 / "b.safetensors"]
    plain = compare_models(paths)
    assert plain.attention is None and all(math.isnan(g.asimilarity["A-B"]) for g in plain.groups)
    seen = []
    compare_models(paths, progress=lambda done, total: seen.append((done, total)), attention=True)
    keys = len(load_file(str(paths[0])))
    assert seen == [(i, keys + 16) for i in range(keys + 16)]
    asked = []

    def cancel():
        asked.append(1)
        return len(asked) > keys + 2  # past every key, inside the probes

    with pytest.raises(MergeCancelled, match="ASimilarity probe of input_blocks.4.1"):
        compare_models(paths, cancel=cancel, attention=True)


def test_attn2_is_the_cross_attention_output_cosine_of_each_block(sd1, xl):
    a, b = states(sd1, "ab")
    result = compare_models([sd1 / "a.safetensors", sd1 / "b.safetensors"])
    want: dict[str, list[float]] = {}
    for key in a:
        if key.endswith("attn2.to_out.0.weight"):
            want.setdefault(sd1_block(key), []).append(cosine(a[key], b[key]))
    assert all(len(v) == 1 for v in want.values())  # SD1: one per block, the seed's value
    for g in result.groups:
        if g.group in want:
            assert g.attn2_cosine["A-B"] == pytest.approx(want[g.group][0], rel=1e-9)
        else:
            assert math.isnan(g.attn2_cosine["A-B"]), g.group
    a, b = states(xl, "ab")
    result = compare_models([xl / "a.safetensors", xl / "b.safetensors"])
    want = {}
    for key in a:
        if key.endswith("attn2.to_out.0.weight"):
            want.setdefault(sdxl_labels(key)[1], []).append(cosine(a[key], b[key]))
    assert max(len(v) for v in want.values()) > 1  # SDXL blocks hold several transformer blocks: their mean
    got = {g.group: g.attn2_cosine["A-B"] for g in result.groups if not math.isnan(g.attn2_cosine["A-B"])}
    assert got.keys() == want.keys()
    for label, values in want.items():
        assert got[label] == pytest.approx(sum(values) / len(values), rel=1e-9), label


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def number(cell):
    return math.nan if cell == "" else float(cell)


def check_table(rows, folder, names, asim):
    """Every number of a saved table against float64 values computed here."""
    models = states(folder, names)
    pairs = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))]
    pair_names = [f"{'ABC'[i]}-{'ABC'[j]}" for i, j in pairs]
    measures = ["cosine %", "min cosine %", "attn2 cosine %", "ASimilarity %", "relative L2"]
    assert rows[0] == ["level", "block", "key", "keys", *(f"{p} {m}" for p in pair_names for m in measures)]
    a = models[0]
    compared = [k for k in a if "model" in k and a[k].is_floating_point()]
    key_rows = [r for r in rows[1:] if r[0] == "key"]
    assert sorted(r[2] for r in key_rows) == sorted(compared)
    blocks: dict[str, list[str]] = {}
    for row in key_rows:
        key = row[2]
        blocks.setdefault(row[1], []).append(key)
        for n, (i, j) in enumerate(pairs):
            x, y = models[i][key].double().flatten(), models[j][key].double().flatten()
            cells = row[4 + 5 * n: 9 + 5 * n]
            assert number(cells[0]) == pytest.approx(cosine(x, y), rel=1e-9), key
            assert cells[1:4] == ["", "", ""]
            assert number(cells[4]) == pytest.approx(math.sqrt(float((x - y) @ (x - y)) / float(x @ x)), rel=1e-9)
    probe = expected_asim(models, SD_PROBED) if asim else {}
    probe = {sd1_block(f"{UNET}{b}.x"): v for b, v in probe.items()}
    block_rows = [r for r in rows[1:] if r[0] == "block"]
    assert sorted(r[1] for r in block_rows) == sorted(blocks)
    for row in block_rows:
        keys = blocks[row[1]]
        assert row[2] == "" and int(row[3]) == len(keys)
        for n, (i, j) in enumerate(pairs):
            cosines = [cosine(models[i][k], models[j][k]) for k in keys]
            attn2 = [cosine(models[i][k], models[j][k]) for k in keys if k.endswith("attn2.to_out.0.weight")]
            cells = [number(c) for c in row[4 + 5 * n: 9 + 5 * n]]
            assert cells[0] == pytest.approx(sum(cosines) / len(cosines), rel=1e-9)
            assert cells[1] == pytest.approx(min(cosines), rel=1e-9)
            assert (math.isnan(cells[2]) and not attn2) or cells[2] == pytest.approx(attn2[0], rel=1e-9)
            if row[1] in probe:
                assert cells[3] == pytest.approx(probe[row[1]][n], rel=1e-9)
            else:
                assert math.isnan(cells[3])
            sq_diff = sum(float(((models[i][k].double() - models[j][k].double()) ** 2).sum()) for k in keys)
            sq = sum(float((models[i][k].double() ** 2).sum()) for k in keys)
            assert cells[4] == pytest.approx(math.sqrt(sq_diff / sq), rel=1e-9)


def test_saved_csv_holds_every_number_and_is_written_atomically(sd1, tmp_path):
    result = compare_models([sd1 / "a.safetensors", sd1 / "b.safetensors", sd1 / "c.safetensors"], attention=True)
    out = tmp_path / "table.csv"
    assert save_csv(result, out) == out
    check_table(read_csv(out), sd1, "abc", asim=True)
    out.write_text("mine")
    with pytest.raises(MergeError, match="exists"):
        save_csv(result, out)
    assert out.read_text() == "mine"
    save_csv(result, out, overwrite=True)
    assert read_csv(out)[0][0] == "level"
    before = (sd1 / "a.safetensors").read_bytes()
    with pytest.raises(MergeError):
        save_csv(result, sd1 / "a.safetensors", overwrite=True)  # never over a compared model
    assert (sd1 / "a.safetensors").read_bytes() == before
    with pytest.raises(MergeError, match="does not exist"):
        save_csv(result, tmp_path / "nothere" / "t.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]  # no temporary file left


def run(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "lib_merge", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_cli_analyze_asimilarity_and_csv(sd1, tmp_path):
    a, b = str(sd1 / "a.safetensors"), str(sd1 / "b.safetensors")
    out = tmp_path / "t.csv"
    res = run("analyze", a, b, "--asimilarity", "--csv", str(out), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "ASimilarity: 16 transformer blocks probed" in res.stdout and f"Saved the table to {out}" in res.stdout
    head = next(line for line in res.stdout.splitlines() if line.startswith("group"))
    assert "attn2%" in head and "ASim%" in head
    probe = {sd1_block(f"{UNET}{k}.x"): v for k, v in expected_asim(states(sd1, "ab"), SD_PROBED).items()}
    for line in res.stdout.splitlines():
        cells = line.split()
        if cells and cells[0] in probe:
            assert float(cells[6]) == pytest.approx(probe[cells[0]][0], abs=6e-4)
    check_table(read_csv(out), sd1, "ab", asim=True)
    first = out.read_bytes()
    res = run("analyze", a, b, "--csv", str(out), cwd=tmp_path)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "exists" in res.stderr
    assert res.stdout == ""  # refused before the analysis ran
    assert out.read_bytes() == first
    res = run("analyze", a, b, "--csv", str(out), "--overwrite", cwd=tmp_path)
    assert res.returncode == 0 and "ASim%" not in res.stdout
    check_table(read_csv(out), sd1, "ab", asim=False)
    res = run("analyze", a, b, "--overwrite", cwd=tmp_path)
    assert res.returncode == 2 and "use it with --csv" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    model_b = Path(b).read_bytes()
    res = run("analyze", a, b, "--csv", b, "--overwrite", cwd=tmp_path)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert Path(b).read_bytes() == model_b


def test_the_analysis_sub_tab_shows_and_saves_the_new_measures(sd1, tmp_path):
    import re

    from lib_merge.hosts.standalone import StandaloneHost
    from lib_merge.ui.tab_analysis import block_chart, block_table, run_analysis, save_table

    host = StandaloneHost(sd1, tmp_path / "data")
    result = run_analysis(host, ["a.safetensors", "b.safetensors", ""], attention=True)
    probe = {sd1_block(f"{UNET}{k}.x"): v[0] for k, v in expected_asim(states(sd1, "ab"), SD_PROBED).items()}
    headers, rows = block_table(result)
    assert headers == ["block", "keys", "A-B cos mean %", "A-B cos min %", "A-B rel L2", "A-B attn2 cos %",
                       "A-B ASim %"]
    for row in rows:
        if row[0] in probe:
            assert float(row[6]) == pytest.approx(probe[row[0]], abs=6e-5)
        else:
            assert row[6] == "n/a"
    svg = block_chart(result, "ASimilarity %")
    drawn = {m.group(1): float(m.group(2)) for m in re.finditer(
        r'data-label="([^"]+)" data-series="A-B" data-value="([^"]+)"', svg) if m.group(2) != "nan"}
    assert drawn == pytest.approx(probe, rel=1e-6)
    with pytest.raises(MergeError, match="Run an analysis first"):
        save_table(host, None)
    first, second = save_table(host, result), save_table(host, result)
    assert first == tmp_path / "data" / "analysis" / "a-b.csv" and second.name == "a-b-2.csv"
    assert first.read_bytes() == second.read_bytes()
    check_table(read_csv(first), sd1, "ab", asim=True)
    plain = run_analysis(host, ["a.safetensors", "b.safetensors", ""])
    assert "A-B ASim %" not in block_table(plain)[0]
