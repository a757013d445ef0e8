"""Reading and writing checkpoints: the one import the rest of the package uses.

The work is split by concern into small modules (format, read, write, save options, metadata/names); this
module gathers their public names so callers depend on one stable place.
"""

from .format import ST_TO_TORCH, TORCH_TO_ST, CheckpointError
from .metadata import default_output_name, merge_metadata, validate_custom_name
from .read import (
    PICKLE_EXTS,
    SAFETENSORS_EXTS,
    Checkpoint,
    DictCheckpoint,
    SafetensorsCheckpoint,
    TorchCheckpoint,
    open_checkpoint,
    webui_key_names,
)
from .save_options import (
    CLIP_POSITION_ID_KEYS,
    SAVE_DTYPES,
    SaveOptions,
    clip_id_problems,
    converted_dtype,
    finalize_tensor,
    is_kept,
    model_config,
    open_vae,
    plan_output,
    precision_warnings,
)
from .write import (
    SAVE_EXTS,
    SafetensorsStreamWriter,
    atomic_output,
    check_output_path,
    save_state_dict,
)

__all__ = [
    "CLIP_POSITION_ID_KEYS",
    "model_config",
    "PICKLE_EXTS",
    "SAFETENSORS_EXTS",
    "SAVE_DTYPES",
    "SAVE_EXTS",
    "ST_TO_TORCH",
    "TORCH_TO_ST",
    "Checkpoint",
    "CheckpointError",
    "DictCheckpoint",
    "SafetensorsCheckpoint",
    "SafetensorsStreamWriter",
    "SaveOptions",
    "TorchCheckpoint",
    "atomic_output",
    "check_output_path",
    "clip_id_problems",
    "converted_dtype",
    "default_output_name",
    "finalize_tensor",
    "is_kept",
    "merge_metadata",
    "open_checkpoint",
    "open_vae",
    "plan_output",
    "precision_warnings",
    "save_state_dict",
    "validate_custom_name",
    "webui_key_names",
]
