"""The built-in Lora extension's weight patching, reduced to what matters for a merger (networks.py).

Applying a LoRA keeps a backup of each patched module's weights the first time; when the set of LoRAs changes, the
module is first restored from that backup. `load_state_dict` resets the backup (lora_patches); a raw
`param.copy_` does not, so after such a copy a later LoRA change would "restore" the pre-merge weights.
"""

import torch
from modules.fake_model import LORA_TYPES


def _delta(module, name):
    g = torch.Generator().manual_seed(abs(hash(name)) % (2**31))
    w = module.weight
    return (torch.randn(w.shape, generator=g) * 0.01).to(w.dtype)


def network_apply_weights(module, wanted_names):
    current_names = getattr(module, "network_current_names", ())
    backup = getattr(module, "network_weights_backup", None)
    with torch.no_grad():
        if backup is None and wanted_names != ():
            module.network_weights_backup = backup = module.weight.detach().clone()
        if current_names != wanted_names:
            if backup is not None:
                module.weight.copy_(backup)
            for name in wanted_names:
                module.weight.add_(_delta(module, name))
            module.network_current_names = wanted_names


def activate(sd_model, names=()):
    """Apply the LoRAs `names` (a tuple) to every patchable module, as a generation with <lora:...> does."""
    for module in sd_model.modules():
        if isinstance(module, LORA_TYPES):
            network_apply_weights(module, tuple(names))


def backups(sd_model):
    return [m for m in sd_model.modules() if isinstance(m, LORA_TYPES) and m.network_weights_backup is not None]
