"""Checkpoint import/export: file readers (no torch), key maps between namings, variants.

Readers: `read_state_dict(path)` picks safetensors / torch zip / legacy torch by content.
Key maps: hub (timm backbone), transformers 5 (HF ResNet backbone) and the original
fundamentalvision naming, see `formats`. Variants: `infer_variant(state_dict)` reads the
architecture off the shapes; `check_config_against_variant` reports every contradiction.
One call: `load_pytorch_checkpoint(path_or_folder)` -> model; `save_pytorch_checkpoint(model,
folder)` writes a transformers folder (see `loading`). Model names: `resolve_model(name)`, a
local path or a Hugging Face hub id downloaded into huggingface_hub's cache (see `hub`).
CLI: `python -m deformable_detr_jax.convert`.
"""

from deformable_detr_jax.convert.errors import (
    CheckpointError,
    CheckpointFormatError,
    CheckpointKeyError,
    ConfigMismatchError,
    HubError,
    HubFileNotFoundError,
    HubRepoNotFoundError,
    HubRevisionNotFoundError,
    HubUnreachableError,
    UnsafeCheckpointError,
)
from deformable_detr_jax.convert.formats import (
    FORMATS,
    detect_format,
    fill_tied_heads,
    hub_to_transformers,
    original_to_hub,
    to_hub,
    to_transformers,
    transformers_to_hub,
)
from deformable_detr_jax.convert.hub import download_model, is_hub_id, resolve_model
from deformable_detr_jax.convert.loading import (
    ImportedCheckpoint,
    export_transformers_checkpoint,
    import_pytorch_checkpoint,
    load_pytorch_checkpoint,
    read_processor,
    save_pytorch_checkpoint,
)
from deformable_detr_jax.convert.readers import (
    read_checkpoint,
    read_safetensors,
    read_state_dict,
    read_torch_legacy,
    read_torch_zip,
    sniff_format,
)
from deformable_detr_jax.convert.to_original import hub_to_original
from deformable_detr_jax.convert.variant import (
    check_config_against_variant,
    config_fields,
    infer_variant,
    variant_from_original_args,
)

__all__ = [
    "CheckpointError",
    "CheckpointFormatError",
    "CheckpointKeyError",
    "ConfigMismatchError",
    "HubError",
    "HubFileNotFoundError",
    "HubRepoNotFoundError",
    "HubRevisionNotFoundError",
    "HubUnreachableError",
    "UnsafeCheckpointError",
    "read_checkpoint",
    "read_safetensors",
    "read_state_dict",
    "read_torch_legacy",
    "read_torch_zip",
    "sniff_format",
    "FORMATS",
    "detect_format",
    "fill_tied_heads",
    "hub_to_original",
    "hub_to_transformers",
    "original_to_hub",
    "to_hub",
    "to_transformers",
    "transformers_to_hub",
    "check_config_against_variant",
    "config_fields",
    "infer_variant",
    "variant_from_original_args",
    "ImportedCheckpoint",
    "export_transformers_checkpoint",
    "import_pytorch_checkpoint",
    "load_pytorch_checkpoint",
    "read_processor",
    "save_pytorch_checkpoint",
    "download_model",
    "is_hub_id",
    "resolve_model",
]
