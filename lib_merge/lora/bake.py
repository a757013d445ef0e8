"""Bake LoRAs into a checkpoint: W' = W + Σ ratio·ΔW, computed in fp32 per key and rounded once.

Everything a user can get wrong is checked while planning (file kinds, architecture, names, factor shapes, NaN
factors, ratios, block weights), before any output exists. The bake itself streams key by key: a touched key is
read, changed in an fp32 copy and written; an untouched key is copied as it is. The same plan serves the file
output (through the atomic stream writer merges use) and the live model in the WebUI (`baked`).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.arch import Arch, detect_arch
from ..core.errors import MergeError
from ..core.intraop import use_threads_here, worker_share
from ..core.weights import Presets
from ..io.checkpoint import Checkpoint, SaveOptions, check_output_path, merge_metadata, open_checkpoint
from ..io.hashes import HashCache
from ..io.history import History
from ..io.output import FileSink
from .blocks import LoraSpec, load_presets
from .detect import check_family
from .formats import LoraError, LoraFile, LoraModule, read_lora
from .keys import Target, block_slot, checkpoint_targets, module_id

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Contribution:
    """One module of one LoRA changing one checkpoint tensor (rows: OpenCLIP's q/k/v slice of in_proj)."""

    module: LoraModule
    ratio: float
    rows: tuple[int, int] | None
    bias: bool  # True: this is the module's change to the weight's bias


@dataclass
class LoraUse:
    """What one LoRA of a bake does: modules applied, and the names that match nothing in the model."""

    spec: LoraSpec
    lora: LoraFile
    applied: int = 0
    unmatched: list[str] = field(default_factory=list)

    def summary(self) -> str:
        line = f"{self.lora.name} x{self.spec.ratio:g}: {self.applied} of {len(self.lora.modules)} modules applied"
        if self.unmatched:
            shown = ", ".join(self.unmatched[:8]) + (" ..." if len(self.unmatched) > 8 else "")
            line += f"; {len(self.unmatched)} match no key of the model: {shown}"
        if self.lora.unknown_keys:
            line += f"; {len(self.lora.unknown_keys)} keys of no known kind ignored: {self.lora.unknown_keys[0]} ..."
        return line


@dataclass
class BakePlan:
    arch: Arch
    uses: list[LoraUse]
    changes: dict[str, list[Contribution]]

    def apply(self, key: str, tensor: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
        """The baked tensor for `key`: a new tensor in the input's dtype, the input never written; or, given
        `scratch` (a flat fp32 buffer of at least its size, reused from key to key so no fresh memory is touched),
        computed there and rounded back into `tensor` itself, which is returned."""
        contributions = self.changes.get(key)
        if not contributions:
            return tensor
        if scratch is None:
            out = tensor.to(torch.float32, copy=True)
        else:
            out = scratch[: tensor.numel()].view(tensor.shape)
            out.copy_(tensor)
        low_rank: dict[tuple[int, int] | None, list] = {}  # rows -> [(ratio·up·scale, down)]: one fused add each
        for c in contributions:
            rows = slice(*c.rows) if c.rows else slice(None)
            factors = None if c.bias else c.module.low_rank_factors(c.ratio)
            if factors is not None:
                low_rank.setdefault(c.rows, []).append(factors)
                continue
            if c.bias:
                change = c.module.bias_delta(tuple(tensor[rows].shape))
            else:
                change = c.module.delta(tensor[rows])  # (IA)3 and DoRA read the unchanged W
            out[rows].add_(change, alpha=c.ratio)
        for rows, pairs in low_rank.items():
            # W += [u1 u2 ...] @ [d1; d2; ...]: every LoRA's up·down summed in one fp32 matrix multiply-add,
            # with no ΔW-sized temporaries (the rows of a contiguous tensor are a contiguous view)
            target = out[slice(*rows) if rows else slice(None)]
            target.view(target.shape[0], -1).addmm_(torch.cat([u for u, _ in pairs], 1),
                                                     torch.cat([d for _, d in pairs], 0))
        return out.to(tensor.dtype) if scratch is None else tensor.copy_(out)


def _module_checked(lora: LoraFile, module: LoraModule, shape: tuple[int, ...],
                    bias_shape: tuple[int, ...] | None) -> None:
    try:
        raw = module.raw_shape
        if raw is None or any(p in module.parts for p in ("dora_scale", "magnitude", "bias")):
            module.on_meta().delta(torch.empty(shape, device="meta"))  # the full path, shapes only
        elif math.prod(raw) != math.prod(shape):
            raise LoraError(f"module {module.name} makes a {list(raw)} change for a {list(shape)} weight")
        module.bias_delta(bias_shape)
    except LoraError as e:
        raise LoraError(f"LoRA {lora.name}: {e}; it does not fit this model (a LoRA for another model family?)."
                        ) from None


def plan_bake(model: Checkpoint, specs: Sequence[LoraSpec], presets: Presets | None = None,
              loras: Sequence[LoraFile] | None = None) -> BakePlan:
    """Check every input and decide which tensors change; raises LoraError/MergeError before anything is written."""
    if not specs:
        raise LoraError("No LoRA given; add at least one as file:ratio[:block weights].")
    presets = presets or load_presets()
    slot_ratios = [spec.slot_ratios(presets) for spec in specs]  # bad ratios/blocks fail before any file is read
    arch = detect_arch(set(model.keys()), model.shape, model.name)
    targets = checkpoint_targets(model.keys(), model.shape, arch.family)
    changes: dict[str, list[Contribution]] = {}
    uses = []
    for i, spec in enumerate(specs):
        lora = loras[i] if loras is not None else read_lora(spec.path)
        lora.check()
        check_family(lora, arch.family, model.name)
        use = LoraUse(spec, lora)
        for name, module in lora.modules.items():
            mid = module_id(name, arch.family)
            target: Target | None = targets.get(mid) if mid else None
            if target is None:
                use.unmatched.append(name)
                continue
            shape = model.shape(target.key)
            if target.rows:
                shape = (target.rows[1] - target.rows[0], *shape[1:])
            bias_shape = (target.rows[1] - target.rows[0],) if target.rows and target.bias else (
                model.shape(target.bias) if target.bias else None)
            _module_checked(lora, module, shape, bias_shape)
            use.applied += 1
            ratio = slot_ratios[i][block_slot(mid, arch.family)]
            if ratio == 0:
                continue
            changes.setdefault(target.key, []).append(Contribution(module, ratio, target.rows, False))
            if module.bias_delta(bias_shape) is not None:
                changes.setdefault(target.bias, []).append(Contribution(module, ratio, target.rows, True))
        if not use.applied:
            shown = ", ".join(list(lora.modules)[:3])
            raise LoraError(f"LoRA {lora.name} has no module that matches {model.name} (its modules are named like "
                            f"{shown}); it is not a LoRA for this model or uses unknown names.")
        uses.append(use)
    return BakePlan(arch, uses, changes)


@dataclass(frozen=True)
class BakeResult:
    path: Path
    plan: BakePlan
    history_id: int | None


def bake_recipe(model: str | Path, specs: Sequence[LoraSpec]) -> dict:
    """The recipe a bake is logged and stamped with: the model and each LoRA's file, ratio and block weights."""
    return {"operation": "lora bake", "model_a": str(model), "mode": "LoRA bake",
            "loras": [{"path": s.path, "ratio": s.ratio, "blocks": s.blocks} for s in specs],
            "weights_alpha": " ".join(s.text() for s in specs)}


def _metadata(recipe: dict, model: Checkpoint, uses: list[LoraUse], hashes: HashCache) -> dict[str, str]:
    entries = [(model.name, hashes.sha256(model.path), hashes.legacy_hash(model.path), model.metadata)]
    entries += [(u.lora.name, hashes.sha256(u.lora.path), hashes.legacy_hash(u.lora.path)) for u in uses]
    return merge_metadata(json.dumps(recipe), entries)


def _bake_keys(plan: BakePlan, model: Checkpoint, keys: list[str], sink: FileSink, progress: Progress | None) -> None:
    """Every key into `sink`: touched keys baked by two workers (one reads and writes while the other multiplies),
    which share torch's threads instead of each taking them all (measured: torch's own two-thread team per matrix
    multiply cost 3-15x the CPU of one thread on a busy two-core machine); untouched keys copied file to file
    meanwhile. Each worker keeps one read buffer and one fp32 work buffer: fresh memory per key costs more page
    faults than the bake itself, and put() has written (or, for .ckpt, cloned) each tensor before the next read
    reuses them."""
    workers = min(2, os.cpu_count() or 1)
    share = worker_share(workers)
    local = threading.local()
    read_bytes = max((model.nbytes(k) for k in plan.changes), default=0)
    work_numel = max((math.prod(model.shape(k)) for k in plan.changes), default=0)

    def bake(key: str) -> None:
        if not hasattr(local, "buffer"):
            use_threads_here(*share)
            local.buffer = torch.empty(read_bytes, dtype=torch.uint8)
            local.scratch = torch.empty(work_numel)
        sink.put(key, plan.apply(key, model.get(key, out=local.buffer), local.scratch))

    with ThreadPoolExecutor(workers, thread_name_prefix="bake") as pool:
        baking = {key: pool.submit(bake, key) for key in keys if key in plan.changes}
        try:
            for done, key in enumerate(keys, 1):
                if key in baking:
                    baking[key].result()
                else:
                    sink.put_unchanged(key, model)
                if progress is not None:
                    progress(done, len(keys))
        finally:
            for future in baking.values():
                future.cancel()


def bake_to_file(model_path: str | Path, specs: Sequence[LoraSpec], output: str | Path,
                 options: SaveOptions | None = None, *, overwrite: bool = False, presets: Presets | None = None,
                 hashes: HashCache | None = None, history: History | None = None, metadata: bool = True,
                 progress: Progress | None = None) -> BakeResult:
    """Bake `specs` into the model at `model_path` and stream the result to `output` (atomic; inputs untouched)."""
    output = Path(output)
    if output.suffix.lower() not in (".safetensors", ".ckpt"):
        raise MergeError(f"Output {output} must end in .safetensors or .ckpt.")
    check_output_path(output, [model_path, *(s.path for s in specs)], overwrite)
    options = options or SaveOptions()
    recipe = bake_recipe(model_path, specs)
    with open_checkpoint(model_path) as model:
        plan = plan_bake(model, specs, presets)
        meta = _metadata(recipe, model, plan.uses, hashes or HashCache()) if metadata else {}
        keys = model.keys()
        sink = FileSink(output, options, meta, plan.arch.is_sdxl, overwrite)
        sink.begin([(k, model.dtype(k), model.shape(k)) for k in keys])
        try:
            _bake_keys(plan, model, keys, sink, progress)
            sink.finish()
        except BaseException:
            with contextlib.suppress(Exception):
                sink.abort()
            raise
    title = f"LoRA bake: {Path(model_path).stem} + " + " + ".join(f"{s.name}:{s.ratio:g}" for s in specs)
    history_id = history.append(title, recipe) if history is not None else None
    return BakeResult(output, plan, history_id)
