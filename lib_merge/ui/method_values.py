"""Widget values <-> the merge-method fields of a recipe, for the tab's method panel (`methods_panel`).

Pure functions, no gradio: the method choice ("Off" keeps the four merge modes with models A/B/C), what the panel
shows for a method (its formula, source, model count and parameters), and the method's widget values turned into
recipe fields and back. Model A is the base; the other models come from a multiselect, in the order they were picked.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from ..core.errors import MergeError
from ..core.methods import METHODS, get_method
from ..core.recipe import METHOD_PARAMS, Recipe
from ..core.weights import parse_number

OFF = "Off (merge modes)"
METHOD_CHOICES = (OFF, *METHODS)
#: the panel's widgets, in the order the tab's handlers receive them after its other recipe widgets
METHOD_KEYS = ("method", "models", "model_weights", *METHOD_PARAMS, *(f"weights_{n}" for n in METHOD_PARAMS),
               *(f"elemental_{n}" for n in METHOD_PARAMS))
METHOD_DEFAULTS: dict[str, Any] = {
    "method": OFF, "models": [], "model_weights": "", "density": Recipe.density, "drop": Recipe.drop,
    "epsilon": Recipe.epsilon, **{f"weights_{n}": "" for n in METHOD_PARAMS},
    **{f"elemental_{n}": "" for n in METHOD_PARAMS},
}
PARAM_HELP = {
    "alpha": "λ, the scale of the merged task vector",
    "density": "the fraction of each task vector kept, by magnitude",
    "drop": "the probability of dropping an entry (survivors scaled by 1/(1-p))",
    "epsilon": "the spread of drop probabilities by magnitude rank",
}


def method_name(value: Any) -> str:
    """The recipe's `method` for the dropdown's value: "" for Off (or nothing chosen)."""
    return "" if value in (None, "", OFF) else str(value)


def alpha_label(value: Any) -> str:
    name = method_name(value)
    if not name:
        return "alpha"
    return "t (slerp: 0 = the base, 1 = the model)" if name == "slerp" else "alpha (λ: the task vector's scale)"


def method_info(value: Any) -> str:
    """What the panel shows under the choice: the formula, its source, the models it takes and its parameters."""
    name = method_name(value)
    if not name:
        return ("Off: merge with the merge mode and calc mode below (models A, B, C). Pick a method to merge a base "
                "(model A) with a list of models.")
    try:
        m = get_method(name)
    except MergeError as e:
        return str(e)
    params = [p for p in m.params if p != "alpha"] if name == "slerp" else list(m.params)
    uses = "; ".join(f"**{p}**: {PARAM_HELP[p]}" for p in params) or "no parameters (t comes from the angles)"
    lines = [f"**{m.name}**: {m.formula} ({m.source}).",
             f"Base: model A; models: {m.count_text()}, picked in order below. Uses {uses}."]
    if name == "slerp":
        lines.append("**t** is the alpha slider (0 = the base, 1 = the model).")
    if m.weighted:
        lines.append("Model weights wᵢ scale each model's task vector (blank = all 1).")
    if m.random:
        lines.append("Random: the draws follow the weight seed in Options (-1 draws one, logged with the merge).")
    return "\n\n".join(lines)


def shown(value: Any) -> dict[str, bool]:
    """Which of the panel's controls a method uses (and whether the merge-mode controls apply: Off only)."""
    name = method_name(value)
    m = METHODS.get(name)
    return {
        "method": m is not None,
        "merge_modes": not name,
        "model_weights": bool(m and m.weighted),
        **{p: bool(m and p in m.params) for p in METHOD_PARAMS},
    }


def default_alpha(value: Any) -> float | None:
    """The alpha a method starts from (λ 1; slerp's t 0.5), None for Off."""
    m = METHODS.get(method_name(value))
    return m.default_alpha if m is not None else None


def _models(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value] if value else []
    names = tuple(str(v) for v in (value or ()) if v)
    return names


def parse_model_weights(text: Any) -> tuple[float, ...]:
    """"1, 0.5" -> (1.0, 0.5); blank -> () (all 1)."""
    if isinstance(text, (list, tuple)):
        text = ",".join(str(t) for t in text)
    out = []
    for token in str(text or "").replace(";", ",").split(","):
        token = token.strip()
        if not token:
            continue
        number = parse_number(token, "Model weights")
        out.append(number)
    return tuple(out)


def _number(value: Any, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise MergeError(f"{name} must be a number, not {value!r:.60}.") from None
    if not math.isfinite(number):
        raise MergeError(f"{name} must be a finite number, not {value!r:.60}.")
    return number


def method_fields(method: Any, values: Mapping[str, Any]) -> dict[str, Any]:
    """The method panel's widget values -> the recipe's method fields ({} for Off). Per-block texts are returned as
    typed; the caller checks them as it checks alpha's (and drops them when MBW is off)."""
    name = method_name(method)
    if not name:
        return {}
    get_method(name)  # an unknown name: the registry's message
    v = {**METHOD_DEFAULTS, **{k: values[k] for k in METHOD_KEYS if k in values and values[k] is not None}}
    models = _models(v["models"])
    if not models:
        raise MergeError(f"Method {name} merges models into the base (model A): pick them under \"Models\".")
    fields: dict[str, Any] = {"method": name, "models": models,
                              "model_weights": parse_model_weights(v["model_weights"])}
    for p in METHOD_PARAMS:
        fields[p] = _number(v[p], p)
        for prefix in ("weights_", "elemental_"):
            text = v[prefix + p]
            if not isinstance(text, str):
                raise MergeError(f"The {prefix.replace('_', ' ')}{p} field must be text, not {text!r:.60}.")
            fields[prefix + p] = text.strip()
    return fields


def widget_values(recipe: Recipe) -> dict[str, Any]:
    """A recipe's method fields as the panel's widget values (Off and the defaults for a merge-mode recipe)."""
    if not recipe.method:
        return dict(METHOD_DEFAULTS)
    out: dict[str, Any] = {"method": recipe.method, "models": list(recipe.models),
                           "model_weights": ", ".join(f"{w:g}" for w in recipe.model_weights)}
    for p in METHOD_PARAMS:
        out[p] = getattr(recipe, p)
        out[f"weights_{p}"] = getattr(recipe, f"weights_{p}")
        out[f"elemental_{p}"] = getattr(recipe, f"elemental_{p}")
    return out


def history_cells(recipe: Mapping[str, Any]) -> dict[str, str]:
    """The history table's mode and model B cells for a logged method recipe: the method and its models."""
    method = recipe.get("method")
    if not method:
        return {}
    models: Iterable[Any] = recipe.get("models") or ()
    return {"mode": str(method), "model_b": ", ".join(str(m) for m in models), "model_c": ""}
