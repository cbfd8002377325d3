"""Key maps between the three namings of Deformable DETR weights, as tables.

- **hub**: the `SenseTime/deformable-detr*` files (transformers 4 naming, timm ResNet):
  `model.backbone.conv_encoder.model.layer1.0.conv1.weight`, `...bn1.running_mean`,
  `...downsample.0/1`, decoder `self_attn.out_proj`, FFN `layers.N.fc1/fc2`.
- **transformers**: transformers 5 in memory (HF ResNet backbone):
  `model.backbone.model.embedder.embedder.convolution.weight`,
  `model.backbone.model.encoder.stages.S.layers.B.layer.K.convolution/normalization`,
  `shortcut.convolution/normalization`, `self_attn.o_proj`, `layers.N.mlp.fc1/fc2`.
  `save_pretrained` writes a mix ("saved layout"): HF ResNet names under
  `model.backbone.conv_encoder.model.`, with `out_proj` and `layers.N.fc1`.
  `transformers_to_hub` accepts every mix; `detect_format` calls them all "transformers".
- ConvNeXt and Swin backbones (`backbone_config` model_type "convnext" / "swin") have one
  naming under each prefix, transformers' module names, except that transformers 5 writes (and
  transformers 4 had) a Swin's under their old names: no `swin.` level for `embeddings` /
  `encoder`, `attention.self.query|key|value|relative_position_bias_table`,
  `attention.output.dense`, `intermediate.dense`, `output.dense` (`SWIN_V4_TO_V5`); the "hub"
  naming keeps those.
- **original**: fundamentalvision/Deformable-DETR `checkpoint["model"]`
  (`backbone.0.body.*`, `transformer.*`, `query_embed`, `cross_attn`, `linear1/2`,
  `norm1/2/3`, fused decoder self-attention `in_proj_weight`/`in_proj_bias`).

Each table row is a pair of key templates that are inverse renames of each other: literal
text, `{i}` for an index, `{s+1}` for an index shifted by one (timm `layer1` is HF
`stages.0`). A template ending in "." renames a key prefix and keeps the rest. One table
serves both directions. The layout transforms are the q/k/v split of the fused
self-attention projection and the tied head copies (`fill_tied_heads`).

ORIGINAL_TO_HUB is the single source of truth for the original naming, reconstructed
from fundamentalvision's `models/deformable_transformer.py` (layer attribute order) and
checked against transformers' `convert_deformable_detr_to_pytorch.py`. The norms:

| layer   | original                     | hub                                 |
| ------- | ---------------------------- | ----------------------------------- |
| encoder | `self_attn` (MSDA)           | `self_attn`                         |
| encoder | `norm1` (after self-attn)    | `self_attn_layer_norm`              |
| encoder | `linear1`, `linear2`         | `fc1`, `fc2`                        |
| encoder | `norm2` (after the FFN)      | `final_layer_norm`                  |
| decoder | `self_attn.in_proj_*` (q;k;v)| `self_attn.{q,k,v}_proj`            |
| decoder | `self_attn.out_proj`         | `self_attn.out_proj`                |
| decoder | `norm2` (after self-attn)    | `self_attn_layer_norm`              |
| decoder | `cross_attn` (MSDA)          | `encoder_attn`                      |
| decoder | `norm1` (after cross-attn)   | `encoder_attn_layer_norm`           |
| decoder | `linear1`, `linear2`         | `fc1`, `fc2`                        |
| decoder | `norm3` (after the FFN)      | `final_layer_norm`                  |
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from deformable_detr_jax.convert.errors import CheckpointFormatError, CheckpointKeyError

_FIELD = re.compile(r"\{(\w+)([+-]\d+)?\}")


class KeyTemplate:
    """`"layer{s+1}.{b}.conv{k+1}."`: matches a key, binding s, b, k; formats one back."""

    def __init__(self, text: str):
        self.text = text
        self.shifts: dict[str, int] = {}
        pattern, pos = "", 0
        for m in _FIELD.finditer(text):
            pattern += re.escape(text[pos : m.start()]) + f"(?P<{m[1]}>\\d+)"
            self.shifts[m[1]] = int(m[2] or 0)
            pos = m.end()
        self.is_prefix = text.endswith(".")
        pattern += re.escape(text[pos:]) + ("(?P<_rest>.*)" if self.is_prefix else "")
        self.regex = re.compile(pattern)

    def match(self, key: str) -> tuple[dict[str, int], str] | None:
        m = self.regex.fullmatch(key)
        if m is None:
            return None
        fields = {name: int(m[name]) - shift for name, shift in self.shifts.items()}
        if min(fields.values(), default=0) < 0:
            return None
        return fields, m["_rest"] if self.is_prefix else ""

    def format(self, fields: Mapping[str, int], rest: str = "") -> str:
        return _FIELD.sub(lambda m: str(fields[m[1]] + int(m[2] or 0)), self.text) + rest


RenameTable = tuple[tuple[KeyTemplate, KeyTemplate], ...]


def _table(rows: Iterable[tuple[str, str]], prefix_a: str = "", prefix_b: str = "") -> RenameTable:
    return tuple((KeyTemplate(prefix_a + a), KeyTemplate(prefix_b + b)) for a, b in rows)


# Where hub files keep the timm / torchvision ResNet body.
HUB_BACKBONE_PREFIX = "model.backbone.conv_encoder.model."

# timm / torchvision ResNet  <->  transformers ResNetBackbone (under the same prefix).
RESNET_TIMM_TO_HF = _table(
    (
        ("conv1.", "embedder.embedder.convolution."),
        ("bn1.", "embedder.embedder.normalization."),
        ("layer{s+1}.{b}.conv{k+1}.", "encoder.stages.{s}.layers.{b}.layer.{k}.convolution."),
        ("layer{s+1}.{b}.bn{k+1}.", "encoder.stages.{s}.layers.{b}.layer.{k}.normalization."),
        ("layer{s+1}.{b}.downsample.0.", "encoder.stages.{s}.layers.{b}.shortcut.convolution."),
        ("layer{s+1}.{b}.downsample.1.", "encoder.stages.{s}.layers.{b}.shortcut.normalization."),
    ),
    HUB_BACKBONE_PREFIX,
    HUB_BACKBONE_PREFIX,
)

# Swin backbone: transformers 4 names (what transformers 5 `save_pretrained` writes too; no
# `swin.` level, `attention.self.query`, `intermediate.dense`, ...)  <->  transformers 5 in memory.
# Before the generic backbone row below; ConvNeXt's names are the same in both.
_SWIN_BLOCK_V4, _SWIN_BLOCK_V5 = (
    "encoder.layers.{s}.blocks.{b}.",
    "swin.encoder.layers.{s}.blocks.{b}.",
)
SWIN_V4_TO_V5 = _table(
    (
        ("embeddings.patch_embeddings.projection.", "swin.embeddings.patch_embeddings.projection."),
        ("embeddings.norm.", "swin.embeddings.norm."),
        *(
            (f"{_SWIN_BLOCK_V4}{v4}", f"{_SWIN_BLOCK_V5}{v5}")
            for v4, v5 in (
                ("attention.self.query.", "attention.q_proj."),
                ("attention.self.key.", "attention.k_proj."),
                ("attention.self.value.", "attention.v_proj."),
                (
                    "attention.self.relative_position_bias_table",
                    "attention.relative_position_bias.relative_position_bias_table",
                ),
                ("attention.output.dense.", "attention.o_proj."),
                ("intermediate.dense.", "mlp.fc1."),
                ("output.dense.", "mlp.fc2."),
            )
        ),
        ("encoder.layers.{s}.", "swin.encoder.layers.{s}."),
    ),
    HUB_BACKBONE_PREFIX,
    "model.backbone.model.",
)

# transformers 4 / saved-file module names  <->  transformers 5 in-memory module names.
TRANSFORMERS_V4_TO_V5 = SWIN_V4_TO_V5 + _table(
    (
        ("model.backbone.conv_encoder.model.", "model.backbone.model."),
        ("model.backbone.position_embedding.", "model.position_embedding."),
        ("model.encoder.layers.{i}.fc1.", "model.encoder.layers.{i}.mlp.fc1."),
        ("model.encoder.layers.{i}.fc2.", "model.encoder.layers.{i}.mlp.fc2."),
        ("model.decoder.layers.{i}.fc1.", "model.decoder.layers.{i}.mlp.fc1."),
        ("model.decoder.layers.{i}.fc2.", "model.decoder.layers.{i}.mlp.fc2."),
        (
            "model.decoder.layers.{i}.self_attn.out_proj.",
            "model.decoder.layers.{i}.self_attn.o_proj.",
        ),
    )
)

# fundamentalvision  <->  hub. Every original key must match one row (or ORIGINAL_FUSED).
ORIGINAL_TO_HUB = _table(
    (
        ("backbone.0.body.", HUB_BACKBONE_PREFIX),
        ("backbone.1.row_embed.", "model.backbone.position_embedding.row_embeddings."),
        ("backbone.1.col_embed.", "model.backbone.position_embedding.column_embeddings."),
        ("input_proj.", "model.input_proj."),
        ("query_embed.", "model.query_position_embeddings."),
        ("transformer.level_embed", "model.level_embed"),
        ("transformer.reference_points.", "model.reference_points."),
        ("transformer.enc_output.", "model.enc_output."),
        ("transformer.enc_output_norm.", "model.enc_output_norm."),
        ("transformer.pos_trans.", "model.pos_trans."),
        ("transformer.pos_trans_norm.", "model.pos_trans_norm."),
        ("transformer.encoder.layers.{i}.self_attn.", "model.encoder.layers.{i}.self_attn."),
        ("transformer.encoder.layers.{i}.norm1.", "model.encoder.layers.{i}.self_attn_layer_norm."),
        ("transformer.encoder.layers.{i}.linear1.", "model.encoder.layers.{i}.fc1."),
        ("transformer.encoder.layers.{i}.linear2.", "model.encoder.layers.{i}.fc2."),
        ("transformer.encoder.layers.{i}.norm2.", "model.encoder.layers.{i}.final_layer_norm."),
        ("transformer.decoder.layers.{i}.cross_attn.", "model.decoder.layers.{i}.encoder_attn."),
        (
            "transformer.decoder.layers.{i}.norm1.",
            "model.decoder.layers.{i}.encoder_attn_layer_norm.",
        ),
        (
            "transformer.decoder.layers.{i}.self_attn.out_proj.",
            "model.decoder.layers.{i}.self_attn.out_proj.",
        ),
        ("transformer.decoder.layers.{i}.norm2.", "model.decoder.layers.{i}.self_attn_layer_norm."),
        ("transformer.decoder.layers.{i}.linear1.", "model.decoder.layers.{i}.fc1."),
        ("transformer.decoder.layers.{i}.linear2.", "model.decoder.layers.{i}.fc2."),
        ("transformer.decoder.layers.{i}.norm3.", "model.decoder.layers.{i}.final_layer_norm."),
        ("transformer.decoder.bbox_embed.", "model.decoder.bbox_embed."),
        ("transformer.decoder.class_embed.", "model.decoder.class_embed."),
        ("class_embed.", "class_embed."),
        ("bbox_embed.", "bbox_embed."),
    )
)

# Fused nn.MultiheadAttention input projection (rows q, k, v stacked on axis 0) <-> split.
_SELF_ATTN = "model.decoder.layers.{i}.self_attn."
ORIGINAL_FUSED: tuple[tuple[KeyTemplate, tuple[KeyTemplate, ...]], ...] = tuple(
    (
        KeyTemplate(f"transformer.decoder.layers.{{i}}.self_attn.in_proj_{kind}"),
        tuple(KeyTemplate(f"{_SELF_ATTN}{p}_proj.{kind}") for p in "qkv"),
    )
    for kind in ("weight", "bias")
)

# Keys that carry no weights (BatchNorm step counters, transformers 4 Swin's relative position
# index, a function of the window size); dropped by every conversion.
DROPPED = re.compile(r"(^|\.)(num_batches_tracked|relative_position_index)$")

# detect_format: the first format with a key matching its markers wins.
_FORMAT_MARKERS = (
    ("original", re.compile(r"^(transformer\.|backbone\.0\.body\.|query_embed\.)")),
    (
        "transformers",
        re.compile(
            r"\.embedder\.embedder\.|\.encoder\.stages\.\d+\.|\.o_proj\.|\.mlp\.fc[12]\."
            r"|^model\.backbone\.model\.|^model\.position_embedding\."
        ),
    ),
    ("hub", re.compile(r"^model\.(backbone|encoder|decoder|input_proj|level_embed)\b")),
)
FORMATS = ("hub", "transformers", "original")


def detect_format(keys: Iterable[str]) -> str:
    """`"original"`, `"transformers"` or `"hub"` (see the module docstring) from key names."""
    keys = list(keys)
    for name, marker in _FORMAT_MARKERS:
        if any(marker.search(k) for k in keys):
            return name
    raise CheckpointFormatError(
        f"these {len(keys)} keys are not Deformable DETR weights in any known naming "
        f"(hub, transformers, original); first keys: {keys[:5]}"
    )


def rename_key(key: str, table: RenameTable, reverse: bool) -> str | None:
    """`key` renamed by the first row of `table` that matches it (b -> a if `reverse`); None if
    no row matches."""
    for a, b in table:
        src, dst = (b, a) if reverse else (a, b)
        hit = src.match(key)
        if hit is not None:
            return dst.format(*hit)
    return None


def _rename_all(
    state_dict: Mapping[str, Any], tables: Iterable[tuple[RenameTable, bool]]
) -> dict[str, Any]:
    """Passes every key through each (table, reverse) in turn; unmatched keys stay."""
    tables = list(tables)
    out = {}
    for key, value in state_dict.items():
        if DROPPED.search(key):
            continue
        for table, reverse in tables:
            key = rename_key(key, table, reverse) or key
        out[key] = value
    return out


def transformers_to_hub(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """transformers 5 naming (in memory or saved layout, any mix) -> hub naming."""
    return _rename_all(state_dict, [(TRANSFORMERS_V4_TO_V5, True), (RESNET_TIMM_TO_HF, True)])


def hub_to_transformers(
    state_dict: Mapping[str, Any], *, saved_layout: bool = False
) -> dict[str, Any]:
    """hub naming -> transformers 5 naming.

    `saved_layout=True` gives what transformers 5 `save_pretrained` writes (HF ResNet names
    under `model.backbone.conv_encoder.model.`, `out_proj`, `layers.N.fc1`), which
    transformers 4 and 5 both load with an HF ResNet backbone config.
    """
    tables = [(RESNET_TIMM_TO_HF, False)]
    if not saved_layout:
        tables.append((TRANSFORMERS_V4_TO_V5, False))
    return _rename_all(state_dict, tables)


def original_to_hub(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """fundamentalvision `checkpoint["model"]` -> hub naming; q/k/v split from `in_proj_*`.

    Raises:
      CheckpointKeyError: keys that match no row of ORIGINAL_TO_HUB (all listed), fused
        projections whose first axis is not divisible by 3.
    """
    out, unexpected, mis_shaped = {}, [], []
    for key, value in state_dict.items():
        if DROPPED.search(key):
            continue
        fused = next(((f, qkv) for f, qkv in ORIGINAL_FUSED if f.match(key)), None)
        if fused is not None:
            fields, _ = fused[0].match(key)
            array = np.asarray(value)
            if array.ndim == 0 or array.shape[0] % 3:
                mis_shaped.append(f"{key}: {array.shape}, first axis must be 3 * d_model")
                continue
            # (3 * d_model, ...) -> q, k, v rows
            for template, part in zip(fused[1], np.split(array, 3, axis=0), strict=True):
                out[template.format(fields)] = part
            continue
        new_key = rename_key(key, ORIGINAL_TO_HUB, reverse=False)
        if new_key is None:
            unexpected.append(key)
        else:
            out[new_key] = value
    if unexpected or mis_shaped:
        raise CheckpointKeyError.from_problems(
            "original (fundamentalvision) state dict",
            unexpected=unexpected,
            mis_shaped=mis_shaped,
            hint="Only DeformableDETR detection checkpoints are supported (not segmentation).",
        )
    return out


def to_hub(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Any of the three namings -> hub naming (`num_batches_tracked` dropped)."""
    converters = {
        "hub": transformers_to_hub,  # (only drops num_batches_tracked)
        "transformers": transformers_to_hub,
        "original": original_to_hub,
    }
    return converters[detect_format(state_dict)](state_dict)


def to_transformers(state_dict: Mapping[str, Any], *, saved_layout: bool = False) -> dict[str, Any]:
    """Any of the three namings -> transformers 5 naming (see `hub_to_transformers`)."""
    return hub_to_transformers(to_hub(state_dict), saved_layout=saved_layout)


# ------------------------------------------------------------------------------------------
# Tied heads. transformers and the original share (no box refinement) or alias (the
# `decoder.*_embed` copies) head modules; files store some copies and not others.

# (target prefix, condition on the variant, source prefixes in order of preference).
# `{i}` runs over the heads; `{j}` over all heads (any copy of a shared head will do).
# The class heads may fall back to any index even with box refinement: transformers 5
# ties them (`_tied_weights_keys`), so its files keep only `class_embed.0`.
TIED_HEADS = (
    ("class_embed.{i}.", None, ("model.decoder.class_embed.{i}.", "class_embed.{j}.")),
    ("bbox_embed.{i}.", None, ("model.decoder.bbox_embed.{i}.",)),
    ("bbox_embed.{i}.", "shared_boxes", ("bbox_embed.{j}.",)),
    ("model.decoder.bbox_embed.{i}.", "with_box_refine", ("bbox_embed.{i}.",)),
    ("model.decoder.class_embed.{i}.", "two_stage", ("class_embed.{i}.",)),
)


def fill_tied_heads(state_dict: Mapping[str, Any], variant: Mapping[str, Any]) -> dict[str, Any]:
    """Hub-named state dict with every head copy the variant has (copies fill gaps).

    A head prefix that has no key at all is filled from the first source prefix that
    has keys; heads already present are left alone (use the converter to check that
    copies agree).
    """
    refine, two_stage = bool(variant["with_box_refine"]), bool(variant["two_stage"])
    num_heads = int(variant["decoder_layers"]) + two_stage
    conditions = {
        None: True,
        "shared_boxes": not refine,
        "with_box_refine": refine,
        "two_stage": two_stage,
    }
    out = dict(state_dict)

    def keys_under(prefix: str) -> list[str]:
        return [k for k in out if k.startswith(prefix)]

    for target, condition, sources in TIED_HEADS:
        if not conditions[condition]:
            continue
        for i in range(num_heads):
            prefix = target.format(i=i)
            if keys_under(prefix):
                continue
            candidates = [
                s.format(i=i, j=j)
                for s in sources
                for j in (range(num_heads) if "{j}" in s else [0])
            ]
            for source in candidates:
                found = keys_under(source)
                if found:
                    out.update({prefix + k[len(source) :]: out[k] for k in found})
                    break
    return out
