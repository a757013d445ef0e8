"""The built-in Lora extension's `networks` module (extensions-builtin/Lora, on sys.path in the WebUI), reduced to
the weight patching a merger meets.

Applying LoRAs keeps a CPU backup of each patched module's weight and bias the first time; when the set of LoRAs
changes, the module is first restored from that backup. `load_state_dict` resets the backups (lora_patches); a raw
`param.copy_` does not, so after such a copy a later LoRA change would "restore" the pre-merge weights.
"""

import torch


def _delta(module, name):
    g = torch.Generator().manual_seed(abs(hash(name)) % (2**31))
    w = module.weight
    return (torch.randn(w.shape, generator=g) * 0.01).to(w.dtype)


def network_reset_cached_weight(module):
    """Forget the backups of the pre-LoRA weights (what the patched `_load_from_state_dict` calls)."""
    module.network_current_names = ()
    module.network_weights_backup = None
    module.network_bias_backup = None


def _restore(obj, field, backup):
    if backup is None:
        setattr(obj, field, None)
        return
    getattr(obj, field).copy_(backup)


def network_restore_weights_from_backup(module):
    """Put the pre-LoRA weight and bias back (a module without a bias backup ends up without a bias, as in the
    real extension, which always backs up an existing bias together with the weight)."""
    weights_backup = getattr(module, "network_weights_backup", None)
    bias_backup = getattr(module, "network_bias_backup", None)
    if weights_backup is None and bias_backup is None:
        return
    if weights_backup is not None:
        _restore(module, "weight", weights_backup)
    _restore(module, "bias", bias_backup)


def network_apply_weights(module, wanted_names):
    current_names = getattr(module, "network_current_names", ())
    with torch.no_grad():
        if getattr(module, "network_weights_backup", None) is None and wanted_names != ():
            module.network_weights_backup = module.weight.detach().to("cpu", copy=True)
            bias = getattr(module, "bias", None)
            module.network_bias_backup = bias.detach().to("cpu", copy=True) if bias is not None else None
        if current_names != wanted_names:
            network_restore_weights_from_backup(module)
            for name in wanted_names:
                module.weight.add_(_delta(module, name))
            module.network_current_names = wanted_names
