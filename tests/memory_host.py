"""A Host for service and plot tests: models in a folder, a "loaded model" held as a dict of tensors, and images
computed from the weights actually loaded (so a test can tell which merge produced an image)."""

from __future__ import annotations

import contextlib
import hashlib
import threading
from pathlib import Path

import torch
from PIL import Image

from lib_merge.hosts.base import GenerationResult
from lib_merge.hosts.standalone import StandaloneHost
from lib_merge.io.checkpoint import open_checkpoint

PROBE_KEYS = (
    "model.diffusion_model.input_blocks.1.1.proj_in.weight",
    "model.diffusion_model.output_blocks.4.1.proj_out.weight",
    "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight",
)


def weights_digest(state, keys=PROBE_KEYS) -> str:
    h = hashlib.sha256()
    for key in keys:
        h.update(state[key].detach().float().numpy().tobytes())
    return h.hexdigest()


class MemoryHost(StandaloneHost):
    generation_unavailable = None
    live_model_unavailable = None

    def __init__(self, folder: Path, base: str):
        super().__init__(folder)
        self.base_name = base
        with open_checkpoint(self.resolve_model(base)) as ckpt:
            self.live = {k: ckpt.get(k).clone() for k in ckpt.keys()}
        self.identity = None
        self.loads: list[int] = []  # number of tensors handed over per load
        self.generated: list[tuple[str, int, str]] = []  # (weights digest, seed, prompt) per image
        self.batches: list[int] = []  # images per generate call
        self._lock = threading.Lock()
        self._owner: int | None = None

    def live_weights(self):
        return contextlib.nullcontext(self.live)

    def load_weights(self, state, identity) -> None:
        for key, value in state.items():
            if key in self.live:
                self.live[key].copy_(value)
        self.loads.append(len(state))
        self.identity = identity

    def restore_base(self) -> None:
        with open_checkpoint(self.resolve_model(self.base_name)) as ckpt:
            for key in ckpt.keys():
                self.live[key].copy_(ckpt.get(key))
        self.identity = None

    def loaded_identity(self):
        return self.identity

    def generate(self, request):
        """One image (or one per prompt of `request.prompts`, seeds counting up as in a WebUI batch)."""
        digest = weights_digest(self.live)
        images, infos = [], []
        for i, prompt in enumerate(request.prompts or (request.prompt,)):
            seed = request.seed + i
            self.generated.append((digest, seed, prompt))
            colour = tuple(int(digest[j:j + 2], 16) for j in (0, 2, 4))
            shade = (seed * 37) % 256
            image = Image.new("RGB", (64, 48), colour)
            image.paste((shade, shade, shade), (0, 0, 16, 16))
            images.append(image)
            infos.append(f"{prompt}\nSeed: {seed}, " + ", ".join(f"{k}: {v}" for k, v in request.extra_params.items()))
        self.batches.append(len(images))
        return GenerationResult(images, infos, request.seed)

    @contextlib.contextmanager
    def lock(self):
        if self._owner == threading.get_ident():
            raise RuntimeError("lock taken twice (the WebUI's queue lock is not re-entrant)")
        with self._lock:
            self._owner = threading.get_ident()
            try:
                yield
            finally:
                self._owner = None


def base_digest(folder: Path, name: str) -> str:
    with open_checkpoint(folder / name) as ckpt:
        return weights_digest({k: ckpt.get(k) for k in PROBE_KEYS})


def as_float(state) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in state.items()}
