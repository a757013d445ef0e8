"""Extract from two LoRAs (`lora diff`, seed-lora-analysis.md §2.5): the output factors against the formula computed
here in float64 (ratios and block weights first, C rescaled to B's alphas), what the defaults mean, every refusal
(one line, nothing written, an existing file untouched), the CLI, the service, the tab's handler and the API."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lora_helpers import rand, save_lora, tiny_model
from safetensors import safe_open
from safetensors.torch import load_file
from test_entry_script import routes
from test_lora_live import loras_fixture  # noqa: F401  (the `loras` fixture)
from webui_fixture import webui_fixture  # noqa: F401  (provides the `webui` fixture)

from lib_merge.core.errors import MergeError
from lib_merge.hosts.standalone import StandaloneHost
from lib_merge.lora.blocks import LoraSpec
from lib_merge.lora.difference import difference_to_file
from lib_merge.lora.formats import LoraError
from lib_merge.service.merge_service import MergeService
from lib_merge.ui.tab_lora import LoraHandlers

ROOT = Path(__file__).resolve().parent.parent
Q_K = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"  # IN04
OUT_K = "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"  # OUT03
TE_K = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"  # BASE
CONV_K = "lora_unet_down_blocks_0_resnets_0_conv1"  # IN01, a 3x3 LoCon
TUCKER_K = "lora_unet_down_blocks_0_resnets_1_conv2"  # IN02, a Tucker LoCon
SLOT = {Q_K: "IN04", OUT_K: "OUT03", TE_K: "BASE", CONV_K: "IN01", TUCKER_K: "IN02"}
#: C's 17 block weights (BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00, OUT03..OUT11); C's ratio 2 multiplies them
C_BLOCKS = [0.8, 1.5, 0.9, 0.25, 1, 1, 1, 1, -0.6, 1, 1, 1, 1, 1, 1, 1, 1]
C_SLOTS = {"BASE": 1.6, "IN01": 3.0, "IN02": 1.8, "IN04": 0.5, "OUT03": -1.2}
RANK = 4


def lora_parts(seed: int, tucker_mid: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """module -> {up, down[, mid]} of random factors (the same shapes for every seed)."""
    parts = {}
    for i, (module, out, inp) in enumerate(((Q_K, 40, 40), (OUT_K, 40, 40), (TE_K, 48, 48))):
        parts[module] = {"up": rand((out, RANK), seed + 10 * i), "down": rand((RANK, inp), seed + 10 * i + 1)}
    parts[CONV_K] = {"up": rand((20, RANK, 1, 1), seed + 50), "down": rand((RANK, 20, 3, 3), seed + 51)}
    parts[TUCKER_K] = {"up": rand((20, RANK, 1, 1), seed + 60), "down": rand((RANK, 20, 1, 1), seed + 61)}
    if tucker_mid:
        parts[TUCKER_K]["mid"] = rand((RANK, RANK, 3, 3), seed + 62)
    return parts


def write(path: Path, parts: dict, alphas: dict[str, float | None], metadata: dict | None = None) -> Path:
    names = {"up": "lora_up.weight", "down": "lora_down.weight", "mid": "lora_mid.weight"}
    tensors = {f"{module}.{names.get(p, p)}": t for module, ps in parts.items() for p, t in ps.items()}
    tensors.update({f"{module}.alpha": torch.tensor(a) for module, a in alphas.items() if a is not None})
    return save_lora(path, tensors, metadata)


def scaled(parts: dict[str, torch.Tensor], k: float) -> dict[str, torch.Tensor]:
    """Factors whose product is k times the original: √|k| on up, sign(k)·√|k| on down, mid as it is (float64)."""
    root = math.sqrt(abs(k))
    sign = 1.0 if k >= 0 else -1.0
    return {p: t.double() * {"up": root, "down": sign * root, "mid": 1.0}[p] for p, t in parts.items()}


def expected(x: torch.Tensor, y: torch.Tensor, alpha: float, beta: float, gamma: float) -> torch.Tensor:
    """The formula of §2.5 per output row (dim 0 against all other axes), in float64; a zero row has cos 0."""
    xr, yr = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
    norms = xr.norm(dim=1) * yr.norm(dim=1)
    cos = torch.where(norms > 0, (xr * yr).sum(dim=1) / norms.clamp_min(1e-300), 0.0).clamp(-1, 1)
    d = ((cos + 1) / 2) ** gamma
    weight = d + beta * ((1 - d) - d)
    return (x + alpha * (y - x)) * weight.reshape(-1, *[1] * (x.dim() - 1))


def product(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """ΔW_raw of (up, down[, mid]) in float64, written out for the Tucker case as §1.3 does."""
    up, down = parts["up"].double(), parts["down"].double()
    if "mid" in parts:
        return torch.einsum("nmkl,on,mi->oikl", parts["mid"].double(), up.flatten(1), down.flatten(1))
    return (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])


@pytest.fixture
def pair(tmp_path):
    """B (ratio 0.5; alpha 2, the text-encoder module without alpha) and C (alpha 8, ratio 2 with block weights)."""
    b_parts, c_parts = lora_parts(100), lora_parts(200)
    b_alphas = {m: (None if m == TE_K else 2.0) for m in b_parts}
    b = write(tmp_path / "b.safetensors", b_parts, b_alphas, {"ss_network_alpha": "2", "ss_network_dim": "4",
                                                              "ss_tag_frequency": json.dumps({"b": {"x": 1}})})
    c = write(tmp_path / "c.safetensors", c_parts, dict.fromkeys(c_parts, 8.0))
    return {"b": b, "c": c, "b_parts": b_parts, "c_parts": c_parts, "b_alphas": b_alphas}


def test_factors_follow_the_formula_after_block_weights_and_alpha_rescaling(pair, tmp_path):
    out = tmp_path / "out.safetensors"
    alpha, beta, gamma = 0.3, 0.7, 2.5
    specs = [LoraSpec(str(pair["b"]), 0.5), LoraSpec(str(pair["c"]), 2.0, ",".join(f"{v:g}" for v in C_BLOCKS))]
    result = difference_to_file(specs, out, alpha=alpha, beta=beta, gamma=gamma, dtype="fp32")
    assert (result.modules, result.ranks, result.family) == (5, [RANK], "sd1")
    got = load_file(out)
    names = {"up": "lora_up.weight", "down": "lora_down.weight", "mid": "lora_mid.weight"}
    for module, b_parts in pair["b_parts"].items():
        b_alpha = pair["b_alphas"][module] or RANK  # no alpha: scale 1, alpha = rank
        x = scaled(b_parts, 0.5)
        y = scaled(pair["c_parts"][module], C_SLOTS[SLOT[module]] * (8.0 / RANK) / (b_alpha / RANK))
        for part in b_parts:
            want = expected(x[part], y[part], alpha, beta, gamma)
            torch.testing.assert_close(got[f"{module}.{names[part]}"].double(), want, rtol=1e-5, atol=1e-7,
                                       msg=f"{module}.{part}")
        assert float(got[f"{module}.alpha"]) == b_alpha
    assert len(got) == sum(len(p) + 1 for p in pair["b_parts"].values())
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2"  # B's, as its alphas differ by module
    assert meta["ss_output_name"] == "out" and meta["ss_base_model_version"] == "sd_v1"
    recipe = json.loads(meta["block_merger_recipe"])
    assert recipe["operation"] == "lora diff" and (recipe["alpha"], recipe["beta"], recipe["gamma"]) == (0.3, 0.7, 2.5)
    assert [s["ratio"] for s in recipe["loras"]] == [0.5, 2.0]


def test_the_ends_give_back_b_and_c_exactly_in_bs_alphas(pair, tmp_path):
    """α = 1, β = γ = 0 is C's change, α = β = γ = 0 is B's: C's alpha (8) is carried into its factors."""
    specs = [LoraSpec(str(pair["b"]), 1.0), LoraSpec(str(pair["c"]), 1.0)]
    for alpha, source, parts, alphas in ((1.0, "c", pair["c_parts"], dict.fromkeys(pair["c_parts"], 8.0)),
                                         (0.0, "b", pair["b_parts"], pair["b_alphas"])):
        out = tmp_path / f"as-{source}.safetensors"
        difference_to_file(specs, out, alpha=alpha, beta=0, gamma=0, dtype="fp32")
        got = load_file(out)
        for module in parts:
            mine = {"up": got[f"{module}.lora_up.weight"], "down": got[f"{module}.lora_down.weight"]}
            if f"{module}.lora_mid.weight" in got:
                mine["mid"] = got[f"{module}.lora_mid.weight"]
            b_scale = (pair["b_alphas"][module] or RANK) / RANK
            assert float(got[f"{module}.alpha"]) / RANK == b_scale
            want = (alphas[module] or RANK) / RANK * product(parts[module])
            torch.testing.assert_close(b_scale * product(mine), want, rtol=1e-5, atol=1e-7, msg=module)


def test_the_defaults_keep_cs_rows_unlike_bs(tmp_path):
    """α = β = γ = 1: out = C·(1 − (cos+1)/2): a row C shares with B (cos 1) goes, an opposite one (cos −1) stays
    whole, an orthogonal one (cos 0) is halved. Also the defaults when none is given."""
    b_up = rand((40, RANK), 1)
    c_up = b_up.clone()
    c_up[0] *= 3  # the same direction
    c_up[1] *= -2  # the opposite direction
    c_up[2] = torch.tensor([b_up[2, 1], -b_up[2, 0], b_up[2, 3], -b_up[2, 2]])  # orthogonal to B's row 2
    b_down = rand((RANK, 40), 2)
    b = save_lora(tmp_path / "b.safetensors", {f"{Q_K}.lora_up.weight": b_up, f"{Q_K}.lora_down.weight": b_down})
    c = save_lora(tmp_path / "c.safetensors", {f"{Q_K}.lora_up.weight": c_up, f"{Q_K}.lora_down.weight": -b_down})
    out = tmp_path / "out.safetensors"
    difference_to_file([LoraSpec(str(b)), LoraSpec(str(c))], out, dtype="fp32")
    got = load_file(out)
    up, down = got[f"{Q_K}.lora_up.weight"].double(), got[f"{Q_K}.lora_down.weight"].double()
    assert torch.count_nonzero(up[0]) == 0
    torch.testing.assert_close(up[1], c_up[1].double(), rtol=1e-6, atol=0)
    torch.testing.assert_close(up[2], c_up[2].double() / 2, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(down, -b_down.double(), rtol=1e-6, atol=0)  # every down row is opposite to B's
    assert got[f"{Q_K}.lora_up.weight"].dtype == torch.float32  # "keep": B's dtype
    # fp16 inputs are kept in fp16
    b16 = save_lora(tmp_path / "b16.safetensors", {k: v.half() for k, v in load_file(b).items()})
    difference_to_file([LoraSpec(str(b16)), LoraSpec(str(c))], tmp_path / "h.safetensors")
    assert load_file(tmp_path / "h.safetensors")[f"{Q_K}.lora_up.weight"].dtype == torch.float16


def _variant(tmp_path, name: str, change) -> Path:
    parts = lora_parts(300)
    alphas = dict.fromkeys(parts, 2.0)
    change(parts, alphas)
    return write(tmp_path / f"{name}.safetensors", parts, alphas)


BAD_C = {
    "missing": (lambda p, a: (p.pop(OUT_K), a.pop(OUT_K)), f"LoRA B (b) has module {OUT_K} that LoRA C (bad) lacks"),
    "extra": (lambda p, a: p.update({"lora_unet_mid_block_attentions_0_proj_in": {
        "up": rand((40, RANK), 9), "down": rand((RANK, 40), 8)}}),
        "LoRA C (bad) has module lora_unet_mid_block_attentions_0_proj_in that LoRA B (b) lacks"),
    "rank": (lambda p, a: p.update({Q_K: {"up": rand((40, 8), 9), "down": rand((8, 40), 8)}}),
             f"Module {Q_K} has rank 4 in B (b) and 8 in C (bad)"),
    "width": (lambda p, a: p.update({Q_K: {"up": rand((40, RANK), 9), "down": rand((RANK, 32), 8)}}),
              "down [4, 40] in B (b) and [4, 32] in C (bad)"),
    "no-tucker": (lambda p, a: p[TUCKER_K].pop("mid"), "has parts down, mid, up in B (b) but down, up in C (bad)"),
    "loha": (lambda p, a: (p.pop(CONV_K), p.update({CONV_K: {f"hada_w{i}_{s}": rand((4, 4), i) for i in (1, 2)
                                                             for s in "ab"}})),
             f"LoRA C (bad): module {CONV_K} is LoHa; Extract from two LoRAs compares LoRA/LoCon factors only"),
    "dora": (lambda p, a: p[Q_K].update({"dora_scale": rand((1, 40), 7)}), f"module {Q_K} is DoRA"),
}


@pytest.mark.parametrize("case", sorted(BAD_C))
def test_loras_that_do_not_pair_are_refused_by_name(tmp_path, case):
    b = _variant(tmp_path, "b", lambda p, a: None)
    change, message = BAD_C[case]
    c = _variant(tmp_path, "bad", change)
    out = tmp_path / "out.safetensors"
    before = {p: p.read_bytes() for p in (b, c)}
    with pytest.raises(LoraError) as err:
        difference_to_file([LoraSpec(str(b)), LoraSpec(str(c))], out)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["b.safetensors", "bad.safetensors"]
    assert all(p.read_bytes() == data for p, data in before.items())


@pytest.mark.parametrize("kw, count, message", [
    ({"alpha": 1.5}, 2, "alpha must be a number between 0 and 1 for Extract from two LoRAs, not 1.5"),
    ({"beta": -0.1}, 2, "beta must be a number between 0 and 1"),
    ({"gamma": -1.0}, 2, "gamma must be a number 0 or more"),
    ({"alpha": math.nan}, 2, "alpha must be a number between 0 and 1"),
    ({}, 1, "takes exactly two LoRAs, B then C (1 given)"),
    ({}, 3, "takes exactly two LoRAs, B then C (3 given)"),
    ({"metadata": "all"}, 2, "Unknown metadata mode 'all'"),
    ({"dtype": "fp8"}, 2, "Unknown LoRA save dtype 'fp8'"),
])
def test_bad_amounts_and_counts(pair, tmp_path, kw, count, message):
    specs = [LoraSpec(str(pair["b"])), LoraSpec(str(pair["c"])), LoraSpec(str(pair["b"]))][:count]
    with pytest.raises(LoraError, match=message.replace("(", r"\(").replace(")", r"\)")):
        difference_to_file(specs, tmp_path / "out.safetensors", **kw)
    assert not (tmp_path / "out.safetensors").exists()


def test_existing_output_kept_unless_asked_and_inputs_never_overwritten(pair, tmp_path):
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"mine")
    specs = [LoraSpec(str(pair["b"])), LoraSpec(str(pair["c"]))]
    with pytest.raises(MergeError, match="exists; pass --overwrite"):
        difference_to_file(specs, out)
    assert out.read_bytes() == b"mine"
    with pytest.raises(MergeError, match="an input is never overwritten"):
        difference_to_file(specs, pair["c"], overwrite=True)
    difference_to_file(specs, out, overwrite=True)
    assert set(load_file(out)) == set(load_file(pair["b"])) | {f"{TE_K}.alpha"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_loras_for_different_families_are_refused(tmp_path):
    te2 = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    xl = save_lora(tmp_path / "xl.safetensors", {f"{te2}.lora_down.weight": rand((4, 1280), 3),
                                                 f"{te2}.lora_up.weight": rand((1280, 4), 4)})
    k2 = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"  # SD1's 768-wide context
    sd1 = save_lora(tmp_path / "sd1.safetensors", {f"{k2}.lora_down.weight": rand((4, 768), 10),
                                                   f"{k2}.lora_up.weight": rand((320, 4), 11)})
    with pytest.raises(LoraError, match="different model families and cannot be compared"):
        difference_to_file([LoraSpec(str(sd1)), LoraSpec(str(xl))], tmp_path / "o.safetensors")


# -- the CLI ----------------------------------------------------------------------------------------------------------


def run(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), XDG_DATA_HOME=str(home))
    return subprocess.run([sys.executable, "-m", "lib_merge", "lora", "diff", *args], cwd=home.parent, env=env,
                          capture_output=True, text=True, timeout=600)


def test_cli_writes_the_file_and_a_history_row(pair, tmp_path):
    home = tmp_path / "data"
    out = tmp_path / "cli.safetensors"
    res = run("--lora", f"{pair['b']}:1", "--lora", f"{pair['c']}:1:OUTD", "--gamma", "2", "--metadata", "merge",
              "--output", str(out), "--quiet", home=home)
    assert res.returncode == 0, res.stderr
    assert "Saved" in res.stdout and "5 modules, rank 4, for SD1, logged as merge 1" in res.stdout
    got = load_file(out)
    assert got[f"{Q_K}.lora_up.weight"].dtype == torch.float32  # keep: B's dtype
    # OUTD gives C's IN04 ratio 0: zero rows (cos 0, d = 1/4 at gamma 2), so out = C·(1 − d) = 0 there
    assert torch.count_nonzero(got[f"{Q_K}.lora_up.weight"]) == 0
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["ss_tag_frequency"]) == {"b": {"x": 1}} and "sshs_cp1" in meta
    with open(home / "block-merger" / "mergehistory.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [(r["mode"], r["gamma"]) for r in rows] == [("LoRA diff", "2.0")]
    assert rows[0]["model_a"] == str(pair["b"]) and rows[0]["weights_beta"].endswith(":1:OUTD")


@pytest.mark.parametrize("args, message", [
    (["--lora", "{b}:1"], "takes exactly two LoRAs"),
    (["--lora", "{b}:1", "--lora", "{c}:1", "--alpha", "2"], "alpha must be a number between 0 and 1"),
    (["--lora", "{b}:1", "--lora", "{c}:1", "--gamma", "-0.5"], "gamma must be a number 0 or more"),
    (["--lora", "{b}:1", "--lora", "{c}:1:NOPE"], "unknown block-weight preset 'NOPE'"),
    (["--lora", "{b}:1", "--lora", "{rank8}:1"], "has rank 4 in B (b) and 8 in C (rank8)"),
    (["--lora", "{b}:1", "--lora", "{c}:1", "--output", "{taken}"], "exists; pass --overwrite"),
])
def test_cli_errors_are_one_line_exit_2_nothing_written(pair, tmp_path, args, message):
    rank8 = write(tmp_path / "rank8.safetensors", {m: {"up": rand((p["up"].shape[0], 8, *p["up"].shape[2:]), 1),
                                                       "down": rand((8, *p["down"].shape[1:]), 2)}
                                                   for m, p in pair["b_parts"].items()}, {})
    taken = tmp_path / "taken.safetensors"
    taken.write_bytes(b"keep me")
    paths = {"b": pair["b"], "c": pair["c"], "rank8": rank8, "taken": taken}
    args = [a.format(**paths) for a in args]
    if "--output" not in args:
        args += ["--output", str(tmp_path / "out.safetensors")]
    files = {p: p.read_bytes() for p in tmp_path.glob("*.safetensors")}
    res = run(*args, home=tmp_path / "data")
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert message in lines[0]
    assert {p: p.read_bytes() for p in tmp_path.glob("*.safetensors")} == files
    assert not (tmp_path / "data" / "block-merger" / "mergehistory.csv").exists()


# -- the service and the tab ----------------------------------------------------------------------------------------


def test_tab_handler_writes_into_the_lora_folder_and_history_reloads_the_pair(pair, tmp_path):
    models = tmp_path / "models"
    (models / "Lora").mkdir(parents=True)
    tiny_model(models / "base.safetensors", "sd1", seed=1)
    for name in ("b", "c"):
        (models / "Lora" / f"{name}.safetensors").write_bytes(pair[name].read_bytes())
    tab = LoraHandlers(MergeService(StandaloneHost(models, tmp_path / "data")))
    message = tab.difference("b:0.5\nc:2", "diffed", 1, 1, 1, "fp16", "new", False)
    assert message.startswith(f"Saved {models / 'Lora' / 'diffed.safetensors'} (5 modules, rank 4, for SD1")
    assert "merge ID 1" in message
    got = load_file(models / "Lora" / "diffed.safetensors")
    x, y = scaled(pair["b_parts"][Q_K], 0.5), scaled(pair["c_parts"][Q_K], 2.0 * 8.0 / 2.0)
    torch.testing.assert_close(got[f"{Q_K}.lora_down.weight"].double(), expected(x["down"], y["down"], 1, 1, 1),
                               rtol=2e-3, atol=1e-4)  # written in fp16
    assert got[f"{Q_K}.lora_down.weight"].dtype == torch.float16
    text, note = tab.from_history(1)
    assert text.splitlines() == [f"{models / 'Lora' / 'b.safetensors'}:0.5", f"{models / 'Lora' / 'c.safetensors'}:2"]
    assert "lora diff 1" in note
    with pytest.raises(MergeError, match="already exists in .* tick \"overwrite\""):
        tab.difference("b:1\nc:1", "diffed", 1, 1, 1, "fp16", "new", False)
    with pytest.raises(MergeError, match="Type a file name"):
        tab.difference("b:1\nc:1", "", 1, 1, 1, "fp16", "new", False)
    with pytest.raises(MergeError, match=r"takes exactly two LoRAs, B then C \(1 given\)"):
        tab.difference("b:1", "one", 1, 1, 1, "fp16", "new", False)
    with pytest.raises(MergeError, match="beta must be a number between 0 and 1"):
        tab.difference("b:1\nc:1", "two", 1, 1.2, 1, "fp16", "new", False)
    assert sorted(p.name for p in (models / "Lora").iterdir()) == ["b.safetensors", "c.safetensors",
                                                                   "diffed.safetensors"]
    assert len(tab.service.history().rows()) == 1


# -- the API ----------------------------------------------------------------------------------------------------------


@pytest.fixture(name="entry")
def entry_fixture(webui):
    import test_entry_script

    return test_entry_script.entry.__wrapped__(webui)


def test_api_route_writes_the_file_and_refuses_bad_bodies(webui, entry, loras):
    r = routes(webui)[("POST", "/block-merger/lora/diff")]
    out = r({"loras": ["style:1", "style:0.5"], "name": "self", "gamma": 0, "beta": 0, "save_dtype": "fp32"})
    lora_dir = webui.tmp / "Lora"
    assert out["path"] == str(lora_dir / "self.safetensors") and out["ranks"] == [4] and out["history_id"] == 1
    # the same LoRA against itself at α = 1, β = γ = 0 is C itself: half of style's change
    got, style = load_file(out["path"]), load_file(lora_dir / "style.safetensors")
    for key in [k for k in style if k.endswith("lora_up.weight")]:
        down = key.replace("lora_up", "lora_down")
        torch.testing.assert_close(got[key].double() @ got[down].double(),
                                   0.5 * style[key].double() @ style[down].double(), rtol=1e-5, atol=1e-8)
    files = sorted(p.name for p in webui.tmp.rglob("*.safetensors"))
    for body, message in (({"loras": ["style:1", "detail:1"], "name": "x"}, "has module"),
                          ({"loras": ["style:1", "style:1"], "name": "x", "alpha": 3}, "alpha must be a number"),
                          ({"loras": ["style:1", "style:1"], "name": "x", "gamma": "a"}, "must be a number"),
                          ({"loras": ["style:1", "style:1"]}, "Missing field(s): name")):
        with pytest.raises(Exception) as err:
            r(body)
        assert err.value.status_code == 400 and message in err.value.detail and "\n" not in err.value.detail
    assert sorted(p.name for p in webui.tmp.rglob("*.safetensors")) == files
    assert [row["mode"] for row in routes(webui)[("GET", "/block-merger/history")]()["rows"]] == ["LoRA diff"]
