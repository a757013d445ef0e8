"""LoRA and LyCORIS file formats: which tensors form a module, and the weight delta each module adds.

One `LoraModule` is the set of tensors a file stores for one target weight (kohya `<module>.<part>` or PEFT
`<dotted.module>.lora_A.weight`). `delta` computes what that module adds to the weight W at strength 1, in fp32:
ΔW = s·ΔW_raw with s = alpha/rank (or the stored `scale`), the WebUI's Lora extension's rule (see
seed-lora-analysis.md §1.3/§1.4), so that a baked model matches generating with the LoRA at the same strength.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from ..core.errors import MergeError
from ..core.finite import all_finite

#: Stored part name -> canonical part name. Longest names are matched first, so `lora_A.weight` wins over `weight`.
PART_ALIASES = {
    "lora_up.weight": "up",
    "lora_down.weight": "down",
    "lora_mid.weight": "mid",
    "lora_B.weight": "up",
    "lora_A.weight": "down",
    "lora.up.weight": "up",
    "lora.down.weight": "down",
    "alpha": "alpha",
    "scale": "scale",
    "dora_scale": "dora_scale",
    "lora_magnitude_vector": "magnitude",
    "lora_magnitude_vector.weight": "magnitude",
    **{p: p for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")},
    **{p: p for p in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t1", "lokr_t2")},
    "on_input": "on_input",
    "diff": "diff",
    "diff_b": "diff_b",
    "w_norm": "w_norm",
    "b_norm": "b_norm",
    "bias": "bias",
    "weight": "weight",
    # Recognised so they are reported as unsupported rather than as unknown keys.
    "oft_blocks": "oft",
    "oft_diag": "oft",
    "a1.weight": "glora",
    "a2.weight": "glora",
    "b1.weight": "glora",
    "b2.weight": "glora",
}
_PARTS_LONGEST_FIRST = sorted(PART_ALIASES, key=len, reverse=True)

#: parts that are numbers, not factors
SCALAR_PARTS = ("alpha", "scale", "on_input")

KINDS = ("lora", "loha", "lokr", "ia3", "full", "norm")
KIND_NAMES = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr", "ia3": "(IA)3", "full": "full/diff", "norm": "norm"}


class LoraError(MergeError):
    """A LoRA file or LoRA request that cannot be used; the message names the file or module."""


def split_key(key: str) -> tuple[str, str] | None:
    """`module.part` -> (module, canonical part), or None for a key of no known part (bundled embeddings...)."""
    for stored in _PARTS_LONGEST_FIRST:
        if key.endswith("." + stored) and len(key) > len(stored) + 1:
            return key[: -len(stored) - 1], PART_ALIASES[stored]
    return None


def tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """CP/Tucker weight: t [r, r, kh, kw], wa [r, out], wb [r, in] -> [out, in, kh, kw]."""
    return torch.einsum("ijkl,jr,ip->prkl", t, wb, wa)


def _matmul_to(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """up [out, r(, 1, 1)] @ down [r, in(, kh, kw)] -> [out, in(, kh, kw)], the conv composition of §1.3."""
    out = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
    return out.reshape(up.shape[0], *down.shape[1:])


@dataclass
class LoraModule:
    """The tensors one LoRA file stores for one target weight (parts under canonical names)."""

    name: str
    parts: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        p = self.parts
        if "oft" in p:
            return "OFT"
        if "glora" in p:
            return "GLoRA"
        if "down" in p or "up" in p:
            return "lora"
        if any(k.startswith("hada_") for k in p):
            return "loha"
        if any(k.startswith("lokr_") for k in p):
            return "lokr"
        if "diff" in p:
            return "full"
        if "w_norm" in p:
            return "norm"
        if "weight" in p:
            return "ia3"
        return "unknown"

    @property
    def supported(self) -> bool:
        return self.kind in KINDS

    @property
    def rank(self) -> int | None:
        """The rank alpha is divided by (None for full-rank kinds, where alpha is not used)."""
        p, kind = self.parts, self.kind
        if kind == "lora" and "down" in p:
            return int(p["down"].shape[0])
        if kind == "loha" and "hada_w1_b" in p:
            return int(p["hada_w1_b"].shape[0])
        if kind == "lokr":
            for part in ("lokr_w1_b", "lokr_w2_b"):
                if part in p:
                    return int(p[part].shape[0])
        return None

    @property
    def alpha(self) -> float | None:
        a = self.parts.get("alpha")
        return float(a.float().item()) if a is not None else None

    @property
    def scale(self) -> float:
        """s = alpha / rank; a stored `scale` replaces it; no alpha (or alpha 0, as kohya reads it) or no rank: 1."""
        if "scale" in self.parts:
            return float(self.parts["scale"].float().item())
        alpha, rank = self.alpha, self.rank
        if self.kind in ("lora", "loha", "lokr") and alpha and rank:
            return alpha / rank
        return 1.0

    def check(self) -> None:
        """Refuse a module whose parts are incomplete, empty (a rank-0 factor has no change to give, and its
        shapes say nothing about the weight it is for), with an alpha or scale that is not one number, or not
        finite (NaN/inf factors would poison the model)."""
        if not self.supported:
            raise LoraError(f"module {self.name} is {self.kind}, which is not supported")
        needed = {"lora": ("up", "down"), "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
        missing = [part for part in needed.get(self.kind, ()) if part not in self.parts]
        if missing:
            raise LoraError(f"module {self.name} lacks {', '.join(missing)}")
        empty = [f"{part} {list(t.shape)}" for part, t in self.parts.items()
                 if part not in SCALAR_PARTS and not t.numel()]
        if empty:
            raise LoraError(f"module {self.name} has empty factors ({', '.join(empty)})")
        for part in SCALAR_PARTS:
            if part in self.parts and self.parts[part].numel() != 1:
                raise LoraError(f"module {self.name}'s {part} holds {self.parts[part].numel()} values, not one number")
        for part, t in self.parts.items():
            if t.is_floating_point() and t.device.type != "meta" and t.numel() and not all_finite(t):
                raise LoraError(f"module {self.name} has NaN or infinite values in {part}")

    def on_meta(self) -> LoraModule:
        """The same module with its float tensors on the meta device: shapes without data, for checks."""
        return LoraModule(self.name, {k: v if k in SCALAR_PARTS else v.to("meta") for k, v in self.parts.items()})

    @cached_property
    def raw_shape(self) -> tuple[int, ...] | None:
        """The shape of ΔW_raw as the factors give it (None for (IA)3, which takes W's shape); computed once.

        A plain LoRA's is read off its factors (`_matmul_to`'s rule); the other kinds run their ΔW on the meta
        device, whose first use imports sympy (over a second), which a bake of plain LoRAs then never pays.
        """
        if self.kind == "ia3" or not self.supported:
            return None
        p = self.parts
        if self.kind == "lora" and not any(part in p for part in ("mid", "bias")) and "up" in p and "down" in p:
            up, down = p["up"].shape, p["down"].shape
            if up and down and math.prod(up[1:]) == down[0]:
                return (up[0], *down[1:])
        return tuple(self.on_meta().raw_delta(torch.empty(0, device="meta")).shape)  # raises on mismatched factors

    def raw_delta(self, weight: torch.Tensor) -> torch.Tensor:
        """ΔW_raw in fp32 (unscaled), shaped like its factors say (reshaped to W by `delta`)."""
        try:
            raw = self._raw_delta(weight)
            if "bias" in self.parts:
                raw = raw + self.parts["bias"].float().reshape(raw.shape)
            return raw
        except RuntimeError as e:  # factors that do not multiply: up/down of different ranks, bad kernels
            shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in self.parts.items() if v.dim())
            raise LoraError(f"module {self.name} has factors of mismatched shapes ({shapes})") from e

    def _raw_delta(self, weight: torch.Tensor) -> torch.Tensor:
        p = {k: v.float() for k, v in self.parts.items() if v.is_floating_point()}
        kind = self.kind
        if kind == "lora":
            if "mid" in p:
                up, down = p["up"], p["down"]
                return torch.einsum("nmkl,on,mi->oikl", p["mid"], up.reshape(up.shape[0], -1),
                                    down.reshape(down.shape[0], -1))
            return _matmul_to(p["up"], p["down"])
        if kind == "loha":
            if "hada_t1" in p:
                return (tucker(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"])
                        * tucker(p["hada_t2"], p["hada_w2_a"], p["hada_w2_b"]))
            return _matmul_to(p["hada_w1_a"], p["hada_w1_b"]) * _matmul_to(p["hada_w2_a"], p["hada_w2_b"])
        if kind == "lokr":
            w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
            if "lokr_w2" in p:
                w2 = p["lokr_w2"]
            elif "lokr_t2" in p:
                w2 = tucker(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
            else:
                w2 = p["lokr_w2_a"] @ p["lokr_w2_b"]
            if w2.dim() == 4:
                w1 = w1.reshape(*w1.shape[:2], 1, 1)
            return torch.kron(w1, w2)
        if kind == "ia3":
            w = p["weight"].reshape(-1)
            flag = self.parts.get("on_input")
            on_input = flag is not None and bool(flag.reshape(-1)[0].item())
            shape = [1] * weight.dim()
            shape[1 if on_input else 0] = w.numel()
            return weight.float() * w.reshape(shape)
        if kind == "full":
            return p["diff"]
        if kind == "norm":
            return p["w_norm"]
        raise LoraError(f"module {self.name} is {kind}, which is not supported")

    def low_rank_factors(self, ratio: float = 1.0) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(up·ratio·scale [out, r], down [r, in·kh·kw]) in fp32 when ratio·ΔW is exactly their product (a plain
        LoRA/LoCon without Tucker mid, bias or DoRA), so a bake can add it with one fused multiply-add; else None.
        ratio·scale is one float64 product, so up is rounded once; new tensors, the module's parts untouched."""
        p = self.parts
        if self.kind != "lora" or any(part in p for part in ("mid", "bias", "dora_scale", "magnitude")):
            return None
        up, down = p["up"], p["down"]
        return (up.reshape(up.shape[0], -1).to(torch.float32, copy=True).mul_(ratio * self.scale),
                down.reshape(down.shape[0], -1).float())

    def delta(self, weight: torch.Tensor) -> torch.Tensor:
        """ΔW added to `weight` at strength 1, fp32, in W's shape (DoRA: the whole decomposed change).

        Works on meta tensors too, which is how shapes are checked before any output is written.
        """
        raw = self.raw_delta(weight)
        if raw.numel() != weight.numel():
            raise LoraError(f"module {self.name} makes a {list(raw.shape)} change for a {list(weight.shape)} weight")
        dw = raw.reshape(weight.shape) * self.scale
        dora = self.parts.get("dora_scale", self.parts.get("magnitude"))
        if dora is not None:
            dw = _decompose(weight.float(), dw, dora.float(), "magnitude" in self.parts)
        return dw

    def bias_delta(self, bias_shape: tuple[int, ...] | None) -> torch.Tensor | None:
        """The change to the weight's bias (full `diff_b`, norm `b_norm`) at strength 1, or None."""
        part = self.parts.get("diff_b", self.parts.get("b_norm"))
        if part is None:
            return None
        if bias_shape is None or part.numel() != _numel(bias_shape):
            where = "no bias" if bias_shape is None else f"a {list(bias_shape)} bias"
            raise LoraError(f"module {self.name} has a bias change of {list(part.shape)} but the weight has {where}")
        return part.float().reshape(bias_shape) * self.scale


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _decompose(w: torch.Tensor, dw: torch.Tensor, magnitude: torch.Tensor, rows: bool) -> torch.Tensor:
    """DoRA: W1 = W + ΔW rescaled to the stored magnitude; returns W1·m/‖W1‖ − W.

    The norm runs per input column when the magnitude is stored as [1, in, ...] (the WebUI's orientation) and per
    output row when it is [out, 1, ...] (LyCORIS `wd_on_out`) or PEFT's 1-D `lora_magnitude_vector`.
    """
    w1 = w + dw
    per_row = rows or magnitude.dim() < 2 or (magnitude.shape[0] == w.shape[0] and magnitude.shape[1] == 1)
    if per_row:
        norm = w1.reshape(w1.shape[0], -1).norm(dim=1).reshape(w1.shape[0], *[1] * (w1.dim() - 1))
        m = magnitude.reshape(norm.shape)
    else:
        norm = w1.transpose(0, 1).reshape(w1.shape[1], -1).norm(dim=1)
        norm = norm.reshape(1, w1.shape[1], *[1] * (w1.dim() - 2))
        m = magnitude.reshape(norm.shape)
    return w1 * (m / norm) - w


@dataclass
class LoraFile:
    """A LoRA file's modules (by stored module name), its metadata, and the keys that belong to no module."""

    path: Path | None
    name: str
    modules: dict[str, LoraModule]
    metadata: dict[str, str]
    unknown_keys: list[str]

    @property
    def kinds(self) -> list[str]:
        return sorted({m.kind for m in self.modules.values()})

    @property
    def ranks(self) -> list[int]:
        return sorted({r for m in self.modules.values() if (r := m.rank) is not None})

    def check(self) -> None:
        for module in self.modules.values():
            try:
                module.check()
            except LoraError as e:
                raise LoraError(f"LoRA {self.name}: {e}; the file is damaged or of an unsupported kind.") from None


def group_modules(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, LoraModule], list[str]]:
    """Group a flat tensor dict into modules; keys of no known part are returned separately."""
    modules: dict[str, LoraModule] = {}
    unknown: list[str] = []
    for key, tensor in tensors.items():
        split = split_key(key)
        if split is None:
            unknown.append(key)
            continue
        name, part = split
        modules.setdefault(name, LoraModule(name)).parts[part] = tensor
    return modules, unknown


def read_lora(path: str | Path, shapes_only: bool = False) -> LoraFile:
    """Read a whole LoRA file (they are small): .safetensors, or .pt/.ckpt through torch.load(weights_only=True).

    `shapes_only` gives meta tensors from a safetensors header without reading the data (kind, ranks and family
    need only shapes): the LoRA list reads a folder of SDXL LoRAs, hundreds of MB each, this way."""
    from ..io.checkpoint import open_checkpoint

    path = Path(path)
    if not path.exists():  # the reader would call it a model file
        raise LoraError(f"LoRA file {path} does not exist; check the name and folder.")
    with open_checkpoint(path) as ckpt:
        if shapes_only:
            tensors = {k: torch.empty(ckpt.shape(k), dtype=ckpt.dtype(k), device="meta") for k in ckpt.keys()}
        else:
            tensors = {k: ckpt.get(k) for k in ckpt.keys()}
        metadata = ckpt.metadata
    modules, unknown = group_modules(tensors)
    if not modules:
        raise LoraError(f"{path} holds no LoRA or LyCORIS module (no lora_up/lora_down, hada_, lokr_ ... tensors); "
                        f"it is not a LoRA file.")
    return LoraFile(path, path.stem, modules, metadata, unknown)
