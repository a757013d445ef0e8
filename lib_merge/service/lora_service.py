"""LoRAs through a host: baked into the loaded model (the model-side helpers MergeService uses), and the LoRA file
tools (bake into a checkpoint file, merge LoRAs, extract, inspect, the list) with the host's folders and history.

A live bake writes `W + Σ ratio·ΔW` into the model's own tensors, only those the LoRAs touch. Nothing is copied
aside: a failed or stopped bake is undone the way a failed merge is (the touched tensors recomputed from the loaded
merge's recipe or copied from the base checkpoint, then the LoRAs baked before it applied again), so the model ends
bit-identical to before.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.errors import MergeCancelled, MergeError
from ..core.recipe import Recipe
from ..hosts.base import MergeIdentity
from ..io.checkpoint import SaveOptions, validate_custom_name
from ..io.write import OutputExists
from ..lora.bake import BakePlan, bake_recipe, bake_to_file
from ..lora.blocks import LoraSpec, load_presets, parse_spec, split_specs
from ..lora.combine import combine_to_file
from ..lora.difference import difference_to_file
from ..lora.extract import extract_to_file
from ..lora.formats import read_lora
from ..lora.inspect import LoraSummary, describe_lora, summarize
from ..lora.lowrank import RankChoice

#: the LoRA list's filters (the seed's type names; "LyCORIS" is every kind that is not plain LoRA/LoCon)
KIND_FILTERS = ("All", "LoRA", "LoCon", "LyCORIS")
FAMILY_FILTERS = ("All", "SD1", "SD2", "SDXL")
LORA_RECORD_OPERATIONS = ("lora bake", "lora merge", "lora extract", "lora diff")


class ModelShapes:
    """A model's key names and shapes, the checkpoint `plan_bake` checks a LoRA against: the loaded model's
    tensors (`of`), or a merge's output before it is made."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], name: str):
        self.shapes = shapes
        self.name = name

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor], name: str) -> ModelShapes:
        return cls({key: tuple(t.shape) for key, t in tensors.items()}, name)

    def keys(self) -> list[str]:
        return list(self.shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.shapes[key])


@dataclass(frozen=True)
class LiveBake:
    """One bake into the loaded model: its specs (resolved paths) and the plan that was applied."""

    specs: tuple[LoraSpec, ...]
    plan: BakePlan = field(compare=False)


def apply_bake(tensors: Mapping[str, torch.Tensor], plan: BakePlan, keys: Collection[str],
               touched: set[str] | None = None, cancel: Callable[[], bool] | None = None,
               progress: Callable[[int, int], None] | None = None) -> None:
    """Write `plan`'s change of each of `keys` into the model's tensors (computed on the CPU in fp32, rounded once
    to the tensor's dtype). `touched` collects each key just before its tensor is written."""
    keys = [k for k in plan.changes if k in keys]
    for done, key in enumerate(keys, 1):
        if cancel is not None and cancel():
            raise MergeCancelled("LoRA bake cancelled.")
        tensor = tensors[key]
        baked = plan.apply(key, tensor.detach().cpu())
        if touched is not None:
            touched.add(key)
        tensor.copy_(baked)
        if progress is not None:
            progress(done, len(keys))


def live_record(base: Path | None, merge: Recipe | None, bakes: Sequence[LiveBake]) -> dict:
    """What a model with LoRAs baked in is: the base file, the merge under the LoRAs (if any) and every LoRA, in
    the order baked (infotext recipe, history row)."""
    specs = [s for b in bakes for s in b.specs]
    record = bake_recipe(base or "", specs)
    record["target"] = "loaded model"
    record["merge"] = merge.to_dict() if merge is not None else None
    return record


def live_identity(record: dict, under: str, bakes: Sequence[LiveBake], name: str = "") -> MergeIdentity:
    text = json.dumps(record, sort_keys=True)
    title = name or under + "".join(f" + {s.name}:{s.ratio:g}" for b in bakes for s in b.specs)
    return MergeIdentity(title, hashlib.sha256(text.encode()).hexdigest()[:10], text)


def is_lora_record(recipe: Mapping) -> bool:
    return str(recipe.get("operation", "")) in LORA_RECORD_OPERATIONS


@dataclass(frozen=True)
class CatalogEntry:
    name: str  # as listed by the host (relative path)
    summary: LoraSummary | None  # None: the file could not be read as a LoRA
    problem: str = ""

    def label(self) -> str:
        if self.summary is None:
            return f"{self.name} [unreadable: {self.problem}]"
        return self.summary.label().replace(self.summary.name, self.name, 1)

    def fits(self, kind: str, family: str) -> bool:
        if self.summary is None:
            return kind == "All" and family == "All"
        k = self.summary.kind
        kind_ok = kind == "All" or (k == kind if kind in ("LoRA", "LoCon") else k not in ("LoRA", "LoCon"))
        return kind_ok and (family == "All" or family.lower() in self.summary.families)


class LoraTools:
    """The LoRA file tools over a MergeService's host, hashes and history (the tab and the API call these)."""

    def __init__(self, service, presets_file: str | Path | None = None):
        self.service = service
        self.host = service.host
        self.presets_file = presets_file
        self._summaries: dict[Path, tuple[tuple[int, int], CatalogEntry]] = {}

    def presets(self):
        return load_presets(self.presets_file)

    # -- names -> files -----------------------------------------------------------------------------------------

    def specs(self, text: str) -> list[LoraSpec]:
        """The specs of a field (one per line, or comma-separated), each LoRA name resolved to its file."""
        specs = []
        for item in split_specs(text):
            spec = parse_spec(item)
            specs.append(LoraSpec(str(self.host.resolve_lora(spec.path)), spec.ratio, spec.blocks))
        if not specs:
            raise MergeError("No LoRA given; add one per line as name:ratio[:block weights] (choose from the list "
                             "or press 'Get from prompt').")
        return specs

    def catalog(self, kind: str = "All", family: str = "All") -> list[CatalogEntry]:
        """The host's LoRAs with type, ranks and families, read once per file version (size and mtime)."""
        folder = self.host.lora_folder()
        entries = []
        for name in self.host.list_loras():
            path = folder / name
            try:
                stat = path.stat()
            except OSError:
                continue
            stamp = (stat.st_mtime_ns, stat.st_size)
            cached = self._summaries.get(path)
            if cached is None or cached[0] != stamp:
                try:
                    entry = CatalogEntry(name, summarize(read_lora(path, shapes_only=True)))
                except Exception as e:  # noqa: BLE001 - one broken file must not hide the others
                    entry = CatalogEntry(name, None, str(e).split("\n")[0][:120])
                cached = self._summaries[path] = (stamp, entry)
            entries.append(cached[1])
        return [e for e in entries if e.fits(kind, family)]

    def _output(self, folder: Path, name: str, what: str) -> Path:
        name = (name or "").strip()
        if not name:
            raise MergeError(f"Type a file name for the {what}.")
        name = validate_custom_name(name)
        return folder / (name if name.lower().endswith(".safetensors") else name + ".safetensors")

    def _history(self):
        return self.service.history() if self.service.log_merges else None

    def _progress(self, text: str, cancel: Callable[[], bool] | None):
        cancel = cancel or self.host.interrupted

        def report(done: int, total: int) -> None:
            if cancel():
                raise MergeCancelled(f"{text} cancelled; nothing was written.")
            self.host.progress(done, total, text)

        return report

    @staticmethod
    @contextlib.contextmanager
    def _named_output():
        """A taken output name, said in the tab's and the API's words (the writer's own speak of --overwrite)."""
        try:
            yield
        except OutputExists as e:
            raise MergeError(f"{e.path.name} already exists in {e.path.parent}; type another name, or tick "
                             f"\"overwrite\" (API: \"overwrite\": true) to replace it.") from e

    # -- the tools ----------------------------------------------------------------------------------------------

    def bake_loaded(self, text: str, name: str = "", cancel: Callable[[], bool] | None = None):
        return self.service.bake_loras(self.specs(text), name, presets=self.presets(), cancel=cancel)

    def bake_to_file(self, model: str, text: str, name: str, dtype: str = "keep", overwrite: bool = False,
                     cancel: Callable[[], bool] | None = None):
        if not model:
            raise MergeError("Choose the checkpoint to bake the LoRAs into.")
        specs = self.specs(text)
        out = self._output(self.host.models_folder(), name, "baked checkpoint")
        with self._named_output():
            return bake_to_file(self.host.resolve_model(model), specs, out, SaveOptions(dtype=dtype),
                                overwrite=overwrite, presets=self.presets(), hashes=self.service.hashes,
                                history=self._history(), progress=self._progress("LoRA bake", cancel))

    def merge(self, text: str, rank: str, name: str, dtype: str = "fp16", metadata: str = "new",
              overwrite: bool = False, cancel: Callable[[], bool] | None = None):
        specs = self.specs(text)
        choice = None if (rank or "concat").strip().lower() == "concat" else RankChoice.parse(rank)
        out = self._output(self.host.lora_folder(), name, "merged LoRA")
        with self._named_output():
            return combine_to_file(specs, out, choice, presets=self.presets(), dtype=dtype, metadata=metadata,
                                   overwrite=overwrite, history=self._history(),
                                   progress=self._progress("LoRA merge", cancel))

    def difference(self, text: str, name: str, alpha: float = 1.0, beta: float = 1.0, gamma: float = 1.0,
                   dtype: str = "fp16", metadata: str = "new", overwrite: bool = False,
                   cancel: Callable[[], bool] | None = None):
        """Extract from two LoRAs: the field's first LoRA is B, the second C."""
        specs = self.specs(text)
        out = self._output(self.host.lora_folder(), name, "LoRA extracted from two LoRAs")
        with self._named_output():
            return difference_to_file(specs, out, alpha=alpha, beta=beta, gamma=gamma, presets=self.presets(),
                                      dtype=dtype, metadata=metadata, overwrite=overwrite, history=self._history(),
                                      progress=self._progress("LoRA diff", cancel))

    def extract(self, model_a: str, model_b: str, name: str, alpha: float = 1.0, beta: float = 1.0,
                rank: str = "128", conv_rank: str = "", dtype: str = "fp16", overwrite: bool = False,
                cancel: Callable[[], bool] | None = None):
        if not model_a or not model_b:
            raise MergeError("Choose both models to extract from (A: the tuned one, B: its base).")
        out = self._output(self.host.lora_folder(), name, "extracted LoRA")
        conv = RankChoice.parse(conv_rank) if (conv_rank or "").strip() else None
        with self._named_output():
            return extract_to_file(self.host.resolve_model(model_a), self.host.resolve_model(model_b), out,
                                   alpha=float(alpha), beta=float(beta), rank=RankChoice.parse(rank or "128"),
                                   conv_rank=conv, dtype=dtype, overwrite=overwrite, history=self._history(),
                                   progress=self._progress("LoRA extract", cancel))

    def inspect(self, name: str) -> str:
        return describe_lora(self.host.resolve_lora(name))
