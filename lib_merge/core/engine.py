"""Plan and run a merge, key by key, with bounded memory.

`plan_merge` reads only the checkpoints' headers (keys, shapes, dtypes) and decides, for every key of model A, whether
it is copied from A, copied from B (keys only B has), or computed, with which ratios; every user error is raised there,
before any tensor data is read. `run_merge` then streams the keys through a kernel into a sink (a dict, or a file
written as it goes), optionally on a thread pool, checking for cancellation and reporting progress after every key.
"""

from __future__ import annotations

import dataclasses
import math
import os
import queue
import secrets
import threading
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from . import kernels, methods, smoothing
from .arch import ADJUST_KEYS, Arch, detect_arch, is_model_key, mergeable
from .device import DeviceLink, device_link
from .errors import MergeCancelled, MergeError
from .finite import FiniteCheck, all_finite
from .intraop import use_threads_here, worker_share
from .recipe import METHOD_PARAMS, Recipe, check_extract_ratios
from .weights import (
    Adjust,
    ElementalRule,
    InExRule,
    Presets,
    beta_offset,
    block_weight,
    has_random,
    parse_adjust,
    parse_block_values,
    parse_block_weights,
    parse_elemental,
    parse_inex,
    random_table,
)

COPY_A, COPY_B, MERGE = "a", "b", "merge"
#: calc modes whose result at each element depends only on the inputs at that element
PIECEWISE_CALCS = ("normal", "trainDifference", "self")
#: calc modes that are elementwise given a per-column ratio (computed beforehand): pieces of whole rows of dim 0
ROWWISE_CALCS = ("cosineA", "cosineB")
PIECE = 1 << 19  # elements streamed at a time: with its fp32 temporaries, a piece stays within the CPU cache
FP32_SLOTS = ("fp32", "fp32b", "fp32c", "fp32d")  # a piece's fp32 work buffers (trainDifference needs four)
NEVER_COPY_FROM_B = ("position_ids",)

Progress = Callable[[int, int], None]
Cancel = Callable[[], bool]


class Source(Protocol):
    """What the engine needs from a checkpoint (see io.checkpoint): headers without reading data, then tensors."""

    name: str

    def keys(self) -> list[str]: ...
    def __contains__(self, key: object) -> bool: ...
    def shape(self, key: str) -> tuple[int, ...]: ...
    def dtype(self, key: str) -> torch.dtype: ...
    def get(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor: ...
    def get_span(self, key: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor: ...


class Sink(Protocol):
    """Where merged tensors go. `target(key)` may offer the tensor to compute into (None: the engine uses its own
    buffer, and `put` must consume the tensor before returning); `put` is called from worker threads, in any
    order; `abort` must leave nothing partial behind. A target of another dtype than the source's is computed into
    directly, rounded once (a file's save dtype), unless the sink has `rounds_to_source` true: then each result is
    rounded to the source's dtype first and cast (the live model holds what loading the merged file would give)."""

    def begin(self, entries: list[tuple[str, torch.dtype, tuple[int, ...]]]) -> None: ...
    def target(self, key: str) -> torch.Tensor | None: ...
    def put(self, key: str, tensor: torch.Tensor) -> None: ...
    def finish(self) -> object: ...
    def abort(self) -> None: ...


@dataclass(frozen=True)
class Job:
    """One output key: where it comes from and, for computed keys, its ratios."""

    key: str
    kind: str
    block: str = ""
    alpha: float = 0.0
    beta: float = 0.0
    channels: int = 0  # >0: merge only the first `channels` of dim 1 (inpainting / pix2pix A), keep A's others
    index: int = 0  # position in A's key order (the seed's random draws use it)
    density: float = 0.0  # a merge method's other per-block parameters (see core.methods.Params)
    drop: float = 0.0
    epsilon: float = 0.0


@dataclass(frozen=True)
class MergePlan:
    recipe: Recipe  # validated, presets resolved, seed fixed if randomness is used
    arch: Arch | None  # None for a plan that only copies (copy_plan)
    jobs: tuple[Job, ...]
    adjust: Adjust | None
    similarity: tuple[float, float] | None = None  # set by the cosine pre-pass

    @property
    def merged(self) -> int:
        return sum(job.kind == MERGE for job in self.jobs)


@dataclass
class Models:
    a: Source  # model A, the base of a merge method
    b: Source | None = None
    c: Source | None = None
    others: tuple[Source, ...] = ()  # a merge method's N models, in the recipe's order


def _arch_of(source: Source, label: str) -> Arch:
    return detect_arch(set(source.keys()), source.shape, f"Model {label} ({source.name})")


def _check_family(arch: Arch, other: Arch, label: str, source: Source) -> None:
    if arch.family != other.family:
        raise MergeError(
            f"Model {label} ({source.name}) is {other.describe()} but model A is {arch.describe()}; "
            f"models of different families cannot be merged."
        )


INPAINT_CHANNELS = {9: "inpainting", 8: "instruct-pix2pix"}


def _channels(key: str, a: Source, others: Iterable[tuple[str, Source]]) -> int:
    """0 when shapes match; 4 when A is an inpainting (9) or instruct-pix2pix (8) model and the other is a normal
    one, which differ only in dim 1 of conv_in: the merge then runs on the first 4 channels and keeps A's others."""
    shape_a = a.shape(key)
    narrow = 0
    for label, src in others:
        shape = src.shape(key)
        if shape == shape_a:
            continue
        if len(shape) == len(shape_a) > 1 and shape[:1] + shape[2:] == shape_a[:1] + shape_a[2:]:
            if shape[1] in INPAINT_CHANNELS and shape_a[1] == 4:
                kind = INPAINT_CHANNELS[shape[1]]
                raise MergeError(
                    f"Model {label} ({src.name}) is an {kind} model but model A is a normal one: put the {kind} "
                    f"model in A (the merge keeps A's extra input channels)."
                )
            if shape_a[1] in INPAINT_CHANNELS and shape[1] == 4:
                narrow = 4
                continue
        raise MergeError(
            f"Models do not match: {key} is {list(shape_a)} in A but {list(shape)} in {label} ({src.name}); "
            f"merge models of the same architecture."
        )
    return narrow


def plan_merge(recipe: Recipe, models: Models, presets: Presets | None = None) -> MergePlan:
    """Validate the recipe against the models' headers and decide every key's job; reads no tensor data."""
    recipe = recipe.validate(presets)
    if recipe.method:
        return _plan_method(recipe, models)
    calc = recipe.calc_mode
    a, b, c = models.a, models.b if calc.uses_b else None, models.c if recipe.uses_c else None
    if calc.uses_b and b is None:
        raise MergeError("Model B is required for this merge.")
    if recipe.uses_c and c is None:
        raise MergeError(f"Model C is required for {recipe.mode}.")
    arch = _arch_of(a, "A")
    for label, src in (("B", b), ("C", c)):
        if src is not None:
            _check_family(arch, _arch_of(src, label), label, src)

    needs_seed = recipe.calc == "plus random" or any(
        has_random(text) for text in (recipe.weights_alpha, recipe.weights_beta, recipe.elemental))
    if needs_seed and recipe.seed == -1:
        recipe = recipe.with_seed(secrets.randbelow(2**32))
    keys_a = a.keys()
    randoms = random_table(recipe.seed, len(keys_a)) if needs_seed else None

    weights_a = parse_block_weights(recipe.weights_alpha, arch, "alpha", randoms, 0) if recipe.mbw else None
    weights_b = (parse_block_weights(recipe.weights_beta, arch, "beta", randoms,
                                     beta_offset(len(recipe.weights_beta.split(","))))
                 if recipe.mbw and recipe.weights_beta.strip() else None)
    base_alpha = weights_a[0] if weights_a else recipe.alpha
    base_beta = weights_b[0] if weights_b else recipe.beta
    fine_labels = frozenset(bl[0] for k in keys_a if (bl := arch.block_of(k))) if arch.is_sdxl else frozenset()
    elemental = parse_elemental(recipe.elemental, arch, fine_labels)
    inex = parse_inex(recipe.inex, recipe.inex_blocks, recipe.inex_elements, arch, fine_labels)
    adjust = parse_adjust(recipe.adjust)
    if adjust is not None and arch.is_flux:
        raise MergeError("Adjust changes SD's U-Net input/output convolutions; Flux has none. Clear Adjust.")

    jobs = []
    for index, key in enumerate(keys_a):
        job = _plan_key(key, index, recipe, arch, a, b, c, weights_a, weights_b, base_alpha, base_beta,
                        elemental, inex, randoms)
        jobs.append(job)
    if b is not None:
        in_a = set(keys_a)
        jobs.extend(Job(k, COPY_B) for k in b.keys()
                    if is_model_key(k) and k not in in_a and not any(s in k for s in NEVER_COPY_FROM_B))
    return MergePlan(recipe, arch, tuple(jobs), adjust)


def _plan_key(key, index, recipe: Recipe, arch: Arch, a, b, c, weights_a, weights_b, base_alpha, base_beta,
              elemental: tuple[ElementalRule, ...], inex: InExRule, randoms) -> Job:
    calc = recipe.calc_mode
    keep = Job(key, COPY_A, index=index)
    if not mergeable(key, arch) or (b is not None and key not in b) or (c is not None and key not in c):
        return keep
    labels = arch.block_of(key)
    if labels is None:
        return keep
    fine, block = labels
    if inex.skips(key, fine, block):
        return keep
    if calc.skip_vae and "first_stage_model" in key:
        return keep
    if calc.skip_self_keys and any(s in key for s in kernels.SELF_SKIP):
        return keep
    if calc.name in ("tensor", "tensor2") and len(a.shape(key)) == 0:
        return keep
    alpha = block_weight(weights_a, arch, fine, block) if weights_a else base_alpha
    beta = block_weight(weights_b, arch, fine, block) if weights_b else base_beta
    for rule in elemental:
        if rule.matches(key, fine, block):
            alpha = rule.value(index, randoms)
    if calc.skip_self_keys and alpha == 0:
        return keep
    if calc.name == "extract":
        check_extract_ratios(alpha, beta, f"block {block}")
    others = [(label, src) for label, src in (("B", b), ("C", c)) if src is not None]
    channels = _channels(key, a, others)
    return Job(key, MERGE, block, alpha, beta, channels, index)


def _plan_method(recipe: Recipe, models: Models) -> MergePlan:
    """A merge method's plan: every key of the base that all N models share (same shape, or the inpainting case) is
    merged with its per-block parameters; the others keep the base's tensor."""
    method = methods.get_method(recipe.method)
    a, others = models.a, tuple(models.others)
    if len(others) != len(recipe.models):
        raise MergeError(f"Method {method.name} needs its {len(recipe.models)} model(s) opened; got {len(others)}.")
    arch = _arch_of(a, "base")
    labels = [f"{i + 1}" for i in range(len(others))]
    for label, src in zip(labels, others, strict=True):
        _check_family(arch, _arch_of(src, label), label, src)
    needs_seed = method.random or any(has_random(getattr(recipe, f)) for f in (
        "weights_alpha", "elemental", *(f"{k}_{n}" for k in ("weights", "elemental") for n in METHOD_PARAMS)))
    if needs_seed and recipe.seed == -1:
        recipe = recipe.with_seed(secrets.randbelow(2**32))
    keys = a.keys()
    randoms = random_table(recipe.seed, len(keys)) if needs_seed else None
    fine_labels = frozenset(bl[0] for k in keys if (bl := arch.block_of(k))) if arch.is_sdxl else frozenset()
    values = {"alpha": parse_block_values(recipe.alpha, recipe.weights_alpha, recipe.elemental, arch, "alpha",
                                          randoms, fine_labels)}
    for name in METHOD_PARAMS:
        values[name] = parse_block_values(getattr(recipe, name), getattr(recipe, f"weights_{name}"),
                                          getattr(recipe, f"elemental_{name}"), arch, name, randoms, fine_labels, 50)
    inex = parse_inex(recipe.inex, recipe.inex_blocks, recipe.inex_elements, arch, fine_labels)
    jobs = []
    for index, key in enumerate(keys):
        labels_of = arch.block_of(key)
        if ("model" not in key or any(key not in src for src in others) or labels_of is None
                or ("weight" not in key and "bias" not in key) or inex.skips(key, *labels_of)):
            jobs.append(Job(key, COPY_A, index=index))
            continue
        fine, block = labels_of
        v = {name: bv.at(arch.blocks, key, fine, block, index, randoms) for name, bv in values.items()}
        methods.check_params(method, v["alpha"], v["density"], v["drop"], v["epsilon"], f"block {block}")
        channels = _channels(key, a, zip(labels, others, strict=True))
        jobs.append(Job(key, MERGE, block, v["alpha"], 0.0, channels, index, v["density"], v["drop"], v["epsilon"]))
    return MergePlan(recipe, arch, tuple(jobs), parse_adjust(recipe.adjust))


def similarity_pass(plan: MergePlan, models: Models, progress: Progress | None = None,
                    cancel: Cancel | None = None) -> tuple[MergePlan, dict[str, torch.Tensor]]:
    """The cosine modes' range pass: similarities over every non-VAE "model" key A and B share (as the seed does,
    whatever include/exclude says), trimmed to the 1st-99th percentile. Returns the plan with the range set and the
    per-column similarities of the keys to merge, so the main pass need not compute them again."""
    a, b = models.a, models.b
    normalize = plan.recipe.calc == "cosineA"
    to_merge = {job.key for job in plan.jobs if job.kind == MERGE}
    keys = [k for k in a.keys() if is_model_key(k) and k in b and "first_stage_model" not in k
            and (not plan.arch.is_flux or plan.arch.block_of(k) is not None)]
    collected, combs = [], {}

    def largest(model: Source, itemsize: int | None = None) -> int:
        return max((math.prod(model.shape(k)) * (itemsize or model.dtype(k).itemsize) for k in keys), default=0)

    # Reused for every key (reads, fp32 copies, normalised copies): no fresh memory per key.
    scratch = Scratch({"a": largest(a), "b": largest(b), **{slot: largest(a, 4) for slot in FP32_SLOTS}})
    for done, key in enumerate(keys, 1):
        _check_cancel(cancel)
        ta, tb = _narrowed(a.get(key, out=scratch.raw("a")), b.get(key, out=scratch.raw("b")))
        work = kernels.Fp32(*(scratch.tensor(slot, torch.float32, ta.shape) for slot in FP32_SLOTS))
        simab, comb = kernels.cosine_similarity(ta, tb, normalize, work)
        collected.append((simab if normalize else comb).reshape(-1).double().numpy())
        if key in to_merge:
            combs[key] = comb
        if progress:
            progress(done, len(keys))
    try:
        similarity = kernels.similarity_range(np.concatenate(collected) if collected else np.empty(0))
    except ValueError:
        raise MergeError("cosine merge: models A and B share no comparable tensors (all similarities are NaN); "
                         "check that both files hold real weights.") from None
    return dataclasses.replace(plan, similarity=similarity), combs


def _narrowed(a: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Cut A's dim 1 to the others' width when only that differs (inpainting A against a normal B)."""
    if others and a.dim() > 1 and a.shape[1] != others[0].shape[1]:
        return (a[:, : others[0].shape[1]], *others)
    return (a, *others)


def _check_cancel(cancel: Cancel | None) -> None:
    if cancel is not None and cancel():
        raise MergeCancelled("Merge cancelled; nothing was written.")


class Scratch:
    """One worker's reusable buffers. Touching fresh memory (page faults) costs more than the merge arithmetic,
    so each key is read and computed in buffers that are allocated once and reused for every key. For a device merge
    they are pinned, and `mark` holds the device's mark of the last copies out of them (see core.device)."""

    def __init__(self, sizes: dict[str, int] | None = None, pinned: bool = False):
        self._sizes = dict(sizes or {})
        self._buffers: dict[str, torch.Tensor] = {}
        self._views: dict[tuple, object] = {}  # the typed views handed out, by slot, dtype and shape (or "bytes")
        self.pinned = pinned
        self.mark: object | None = None

    def resize(self, sizes: dict[str, int], pinned: bool = False) -> None:
        """Prepare for a run whose largest keys need `sizes`; buffers big enough (and pinned as asked) are kept."""
        self._sizes = dict(sizes)
        self._views.clear()
        if pinned != self.pinned:
            self._buffers.clear()
            self.pinned = pinned

    def raw(self, slot: str) -> torch.Tensor:
        buf = self._buffers.get(slot)
        need = max(self._sizes.get(slot, 0), 1)
        if buf is None or buf.numel() < need:
            self._buffers.pop(slot, None)  # free the small one before touching the new one
            self._views = {k: v for k, v in self._views.items() if k[0] != slot}
            buf = self._buffers[slot] = torch.empty(need, dtype=torch.uint8, pin_memory=self.pinned)
        return buf

    def typed_bytes(self, slot: str, dtype: torch.dtype) -> tuple[torch.Tensor, memoryview]:
        """The whole slot as a flat `dtype` tensor and as writable bytes, both kept: a file's pieces are read into
        the bytes and used through a slice of the tensor."""
        key = (slot, dtype, "bytes")
        views = self._views.get(key)
        if views is None:
            raw = self.raw(slot)
            raw = raw[: raw.numel() // dtype.itemsize * dtype.itemsize]
            views = self._views[key] = (raw.view(dtype), memoryview(raw.numpy()))
        return views

    def tensor(self, slot: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """The slot's memory as a `dtype` tensor of `shape`. The same view is handed out again for the same request:
        a merge asks for its pieces' work buffers thousands of times, and three view operations each time cost more
        than a piece's arithmetic on a small key."""
        key = (slot, dtype, tuple(shape))
        view = self._views.get(key)
        if view is None:
            count = math.prod(shape)
            view = self._views[key] = self.raw(slot)[: count * dtype.itemsize].view(dtype).view(shape)
        return view


class ScratchPool:
    """Scratch buffers shared by consecutive runs (the cells of an X/Y/Z plot), so that a small re-merge touches no
    fresh memory; the buffers are freed with the pool."""

    def __init__(self):
        self._idle: list[Scratch] = []
        self._lock = threading.Lock()

    def acquire(self, sizes: dict[str, int], pinned: bool = False) -> Scratch:
        with self._lock:
            scratch = self._idle.pop() if self._idle else Scratch()
        scratch.resize(sizes, pinned)
        return scratch

    def release(self, scratch: Scratch) -> None:
        with self._lock:
            self._idle.append(scratch)


def _span_reader(source: Source, key: str, scratch: Scratch, slot: str) -> Callable[[int, int], torch.Tensor]:
    """A function reading spans of `key` from `source` into the scratch slot: straight into the slot's kept typed
    view for a file (`read_span`), else through `get_span`."""
    read_span = getattr(source, "read_span", None)
    if read_span is None:
        buffer = scratch.raw(slot)
        return lambda start, stop: source.get_span(key, start, stop, out=buffer)
    typed, raw = scratch.typed_bytes(slot, source.dtype(key))
    size = typed.element_size()

    def read(start: int, stop: int) -> torch.Tensor:
        read_span(key, start, stop, raw[: (stop - start) * size])
        return typed[: stop - start]

    return read


def _byte_view(tensor: torch.Tensor) -> torch.Tensor | None:
    """A contiguous CPU tensor's storage as flat bytes (to read a file straight into it), else None."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        return None
    return tensor.reshape(-1).view(torch.uint8)


class KeyMerger:
    """Computes one job's output from the sources into a destination tensor; safe to call from several threads
    (each with its own Scratch)."""

    def __init__(self, plan: MergePlan, models: Models, combs: dict[str, torch.Tensor] | None = None,
                 device: DeviceLink | torch.device | str | None = None, dest_holds_a: Collection[str] = (),
                 round_to_source: bool = False):
        self.plan, self.models, self.combs = plan, models, combs or {}
        # a destination of another dtype gets the result rounded to the source's dtype first, then cast (the sink's
        # `rounds_to_source`: the live model), instead of computed straight into its dtype (a file's save dtype)
        self.round_to_source = round_to_source
        self.dest_holds_a = dest_holds_a  # keys whose destination tensor already holds model A's exact values
        self.recipe = plan.recipe
        self.uses_b = plan.recipe.calc_mode.uses_b
        self.link = device_link(device)  # None: compute on the CPU in reusable buffers; else on that device
        self.smoothing = smoothing.Workers()  # smoothAdd's filter buffers, reused across keys
        self.finite = FiniteCheck()
        # formulas whose finite result does not prove finite inputs: their inputs are checked too (slower, exact)
        self.may_hide = kernels.CALC_MODES[plan.recipe.calc].selects or \
            bool(plan.recipe.method and methods.get_method(plan.recipe.method).drops)

    def _check_finite(self, job: Job, result: torch.Tensor, a, b=None, c=None) -> bool:
        models = self.models
        if job.kind != MERGE:
            ratio = "nothing (a copy)"
        else:
            ratio = f"alpha {job.alpha:g}" + (f", beta {job.beta:g}" if self.recipe.uses_beta else "")
        src = self.source(job)
        inputs = [(f"Model {label} ({model.name})", t) for label, model, t in
                  (("B" if src is models.b else "A", src, a), ("B", models.b, b), ("C", models.c, c))
                  if model is not None]
        finite = self.finite(job.key, result, inputs, ratio)
        if finite and self.may_hide and job.kind == MERGE:
            self.finite.inputs(job.key, inputs)
        return finite

    def source(self, job: Job) -> Source:
        return self.models.b if job.kind == COPY_B else self.models.a

    def dtype(self, job: Job) -> torch.dtype:
        return self.source(job).dtype(job.key)

    def shape(self, job: Job) -> tuple[int, ...]:
        return self.source(job).shape(job.key)

    def piece_length(self, job: Job) -> int:
        """Elements per piece when the job can stream through cache-sized pieces, else 0 (whole key). Pieces work
        for elementwise formulas: each input is read a piece at a time and every fp32 temporary stays in the CPU
        cache, instead of several key-sized passes through memory. Same operations per element, same bits."""
        if job.kind != MERGE or self.link is not None or job.channels or self._adjusted(job) or self.recipe.method:
            return 0
        shape = self.models.a.shape(job.key)
        numel = math.prod(shape)
        if self.recipe.calc in PIECEWISE_CALCS:
            return min(numel, PIECE)
        if self.recipe.calc in ROWWISE_CALCS and job.key in self.combs and len(shape) >= 1 and numel:
            row = numel // shape[0]
            return min(numel, max(row, PIECE // row * row))
        return 0

    def _adjusted(self, job: Job) -> bool:
        return self.plan.adjust is not None and job.key in ADJUST_KEYS

    def scratch_sizes(self) -> dict[str, int]:
        """Bytes each scratch slot needs for the largest key (or piece) of this plan. The fp32 work slots and the
        mask depend only on the longest piece, so they are sized once after the loop (it runs on every merge)."""
        sizes = dict.fromkeys(("a", "b", "c", "out", "piece", "mask", *FP32_SLOTS), 0)

        def need(slot: str, nbytes: int) -> None:
            sizes[slot] = max(sizes.get(slot, 0), nbytes)

        inputs = [(slot, model) for slot, model in (("b", self.models.b if self.uses_b else None),
                                                    ("c", self.models.c if self.recipe.uses_c else None),
                                                    *((f"m{i}", m) for i, m in enumerate(self.models.others)))
                  if model is not None]
        longest_piece = 0
        for job in self.plan.jobs:
            src = self.source(job)
            itemsize = src.dtype(job.key).itemsize
            numel = math.prod(src.shape(job.key))
            need("out", numel * itemsize)
            if job.kind != MERGE:
                continue
            piece = self.piece_length(job)  # pieces work in the fp32 buffers; whole keys allocate their own
            longest_piece = max(longest_piece, piece)
            need("a", (piece or numel) * itemsize)
            need("piece", piece * itemsize)  # a piece's result before it is widened into a wider tensor
            for slot, other in inputs:
                need(slot, (piece or math.prod(other.shape(job.key))) * other.dtype(job.key).itemsize)
        for slot in FP32_SLOTS:
            need(slot, longest_piece * torch.float32.itemsize)
        need("mask", longest_piece * torch.bool.itemsize)
        return sizes

    def __call__(self, job: Job, dest: torch.Tensor | None, scratch: Scratch) -> torch.Tensor:
        """The job's tensor, written into `dest` when given (else into scratch or a source's own tensor); the
        result must be consumed before this thread's next call."""
        if self.recipe.method and job.kind == MERGE and (self.link is not None or dest is not None):
            # a merge method reads N models into this worker's buffers and computes where the link says (or on the
            # CPU), then hands the result to the destination, wherever it lives
            src = self.source(job)
            result = self._merge_whole(job, scratch.tensor("out", src.dtype(job.key), src.shape(job.key)), scratch)
            return result if dest is None else dest.copy_(result)
        if self.link is not None:
            return self._on_device(job, dest, scratch, self.link)
        if dest is not None and dest.device.type != "cpu":  # a device tensor to write: go there, unpinned
            return self._on_device(job, dest, scratch, DeviceLink(dest.device))
        src = self.source(job)
        if job.kind != MERGE:  # a copy: read straight into dest's bytes when it has the source's dtype
            into = _byte_view(dest) if dest is not None and dest.dtype == src.dtype(job.key) else None
            if job.kind == COPY_A and self._holds_a(job, dest):
                tensor = dest  # it holds A's values already: nothing to read
            else:
                tensor = src.get(job.key, out=into if into is not None else scratch.raw("out"))
            known = getattr(src, "finite_keys", None)  # a copy is finite exactly where its source is
            if known is None or job.key not in known:
                if self._check_finite(job, tensor, tensor) and known is not None:
                    known.add(job.key)
            return tensor if dest is None or tensor.data_ptr() == dest.data_ptr() else dest.copy_(tensor)
        step = self.piece_length(job)
        if dest is None or (not step and self._narrows(src.dtype(job.key), dest)):
            # no destination, or a whole key that must be rounded to the source's dtype before it is widened
            result = scratch.tensor("out", src.dtype(job.key), src.shape(job.key))
            if step:
                return self._merge_in_pieces(job, result, scratch, step)
            result = self._merge_whole(job, result, scratch)
            return result if dest is None else dest.copy_(result)
        if step:
            return self._merge_in_pieces(job, dest, scratch, step)
        return self._merge_whole(job, dest, scratch)

    def _merge_in_pieces(self, job: Job, out: torch.Tensor, scratch: Scratch, step: int) -> torch.Tensor:
        """The job merged piece by piece into `out`. An `out` wider than the source (an fp16 file into an fp32 model)
        gets each piece rounded to the source's dtype in a cache-sized buffer first, then widened exactly: the bits
        of loading the merged file, without a key-sized buffer written and read back."""
        key, r = job.key, self.recipe
        flat = out.view(-1)
        dtype = self.dtype(job)
        narrow = scratch.tensor("piece", dtype, (step,)) if self._narrows(dtype, out) else None
        rows = out.shape[1:] if r.calc in ROWWISE_CALCS else None  # rowwise pieces keep their rows' shape
        a_in_out = narrow is None and self._reads_a_from_out(job, out)
        # a wider `out` holding A: each piece of A is narrowed from it (exactly) before the piece is overwritten
        a_from_out = scratch.typed_bytes("a", dtype)[0] if narrow is not None and self._holds_a(job, out) else None
        read_a = _span_reader(self.models.a, key, scratch, "a")
        read_b = _span_reader(self.models.b, key, scratch, "b") if self.uses_b else None
        read_c = _span_reader(self.models.c, key, scratch, "c") if r.uses_c else None
        works: dict[int, kernels.Fp32] = {}  # the fp32 work buffers, by piece length (all but the last are `step`)

        def shaped(t: torch.Tensor | None) -> torch.Tensor | None:
            return t if t is None or rows is None else t.view(-1, *rows)

        def work_for(piece: torch.Tensor) -> kernels.Fp32:
            work = works.get(piece.numel())
            if work is None:
                shape = piece.shape
                work = works[piece.numel()] = kernels.Fp32(
                    *(scratch.tensor(slot, torch.float32, shape) for slot in FP32_SLOTS),
                    mask=scratch.tensor("mask", torch.bool, shape))
            return work

        known = self._known_finite(job)
        check = known is None or key not in known[0] or key not in known[1]
        finite = [True]  # every piece checked came out finite

        def compute(start: int, stop: int, keep_equal: bool) -> bool:
            """Merge one piece; True when it kept A's values because B equals C there (trainDifference)."""
            piece = flat[start:stop]
            result = piece if narrow is None else narrow[: stop - start]
            if a_in_out:
                a = piece
            else:
                a = read_a(start, stop) if a_from_out is None else a_from_out[: stop - start].copy_(piece)
            b = read_b(start, stop) if read_b is not None else None
            c = read_c(start, stop) if read_c is not None else None
            if r.calc == "trainDifference" and keep_equal and torch.equal(b, c):
                piece.copy_(a)
                self._check_finite(job, a, a)
                return True
            a, b, c, result = shaped(a), shaped(b), shaped(c), shaped(result)
            self._compute(job, a, b, c, out=result, work=work_for(a))
            if narrow is not None:
                piece.copy_(result.view(-1))
            if check:
                if a_in_out and not all_finite(result):  # the result took A's place: the file holds A's values
                    a = shaped(read_a(start, stop))
                if not self._check_finite(job, result, a, b, c):
                    finite[0] = False
            return False

        # trainDifference keeps A where B equals C over the whole tensor (as the seed does); pieces that matched
        # are computed after all when another piece differs.
        kept, differs = [], False
        numel = flat.numel()
        for start in range(0, numel, step):
            span = (start, min(start + step, numel))
            if compute(*span, keep_equal=not differs):
                kept.append(span)
            else:
                differs = True
        if differs:
            for span in kept:
                compute(*span, keep_equal=False)
        if known is not None and finite[0]:  # the whole key came out finite: so are both models' values of it
            known[0].add(key)
            known[1].add(key)
        return out

    def _narrows(self, source: torch.dtype, dest: torch.Tensor) -> bool:
        """Whether a result for `dest` is rounded to the source's dtype before it is cast into `dest`."""
        return self.round_to_source and not _rounds_once(source, dest.dtype)

    def _holds_a(self, job: Job, dest: torch.Tensor | None) -> bool:
        """Whether `dest` already holds model A's exact values of the job's key (the live model's first merge after
        a load), in A's dtype or widened, so A need not be read."""
        return (dest is not None and job.key in self.dest_holds_a
                and holds_exactly(self.models.a.dtype(job.key), dest.dtype))

    def _reads_a_from_out(self, job: Job, out: torch.Tensor) -> bool:
        """Whether a CPU piece may take A's values from the output itself and be overwritten in place. Only for
        formulas that read every input element before writing that element: Weight sum (an elementwise lerp) and
        Add difference (summed in fp32 buffers, rounded into the output last), in the normal calc mode."""
        return (self._holds_a(job, out) and self.recipe.calc == "normal"
                and self.recipe.mode in (kernels.WEIGHT_SUM, kernels.ADD_DIFF))

    def _known_finite(self, job: Job) -> tuple[set[str], set[str]] | None:
        """The sets of keys known to hold finite values in models A and B, when this job's result is finite exactly
        where both inputs are: a Weight sum at 0 < alpha < 1 of fp16 values into fp16. The result lies between the
        inputs (torch's lerp computes it in fp32, far from overflow), and an inf/NaN input makes it inf/NaN. A key
        merged so once without a finite-check error needs no check in later merges of the same open files (the
        live model's merge after merge); a file changed on disk is opened anew, with empty sets. None otherwise."""
        r, a, b = self.recipe, self.models.a, self.models.b
        if r.calc != "normal" or r.mode != kernels.WEIGHT_SUM or not 0 < job.alpha < 1 or b is None:
            return None
        if a.dtype(job.key) != torch.float16 or b.dtype(job.key) != torch.float16:
            return None
        sets = getattr(a, "finite_keys", None), getattr(b, "finite_keys", None)
        return None if sets[0] is None or sets[1] is None else sets

    def _merge_whole(self, job: Job, out: torch.Tensor, scratch: Scratch) -> torch.Tensor:
        full = self.models.a.get(job.key, out=scratch.raw("a"))
        if self.recipe.method:
            return self._merge_method(job, full, out, scratch)
        b = self.models.b.get(job.key, out=scratch.raw("b")) if self.uses_b else None
        c = self.models.c.get(job.key, out=scratch.raw("c")) if self.recipe.uses_c else None
        a = full
        if job.channels:
            a, b, c = (t[:, : job.channels] if t is not None else None for t in (full, b, c))
        adjusted = self._adjusted(job)
        if adjusted or out.dtype not in kernels.LERP_DTYPES:  # fp32 inputs: rounded once (after any adjustment)
            a, b, c = (t.float() if t is not None else None for t in (a, b, c))
        if self.recipe.calc == "trainDifference" and torch.equal(b, c):  # the seed keeps A where B equals C
            out.copy_(full)
        else:
            self._finish(job, full, self._compute(job, a, b, c), out)
        self._check_finite(job, out, full, b, c)
        return out

    def _merge_method(self, job: Job, full: torch.Tensor, out: torch.Tensor, scratch: Scratch) -> torch.Tensor:
        """A merge method on one key: the base and every model read into this worker's buffers, computed in fp32."""
        tensors = [full, *(m.get(job.key, out=scratch.raw(f"m{i}")) for i, m in enumerate(self.models.others))]
        if job.channels:
            tensors = [t[:, : job.channels] for t in tensors]
        if self.link is not None:  # blocking copies: the worker's buffers are reused for the next key
            tensors = [t.to(self.link.device) for t in tensors]
        r = self.recipe
        params = methods.Params(job.alpha, job.density, job.drop, job.epsilon, r.model_weights, r.seed, job.key)
        method = methods.get_method(r.method)
        # a streaming kernel rounds its pieces straight into `out` when nothing is left to do to the result
        direct = method.streams and not job.channels and not self._adjusted(job) and out.device == tensors[0].device
        result = methods.merge_key(method, tensors[0], tensors[1:], params, out=out if direct else None)
        if not direct:
            self._finish(job, full, result, out)
        inputs = [(f"The base ({self.models.a.name})", full)]
        inputs += [(f"Model {i} ({m.name})", t)
                   for i, (m, t) in enumerate(zip(self.models.others, tensors[1:], strict=True), 1)]
        if self.finite(job.key, out, inputs, f"{r.method}, alpha {job.alpha:g}") and self.may_hide:
            self.finite.inputs(job.key, inputs)
        return out

    def _finish(self, job: Job, full: torch.Tensor, result: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The computed tensor adjusted (when the job's key is one of Adjust's) and rounded once into `out`; with
        narrowed channels, A's other channels are kept."""
        adjusted = self._adjusted(job)
        if adjusted:
            result = self.plan.adjust.apply(job.key, result.float(), self.plan.arch.is_sdxl)
        if job.channels:
            out.copy_(full)
            out[:, : job.channels] = result
            return out
        return out.copy_(result)

    def _on_device(self, job: Job, dest: torch.Tensor | None, scratch: Scratch, link: DeviceLink) -> torch.Tensor:
        """The device path: inputs read into the worker's (pinned) buffers once their previous copies are done,
        copied asynchronously, computed in fp32 on the device, rounded once to the source's dtype (as on the CPU
        path) and written into `dest` wherever it lives (else into a CPU buffer)."""
        src = self.source(job)
        dtype, shape = src.dtype(job.key), src.shape(job.key)
        # the destination on this device already holds A's values: A is neither read nor uploaded (a result is made
        # in new device memory before it overwrites them, so every formula may read them)
        a_in_dest = self._holds_a(job, dest) and _same_device(dest.device, link.device)
        link.wait(scratch.mark)
        if job.kind != MERGE:
            if a_in_dest and job.kind == COPY_A:
                return dest
            tensor = src.get(job.key, out=scratch.raw("out"))
            if dest is None:
                return tensor
            moved = link.upload(tensor) if dest.device != tensor.device else tensor
            scratch.mark = link.mark()
            return dest.copy_(moved)
        inputs = [None if a_in_dest else self.models.a.get(job.key, out=scratch.raw("a")),
                  self.models.b.get(job.key, out=scratch.raw("b")) if self.uses_b else None,
                  self.models.c.get(job.key, out=scratch.raw("c")) if self.recipe.uses_c else None]
        full, b, c = (link.upload(t) if t is not None else None for t in inputs)
        scratch.mark = link.mark()
        if a_in_dest:
            full = dest
        if self.recipe.calc == "trainDifference" and torch.equal(b, c):  # the seed keeps A where B equals C
            result = full
        else:
            a = full[:, : job.channels] if job.channels else full
            if job.channels:
                b, c = (t[:, : job.channels] if t is not None else None for t in (b, c))
            a, b, c = (t.float() if t is not None else None for t in (a, b, c))
            result = self._compute(job, a, b, c)
            if self._adjusted(job):
                result = self.plan.adjust.apply(job.key, result.float(), self.plan.arch.is_sdxl)
            if job.channels:
                merged = full.to(torch.float32, copy=True)
                merged[:, : job.channels] = result
                result = merged
        result = result.to(dtype)
        self._check_finite(job, result, full, b, c)
        if dest is None:
            dest = scratch.tensor("out", dtype, shape)
        return dest.copy_(result)

    def _compute(self, job: Job, a, b, c, out: torch.Tensor | None = None,
                 work: kernels.Fp32 | None = None) -> torch.Tensor:
        """The job's formula; the elementwise ones write into `out` and work in `work`'s buffers when given."""
        calc, r = self.recipe.calc, self.recipe
        alpha, beta = job.alpha, job.beta
        if calc == "normal":
            return kernels.normal(r.mode, a, b, c, alpha, beta, out=out, work=work)
        if calc in ("cosineA", "cosineB"):
            comb = self.combs.get(job.key)
            comb = kernels.cosine_similarity(a, b, calc == "cosineA")[1] if comb is None else comb.to(a.device)
            smin, smax = self.plan.similarity
            return kernels.cosine_merge(a, b, comb, abs(alpha) if calc == "cosineA" else alpha, smin, smax, out, work)
        if calc == "trainDifference":
            return kernels.train_difference(a, b, c, alpha, out, work)
        if calc == "self":
            return kernels.scale_self(a, alpha, out, work)
        if calc in ("smoothAdd", "smoothAdd MT"):
            return kernels.smooth_add(a, b, c, alpha, self.smoothing)
        if calc == "extract":
            return kernels.extract(a, b, c, alpha, beta, r.gamma)
        if calc in ("tensor", "tensor2"):
            return kernels.tensor_swap(a, b, alpha, beta, by_columns=calc == "tensor2")
        return kernels.plus_random(a, alpha, r.seed, job.key)


def default_threads(plan: MergePlan) -> int:
    """smoothAdd MT uses every core; other merges overlap reading one key with computing another on two."""
    cores = os.cpu_count() or 1
    return cores if plan.recipe.calc == "smoothAdd MT" else min(2, cores)


def run_merge(plan: MergePlan, models: Models, sink: Sink, progress: Progress | None = None,
              cancel: Cancel | None = None, threads: int | None = None,
              device: DeviceLink | torch.device | str | None = None, scratch: ScratchPool | None = None,
              dest_holds_a: Collection[str] = ()) -> object:
    """Run every job of `plan` into `sink`; on cancel or error the sink is aborted and nothing is kept.

    Workers take jobs in order, each with its own scratch buffers, and hand every finished tensor to the sink
    at once (sinks accept keys in any order); progress is reported after every key. With a `device` ("cuda"),
    each key's inputs are moved there (core.device), computed, and the result written into the sink's tensor,
    on the device or on the CPU. `scratch` keeps the workers' buffers for the next run (default: they are freed
    with this run). `dest_holds_a`: keys whose sink tensor already holds model A's exact values (`holds_exactly`),
    which then are not read from A's file: copies of A are skipped; on the CPU, Weight sum and Add difference take
    A from the tensor they overwrite; on a device holding the tensors (a GPU model), every formula does.
    """
    threads = max(1, threads or default_threads(plan))
    buffers = scratch or ScratchPool()
    taken: list[Scratch] = []
    link = device_link(device)
    try:
        combs: dict[str, torch.Tensor] = {}
        if plan.recipe.calc in ("cosineA", "cosineB"):
            plan, combs = similarity_pass(plan, models, None, cancel)
        merger = KeyMerger(plan, models, combs, link, dest_holds_a, getattr(sink, "rounds_to_source", False))
        sink.begin([(job.key, merger.dtype(job), merger.shape(job)) for job in plan.jobs])
        sizes = merger.scratch_sizes()
        def take_scratch() -> Scratch:
            mine = buffers.acquire(sizes, link is not None and link.pinned)
            taken.append(mine)
            return mine

        total = len(plan.jobs)
        if threads == 1:
            mine = take_scratch()
            for index, job in enumerate(plan.jobs, 1):
                _run_job(job, merger, sink, mine, cancel)
                if progress:
                    progress(index, total)
        else:
            _run_workers(plan.jobs, threads, take_scratch, merger, sink, progress, cancel)
        _check_cancel(cancel)  # a Stop during the last key still keeps nothing: the workers check before a key only
        return sink.finish()
    except BaseException:
        sink.abort()
        raise
    finally:
        if link is not None:
            link.finish()  # no copy may still read a buffer handed back
        for mine in taken:
            buffers.release(mine)


def _run_job(job: Job, merger: KeyMerger, sink: Sink, scratch: Scratch, cancel: Cancel | None) -> None:
    """One key: stop first if asked, then merge it into the sink's tensor (or a buffer) and hand it to the sink."""
    _check_cancel(cancel)
    sink.put(job.key, merger(job, sink.target(job.key), scratch))


def _run_workers(jobs: list[Job], threads: int, take_scratch: Callable[[], Scratch], merger: KeyMerger, sink: Sink,
                 progress: Progress | None, cancel: Cancel | None) -> None:
    """Run `jobs` on `threads` worker threads, each taking the next job as it finishes one; progress is reported
    from the calling thread, which also raises the first worker error. A queue of finished keys instead of a future
    per key: a future's lock and condition, made and waited on under the GIL for each of a model's ~1100 keys, held
    the GIL longer than the small keys' own work."""
    share = worker_share(threads)
    pending = iter(jobs)
    take = threading.Lock()
    finished: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
    stop = threading.Event()

    def worker() -> None:
        try:
            use_threads_here(*share)  # the workers share torch's threads instead of each taking them all
            mine = take_scratch()
            while not stop.is_set():
                with take:
                    job = next(pending, None)
                if job is None:
                    return
                _run_job(job, merger, sink, mine, cancel)
                finished.put(None)
        except BaseException as e:  # handed to the calling thread, which raises it
            stop.set()
            finished.put(e)

    workers = [threading.Thread(target=worker, name=f"merge-{i}", daemon=True) for i in range(threads)]
    for thread in workers:
        thread.start()
    try:
        for index in range(1, len(jobs) + 1):
            error = finished.get()
            if error is not None:
                raise error
            if progress:
                progress(index, len(jobs))
    finally:
        stop.set()
        for thread in workers:
            thread.join()


def _same_device(tensor_device: torch.device, compute: torch.device) -> bool:
    """Whether a tensor lives where the merge computes ("cuda" without an index means the current one)."""
    return tensor_device.type == compute.type and compute.index in (None, tensor_device.index)


ALIGN = 64  # bytes; every tensor carved from an arena starts on a cache line (and on its element size)


class DictSink:
    """Collects the merged state dict in memory, in one block allocated up front (cheaper than a fresh allocation
    per key); every tensor is a view into it."""

    def __init__(self):
        self.state: dict[str, torch.Tensor] = {}

    def begin(self, entries) -> None:
        sizes = [-(-math.prod(shape) * dtype.itemsize // ALIGN) * ALIGN for _, dtype, shape in entries]
        arena = torch.empty(sum(sizes), dtype=torch.uint8)
        self.state, offset = {}, 0
        for (key, dtype, shape), size in zip(entries, sizes, strict=True):
            self.state[key] = arena[offset: offset + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
            offset += size

    def target(self, key: str) -> torch.Tensor:
        return self.state[key]

    def put(self, key: str, tensor: torch.Tensor) -> None:
        if tensor.data_ptr() != self.state[key].data_ptr():
            self.state[key].copy_(tensor)

    def finish(self) -> dict[str, torch.Tensor]:
        return self.state

    def abort(self) -> None:
        self.state = {}


class TensorSink:
    """Writes the merge into existing tensors (the loaded model's weights, on the CPU or a device), cast to their
    dtype. A key whose source is narrower than its tensor (an fp16 file into an fp32 model) is rounded to the source's
    dtype first, so the tensor holds what loading the merged file would give.

    Keys with no matching tensor (other name, shape) are collected in `extra` for the caller to decide. An aborted run
    leaves the keys already written changed: `touched` names every tensor written to (or being written when the run
    stopped), so that a caller can put exactly those back.
    """

    rounds_to_source = True  # a tensor of another dtype gets the source-dtype result cast (see KeyMerger)

    def __init__(self, targets: Mapping[str, torch.Tensor]):
        self.targets = targets
        self.extra: dict[str, torch.Tensor] = {}
        self.touched: set[str] = set()
        self._shapes: dict[str, tuple[int, ...]] = {}

    def begin(self, entries) -> None:
        self.extra = {}
        self._shapes = {key: tuple(shape) for key, _, shape in entries}

    def target(self, key: str) -> torch.Tensor | None:
        t = self.targets.get(key)
        if t is None or tuple(t.shape) != self._shapes[key]:
            return None
        if t.device.type == "cpu" and not t.is_contiguous():
            return None  # not contiguous: computed in a buffer, then cast by put
        self.touched.add(key)
        return t

    def put(self, key: str, tensor: torch.Tensor) -> None:
        t = self.targets.get(key)
        if t is not None and tuple(t.shape) == tuple(tensor.shape):
            self.touched.add(key)
            if t.data_ptr() != tensor.data_ptr():
                with torch.no_grad():
                    t.copy_(tensor)
        else:
            self.extra[key] = tensor.clone()

    def finish(self) -> Mapping[str, torch.Tensor]:
        return self.targets

    def abort(self) -> None:
        self.extra = {}


def holds_exactly(source: torch.dtype, tensor: torch.dtype) -> bool:
    """Whether a tensor of dtype `tensor` loaded from values of dtype `source` holds them exactly: the same dtype,
    or fp16/bf16 widened to fp32 (the WebUI's model on a CPU, `--no-half`)."""
    return source == tensor or (source in (torch.float16, torch.bfloat16) and tensor == torch.float32)


def _rounds_once(source: torch.dtype, target: torch.dtype) -> bool:
    """Whether computing straight into a `target` tensor gives the same bits as computing into the source's dtype
    and casting: yes when they are equal, or when the source is fp32 (the fp32 result is then rounded once anyway)."""
    return source == target or source == torch.float32


def changed_jobs(old: MergePlan, new: MergePlan) -> MergePlan:
    """The part of `new` that differs from `old`, for re-merging into tensors that hold `old`'s result.

    Per key, a job is unchanged when its kind, ratios and channel handling are equal and the recipe's models,
    modes, seed and adjust are the same; changing one block's weight therefore re-merges only that block's keys.
    Raises ValueError when the plans cannot be compared (other models, calc or architecture): merge fully then.
    """
    same = ("model_a", "model_b", "model_c", "mode", "calc", "gamma", "seed", "method", "models", "model_weights")
    if old.arch != new.arch or any(getattr(old.recipe, f) != getattr(new.recipe, f) for f in same):
        raise ValueError("plans differ in models, modes or seed; a full merge is needed")
    if new.recipe.calc in ("cosineA", "cosineB") and old.similarity != new.similarity:
        raise ValueError("cosine similarity range differs; a full merge is needed")
    before = {job.key: job for job in old.jobs}
    adjust_changed = old.adjust != new.adjust
    jobs = tuple(job for job in new.jobs
                 if before.get(job.key) != job or (adjust_changed and job.key in ADJUST_KEYS))
    return dataclasses.replace(new, jobs=jobs)


def copy_plan(keys: Iterable[str], name: str = "") -> MergePlan:
    """A plan that copies `keys` from model A as they are: putting a model's weights back from a checkpoint file."""
    return MergePlan(Recipe(name), None, tuple(Job(key, COPY_A) for key in keys), None)


def output_shapes(plan: MergePlan, models: Models) -> dict[str, tuple[int, ...]]:
    """Each output key's shape, from the headers (what a destination must hold)."""
    return {job.key: tuple((models.b if job.kind == COPY_B else models.a).shape(job.key)) for job in plan.jobs}


def merge_to_dict(recipe: Recipe, models: Models, presets: Presets | None = None, progress: Progress | None = None,
                  cancel: Cancel | None = None, threads: int | None = None) -> tuple[MergePlan, dict]:
    plan = plan_merge(recipe, models, presets)
    return plan, run_merge(plan, models, DictSink(), progress, cancel, threads)
