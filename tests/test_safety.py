"""What is safe, tried from the user's side: the CLI as a subprocess on real files (issue 13).

Every refusal is one line on stderr and exit 2, with nothing written: no output, no temporary file, no history
row, every input byte for byte as before.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import synth_family
from safetensors.torch import load_file, save, save_file
from test_cli import ROOT, run

from lib_merge.core.weights import DEFAULT_PRESETS
from lib_merge.io.history import History

UNET = "model.diffusion_model.input_blocks.4.1.proj_in.weight"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("safety-models")
    a, b, c = synth_family(folder)
    vae = folder / "vae.safetensors"
    shutil.copyfile(c, vae)
    return {"a": a, "b": b, "c": c, "vae": vae, "folder": folder}


def snapshot(*paths: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in paths}


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


def merge_args(models, out, *extra):
    return ("merge", "--model-a", str(models["a"]), "--model-b", str(models["b"]), "--output", str(out), "--quiet",
            *extra)


def assert_refused(res, *words):
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert "Traceback" not in res.stderr


# -- 1. the output is never a file the merge reads --------------------------------------------------------------


def _aliases(work: Path, target: Path) -> dict[str, Path]:
    """Other spellings of `target` inside `work`: a symlink, a `..` path, a hardlink."""
    (work / "sub").mkdir()
    link = work / "link.safetensors"
    link.symlink_to(target)
    hard = work / "hard.safetensors"
    os.link(target, hard)
    return {"same": target, "symlink": link, "dotdot": work / "sub" / ".." / target.name, "hardlink": hard}


@pytest.mark.parametrize("spelling", ["same", "symlink", "dotdot", "hardlink"])
def test_the_vae_to_bake_is_never_the_output(models, tmp_path, spelling):
    vae = tmp_path / "vae.safetensors"
    shutil.copyfile(models["vae"], vae)
    out = _aliases(tmp_path, vae)[spelling]
    before = snapshot(vae, models["a"], models["b"])
    res = run(*merge_args(models, out, "--bake-vae", str(vae), "--overwrite"), cwd=tmp_path, env_home=tmp_path)
    assert_refused(res, "a file this merge reads")
    assert snapshot(vae, models["a"], models["b"]) == before
    assert leftovers(tmp_path) == []
    assert (tmp_path / "link.safetensors").is_symlink()


@pytest.mark.parametrize("slot", ["a", "b"])
def test_a_hardlinked_model_is_never_the_output(models, tmp_path, slot):
    hard = tmp_path / "out.safetensors"
    os.link(models[slot], hard)
    before = snapshot(models["a"], models["b"])
    res = run(*merge_args(models, hard, "--overwrite"), cwd=tmp_path, env_home=tmp_path)
    assert_refused(res, "a file this merge reads")
    assert snapshot(models["a"], models["b"]) == before


def test_the_preset_file_is_never_the_output(models, tmp_path):
    link = tmp_path / "presets.safetensors"
    link.symlink_to(DEFAULT_PRESETS)
    before = DEFAULT_PRESETS.read_bytes()
    res = run(*merge_args(models, link, "--overwrite"), cwd=tmp_path, env_home=tmp_path)
    assert_refused(res, "a file this merge reads")
    assert link.is_symlink() and DEFAULT_PRESETS.read_bytes() == before


def test_the_history_is_never_the_output(models, tmp_path):
    out = tmp_path / "out.safetensors"
    res = run(*merge_args(models, out, "--history", str(out)), cwd=tmp_path, env_home=tmp_path)
    assert_refused(res)
    assert not out.exists() and leftovers(tmp_path) == []


# -- 4. the history is checked before any tensor is read --------------------------------------------------------


@pytest.mark.parametrize("what", ["model a", "model b", "the vae", "the output", "hardlink of a", "folder",
                                  "under a file", "read-only"])
def test_a_history_that_cannot_take_the_row_is_refused_before_merging(models, tmp_path, what):
    out = tmp_path / "out.safetensors"
    vae = tmp_path / "vae.safetensors"
    shutil.copyfile(models["vae"], vae)
    history = {"model a": models["a"], "model b": models["b"], "the vae": vae, "the output": out,
               "hardlink of a": tmp_path / "hist.csv", "folder": tmp_path / "hist.csv",
               "under a file": tmp_path / "plain.txt" / "hist.csv", "read-only": tmp_path / "ro" / "hist.csv"}[what]
    if what == "hardlink of a":
        os.link(models["a"], history)
    elif what == "folder":
        history.mkdir()
    elif what == "under a file":
        history.parent.write_text("not a folder")
    elif what == "read-only":
        if os.geteuid() == 0:
            pytest.skip("root may write anywhere")
        history.parent.mkdir()
        history.write_text("")
        history.chmod(0o444)
    before = snapshot(models["a"], models["b"], vae)
    res = run(*merge_args(models, out, "--bake-vae", str(vae), "--history", str(history)), cwd=tmp_path,
              env_home=tmp_path)
    assert_refused(res, "history")
    assert not out.exists() and leftovers(tmp_path) == []
    assert snapshot(models["a"], models["b"], vae) == before


@pytest.mark.parametrize("content", [b"\x00\x01garbage\xff\n" * 50, b'"ID","time","name","model A"\n1,2,x,a\n',
                                     b"id,time,name\n1,2,3\n"], ids=["binary", "seed-header", "short-header"])
def test_a_foreign_history_is_set_aside_and_a_new_one_started(models, tmp_path, content):
    out = tmp_path / "out.safetensors"
    history = tmp_path / "logs" / "history.csv"
    history.parent.mkdir()
    history.write_bytes(content)
    res = run(*merge_args(models, out, "--history", str(history)), cwd=tmp_path, env_home=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "logged as merge 1" in res.stdout
    aside = [p for p in history.parent.iterdir() if p.name.startswith("history.not-history-")]
    assert len(aside) == 1 and aside[0].read_bytes() == content  # kept, never deleted
    warning = [ln for ln in res.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warning) == 1 and aside[0].name in warning[0]
    assert [r["id"] for r in History(history).rows()] == [1]


def test_one_damaged_row_is_skipped_not_the_history(models, tmp_path):
    history = tmp_path / "history.csv"
    log = History(history)
    for i in range(3):
        log.append(f"m{i}", {"i": i})
    lines = history.read_bytes().split(b"\n")
    lines[2] = b"2,garbage\x00,\"unclosed"  # row 2 damaged
    history.write_bytes(b"\n".join(lines))
    res = run(*merge_args(models, tmp_path / "out.safetensors", "--history", str(history)), cwd=tmp_path,
              env_home=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "logged as merge 4" in res.stdout
    with pytest.warns(UserWarning, match="line 3"):
        assert [r["id"] for r in log.rows()] == [1, 3, 4]


# -- 5. non-finite results -------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, ratio", [
    (("--alpha", "1e30"), "alpha 1e+30"),
    (("--alpha=-3e38",), "alpha -3e+38"),
    (("--mode", "Add difference", "--alpha", "1e30"), "alpha 1e+30"),
    (("--mode", "Triple sum", "--alpha", "0.1", "--beta", "1e30"), "beta 1e+30"),
    (("--mode", "sum Twice", "--alpha", "0.1", "--beta", "1e30"), "beta 1e+30"),
    (("--mbw", "0.5," * 13 + "1e30," + "0.5," * 11 + "0.5"), "alpha 1e+30"),  # M00 only
    (("--calc", "self", "--alpha", "1e30"), "alpha 1e+30"),
])
def test_a_merge_that_overflows_is_an_error_naming_key_and_ratio(models, tmp_path, args, ratio):
    out = tmp_path / "out.safetensors"
    history = tmp_path / "h.csv"
    res = run("merge", "--model-a", str(models["a"]), "--model-b", str(models["b"]), "--model-c", str(models["c"]),
              *args, "--output", str(out), "--history", str(history), "--quiet", cwd=tmp_path, env_home=tmp_path)
    assert_refused(res, "inf/NaN", ratio, "model.")
    assert not out.exists() and leftovers(tmp_path) == [] and not history.exists()


def test_saving_as_fp16_what_overflows_fp16_is_an_error(models, tmp_path):
    for name, value in (("a", 1000.0), ("b", 60000.0)):  # fp32 models; A + 2 (B - A) = 119000 > fp16's 65504
        state = {k: v.float() for k, v in load_file(models[name]).items()}
        state[UNET].fill_(value)
        save_file(state, tmp_path / f"{name}.safetensors")
    out = tmp_path / "out.safetensors"
    res = run("merge", "--model-a", str(tmp_path / "a.safetensors"), "--model-b", str(tmp_path / "b.safetensors"),
              "--alpha", "2", "--save-dtype", "fp16", "--output", str(out), "--no-history", "--quiet", cwd=tmp_path,
              env_home=tmp_path)
    assert_refused(res, "inf/NaN", UNET, "fp16")
    assert not out.exists() and leftovers(tmp_path) == []


def test_an_input_holding_nan_gives_a_warning_naming_model_and_key(models, tmp_path):
    state = load_file(models["b"])
    state[UNET][0, 0] = float("nan")
    nan_b = tmp_path / "nanB.safetensors"
    save_file(state, nan_b)
    out = tmp_path / "out.safetensors"
    res = run("merge", "--model-a", str(models["a"]), "--model-b", str(nan_b), "--output", str(out),
              "--no-history", "--quiet", cwd=tmp_path, env_home=tmp_path)
    assert res.returncode == 0, res.stderr
    [warning] = _warnings(res)
    assert "Model B (nanB)" in warning and UNET in warning, res.stderr
    assert torch.isnan(load_file(out)[UNET][0, 0])


def _warnings(res) -> list[str]:
    return [ln for ln in res.stderr.splitlines() if ln.startswith("warning:")]


def test_an_input_nan_a_tensor_swap_leaves_out_is_still_named(models, tmp_path):
    """A tensor swap takes some rows of B and leaves the rest: a NaN in a row it leaves never reaches the result, so
    the result's check cannot see it, and the inputs are checked too; the model is named, the result is finite."""
    state = load_file(models["b"])
    rows = state[UNET].shape[0]
    state[UNET][rows - 1, 0] = float("nan")  # the last row: outside rows [0, rows/4) that the swap takes from B
    nan_b = tmp_path / "nanB.safetensors"
    save_file(state, nan_b)
    out = tmp_path / "out.safetensors"
    res = run("merge", "--model-a", str(models["a"]), "--model-b", str(nan_b), "--calc", "tensor", "--alpha", "0.25",
              "--beta", "0", "--output", str(out), "--no-history", "--quiet", cwd=tmp_path, env_home=tmp_path)
    assert res.returncode == 0, res.stderr
    [warning] = _warnings(res)
    assert "Model B (nanB)" in warning and UNET in warning and "did not take them" in warning, res.stderr
    merged = load_file(out)[UNET].double()
    a, b = load_file(models["a"])[UNET].double(), state[UNET].double()
    taken = rows // 4
    assert torch.isfinite(merged).all()
    assert torch.equal(merged[:taken], b[:taken]) and torch.equal(merged[taken:], a[taken:])


def test_an_input_nan_that_dare_drops_is_still_named(models, tmp_path):
    """DARE drops entries at random: whether the NaN of model 1 is dropped (a finite result) or kept (passed on),
    the model is named; over ten seeds at p = 0.9 it is dropped at least once, so both paths run."""
    state = load_file(models["b"])
    state[UNET][0, 0] = float("nan")
    nan_b = tmp_path / "nanB.safetensors"
    save_file(state, nan_b)
    hidden = 0
    for seed in range(10):
        out = tmp_path / f"out{seed}.safetensors"
        res = run("merge", "--method", "dare", "--base", str(models["a"]), "--model", str(nan_b), "--drop", "0.9",
                  "--seed", str(seed), "--output", str(out), "--no-history", "--quiet", cwd=tmp_path,
                  env_home=tmp_path)
        assert res.returncode == 0, res.stderr
        [warning] = _warnings(res)
        assert "(nanB)" in warning and UNET in warning, res.stderr
        hidden += bool(torch.isfinite(load_file(out)[UNET][0, 0]))
    assert hidden >= 1


def test_an_input_nan_that_ties_leaves_out_is_still_named(models, tmp_path):
    """TIES' sign election: a NaN task-vector entry makes the elected sign NaN, which no entry agrees with, so the
    result there is the base (finite); the model holding the NaN is named all the same."""
    state = load_file(models["b"])
    state[UNET][0, 0] = float("nan")
    nan_b = tmp_path / "nanB.safetensors"
    save_file(state, nan_b)
    out = tmp_path / "out.safetensors"
    res = run("merge", "--method", "ties", "--base", str(models["a"]), "--model", str(nan_b), "--density", "0.5",
              "--output", str(out), "--no-history", "--quiet", cwd=tmp_path, env_home=tmp_path)
    assert res.returncode == 0, res.stderr
    [warning] = _warnings(res)
    assert "(nanB)" in warning and UNET in warning, res.stderr
    assert torch.equal(load_file(out)[UNET][0, 0], load_file(models["a"])[UNET][0, 0])


def test_a_key_found_finite_is_not_checked_again_where_that_is_exact(models, monkeypatch):
    """A Weight sum at 0 < alpha < 1 of fp16 into fp16 is finite exactly where both inputs are: once a key came out
    finite, later merges of the same open files skip its check (the live model's merge after merge). Every other
    ratio is checked as before, and a file opened anew is checked again."""
    from lib_merge.core import finite
    from lib_merge.core.engine import DictSink, Models, plan_merge, run_merge
    from lib_merge.core.errors import MergeError
    from lib_merge.core.recipe import Recipe
    from lib_merge.io.read import open_checkpoint

    checked = []
    real = finite.all_finite
    monkeypatch.setattr(finite, "all_finite", lambda t: checked.append(t.numel()) or real(t))
    a, b = open_checkpoint(models["a"]), open_checkpoint(models["b"])
    fp16 = [k for k in a.keys() if a.dtype(k) == torch.float16 and b.dtype(k) == torch.float16]

    def merge(alpha, left=a, right=b):
        checked.clear()
        recipe = Recipe(str(models["a"]), str(models["b"]), alpha=alpha)
        both = Models(left, right)
        return run_merge(plan_merge(recipe, both), both, DictSink(), threads=1)

    first = merge(0.3)
    assert sum(checked) >= sum(a.get(k).numel() for k in fp16)  # every key checked the first time
    assert set(fp16) <= a.finite_keys and set(fp16) <= b.finite_keys
    second = merge(0.6)
    assert sum(checked) == 0  # the fp16 keys merged where that is exact, the others copies of keys found finite
    for key in fp16:  # and the result is still the formula's, rounded once
        expected = a.get(key).double() * 0.4 + b.get(key).double() * 0.6
        assert torch.allclose(second[key].double(), expected, rtol=2 ** -10, atol=2 ** -24), key
    assert not torch.equal(first[fp16[0]], second[fp16[0]])
    with pytest.raises(MergeError, match="inf/NaN"):  # not between the inputs: checked, and refused
        merge(1e30)
    merge(1.5)  # outside (0, 1): every key checked again
    assert sum(checked) >= sum(a.get(k).numel() for k in fp16)
    fresh = open_checkpoint(models["a"])  # a file opened anew (as after a change on disk) knows nothing yet
    assert not fresh.finite_keys
    merge(0.3, left=fresh)
    assert sum(checked) >= sum(a.get(k).numel() for k in fp16)


def test_a_file_found_finite_is_not_checked_again_by_the_next_run(models, tmp_path, monkeypatch):
    """The hash cache remembers a file whose every key a merge found finite (keyed by size, mtime, inode and ctime):
    the next run (new checkpoints, new cache object, as a new CLI process) checks nothing of it; the same file
    rewritten in place with its mtime put back is checked again, and a file holding NaN is never remembered."""
    from lib_merge.core import finite
    from lib_merge.core.finite import NonFiniteWarning
    from lib_merge.core.recipe import Recipe
    from lib_merge.io.hashes import HashCache
    from lib_merge.service.pipeline import merge_to_file

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    shutil.copyfile(models["a"], a)
    shutil.copyfile(models["b"], b)
    store = tmp_path / "hashes.json"
    checked = []
    real = finite.all_finite
    monkeypatch.setattr(finite, "all_finite", lambda t: checked.append(t.numel()) or real(t))
    merged_numel = sum(t.numel() for t in load_file(a).values() if t.is_floating_point())

    def run_once(n, right=b):
        checked.clear()
        merge_to_file(Recipe(str(a), str(right), alpha=0.3), tmp_path / f"out{n}.safetensors", hashes=HashCache(store),
                      metadata=False)
        return sum(checked)

    assert run_once(1) >= merged_numel
    assert run_once(2) == 0
    entries = json.loads(store.read_text())["entries"]
    assert {Path(k).name for k, v in entries.items() if v.get("finite") is True} == {"a.safetensors", "b.safetensors"}
    st = b.stat()
    while time.time_ns() < st.st_ctime_ns + 50_000_000:  # the next write gets a later ctime (coarse kernel clock)
        time.sleep(0.01)
    state = load_file(b)
    key = next(k for k, v in state.items() if v.dtype == torch.float16)
    state[key].view(-1)[0] = float("nan")
    data = save(state)
    with open(b, "r+b") as f:  # same size, same inode; the mtime put back
        f.write(data)
    os.utime(b, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.warns(NonFiniteWarning, match=key):
        assert run_once(3) > 0  # B is checked again (and A, known finite, is not the whole count)
    with pytest.warns(NonFiniteWarning, match=key):
        assert run_once(4) > 0  # B holds NaN: never remembered


def test_a_key_holding_nan_is_never_taken_for_finite(models, tmp_path):
    from lib_merge.core.engine import DictSink, Models, plan_merge, run_merge
    from lib_merge.core.finite import NonFiniteWarning
    from lib_merge.core.recipe import Recipe
    from lib_merge.io.read import open_checkpoint

    state = load_file(models["b"])
    key = next(k for k, v in state.items() if v.dtype == torch.float16 and k.startswith("model.diffusion_model."))
    state[key] = state[key].clone()
    state[key].view(-1)[0] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"))
    a, b = open_checkpoint(models["a"]), open_checkpoint(tmp_path / "nan.safetensors")
    recipe = Recipe(str(models["a"]), str(tmp_path / "nan.safetensors"), alpha=0.3)
    for _ in range(2):  # warned each time: the key is never marked finite
        with pytest.warns(NonFiniteWarning, match=key):
            run_merge(plan_merge(recipe, Models(a, b)), Models(a, b), DictSink(), threads=1)
        assert key not in b.finite_keys and key not in a.finite_keys


# -- 10. SIGTERM / SIGHUP mid-merge leave nothing ---------------------------------------------------------------

SIGNAL_AT_KEY = """
import os, signal, sys
import lib_merge.cli.main as cli
real = cli.progress_bar
def progress_bar(desc, quiet=False):
    update, close = real(desc, True)
    def signalled(done, total):
        if done == 20:
            print("signalled", flush=True)
            os.kill(os.getpid(), int(sys.argv[1]))
        update(done, total)
    return signalled, close
cli.progress_bar = progress_bar
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP", "SIGINT"])
@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_a_stop_signal_mid_merge_leaves_no_file(models, tmp_path, signame, suffix):
    if not hasattr(signal, signame):
        pytest.skip(f"no {signame} here")
    signum = getattr(signal, signame)
    out = tmp_path / f"out{suffix}"
    history = tmp_path / "h.csv"
    env = dict(os.environ, PYTHONPATH=str(ROOT), XDG_DATA_HOME=str(tmp_path))
    res = subprocess.run([sys.executable, "-c", SIGNAL_AT_KEY, str(signum), *merge_args(models, out, "--threads",
                          "1", "--history", str(history))], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert "signalled" in res.stdout, res.stderr
    assert res.returncode in (128 + signum, 130), res.stderr
    assert "cancelled" in res.stderr and "Traceback" not in res.stderr
    assert not out.exists() and leftovers(tmp_path) == [] and not history.exists()


@pytest.mark.skipif(os.name == "nt", reason="a PID is never taken for gone on Windows")
def test_a_save_killed_outright_leaves_a_file_the_next_save_removes(models, tmp_path):
    """SIGKILL (or the WebUI's os._exit on Ctrl+C, or a power cut) runs no clean-up: the temporary file stays. The
    next save into that folder removes it once its process is gone and it has lain untouched for ten minutes; a
    file of a running process, or a recent one, is kept."""
    killed = tmp_path / "killed.safetensors"
    env = dict(os.environ, PYTHONPATH=str(ROOT), XDG_DATA_HOME=str(tmp_path))
    res = subprocess.run([sys.executable, "-c", SIGNAL_AT_KEY, str(signal.SIGKILL), *merge_args(models, killed,
                          "--threads", "1", "--no-history")], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert "signalled" in res.stdout and res.returncode == -signal.SIGKILL, res.stderr
    [orphan] = leftovers(tmp_path)
    running = tmp_path / f".other.safetensors.tmp-{os.getpid()}-0123abcd"  # this test's own process: running
    running.write_bytes(b"x")
    long_ago = time.time() - 11 * 60
    for path in (tmp_path / orphan, running):
        os.utime(path, (long_ago, long_ago))

    from lib_merge.cli.main import main

    assert main(list(merge_args(models, tmp_path / "recent.safetensors", "--no-history"))) == 0
    assert leftovers(tmp_path) == [running.name]  # the orphan is gone, the running writer's file stays
    assert not killed.exists()
    # a file of a gone process that changed within ten minutes stays too (another namespace's writer, maybe)
    recent_orphan = tmp_path / orphan
    recent_orphan.write_bytes(b"x")
    assert main(list(merge_args(models, tmp_path / "third.safetensors", "--no-history"))) == 0
    assert sorted(leftovers(tmp_path)) == sorted([running.name, orphan])


# -- 16. the merged file is fsynced before the rename that publishes it -----------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_the_output_is_fsynced_before_it_is_renamed_into_place(models, tmp_path, monkeypatch, suffix):
    from lib_merge.cli.main import main

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        return real_fsync(fd)

    def replace(src, dst, *a, **k):
        events.append(("replace", os.stat(src).st_ino, Path(dst).name))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    out = tmp_path / f"out{suffix}"
    assert main(list(merge_args(models, out, "--no-history"))) == 0
    published = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == out.name]
    assert len(published) == 1
    inode = events[published[0]][1]
    assert inode == out.stat().st_ino
    assert ("fsync", inode) in events[: published[0]], events


FINITE_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64,
                 *(d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if d)]


@pytest.mark.parametrize("dtype", FINITE_DTYPES, ids=str)
def test_all_finite_is_exact_for_every_float_dtype(dtype):
    """all_finite against torch.isfinite, element by element: inf and NaN anywhere (first, middle, last, in a
    transposed view), and the largest finite values, whose sum overflows but which are finite."""
    from lib_merge.core.finite import all_finite

    largest = torch.finfo(dtype).max
    base = (torch.randn(64, 33, generator=torch.Generator().manual_seed(3)) * 0.5).to(dtype)
    cases = {"random": base, "largest": torch.full((1000,), largest, dtype=torch.float64).to(dtype),
             "empty": torch.empty(0, dtype=dtype)}
    specials = [float("inf"), float("-inf"), float("nan")] if dtype != getattr(torch, "float8_e4m3fn", None) \
        else [float("nan")]  # e4m3fn has no inf
    for value in specials:
        for where in (0, 1000, 64 * 33 - 1):
            t = base.clone()
            t.view(-1)[where] = value
            cases[f"{value}@{where}"] = t
        t = base.clone().t()
        t[5, 7] = value
        cases[f"{value} in a transposed view"] = t
    for name, t in cases.items():
        assert all_finite(t) == bool(torch.isfinite(t.double()).all()), name
    assert all_finite(torch.arange(5))  # not a float tensor: nothing to check
