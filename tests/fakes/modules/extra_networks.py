"""`modules.extra_networks` reduced to a test handle: apply a set of LoRAs to the model as a generation with
<lora:...> in its prompt does (through the fake Lora extension, `networks`)."""

import networks
from modules.fake_model import LORA_TYPES


def activate(sd_model, names=()):
    """Apply the LoRAs `names` (a tuple) to every patchable module, as a generation with <lora:...> does."""
    for module in sd_model.modules():
        if isinstance(module, LORA_TYPES):
            networks.network_apply_weights(module, tuple(names))


def backups(sd_model):
    return [m for m in sd_model.modules() if isinstance(m, LORA_TYPES) and m.network_weights_backup is not None]
