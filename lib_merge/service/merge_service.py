"""What the tab, the API and the X/Y/Z plots do with a recipe: merge into the loaded model, save, restore, generate.

One `MergeService` per host. It keeps the source checkpoints open between merges (bounded by `keep_models`) and
remembers the plan of the merge that is loaded, so the next merge recomputes only the keys whose inputs or ratios
changed.

A merge is written straight into the loaded model's own tensors (no state dict is built, no copy of the model is
kept). The sources are on disk, so a merge that fails or is cancelled is undone by recomputing the tensors it touched
with the previous recipe (or copying them from the base checkpoint file), and "Restore base model" copies from that
file. Hosts that cannot be written in place (fp8 storage, another architecture) get the whole merge to load instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..core.engine import (
    MERGE,
    DictSink,
    MergePlan,
    Models,
    ScratchPool,
    TensorSink,
    changed_jobs,
    copy_plan,
    output_shapes,
    plan_merge,
    run_merge,
)
from ..core.errors import MergeCancelled, MergeError
from ..core.recipe import Recipe
from ..core.weights import Presets
from ..hosts.base import GenerationRequest, GenerationResult, Host, LiveWeights, MergeIdentity
from ..io.checkpoint import Checkpoint, SaveOptions, default_output_name, open_checkpoint, validate_custom_name
from ..io.hashes import HashCache
from ..io.history import History
from ..lora.bake import plan_bake
from ..lora.blocks import LoraSpec, load_presets
from . import finite_memory
from .as_loaded import AsLoaded
from .lora_service import LiveBake, ModelShapes, apply_bake, live_identity, live_record
from .pipeline import SaveResult, check_device, check_files, merge_to_file
from .ratio_log import write_ratio_log

INFOTEXT_RECIPE = "Merge recipe"
INFOTEXT_MERGE = "Merge"
INFOTEXT_FAILED = "Merge error"  # a generation's requested merge that could not be made, and why


@dataclass(frozen=True)
class MergeOutcome:
    plan: MergePlan
    identity: MergeIdentity
    recomputed: int  # keys computed for this merge (all of them, or only those that changed)
    seconds: float
    history_id: int | None = None
    note: str = ""  # why the merge was not written into the model's tensors (the host loaded it whole)

    def message(self) -> str:
        part = "all" if self.recomputed == len(self.plan.jobs) else f"{self.recomputed} changed"
        logged = f", merge ID {self.history_id}" if self.history_id is not None else ""
        note = f" {self.note}" if self.note else ""
        return (f"Loaded {self.identity.name} ({self.plan.arch.describe()}; {part} of {len(self.plan.jobs)} tensors "
                f"computed in {self.seconds:.1f} s{logged}).{note}")


@dataclass(frozen=True)
class LoraOutcome:
    bake: LiveBake
    identity: MergeIdentity
    seconds: float
    history_id: int | None = None

    def message(self) -> str:
        logged = f", merge ID {self.history_id}" if self.history_id is not None else ""
        uses = "; ".join(use.summary() for use in self.bake.plan.uses)
        return (f"Loaded {self.identity.name} ({len(self.bake.plan.changes)} tensors changed in "
                f"{self.seconds:.1f} s{logged}). {uses}.")


def _same_merge(a: Recipe, b: Recipe) -> bool:
    """Equal math (a drawn seed counts: -1 in a request means "any", so it matches a loaded random draw only when
    the recipe uses no randomness)."""
    return a.fingerprint() == b.fingerprint() or (b.seed == -1 and a.fingerprint() == b.with_seed(a.seed).fingerprint())


def _left_out_note(keys: list[str]) -> str:
    """Said when merged keys are not part of the loaded model (an external VAE in use; Forge's SDXL OpenCLIP-G,
    which Forge holds under other names and shapes): the model keeps its own values there, never silently."""
    if not keys:
        return ""
    return (f"({len(keys)} merged tensors are not part of the loaded model, e.g. {keys[0]}: it keeps its own values "
            "there; Merge to file writes them.)")


def free_path(path: Path) -> Path:
    """`path`, or the first of `name-2.ext`, `name-3.ext`, ... that does not exist: a default name (not chosen by
    the user) is never refused for being taken, e.g. by "Save current merge" of the same recipe a moment ago."""
    stem, ext = path.name[:-len(path.suffix)], path.suffix
    number = 1
    while path.exists():
        number += 1
        path = path.with_name(f"{stem}-{number}{ext}")
    return path


def identity_of(plan: MergePlan, name: str = "") -> MergeIdentity:
    recipe = plan.recipe
    return MergeIdentity(name or recipe.title(), recipe.fingerprint()[:10], recipe.to_json())


class MergeService:
    def __init__(self, host: Host, presets: Presets | None = None, keep_models: int = 3, threads: int | None = None,
                 hashes: HashCache | None = None, log_merges: bool = True, device: str | None = None):
        self.host = host
        self.presets = presets or Presets.load_with_user()
        self.keep_models = max(1, keep_models)
        self.threads = threads
        self.device = device  # "cuda" computes each key on the GPU (the merge device setting)
        self.hashes = hashes or HashCache()
        self.log_merges = log_merges
        self._open: OrderedDict[Path, Checkpoint] = OrderedDict()
        self._needed = 3  # checkpoints the current merge reads (A, B, C, or a method's base and models)
        self._loaded: MergePlan | None = None
        self._committed: Recipe | None = None  # what the user chose (tab/API merge); None = the base checkpoint
        self._baked: list[LiveBake] = []  # LoRAs baked into the loaded model on top of its merge (or base)
        self._committed_loras: tuple[tuple[LoraSpec, ...], ...] = ()  # the LoRA bakes the user chose, in order
        self._as_loaded: AsLoaded | None = None  # when the model's tensors last held their base file's values
        self._mutex = threading.Lock()

    # -- models ---------------------------------------------------------------------------------------------------

    def _checkpoint(self, name: str) -> Checkpoint | None:
        if not name:
            return None
        path = self.host.resolve_model(name)
        ckpt = self._open.pop(path, None)
        if ckpt is not None and ckpt.changed_on_disk():  # replaced or rewritten since: read its new header
            ckpt.close()
            ckpt = None
            self._loaded = None  # the loaded merge came from the old file: the next merge computes every key
        ckpt = ckpt or open_checkpoint(path)
        self._open[path] = ckpt
        while len(self._open) > self.keep_models + self._needed:  # the current merge's models always stay open
            _, old = self._open.popitem(last=False)
            old.close()
        return ckpt

    def models(self, recipe: Recipe) -> Models:
        """The open checkpoints of a validated recipe (kept open for the next merges)."""
        self._needed = max(3, len(recipe.model_names()))
        return Models(*(self._checkpoint(n) for n in (recipe.model_a, recipe.model_b, recipe.model_c)),
                      tuple(self._checkpoint(n) for n in recipe.models))

    def open_model_names(self) -> list[str]:
        """The file names of the source checkpoints kept open, oldest first."""
        return [path.name for path in self._open]

    def close(self) -> int:
        """Close every open source checkpoint (the cache of open models); returns how many were open."""
        count = len(self._open)
        while self._open:
            self._open.popitem()[1].close()
        return count

    # -- merging --------------------------------------------------------------------------------------------------

    def canonical(self, recipe: Recipe) -> Recipe:
        """The recipe naming each model by its file's path under the models folder. The tab gives WebUI titles
        (`sdA.safetensors [6357d68e0f]`), the API and pasted recipes often a bare `sdA`: one name per file gives the
        same merge one fingerprint, so it is not recomputed, logged or titled as another. A file outside the models
        folder keeps the name it was given."""
        folder = self.host.models_folder().resolve()

        def rename(name: str) -> str:
            path = self.host.resolve_model(name).resolve()
            return path.relative_to(folder).as_posix() if folder in path.parents else name

        return recipe.with_model_names(rename)

    def plan(self, recipe: Recipe) -> tuple[MergePlan, Models]:
        recipe = self.canonical(recipe.validate(self.presets))
        models = self.models(recipe)
        return plan_merge(recipe, models, self.presets), models

    def merge_and_load(self, recipe: Recipe, name: str = "", cancel: Callable[[], bool] | None = None,
                       progress: Callable[[int, int], None] | None = None, log: bool = True,
                       commit: bool = True, scratch: ScratchPool | None = None,
                       log_ratios: bool = False) -> MergeOutcome:
        """Merge into the loaded model (only the keys that differ from the merge already loaded).

        `commit=False` marks a transient merge (an X/Y/Z cell, an API request for one generation): the next
        `reconcile(None)` puts back what the user had chosen. `log_ratios` writes every key's ratios to the
        console (`ratio_log`)."""
        if self.host.live_model_unavailable:
            raise MergeError(self.host.live_model_unavailable)
        start = time.perf_counter()
        with self._mutex:
            plan, models = self.plan(recipe)
            if log_ratios:
                write_ratio_log(plan)
            previous = self.loaded_plan()
            if self.log_merges and log:  # a history that cannot take the row is refused before any tensor is read
                check_files(plan.recipe, None, self.host.resolve_model, presets=self.presets, history=self.history())
            todo = plan
            if previous is not None:
                with contextlib.suppress(ValueError):
                    todo = self._changed(previous, plan)
            cancel = cancel or self.host.interrupted
            report = progress or (lambda done, total: self.host.progress(done, total, "Merging"))
            identity = identity_of(plan, name)
            finite_memory.recall(models, self.hashes)
            note = self._write(todo, models, previous, identity, report, cancel, scratch)
            finite_memory.remember(models, self.hashes)
            self._loaded = plan
            self._baked = []  # the merge replaced every tensor the LoRAs had changed
            if commit:
                self._committed = plan.recipe
                self._committed_loras = ()
        history_id = self._log(plan, identity) if self.log_merges and log else None
        return MergeOutcome(plan, identity, len(todo.jobs), time.perf_counter() - start, history_id, note)

    def _changed(self, previous: MergePlan, plan: MergePlan) -> MergePlan:
        """The jobs of `plan` to run over the loaded `previous` merge: those whose inputs or ratios changed, and
        every key a baked LoRA changed (it holds the merge plus the LoRA: recomputed, it is the merge alone)."""
        changed = {job.key for job in changed_jobs(previous, plan).jobs}
        changed.update(key for bake in self._baked for key in bake.plan.changes)
        return dataclasses.replace(plan, jobs=tuple(job for job in plan.jobs if job.key in changed))

    def _write(self, todo: MergePlan, models: Models, previous: MergePlan | None, identity: MergeIdentity,
               report, cancel, scratch: ScratchPool | None) -> str:
        """Merge `todo` into the loaded model's tensors; on any failure (cancel included) put back every tensor it
        touched. Returns a note when the host refused in-place writing and loaded the whole merge instead."""
        before = self.host.loaded_identity()
        with self._undone_on_failure(previous, before, "Merge") as touched:
            with self.host.writable_weights(output_shapes(todo, models)) as live:
                if not live.refused:
                    jobs = tuple(job for job in todo.jobs if job.key in live.tensors)
                    left_out = [job.key for job in todo.jobs if job.kind == MERGE and job.key not in live.tensors]
                    sink = TensorSink(live.tensors)
                    sink.touched = touched
                    if jobs:
                        run_merge(dataclasses.replace(todo, jobs=jobs), models, sink, report, cancel, self.threads,
                                  self._device(live), scratch, self._holding_a(models, live))
            if not live.refused:
                self.host.weights_written(identity, touched)
                return _left_out_note(left_out)
        device = check_device(self.device)
        state = run_merge(todo, models, DictSink(), report, cancel, self.threads, device, scratch) if todo.jobs else {}
        self._as_loaded = None  # the host may build new tensors, even at the old ones' addresses
        self.host.load_weights(state, identity)
        return live.refused

    def _holding_a(self, models: Models, live: LiveWeights) -> frozenset[str]:
        """The keys whose tensors hold model A's exact values now (see as_loaded): the merge need not read them."""
        if self._as_loaded is None or self._baked or self.host.loaded_identity() is not None:
            return frozenset()
        return self._as_loaded.keys_holding(models.a, live.tensors)

    def base_loaded(self, as_loaded: AsLoaded | None) -> None:
        """The host loaded its base checkpoint from the file by itself; `as_loaded` notes its tensors then (None when
        the host cannot vouch that they hold the file's values)."""
        self.forget_loaded()
        self._as_loaded = as_loaded

    @contextlib.contextmanager
    def _undone_on_failure(self, previous: MergePlan | None, before: MergeIdentity | None, what: str):
        """Yields the set of keys the body writes; on any failure (Stop included) puts those keys back."""
        touched: set[str] = set()
        try:
            yield touched
        except BaseException as e:
            if not touched:
                raise
            self._put_back(touched, previous, before, self._baked)
            if isinstance(e, MergeCancelled):
                raise MergeCancelled(f"{what} cancelled; the model's previous weights were put back.") from e
            raise

    def _device(self, live: LiveWeights):
        """Compute where the model's tensors are (a GPU), else where the merge device setting says."""
        return live.device if live.device is not None else check_device(self.device)

    def _put_back(self, keys: set[str], previous: MergePlan | None, identity: MergeIdentity | None,
                  baked: list[LiveBake] = ()) -> None:
        """Give `keys` their values from before a failed merge or bake: recomputed with the previous merge's recipe,
        or copied from the base checkpoint file, then the LoRAs baked before applied again in order (nothing is kept
        in memory for this). Never cancelled."""
        try:
            with self.host.writable_weights() as live:
                rest = set(keys)
                if previous is not None:
                    jobs = tuple(job for job in previous.jobs if job.key in rest)
                    run_merge(dataclasses.replace(previous, jobs=jobs), self.models(previous.recipe),
                              TensorSink(live.tensors), threads=self.threads, device=self._device(live))
                    rest -= {job.key for job in jobs}
                if rest:
                    self._copy_from_base(live, rest)
                for bake in baked:
                    apply_bake(live.tensors, bake.plan, keys)
            self.host.weights_written(identity, keys)
        except Exception as e:
            self._loaded = None
            self._baked = []
            raise MergeError(f"The merge failed, and putting the previous weights back failed too ({e}); press "
                             f"'Restore base model' before generating.") from e

    def _copy_from_base(self, live: LiveWeights, keys) -> tuple[list[str], tuple[int, ...] | None]:
        """Copy `keys` of the loaded model from its checkpoint file; returns the keys copied and the file's identity."""
        if live.base is None:
            raise MergeError("the loaded model has no checkpoint file to copy its weights from")
        base = open_checkpoint(live.base)
        try:
            keys = [k for k in keys if k in base]
            run_merge(copy_plan(keys, base.name), Models(base), TensorSink(live.tensors), threads=self.threads,
                      device=self._device(live))
        finally:
            base.close()
        return keys, base.opened_as

    def _log(self, plan: MergePlan, identity: MergeIdentity) -> int:
        return self.history().append(identity.name, plan.recipe.to_dict())

    def loaded_plan(self) -> MergePlan | None:
        return self._loaded if self.host.loaded_identity() is not None else None

    def restore_base(self, commit: bool = True) -> None:
        """Put the base checkpoint's weights back: copied from its file into the model's tensors, or (where the
        model cannot take them in place, e.g. after a merge of another architecture) reloaded by the host."""
        with self._mutex:
            if not self._restore_in_place():
                self._as_loaded = None
                self.host.restore_base()
            self._loaded = None
            self._baked = []
            if commit:
                self._committed = None
                self._committed_loras = ()

    def _restore_in_place(self) -> bool:
        with self.host.writable_weights() as live:
            if live.refused or live.base is None:
                return False
            with open_checkpoint(live.base) as base:
                if any(key not in base or tuple(base.shape(key)) != tuple(t.shape) for key, t in live.tensors.items()):
                    return False
            keys, identity = self._copy_from_base(live, live.tensors)
            if identity is not None:
                self._as_loaded = AsLoaded.note(live.base, identity, {k: live.tensors[k] for k in keys})
        self.host.weights_written(None, keys)
        return True

    def reconcile(self, requested: Recipe | None) -> MergeOutcome | None:
        """Make the loaded model match a generation's request: the requested recipe (a transient merge), or, with
        no request, what the user chose last (their merge, or the base checkpoint). Merges only when needed."""
        if requested is not None:
            loaded = self.loaded_plan()
            wanted = requested.validate(self.presets)
            if loaded is not None and self._users_loras_baked() and _same_merge(loaded.recipe, wanted):
                return None
            return self.merge_transient(wanted, log=False)
        loaded = self.loaded_plan()
        baked = tuple(b.specs for b in self._baked)
        outcome = None
        if self._committed is None:
            if loaded is not None or (baked and baked != self._committed_loras):
                self.restore_base(commit=False)
        elif loaded is None or not _same_merge(loaded.recipe, self._committed) or baked != self._committed_loras:
            outcome = self.merge_and_load(self._committed, commit=False, log=False)
        if tuple(b.specs for b in self._baked) != self._committed_loras:  # the user's LoRAs, baked again
            for specs in self._committed_loras:
                self.bake_loras(specs, commit=False, log=False)
        return outcome

    def merge_transient(self, recipe: Recipe, log: bool = True, scratch: ScratchPool | None = None) -> MergeOutcome:
        """A merge for some generations only (an X/Y/Z cell, a generation's requested recipe): `recipe` merged into
        the loaded model, then the LoRAs the user baked into it baked again on top, so the images differ from the
        user's model only by what the request varies. The outcome's identity (the infotext's name and recipe)
        names the merge and the LoRAs. A LoRA that cannot go onto this merge (another architecture) refuses it
        before any tensor is written. The next `reconcile(None)` puts back what the user chose."""
        if self._committed_loras:
            plan, models = self.plan(recipe)
            shapes = ModelShapes(output_shapes(plan, models), plan.recipe.title())
            for specs in self._committed_loras:
                try:
                    plan_bake(shapes, specs, load_presets())
                except MergeError as e:
                    raise MergeError(f"The LoRAs baked into the loaded model cannot go onto the merge "
                                     f"{shapes.name}: {e}") from e
        outcome = self.merge_and_load(recipe, commit=False, log=log, scratch=scratch)
        identity = outcome.identity
        for specs in self._committed_loras:
            identity = self.bake_loras(specs, commit=False, log=False).identity
        return dataclasses.replace(outcome, identity=identity)

    def _users_loras_baked(self) -> bool:
        return tuple(b.specs for b in self._baked) == self._committed_loras

    def committed(self) -> Recipe | None:
        return self._committed

    def forget_loaded(self) -> None:
        """The host's model changed behind our back (another checkpoint was chosen): that checkpoint is now the
        user's choice (`reconcile(None)` keeps it), and the next merge is a full one."""
        self._loaded = None
        self._committed = None
        self._baked = []
        self._committed_loras = ()

    # -- LoRAs baked into the loaded model ------------------------------------------------------------------------

    def bake_loras(self, specs: list[LoraSpec] | tuple[LoraSpec, ...], name: str = "", presets=None,
                   cancel: Callable[[], bool] | None = None, progress: Callable[[int, int], None] | None = None,
                   log: bool = True, commit: bool = True) -> LoraOutcome:
        """Add LoRAs (resolved paths) to the loaded model's tensors, on top of its merge or base and of LoRAs baked
        before. Everything is checked before the first tensor is written; a failure or Stop puts back every tensor
        written, bit for bit. `commit=False`: a re-bake by `reconcile` (the user's choice does not change)."""
        if self.host.live_model_unavailable:
            raise MergeError(self.host.live_model_unavailable)
        start = time.perf_counter()
        specs = tuple(specs)
        with self._mutex:
            history = self.history() if self.log_merges and log else None
            if history is not None:  # a history that cannot take the row is refused before any tensor is written
                history.check([(f"LoRA {s.name}", s.path) for s in specs])
            before = self.host.loaded_identity()
            merge = self.loaded_plan()
            cancel = cancel or self.host.interrupted
            report = progress or (lambda done, total: self.host.progress(done, total, "Baking LoRAs"))
            with self._undone_on_failure(merge, before, "LoRA bake") as touched:
                with self.host.writable_weights() as live:
                    if live.refused:
                        raise MergeError(f"LoRAs cannot be baked into this model in place {live.refused.strip('()')} "
                                         f"Bake them into a checkpoint file instead.")
                    under = before.name if before is not None else (live.base.stem if live.base else "model")
                    plan = plan_bake(ModelShapes.of(live.tensors, under), specs, presets or load_presets())
                    bake = LiveBake(specs, plan)
                    bakes = [*self._baked, bake]
                    record = live_record(live.base, merge.recipe if merge else None, bakes)
                    base_name = merge.recipe.title() if merge is not None else under
                    identity = live_identity(record, base_name if not self._baked else before.name, [bake], name)
                    apply_bake(live.tensors, plan, plan.changes, touched, cancel, report)
                self.host.weights_written(identity, touched)
            self._baked = bakes
            if commit:
                self._committed_loras = (*self._committed_loras, specs)
        history_id = None
        if history is not None:
            title = f"LoRA bake into the loaded model: {identity.name}"
            history_id = history.append(title, {**record, "loras_added": [s.text() for s in specs]})
        return LoraOutcome(bake, identity, time.perf_counter() - start, history_id)

    def baked_loras(self) -> list[LiveBake]:
        return list(self._baked)

    # -- saving ---------------------------------------------------------------------------------------------------

    def output_path(self, plan_or_recipe: MergePlan | Recipe, custom_name: str, options: SaveOptions,
                    safetensors: bool = True) -> Path:
        ext = ".safetensors" if safetensors else ".ckpt"
        if custom_name.strip():
            name = validate_custom_name(custom_name.strip())
            filename = name if name.lower().endswith((".safetensors", ".ckpt")) else name + ext
        else:
            recipe = plan_or_recipe.recipe if isinstance(plan_or_recipe, MergePlan) else plan_or_recipe
            channels = plan_or_recipe.arch.in_channels if isinstance(plan_or_recipe, MergePlan) else 4
            filename = default_output_name(recipe.title(), options.dtype, channels, ext)
            return free_path(self.host.models_folder() / filename)
        return self.host.models_folder() / filename

    def save(self, recipe: Recipe, custom_name: str = "", options: SaveOptions | None = None,
             overwrite: bool = False, safetensors: bool = True, metadata: bool = True,
             cancel: Callable[[], bool] | None = None, log_ratios: bool = False) -> SaveResult:
        """Merge and write to the models folder (streamed; the loaded model is not touched)."""
        options = options or SaveOptions()
        if options.bake_vae and not Path(options.bake_vae).is_absolute():
            options = dataclasses.replace(options, bake_vae=str(self.host.resolve_vae(options.bake_vae)))
        plan, _ = self.plan(recipe)
        out = self.output_path(plan, custom_name, options, safetensors)
        return merge_to_file(
            plan.recipe, out, options, overwrite=overwrite, resolve=self.host.resolve_model, presets=self.presets,
            hashes=self.hashes, history=self.history() if self.log_merges else None, metadata=metadata,
            progress=lambda done, total: self.host.progress(done, total, "Saving"),
            cancel=cancel or self.host.interrupted, threads=self.threads, device=self.device, log_ratios=log_ratios)

    def save_loaded(self, custom_name: str = "", options: SaveOptions | None = None, overwrite: bool = False,
                    safetensors: bool = True) -> SaveResult:
        """Save the merge that is loaded, by re-running its recipe into a file (exactly the same tensors)."""
        plan = self.loaded_plan()
        if plan is None:
            raise MergeError("No merge is loaded; merge first (the loaded model is a plain checkpoint).")
        if self._baked:
            raise MergeError("LoRAs are baked into the loaded model; 'Save current merge' would leave them out. Use "
                             "the LoRA tab's 'Bake into a checkpoint file' with the merge saved first, or restore.")
        return self.save(plan.recipe, custom_name, options, overwrite, safetensors)

    def history(self) -> History:
        return History(self.host.history_path())

    # -- generation -----------------------------------------------------------------------------------------------

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """txt2img with the loaded model; the infotext names the merge and carries its recipe."""
        if self.host.generation_unavailable:
            raise MergeError(self.host.generation_unavailable)
        identity = self.host.loaded_identity()
        extra = dict(request.extra_params)
        if identity is not None:
            extra[INFOTEXT_MERGE] = identity.name
            extra[INFOTEXT_RECIPE] = identity.recipe_json
        request = GenerationRequest(**{**request.__dict__, "extra_params": extra})
        return self.host.generate(request)

