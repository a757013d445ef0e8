"""The merge recipe: everything needed to reproduce a merge, checked before any file is read.

A recipe is what users share, what the history logs and what a saved model's metadata carries. `validate` refuses
what the seed system silently got wrong (invalid mode/calc pairs, missing model C, NaN ratios) with a message that
says how to fix it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from . import untrusted_json
from .errors import MergeError
from .kernels import ADD_DIFF, CALC_MODES, MERGE_MODES, MODE_FORMULAS, WEIGHT_SUM, CalcMode
from .methods import METHODS, check_params, get_method
from .weights import INEX_MODES, Presets, parse_adjust

RECIPE_TYPE = "block-merger"
NEEDS_C = (ADD_DIFF, "Triple sum", "sum Twice")
#: the parameters of the merge methods that can be given per block, beside alpha
METHOD_PARAMS = ("density", "drop", "epsilon")
#: fields of a method recipe (base plus N models); left out of a classic recipe's JSON, which therefore stays as it was
METHOD_FIELDS = ("method", "models", "model_weights", *METHOD_PARAMS,
                 *(f"weights_{n}" for n in METHOD_PARAMS), *(f"elemental_{n}" for n in METHOD_PARAMS))
#: The most characters each text field may hold: far above any real use (a long elemental text is 1,000), low
#: enough that a pasted megabyte is refused at once instead of holding the merge queue while it is matched against
#: every key. Model names are paths. `inex_*` counts the names of the list together.
TEXT_LIMITS = {"model_a": 4_096, "model_b": 4_096, "model_c": 4_096, "mode": 100, "calc": 100, "inex": 100,
               "weights_alpha": 4_000, "weights_beta": 4_000, "elemental": 10_000, "adjust": 1_000,
               "inex_blocks": 4_000, "inex_elements": 4_000}
#: A recipe's JSON: every field at its limit, escaped, stays below this, and this below the csv module's field limit
#: (131,072), so any recipe that can be merged can be logged and read back.
MAX_RECIPE_JSON = 120_000


@dataclass(frozen=True)
class Recipe:
    """One merge. Model fields hold whatever names the caller resolves (file paths for the CLI)."""

    model_a: str
    model_b: str = ""
    model_c: str = ""
    mode: str = WEIGHT_SUM
    calc: str = "normal"
    alpha: float = 0.5
    beta: float = 0.25
    weights_alpha: str = ""  # block weights (or a preset name); non-empty turns MBW on, its first value is BASE
    weights_beta: str = ""
    elemental: str = ""
    adjust: str = ""
    inex: str = "Off"
    inex_blocks: tuple[str, ...] = ()
    inex_elements: tuple[str, ...] = ()
    gamma: float = 0.3
    seed: int = -1  # weight seed for R/U ratios and plus random; -1 draws one when the recipe is resolved
    # A merge method over a base (model_a) and N models (see core.methods); "" is a merge mode with models A/B/C.
    method: str = ""
    models: tuple[str, ...] = ()
    model_weights: tuple[float, ...] = ()  # wᵢ per model; () = all 1
    density: float = 0.2  # fraction kept (TIES, DELLA)
    drop: float = 0.9  # drop probability (DARE)
    epsilon: float = 0.1  # DELLA's spread of drop probabilities
    weights_density: str = ""  # block weights, as weights_alpha (alpha's apply to methods too)
    weights_drop: str = ""
    weights_epsilon: str = ""
    elemental_density: str = ""  # Blocks:Elements:Value rules, as elemental (alpha's apply to methods too)
    elemental_drop: str = ""
    elemental_epsilon: str = ""
    extra: dict = field(default_factory=dict, compare=False)  # informational, e.g. save options

    @property
    def calc_mode(self) -> CalcMode:
        return CALC_MODES[self.calc]

    @property
    def uses_c(self) -> bool:
        return not self.method and self.mode in NEEDS_C

    @property
    def uses_beta(self) -> bool:
        return not self.method and (self.mode in ("Triple sum", "sum Twice") or self.calc_mode.uses_beta)

    def model_names(self) -> list[str]:
        """Every model the recipe reads, A (the base of a method) first."""
        return [m for m in (self.model_a, self.model_b, self.model_c, *self.models) if m]

    @property
    def mbw(self) -> bool:
        return bool(self.weights_alpha.strip())

    def validate(self, presets: Presets | None = None) -> Recipe:
        """Check names, pairs, numbers and required models; return the recipe with implied fields filled in.

        Presets named in weight fields are replaced by their values, so the returned recipe reproduces the merge
        even where the preset file differs.
        """
        check_text_sizes(self)
        if self.method:
            return self._validate_method(presets)
        if self.models:
            raise MergeError("A list of models needs a merge method (e.g. ties); the merge modes take A, B and C.")
        if self.mode not in MERGE_MODES:
            raise MergeError(f"Unknown merge mode {self.mode!r}; use one of: {', '.join(MERGE_MODES)}.")
        calc = CALC_MODES.get(self.calc)
        if calc is None:
            raise MergeError(f"Unknown calc mode {self.calc!r}; use one of: {', '.join(CALC_MODES)}.")
        mode = calc.implies or self.mode
        if mode not in calc.modes:
            raise MergeError(
                f"Calc mode {calc.name!r} cannot be used with {mode!r}: it works with "
                f"{' or '.join(repr(m) for m in calc.modes)} only."
            )
        if not self.model_a:
            raise MergeError("Model A is required.")
        if calc.uses_b and not self.model_b:
            raise MergeError(f"Model B is required for {mode} with calc mode {calc.name}.")
        if mode in NEEDS_C and not self.model_c:
            implied = (f"calc mode {calc.name} always merges as {mode}, so " if calc.implies and self.mode != mode
                       else "")
            raise MergeError(f"Model C is required: {implied}{mode} ({MODE_FORMULAS[mode]}) needs it; choose model "
                             f"C.")
        for name in ("alpha", "beta", "gamma"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise MergeError(f"{name} must be a finite number, not {value!r}.")
        if calc.name == "extract":
            check_extract_ratios(self.alpha, self.beta, "alpha/beta")
            if self.gamma < 0:
                raise MergeError(f"extract needs gamma >= 0; got {self.gamma}.")
        if self.inex not in INEX_MODES:
            raise MergeError(f"Include/Exclude mode {self.inex!r} is not one of {', '.join(INEX_MODES)}.")
        parse_adjust(self.adjust)
        presets = presets or Presets.load()
        weights_alpha = presets.resolve(self.weights_alpha)
        weights_beta = presets.resolve(self.weights_beta)
        if weights_beta and not weights_alpha:
            raise MergeError("Block weights for beta need block weights for alpha too (MBW is off without them).")
        return dataclasses.replace(
            self, mode=mode, weights_alpha=weights_alpha, weights_beta=weights_beta,
            model_b=self.model_b if calc.uses_b else "", model_c=self.model_c if mode in NEEDS_C else "",
            inex_blocks=tuple(self.inex_blocks), inex_elements=tuple(self.inex_elements),
        )

    def _validate_method(self, presets: Presets | None) -> Recipe:
        method = get_method(self.method)
        if self.calc != "normal":
            raise MergeError(f"Calc mode {self.calc!r} belongs to the merge modes; method {method.name} takes none.")
        if self.model_b or self.model_c:
            raise MergeError(f"Method {method.name} takes a base and a list of models, not models B and C.")
        if not self.model_a:
            raise MergeError(f"Method {method.name} needs a base model.")
        if not method.takes(len(self.models)):
            raise MergeError(f"Method {method.name} takes {method.count_text()} model(s) beside the base; "
                             f"got {len(self.models)}.")
        weights = tuple(self.model_weights)
        if weights and len(weights) != len(self.models):
            raise MergeError(f"Give one model weight per model: {len(weights)} weights for {len(self.models)} models.")
        if weights and not method.weighted and any(w != 1 for w in weights):
            raise MergeError(f"Method {method.name} takes no per-model weights.")
        for name in ("alpha", *METHOD_PARAMS):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise MergeError(f"{name} must be a finite number, not {value!r}.")
        for w in weights:
            if not isinstance(w, (int, float)) or not math.isfinite(w):
                raise MergeError(f"Model weights must be finite numbers, not {w!r}.")
        if self.inex not in INEX_MODES:
            raise MergeError(f"Include/Exclude mode {self.inex!r} is not one of {', '.join(INEX_MODES)}.")
        parse_adjust(self.adjust)
        if not any(getattr(self, f"weights_{n}").strip() for n in METHOD_PARAMS):  # else checked per block
            check_params(method, self.alpha, self.density, self.drop, self.epsilon, "given")
        presets = presets or Presets.load()
        resolved = {f"weights_{n}": presets.resolve(getattr(self, f"weights_{n}")) for n in ("alpha", *METHOD_PARAMS)}
        return dataclasses.replace(
            self, **resolved, mode=WEIGHT_SUM, weights_beta="", models=tuple(self.models), model_weights=weights,
            inex_blocks=tuple(self.inex_blocks), inex_elements=tuple(self.inex_elements),
        )

    def with_seed(self, seed: int) -> Recipe:
        return dataclasses.replace(self, seed=seed)

    def with_model_names(self, rename: Callable[[str], str]) -> Recipe:
        """The same recipe with every model name passed through `rename` (blank names stay blank)."""
        a, b, c = (rename(m) if m else m for m in (self.model_a, self.model_b, self.model_c))
        return dataclasses.replace(self, model_a=a, model_b=b, model_c=c, models=tuple(map(rename, self.models)))

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        for name in ("inex_blocks", "inex_elements", "models", "model_weights"):
            data[name] = list(data[name])
        if not self.method:
            for name in METHOD_FIELDS:
                del data[name]
        return {"type": RECIPE_TYPE, **data}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> Recipe:
        """A recipe from its JSON object. A method recipe without "alpha" takes the method's own default (λ = 1,
        slerp's t = 0.5), as the CLI does; a merge-mode recipe keeps alpha's 0.5."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known - {"type"}
        if unknown:
            raise MergeError(f"Recipe has unknown fields: {', '.join(sorted(unknown))}.")
        values = {k: v for k, v in data.items() if k in known}
        if "alpha" not in values and isinstance(values.get("method"), str) and values["method"] in METHODS:
            values["alpha"] = METHODS[values["method"]].default_alpha  # λ 1 (slerp's t 0.5), as on the CLI
        for name, value in values.items():
            kind = _FIELD_KINDS[name]
            if kind is tuple and isinstance(value, list):
                value = values[name] = tuple(value)
            ok = isinstance(value, kind) and not isinstance(value, bool)
            if ok and isinstance(value, tuple):
                item = _ITEM_KINDS.get(name, str)
                ok = all(isinstance(v, item) and not isinstance(v, bool) for v in value)
            if not ok:
                words = "a list of numbers" if name in _ITEM_KINDS else _KIND_WORDS[kind]
                raise MergeError(f"Recipe field {name!r} must be {words}, not {value!r:.60}.")
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        return cls.from_dict(json_object(text))

    def fingerprint(self) -> str:
        """A stable hash of the math (models by name, every ratio), for names and caches; `extra` is ignored."""
        data = self.to_dict()
        data.pop("extra")
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def title(self) -> str:
        """A short human-readable merge name, in the spirit of the seed's model names."""
        a, b, c = (_stem(m) for m in (self.model_a, self.model_b, self.model_c))
        ratio = "MBW" if self.mbw else f"{self.alpha:g}"
        if self.method:
            return f"{self.method}({a}; {', '.join(_stem(m) for m in self.models)}) x {ratio}"
        if self.calc in ("self", "plus random"):
            text = f"{a} x {ratio}" if self.calc == "self" else f"{a} + noise x {ratio}"
        elif self.mode == WEIGHT_SUM:
            text = f"{a} x (1-{ratio}) + {b} x {ratio}"
        elif self.mode == ADD_DIFF:
            text = f"{a} + ({b} - {c}) x {ratio}"
        elif self.mode == "Triple sum":
            text = f"{a} x (1-{ratio}-{self.beta:g}) + {b} x {ratio} + {c} x {self.beta:g}"
        else:
            text = f"({a} x (1-{ratio}) + {b} x {ratio}) x (1-{self.beta:g}) + {c} x {self.beta:g}"
        return text if self.calc == "normal" else f"{text} [{self.calc}]"


_KIND_WORDS = {str: "text", (int, float): "a number", int: "a whole number", tuple: "a list of names",
               dict: "an object"}
_FIELD_KINDS = {f.name: str for f in dataclasses.fields(Recipe)} | {
    "alpha": (int, float), "beta": (int, float), "gamma": (int, float), "seed": int,
    "density": (int, float), "drop": (int, float), "epsilon": (int, float),
    "inex_blocks": tuple, "inex_elements": tuple, "models": tuple, "model_weights": tuple, "extra": dict}
_ITEM_KINDS = {"model_weights": (int, float)}  # what a list field holds, where it is not names


def _stem(path: str) -> str:
    """`sub/sdA.safetensors [6357d68e0f]` (a WebUI checkpoint title) and `sdA` both name the model `sdA`."""
    name = re.sub(r"\s*\[[0-9a-fA-F]{8,64}\]$", "", path.strip()).replace("\\", "/").rsplit("/", 1)[-1]
    for ext in (".safetensors", ".ckpt", ".pt", ".pth"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def json_object(text: str | bytes) -> dict:
    """A recipe's JSON text decoded, refusing anything but a JSON object with a message a user can act on."""
    try:
        data = untrusted_json.loads(text, MAX_RECIPE_JSON)
    except ValueError as e:  # bad JSON, bad UTF-8, too long or too deep
        raise MergeError(f"Recipe is not valid JSON: {e}.") from None
    if not isinstance(data, dict):
        raise MergeError("Recipe JSON must be an object.")
    return data


def check_text_sizes(recipe: Recipe) -> None:
    """Refuse a text field longer than its TEXT_LIMITS entry, naming the field, before any of it is parsed."""
    for name in TEXT_LIMITS:
        check_text_size(name, getattr(recipe, name))


def check_text_size(name: str, value: str | Sequence[str] | None) -> None:
    """Refuse the recipe field `name` (a TEXT_LIMITS key) when it is longer than its limit."""
    limit = TEXT_LIMITS[name]
    size = len(value) if isinstance(value, str) else sum(len(str(v)) for v in value or ())
    if size > limit:
        raise MergeError(f"The {name.replace('_', ' ')} field holds {size:,} characters; at most {limit:,} are "
                         f"allowed. Shorten it.")


def check_extract_ratios(alpha: float, beta: float, where: str) -> None:
    if not (0 <= alpha <= 1 and 0 <= beta <= 1):
        raise MergeError(f"extract needs alpha and beta between 0 and 1 ({where}: alpha={alpha}, beta={beta}).")
