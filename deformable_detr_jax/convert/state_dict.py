"""transformers state dict <-> `DeformableDetrForObjectDetection` parameters.

A declarative table maps each NNX parameter path to its transformers key, plus one layout
transform per parameter kind (Linear `[out, in]` -> `[in, out]`; Conv OIHW -> HWIO).
Incoming keys are first normalised to the transformers-5 in-memory naming by
`formats.to_transformers` (hub files' timm-style backbone, `self_attn.out_proj`,
layer-level `fc1`/`fc2`, the original fundamentalvision names, and the mixed names
transformers 5 `save_pretrained` writes), and head copies a file left out are filled.

Heads that transformers ties (`class_embed.N`/`bbox_embed.N` without box refinement, the
`model.decoder.*_embed` copies) are one parameter here; their copies in a state dict must
equal the parameter they copy.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deformable_detr_jax.config import DeformableDetrConfig
from deformable_detr_jax.convert.errors import CheckpointKeyError
from deformable_detr_jax.convert.formats import fill_tied_heads, to_hub, to_transformers
from deformable_detr_jax.modeling import DeformableDetrForObjectDetection

# (pattern, replacement) from an NNX parameter path (dot-joined) to its transformers key.
NNX_TO_TRANSFORMERS: tuple[tuple[str, str], ...] = (
    (r"\.input_proj\.(\d+)\.conv\.", r".input_proj.\1.0."),
    (r"\.input_proj\.(\d+)\.norm\.", r".input_proj.\1.1."),
    (r"\.(kernel|scale|embedding)$", ".weight"),
)


# Parameters nothing uses, which a file may leave out (transformers 4's SwinBackbone had no
# `swin.layernorm`, transformers 5 ignores it missing): their initial value when absent.
UNUSED_DEFAULTS = {
    "model.backbone.model.swin.layernorm.weight": 1.0,
    "model.backbone.model.swin.layernorm.bias": 0.0,
}


def nnx_path_to_key(path: tuple) -> str:
    key = ".".join(str(p) for p in path)
    for pattern, replacement in NNX_TO_TRANSFORMERS:
        key = re.sub(pattern, replacement, key)
    return key


def to_nnx_layout(name: str, array: np.ndarray) -> np.ndarray:
    """torch layout -> NNX layout, by parameter kind."""
    if name == "kernel" and array.ndim == 2:  # Linear: (out, in) -> (in, out)
        return array.T
    if name == "kernel" and array.ndim == 4:  # Conv: OIHW -> HWIO
        return array.transpose(2, 3, 1, 0)
    return array


def to_torch_layout(name: str, array: np.ndarray) -> np.ndarray:
    """NNX layout -> torch layout, by parameter kind (the inverse of `to_nnx_layout`)."""
    if name == "kernel" and array.ndim == 2:
        return array.T
    if name == "kernel" and array.ndim == 4:  # HWIO -> OIHW
        return array.transpose(3, 2, 0, 1)
    return array


def tied_copies(config: DeformableDetrConfig) -> dict[str, str]:
    """transformers key prefix of each tied copy -> the prefix of the parameter it copies."""
    copies = {}
    n = config.num_decoder_predictions
    if not config.with_box_refine:
        for i in range(1, n):
            copies[f"class_embed.{i}."] = "class_embed.0."
            copies[f"bbox_embed.{i}."] = "bbox_embed.0."
    else:
        for i in range(n):
            copies[f"model.decoder.bbox_embed.{i}."] = f"bbox_embed.{i}."
    if config.two_stage:
        for i in range(n):
            copies[f"model.decoder.class_embed.{i}."] = f"class_embed.{i}."
    return copies


def _source_of(key: str, copies: Mapping[str, str]) -> str | None:
    for copy, source in copies.items():
        if key.startswith(copy):
            return source + key[len(copy) :]
    return None


def abstract_model(config: DeformableDetrConfig) -> DeformableDetrForObjectDetection:
    """The model with shape-only parameters (no random initialisation work)."""
    return nnx.eval_shape(lambda: DeformableDetrForObjectDetection(config, rngs=nnx.Rngs(0)))


def fresh_rng_value(variable: nnx.RngState, index: int) -> jax.Array:
    """A value for a dropout RNG variable of an abstract model: a new key, or a zero count."""
    if isinstance(variable, nnx.RngKey):
        return jax.random.fold_in(jax.random.key(0), index)
    return jnp.zeros(variable.shape, variable.dtype)


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray],
    config: DeformableDetrConfig,
    *,
    dtype=jnp.float32,
) -> DeformableDetrForObjectDetection:
    """Builds the NNX model holding the weights of a transformers state dict.

    Args:
      state_dict: key -> numpy array (or anything `np.asarray` accepts), in the hub
        naming (timm-style backbone), the transformers 5 naming or the original one.
      config: the model's config (`DeformableDetrConfig.from_hf(config.json)`).
      dtype: parameter dtype (float32; float64 needs `jax_enable_x64`).

    Raises:
      CheckpointKeyError: listing every missing, unexpected and mis-shaped key, and tied
        copies that differ from the parameter they copy.
    """
    variant = {
        "with_box_refine": config.with_box_refine,
        "two_stage": config.two_stage,
        "decoder_layers": config.decoder_layers,
    }
    weights = to_transformers(fill_tied_heads(to_hub(state_dict), variant))
    copies = tied_copies(config)
    graphdef, state = nnx.split(abstract_model(config))
    flat = nnx.to_flat_state(state)

    missing, misshaped, values = [], [], []
    used = set()
    for index, (path, variable) in enumerate(flat):
        if isinstance(variable, nnx.RngState):  # dropout streams: fresh keys, not weights
            values.append((path, variable, fresh_rng_value(variable, index)))
            continue
        key = nnx_path_to_key(path)
        name = str(path[-1])
        expected = tuple(variable.shape)
        if key not in weights and key in UNUSED_DEFAULTS:
            values.append((path, variable, np.full(expected, UNUSED_DEFAULTS[key])))
            continue
        if key not in weights:
            missing.append(key)
            continue
        used.add(key)
        array = to_nnx_layout(name, np.asarray(weights[key]))
        if array.shape != expected:
            misshaped.append(
                f"{key}: checkpoint {tuple(np.shape(weights[key]))}, model expects "
                f"{to_torch_layout(name, np.zeros(expected, np.int8)).shape}"
            )
        values.append((path, variable, array))

    unexpected, differing = [], []
    for key in weights:
        if key in used:
            continue
        source = _source_of(key, copies)
        if source is None or source not in weights:
            unexpected.append(key)
        elif np.shape(weights[key]) != np.shape(weights[source]) or not np.array_equal(
            np.asarray(weights[key]), np.asarray(weights[source])
        ):
            differing.append(f"{key} differs from {source}")

    problems = []
    for title, keys in (
        ("missing from the checkpoint", missing),
        ("not in the model", unexpected),
        ("with the wrong shape", misshaped),
        ("tied copies that differ (this config shares them)", differing),
    ):
        if keys:
            problems.append(f"{len(keys)} key(s) {title}:\n  " + "\n  ".join(sorted(keys)))
    if problems:
        raise CheckpointKeyError(
            f"state dict does not fit the {config.variant} model "
            f"(with_box_refine={config.with_box_refine}, two_stage={config.two_stage}, "
            f"num_feature_levels={config.num_feature_levels}):\n" + "\n".join(problems)
        )

    new_flat = [
        (path, var.replace(array if isinstance(var, nnx.RngState) else jnp.asarray(array, dtype)))
        for path, var, array in values
    ]
    return nnx.merge(graphdef, nnx.from_flat_state(new_flat))


def export_state_dict(
    model: DeformableDetrForObjectDetection, *, tied_copies_included: bool = True
) -> dict[str, np.ndarray]:
    """The transformers-5 state dict (numpy, torch layouts) of a model.

    With `tied_copies_included`, the keys transformers stores for tied heads are written
    too (as `DeformableDetrForObjectDetection.state_dict()` has them).
    """
    out = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))):
        array = np.asarray(jax.device_get(variable[...]))
        out[nnx_path_to_key(path)] = to_torch_layout(str(path[-1]), array)
    if tied_copies_included:
        for copy, source in tied_copies(model.config).items():
            for key in [k for k in out if k.startswith(source)]:
                out[copy + key[len(source) :]] = out[key]
    return out
