"""`python -m lib_merge lora ...` as a user runs it: subprocesses on real files; bad inputs give one line, exit 2,
and no output file; every LoRA operation leaves a history row."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lora_helpers import rand, save_lora, tiny_model
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
Q_K = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
Q = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"


def run(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), XDG_DATA_HOME=str(home))
    return subprocess.run([sys.executable, "-m", "lib_merge", "lora", *args], cwd=home.parent, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora-cli")
    model = tiny_model(folder / "sd1.safetensors", "sd1", seed=1)
    good = save_lora(folder / "good.safetensors", {f"{Q_K}.lora_down.weight": rand((4, 40), 1),
                                                   f"{Q_K}.lora_up.weight": rand((40, 4), 2),
                                                   f"{Q_K}.alpha": torch.tensor(2.0)}, {"ss_network_dim": "4"})
    te2 = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    bad = {
        "sdxl": {f"{te2}.lora_down.weight": rand((4, 1280), 3), f"{te2}.lora_up.weight": rand((1280, 4), 4)},
        "unknown": {"lora_foo_bar.lora_down.weight": rand((4, 40), 5), "lora_foo_bar.lora_up.weight": rand((40, 4), 6)},
        "mismatched": {f"{Q_K}.lora_down.weight": rand((4, 40), 7), f"{Q_K}.lora_up.weight": rand((40, 3), 8)},
        "nan": {f"{Q_K}.lora_down.weight": torch.full((4, 40), math.nan), f"{Q_K}.lora_up.weight": rand((40, 4), 9)},
        "rank0": {f"{Q_K}.lora_down.weight": rand((0, 40), 12), f"{Q_K}.lora_up.weight": rand((40, 0), 13)},
    }
    k2 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"  # SD1's 768-wide context
    bad["sd1ctx"] = {f"{k2}.lora_down.weight": rand((4, 768), 10), f"{k2}.lora_up.weight": rand((320, 4), 11)}
    paths = {name: save_lora(folder / f"{name}.safetensors", t) for name, t in bad.items()}
    return {"folder": folder, "model": model, "good": good, **paths}


def history_rows(home: Path) -> list[dict]:
    path = home / "block-merger" / "mergehistory.csv"
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_bake_merge_extract_inspect(files, tmp_path):
    home = tmp_path / "data"
    out = tmp_path / "baked.safetensors"
    res = run("bake", "--model", str(files["model"]), "--lora", f"{files['good']}:0.8", "--lora",
              f"{files['good']}:0.5:OUTD", "--output", str(out), "--quiet", home=home)
    assert res.returncode == 0, res.stderr
    assert "Saved" in res.stdout and "1 of 1 modules applied" in res.stdout
    base, baked, lora = load_file(files["model"]), load_file(out), load_file(files["good"])
    delta = 0.5 * lora[f"{Q_K}.lora_up.weight"].double() @ lora[f"{Q_K}.lora_down.weight"].double()
    # OUTD gives IN04 weight 0, so only the 0.8 LoRA acts
    torch.testing.assert_close(baked[Q].double(), base[Q].double() + 0.8 * delta, rtol=0, atol=1e-6)

    merged = tmp_path / "merged.safetensors"
    res = run("merge", "--lora", f"{files['good']}:0.8", "--lora", f"{files['good']}:-0.3", "--rank", "auto",
              "--save-dtype", "fp32", "--output", str(merged), "--quiet", home=home)
    assert res.returncode == 0, res.stderr
    m = load_file(merged)
    got = m[f"{Q_K}.lora_up.weight"].double() @ m[f"{Q_K}.lora_down.weight"].double()
    assert m[f"{Q_K}.lora_down.weight"].shape[0] == 4 and float(m[f"{Q_K}.alpha"]) == 4
    torch.testing.assert_close(got, 0.5 * delta, rtol=0, atol=1e-5)  # (0.8 - 0.3) * (2/4) * up @ down

    extracted = tmp_path / "extracted.safetensors"
    res = run("extract", "--model-a", str(out), "--model-b", str(files["model"]), "--rank", "4", "--clamp", "1",
              "--save-dtype", "fp32", "--threads", "1", "--output", str(extracted), "--quiet", home=home)
    assert res.returncode == 0, res.stderr
    assert "U-Net only" in res.stdout
    e = load_file(extracted)
    torch.testing.assert_close(e[f"{Q_K}.lora_up.weight"].double() @ e[f"{Q_K}.lora_down.weight"].double(),
                               baked[Q].double() - base[Q].double(), rtol=0, atol=1e-5)

    res = run("inspect", str(extracted), home=home)
    assert res.returncode == 0, res.stderr
    assert "Type: LoRA" in res.stdout and "Ranks: 4" in res.stdout and "ss_base_model_version: sd_v1" in res.stdout

    rows = history_rows(home)
    assert [r["mode"] for r in rows] == ["LoRA bake", "LoRA merge", "LoRA extract"]
    assert rows[0]["model_a"] == str(files["model"]) and "OUTD" in rows[0]["weights_alpha"]


@pytest.mark.parametrize("lora,spec,message", [
    ("sdxl", ":1", "is for SDXL"),
    ("unknown", ":1", "has no module that matches"),
    ("mismatched", ":1", "mismatched shapes"),
    ("nan", ":1", "NaN"),
    ("rank0", ":1", "has empty factors (down [0, 40], up [40, 0])"),
    ("good", ":strong", "'strong' is not a number"),
    ("good", ":1:NOPE", "unknown block-weight preset 'NOPE'"),
    ("good", ":1:" + ",".join(["1"] * 18), "18 block weights given"),
])
def test_bad_inputs_one_line_exit_2_nothing_written(files, tmp_path, lora, spec, message):
    out = tmp_path / "out.safetensors"
    before = {p: p.read_bytes() for p in (files["model"], files[lora])}
    res = run("bake", "--model", str(files["model"]), "--lora", f"{files[lora]}{spec}", "--output", str(out),
              home=tmp_path / "data")
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not out.exists() and list(tmp_path.glob(".out*")) == []
    assert all(p.read_bytes() == data for p, data in before.items())
    assert not (tmp_path / "data" / "block-merger" / "mergehistory.csv").exists()


@pytest.mark.parametrize("lora,problem", [
    ("nan", "has NaN or infinite values in down"),
    ("rank0", "has empty factors (down [0, 40], up [40, 0])"),
])
def test_inspect_describes_a_damaged_lora_and_says_why_it_cannot_be_used(files, tmp_path, lora, problem):
    res = run("inspect", str(files[lora]), home=tmp_path / "data")
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert "Type: LoRA" in res.stdout
    assert f"Cannot be used: LoRA {lora}: module {Q_K} {problem}; the file is damaged" in res.stdout
    res = run("inspect", str(files["good"]), home=tmp_path / "data")
    assert res.returncode == 0 and "Cannot be used" not in res.stdout


def test_a_missing_lora_file_is_named_as_a_lora(files, tmp_path):
    out = tmp_path / "out.safetensors"
    missing = tmp_path / "nowhere.safetensors"
    res = run("bake", "--model", str(files["model"]), "--lora", f"{missing}:1", "--output", str(out),
              home=tmp_path / "data")
    assert res.returncode == 2 and res.stderr.strip() == f"error: LoRA file {missing} does not exist; check the name " \
        "and folder." and not out.exists()


def test_merge_and_extract_bad_inputs(files, tmp_path):
    home = tmp_path / "data"
    out = tmp_path / "o.safetensors"
    res = run("merge", "--lora", f"{files['sd1ctx']}:1", "--lora", f"{files['sdxl']}:1", "--output", str(out),
              home=home)
    assert res.returncode == 2 and "different model families" in res.stderr and not out.exists()
    res = run("merge", "--lora", f"{files['good']}:1", "--lora", f"{files['rank0']}:1", "--output", str(out),
              home=home)
    assert res.returncode == 2 and "has empty factors" in res.stderr and not out.exists()
    res = run("merge", "--lora", f"{files['good']}:1", "--rank", "many", "--output", str(out), home=home)
    assert res.returncode == 2 and "'many' is not a whole number" in res.stderr and not out.exists()
    res = run("extract", "--model-a", str(files["model"]), "--model-b", str(files["good"]), "--output", str(out),
              home=home)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and not out.exists()
