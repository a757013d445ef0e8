"""The command line as a user runs it: a subprocess on real files, one-line errors, exit 2, no output file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import synth_family
from safetensors import safe_open
from safetensors.torch import load_file

from lib_merge.cli import synth

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli-models")
    a, b, c = synth_family(folder)
    xl = synth.make_checkpoint(folder / "xl.safetensors", "sdxl", factor=32, seed=4)
    return {"a": a, "b": b, "c": c, "xl": xl, "folder": folder}


def run(*args: str, cwd: Path, env_home: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), XDG_DATA_HOME=str(env_home))
    return subprocess.run([sys.executable, "-m", "lib_merge", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def digest(path: Path) -> bytes:
    return path.read_bytes()


def test_weight_sum_with_preset_writes_the_formula(models, tmp_path):
    out = tmp_path / "out.safetensors"
    weights = "0," + ",".join(["0.5"] * 12) + ",1," + ",".join(["0.25"] * 12)
    res = run("merge", "--model-a", str(models["a"]), "--model-b", str(models["b"]), "--mode", "Weight sum",
              "--mbw", weights, "--output", str(out), cwd=tmp_path, env_home=tmp_path / "data")
    assert res.returncode == 0, res.stderr
    assert "Saved" in res.stdout
    a, b, merged = load_file(models["a"]), load_file(models["b"]), load_file(out)
    assert list(merged) == list(a)
    for key, w in (("model.diffusion_model.input_blocks.4.1.proj_in.weight", 0.5),
                   ("model.diffusion_model.middle_block.1.proj_in.weight", 1.0),
                   ("model.diffusion_model.output_blocks.3.0.in_layers.2.weight", 0.25)):
        expected = (a[key].double() * (1 - w) + b[key].double() * w).half()
        assert merged[key].dtype == torch.float16
        assert torch.allclose(merged[key].double(), expected.double(), rtol=1e-3, atol=1e-4), key
    key = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"  # BASE weight 0: A exactly
    assert torch.equal(merged[key], a[key])
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    recipe = json.loads(meta["sd_merge_recipe"])
    assert recipe["weights_alpha"] == weights and recipe["mode"] == "Weight sum"
    assert len(json.loads(meta["sd_merge_models"])) == 2
    history = (tmp_path / "data" / "block-merger" / "mergehistory.csv").read_text()
    assert history.count("\n") == 2  # header + one row


def test_add_difference_three_models_and_save_dtype(models, tmp_path):
    out = tmp_path / "sub" / "out.safetensors"
    out.parent.mkdir()
    res = run("merge", "--model-a", str(models["a"]), "--model-b", str(models["b"]), "--model-c", str(models["c"]),
              "--mode", "Add difference", "--alpha", "0.7", "--save-dtype", "fp32", "--prune", "--no-history",
              "--output", str(out), cwd=tmp_path, env_home=tmp_path / "data")
    assert res.returncode == 0, res.stderr
    merged = load_file(out)
    a, b, c = (load_file(models[k]) for k in "abc")
    key = "model.diffusion_model.output_blocks.5.1.transformer_blocks.0.attn2.to_v.weight"
    assert merged[key].dtype == torch.float32
    expected = a[key].double() + 0.7 * (b[key].double() - c[key].double())
    assert torch.allclose(merged[key].double(), expected.half().double(), rtol=1e-3, atol=1e-4)
    assert not any(k.startswith("model_ema") or k == "alphas_cumprod" for k in merged)
    assert not (tmp_path / "data" / "block-merger" / "mergehistory.csv").exists()


BAD_INPUTS = [
    (["--mbw", ",".join(["0.5"] * 25)], "25 values"),
    (["--mbw", ",".join(["0.5"] * 27)], "27 values"),
    (["--mbw", "0," + ",".join(["x"] * 25)], "not a number"),
    (["--mbw", "nan," + ",".join(["0.5"] * 25)], "not a finite number"),
    (["--mbw", "NO_SUCH_PRESET"], "Unknown preset"),
    (["--mbw", ",".join(["0.5"] * 20)], "SDXL layout"),
    (["--alpha", "nan"], "finite"),
    (["--mode", "Add difference"], "Model C is required"),
    (["--mode", "Triple sum"], "Model C is required"),
    (["--calc", "cosineA", "--mode", "Add difference", "--model-c", "{c}"], "cannot be used with 'Add difference'"),
    (["--calc", "smoothAdd"], "cannot be used with 'Weight sum'"),
    (["--calc", "bogus"], "Unknown calc mode"),
    (["--mode", "Weighted"], "Unknown merge mode"),
    (["--calc", "extract", "--model-c", "{c}", "--alpha", "1.5"], "between 0 and 1"),
    (["--calc", "extract", "--model-c", "{c}", "--beta", "-0.1"], "between 0 and 1"),
    (["--model-b", "{xl}"], "different families"),
    (["--model-b", "{folder}/missing.safetensors"], "does not exist"),
    (["--model-b", "{truncated}"], "truncated"),
    (["--output", "{a}", "--overwrite"], "never overwritten"),
    (["--elemental", "OUT06:attn"], "Blocks:Elements:Ratio"),
    (["--adjust", "1,2,3"], "8 comma-separated"),
    (["--inex", "Include"], "needs blocks"),
    (["--alpha", "abc"], "invalid float"),
    (["--device", "tpu"], "Unknown merge device"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_INPUTS, ids=[m for _, m in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2_and_no_file(models, tmp_path, extra, message):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(models["b"].read_bytes()[:50_000])
    values = {k: str(v) for k, v in models.items()} | {"truncated": str(truncated)}
    args = {"--model-a": str(models["a"]), "--model-b": str(models["b"]), "--output": str(tmp_path / "o.safetensors")}
    flags = []
    for i in range(0, len(extra)):
        item = extra[i].format(**values)
        if item in args and i + 1 < len(extra):
            continue
        if i > 0 and extra[i - 1] in args:
            args[extra[i - 1]] = item
            continue
        flags.append(item)
    before = {k: digest(models[k]) for k in ("a", "b")}
    res = run("merge", *[x for kv in args.items() for x in kv], *flags, cwd=tmp_path, env_home=tmp_path / "data")
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert message in lines[0]
    assert not (tmp_path / "o.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.safetensors")]
    assert {k: digest(models[k]) for k in ("a", "b")} == before


def test_existing_output_needs_overwrite(models, tmp_path):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"precious")
    base = ["merge", "--model-a", str(models["a"]), "--model-b", str(models["b"]), "--output", str(out),
            "--no-history"]
    res = run(*base, cwd=tmp_path, env_home=tmp_path / "data")
    assert res.returncode == 2 and "--overwrite" in res.stderr
    assert out.read_bytes() == b"precious"
    res = run(*base, "--overwrite", cwd=tmp_path, env_home=tmp_path / "data")
    assert res.returncode == 0, res.stderr
    assert len(load_file(out)) == len(load_file(models["a"]))


def test_inspect_prints_architecture_blocks_and_recipe(models, tmp_path):
    out = tmp_path / "o.safetensors"
    assert run("merge", "--model-a", str(models["a"]), "--model-b", str(models["b"]), "--mbw", "GRAD_V",
               "--output", str(out), "--no-history", cwd=tmp_path, env_home=tmp_path).returncode == 0
    res = run("inspect", str(out), cwd=tmp_path, env_home=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "Architecture: SD1" in res.stdout
    for label in ("BASE", "IN00", "M00", "OUT11"):
        assert f"\n  {label} " in res.stdout
    assert '"weights_alpha": "0,1,0.9166666667' in res.stdout  # the preset, resolved into the recipe
    res = run("inspect", str(models["xl"]), cwd=tmp_path, env_home=tmp_path)
    assert "Architecture: SDXL" in res.stdout and "OUT08" in res.stdout and "OUT09" not in res.stdout


def test_demo_runs_and_reports_preset_shares(tmp_path):
    res = run("demo", cwd=tmp_path, env_home=tmp_path)
    assert res.returncode == 0, res.stderr
    first = res.stdout.split("2. trainDifference")[0]
    rows = {line.split()[0]: line.split() for line in first.splitlines() if line.startswith(("  IN", "  M00"))}
    assert rows["IN00"][2] == "1.00"  # GRAD_V: IN00 at weight 1 lies the whole way to B, M00 at 0 stays A
    assert rows["M00"][2] == "0.00"
    assert "trainDifference" in res.stdout


def test_reset_clip_ids_reports_what_it_fixed(tmp_path):
    state = synth.make_state_dict("sd1", factor=16, seed=1)
    key = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    state[key] = state[key].clone()
    state[key][0, 5] = 4  # a drifted id, as broken merges leave them
    synth.write_checkpoint(tmp_path / "a.safetensors", state)
    synth.write_checkpoint(tmp_path / "b.safetensors", synth.make_state_dict("sd1", factor=16, seed=2))
    out = tmp_path / "o.safetensors"
    res = run("merge", "--model-a", str(tmp_path / "a.safetensors"), "--model-b", str(tmp_path / "b.safetensors"),
              "--reset-clip-ids", "--no-history", "--output", str(out), cwd=tmp_path, env_home=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "fixed positions [5]" in res.stdout
    assert torch.equal(load_file(out)[key], torch.arange(77)[None])


def test_cuda_without_a_gpu_is_refused_not_ignored(models, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    res = run("merge", "--model-a", str(models["a"]), "--model-b", str(models["b"]), "--device", "cuda",
              "--no-history", "--output", str(tmp_path / "o.safetensors"), cwd=tmp_path, env_home=tmp_path)
    assert res.returncode == 2 and "needs a CUDA GPU" in res.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_copy_config_puts_model_a_yaml_beside_the_output(models, tmp_path):
    """The seed's "copy config": A's `.yaml` (the WebUI reads a checkpoint's config from it) goes beside the output;
    without a `.yaml` nothing is copied; an existing one is replaced only with --overwrite, refused before merging."""
    a = tmp_path / "a.safetensors"
    shutil.copyfile(models["a"], a)
    config = "model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n    parameterization: v\n"
    (tmp_path / "a.yaml").write_text(config)
    out = tmp_path / "out.safetensors"
    args = ("merge", "--model-a", str(a), "--model-b", str(models["b"]), "--alpha", "0.3", "--copy-config",
            "--no-history", "--quiet", "--output", str(out))
    res = run(*args, cwd=tmp_path, env_home=tmp_path)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "out.yaml").read_text() == config and (tmp_path / "a.yaml").read_text() == config
    out.unlink()
    (tmp_path / "out.yaml").write_text("mine")
    res = run(*args, cwd=tmp_path, env_home=tmp_path)  # the model is new, but its config name is taken
    assert res.returncode == 2 and "out.yaml" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not out.exists() and (tmp_path / "out.yaml").read_text() == "mine"
    res = run(*args, "--overwrite", cwd=tmp_path, env_home=tmp_path)
    assert res.returncode == 0, res.stderr
    assert out.is_file() and (tmp_path / "out.yaml").read_text() == config
    plain = tmp_path / "plain.safetensors"  # B has no config: nothing to copy, no error
    res = run("merge", "--model-a", str(models["b"]), "--model-b", str(a), "--copy-config", "--no-history",
              "--quiet", "--output", str(plain), cwd=tmp_path, env_home=tmp_path)
    assert res.returncode == 0, res.stderr
    assert plain.is_file() and not (tmp_path / "plain.yaml").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary files left
