"""The first merge after the WebUI loaded a checkpoint takes model A from the model's own tensors (service.as_loaded).

Run against the fake WebUI with the extension's entry script loaded, so its model-loaded callback sees the loads as
in the real WebUI. Every read of a checkpoint's tensor data is recorded, so a test sees which keys of A's file a
merge read. The merged values are checked against the float64 formula from the files' values, and bit for bit
against the engine's merge of the files alone (no live model involved), so a wrong "A" shows whichever way it came.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import assert_rounded
from safetensors.torch import load_file, save_file
from test_host_a1111 import UNET, expected
from webui_fixture import webui_fixture  # noqa: F401  (provides the `webui` fixture)

from lib_merge.cli import synth
from lib_merge.core.errors import MergeCancelled
from lib_merge.core.recipe import Recipe
from lib_merge.io.read import SafetensorsCheckpoint

WEIGHT_SUM = Recipe("modelA.safetensors", "modelB.safetensors", alpha=0.3)


@pytest.fixture
def reads(monkeypatch):
    """(file name, key) of every tensor read from a safetensors file."""
    seen: list[tuple[str, str]] = []
    real = SafetensorsCheckpoint._read_into

    def recording(self, view, offset, key):
        seen.append((self.path.name, key))
        return real(self, view, offset, key)

    monkeypatch.setattr(SafetensorsCheckpoint, "_read_into", recording)
    return seen


def loaded_through_the_webui(webui):
    """The entry script loaded (its model-loaded callback registered), then the WebUI loads model A again, as at a
    start where the model loads after the extensions. Returns the extension's own service."""
    entry = webui.load_entry_script()
    webui.sd_models.reload_model_weights(forced_reload=True)
    return entry.EXTENSION.service()


def live_keys(webui) -> set[str]:
    return {k for k in webui.live() if k.startswith(("model.", "cond_stage_model.", "first_stage_model."))
            and not k.endswith("position_ids")}


def keys_read(reads, name: str) -> set[str]:
    return {key for file, key in reads if file == name}


def assert_merged_from_files(webui, recipe: Recipe, alpha: float, a_values=None):
    """The live model is A(1-α)+Bα of the files' values, rounded once, and bit-identical to the files-only merge."""
    live = webui.live()
    a = a_values or load_file(str(webui.folder / "modelA.safetensors"))
    b = load_file(str(webui.folder / "modelB.safetensors"))
    files_only = expected(webui, recipe)
    for key in live_keys(webui):
        if key in b and a[key].is_floating_point() and key.startswith("model.diffusion_model."):
            exact = a[key].double() * (1 - alpha) + b[key].double() * alpha
            assert_rounded(live[key], exact, live[key].dtype, what=key)
        assert torch.equal(live[key], files_only[key].to(live[key].dtype)), key


def test_the_first_merge_after_a_load_reads_nothing_of_model_a(webui, reads):
    service = loaded_through_the_webui(webui)
    reads.clear()
    service.merge_and_load(WEIGHT_SUM)
    assert not keys_read(reads, "modelA.safetensors") & live_keys(webui)
    assert keys_read(reads, "modelB.safetensors")  # B is read as always
    assert_merged_from_files(webui, WEIGHT_SUM, 0.3)


def test_the_next_merge_reads_model_a_again(webui, reads):
    """The model holds the first merge now: every merged key of A comes from the file."""
    service = loaded_through_the_webui(webui)
    service.merge_and_load(WEIGHT_SUM)
    reads.clear()
    second = Recipe("modelA.safetensors", "modelB.safetensors", alpha=0.6)
    service.merge_and_load(second)
    assert keys_read(reads, "modelA.safetensors")
    assert_merged_from_files(webui, second, 0.6)


def test_a_tensor_written_by_someone_else_is_read_from_the_file(webui, reads):
    """Another extension changed one U-Net weight in place after the load: that key is read from A's file (the
    merge uses the file's values, not the changed ones), the others are not."""
    service = loaded_through_the_webui(webui)
    with torch.no_grad():
        webui.shared.sd_model.state_dict(keep_vars=True)[UNET].add_(1.0)
    reads.clear()
    service.merge_and_load(WEIGHT_SUM)
    assert keys_read(reads, "modelA.safetensors") & live_keys(webui) == {UNET}
    assert_merged_from_files(webui, WEIGHT_SUM, 0.3)


def test_a_file_rewritten_since_the_load_is_read_again(webui, reads):
    """A's file was rewritten in place with other values after the WebUI loaded it: the merge uses the file as it is
    now (the model's tensors hold the old values)."""
    service = loaded_through_the_webui(webui)
    path = webui.folder / "modelA.safetensors"
    old = load_file(str(path))
    new = {k: (v + 0.25).to(v.dtype) if v.is_floating_point() else v for k, v in old.items()}
    stat = os.stat(path)
    save_file(new, str(path))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with its old mtime put back
    reads.clear()
    service.merge_and_load(WEIGHT_SUM)
    assert live_keys(webui) <= keys_read(reads, "modelA.safetensors") | {k for k in live_keys(webui) if k not in old}
    assert_merged_from_files(webui, WEIGHT_SUM, 0.3, a_values=new)


def test_after_restore_the_first_merge_reads_nothing_of_model_a_again(webui, reads):
    service = loaded_through_the_webui(webui)
    service.merge_and_load(WEIGHT_SUM)
    service.restore_base()
    reads.clear()
    second = Recipe("modelA.safetensors", "modelB.safetensors", alpha=0.6)
    service.merge_and_load(second)
    assert not keys_read(reads, "modelA.safetensors") & live_keys(webui)
    assert_merged_from_files(webui, second, 0.6)


def test_add_difference_takes_a_from_the_model_too(webui, reads):
    service = loaded_through_the_webui(webui)
    recipe = Recipe("modelA.safetensors", "modelB.safetensors", "modelC.safetensors", mode="Add difference",
                    alpha=0.7)
    reads.clear()
    service.merge_and_load(recipe)
    assert not keys_read(reads, "modelA.safetensors") & live_keys(webui)
    live = webui.live()
    a, b, c = (load_file(str(webui.folder / f"model{x}.safetensors")) for x in "ABC")
    files_only = expected(webui, recipe)
    for key in live_keys(webui):
        if key.startswith("model.diffusion_model.") and key in b and key in c:
            exact = a[key].double() + (b[key].double() - c[key].double()) * 0.7
            assert_rounded(live[key], exact, live[key].dtype, what=key)
        assert torch.equal(live[key], files_only[key].to(live[key].dtype)), key


def test_a_model_from_the_webuis_checkpoint_cache_is_not_trusted(webui, reads):
    """The WebUI's RAM cache of checkpoints may hold a file's older values: such a load vouches for nothing."""
    webui.shared.opts.data["sd_checkpoint_cache"] = 1
    service = loaded_through_the_webui(webui)
    reads.clear()
    service.merge_and_load(WEIGHT_SUM)
    assert live_keys(webui) & {k for k in load_file(str(webui.folder / "modelA.safetensors"))} \
        <= keys_read(reads, "modelA.safetensors")
    assert_merged_from_files(webui, WEIGHT_SUM, 0.3)


def test_a_stop_in_the_first_merge_puts_the_loaded_values_back(webui):
    """The merge overwrites A's values in place as it goes; a Stop midway puts back every touched tensor, bit for
    bit, from the file."""
    service = loaded_through_the_webui(webui)
    before = webui.live()
    calls = []

    def stop_after_some_keys():
        calls.append(1)
        return len(calls) > 40

    with pytest.raises(MergeCancelled):
        service.merge_and_load(WEIGHT_SUM, cancel=stop_after_some_keys)
    after = webui.live()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    service.merge_and_load(WEIGHT_SUM)  # and the next merge is right (its tensors were written: read from file)
    assert_merged_from_files(webui, WEIGHT_SUM, 0.3)


def test_a_model_loaded_in_another_dtype_than_its_file_is_read_from_the_file(webui, reads):
    """The WebUI loads an fp32 file as fp16: the model holds rounded values, not the file's."""
    synth.make_checkpoint(webui.folder / "modelF.safetensors", "sd1", factor=16, dtype=torch.float32, seed=1)
    webui.sd_models.list_models()
    entry = webui.load_entry_script()
    webui.sd_models.reload_model_weights(info=webui.sd_models.get_closet_checkpoint_match("modelF.safetensors"))
    recipe = Recipe("modelF.safetensors", "modelB.safetensors", alpha=0.3)
    reads.clear()
    entry.EXTENSION.service().merge_and_load(recipe)
    assert live_keys(webui) <= keys_read(reads, "modelF.safetensors")
    live, files_only = webui.live(), expected(webui, recipe)
    assert all(torch.equal(live[k], files_only[k].to(live[k].dtype)) for k in live_keys(webui))


@pytest.mark.parametrize("mode,calc", [("Weight sum", "normal"), ("Add difference", "normal"),
                                       ("Add difference", "trainDifference"), ("Weight sum", "cosineA")])
def test_a_model_widened_to_fp32_on_a_cpu_takes_a_from_the_model(webui, reads, mode, calc):
    """With --no-half (the WebUI on a CPU) the model holds the fp16 file's values widened to fp32, exactly: the
    first merge reads no merged key of A's file, for piecewise formulas of every kind (A is narrowed from each piece
    before the piece is overwritten), and the model ends bit for bit as loading the merged fp16 file would leave it."""
    webui.shared.cmd_opts.no_half = True
    service = loaded_through_the_webui(webui)
    assert all(t.dtype == torch.float32 for k, t in webui.live().items() if k.startswith("model.diffusion_model."))
    uses_c = mode == "Add difference"
    recipe = Recipe("modelA.safetensors", "modelB.safetensors", "modelC.safetensors" if uses_c else "", mode=mode,
                    calc=calc, alpha=0.35)
    reads.clear()
    service.merge_and_load(recipe)
    a, b = (load_file(str(webui.folder / f"model{x}.safetensors")) for x in "AB")
    merged = {k for k in live_keys(webui) if k in b and k.startswith("model.diffusion_model.")}
    read_a = keys_read(reads, "modelA.safetensors") & merged
    if calc == "cosineA":  # its similarity pass reads A and B whole first; the merge itself reads no key of A again
        assert sum(1 for file, key in reads if file == "modelA.safetensors" and key in merged) == len(read_a)
    else:
        assert not read_a
    live, files_only = webui.live(), expected(webui, recipe)
    for key in live_keys(webui):
        assert torch.equal(live[key], files_only[key].to(live[key].dtype)), key
    if mode == "Weight sum" and calc == "normal":
        for key in merged:  # fp16 values (as the merged file holds), within rounding of the exact formula
            assert torch.equal(live[key], live[key].half().float()), key
            assert_rounded(live[key].half(), a[key].double() * 0.65 + b[key].double() * 0.35, torch.float16, what=key)
