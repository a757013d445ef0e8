"""What the tab, the API and the X/Y/Z plots do with a recipe: merge into the loaded model, save, restore, generate.

One `MergeService` per host. It keeps the source checkpoints open between merges (bounded by `keep_models`) and
remembers the plan of the merge that is loaded, so the next merge recomputes only the keys whose inputs or ratios
changed. A merge that fails or is cancelled leaves the previously loaded weights in place: the new weights are
collected first and handed to the host in one go.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..core.engine import DictSink, MergePlan, Models, ScratchPool, changed_jobs, plan_merge, run_merge
from ..core.errors import MergeCancelled, MergeError
from ..core.recipe import Recipe
from ..core.weights import Presets
from ..hosts.base import GenerationRequest, GenerationResult, Host, MergeIdentity
from ..io.checkpoint import Checkpoint, SaveOptions, default_output_name, open_checkpoint, validate_custom_name
from ..io.hashes import HashCache
from ..io.history import History
from .pipeline import SaveResult, check_device, merge_to_file

INFOTEXT_RECIPE = "Merge recipe"
INFOTEXT_MERGE = "Merge"


@dataclass(frozen=True)
class MergeOutcome:
    plan: MergePlan
    identity: MergeIdentity
    recomputed: int  # keys computed for this merge (all of them, or only those that changed)
    seconds: float
    history_id: int | None = None

    def message(self) -> str:
        part = "all" if self.recomputed == len(self.plan.jobs) else f"{self.recomputed} changed"
        logged = f", merge ID {self.history_id}" if self.history_id is not None else ""
        return (f"Loaded {self.identity.name} ({self.plan.arch.describe()}; {part} of {len(self.plan.jobs)} tensors "
                f"computed in {self.seconds:.1f} s{logged}).")


def _same_merge(a: Recipe, b: Recipe) -> bool:
    """Equal math (a drawn seed counts: -1 in a request means "any", so it matches a loaded random draw only when
    the recipe uses no randomness)."""
    return a.fingerprint() == b.fingerprint() or (b.seed == -1 and a.fingerprint() == b.with_seed(a.seed).fingerprint())


def identity_of(plan: MergePlan, name: str = "") -> MergeIdentity:
    recipe = plan.recipe
    return MergeIdentity(name or recipe.title(), recipe.fingerprint()[:10], recipe.to_json())


class MergeService:
    def __init__(self, host: Host, presets: Presets | None = None, keep_models: int = 3, threads: int | None = None,
                 hashes: HashCache | None = None, log_merges: bool = True, device: str | None = None):
        self.host = host
        self.presets = presets or Presets.load()
        self.keep_models = max(1, keep_models)
        self.threads = threads
        self.device = device  # "cuda" computes each key on the GPU (the merge device setting)
        self.hashes = hashes or HashCache()
        self.log_merges = log_merges
        self._open: OrderedDict[Path, Checkpoint] = OrderedDict()
        self._loaded: MergePlan | None = None
        self._committed: Recipe | None = None  # what the user chose (tab/API merge); None = the base checkpoint
        self._mutex = threading.Lock()

    # -- models ---------------------------------------------------------------------------------------------------

    def _checkpoint(self, name: str) -> Checkpoint | None:
        if not name:
            return None
        path = self.host.resolve_model(name)
        ckpt = self._open.pop(path, None) or open_checkpoint(path)
        self._open[path] = ckpt
        while len(self._open) > self.keep_models + 3:  # A, B, C of the current merge always stay open
            _, old = self._open.popitem(last=False)
            old.close()
        return ckpt

    def models(self, recipe: Recipe) -> Models:
        """The open checkpoints of a validated recipe (kept open for the next merges)."""
        return Models(*(self._checkpoint(n) for n in (recipe.model_a, recipe.model_b, recipe.model_c)))

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()

    # -- merging --------------------------------------------------------------------------------------------------

    def plan(self, recipe: Recipe) -> tuple[MergePlan, Models]:
        recipe = recipe.validate(self.presets)
        models = self.models(recipe)
        return plan_merge(recipe, models, self.presets), models

    def merge_and_load(self, recipe: Recipe, name: str = "", cancel: Callable[[], bool] | None = None,
                       progress: Callable[[int, int], None] | None = None, log: bool = True,
                       commit: bool = True, scratch: ScratchPool | None = None) -> MergeOutcome:
        """Merge into the loaded model (only the keys that differ from the merge already loaded).

        `commit=False` marks a transient merge (an X/Y/Z cell, an API request for one generation): the next
        `reconcile(None)` puts back what the user had chosen."""
        if self.host.live_model_unavailable:
            raise MergeError(self.host.live_model_unavailable)
        start = time.perf_counter()
        with self._mutex:
            plan, models = self.plan(recipe)
            todo = plan
            if self._loaded is not None and self.host.loaded_identity() is not None:
                with contextlib.suppress(ValueError):
                    todo = changed_jobs(self._loaded, plan)
            cancel = cancel or self.host.interrupted
            report = progress or (lambda done, total: self.host.progress(done, total, "Merging"))
            device = check_device(self.device)
            state = (run_merge(todo, models, DictSink(), report, cancel, self.threads, device, scratch)
                     if todo.jobs else {})
            identity = identity_of(plan, name)
            if cancel():  # Stop pressed during the last key: nothing is loaded (the engine checks between keys only)
                raise MergeCancelled("Stopped before the merge was loaded; the previous weights are still in place.")
            self.host.load_weights(state, identity)
            self._loaded = plan
            if commit:
                self._committed = plan.recipe
        history_id = self._log(plan, identity) if self.log_merges and log else None
        return MergeOutcome(plan, identity, len(todo.jobs), time.perf_counter() - start, history_id)

    def _log(self, plan: MergePlan, identity: MergeIdentity) -> int:
        return self.history().append(identity.name, plan.recipe.to_dict())

    def loaded_plan(self) -> MergePlan | None:
        return self._loaded if self.host.loaded_identity() is not None else None

    def restore_base(self, commit: bool = True) -> None:
        with self._mutex:
            self.host.restore_base()
            self._loaded = None
            if commit:
                self._committed = None

    def reconcile(self, requested: Recipe | None) -> MergeOutcome | None:
        """Make the loaded model match a generation's request: the requested recipe (a transient merge), or, with
        no request, what the user chose last (their merge, or the base checkpoint). Merges only when needed."""
        if requested is not None:
            loaded = self.loaded_plan()
            wanted = requested.validate(self.presets)
            if loaded is not None and _same_merge(loaded.recipe, wanted):
                return None
            return self.merge_and_load(wanted, commit=False, log=False)
        loaded = self.loaded_plan()
        if self._committed is None:
            if loaded is not None:
                self.restore_base(commit=False)
            return None
        if loaded is None or not _same_merge(loaded.recipe, self._committed):
            return self.merge_and_load(self._committed, commit=False, log=False)
        return None

    def committed(self) -> Recipe | None:
        return self._committed

    def forget_loaded(self) -> None:
        """The host's model changed behind our back (another checkpoint was chosen): that checkpoint is now the
        user's choice (`reconcile(None)` keeps it), and the next merge is a full one."""
        self._loaded = None
        self._committed = None

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
        return self.host.models_folder() / filename

    def save(self, recipe: Recipe, custom_name: str = "", options: SaveOptions | None = None,
             overwrite: bool = False, safetensors: bool = True, metadata: bool = True,
             cancel: Callable[[], bool] | None = None) -> SaveResult:
        """Merge and write to the models folder (streamed; the loaded model is not touched)."""
        options = options or SaveOptions()
        if options.bake_vae and not Path(options.bake_vae).is_absolute():
            options = SaveOptions(options.dtype, options.prune, str(self.host.resolve_vae(options.bake_vae)),
                                  options.reset_clip_ids)
        plan, _ = self.plan(recipe)
        out = self.output_path(plan, custom_name, options, safetensors)
        return merge_to_file(
            plan.recipe, out, options, overwrite=overwrite, resolve=self.host.resolve_model, presets=self.presets,
            hashes=self.hashes, history=self.history() if self.log_merges else None, metadata=metadata,
            progress=lambda done, total: self.host.progress(done, total, "Saving"),
            cancel=cancel or self.host.interrupted, threads=self.threads, device=self.device)

    def save_loaded(self, custom_name: str = "", options: SaveOptions | None = None, overwrite: bool = False,
                    safetensors: bool = True) -> SaveResult:
        """Save the merge that is loaded, by re-running its recipe into a file (exactly the same tensors)."""
        plan = self.loaded_plan()
        if plan is None:
            raise MergeError("No merge is loaded; merge first (the loaded model is a plain checkpoint).")
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

