"""Random block weights ("Let the Dice roll"): the seed system's random modes, resolved from one weight seed.

A `RandomSpec` says how each block's weight is drawn; `resolve` turns it and a seed into plain numbers (and, for the
E modes, elemental rules whose per-key draws the engine makes from the same seed). The result is an ordinary recipe:
it records the seed and the drawn numbers, so a merge is reproduced from the recipe alone, or from the spec and the
seed (the seed is what a Run Rand grid shows under each cell).

Tokens, one per block (r = the seed's draw for that position, see `weights.random_table`):
- `R`: r. `U`: 1.5 - 2r. `X`: (lower - upper) r + upper. `D`: upper + lower (r - 0.5) (upper is the mid point,
  lower the range). A lower limit written `xRp` (e.g. `0R0.3`) means: with probability p the lower limit is x, else
  the weight is 0.
- `ER`, `EU`, `EX`: the block's weight is 0 and an elemental rule `BLOCK::R` (U, X[lower upper]) gives every key of
  the block its own random ratio.
- a number: kept.
Every block value is then clamped to the clamp limits (when given) and rounded to `decimals`.

Fixed here (the seed's bugs): the `xRp` probability is drawn from the weight seed (the seed used Python's unseeded
`random`, so such merges could not be reproduced); with the 110 extended SDXL weights beta draws after alpha's
positions instead of overlapping them; Run Rand cells get their own seed each, shown and logged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .arch import BLOCKS_XL_FINE, Arch
from .errors import MergeError
from .recipe import Recipe
from .weights import beta_offset, parse_number, random_table, sdxl_from_26

#: the dice modes: one token for every block, or a custom template
RANDOM_MODES = ("R", "U", "X", "D", "ER", "EU", "EX", "custom")
TOKENS = ("R", "U", "X", "D", "ER", "EU", "EX")
TARGETS = ("alpha", "beta")
#: where the xRp probability draws come from: a second stream of the same seed (numpy's init_by_array)
PROBABILITY_STREAM = 1


@dataclass(frozen=True)
class RandomSpec:
    """How to draw block weights. Limits are one number for every block or one per block."""

    mode: str = "R"
    template: str = ""  # the custom mode's tokens, one per block (numbers or R/U/X/D/ER/EU/EX)
    upper: str = "1"  # X: upper limit; D: mid point
    lower: str = "0"  # X: lower limit (or xRp); D: range
    clamp_upper: str = ""  # blank: no clamp
    clamp_lower: str = ""
    decimals: int = 3
    targets: tuple[str, ...] = ("alpha",)
    extended: bool = False  # SDXL: draw the 110 fine-block weights

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "targets": list(self.targets)}

    def check(self) -> RandomSpec:
        if self.mode not in RANDOM_MODES:
            raise MergeError(f"Random mode {self.mode!r} is not one of {', '.join(RANDOM_MODES)}.")
        if self.mode == "custom" and not self.template.strip():
            raise MergeError("Random mode custom needs a template: one token per block, e.g. R,U,0.5,X,... "
                             "(or a preset name such as ALL_R).")
        if not self.targets or any(t not in TARGETS for t in self.targets):
            raise MergeError(f"Random weights go to alpha and/or beta; got {list(self.targets)}.")
        if not isinstance(self.decimals, int) or not 0 <= self.decimals <= 10:
            raise MergeError(f"Round to 0-10 decimals, not {self.decimals!r}.")
        return self


@dataclass(frozen=True)
class RandomWeights:
    weights_alpha: str
    weights_beta: str
    elemental: str  # rules added by ER/EU/EX ("" if none)


def labels_for(arch: Arch, extended: bool) -> tuple[str, ...]:
    """The blocks a random weight list covers: the model's blocks, or the 110 fine SDXL blocks."""
    if extended:
        if not arch.is_sdxl:
            raise MergeError(f"Extended weights (110 fine blocks) exist for SDXL only; this model is "
                             f"{arch.describe()}. Untick 'extend XL'.")
        return BLOCKS_XL_FINE
    return arch.blocks


def _per_block(text: str, labels: Sequence[str], what: str, arch: Arch) -> list[str]:
    """One limit token per block: a single value repeated, or a full list (26 converted for SDXL)."""
    tokens = [t.strip() for t in (text or "").split(",") if t.strip()]
    if len(tokens) == 1:
        return tokens * len(labels)
    if arch.is_sdxl and len(labels) == 20 and len(tokens) == 26:
        tokens = sdxl_from_26(tokens)
    if len(tokens) != len(labels):
        raise MergeError(f"{what} has {len(tokens)} values; give one for every block or {len(labels)} "
                         f"({labels[0]}...{labels[-1]}).")
    return tokens


def _number(token: str, what: str) -> float:
    return parse_number(token, what)


def _optional(tokens: list[str] | None, i: int, what: str) -> float | None:
    return None if tokens is None else _number(tokens[i], what)


def resolve(spec: RandomSpec, seed: int, arch: Arch, presets=None) -> RandomWeights:
    """Draw the block weights for `seed` (one value per block of `arch`, or 110 for extended SDXL)."""
    spec.check()
    if not 0 <= seed < 2**32:
        raise MergeError(f"A weight seed is a whole number from 0 to {2**32 - 1}; got {seed}.")
    labels = labels_for(arch, spec.extended)
    template = spec.template if spec.mode == "custom" else spec.mode
    if presets is not None and "," not in template.strip() and template.strip() not in TOKENS:
        template = presets.resolve(template)
    tokens = _per_block(template, labels, "The random template", arch)
    for t in tokens:
        if t not in TOKENS:
            _number(t, "The random template")
    upper = _per_block(spec.upper, labels, "The upper limit", arch)
    lower = _per_block(spec.lower, labels, "The lower limit", arch)
    clamp_hi = _per_block(spec.clamp_upper, labels, "The upper clamp", arch) if spec.clamp_upper.strip() else None
    clamp_lo = _per_block(spec.clamp_lower, labels, "The lower clamp", arch) if spec.clamp_lower.strip() else None
    table = random_table(seed)
    chances = np.random.RandomState([seed, PROBABILITY_STREAM]).rand(len(table))
    out = {"alpha": "", "beta": ""}
    rules: dict[str, list[str]] = {}
    for target in spec.targets:
        offset = 0 if target == "alpha" else beta_offset(len(labels))
        values = []
        for i, token in enumerate(tokens):
            r = float(table[i + offset])
            if token in ("ER", "EU", "EX"):
                kind = token[1]
                if kind == "X":
                    low = _limit(lower[i], f"The lower limit of {labels[i]}")[0]
                    kind = f"X[{low!r} {_number(upper[i], f'The upper limit of {labels[i]}')!r}]"
                if target == "alpha" and labels[i] != "IN0":  # rules set alpha only; no key is IN0
                    rules.setdefault(kind, []).append(labels[i])
                value = 0.0
            elif token == "R":
                value = r
            elif token == "U":
                value = 1.5 - 2 * r
            elif token == "X":
                low, chance = _limit(lower[i], f"The lower limit of {labels[i]}")
                up = _number(upper[i], f"The upper limit of {labels[i]}")
                value = (low - up) * r + up if chance is None or chances[i + offset] < chance else 0.0
            elif token == "D":
                mid = _number(upper[i], f"The mid point of {labels[i]}")
                value = mid + _number(lower[i], f"The range of {labels[i]}") * (r - 0.5)
            else:
                value = _number(token, "The random template")
            hi = _optional(clamp_hi, i, f"The upper clamp of {labels[i]}")
            lo = _optional(clamp_lo, i, f"The lower clamp of {labels[i]}")
            value = min(value, hi) if hi is not None else value
            value = max(value, lo) if lo is not None else value
            values.append(repr(round(value, spec.decimals) + 0.0))
        out[target] = ",".join(values)
    elemental = ",".join(f"{' '.join(blocks)}::{kind}" for kind, blocks in rules.items())
    return RandomWeights(out["alpha"], out["beta"], elemental)


def _limit(token: str, what: str) -> tuple[float, float | None]:
    """A lower limit: `x`, or `xRp` (x with probability p, else the weight is 0)."""
    if "R" in token:
        value, _, chance = token.partition("R")
        p = _number(chance, f"{what}: probability")
        if not 0 <= p <= 1:
            raise MergeError(f"{what}: the probability in {token!r} must be between 0 and 1.")
        return _number(value, what), p
    return _number(token, what), None


def apply(recipe: Recipe, spec: RandomSpec, seed: int, arch: Arch, presets=None) -> Recipe:
    """`recipe` with the drawn block weights (MBW on), the E modes' elemental rules appended, the weight seed set
    (the elemental draws use it) and the spec kept in `extra` (informational: the history shows how it was drawn)."""
    drawn = resolve(spec, seed, arch, presets)
    fields: dict = {"seed": seed, "extra": {**recipe.extra, "random": {**spec.to_dict(), "seed": seed}}}
    if "alpha" in spec.targets:
        fields["weights_alpha"] = drawn.weights_alpha
    elif not recipe.weights_alpha.strip():
        fields["weights_alpha"] = ",".join([f"{recipe.alpha!r}"] * len(labels_for(arch, spec.extended)))
    if "beta" in spec.targets:
        fields["weights_beta"] = drawn.weights_beta
    if drawn.elemental:
        fields["elemental"] = ",".join(filter(None, [recipe.elemental.strip(), drawn.elemental]))
    return dataclasses.replace(recipe, **fields)


def spec_from_dict(data: dict) -> RandomSpec:
    """A spec logged in a recipe's `extra` (or sent by the API) back into a RandomSpec."""
    known = {f.name for f in dataclasses.fields(RandomSpec)}
    values = {k: v for k, v in (data or {}).items() if k in known}
    if "targets" in values:
        values["targets"] = tuple(values["targets"])
    return RandomSpec(**values).check()
