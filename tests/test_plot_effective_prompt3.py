"""Two plot axes done as the seed does them: "effective" saves an animated GIF per compared cell and a CSV of the
differences beside the grid; "prompt3" generates a cell's prompts as ONE batch (in the fake WebUI: one
process_images call with the prompts as a list, as txt2img would).

Expected images come from the weights the test computes itself (tests/memory_host.py draws an image from a digest
of the loaded weights), and the differences from those images with numpy, never from the code under test.
"""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest
from conftest import synth_family
from memory_host import MemoryHost, weights_digest
from PIL import Image
from safetensors.torch import load_file
from webui_fixture import webui_fixture  # noqa: F401  (provides the `webui` fixture)

from lib_merge.core.recipe import Recipe
from lib_merge.core.xyz import Cell, GenParams
from lib_merge.hosts.base import GenerationRequest, GenerationResult
from lib_merge.service.merge_service import MergeService
from lib_merge.ui.plot import _generate_cell, run_plot

UNET = "model.diffusion_model."
OUT04_KEY = UNET + "output_blocks.4.1.proj_out.weight"
IN01_KEY = UNET + "input_blocks.1.1.proj_in.weight"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("effective_models")
    synth_family(root)
    return root


class GridHost(MemoryHost):
    """Saves grids into `grids/` (as the WebUI does with grid saving on) and keeps every image by weights digest."""

    def __init__(self, folder, base, grids=None):
        super().__init__(folder, base)
        self.grids = grids
        self.by_digest = {}

    def generate(self, request):
        result = super().generate(request)
        self.by_digest[self.generated[-1][0]] = result.images[0]
        return result

    def save_grid(self, image, info):
        if self.grids is None:
            return None
        self.grids.mkdir(exist_ok=True)
        path = self.grids / f"xyz_grid-{len(list(self.grids.glob('*.png'))):04d}.png"
        image.save(path)
        return path


def make_host(models, tmp_path, grids=True):
    for p in models.iterdir():
        os.link(p, tmp_path / p.name)
    return GridHost(tmp_path, "a.safetensors", tmp_path / "grids" if grids else None)


def changed_percent(image, baseline):
    a = np.asarray(image.convert("RGB"), dtype=np.int64)
    b = np.asarray(baseline.convert("RGB"), dtype=np.int64)
    return 100.0 * float((np.abs(a - b) > 20).any(axis=2).mean())


EFFECTIVE = [("effective", "OUT04:proj_out, IN01:proj_in"), ("alpha", "1")]


def test_effective_axis_saves_a_gif_per_cell_and_a_csv_of_the_differences(models, tmp_path):
    host = make_host(models, tmp_path)
    result = run_plot(MergeService(host), Recipe("a.safetensors", "b.safetensors", alpha=0.0),
                      GenerationRequest(seed=11), EFFECTIVE)
    assert result.cells_done == 3
    # the weights of each cell, built here: A everywhere (alpha 0), the cell's element from B (ratio 1)
    a, b = load_file(str(models / "a.safetensors")), load_file(str(models / "b.safetensors"))
    baseline = host.by_digest[weights_digest(a)]
    cells = []
    for key in (OUT04_KEY, IN01_KEY):
        state = dict(a)
        state[key] = b[key]
        cells.append(host.by_digest[weights_digest(state)])
    grid = tmp_path / "grids" / "xyz_grid-0000.png"
    table = tmp_path / "grids" / "xyz_grid-0000-effective.csv"
    gifs = sorted((tmp_path / "grids").glob("xyz_grid-0000-effective-*.gif"))
    assert grid in result.saved and table in result.saved and set(gifs) <= set(result.saved)
    assert [g.name for g in gifs] == ["xyz_grid-0000-effective-1-effective_OUT04_proj_out_alpha_1.gif",
                                      "xyz_grid-0000-effective-2-effective_IN01_proj_in_alpha_1.gif"]
    with open(table, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["x", "y", "z", "cell", "baseline", "changed %"]
    assert [r[:5] for r in rows[1:]] == [
        ["1", "0", "0", "effective OUT04:proj_out, alpha 1", "effective baseline, alpha 1"],
        ["2", "0", "0", "effective IN01:proj_in, alpha 1", "effective baseline, alpha 1"]]
    for row, cell, gif in zip(rows[1:], cells, gifs, strict=True):
        assert float(row[5]) == changed_percent(cell, baseline)
        with Image.open(gif) as anim:
            assert anim.format == "GIF" and anim.n_frames == 2 and anim.size == baseline.size
            assert anim.info["loop"] == 0 and anim.info["duration"] == 1000
            anim.seek(0)
            assert np.array_equal(np.asarray(anim.convert("RGB")), np.asarray(baseline))
            anim.seek(1)
            assert np.array_equal(np.asarray(anim.convert("RGB")), np.asarray(cell))
    assert any(float(r[5]) > 0 for r in rows[1:])  # the elements changed the picture
    assert "Effective check: 2 GIFs and xyz_grid-0000-effective.csv" in result.info
    assert not [p for p in (tmp_path / "grids").iterdir() if p.name.startswith(".")]  # no temporary files


def test_effective_files_need_saved_grids_and_never_replace_a_file(models, tmp_path):
    host = make_host(models, tmp_path, grids=False)
    result = run_plot(MergeService(host), Recipe("a.safetensors", "b.safetensors", alpha=0.0),
                      GenerationRequest(seed=11), EFFECTIVE)
    assert result.saved == [] and "grids are not saved" in result.info
    assert len(result.grids) == 2  # the grid and the grid of differences are still shown
    host.grids = tmp_path / "grids"
    host.grids.mkdir()
    taken = host.grids / "xyz_grid-0000-effective.csv"
    taken.write_text("mine")
    result = run_plot(MergeService(host), Recipe("a.safetensors", "b.safetensors", alpha=0.0),
                      GenerationRequest(seed=11), EFFECTIVE)
    assert "GIFs and CSV were not saved" in result.info and "exists" in result.info
    assert taken.read_text() == "mine"
    assert sorted(p.name for p in host.grids.iterdir()) == ["xyz_grid-0000-effective.csv", "xyz_grid-0000.png",
                                                            "xyz_grid-0001.png"]


def test_prompt3_cell_is_one_batch_of_its_prompts(models, tmp_path):
    host = make_host(models, tmp_path, grids=False)
    result = run_plot(MergeService(host), Recipe("a.safetensors", "b.safetensors"), GenerationRequest(seed=11),
                      [("prompt3", "a cat\na dog\na bird\n\na fish"), ("alpha", "0.3")])
    assert result.cells_done == 2
    assert host.batches == [3, 1]  # one generation per cell, its prompts as one batch
    assert [(seed, prompt) for _, seed, prompt in host.generated] == [
        (11, "a cat"), (12, "a dog"), (13, "a bird"), (11, "a fish")]


class GridFirstHost(MemoryHost):
    """Answers a batch as the WebUI does with "Show grid in gallery": the batch's grid first, then its images."""

    def generate(self, request):
        result = super().generate(request)
        if len(result.images) < 2:
            return result
        marker = Image.new("RGB", (64, 48), (1, 2, 3))
        return GenerationResult([marker, *result.images], [result.infotexts[0], *result.infotexts], result.seed, 1)


def test_a_prompt3_cell_shows_the_batch_images_side_by_side_not_the_webui_grid(models, tmp_path):
    for p in models.iterdir():
        os.link(p, tmp_path / p.name)
    host = GridFirstHost(tmp_path, "a.safetensors")
    service = MergeService(host)
    cell = Cell(0, 0, 0, Recipe("a.safetensors", "b.safetensors"), GenParams(seed=4, prompts=("x", "y")))
    image, result = _generate_cell(service, GenerationRequest(), cell)
    want = np.hstack([np.asarray(i) for i in result.images[1:]])
    assert image.size == (128, 48) and np.array_equal(np.asarray(image), want)

    class Interrupted(MemoryHost):
        def generate(self, request):  # Stop inside the batch: fewer images than prompts
            return GenerationResult(super().generate(request).images[:1], ["x"], request.seed)

    image, _ = _generate_cell(MergeService(Interrupted(tmp_path, "a.safetensors")), GenerationRequest(), cell)
    assert image is None


def test_prompt3_in_the_webui_is_one_process_images_call_with_a_list_prompt(webui, monkeypatch):
    from lib_merge.hosts.a1111 import A1111Host

    calls = []
    original = webui.processing.process_images

    def spy(p):
        calls.append((list(p.prompt) if isinstance(p.prompt, list) else p.prompt, p.batch_size, p.n_iter, p.seed))
        return original(p)

    monkeypatch.setattr(webui.processing, "process_images", spy)
    service = MergeService(A1111Host(webui.root), log_merges=False)
    batch = service.generate(GenerationRequest(prompts=("a cat", "a dog", "a bird"), seed=5, steps=3,
                                               batch_size=4, batch_count=2))
    assert calls == [(["a cat", "a dog", "a bird"], 3, 1, 5)]  # batch size and count give way to the prompts
    assert batch.first_image == 1 and len(batch.images) == 4  # the WebUI's grid, then the batch
    for i, prompt in enumerate(("a cat", "a dog", "a bird")):
        info = batch.infotexts[1 + i]
        assert info.startswith(prompt + "\n") and f"Seed: {5 + i}," in info
        alone = service.generate(GenerationRequest(prompt=prompt, seed=5 + i, steps=3))
        assert alone.first_image == 0
        assert np.array_equal(np.asarray(alone.images[0]), np.asarray(batch.images[1 + i]))
    calls.clear()
    result = run_plot(service, Recipe("modelA.safetensors", "modelB.safetensors"), GenerationRequest(seed=9, steps=3),
                      [("prompt3", "a cat\na dog\n\na bird"), ("alpha", "0.4")])
    assert result.cells_done == 2
    assert calls == [(["a cat", "a dog"], 2, 1, 9), (["a bird"], 1, 1, 9)]
