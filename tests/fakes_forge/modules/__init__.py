"""A faithful fake of Stable Diffusion WebUI Forge's `modules` (HEAD dfdcbab6 semantics), for tests only.

Forge keeps most of A1111's `modules` surface, so every module not found here comes from the A1111 fake
(tests/fakes/modules). What differs is here: `sd_models` (the A1111 loading API stubbed out, `model_data` with
`forge_loading_parameters`/`forge_hash`, `forge_model_reload`) and `processing` (Forge's per-batch reset of
`forge_objects`, LoRAs applied through patchers), over a `ForgeDiffusionEngine`-like model (forge_model.py) that
is not an `nn.Module` and holds its weights in `forge_objects` with Forge's names.
"""

import os

__path__.append(os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "fakes", "modules"))
