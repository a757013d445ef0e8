"""The device path (each key's inputs moved to a compute device, the result copied back) gives the same tensors as
the default CPU path. Here the device is the CPU itself; on a machine with CUDA the same test runs there too.
Where the formula is plain arithmetic, both paths are also checked against it, computed here in float64, so the
comparison cannot pass by both sides sharing one fault."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_rounded, sd1_block

from lib_merge.cli import synth
from lib_merge.core.engine import DictSink, Models, plan_merge, run_merge
from lib_merge.core.recipe import Recipe
from lib_merge.core.weights import Presets
from lib_merge.io.checkpoint import DictCheckpoint

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = [
    dict(mode="Weight sum", weights_alpha="GRAD_V"),
    dict(mode="Add difference", alpha=0.7, adjust="1,2,3,1,1,1,1,1"),
    dict(mode="Triple sum", alpha=0.3, beta=0.2),
    dict(mode="sum Twice", alpha=0.3, beta=0.6),
    dict(mode="Add difference", calc="trainDifference", alpha=0.5),
    dict(mode="Weight sum", calc="cosineB", alpha=0.1),
    dict(mode="Add difference", calc="extract", alpha=0.3, beta=0.6),
    dict(mode="Weight sum", calc="tensor2", alpha=0.4, beta=0.3),
    dict(mode="Weight sum", calc="plus random", alpha=0.01, seed=4),
]


@pytest.fixture(scope="module")
def models():
    a = synth.make_state_dict("sd1", factor=32, seed=1, in_channels=9)
    b = synth.make_state_dict("sd1", factor=32, seed=2)
    c = synth.make_state_dict("sd1", factor=32, seed=3)
    return Models(DictCheckpoint(a, "A"), DictCheckpoint(b, "B"), DictCheckpoint(c, "C"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=[f"{c['mode']}-{c.get('calc', 'normal')}" for c in CASES])
def test_device_path_matches_the_cpu_path(models, case, device):
    plan = plan_merge(Recipe("A", "B", "C", **case), models)
    reference = run_merge(plan, models, DictSink())
    on_device = run_merge(plan, models, DictSink(), device=device)
    for key, value in reference.items():
        assert on_device[key].device.type == "cpu" and on_device[key].dtype == value.dtype
        if device == "cpu":
            assert torch.equal(on_device[key], value), key
        else:  # GPU kernels may round differently in the last place
            torch.testing.assert_close(on_device[key].float(), value.float(), rtol=2e-3, atol=1e-4)


GRAD_V = [float(v) for v in Presets.load().get("GRAD_V").split(",")]  # the preset's values, from its data file
BLOCK_LABELS = ("BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12)))
#: The spec's formulas in float64 (A, B, C: the three models' tensors; w: the block weight of the key).
FORMULAS = {
    "Weight sum-normal": lambda a, b, c, w: a * (1 - w) + b * w,
    "Add difference-normal": lambda a, b, c, w: a + 0.7 * (b - c),
    "Triple sum-normal": lambda a, b, c, w: a * (1 - 0.3 - 0.2) + b * 0.3 + c * 0.2,
    "sum Twice-normal": lambda a, b, c, w: (a * (1 - 0.3) + b * 0.3) * (1 - 0.6) + c * 0.6,
}
PROBES = ("model.diffusion_model.input_blocks.4.1.proj_in.weight", "model.diffusion_model.middle_block.1.proj_out.bias",
          "model.diffusion_model.output_blocks.8.0.in_layers.2.weight",
          "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(FORMULAS))
def test_device_and_cpu_paths_follow_the_formula(models, name, device):
    case = next(c for c in CASES if f"{c['mode']}-{c.get('calc', 'normal')}" == name)
    plan = plan_merge(Recipe("A", "B", "C", **case), models)
    results = (run_merge(plan, models, DictSink()), run_merge(plan, models, DictSink(), device=device))
    for key in PROBES:
        a, b, c = (m.get(key).double() for m in (models.a, models.b, models.c))
        w = GRAD_V[BLOCK_LABELS.index(sd1_block(key))] if "weights_alpha" in case else None
        expected = FORMULAS[name](a, b, c, w)
        for path, state in zip(("cpu", device), results, strict=True):
            assert_rounded(state[key], expected, models.a.dtype(key), what=f"{path} {key}")
