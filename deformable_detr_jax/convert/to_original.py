"""hub (or transformers) naming -> the fundamentalvision naming, for export.

Above both `formats` (the key tables) and `variant` (the architecture read off the keys): the
tied head copies the original model expects depend on the architecture.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from deformable_detr_jax.convert.backbone_variant import backbone_kind
from deformable_detr_jax.convert.errors import CheckpointFormatError, CheckpointKeyError
from deformable_detr_jax.convert.formats import (
    ORIGINAL_FUSED,
    ORIGINAL_TO_HUB,
    fill_tied_heads,
    rename_key,
    transformers_to_hub,
)
from deformable_detr_jax.convert.variant import infer_variant


def hub_to_original(
    state_dict: Mapping[str, Any], variant: Mapping[str, Any] | None = None
) -> dict[str, np.ndarray]:
    """hub (or transformers) naming -> the fundamentalvision state dict, for export.

    Tied head copies missing from the input are filled first (`fill_tied_heads`), since
    the original model's `load_state_dict` expects every copy. `variant` (from
    `infer_variant`, or a config's fields) gives decoder_layers / with_box_refine /
    two_stage; inferred from the weights when omitted.

    Raises:
      CheckpointKeyError: keys with no original name, incomplete q/k/v triples.
      CheckpointFormatError: a ConvNeXt or Swin backbone (the original has only ResNets).
    """
    hub = transformers_to_hub(state_dict)
    kind = backbone_kind(hub)
    if kind != "resnet":
        raise CheckpointFormatError(
            f"the original (fundamentalvision) naming has only ResNet backbones, this model's is "
            f"{kind}; write it in transformers' naming (save_pytorch_checkpoint)"
        )
    if variant is None:
        variant = infer_variant(hub)
    hub = fill_tied_heads(hub, variant)
    out, missing, unexpected = {}, [], []
    consumed = set()
    for fused, parts in ORIGINAL_FUSED:
        for key in hub:
            hit = parts[0].match(key)
            if hit is None:
                continue
            names = [p.format(hit[0]) for p in parts]
            absent = [n for n in names if n not in hub]
            if absent:
                missing.extend(absent)
                continue
            # q, k, v rows -> (3 * d_model, ...)
            out[fused.format(hit[0])] = np.concatenate([np.asarray(hub[n]) for n in names])
            consumed.update(names)
    for key, value in hub.items():
        if key in consumed:
            continue
        new_key = rename_key(key, ORIGINAL_TO_HUB, reverse=True)
        if new_key is None:
            unexpected.append(key)
        else:
            out[new_key] = value
    if missing or unexpected:
        raise CheckpointKeyError.from_problems(
            "state dict for the original naming", missing=missing, unexpected=unexpected
        )
    return out
