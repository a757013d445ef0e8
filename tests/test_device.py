"""The device path (each key's inputs moved to a compute device, the result copied back) gives the same tensors as
the default CPU path. Here the device is the CPU itself; on a machine with CUDA the same test runs there too."""

from __future__ import annotations

import pytest
import torch

from lib_merge.cli import synth
from lib_merge.core.engine import DictSink, Models, plan_merge, run_merge
from lib_merge.core.recipe import Recipe
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
