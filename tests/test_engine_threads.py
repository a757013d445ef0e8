"""Torch's intra-op threads inside the merge's workers (core.intraop).

The workers share torch's threads (two workers on two cores: one each; on eight: four each) instead of each taking
them all; the caller's thread count and the count new threads start from stay what they were, so a WebUI thread
started after a merge still uses every core.
The merged values are the float64 formula's, rounded once, whatever the thread counts.
"""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import MemorySource, assert_rounded, assert_same, sd1_model, selected

from lib_merge.core.engine import DictSink, Models, plan_merge, run_merge
from lib_merge.core.intraop import new_thread_default
from lib_merge.core.recipe import Recipe


class CountingSink(DictSink):
    """Records, for every key, the torch thread count of the thread that handed it over."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, tuple[str, int]] = {}

    def put(self, key, tensor):
        self.counts[key] = (threading.current_thread().name, torch.get_num_threads())
        super().put(key, tensor)


@pytest.fixture(params=[2, 8], ids=["default 2", "default 8"])
def default_threads(request):
    """A process whose default is this many torch threads (whatever this machine's cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("threads", [1, 2])
def test_workers_share_torch_threads_and_leave_everyone_elses_count(default_threads, threads):
    a = sd1_model(1, torch.float16)
    b = sd1_model(2, torch.float16, base=a, noise=0.5)
    recipe = Recipe("A", "B", alpha=0.3)
    models = Models(MemorySource(a, "A"), MemorySource(b, "B"))
    sink = CountingSink()
    state = run_merge(plan_merge(recipe, models), models, sink, threads=threads)

    workers = {name for name, _ in sink.counts.values()}
    counts = {count for _, count in sink.counts.values()}
    if threads == 1:  # the caller's own thread merges: its count is the caller's business
        assert workers == {threading.current_thread().name} and counts == {default_threads}
    else:
        assert all(name.startswith("merge") for name in workers) and counts == {default_threads // 2}
    assert torch.get_num_threads() == default_threads
    assert new_thread_default() == default_threads
    for key, value in a.items():
        if selected(key, b, None):
            assert_rounded(state[key], value.double() * 0.7 + b[key].double() * 0.3, torch.float16, what=key)
        else:
            assert_same(state[key], value, key)
