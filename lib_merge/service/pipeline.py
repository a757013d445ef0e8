"""Whole merges from files: open the models a recipe names, merge, save with metadata, log to the history.

Shared by the command line, the WebUI tab and the standalone app, so each front end only turns its inputs into a
`Recipe` and its options.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..core.engine import Cancel, MergePlan, Models, Progress, plan_merge, run_merge
from ..core.errors import MergeError
from ..core.recipe import Recipe
from ..core.weights import Presets
from ..io.checkpoint import (
    SaveOptions,
    atomic_output,
    check_output_path,
    merge_metadata,
    model_config,
    open_checkpoint,
    open_vae,
)
from ..io.hashes import HashCache
from ..io.history import History
from ..io.output import FileSink
from . import finite_memory
from .ratio_log import write_ratio_log

Resolve = Callable[[str], Path]


@dataclass(frozen=True)
class SaveResult:
    path: Path
    plan: MergePlan
    history_id: int | None
    warnings: tuple[str, ...] = ()  # e.g. about fp8 output precision


@contextlib.contextmanager
def open_models(recipe: Recipe, resolve: Resolve = Path):
    """Open the checkpoints a validated recipe uses (B/C only when its mode needs them, a method's N models);
    closed on exit."""
    with contextlib.ExitStack() as stack:
        def load(name: str) -> object | None:
            return stack.enter_context(open_checkpoint(resolve(name))) if name else None

        yield Models(load(recipe.model_a), load(recipe.model_b), load(recipe.model_c),
                     tuple(load(m) for m in recipe.models))


def check_device(device: str | None) -> str | None:
    """"cpu", "cuda" or None (the CPU); a CUDA request without a usable GPU is refused, not silently ignored."""
    if device in (None, "", "cpu"):
        return None
    if not str(device).startswith("cuda"):
        raise MergeError(f"Unknown merge device {device!r}; use cpu or cuda.")
    import torch

    if not torch.cuda.is_available():
        raise MergeError(f"Merge device {device!r} needs a CUDA GPU, and this torch ({torch.__version__}) sees none; "
                         f"use cpu.")
    return str(device)


def merge_inputs(recipe: Recipe, resolve: Resolve = Path, options: SaveOptions | None = None,
                 presets: Presets | None = None) -> list[tuple[str, Path]]:
    """Every file a merge reads, with what it is: the models, the VAE to bake and the preset files. None of them
    may be the merge's output or its history, by any path."""
    if recipe.method:  # a base and N models
        found = [("the base", resolve(recipe.model_a))]
        found += [(f"model {i}", resolve(name)) for i, name in enumerate(recipe.models, 1)]
    else:
        found = [(f"model {slot}", resolve(name)) for slot, name in
                 (("A", recipe.model_a), ("B", recipe.model_b), ("C", recipe.model_c)) if name]
    if options is not None and options.bake_vae:
        found.append(("the VAE to bake", Path(options.bake_vae)))
    if options is not None and options.copy_config and (config := model_config(resolve(recipe.model_a))):
        found.append(("model A's config", config))
    found += [("the preset file", path) for path in (presets.paths if presets is not None else ())]
    return found


def check_files(recipe: Recipe, output: Path | None, resolve: Resolve = Path, options: SaveOptions | None = None,
                presets: Presets | None = None, history: History | None = None, overwrite: bool = False) -> None:
    """Before any tensor is read: the output is none of the inputs (nor the history), the history none of the
    merge's files, writable, and set aside if it is not a history at all."""
    inputs = merge_inputs(recipe, resolve, options, presets)
    if output is not None:
        extra = [history.path] if history is not None else []
        check_output_path(output, [path for _, path in inputs] + extra, overwrite)
        if options is not None and options.copy_config and model_config(resolve(recipe.model_a)):
            check_output_path(output.with_suffix(".yaml"), [path for _, path in inputs] + extra, overwrite)
    if history is not None:
        history.check(inputs + ([("the output", output)] if output is not None else []))


def recipe_metadata(plan: MergePlan, models: Models, hashes: HashCache) -> dict[str, str]:
    """`sd_merge_recipe` / `sd_merge_models` as the WebUI's merger writes them, hashes from the (cached) files."""
    entries = []
    for source in (models.a, models.b, models.c, *models.others):
        if source is not None and source.path is not None:
            entries.append((source.name, hashes.sha256(source.path), hashes.legacy_hash(source.path), source.metadata))
    return merge_metadata(plan.recipe.to_json(), entries)


def merge_to_file(recipe: Recipe, output: str | Path, options: SaveOptions | None = None, *,
                  overwrite: bool = False, resolve: Resolve = Path, presets: Presets | None = None,
                  hashes: HashCache | None = None, history: History | None = None, metadata: bool = True,
                  progress: Progress | None = None, cancel: Cancel | None = None,
                  threads: int | None = None, device: str | None = None, log_ratios: bool = False) -> SaveResult:
    """Merge the recipe's models and stream the result into `output`; every input error is raised before writing.
    `log_ratios` writes every key's ratios to the console first (`ratio_log`)."""
    presets = presets or Presets.load()
    recipe = recipe.validate(presets)
    options = options or SaveOptions()
    output = Path(output)
    if output.suffix.lower() not in (".safetensors", ".ckpt"):
        raise MergeError(f"Output {output} must end in .safetensors or .ckpt.")
    check_files(recipe, output, resolve, options, presets, history, overwrite)
    with open_models(recipe, resolve) as models, contextlib.ExitStack() as stack:
        plan = plan_merge(recipe, models, presets)
        if log_ratios:
            write_ratio_log(plan)
        vae = open_vae(options)
        if vae is not None:
            stack.callback(vae.close)
        hashes = hashes or HashCache()
        meta = recipe_metadata(plan, models, hashes) if metadata else {}
        sink = FileSink(output, options, meta, plan.arch.is_sdxl, overwrite, vae)
        finite_memory.recall(models, hashes)
        run_merge(plan, models, sink, progress, cancel, threads, check_device(device))
        finite_memory.remember(models, hashes)
    config = model_config(resolve(recipe.model_a)) if options.copy_config else None
    if config is not None:  # after the model: a failed merge leaves no config behind either
        with atomic_output(output.with_suffix(".yaml"), overwrite) as tmp:
            shutil.copyfile(config, tmp)
    history_id = history.append(plan.recipe.title(), plan.recipe.to_dict()) if history is not None else None
    return SaveResult(output, plan, history_id, tuple(sink.warnings))
