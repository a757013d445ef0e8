"""The fake WebUI as a pytest fixture: a fresh `modules` package per test (it has module-level state, like the real
one), three small SD1 checkpoints in its model folder, model A loaded, and the entry script loaded the way the
WebUI's `load_scripts` does. Nothing is installed; everything is removed from sys.modules afterwards."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
from fakes import stubs

from lib_merge.cli import synth

FAKES = Path(__file__).resolve().parent / "fakes"
ROOT = Path(__file__).resolve().parent.parent
ENTRY = ROOT / "scripts" / "block_merger.py"


def purge() -> None:
    for name in list(sys.modules):
        if name in ("modules", "networks", "lib_merge.hosts.a1111", "lib_merge.hosts.forge") or \
                name.startswith("modules."):
            del sys.modules[name]
    import lib_merge

    if hasattr(lib_merge, "hosts") and hasattr(lib_merge.hosts, "a1111"):
        del lib_merge.hosts.a1111
    if hasattr(lib_merge, "hosts") and hasattr(lib_merge.hosts, "forge"):
        del lib_merge.hosts.forge


class WebUI(types.SimpleNamespace):
    """Handles on the fake WebUI's modules and files."""

    def live(self) -> dict[str, torch.Tensor]:
        """The loaded model's weights by checkpoint key (cloned, read through undo_hijack as the WebUI would)."""
        m = self.shared.sd_model
        self.sd_hijack.model_hijack.undo_hijack(m)
        try:
            return {k: v.detach().clone() for k, v in m.state_dict().items()}
        finally:
            self.sd_hijack.model_hijack.hijack(m)

    def load_entry_script(self):
        """scripts.load_scripts for our one file: root on sys.path only while it executes."""
        self.scripts.load_scripts([(str(ENTRY), str(ROOT))])
        return self.scripts.loaded_scripts[str(ENTRY)]

    def txt2img(self, prompt="a cat", seed=7, script_args=None, **kw):
        """A txt2img run as the WebUI's txt2img does it: processing object, always-on scripts, process_images."""
        p = self.processing.StableDiffusionProcessingTxt2Img(
            prompt=prompt, seed=seed, steps=kw.pop("steps", 20), sampler_name="Euler", do_not_save_samples=True,
            outpath_samples=str(self.outputs), outpath_grids=str(self.outputs), **kw)
        if script_args is not None:
            p.scripts = self.runner
            p.script_args = [None, *script_args]
        return self.processing.process_images(p)


@pytest.fixture(name="webui")
def webui_fixture(tmp_path, monkeypatch):
    purge()
    monkeypatch.syspath_prepend(str(FAKES))
    if importlib.util.find_spec("gradio") is None:
        monkeypatch.setitem(sys.modules, "gradio", stubs.make_gradio())
    if importlib.util.find_spec("fastapi") is None:
        monkeypatch.setitem(sys.modules, "fastapi", stubs.make_fastapi())
    from modules import (
        call_queue,
        devices,
        extra_networks,
        hashes,
        images,
        paths,
        processing,
        script_callbacks,
        scripts,
        sd_hijack,
        sd_models,
        sd_unet,
        sd_vae,
        shared,
    )

    folder = tmp_path / "models" / "Stable-diffusion"
    folder.mkdir(parents=True)
    sd_models.model_path = str(folder)
    a = synth.make_checkpoint(folder / "modelA.safetensors", "sd1", factor=16, seed=1)
    b = synth.make_checkpoint(folder / "modelB.safetensors", "sd1", factor=16, seed=2, base=a, noise=1.0)
    c = synth.make_checkpoint(folder / "modelC.safetensors", "sd1", factor=16, seed=3, base=a, noise=1.0)
    outputs = tmp_path / "outputs"
    shared.opts.outdir_txt2img_samples = str(outputs / "txt2img-images")
    shared.opts.outdir_txt2img_grids = str(outputs / "txt2img-grids")
    shared.cmd_opts.ui_config_file = str(tmp_path / "ui-config.json")
    shared.opts.data["block_merger_history_file"] = str(tmp_path / "mergehistory.csv")  # never the repository
    paths.data_path = str(tmp_path)  # the WebUI's data folder (our hash cache, the default history)
    sd_models.list_models()
    shared.opts.sd_model_checkpoint = "modelA.safetensors"
    assert shared.sd_model is not None  # first access loads model A, as at WebUI start
    ui = types.ModuleType("lib_merge.ui.tab")
    ui.built = []

    def build_tab(service):
        ui.built.append(service)
        return stubs.Component(kind="Blocks")

    ui.build_tab = build_tab
    monkeypatch.setitem(sys.modules, "lib_merge.ui.tab", ui)
    import lib_merge.ui

    monkeypatch.setattr(lib_merge.ui, "tab", ui, raising=False)
    runner = scripts.ScriptRunner()
    yield WebUI(
        root=ROOT, tmp=tmp_path, folder=folder, a=a, b=b, c=c, outputs=outputs, ui=ui, runner=runner,
        call_queue=call_queue, devices=devices, extra_networks=extra_networks, hashes=hashes, images=images,
        processing=processing, script_callbacks=script_callbacks, scripts=scripts, sd_hijack=sd_hijack,
        sd_models=sd_models, sd_unet=sd_unet, sd_vae=sd_vae, shared=shared,
    )
    purge()
