"""The host of `python -m lib_merge ui`: a folder of models, no WebUI, no loaded model."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from ..core.errors import MergeError
from ..lora.files import find_lora, list_lora_files
from .base import GenerationRequest, GenerationResult, LiveWeights, MergeIdentity

MODEL_EXTS = (".safetensors", ".ckpt", ".pt", ".pth")


class StandaloneHost:
    """The host of `python -m lib_merge ui`: models from one folder, merges saved there; no model is loaded, so
    nothing can be generated or swapped in."""

    generation_unavailable = "Generating images needs the Stable Diffusion WebUI; here models can be merged and saved."
    live_model_unavailable = "No model is loaded outside the WebUI; save the merge to use it."

    def __init__(self, folder: Path, data_dir: Path | None = None, lora_dir: Path | None = None):
        self.folder = Path(folder)
        self.data_dir = Path(data_dir) if data_dir else self.folder
        # LoRAs: the given folder, else a "Lora" folder inside the models folder (as the WebUI's models/Lora); never
        # the models folder itself, whose checkpoints the LoRA list would read whole
        self.loras = Path(lora_dir) if lora_dir else self.folder / "Lora"
        self._stop = False

    def _files(self) -> list[Path]:
        """Checkpoint-like files of the models folder, without the LoRA folder's (a LoRA is not a model to merge)."""
        if not self.folder.is_dir():
            return []
        loras = self.loras.resolve()
        return sorted(p for p in self.folder.rglob("*") if p.suffix.lower() in MODEL_EXTS and p.is_file()
                      and loras not in p.resolve().parents)

    def list_models(self) -> list[str]:
        return [str(p.relative_to(self.folder)) for p in self._files() if "vae" not in p.name.lower()]

    def list_vaes(self) -> list[str]:
        return [str(p.relative_to(self.folder)) for p in self._files() if "vae" in p.name.lower()]

    def _resolve(self, name: str, kind: str) -> Path:
        path = (self.folder / name).resolve()
        if self.folder.resolve() not in path.parents or not path.is_file():
            raise MergeError(f"Unknown {kind} {name!r}; choose one from {self.folder}.")
        return path

    def resolve_model(self, name: str) -> Path:
        return self._resolve(name, "model")

    def resolve_vae(self, name: str) -> Path:
        return self._resolve(name, "VAE")

    def models_folder(self) -> Path:
        return self.folder

    def history_path(self) -> Path:
        return self.data_dir / "mergehistory.csv"

    def lora_folder(self) -> Path:
        return self.loras

    def list_loras(self) -> list[str]:
        return list_lora_files(self.loras)

    def resolve_lora(self, name: str) -> Path:
        return find_lora(self.loras, name)

    @contextlib.contextmanager
    def live_weights(self) -> Iterator[Mapping[str, torch.Tensor]]:
        raise MergeError(self.live_model_unavailable)
        yield {}  # pragma: no cover

    @contextlib.contextmanager
    def writable_weights(self, shapes=None) -> Iterator[LiveWeights]:
        yield LiveWeights({}, refused=self.live_model_unavailable or "(This host does not expose its model's tensors: "
                                                                       "the merge was handed over whole.)")

    def weights_written(self, identity, keys) -> None:
        raise MergeError(self.live_model_unavailable)

    def load_weights(self, state, identity) -> None:
        raise MergeError(self.live_model_unavailable)

    def restore_base(self) -> None:
        raise MergeError(self.live_model_unavailable)

    def loaded_identity(self) -> MergeIdentity | None:
        return None

    def generate(self, request: GenerationRequest) -> GenerationResult:
        raise MergeError(self.generation_unavailable)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        yield

    @contextlib.contextmanager
    def job(self, title: str) -> Iterator[None]:
        self._stop = False
        yield

    def progress(self, done: int, total: int, text: str) -> None:
        pass

    def request_stop(self) -> None:
        self._stop = True

    def interrupted(self) -> bool:
        return self._stop

    def save_grid(self, image, info: str) -> Path | None:
        return None
