"""The tab's panels of issue 15 items 4-8, below the browser: Analysis (table, chart, progress, stop), Elements
(rows, click-to-rule), Metadata, IDs from images (Block Merger's and SuperMerger's infotexts), the block-weight
helper, user presets, slider limits, the generation request's live txt2img values, and the per-key ratio log.

Expected numbers are computed here in float64 from the formulas (relative L2 ‖X−Y‖/‖X‖, cosine in percent, a
weighted sum per key) with the block mapping of conftest, never by calling the code under test.
"""

from __future__ import annotations

import csv
import json
import math
import re

import pytest
import torch
from conftest import sd1_block, sd1_model
from PIL import Image, PngImagePlugin
from safetensors.torch import load_file
from test_analysis import save

from lib_merge.analysis.metadata import describe_metadata, model_metadata
from lib_merge.analysis.similarity import compare_models
from lib_merge.core.errors import MergeCancelled, MergeError
from lib_merge.core.recipe import Recipe
from lib_merge.core.weights import DEFAULT_PRESETS, Presets
from lib_merge.hosts.standalone import StandaloneHost
from lib_merge.service.merge_service import INFOTEXT_MERGE, INFOTEXT_RECIPE, MergeService
from lib_merge.service.pipeline import merge_to_file
from lib_merge.service.ratio_log import ratio_lines
from lib_merge.ui import values as uv
from lib_merge.ui.bar_chart import value_range
from lib_merge.ui.image_recipe import parse_parameters, recipe_of_image, values_from_supermerger
from lib_merge.ui.tab_analysis import analysis_outputs, block_chart, block_table, key_table, run_analysis
from lib_merge.ui.tab_elements import add_rule, element_rows, rule_for
from lib_merge.ui.tab_images import recipes_of_files
from lib_merge.ui.tab_metadata import metadata_text
from lib_merge.ui.tab_weight_tools import apply_helper, slider_limits

UNET = "model.diffusion_model."
BLOCKS = ["BASE", *[f"IN{i:02d}" for i in range(12)], "M00", *[f"OUT{i:02d}" for i in range(12)]]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("panels")
    a = sd1_model(0)
    save(a, folder / "a.safetensors")
    save(sd1_model(1, base=a, noise=0.2), folder / "b.safetensors")
    save(sd1_model(2, base=a, noise=0.5), folder / "c.safetensors")
    return folder


@pytest.fixture
def host(folder, tmp_path):
    return StandaloneHost(folder, tmp_path / "data")


def group(key):
    if key.startswith("cond_stage_model."):
        return "TE"
    if key.startswith("first_stage_model."):
        return "VAE"
    return sd1_block(key)


def expected_groups(folder, first="a", second="b"):
    """Per group, float64: (mean cosine %, min cosine %, relative L2 of the whole group)."""
    x, y = load_file(str(folder / f"{first}.safetensors")), load_file(str(folder / f"{second}.safetensors"))
    sums: dict[str, list] = {}
    for key, t in x.items():
        if "model" not in key or not t.is_floating_point():
            continue
        a, b = t.double().flatten(), y[key].double().flatten()
        cos = 100 * float(a @ b) / math.sqrt(float(a @ a) * float(b @ b))
        s = sums.setdefault(group(key), [[], 0.0, 0.0])
        s[0].append(cos)
        s[1] += float((a - b) @ (a - b))
        s[2] += float(a @ a)
    return {g: (sum(c) / len(c), min(c), math.sqrt(d / n)) for g, (c, d, n) in sums.items()}


# -- Analysis ------------------------------------------------------------------------------------------------------


def test_block_table_and_chart_show_the_float64_measures(host, folder):
    result = run_analysis(host, ["a.safetensors", "b.safetensors", ""])
    want = expected_groups(folder)
    headers, rows = block_table(result)
    assert headers[:5] == ["block", "keys", "A-B cos mean %", "A-B cos min %", "A-B rel L2"]
    assert {r[0] for r in rows} == set(want)
    for row in rows:
        mean, low, rel = want[row[0]]
        assert float(row[2]) == pytest.approx(mean, abs=1e-4) and float(row[3]) == pytest.approx(low, abs=1e-4)
        assert float(row[4]) == pytest.approx(rel, rel=1e-5)
    svg = block_chart(result, "relative L2 distance")
    drawn = {m.group(1): float(m.group(2)) for m in re.finditer(
        r'data-label="([^"]+)" data-series="A-B" data-value="([^"]+)"', svg)}
    assert drawn.keys() == want.keys()
    for label, value in drawn.items():
        assert value == pytest.approx(want[label][2], rel=1e-5)
    cos_svg = block_chart(result, "mean cosine similarity %")
    drawn = [float(v) for v in re.findall(r'data-value="([^"]+)"', cos_svg)]
    assert drawn == pytest.approx([want[g.group][0] for g in result.groups], abs=1e-4)
    with pytest.raises(MergeError, match="Unknown measure"):
        block_chart(result, "median")


def test_the_tables_are_values_gradio_takes(host):
    gr = pytest.importorskip("gradio")
    result = run_analysis(host, ["a.safetensors", "b.safetensors", ""])
    text, chart, blocks, keys = analysis_outputs(result)
    shown = gr.Dataframe(headers=["block"], value=[[""]], interactive=False).postprocess(blocks)
    assert shown["headers"] == block_table(result)[0] and shown["data"] == block_table(result)[1]
    shown = gr.Dataframe(headers=["key"], value=[[""]], interactive=False).postprocess(keys)
    assert [row[1] for row in shown["data"]] == [k.key for k in result.keys]
    assert "tensors compared" in text and "bm-bar" in chart


def test_three_models_give_three_pairs_per_key(host, folder):
    result = run_analysis(host, ["a.safetensors", "b.safetensors", "c.safetensors"])
    headers, rows = key_table(result)
    assert headers == ["block", "key", "A-B cos %", "A-B rel L2", "A-C cos %", "A-C rel L2", "B-C cos %",
                       "B-C rel L2"]
    states = {n: load_file(str(folder / f"{n}.safetensors")) for n in "abc"}
    for row in rows:
        key = row[1]
        assert row[0] == group(key)
        for column, (x, y) in zip((3, 5, 7), (("a", "b"), ("a", "c"), ("b", "c")), strict=True):
            a, b = states[x][key].double().flatten(), states[y][key].double().flatten()
            want = math.sqrt(float((a - b) @ (a - b)) / float(a @ a))
            assert float(row[column]) == pytest.approx(want, rel=1e-5, abs=1e-9), (key, x, y)


def test_analysis_reports_progress_and_stops_when_asked(folder):
    seen = []
    paths = [folder / "a.safetensors", folder / "b.safetensors"]
    compare_models(paths, progress=lambda done, total: seen.append((done, total)))
    total = len(load_file(str(paths[0])))
    assert seen == [(i, total) for i in range(total)]
    asked = []

    def cancel():
        asked.append(1)
        return len(asked) > 3

    with pytest.raises(MergeCancelled, match=f"after 3 of {total}"):
        compare_models(paths, cancel=cancel)


def test_analysis_refuses_too_few_or_repeated_models(host):
    with pytest.raises(MergeError, match="at least models A and B"):
        run_analysis(host, ["a.safetensors", "", ""])
    with pytest.raises(MergeError, match="different models"):
        run_analysis(host, ["a.safetensors", "a.safetensors", ""])
    with pytest.raises(MergeError, match="nothere"):
        run_analysis(host, ["a.safetensors", "nothere.safetensors", ""])


def test_stop_in_the_host_ends_the_analysis(host, monkeypatch):
    host.request_stop()  # a Stop pressed during the job (the job clears an earlier one first)
    original = host.job

    def job_then_stop(title):
        cm = original(title)

        class Stopped:
            def __enter__(self):
                cm.__enter__()
                host.request_stop()

            def __exit__(self, *exc):
                return cm.__exit__(*exc)
        return Stopped()

    monkeypatch.setattr(host, "job", job_then_stop)
    with pytest.raises(MergeCancelled):
        run_analysis(host, ["a.safetensors", "b.safetensors", ""])


def test_value_range_keeps_cosines_readable():
    assert value_range([99.2, 99.9], None, 100.0) == (pytest.approx(99.2 - 0.08 * 0.7), 100.0)
    assert value_range([0.01, 0.05], 0.0, None) == (0.0, pytest.approx(0.05 + 0.08 * 0.04))
    assert value_range([float("nan")]) == (0.0, 1.0)


# -- Elements ------------------------------------------------------------------------------------------------------


def test_a_clicked_row_becomes_a_rule_that_merges_exactly_that_key(folder, tmp_path):
    from lib_merge.analysis.elements import list_elements

    elements = list_elements(folder / "a.safetensors", "OUT")
    rows = element_rows(elements)
    row = next(r for r in rows if r[3].endswith(".weight") and r[1].startswith("OUT"))
    key, block = row[3], row[1]
    assert block == sd1_block(key)
    rule = rule_for(row, 0.9)
    assert rule == f"{block}:{key}:0.9"
    text = add_rule("OUT01:attn:0.2", rule)
    assert text == f"OUT01:attn:0.2\n{rule}" and add_rule(text, rule) == text
    out = tmp_path / "m.safetensors"
    merge_to_file(Recipe(str(folder / "a.safetensors"), str(folder / "b.safetensors"), alpha=0.25, elemental=rule),
                  out, history=None, metadata=False)
    merged = load_file(str(out))
    a, b = load_file(str(folder / "a.safetensors")), load_file(str(folder / "b.safetensors"))
    want = a[key].double() * 0.1 + b[key].double() * 0.9
    assert torch.allclose(merged[key].double(), want, atol=1e-6)
    other = next(k for k in a if k != key and sd1_block(k) == block and k.endswith(".weight") and "model" in k)
    assert torch.allclose(merged[other].double(), a[other].double() * 0.75 + b[other].double() * 0.25, atol=1e-6)


def test_rule_from_a_bad_row_or_ratio_is_refused():
    with pytest.raises(MergeError, match="list the keys"):
        rule_for(["", "", "", "", "", ""], 0.5)
    with pytest.raises(MergeError, match="must be a number"):
        rule_for(["1", "IN01", "", UNET + "input_blocks.1.0.x.weight", "4", "float32"], "half")


# -- Metadata ------------------------------------------------------------------------------------------------------


def test_metadata_of_a_merge_is_shown_by_section(host, folder):
    out = folder / "merged.safetensors"
    merge_to_file(Recipe(str(folder / "a.safetensors"), str(folder / "b.safetensors"), alpha=0.4), out,
                  overwrite=True, history=None)
    text = metadata_text(host, "merged.safetensors")
    recipe = json.loads(model_metadata(out)["sd_merge_recipe"])
    assert "Merge recipe (block-merger):" in text and f"  alpha: {recipe['alpha']}" in text
    assert "  mode: Weight sum" in text
    assert "Merged from:" in text and "a.safetensors" in text and "b.safetensors" in text
    out.unlink()


def test_training_metadata_and_files_without_metadata():
    meta = {"ss_network_dim": "32", "ss_tag_frequency": json.dumps({"set": {"cat": 3, "dog": 1}}),
            "modelspec.title": "x"}
    text = describe_metadata(meta)
    assert "Training metadata (2 fields):" in text and "  ss_network_dim: 32" in text
    assert "  ss_tag_frequency: 1 entries\n    set:\n      cat: 3\n      dog: 1\n" in text
    assert "Other:\n  modelspec.title: x" in text
    assert describe_metadata({}) == "No metadata in this file."


def test_metadata_of_a_ckpt_and_no_choice(host, folder):
    torch.save({"state_dict": {}}, folder / "old.ckpt")
    try:
        assert "not a safetensors file" in metadata_text(host, "old.ckpt")
    finally:
        (folder / "old.ckpt").unlink()
    with pytest.raises(MergeError, match="Choose a model"):
        metadata_text(host, "")


# -- IDs from images -----------------------------------------------------------------------------------------------


def quote(text):  # how the WebUI's infotext quotes a value (processing.create_infotext)
    return json.dumps(text, ensure_ascii=False) if any(c in str(text) for c in ",\n:") else text


def png(path, parameters=None):
    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


RECIPE = Recipe("a.safetensors", "b.safetensors", "c.safetensors", mode="Add difference", alpha=0.35,
                weights_alpha=",".join(str(round(0.04 * i, 2)) for i in range(26)), elemental="OUT06:attn:0.5",
                inex="Exclude", inex_blocks=("IN01",))


def block_merger_infotext(recipe=RECIPE):
    return (f"a cat, best\nNegative prompt: dog\nSteps: 20, Sampler: Euler a, Seed: 5, Size: 512x512, "
            f"Model: {quote(recipe.title())}, {INFOTEXT_MERGE}: {quote(recipe.title())}, "
            f"{INFOTEXT_RECIPE}: {quote(recipe.to_json())}")


def test_block_merger_infotext_gives_the_recipe_back():
    found = recipe_of_image({"parameters": block_merger_infotext()})
    v = found.values
    assert (v["model_a"], v["model_b"], v["model_c"], v["mode"], v["alpha"]) == \
        ("a.safetensors", "b.safetensors", "c.safetensors", "Add difference", 0.35)
    assert v["use_mbw"] and v["weights_alpha"] == RECIPE.weights_alpha and v["block_type"] == uv.SD1
    assert v["elemental"] == "OUT06:attn:0.5" and v["inex"] == "Exclude" and v["inex_blocks"] == ["IN01"]
    assert RECIPE.title() in found.source
    # the values rebuild the same recipe
    rebuilt = uv.recipe_from_values(**v, presets=Presets.load())
    assert rebuilt.fingerprint() == RECIPE.validate(Presets.load()).fingerprint()


def test_parameters_with_quoted_values():
    params = parse_parameters('p\nSteps: 3, Model: "x, y", Merge recipe: "{\\"a\\": 1}", Size: 8x8')
    assert params == {"Steps": "3", "Model": "x, y", "Merge recipe": '{"a": 1}', "Size": "8x8"}


def supermerger_history(path, rows):
    with path.open("w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([["ID", "time", "name"], *rows])
    return path


def sm_row(merge_id, weights="", use_mbw="False", mode="Weight sum:A*(1-alpha)+B*alpha", hashes=("aaaa1111bb",
           "cccc2222dd", "")):
    return [str(merge_id), "2024.01.01 10.00.00", "a x (1-0.3) + b x 0.3", weights, "", *hashes, "0.3", "0.1", mode,
            use_mbw, "", "['safetensors']", "[]", "IN05:attn:0.2", "cosineA", "42", "", "0.3", "Include",
            "['IN01', 'OUT02']", "['attn']"]


def test_supermerger_infotext_reads_its_history_row(tmp_path):
    weights = ",".join(["0.5"] * 20 + ["0"])  # SDXL with SuperMerger's padding 0
    history = supermerger_history(tmp_path / "mergehistory.csv", [sm_row(7), sm_row(12, weights, "True")])
    info = {"parameters": "cat\nSteps: 20, Seed: 1, Model: a x (1-0.3) + b x 0.3 ID 12, Version: v1.10.1"}
    names = ["a.safetensors [aaaa1111bb]", "other.safetensors [9999999999]"]
    found = recipe_of_image(info, history, names)
    v = found.values
    assert found.source == "SuperMerger merge ID 12 (a x (1-0.3) + b x 0.3)"
    assert v["model_a"] == "a.safetensors [aaaa1111bb]" and v["model_b"] == "" and v["model_c"] == ""
    assert found.notes == ("Model B (hash cccc2222dd) is not among the models; choose it.",)
    assert (v["mode"], v["calc"], v["alpha"], v["beta"], v["seed"], v["gamma"]) == \
        ("Weight sum", "cosineA", 0.3, 0.1, 42, 0.3)
    assert v["use_mbw"] and v["weights_alpha"] == ",".join(["0.5"] * 20) and v["block_type"] == uv.SDXL
    assert (v["inex"], v["inex_blocks"], v["inex_elements"], v["elemental"]) == \
        ("Include", ["IN01", "OUT02"], "attn", "IN05:attn:0.2")


def test_supermerger_row_failures(tmp_path):
    with pytest.raises(MergeError, match="Add nonsense"):
        values_from_supermerger(sm_row(1, mode="Add nonsense:x"), lambda h: None)
    info = {"parameters": "cat\nSteps: 20, Model: m ID 3"}
    with pytest.raises(MergeError, match="merge ID 3.*mergehistory.csv"):
        recipe_of_image(info, None)
    history = supermerger_history(tmp_path / "h.csv", [sm_row(7)])
    with pytest.raises(MergeError, match="Merge ID 3 is not in"):
        recipe_of_image(info, history)
    with pytest.raises(MergeError, match="Cannot read"):
        recipe_of_image(info, tmp_path / "missing.csv")
    (tmp_path / "short.csv").write_text("3,x,y\n")
    with pytest.raises(MergeError, match="3 columns"):
        recipe_of_image(info, tmp_path / "short.csv")


def test_images_without_a_recipe_say_why(tmp_path):
    paths = [png(tmp_path / "none.png"), png(tmp_path / "plain.png", "cat\nSteps: 20, Model: sd15, Seed: 1"),
             png(tmp_path / "failed.png", "cat\nSteps: 20, Merge error: \"the merge was not applied: x\""),
             tmp_path / "text.png"]
    paths[3].write_text("not an image")
    found, lines = recipes_of_files(paths)
    assert found is None
    assert "no generation info" in lines[0] and "carries no merge recipe" in lines[1]
    assert "after a merge failed" in lines[2] and "cannot be opened as an image" in lines[3]
    with pytest.raises(MergeError, match="Drop one or more"):
        recipes_of_files([])


def test_the_first_image_with_a_recipe_is_loaded(tmp_path):
    other = Recipe("x.safetensors", "y.safetensors", alpha=0.9)
    paths = [png(tmp_path / "none.png", "cat\nSteps: 2"), png(tmp_path / "one.png", block_merger_infotext()),
             png(tmp_path / "two.png", block_merger_infotext(other))]
    found, lines = recipes_of_files(paths)
    assert found.values["alpha"] == 0.35 and lines[1].startswith("one.png: loaded the Block Merger recipe")
    assert "not loaded" in lines[2]


def test_a_broken_recipe_in_an_image_is_reported():
    with pytest.raises(MergeError, match="recipe cannot be read"):
        recipe_of_image({"parameters": 'c\nSteps: 1, Merge recipe: "{\\"nonsense\\": 1}"'})


# -- block-weight helper, slider limits, user presets -----------------------------------------------------------


def test_helper_set_add_mul_on_groups():
    base = [round(0.03 * i, 2) for i in range(26)]
    text = ",".join(str(v) for v in base)
    for op, fn in (("Set", lambda v: 0.7), ("Add", lambda v: v + 0.7), ("Mul", lambda v: v * 0.7)):
        out = [float(t) for t in apply_helper(text, uv.SD1, [0.5] * 26, None, op, 0.7, ["IN", "MID"]).split(",")]
        for label, old, new in zip(BLOCKS, base, out, strict=True):
            want = fn(old) if label.startswith("IN") or label == "M00" else old
            assert new == pytest.approx(want, abs=1e-4), (op, label)


def test_helper_keeps_random_letters_and_handles_sdxl_and_presets():
    text = ",".join(["R"] + ["0.5"] * 25)
    assert apply_helper(text, uv.SD1, [0.5] * 26, None, "Add", 0.1, ["BASE", "OUT"]).split(",")[:2] == ["R", "0.5"]
    assert apply_helper(text, uv.SD1, [0.5] * 26, None, "Set", 1, ["BASE"]).split(",")[0] == "1"
    xl = apply_helper(",".join(["0.5"] * 20), uv.SDXL, [0.5] * 26, None, "Mul", 2, ["OUT"]).split(",")
    assert xl == ["0.5"] * 11 + ["1"] * 9
    presets = Presets.load()
    grad = presets.get("GRAD_V").split(",")
    out = apply_helper("GRAD_V", uv.SD1, [0.5] * 26, presets, "Mul", 1, ["BASE"]).split(",")
    assert [float(x) for x in out] == pytest.approx([float(x) for x in grad], abs=1e-4)
    # an incomplete text: the sliders are the values
    sliders = [0.1 * (i % 10) for i in range(26)]
    out = apply_helper("0.5,0.5", uv.SD1, sliders, None, "Add", 1, ["BASE"]).split(",")
    assert float(out[0]) == pytest.approx(1.0) and [float(x) for x in out[1:]] == pytest.approx(sliders[1:])


def test_helper_and_limits_refuse_bad_input():
    with pytest.raises(MergeError, match="Tick at least one group"):
        apply_helper("", uv.SD1, [0.5] * 26, None, "Set", 1, [])
    with pytest.raises(MergeError, match="must be a number"):
        apply_helper("", uv.SD1, [0.5] * 26, None, "Set", "x", ["IN"])
    with pytest.raises(MergeError, match="Unknown helper operation"):
        apply_helper("", uv.SD1, [0.5] * 26, None, "Div", 1, ["IN"])
    assert slider_limits(-2, 3) == (-2, 3)
    with pytest.raises(MergeError, match="below the maximum"):
        slider_limits(1, 1)
    with pytest.raises(MergeError, match="two numbers"):
        slider_limits(None, 1)


def test_user_presets_are_saved_beside_and_reloaded_never_touching_the_shipped_file(tmp_path):
    shipped = tmp_path / "mbwpresets.tsv"
    shipped.write_bytes(DEFAULT_PRESETS.read_bytes())
    before = shipped.read_bytes()
    user = tmp_path / "mbwpresets_user.tsv"
    presets = Presets.load_with_user(user, shipped)
    assert presets.paths == (shipped,) and "MY_PRESET\t" in presets.user_text()
    values = ",".join(["0.25"] * 26)
    count = presets.save_user(f"MINE\t{values}\nGRAD_V:{','.join(['1'] * 26)}\n\nRAND\t{','.join(['R'] * 26)}")
    assert count == 3 and presets.get("MINE") == values  # a first line that is a preset gets a header above it
    assert presets.get("GRAD_V") == ",".join(["1"] * 26)  # the user's entry replaces the shipped one
    assert "MINE" in presets.names() and shipped.read_bytes() == before
    assert user.read_text().splitlines()[0] == "preset_name\tpreset_weights"
    user.write_text(f"h\nLATER\t{values}\n")  # edited outside the tab
    presets.reload()
    assert presets.get("LATER") == values and presets.get("MINE") is None
    assert presets.get("GRAD_V") == Presets.load(shipped).get("GRAD_V")


def test_bad_user_presets_are_refused_and_the_file_kept(tmp_path):
    shipped = tmp_path / "s.tsv"
    shipped.write_text("h\nA\t" + ",".join(["1"] * 26) + "\n")
    presets = Presets.load_with_user(tmp_path / "u.tsv", shipped)
    with pytest.raises(MergeError, match=r"'B' \(line 3\): 'x'"):
        presets.save_user("h\nA\t0.5\nB\t0.5,x")
    with pytest.raises(MergeError, match="Line 2"):
        presets.save_user("h\njust words")
    assert not (tmp_path / "u.tsv").exists()
    assert Presets.load_with_user(shipped, shipped).user_path == shipped
    with pytest.raises(MergeError, match="shipped preset file"):
        Presets.load_with_user(shipped, shipped).save_user("h\nA\t1")


# -- generation request ---------------------------------------------------------------------------------------


def test_blank_generation_fields_take_the_live_txt2img_values():
    live = json.dumps({"prompt": "live cat", "negative_prompt": "live dog", "steps": 31, "sampler": "Euler a",
                       "scheduler": "Karras", "cfg_scale": 6.5, "width": 640, "height": 768, "batch_count": 3,
                       "batch_size": 2, "enable_hr": True, "hr_upscaler": "Latent", "hr_steps": 12, "denoising": 0.45,
                       "hr_scale": 1.5, "styles": ["s1", "s2"]})
    r = uv.request_from_values("", "", 0, "", 0, 0, 0, -1, 0, 0, uv.TXT2IMG, uv.TXT2IMG, [], uv.TXT2IMG, "", 0, 0, 0,
                               live)
    assert (r.prompt, r.negative_prompt, r.steps, r.sampler, r.scheduler, r.cfg_scale, r.width, r.height) == \
        ("live cat", "live dog", 31, "Euler a", "Karras", 6.5, 640, 768)
    assert (r.batch_count, r.batch_size, r.enable_hr, r.hr_upscaler, r.hr_steps, r.denoising_strength, r.hr_scale,
            r.styles, r.restore_faces, r.tiling, r.seed) == \
        (3, 2, True, "Latent", 12, 0.45, 1.5, ("s1", "s2"), None, None, -1)
    mine = uv.request_from_values("my cat", "", 7, "DDIM", 3, 256, 128, 5, 1, 2, "on", "off", ["x"], "off",
                                  "Lanczos", 4, 0.3, 2, live)
    assert (mine.prompt, mine.steps, mine.sampler, mine.scheduler, mine.cfg_scale, mine.width, mine.height) == \
        ("my cat", 7, "DDIM", "", 3, 256, 128)
    assert (mine.batch_count, mine.batch_size, mine.restore_faces, mine.tiling, mine.styles, mine.enable_hr) == \
        (2, 1, True, False, ("x",), False)
    none = uv.request_from_values(txt2img_live="not json")
    assert (none.steps, none.batch_count, none.enable_hr, none.styles, none.prompt) == (0, 0, False, (), "")
    odd = uv.request_from_values(txt2img_live=json.dumps({"steps": "many", "width": -8, "enable_hr": "yes"}))
    assert (odd.steps, odd.width, odd.enable_hr) == (0, 0, False)


@pytest.mark.parametrize("kwargs, message", [
    (dict(batch_count=-1), "Batch count cannot be negative"),
    (dict(hr_denoise=1.5), "between 0 and 1"),
    (dict(hr_scale="big"), "Upscale by must be a number"),
    (dict(restore_faces="maybe"), "restore_faces must be one of"),
    (dict(batch_size=-2), "Batch size cannot be negative"),
])
def test_bad_generation_fields_are_refused(kwargs, message):
    with pytest.raises(MergeError, match=message):
        uv.request_from_values(**kwargs)


# -- per-key ratio log, open models ---------------------------------------------------------------------------


def test_ratio_log_lists_every_key_with_its_block_weight(folder):
    from lib_merge.core.engine import Models, plan_merge
    from lib_merge.io.checkpoint import open_checkpoint

    weights = [round(0.02 * i, 2) for i in range(26)]
    recipe = Recipe(str(folder / "a.safetensors"), str(folder / "b.safetensors"),
                    weights_alpha=",".join(str(w) for w in weights))
    with open_checkpoint(folder / "a.safetensors") as a, open_checkpoint(folder / "b.safetensors") as b:
        plan = plan_merge(recipe, Models(a, b))
        lines = ratio_lines(plan)
    assert len(lines) == len(plan.jobs) + 1
    merged = [line for line in lines[1:] if " merge " in line]
    assert merged
    for line in merged:
        block, kind, alpha, beta, key = line.split()
        assert block == sd1_block(key) and kind == "merge"
        assert float(alpha.split("=")[1]) == pytest.approx(weights[BLOCKS.index(block)])


def test_log_ratios_writes_the_log_only_when_asked(folder, tmp_path, capsys):
    recipe = Recipe(str(folder / "a.safetensors"), str(folder / "b.safetensors"), alpha=0.3)
    merge_to_file(recipe, tmp_path / "x.safetensors", history=None, metadata=False)
    assert "Block Merger ratios" not in capsys.readouterr().err
    merge_to_file(recipe, tmp_path / "y.safetensors", history=None, metadata=False, log_ratios=True)
    err = capsys.readouterr().err
    assert "Block Merger ratios" in err and "alpha=0.3 " in err


def test_clear_cache_closes_the_open_models(host):
    service = MergeService(host, log_merges=False)
    service.plan(Recipe("a.safetensors", "b.safetensors"))
    assert service.open_model_names() == ["a.safetensors", "b.safetensors"]
    assert service.close() == 2 and service.open_model_names() == []
    assert service.close() == 0
