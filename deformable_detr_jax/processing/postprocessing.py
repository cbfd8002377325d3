"""Post-processing of Deformable DETR outputs into per-image detections (host-side numpy).

`post_process_object_detection` follows transformers' `DeformableDetrImageProcessor.
post_process_object_detection`: sigmoid of the class logits (no background class), top-k over
queries x classes jointly (so one query may yield several labels), then the score threshold, and
boxes (cx, cy, w, h) in [0, 1] -> (x0, y0, x1, y1) scaled to each image's (height, width).

Ranking is done on the logits, which orders like the sigmoid scores but keeps ties that float32
sigmoid creates near 0 and 1 in logit order (first query/class first among exact ties). The
ranking is `top_k_detections`, which the training evaluation step runs on the device too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

import numpy as np

from deformable_detr_jax.box_format import cxcywh_to_xyxy


def _outputs(logits: Any, pred_boxes: Any) -> tuple[np.ndarray, np.ndarray]:
    """Arrays, or an object / mapping with `logits` and `pred_boxes`."""
    if pred_boxes is None:
        if isinstance(logits, Mapping):
            logits, pred_boxes = logits.get("logits"), logits.get("pred_boxes")
        else:
            logits, pred_boxes = (
                getattr(logits, "logits", None),
                getattr(logits, "pred_boxes", None),
            )
        if logits is None or pred_boxes is None:
            raise TypeError(
                "pass model outputs with `logits` and `pred_boxes`, or the two arrays: "
                "post_process_object_detection(logits, pred_boxes, ...)"
            )
    logits = np.asarray(logits, dtype=np.float32)
    pred_boxes = np.asarray(pred_boxes, dtype=np.float32)
    if logits.ndim != 3 or pred_boxes.ndim != 3 or pred_boxes.shape[-1] != 4:
        raise ValueError(
            "expected logits [bs, len_q, num_labels] and pred_boxes [bs, len_q, 4], got "
            f"{logits.shape=} and {pred_boxes.shape=}"
        )
    if logits.shape[:2] != pred_boxes.shape[:2]:
        raise ValueError(
            f"logits and pred_boxes disagree on (bs, len_q): {logits.shape=}, {pred_boxes.shape=}"
        )
    return logits, pred_boxes


def _target_scale(target_sizes: Any, bs: int) -> np.ndarray:
    """`[bs, 4]` float32 (w, h, w, h) from `[bs, 2]` (height, width) sizes."""
    if len(target_sizes) != bs:
        raise ValueError(
            f"got {len(target_sizes)} target sizes for a batch of {bs}: "
            "pass one (height, width) per image"
        )
    sizes = np.asarray(
        [tuple(s) for s in target_sizes] if isinstance(target_sizes, Sequence) else target_sizes
    )
    if sizes.shape != (bs, 2):
        raise ValueError(
            f"target_sizes must be [bs, 2] (height, width) per image, got shape {sizes.shape}"
        )
    height, width = sizes[:, 0].astype(np.float32), sizes[:, 1].astype(np.float32)
    return np.stack([width, height, width, height], axis=1)


def _ranking_key(flat: Any, xp: ModuleType) -> Any:
    """`[bs, n]` logits with NaN as -inf and -0.0 as 0.0: keys without the values on which a
    stable sort (NaN last, -0.0 equal to 0.0) and `lax.top_k` (NaN first, -0.0 below 0.0) differ."""
    key = xp.where(xp.isnan(flat), -xp.inf, flat)
    return xp.where(key == 0, xp.zeros_like(key), key)


def _top_indices(key: Any, k: int, xp: ModuleType) -> Any:
    """`[bs, k]` indices of the k largest keys, the lower index first among equal keys."""
    if xp is np:
        return np.argsort(-key, axis=1, stable=True)[:, :k]
    import jax  # xp is jax.numpy, so jax is loaded already

    # documented: "If two elements are equal, the lower-index element appears first". A stable
    # argsort would order alike, but XLA's CPU sort is ~500x slower than its top-k here.
    return jax.lax.top_k(key, k)[1]


def top_k_detections(logits: Any, boxes: Any, k: int, xp: ModuleType = np) -> tuple[Any, Any, Any]:
    """The top-k (query, class) pairs of each image: the one decoding that
    `post_process_object_detection` (so `Detector`) runs on the host and the training evaluation
    step (`training.step.make_eval_step`) runs on the device, so both rank the same pairs.

    Pairs are ranked by logit, highest first; among equal logits the lower flat index (query-major,
    then class) comes first; -0.0 equals 0.0 and NaN ranks as -inf.

    Args:
      logits: `[bs, len_q, num_labels]` class logits.
      boxes: `[bs, len_q, 4]` (cx, cy, w, h).
      k: pairs per image; all of them when k >= len_q * num_labels.
      xp: the array library, `numpy` or `jax.numpy` (inside jitted code).

    Returns:
      `top_logits [bs, k]`, `labels [bs, k]` (integer class ids) and `boxes [bs, k, 4]` (x0, y0,
      x1, y1) of each pair's query, in the arrays' units.
    """
    bs, len_q, num_labels = logits.shape
    flat = logits.reshape(bs, len_q * num_labels)  # (bs, len_q * num_labels)
    top = _top_indices(_ranking_key(flat, xp), min(k, len_q * num_labels), xp)  # (bs, k)
    query, labels = top // num_labels, top % num_labels
    picked = xp.take_along_axis(boxes, query[..., None], axis=1)  # (bs, k, 4)
    return xp.take_along_axis(flat, top, axis=1), labels, cxcywh_to_xyxy(picked, xp)


def post_process_object_detection(
    logits: Any,
    pred_boxes: Any = None,
    threshold: float = 0.5,
    target_sizes: Any = None,
    top_k: int = 100,
) -> list[dict[str, np.ndarray]]:
    """Raw outputs -> one `{"scores", "labels", "boxes"}` dict per image.

    Args:
      logits: `[bs, len_q, num_labels]` class logits, or model outputs (an object or mapping with
        `logits` and `pred_boxes`), in which case `pred_boxes` is left out.
      pred_boxes: `[bs, len_q, 4]` boxes (cx, cy, w, h) in [0, 1] of the unpadded image.
      threshold: keep detections whose score is > threshold, in [0, 1].
      target_sizes: `[bs, 2]` (height, width) per image, e.g. the original image sizes; boxes are
        left in [0, 1] when None.
      top_k: how many (query, class) pairs to keep per image before thresholding.

    Returns:
      Per image `scores [n]` float32 (descending), `labels [n]` int64, `boxes [n, 4]` float32
      (x0, y0, x1, y1), pixels when `target_sizes` is given.
    """
    threshold = float(threshold)
    if not 0.0 <= threshold <= 1.0:  # also rejects NaN
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if isinstance(top_k, bool) or int(top_k) != top_k or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    logits, pred_boxes = _outputs(logits, pred_boxes)
    bs = logits.shape[0]
    scale = None if target_sizes is None else _target_scale(target_sizes, bs)

    top_logits, labels, boxes = top_k_detections(logits, pred_boxes, int(top_k))
    scores = (1.0 / (1.0 + np.exp(-top_logits.astype(np.float64)))).astype(np.float32)
    if scale is not None:
        boxes = boxes * scale[:, None, :]

    results = []
    for image_scores, image_labels, image_boxes in zip(scores, labels, boxes, strict=True):
        keep = image_scores > threshold
        results.append(
            {
                "scores": image_scores[keep],
                "labels": image_labels[keep].astype(np.int64),
                "boxes": image_boxes[keep],
            }
        )
    return results
