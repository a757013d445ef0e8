"""Hostile input from the user's side (issue 13): the CLI in a subprocess, the standalone app over HTTP, the fake
WebUI's routes. Every case ends in one clear message (exit 2 in the CLI), never a traceback, and leaves nothing
behind."""

from __future__ import annotations

import json
import socket
import struct

import httpx
import pytest
import torch
from conftest import synth_family
from safetensors import safe_open
from test_cli import run
from webui_fixture import webui_fixture  # noqa: F401  (provides the `webui` fixture)

from lib_merge.cli import synth
from lib_merge.io.history import History, HistoryWarning

DEEP = 100_000  # nesting levels: far past Python's recursion limit
CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"


def one_clean_line(res, *fragments: str) -> str:
    """The CLI refused with exit 2 and exactly one line on stderr holding every fragment (and no traceback)."""
    assert res.returncode == 2, (res.returncode, res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for fragment in fragments:
        assert fragment in lines[0], res.stderr
    return lines[0]


def leftovers(folder, *expected):
    """Files in `folder` (hidden temporaries included) other than the expected ones."""
    return sorted(p.name for p in folder.iterdir() if p.name not in expected)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hardening-models")
    a, b, c = synth_family(folder)
    return {"a": a, "b": b, "c": c, "folder": folder}


# --------------------------------------------------------------------------------------------------------------
# 9. the top-level usage error names the real command


@pytest.mark.parametrize("args", [(), ("frobnicate",), ("--no-such-option",)])
def test_top_level_usage_error_names_the_real_command(tmp_path, args):
    res = run(*args, cwd=tmp_path, env_home=tmp_path)
    line = one_clean_line(res, "(see `python -m lib_merge --help`)")
    assert "lib_merge lib_merge" not in line


def test_subcommand_usage_error_names_the_subcommand(tmp_path):
    res = run("merge", "--model-a", "x.safetensors", cwd=tmp_path, env_home=tmp_path)
    one_clean_line(res, "--output", "(see `python -m lib_merge merge --help`)")


# --------------------------------------------------------------------------------------------------------------
# 6. deeply nested JSON wherever JSON is read


def write_raw_safetensors(path, header: bytes, data: bytes = b""):
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def with_metadata(models, folder, name, metadata):
    """Model B again, with other metadata (a valid model whose metadata is hostile)."""
    out = folder / name
    with safe_open(str(models["b"]), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    synth.write_checkpoint(out, state, metadata)
    return out


def test_deeply_nested_safetensors_header_is_refused_in_merge_and_inspect(models, tmp_path):
    bad = write_raw_safetensors(tmp_path / "deep.safetensors", b"[" * DEEP + b"]" * DEEP)
    out = tmp_path / "out.safetensors"
    res = run("merge", "--model-a", str(models["a"]), "--model-b", str(bad), "--output", str(out), "--no-history",
              cwd=tmp_path, env_home=tmp_path / "data")
    one_clean_line(res, str(bad), "nested more than 64 levels")
    assert leftovers(tmp_path, "deep.safetensors", "data") == []
    res = run("inspect", str(bad), cwd=tmp_path, env_home=tmp_path / "data")
    one_clean_line(res, "nested more than 64 levels")


@pytest.mark.parametrize("field", ["sd_merge_recipe", "sd_merge_models"])
def test_deeply_nested_merge_metadata_of_a_valid_model_is_kept_as_text(models, tmp_path, field):
    text = "[" * DEEP + "]" * DEEP
    hostile = with_metadata(models, tmp_path, "hostile.safetensors", {field: text, "format": "pt"})
    res = run("inspect", str(hostile), cwd=tmp_path, env_home=tmp_path / "data")
    assert res.returncode == 0, res.stderr
    assert f"  {field}: {text}" in res.stdout.splitlines()  # shown as the text it is
    out = tmp_path / "out.safetensors"
    res = run("merge", "--model-a", str(models["a"]), "--model-b", str(hostile), "--output", str(out),
              "--history", str(tmp_path / "h.csv"), cwd=tmp_path, env_home=tmp_path / "data")
    assert res.returncode == 0, res.stderr
    with safe_open(str(out), "pt") as f:
        tree = json.loads(f.metadata()["sd_merge_models"])
    entries = {entry["name"]: entry for entry in tree.values()}
    assert set(entries) == {"a", "hostile"}
    if field == "sd_merge_recipe":  # the input's own recipe travels as the text it was
        assert entries["hostile"]["sd_merge_recipe"] == text


def test_deeply_nested_hash_cache_is_recomputed(models, tmp_path):
    data = tmp_path / "data" / "block-merger"
    data.mkdir(parents=True)
    (data / "hashes.json").write_text("[" * DEEP + "]" * DEEP)
    out = tmp_path / "out.safetensors"
    res = run("merge", "--model-a", str(models["a"]), "--model-b", str(models["b"]), "--output", str(out),
              "--no-history", cwd=tmp_path, env_home=tmp_path / "data")
    assert res.returncode == 0, res.stderr
    assert "hashes will be recomputed" in res.stderr and "Traceback" not in res.stderr
    cache = json.loads((data / "hashes.json").read_text())  # replaced by a good one
    assert len(cache["entries"]) == 2


def bad_history_row(history_path, merge_id: int, recipe_text: str) -> None:
    """A row whose recipe column holds `recipe_text` (as a hand-edited or hostile file would)."""
    import csv
    import io

    from lib_merge.io.history import COLUMNS

    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([str(merge_id), "2026.01.01 00.00.00", "bad"]
                                                  + [""] * (len(COLUMNS) - 4) + [recipe_text])
    with open(history_path, "a", encoding="utf-8") as f:
        f.write(buf.getvalue())


def test_one_deeply_nested_history_row_is_skipped_with_a_note(models, tmp_path):
    history = tmp_path / "h.csv"
    out = tmp_path / "one.safetensors"
    common = ("--model-a", str(models["a"]), "--model-b", str(models["b"]), "--history", str(history))
    assert run("merge", *common, "--output", str(out), cwd=tmp_path, env_home=tmp_path).returncode == 0
    bad_history_row(history, 2, "[" * 20_000 + "]" * 20_000)  # fits the csv module's field limit
    res = run("merge", *common, "--alpha", "0.25", "--output", str(tmp_path / "two.safetensors"), cwd=tmp_path,
              env_home=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    with pytest.warns(HistoryWarning, match="line 3 is incomplete or damaged"):
        rows = History(history).rows()
    assert [r["recipe"]["alpha"] for r in rows] == [0.5, 0.25]


# --------------------------------------------------------------------------------------------------------------
# the standalone app over HTTP


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class App:
    """The standalone app served in this process; `click(button, **fields)` presses a button over gradio's HTTP API
    with every other field at its default, and returns the outputs."""

    def __init__(self, models, data):
        from lib_merge.ui.app import HOST, serve

        self.models, self.data = models, data
        self.url = f"http://{HOST}:{free_port()}"
        self.app = serve(models, int(self.url.rsplit(":", 1)[1]), data, block=False)
        self.config = httpx.get(self.url + "/config", timeout=60).json()
        self.ids = {c["props"].get("elem_id"): c["id"] for c in self.config["components"]}
        self.defaults = {c["id"]: c["props"].get("value") for c in self.config["components"]}

    def click(self, button: str, **fields):
        """Run the button's event and every step chained after it (`.then`), as the page does."""
        deps = self.config["dependencies"]
        target = self.ids[button]
        index = next(i for i, d in enumerate(deps) if target in d["targets"] and d.get("trigger", "click") == "click")
        values = dict(self.defaults) | {self.ids[f"bm_{name}"]: value for name, value in fields.items()}
        seen: dict = {}
        while index is not None:
            dep = deps[index]
            data = [values[i] for i in dep["inputs"]]
            r = httpx.post(self.url + "/run/predict", json={"fn_index": index, "data": data}, timeout=600)
            assert r.status_code == 200, r.text
            for component, out in zip(dep["outputs"], r.json()["data"], strict=True):
                seen[self._elem(component)] = out
                is_update = isinstance(out, dict) and out.get("__type__") == "update"
                if not is_update or "value" in out:
                    values[component] = out["value"] if is_update else out
            index = next((i for i, d in enumerate(deps) if d.get("trigger_after") == index), None)
        return seen

    def _elem(self, component_id):
        return next((e for e, i in self.ids.items() if i == component_id), component_id)


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    pytest.importorskip("gradio")
    folder = tmp_path_factory.mktemp("app-models")
    synth_family(folder)
    served = App(folder, tmp_path_factory.mktemp("app-data"))
    yield served
    served.app.close()


def test_app_load_settings_and_search_survive_one_deeply_nested_history_row(app):
    history = app.data / "mergehistory.csv"
    history.unlink(missing_ok=True)
    History(history).append("good one", {"model_a": "a.safetensors", "model_b": "b.safetensors", "alpha": 0.75})
    bad_history_row(history, 2, '{"a":' * 20_000 + "1" + "}" * 20_000)
    out = app.click("bm_load_settings", merge_id=1)
    assert out["bm_message"] == "Loaded the settings of merge 1."
    assert out["bm_alpha"]["value"] == 0.75
    out = app.click("bm_load_settings", merge_id=2)
    assert out["bm_message"] == f"Error: No merge with ID 2 in history {history} (IDs 1-1 exist)."
    out = app.click("bm_search_btn", search="good")
    assert out["bm_message"] == "" and [row[2] for row in out["bm_history"]["data"]] == ["good one"]


def test_app_says_which_number_field_is_wrong(app):
    out = app.click("bm_save_file", model_a="a.safetensors", model_b="b.safetensors", alpha="half")
    assert out["bm_message"] == "Error: alpha must be a number, not 'half'."
    out = app.click("bm_save_file", model_a="a.safetensors", model_b="b.safetensors", gamma="inf")
    assert out["bm_message"] == "Error: gamma must be a finite number, not 'inf'."
    out = app.click("bm_save_file", model_a="a.safetensors", model_b="b.safetensors", seed=None)
    assert out["bm_message"] == "Error: seed is empty; enter a number."
    assert leftovers(app.models, "a.safetensors", "b.safetensors", "c.safetensors") == []


@pytest.mark.parametrize(("name", "problem"), [
    ("x" * 300, "The output name is 300 bytes long; at most 240 are allowed."),
    ("é" * 121, "The output name is 242 bytes long; at most 240 are allowed."),
    ("a:b", "contains ':', which Windows does not allow"),
    ('what?"<>|*', "contains '\"' '*' '<' '>' '?' '|', which Windows does not allow"),
    ("tab\there", "contains '\\t', which Windows does not allow"),
    ("bell\x07", "contains '\\x07', which Windows does not allow"),
    ("CON", "is a device name on Windows"),
    ("lpt1.safetensors", "is a device name on Windows"),
    ("nul .ckpt", "is a device name on Windows"),
    ("trailing.", "ends with '.', which Windows drops"),
], ids=["long", "long-utf8", "colon", "wildcards", "tab", "bell", "CON", "lpt1", "nul-space", "trailing-dot"])
def test_app_refuses_custom_names_no_file_system_takes_everywhere(app, name, problem):
    out = app.click("bm_save_file", model_a="a.safetensors", model_b="b.safetensors", custom_name=name)
    assert out["bm_message"].startswith("Error: ") and problem in out["bm_message"], out["bm_message"]
    assert "Unexpected" not in out["bm_message"]
    assert leftovers(app.models, "a.safetensors", "b.safetensors", "c.safetensors") == []


# --------------------------------------------------------------------------------------------------------------
# 12. bounded text fields


MEGA = 3_000_000


@pytest.mark.parametrize(("field", "value", "message"), [
    ("elemental", "OUT06:attn2:0.5," * (MEGA // 16), "The elemental field holds 3,000,000 characters; at most 10,000"),
    ("weights_alpha", "0.5," * (MEGA // 4), "The weights alpha field holds 3,000,000 characters; at most 4,000"),
    ("adjust", "0," * (MEGA // 2), "The adjust field holds 3,000,000 characters; at most 1,000"),
    ("inex_elements", "attn," * (MEGA // 5), "The inex elements field holds 3,000,000 characters; at most 4,000"),
    ("custom_name", "n" * MEGA, "The output name is 3000000 bytes long; at most 240"),
], ids=lambda v: v if isinstance(v, str) and len(v) < 20 else None)
def test_app_refuses_an_oversized_text_field_naming_it(app, field, value, message):
    fields = {"model_a": "a.safetensors", "model_b": "b.safetensors", "use_mbw": True,
              "weights_alpha": ",".join(["0.5"] * 26), "inex": "Include", "inex_elements": "attn", field: value}
    out = app.click("bm_save_file", **fields)
    assert out["bm_message"].startswith("Error: " + message), out["bm_message"][:200]
    assert leftovers(app.models, "a.safetensors", "b.safetensors", "c.safetensors") == []


def test_app_refuses_an_oversized_search(app):
    out = app.click("bm_search_btn", search="cat " * (MEGA // 4))
    assert out["bm_message"] == "Error: The search text holds 3,000,000 characters; at most 1,000 are allowed."


@pytest.mark.parametrize("option", ["--elemental", "--mbw", "--adjust", "--elements"])
def test_cli_refuses_an_oversized_text_option(models, tmp_path, option):
    value = "x" * 120_000  # one argv entry may hold up to 128 KiB on Linux
    res = run("merge", "--model-a", str(models["a"]), "--model-b", str(models["b"]), option, value,
              "--inex", "Include", "--output", str(tmp_path / "o.safetensors"), cwd=tmp_path, env_home=tmp_path)
    one_clean_line(res, "field holds 120,000 characters; at most")
    assert leftovers(tmp_path, "block-merger") == []


def test_an_elemental_field_at_its_limit_still_merges(models, tmp_path):
    """At the limit, every entry is a real rule the merge applies: the output is the formula with the last rule."""
    from lib_merge.core.recipe import TEXT_LIMITS

    entry = "IN01:proj_in:0.125,"
    text = entry * (TEXT_LIMITS["elemental"] // len(entry))
    out = tmp_path / "o.safetensors"
    res = run("merge", "--model-a", str(models["a"]), "--model-b", str(models["b"]), "--elemental", text,
              "--no-history", "--output", str(out), cwd=tmp_path, env_home=tmp_path)
    assert res.returncode == 0, res.stderr
    from safetensors.torch import load_file

    a, b, merged = load_file(models["a"]), load_file(models["b"]), load_file(out)
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    expected = (a[key].double() * 0.875 + b[key].double() * 0.125).to(a[key].dtype)
    assert torch.allclose(merged[key].double(), expected.double(), rtol=1e-3, atol=1e-4)


# --------------------------------------------------------------------------------------------------------------
# the fake WebUI: Stop during the last key (13), the REST routes behind --api / --api-auth (14)

ROUTES = (("GET", "/block-merger/presets"), ("POST", "/block-merger/merge"), ("POST", "/block-merger/restore"),
          ("GET", "/block-merger/history"))
WEBUI_RECIPE = {"model_a": "modelA.safetensors", "model_b": "modelB.safetensors", "alpha": 0.3}


@pytest.fixture
def webui_http(webui):
    """Start the fake WebUI's FastAPI app with the given command-line options; returns a TestClient on it."""
    fastapi = pytest.importorskip("fastapi")
    if getattr(fastapi, "__stub__", False):
        pytest.skip("fastapi is not installed")
    from fastapi.testclient import TestClient

    webui.load_entry_script()

    def start(**cmd_opts):
        for name, value in cmd_opts.items():
            setattr(webui.shared.cmd_opts, name, value)
        app = fastapi.FastAPI()
        webui.script_callbacks.app_started_callback(None, app)
        return TestClient(app)

    return start


def test_stop_pressed_during_the_last_key_cancels_the_load(webui, webui_http, monkeypatch):
    """The user presses Interrupt while the progress bar shows the last key: nothing is loaded or logged."""
    state_class = type(webui.shared.state)

    class StopDuringLastKey(state_class):
        def __setattr__(self, name, value):
            super().__setattr__(name, value)
            if name == "sampling_steps" and value and self.sampling_step == value:
                self.interrupted = True  # Interrupt clicked as the last key is being finished

    monkeypatch.setattr(webui.shared, "state", StopDuringLastKey())
    client = webui_http(api=True)
    before = webui.live()
    r = client.post("/block-merger/merge", json=WEBUI_RECIPE)
    assert r.status_code == 400 and "cancelled" in r.json()["detail"].lower(), r.text
    after = webui.live()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert client.get("/block-merger/history").json()["rows"] == []
    monkeypatch.setattr(webui.shared, "state", state_class())  # no Stop this time: the same merge loads
    r = client.post("/block-merger/merge", json=WEBUI_RECIPE)
    assert r.status_code == 200, r.text
    assert any(not torch.equal(before[k], v) for k, v in webui.live().items())


def test_api_auth_protects_every_route(webui_http):
    client = webui_http(api=True, api_auth="alice:s3cret:with-colon,bob:pw")
    for method, path in ROUTES:
        r = client.request(method, path)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Basic", (method, path, r.text)
        r = client.request(method, path, auth=("alice", "wrong"))
        assert r.status_code == 401, (method, path)
        r = client.request(method, path, auth=("mallory", "pw"))
        assert r.status_code == 401, (method, path)
    assert client.get("/block-merger/presets", auth=("bob", "pw")).status_code == 200
    r = client.post("/block-merger/merge", json=WEBUI_RECIPE, auth=("alice", "s3cret:with-colon"))
    assert r.status_code == 200, r.text
    r = client.get("/block-merger/history", auth=("bob", "pw"))
    assert [row["recipe"]["alpha"] for row in r.json()["rows"]] == [0.3]


def test_routes_are_open_without_api_auth(webui_http):
    client = webui_http(api=True)
    assert client.get("/block-merger/presets").status_code == 200
    assert client.post("/block-merger/merge", json=WEBUI_RECIPE).status_code == 200


@pytest.mark.parametrize("options", [{}, {"api_auth": "alice:pw"}], ids=["plain", "with-auth"])
def test_routes_are_not_served_without_api(webui_http, options):
    client = webui_http(api=False, **options)
    for method, path in ROUTES:
        assert client.request(method, path, auth=("alice", "pw")).status_code == 404, (method, path)


def test_nowebui_serves_the_routes(webui_http):
    """`--nowebui` serves only the API (the WebUI's api_only), so the routes are there without `--api`."""
    client = webui_http(api=False, nowebui=True)
    assert client.get("/block-merger/presets").status_code == 200


# --------------------------------------------------------------------------------------------------------------
# 7. damaged models, write failures and file names that are not UTF-8: one line, exit 2, nothing left


def edited_copy(models, path, edit):
    """Model A with `edit(state)` applied, saved to `path` (.safetensors, or .ckpt as a pickled state_dict)."""
    with safe_open(str(models["a"]), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    edit(state)
    if path.suffix == ".ckpt":
        torch.save({"state_dict": state}, path)
    else:
        synth.write_checkpoint(path, state)
    return path


@pytest.mark.parametrize(("key", "reshape"), [
    (CONV_IN, lambda t: t.reshape(t.shape[0], -1)),
    (CONV_IN, lambda t: t.reshape(-1)),
    ("model.diffusion_model.out.2.bias", lambda t: t.reshape(2, 2)),
    ("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", lambda t: t.reshape(-1)),
], ids=["conv_in-2d", "conv_in-1d", "out.2.bias-2d", "token_embedding-1d"])
def test_a_detection_key_with_another_rank_is_refused(models, tmp_path, key, reshape):
    def edit(state):
        state[key] = reshape(state[key]).contiguous()

    bad = edited_copy(models, tmp_path / "bad.safetensors", edit)
    shape = list(safe_open(str(bad), "pt").get_slice(key).get_shape())
    out = tmp_path / "out.safetensors"
    for a, b in ((bad, models["b"]), (models["b"], bad)):
        res = run("merge", "--model-a", str(a), "--model-b", str(b), "--adjust", "1,1,1,1,1,1,1,1", "--no-history",
                  "--output", str(out), cwd=tmp_path, env_home=tmp_path / "data")
        one_clean_line(res, f"{key} has shape {shape}", "(bad)")
    res = run("inspect", str(bad), cwd=tmp_path, env_home=tmp_path / "data")
    one_clean_line(res, f"{key} has shape {shape}")
    assert leftovers(tmp_path, "bad.safetensors") == []


@pytest.mark.parametrize("kind", ["sparse_coo", "sparse_csr", "quantized"])
def test_a_ckpt_with_non_dense_tensors_is_refused(models, tmp_path, kind):
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"

    def edit(state):
        t = state[key].float().reshape(state[key].shape[0], -1)
        state[key] = {"sparse_coo": t.to_sparse, "sparse_csr": t.to_sparse_csr,
                      "quantized": lambda: torch.quantize_per_tensor(t, 0.01, 0, torch.qint8)}[kind]()

    bad = edited_copy(models, tmp_path / "bad.ckpt", edit)
    out = tmp_path / "out.safetensors"
    res = run("merge", "--model-a", str(models["a"]), "--model-b", str(bad), "--no-history", "--output", str(out),
              cwd=tmp_path, env_home=tmp_path / "data")
    problem = "is quantized" if kind == "quantized" else f"is stored in the {kind} layout"
    one_clean_line(res, f"tensor {key!r} {problem}", str(bad))
    assert leftovers(tmp_path, "bad.ckpt") == []


def run_limited(*args, cwd, env_home, fsize: int):
    """`run`, in a process that may write files of at most `fsize` bytes (ulimit -f), as on a full disk."""
    import os
    import resource
    import subprocess
    import sys

    from test_cli import ROOT

    env = dict(os.environ, PYTHONPATH=str(ROOT), XDG_DATA_HOME=str(env_home))
    return subprocess.run([sys.executable, "-m", "lib_merge", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize)))


@pytest.mark.parametrize("ext", [".ckpt", ".safetensors"])
def test_an_output_past_the_file_size_limit_is_one_line_and_no_file(models, tmp_path, ext):
    limit = models["a"].stat().st_size // 2
    out = tmp_path / f"out{ext}"
    res = run_limited("merge", "--model-a", str(models["a"]), "--model-b", str(models["b"]), "--no-history",
                      "--no-metadata", "--quiet", "--output", str(out), cwd=tmp_path, env_home=tmp_path / "data",
                      fsize=limit)
    one_clean_line(res, f"Could not write {out}", "Nothing was saved")
    assert leftovers(tmp_path, "data") == []


def test_file_names_that_are_not_utf8_are_refused(models, tmp_path):
    import os
    import shutil

    folder = os.fsencode(tmp_path)
    odd_model = folder + b"/model-\xff.safetensors"
    shutil.copyfile(models["b"], odd_model)
    res = run("merge", "--model-a", str(models["a"]), "--model-b", odd_model, "--no-history",
              "--output", str(tmp_path / "out.safetensors"), cwd=tmp_path, env_home=tmp_path / "data")
    one_clean_line(res, "model-\\xff.safetensors is not valid UTF-8")
    res = run("inspect", odd_model, cwd=tmp_path, env_home=tmp_path / "data")
    one_clean_line(res, "model-\\xff.safetensors is not valid UTF-8")
    odd_output = folder + b"/out-\xfe\xfd.ckpt"
    res = run("merge", "--model-a", str(models["a"]), "--model-b", str(models["b"]), "--no-history",
              "--output", odd_output, cwd=tmp_path, env_home=tmp_path / "data")
    one_clean_line(res, "out-\\xfe\\xfd.ckpt is not valid UTF-8")
    assert sorted(os.listdir(folder)) == [b"data", b"model-\xff.safetensors"]
