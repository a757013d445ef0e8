"""Block-weight strings, presets, block ranges, elemental rules, include/exclude and seeded random ratios.

All of this is text the user types (or shares in a recipe); each parser refuses what it cannot read with a message
that says how to fix it, where the seed system silently guessed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .arch import ADJUST_KEYS, BLOCKS_XL_FINE, Arch
from .errors import MergeError

DEFAULT_PRESETS = Path(__file__).resolve().parent.parent / "data" / "mbwpresets.tsv"
#: the user's own presets, next to the shipped file (which is never written); its entries replace shipped ones
USER_PRESETS = DEFAULT_PRESETS.with_name("mbwpresets_user.tsv")
USER_PRESETS_HEADER = "preset_name\tpreset_weights"

INEX_EXTRAS = ("Adjust", "VAE")
INEX_MODES = ("Off", "Include", "Exclude")
RANDOM_TOKENS = ("R", "U")
#: an elemental ratio drawn between two limits: `X` (0..1) or `X[lower upper]`, e.g. `X[0.2 0.8]`
_ELEMENTAL_X = re.compile(r"X(?:\[\s*(\S+)\s+(\S+)\s*\])?")
#: presets every list has (the seed adds them at runtime): every block drawn with R, U or X (X: between 0 and 1)
RANDOM_PRESETS = {f"ALL_{t}": ",".join([t] * 26) for t in ("R", "U", "X")}
_RANDOM_DRAWS = 3000  # the seed's table size; longer tables keep these first values, so recipes stay reproducible


class Presets:
    """Named block-weight lists from `NAME<TAB>values` or `NAME:values` lines (the first line is a header)."""

    def __init__(self, table: dict[str, str], paths: Sequence[Path] = ()):
        self._table = {**RANDOM_PRESETS, **table}
        self.paths = tuple(paths)  # the files read (a merge reads them: none may be its output)
        self.user_path: Path | None = None  # the user's file (set by load_with_user, even before it exists)
        self.shipped_path: Path | None = None

    @classmethod
    def load(cls, *paths: Path | str) -> Presets:
        """Read preset files in order; a later file's entry replaces an earlier one of the same name."""
        table: dict[str, str] = {}
        paths = tuple(Path(p) for p in paths or (DEFAULT_PRESETS,))
        for path in paths:
            try:
                lines = Path(path).read_text(encoding="utf-8").splitlines()
            except OSError as e:
                raise MergeError(f"Cannot read the preset file {path}: {e.strerror or e}.") from e
            for line in lines[1:]:
                entry = _preset_line(line)
                if entry is not None:
                    table[entry[0]] = entry[1]
        return cls(table, paths)

    @classmethod
    def load_with_user(cls, user: Path | str = USER_PRESETS, shipped: Path | str = DEFAULT_PRESETS) -> Presets:
        """The shipped presets, then the user's file when it exists; `user_path` remembers where it is (or will be)
        so that the tab can edit, save and reload it."""
        user = Path(user)
        presets = cls.load(shipped, *([user] if user.is_file() else []))
        presets.user_path = user
        presets.shipped_path = Path(shipped)
        return presets

    def reload(self) -> None:
        """Read the files again (the user's file may have been created or edited since)."""
        fresh = (Presets.load_with_user(self.user_path, self.shipped_path or DEFAULT_PRESETS) if self.user_path
                 else Presets.load(*self.paths))
        self._table, self.paths = fresh._table, fresh.paths

    def save_user(self, text: str) -> int:
        """Check `text` (a preset file: header line, then `NAME<TAB>values` or `NAME:values` lines), write it as
        the user's file (atomically) and reload; returns the number of presets in it. The shipped file is never
        written."""
        if self.user_path is None:
            raise MergeError("These presets have no user file to save to.")
        if Path(self.user_path).resolve() == Path(self.shipped_path or DEFAULT_PRESETS).resolve():
            raise MergeError(f"{self.user_path} is the shipped preset file, which is never written; save to "
                             f"{USER_PRESETS.name} beside it.")
        lines = (text or "").splitlines()
        first = _preset_line(lines[0]) if lines else None
        if not lines or (first is not None and not _bad_values(first[1])):
            lines.insert(0, USER_PRESETS_HEADER)  # the first line is a header: never lose a preset to it
        count = 0
        for number, line in enumerate(lines[1:], start=2):
            if not line.strip():
                continue
            entry = _preset_line(line)
            if entry is None:
                raise MergeError(f"Line {number} ({line[:40]!r}) is not NAME<tab>values or NAME:values.")
            name, values = entry
            bad = _bad_values(values)
            if bad:
                raise MergeError(f"Preset {name!r} (line {number}): {bad[0]!r} is not a number (or R, U, X).")
            count += 1
        target = Path(self.user_path)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(target.name + ".tmp")
        temporary.write_text("\n".join(lines) + "\n", encoding="utf-8")
        temporary.replace(target)
        self.reload()
        return count

    def user_text(self) -> str:
        """The user's file as it is on disk, or a header and an example line to start from."""
        if self.user_path is not None and Path(self.user_path).is_file():
            return Path(self.user_path).read_text(encoding="utf-8")
        return f"{USER_PRESETS_HEADER}\nMY_PRESET\t" + ",".join(["0.5"] * 26) + "\n"

    def names(self, length: int | None = 26) -> list[str]:
        """Preset names, by default only those with 26 values (what the dropdowns list, as in the seed)."""
        return [n for n, v in self._table.items() if length is None or len(v.split(",")) == length]

    def get(self, name: str) -> str | None:
        return self._table.get(name.strip())

    def resolve(self, text: str) -> str:
        """A weights field holding a preset name (no comma) becomes that preset's values; anything else is kept."""
        text = (text or "").strip()
        if text and "," not in text:
            found = self.get(text)
            if found is None:
                raise MergeError(
                    f"Unknown preset {text!r}. Give comma-separated numbers or one of: {', '.join(self.names())}."
                )
            return found
        return text


def _preset_line(line: str) -> tuple[str, str] | None:
    name, sep, values = line.partition("\t") if "\t" in line else line.partition(":")
    return (name.strip(), values.strip()) if sep and name.strip() and values.strip() else None


def _bad_values(values: str) -> list[str]:
    """The entries of a preset's values that are neither finite numbers nor the random letters R, U, X."""
    def ok(token: str) -> bool:
        try:
            return math.isfinite(float(token))
        except ValueError:
            return token in (*RANDOM_TOKENS, "X")
    return [t for t in (t.strip() for t in values.split(",")) if not ok(t)]


def random_table(seed: int, keys: int = 0) -> np.ndarray:
    """The seed system's random draws for a weight seed: same seed, same values (np.random.seed + rand)."""
    return np.random.RandomState(seed % 2**32).rand(max(_RANDOM_DRAWS, keys + 101))


def parse_number(token: str, what: str) -> float:
    try:
        value = float(token)
    except ValueError:
        raise MergeError(f"{what}: {token!r} is not a number.") from None
    if not math.isfinite(value):
        raise MergeError(f"{what}: {token!r} is not a finite number.")
    return value


def has_random(text: str) -> bool:
    """Whether a weights string or elemental text draws R/U/X ratios (and so needs a weight seed)."""
    return any(_is_random_ratio(t.rsplit(":", 1)[-1].strip()) for t in (text or "").replace("\n", ",").split(","))


def _is_random_ratio(token: str) -> bool:
    return token in RANDOM_TOKENS or _ELEMENTAL_X.fullmatch(token) is not None


def beta_offset(count: int) -> int:
    """Where beta's random draws start: 50 as in the seed, or after alpha's for the 110 extended SDXL weights (the
    seed's 50 made alpha's and beta's draws overlap there)."""
    return 50 if count <= 50 else count


def sdxl_from_26(values: Sequence) -> list:
    """26 SD1-layout block values -> the 20 SDXL blocks (IN09-IN11 and OUT09-OUT11 dropped), as the seed does."""
    return [*values[0:10], *values[13:23]]


def block_weight(values: Sequence[float], arch: Arch, fine: str, block: str) -> float:
    """A key's value from parsed block weights: by block label, or for the 110 extended SDXL weights by fine label
    (the VAE takes the first, base, value)."""
    if len(values) == len(BLOCKS_XL_FINE) and arch.is_sdxl:
        return values[0] if fine == "VAE" else values[BLOCKS_XL_FINE.index(fine)]
    return values[arch.blocks.index(block)]


def parse_block_weights(
    text: str, arch: Arch, what: str = "alpha", randoms: np.ndarray | None = None, offset: int = 0
) -> tuple[float, ...]:
    """Turn a resolved weights string into one value per block of `arch` (26 for SD1/SD2, 20 for SDXL, 61 for Flux),
    or for SDXL the 110 extended fine-block values (BLOCKS_XL_FINE order; see `block_weight`).

    The first value is BASE (Flux: CLIP, which also serves as the base value). 26 values given for SDXL are converted
    as the seed does (IN09-IN11 and OUT09-OUT11 dropped). `R` and `U` draw from the seeded random table at the
    value's position plus `offset` (beta: `beta_offset`), as the seed does.
    """
    tokens = [t.strip() for t in text.split(",")]
    if tokens and tokens[-1] == "" and len(tokens) in (21, 27, 62, 111):
        tokens.pop()  # a trailing comma
    if len(tokens) not in (20, 26, 61, len(BLOCKS_XL_FINE)):
        raise MergeError(
            f"Block weights for {what} have {len(tokens)} values; give 26 (BASE, IN00-IN11, M00, OUT00-OUT11), "
            f"for SDXL 20 (BASE, IN00-IN08, M00, OUT00-OUT08) or the 110 extended SDXL weights, or for Flux 61 "
            f"(CLIP, T5, IN, D00-D18, S00-S37, OUT)."
        )
    if len(tokens) == len(BLOCKS_XL_FINE) and not arch.is_sdxl:
        raise MergeError(f"Block weights for {what} have 110 values, the extended SDXL fine blocks; this model is "
                         f"{arch.describe()} and needs {len(arch.blocks)} (give {len(arch.blocks)} values, or use "
                         f"an SDXL model).")
    if arch.is_flux != (len(tokens) == 61):
        raise MergeError(f"Block weights for {what} have {len(tokens)} values, but this model is {arch.describe()} "
                         f"and needs {len(arch.blocks) if arch.is_flux else '26'}"
                         f"{'' if arch.is_flux else ' (or 20 for SDXL)'}.")
    if len(tokens) == 20 and not arch.is_sdxl:
        raise MergeError(f"Block weights for {what} have 20 values, which is the SDXL layout; this model is "
                         f"{arch.describe()} and needs 26.")
    values = []
    for i, token in enumerate(tokens):
        if _is_random_ratio(token):
            if randoms is None:
                raise MergeError(f"Block weights for {what} use {token!r}, which needs a weight seed.")
            r = float(randoms[i + offset])
            if token.startswith("X"):  # as in the dice's X mode, with the limits written in the token
                lower, upper = elemental_x_limits(token, f"Block weight {i + 1} for {what}")
                values.append(round((lower - upper) * r + upper, 3))
            else:
                values.append(round(r if token == "R" else 1.5 - 2 * r, 3))
        else:
            values.append(parse_number(token, f"Block weight {i + 1} for {what}"))
    if arch.is_sdxl and len(values) == 26:
        values = sdxl_from_26(values)
    return tuple(values)


def expand_blocks(tokens: Sequence[str], labels: Sequence[str], extra: frozenset[str] = frozenset(),
                  what: str = "blocks") -> list[str]:
    """Expand `A-B` ranges (inclusive, either order) over `labels`; other tokens must be labels or `extra`."""
    out: list[str] = []
    for token in tokens:
        if "-" in token:
            ends = [e.strip() for e in token.split("-")]
            if len(ends) != 2 or not all(e in labels for e in ends):
                raise MergeError(f"{what}: bad range {token!r}; write it as e.g. IN03-IN06 with labels from "
                                 f"{labels[0]}...{labels[-1]}.")
            i, j = sorted(labels.index(e) for e in ends)
            out.extend(labels[i : j + 1])
        elif token in labels or token in extra:
            out.append(token)
        else:
            raise MergeError(f"{what}: unknown block {token!r}; use {', '.join(labels)}"
                             + (" (or an SDXL fine label such as IN41)" if extra else "") + ".")
    return out


@dataclass(frozen=True)
class ElementalRule:
    """`Blocks:Elements:Ratio` — the last matching rule sets a key's alpha, overriding block weights."""

    blocks: frozenset[str]  # block labels (BASE, IN00, ...)
    fines: frozenset[str]  # SDXL fine labels (IN41, CLIPG, ...) that are not also block labels
    blocks_not: bool
    elements: tuple[str, ...]
    elements_not: bool
    ratio: str  # a number or R/U, resolved per key

    def matches(self, key: str, fine: str, block: str) -> bool:
        if (self.blocks or self.fines) and ((block in self.blocks or fine in self.fines) == self.blocks_not):
            return False
        if self.elements and (any(e in key for e in self.elements) == self.elements_not):
            return False
        return True

    def value(self, key_index: int, randoms: np.ndarray | None) -> float:
        """The ratio; R/U/X draw the key's own value (the seed's draw at key index + 100; elemental U is 1 - 2r, X
        runs from the upper limit at r = 0 to the lower at r = 1, both as in the seed)."""
        if not _is_random_ratio(self.ratio):
            return float(self.ratio)
        if randoms is None:
            raise MergeError("Elemental ratio R/U/X needs a weight seed.")
        r = float(randoms[key_index + 100])
        if self.ratio == "R":
            return round(r, 3)
        if self.ratio == "U":
            return round(1 - 2 * r, 3)
        lower, upper = elemental_x_limits(self.ratio)
        return round((lower - upper) * r + upper, 3)


def elemental_x_limits(ratio: str, what: str = "Elemental ratio") -> tuple[float, float]:
    """(lower, upper) of an elemental `X` ratio: `X` is 0..1, `X[lower upper]` gives both."""
    m = _ELEMENTAL_X.fullmatch(ratio)
    if m is None:
        raise MergeError(f"{what}: {ratio!r} is not a ratio; write a number, R, U, X or X[lower upper] "
                         f"(e.g. X[0.2 0.8]).")
    if m.group(1) is None:
        return 0.0, 1.0
    return parse_number(m.group(1), f"{what}: lower limit"), parse_number(m.group(2), f"{what}: upper limit")


def _split_not(text: str) -> tuple[list[str], bool]:
    tokens = text.split()
    if tokens and tokens[0] == "NOT":
        return tokens[1:], True
    return tokens, False


def parse_elemental(text: str, arch: Arch, fine_labels: frozenset[str] = frozenset()) -> tuple[ElementalRule, ...]:
    """Entries separated by commas or newlines, each `Blocks:Elements:Ratio` with exactly two colons.

    Block fields take the model's block labels and ranges, plus its fine labels (SDXL: e.g. IN41, CLIPG).
    """
    labels, extra = arch.blocks, fine_labels
    rules = []
    for entry in (e.strip() for e in (text or "").replace("\n", ",").split(",")):
        if not entry:
            continue
        if entry.count(":") != 2:
            raise MergeError(f"Elemental entry {entry!r} must be Blocks:Elements:Ratio, e.g. OUT06:attn2:0.5 "
                             f"(blank blocks or elements mean all).")
        blocks_text, elements_text, ratio = (p.strip() for p in entry.split(":"))
        blocks, blocks_not = _split_not(blocks_text)
        elements, elements_not = _split_not(elements_text)
        if ratio.startswith("X"):
            elemental_x_limits(ratio, f"Elemental entry {entry!r}")
        elif ratio not in RANDOM_TOKENS:
            parse_number(ratio, f"Elemental entry {entry!r}: ratio")
        chosen = expand_blocks(blocks, labels, extra, f"Elemental entry {entry!r}")
        rules.append(ElementalRule(
            frozenset(b for b in chosen if b in labels), frozenset(b for b in chosen if b not in labels), blocks_not,
            tuple(elements), elements_not, ratio,
        ))
    return tuple(rules)


@dataclass(frozen=True)
class InExRule:
    """Include/Exclude: which keys the merge touches; a skipped key keeps model A's tensor."""

    mode: str = "Off"
    blocks: frozenset[str] = frozenset()  # block labels plus "Adjust" / "VAE"
    elements: tuple[str, ...] = ()
    fines: frozenset[str] = frozenset()  # SDXL fine labels that are not also block labels

    def skips(self, key: str, fine: str, block: str) -> bool:
        if self.mode == "Off" or (not self.blocks and not self.elements and not self.fines):
            return False
        include = self.mode == "Include"
        hit = (
            block in self.blocks
            or (fine != block and fine in self.fines)
            or fine in self.elements
            or ("Adjust" in self.blocks and key in ADJUST_KEYS)
            or any(e in key for e in self.elements)
            or ("VAE" in self.blocks and "first_stage_model" in key)
        )
        return not include if hit else include


def parse_inex(mode: str, blocks: Sequence[str], elements: Sequence[str], arch: Arch,
               fine_labels: frozenset[str] = frozenset()) -> InExRule:
    if mode not in INEX_MODES:
        raise MergeError(f"Include/Exclude mode {mode!r} is not one of {', '.join(INEX_MODES)}.")
    labels, extra = arch.blocks, fine_labels
    tokens = [t.strip() for b in blocks for t in b.replace(",", " ").split() if t.strip() and t.strip() != "print"]
    chosen = expand_blocks(tokens, labels, extra | frozenset(INEX_EXTRAS), "Include/Exclude blocks")
    elems = tuple(e.strip() for e in elements if e.strip())
    if mode != "Off" and not chosen and not elems:
        raise MergeError(f"{mode} needs blocks (e.g. IN01,OUT02) or elements (e.g. attn); none were given.")
    blocks = frozenset(b for b in chosen if b in labels or b in INEX_EXTRAS)
    return InExRule(mode, blocks, elems, frozenset(chosen) - blocks)


ADJUST_NAMES = ("IN", "OUT", "OUT2", "CONT", "BRI", "COL1", "COL2", "COL3")
_COLOURS = {  # rows BRI, COL1, COL2, COL3 -> contribution to latent channels 1..3
    False: ((-1, 1 / 3, 2 / 3), (1, 1, 0), (0, -1, -1), (1, 0, 1)),
    True: ((0, 0, 1), (1, 0, 0), (-1, -1, 0), (-1, 1, 0)),
}


@dataclass(frozen=True)
class Adjust:
    """The seed's "Adjust": detail/contrast/brightness/colour through six input/output keys of the U-Net."""

    values: tuple[float, ...]  # IN, OUT, OUT2, CONT, BRI, COL1, COL2, COL3

    def apply(self, key: str, tensor, is_sdxl: bool):
        """Return `tensor` (fp32) adjusted if `key` is one of the six adjust keys; otherwise unchanged."""
        if key not in ADJUST_KEYS:
            return tensor
        v = self.values
        scale = (1 - 0.01 * v[0], 1 + 0.02 * v[0], 1 - 0.01 * v[1], 1 + 0.02 * v[1], 1 - 0.01 * v[2])
        index = ADJUST_KEYS.index(key)
        if index < 5:
            return tensor * scale[index]
        colours = [sum(0.02 * c * row[j] for c, row in zip(v[4:8], _COLOURS[is_sdxl], strict=True)) for j in range(3)]
        shift = [0.02 * v[3], *colours]
        if tensor.shape[0] != 4:
            raise MergeError(f"Adjust expects 4 latent channels in {key}, found {tensor.shape[0]}.")
        return tensor + tensor.new_tensor(shift)


def parse_adjust(text: str) -> Adjust | None:
    """Eight comma-separated numbers (IN, OUT, OUT2, CONT, BRI, COL1, COL2, COL3); blank or all zero = off."""
    text = (text or "").strip()
    if not text:
        return None
    tokens = [t.strip() for t in text.split(",")]
    if len(tokens) != 8:
        raise MergeError(f"Adjust needs 8 comma-separated numbers ({', '.join(ADJUST_NAMES)}); got {len(tokens)}.")
    values = tuple(parse_number(t, f"Adjust {name}") for t, name in zip(tokens, ADJUST_NAMES, strict=True))
    return Adjust(values) if any(values) else None


@dataclass(frozen=True)
class BlockValues:
    """A parameter given per block exactly like alpha: a plain value, or one value per block (the first, BASE,
    replacing the plain value), then elemental rules (the last match wins)."""

    value: float
    blocks: tuple[float, ...] | None = None
    rules: tuple[ElementalRule, ...] = ()

    def at(self, labels: Sequence[str], key: str, fine: str, block: str, key_index: int,
           randoms: np.ndarray | None) -> float:
        value = self.value
        if self.blocks:
            value = (block_weight(self.blocks, Arch("sdxl"), fine, block) if len(self.blocks) == len(BLOCKS_XL_FINE)
                     else self.blocks[labels.index(block)])
        for rule in self.rules:
            if rule.matches(key, fine, block):
                value = rule.value(key_index, randoms)
        return value


def parse_block_values(value: float, weights: str, elemental: str, arch: Arch, what: str,
                       randoms: np.ndarray | None, fine_labels: frozenset[str] = frozenset(),
                       offset: int = 0) -> BlockValues:
    """One parameter's value, resolved block weights (26/20 values) and elemental text, checked and parsed; R/U
    block values draw at `offset` in the random table (alpha 0, as in the seed; the others 50, like beta)."""
    blocks = parse_block_weights(weights, arch, what, randoms, offset) if weights.strip() else None
    return BlockValues(blocks[0] if blocks else value, blocks, parse_elemental(elemental, arch, fine_labels))
