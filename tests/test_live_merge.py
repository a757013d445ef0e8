"""Merging straight into the loaded model's own tensors (issue 12, targets 1, 2 and 4), against the fake WebUI.

No state dict is built and no copy of the overwritten tensors is kept: a merge that fails anywhere (first key,
middle, after every key was written, halfway through an incremental re-merge) is undone by recomputing the touched
tensors with the previous recipe or copying them from the base checkpoint file. Every test compares the weights
after the fault with the weights before it, bit for bit.
"""

from __future__ import annotations

import gc

import pytest
import torch
from test_host_a1111 import RECIPE, UNET, assert_live_is, expected, image_bytes, service_of
from webui_fixture import webui_fixture  # noqa: F401  (provides the `webui` fixture)

from lib_merge.core.errors import MergeCancelled, MergeError
from lib_merge.core.recipe import Recipe

OTHER = Recipe("modelA.safetensors", "modelC.safetensors", alpha=0.8)
BC = Recipe("modelB.safetensors", "modelC.safetensors", mode="Weight sum", alpha=0.6)


class Fault(RuntimeError):
    pass


def storages(tensors) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


def model_storages(model) -> set[int]:
    return storages([*model.parameters(), *model.buffers()])


def foreign_bytes(model) -> int:
    """Bytes of every CPU tensor storage alive in this process that is not the model's own."""
    own = model_storages(model)
    seen, total = set(), 0
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and obj.device.type == "cpu" and not obj.is_meta:
            storage = obj.untyped_storage()
            ptr = storage.data_ptr()
            if ptr and ptr not in own and ptr not in seen:
                seen.add(ptr)
                total += storage.nbytes()
    return total


def assert_same(after, before) -> None:
    assert after.keys() == before.keys()
    assert [k for k, v in before.items() if not torch.equal(after[k], v)] == []


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def fail_at(where: str, host, monkeypatch):
    """A progress callback (or a patched host) that raises at `where`."""
    if where == "after all keys":
        real = host.weights_written
        calls = []

        def failing(identity, keys):
            calls.append(identity)
            if len(calls) == 1:
                raise Fault("a model-loaded callback failed")
            return real(identity, keys)

        monkeypatch.setattr(host, "weights_written", failing)
        return None

    def progress(done, total):
        if (where == "first key" and done == 1) or (where == "middle" and done == total // 2):
            raise Fault(f"failed at key {done} of {total}")

    return progress


# -- in place: the model's own tensors, nothing else --------------------------------------------------------------


def test_the_merge_lands_in_the_models_own_tensors_without_load_state_dict(webui, monkeypatch):
    model = webui.shared.sd_model
    before = model_storages(model)

    def refuse(*a, **k):
        raise AssertionError("load_state_dict was called: the merge went through a state dict")

    monkeypatch.setattr(type(model), "load_state_dict", refuse)
    service = service_of(webui)
    outcome = service.merge_and_load(RECIPE)
    assert webui.shared.sd_model is model and model_storages(model) == before
    assert_live_is(webui, expected(webui, RECIPE))
    assert not outcome.note and "Loaded" in outcome.message()
    assert webui.sd_hijack.model_hijack.is_hijacked(model)
    assert webui.sd_unet.calls[-2:] == ["None", None]  # UNet replacements off while writing, back on after


def test_no_copy_of_the_model_exists_during_or_after_a_merge(webui):
    """Mid-merge, the process holds no tensor memory beyond a few keys' buffers (the old path built a full state dict
    and a CPU copy of the overwritten keys); afterwards, and after a rollback, nothing is retained."""
    model = webui.shared.sd_model
    service = service_of(webui, threads=1)
    service.merge_and_load(RECIPE)  # opens the sources, warms up
    gc.collect()
    start = foreign_bytes(model)
    seen = []

    def progress(done, total):
        if done == total // 2:
            seen.append(foreign_bytes(model) - start)

    service.merge_and_load(OTHER, progress=progress)
    assert seen and seen[0] < model_bytes(model) // 2, (seen, model_bytes(model))  # a state dict alone is 1x
    gc.collect()
    assert foreign_bytes(model) - start == 0

    def failing(done, total):
        if done == total // 2:
            raise Fault("mid-merge")

    with pytest.raises(Fault):
        service.merge_and_load(BC, progress=failing)
    gc.collect()
    assert foreign_bytes(model) - start == 0


# -- faults: the weights before the fault come back bit for bit ---------------------------------------------------


@pytest.mark.parametrize("where", ["first key", "middle", "after all keys"])
@pytest.mark.parametrize("previous", ["base", "merge"])
def test_a_fault_puts_back_the_exact_previous_weights(webui, monkeypatch, where, previous):
    service = service_of(webui)
    if previous == "merge":
        service.merge_and_load(RECIPE)
    weights, identity = webui.live(), service.host.loaded_identity()
    progress = fail_at(where, service.host, monkeypatch)
    with pytest.raises(Fault):
        service.merge_and_load(BC, progress=progress)
    after = webui.live()
    assert_same(after, weights)
    assert service.host.loaded_identity() == identity
    assert webui.sd_hijack.model_hijack.is_hijacked(webui.shared.sd_model)
    # the service still knows what is loaded: the next merge (incremental or full) is right
    service.merge_and_load(OTHER)
    assert_live_is(webui, expected(webui, OTHER))


def test_a_fault_halfway_through_an_incremental_remerge_puts_back_the_first_merge(webui):
    service = service_of(webui)
    weights = ["0.5"] * 26
    service.merge_and_load(Recipe("modelA.safetensors", "modelB.safetensors", weights_alpha=",".join(weights)))
    before = webui.live()
    weights[1:13] = ["0.9"] * 12  # the whole input side
    second = Recipe("modelA.safetensors", "modelB.safetensors", weights_alpha=",".join(weights))
    totals = []

    def progress(done, total):
        totals.append(total)
        if done == total // 2:
            raise Fault("second half")

    with pytest.raises(Fault):
        service.merge_and_load(second, progress=progress)
    assert 0 < totals[0] < 1000  # it was the incremental re-merge that failed
    after = webui.live()
    assert_same(after, before)
    assert service.merge_and_load(second).recomputed == totals[0]  # still incremental from the first merge
    assert_live_is(webui, expected(webui, second))


def test_stop_and_a_truncated_file_mid_merge_put_back_the_base(webui):
    service = service_of(webui)
    base = webui.live()
    service.host.request_stop()
    with pytest.raises(MergeCancelled):
        service.merge_and_load(BC)
    broken = webui.folder / "broken.safetensors"
    data = webui.c.read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(MergeError):
        service.merge_and_load(Recipe("modelA.safetensors", "broken.safetensors", alpha=0.8))
    after = webui.live()
    assert_same(after, base)
    assert service.host.loaded_identity() is None


def test_when_putting_back_fails_too_the_message_says_to_restore(webui):
    service = service_of(webui)
    base = webui.live()
    data = webui.a.read_bytes()

    def progress(done, total):
        if done == total // 2:
            webui.a.write_bytes(data[:1000])  # the base file is gone when the weights are to be copied back
            raise Fault("mid-merge")

    with pytest.raises(MergeError, match="Restore base model"):
        service.merge_and_load(BC, progress=progress)
    assert service.loaded_plan() is None
    webui.a.write_bytes(data)
    service.restore_base()  # what the message asks for gives the base back
    after = webui.live()
    assert_same(after, base)


def test_a_failed_merge_with_a_lora_applied_leaves_consistent_weights(webui):
    """The LoRA is taken out before writing and the backups dropped; after the rollback the old merge stays, without
    the LoRA in it, and the next LoRA change cannot bring back stale weights."""
    service = service_of(webui)
    model = webui.shared.sd_model
    service.merge_and_load(RECIPE)
    clean = webui.live()
    webui.extra_networks.activate(model, ("style",))

    def progress(done, total):
        if done == total // 2:
            raise Fault("mid-merge")

    with pytest.raises(Fault):
        service.merge_and_load(OTHER, progress=progress)
    assert_same(webui.live(), clean)
    assert webui.extra_networks.backups(model) == []
    webui.extra_networks.activate(model, ("style",))
    webui.extra_networks.activate(model, ())
    assert_same(webui.live(), clean)


# -- restore copies from the base file ----------------------------------------------------------------------------


def test_restore_copies_from_the_base_file_in_place(webui):
    model = webui.shared.sd_model
    base_image = image_bytes(webui.txt2img())
    base = webui.live()
    storages_before = model_storages(model)
    service = service_of(webui)
    service.merge_and_load(RECIPE)
    webui.extra_networks.activate(model, ("style",))
    events = len(webui.sd_models.events)
    service.restore_base()
    assert webui.sd_models.events[events:] == []  # no reload_model_weights, no load_model
    assert webui.shared.sd_model is model and model_storages(model) == storages_before
    restored = webui.live()
    assert_same(restored, base)
    assert webui.extra_networks.backups(model) == []
    assert model.sd_checkpoint_info is webui.sd_models.select_checkpoint()
    assert service.host.loaded_identity() is None
    webui.extra_networks.activate(model, ())
    assert image_bytes(webui.txt2img()) == base_image


# -- medvram / lowvram and fp8 --------------------------------------------------------------------------------------


def test_medvram_parts_are_gathered_on_the_cpu_before_writing(webui):
    """With a part "on the GPU", its tensors change storage when it is sent back; the merge must write the tensors
    the model holds after that, and must not move the whole model to the device afterwards."""
    from modules import lowvram

    model = webui.shared.sd_model
    model.lowvram = True
    lowvram.send_me_to_gpu(model.model)  # the U-Net ran last
    service = service_of(webui)
    service.merge_and_load(RECIPE)
    assert lowvram.calls and lowvram.module_in_gpu is None
    assert_live_is(webui, expected(webui, RECIPE))
    lowvram.send_me_to_gpu(model.first_stage_model)
    service.restore_base()
    from lib_merge.io.checkpoint import open_checkpoint

    with open_checkpoint(webui.a) as a:
        assert torch.equal(webui.live()[UNET], a.get(UNET).to(torch.float16))


def test_fp8_storage_is_loaded_whole_and_says_why(webui):
    webui.shared.opts.fp8_storage = "Enable"
    webui.sd_models.reload_model_weights()
    outcome = service_of(webui).merge_and_load(RECIPE)
    assert "fp8" in outcome.note and outcome.note in outcome.message()
    assert webui.sd_models.events[-1][0] == "load_model"
