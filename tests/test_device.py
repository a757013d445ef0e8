"""The device path (each key's inputs moved to a compute device, the result copied back) gives the same tensors as
the default CPU path. Here the device is the CPU itself; on a machine with CUDA the same test runs there too.
Where the formula is plain arithmetic, both paths are also checked against it, computed here in float64, so the
comparison cannot pass by both sides sharing one fault."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import assert_rounded, sd1_block

from lib_merge.cli import synth
from lib_merge.core.arch import ADJUST_KEYS
from lib_merge.core.device import DeviceLink
from lib_merge.core.engine import DictSink, Models, TensorSink, plan_merge, run_merge
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


class GuardedLink(DeviceLink):
    """A device link on the CPU that behaves like an asynchronous one for the rules that matter: an upload's host
    buffer stays "in flight" until `wait` is called on the mark taken after it; reading into such a buffer (reusing it
    too early, which on a GPU corrupts the copy) is recorded as a violation."""

    def __init__(self):
        super().__init__("cpu")
        self.local = threading.local()
        self.in_flight: set[int] = set()
        self.violations: list[str] = []
        self.uploads = 0
        self.lock = threading.Lock()

    def upload(self, tensor):
        with self.lock:
            self.uploads += 1
            pending = getattr(self.local, "pending", None)
            if pending is None:
                pending = self.local.pending = []
            pending.append(tensor.untyped_storage().data_ptr())
        return tensor.clone()  # the "device" copy: other memory than the host buffer

    def mark(self):
        with self.lock:
            pending, self.local.pending = getattr(self.local, "pending", []), []
            self.in_flight.update(pending)
            return tuple(pending)

    def wait(self, mark):
        with self.lock:
            self.in_flight.difference_update(mark or ())


class GuardedSource:
    """A source that reports reads into buffers whose upload has not been waited for."""

    def __init__(self, inner, link: GuardedLink):
        self.inner, self.link, self.name = inner, link, inner.name

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __contains__(self, key):
        return key in self.inner

    def get(self, key, out=None):
        if out is not None and out.untyped_storage().data_ptr() in self.link.in_flight:
            self.link.violations.append(key)
        return self.inner.get(key, out=out)


@pytest.mark.parametrize("threads", [1, 2])
def test_device_path_waits_for_its_copies_and_writes_the_destination_tensors(models, threads):
    """The GPU path without a GPU (unmeasured on one): inputs go through `upload`, buffers are reused only after
    their copies are done, and the result written into destination tensors equals the CPU path's bit for bit."""
    link = GuardedLink()
    guarded = Models(*(GuardedSource(m, link) for m in (models.a, models.b, models.c)))
    plan = plan_merge(Recipe("A", "B", "C", mode="Add difference", alpha=0.7), models)
    reference = run_merge(plan, models, DictSink())
    targets = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in reference.items()}
    sink = TensorSink(targets)
    run_merge(plan, guarded, sink, threads=threads, device=link)
    assert link.violations == [] and link.uploads >= len(plan.jobs)
    assert sink.touched == set(reference)
    for key, value in reference.items():  # rounded to the source's dtype first, then widened: as a file load
        assert torch.equal(targets[key], value.float()), key


@pytest.mark.parametrize("method", ["ties", "slerp"])
def test_a_merge_method_on_the_device_path_and_into_live_tensors_equals_the_cpu_path(models, method):
    """Merge methods go through their own path on a device too: the device path and a live destination give the
    method's result (on the CPU stand-in, exactly the CPU path's), never the classic formula."""
    m = Models(models.a, others=(models.b,) if method == "slerp" else (models.b, models.c))
    recipe = Recipe("A", method=method, models=tuple(s.name for s in m.others), alpha=0.6, density=0.5)
    plan = plan_merge(recipe, m)
    reference = run_merge(plan, m, DictSink())
    on_device = run_merge(plan, m, DictSink(), device="cpu")
    live = {k: torch.zeros_like(v) for k, v in reference.items()}
    run_merge(plan, m, TensorSink(live))
    changed = 0
    for key, value in reference.items():
        assert torch.equal(on_device[key], value) and torch.equal(live[key], value), key
        changed += not torch.equal(value, models.a.get(key))
    assert changed > 0  # the method really merged
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


class CountingCheckpoint(DictCheckpoint):
    """Model A, recording the keys whose values are read."""

    def __init__(self, state, name):
        super().__init__(state, name)
        self.read: set[str] = set()

    def get(self, key, out=None):
        self.read.add(key)
        return super().get(key, out)

    def get_span(self, key, start, stop, out=None):
        self.read.add(key)
        return super().get_span(key, start, stop, out)


@pytest.mark.parametrize("path", ["device", "cpu"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c['mode']}-{c.get('calc', 'normal')}" for c in CASES])
def test_tensors_holding_a_are_not_read_again_and_give_the_same_merge(models, case, path):
    """The live model's first merge after a load: its tensors hold A's values (`dest_holds_a`). On the device path A
    is neither read nor uploaded for any formula; on the CPU, Weight sum and Add difference take it from the tensor
    they overwrite. Either way the result is bit for bit the merge of the files."""
    plan = plan_merge(Recipe("A", "B", "C", **case), models)
    reference = run_merge(plan, models, DictSink())
    a = CountingCheckpoint({k: models.a.get(k).clone() for k in models.a.keys()}, "A")
    live = {k: models.a.get(k).clone() for k in models.a.keys()}
    link = GuardedLink() if path == "device" else None
    run_merge(plan, Models(a, models.b, models.c), TensorSink(live), device=link, dest_holds_a=set(live))
    for key, value in reference.items():
        assert torch.equal(live[key], value), key
    calc = case.get("calc", "normal")
    if path == "device":
        assert link.violations == []
        if calc not in ("cosineA", "cosineB"):  # whose similarity pass reads A and B whole before merging
            assert a.read == set()
    elif calc == "normal" and case["mode"] in ("Weight sum", "Add difference"):
        merged = {job.key for job in plan.jobs if job.kind == "merge" and not job.channels
                  and not (plan.adjust is not None and job.key in ADJUST_KEYS)}
        assert merged and not a.read & merged
