"""The boundary between Block Merger and whatever runs it (the WebUI, or the standalone app).

The tab, the X/Y/Z plot and the API talk only to a `Host`; `a1111.A1111Host` implements it over the WebUI's
`modules`, `standalone.StandaloneHost` over a folder of models with no generation. Nothing here imports the WebUI.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class MergeIdentity:
    """How a merged model presents itself: the name shown as "Model" in infotexts, a short hash of its recipe,
    and the recipe JSON (written into infotexts and metadata)."""

    name: str
    short_hash: str
    recipe_json: str


@dataclass(frozen=True)
class LiveWeights:
    """The loaded model's own tensors, opened for a merge to be written straight into them (no second copy).

    `refused` says why this host cannot take a merge that way (then `tensors` is empty and the merge goes through
    `load_weights`, which builds the whole state)."""

    tensors: Mapping[str, torch.Tensor]  # checkpoint key -> the model's tensor, for every key a merge may write
    base: Path | None = None  # the checkpoint file the model was loaded from: weights are put back from there
    device: torch.device | None = None  # where the tensors live when not on the CPU (the merge computes there)
    refused: str = ""


@dataclass(frozen=True)
class GenerationRequest:
    """txt2img parameters; None/0 means "as in the WebUI's txt2img" where a host can tell."""

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 0
    sampler: str = ""
    cfg_scale: float = 0.0
    width: int = 0
    height: int = 0
    seed: int = -1
    batch_size: int = 1
    extra_params: Mapping[str, str] = field(default_factory=dict)  # added to the infotext
    batch_count: int = 0  # 0: 1
    scheduler: str = ""
    restore_faces: bool | None = None  # None: the WebUI's own setting
    tiling: bool | None = None
    styles: tuple[str, ...] = ()
    enable_hr: bool = False  # hires fix; its values below, 0/"" meaning the WebUI's defaults
    hr_scale: float = 0.0
    hr_upscaler: str = ""
    hr_steps: int = 0
    denoising_strength: float = 0.0
    #: several prompts generated as ONE batch (batch size = their count, one iteration; `prompt`, batch size and
    #: count are then unused): the plot's prompt3 cells
    prompts: tuple[str, ...] = ()


@dataclass
class GenerationResult:
    images: list[Any]  # PIL images
    infotexts: list[str]
    seed: int
    first_image: int = 0  # index of the first generated image (1 when the WebUI put the batch's grid first)


class Host(Protocol):
    """What Block Merger needs from its surroundings."""

    #: None when images can be generated; otherwise a one-line reason shown instead of the generation controls.
    generation_unavailable: str | None
    #: None when the merge can be loaded into a running model; otherwise why not.
    live_model_unavailable: str | None

    def list_models(self) -> list[str]:
        """Model names for the dropdowns (the WebUI's checkpoint titles, or file names)."""

    def resolve_model(self, name: str) -> Path:
        """The file of a model name from `list_models` (raise MergeError naming the model if unknown)."""

    def list_vaes(self) -> list[str]: ...
    def resolve_vae(self, name: str) -> Path: ...

    def models_folder(self) -> Path:
        """Where merged models are saved by default."""

    def lora_folder(self) -> Path:
        """Where LoRA files are listed from and LoRAs made by the LoRA tools are saved."""

    def list_loras(self) -> list[str]:
        """LoRA names (paths relative to `lora_folder`) for the LoRA list."""

    def resolve_lora(self, name: str) -> Path:
        """The file of a LoRA name, relative path or prompt stem (raise MergeError naming it if unknown)."""

    def history_path(self) -> Path: ...

    def live_weights(self) -> contextlib.AbstractContextManager[Mapping[str, torch.Tensor]]:
        """The loaded model's tensors by checkpoint key, for reading (the base of a comparison)."""

    def writable_weights(self, shapes: Mapping[str, tuple[int, ...]] | None = None,
                         ) -> contextlib.AbstractContextManager[LiveWeights]:
        """The loaded model's tensors to write a merge into (refused when they do not have `shapes`, or the host
        cannot); whatever wraps or patches them is taken off for the duration and put back after."""

    def weights_written(self, identity: MergeIdentity | None, keys: Collection[str]) -> None:
        """`keys` were written into the tensors of `writable_weights`: give the model `identity` (None: the base
        checkpoint's own) and refresh what depends on those weights."""

    def load_weights(self, state: Mapping[str, torch.Tensor], identity: MergeIdentity | None) -> None:
        """Load `state` (all keys, or only the changed ones) where `writable_weights` refuses (e.g. by rebuilding the
        model), and give the model `identity`. Raises MergeError and leaves the old weights on failure."""

    def restore_base(self) -> None:
        """Put the selected checkpoint's own weights back."""

    def loaded_identity(self) -> MergeIdentity | None:
        """The merge currently loaded, or None when the model is the plain checkpoint."""

    def generate(self, request: GenerationRequest) -> GenerationResult: ...

    def lock(self) -> contextlib.AbstractContextManager[None]:
        """The generation lock; tab handlers hold it while merging and generating. Never re-entered."""

    def job(self, title: str) -> contextlib.AbstractContextManager[None]:
        """One user-visible task (the WebUI's shared.state begin/end): clears a previous Stop, shows progress."""

    def progress(self, done: int, total: int, text: str) -> None:
        """Report progress where the user sees it."""

    def request_stop(self) -> None:
        """The user pressed Stop: the running task ends at its next check."""

    def interrupted(self) -> bool:
        """Whether the user pressed Stop/Interrupt during the current job."""

    def save_grid(self, image: Any, info: str) -> Path | None:
        """Save an X/Y/Z grid where the host saves grids; returns the path (None if grids are not saved)."""


def model_choices(host: Host, names: Sequence[str] = ()) -> list[str]:
    """Dropdown choices: the host's models, with any already-chosen names kept so a refresh never drops them."""
    available = host.list_models()
    return available + [n for n in names if n and n not in available]
