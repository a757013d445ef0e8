"""modules.lowvram (v1.10.1 semantics) on the fake's CPU.

With --medvram/--lowvram the model stays on the CPU except the one part last used (`module_in_gpu`), moved to the
GPU by forward pre-hooks; `send_everything_to_cpu` moves it back. The fake has no GPU, but it keeps what matters to
a merger: a move gives the part's parameters new storage (as `.to(device)` does), so tensors taken before
`send_everything_to_cpu` are no longer the model's.
"""

import torch

module_in_gpu = None
calls = []


def is_needed(sd_model):
    return False


def _move(module):
    """A device move on a CPU-only box: same values, new storage for every parameter and buffer."""
    with torch.no_grad():
        for p in module.parameters():
            p.data = p.data.clone()
        for name, buf in list(module.named_buffers()):
            owner_path, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_path) if owner_path else module
            setattr(owner, leaf, buf.clone())


def send_me_to_gpu(module):
    """What the forward pre-hooks do before a part runs (fake-only name: the real hook is a closure)."""
    global module_in_gpu
    if module_in_gpu is module:
        return
    if module_in_gpu is not None:
        _move(module_in_gpu)
    _move(module)
    module_in_gpu = module


def send_everything_to_cpu():
    global module_in_gpu
    calls.append("send_everything_to_cpu")
    if module_in_gpu is not None:
        _move(module_in_gpu)
    module_in_gpu = None
