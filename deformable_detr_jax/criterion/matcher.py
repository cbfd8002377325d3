"""Hungarian matching between queries and padded ground truth, inside `jit`.

Cost: the Deformable DETR matcher (fundamentalvision/Deformable-DETR `models/matcher.py`;
transformers `DeformableDetrHungarianMatcher` in `loss/loss_deformable_detr.py`):

    class = alpha (1-p)^gamma (-log(p + 1e-8)) - (1-alpha) p^gamma (-log(1-p + 1e-8)),
            p = sigmoid(logit of the target's class), alpha = 0.25, gamma = 2 (fixed, as there)
    bbox  = L1 distance of the cxcywh boxes
    giou  = -generalised IoU of the xyxy boxes
    cost  = class_cost * class + bbox_cost * bbox + giou_cost * giou   (bs, num_queries, max_boxes)

Targets are padded to `max_boxes` columns with a validity mask; padded columns take no part.
Non-finite costs (NaN predictions) are replaced by `NONFINITE_COST` (transformers replaces
them by the dtype's maximum; a finite moderate value keeps the dual potentials of the exact
solver finite) so that such predictions are matched only when nothing else is left.

Two back ends behind `linear_sum_assignment` / `hungarian_match`:

- `"jax"`: an exact shortest-augmenting-path solver (Kuhn-Munkres with Dijkstra on reduced
  costs and dual potentials, in the O(n^2 m) form of Jonker & Volgenant, "A shortest
  augmenting path algorithm for dense and sparse linear assignment problems", Computing
  1987), written as one `lax.while_loop`: jit- and vmap-able, no host callback. The problem
  is oriented so that rows (targets, or queries when valid targets outnumber them) are the
  smaller side. A greedy start assigns every row whose row-minimum column is unclaimed (a
  tight edge under the row-reduced potentials); the remaining rows each run one Dijkstra
  search and augmentation, step by step inside the loop.
- `"scipy"`: `scipy.optimize.linear_sum_assignment` through `jax.pure_callback`, image by image.

Result format, per image: `query_index (max_boxes,) int32` (the query matched to each target
column; 0 where unmatched) and `matched (max_boxes,) bool` (valid target that got a query).
With more valid targets than queries, `min(num_queries, num_valid)` targets are matched, as
in scipy. The loss gathers predictions with `query_index` and weighs them by `matched`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
from jax import lax

from deformable_detr_jax.boxes import box_cxcywh_to_xyxy, generalized_box_iou

BACKENDS = ("jax", "scipy")
NONFINITE_COST = 1e6
MATCHER_ALPHA = 0.25
MATCHER_GAMMA = 2.0


# ----------------------------------------------------------------------------- cost


def matching_cost(
    logits: jnp.ndarray,
    pred_boxes: jnp.ndarray,
    labels: jnp.ndarray,
    boxes: jnp.ndarray,
    *,
    class_cost: float,
    bbox_cost: float,
    giou_cost: float,
    alpha: float = MATCHER_ALPHA,
    gamma: float = MATCHER_GAMMA,
) -> jnp.ndarray:
    """Matching cost of one batch -> `(bs, num_queries, max_boxes)`.

    Args:
      logits: `(bs, num_queries, num_labels)` sigmoid classification logits.
      pred_boxes: `(bs, num_queries, 4)` cxcywh.
      labels: `(bs, max_boxes)` int class ids (padded entries: any id in range).
      boxes: `(bs, max_boxes, 4)` cxcywh (padded entries: anything finite).
    """
    prob = jax.nn.sigmoid(logits)
    neg = (1 - alpha) * (prob**gamma) * (-jnp.log(1 - prob + 1e-8))
    pos = alpha * ((1 - prob) ** gamma) * (-jnp.log(prob + 1e-8))
    # (bs, num_queries, num_labels) -> (bs, num_queries, max_boxes): the target's class column
    index = jnp.broadcast_to(labels[:, None, :], (*logits.shape[:2], labels.shape[-1]))
    cost_class = jnp.take_along_axis(pos - neg, index, axis=-1, mode="clip")
    # (bs, num_queries, 1, 4) - (bs, 1, max_boxes, 4) -> (bs, num_queries, max_boxes)
    cost_bbox = jnp.abs(pred_boxes[:, :, None, :] - boxes[:, None, :, :]).sum(-1)
    cost_giou = -jax.vmap(generalized_box_iou)(
        box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(boxes)
    )
    return bbox_cost * cost_bbox + class_cost * cost_class + giou_cost * cost_giou


def sanitize_cost(cost: jnp.ndarray) -> jnp.ndarray:
    """Replace NaN and +-inf by `NONFINITE_COST` (see the module docstring)."""
    big = jnp.asarray(NONFINITE_COST, cost.dtype)
    return jnp.where(jnp.isfinite(cost), cost, big)


# ----------------------------------------------------------------------------- exact JAX solver


def _solve_rows(cost: jnp.ndarray, row_valid: jnp.ndarray, col_valid: jnp.ndarray) -> jnp.ndarray:
    """Minimum-cost assignment of every valid row to a distinct valid column.

    Requires `row_valid.sum() <= col_valid.sum()` (the caller orients the problem).

    Args:
      cost: `(n_rows, n_cols)` finite costs.
      row_valid: `(n_rows,)` bool; invalid rows stay unassigned.
      col_valid: `(n_cols,)` bool; invalid columns are never used.

    Returns:
      `(n_rows,)` int32, the column of each row, -1 for invalid rows.

    State follows the classic 1-based formulation: column 0 and row 0 are dummies,
    `owner[j]` is the row assigned to column j (0: free), `u`/`v` the row/column potentials.
    Invariants: every reduced cost `cost[i, j] - u[i] - v[j]` of an assigned row is >= 0,
    assigned edges are tight, `v <= 0` and `v == 0` on free columns; hence each Dijkstra
    phase finds a shortest augmenting path and the final assignment is optimal.
    """
    n_rows, n_cols = cost.shape
    # (n_rows + 1, n_cols + 1): dummy row 0 and dummy column 0
    a = jnp.pad(cost, ((1, 0), (1, 0)))
    col_ok = jnp.concatenate([jnp.zeros((1,), bool), col_valid])  # (n_cols + 1,)
    row_ok = jnp.concatenate([jnp.zeros((1,), bool), row_valid])  # (n_rows + 1,)
    u, owner, greedy = _greedy_start(a, row_ok, col_ok)
    state = _initial_state(u, owner, row_ok & ~greedy)
    max_steps = n_rows * (n_cols + n_rows + 2) + 1

    def cond(s: dict[str, jnp.ndarray]) -> jnp.ndarray:
        return (s["row"] != 0) & (s["steps"] < max_steps)

    owner = lax.while_loop(cond, functools.partial(_solver_step, a, col_ok, u), state)["owner"]
    return _column_of_row(owner, row_valid)


def _greedy_start(
    a: jnp.ndarray, row_ok: jnp.ndarray, col_ok: jnp.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Greedy start on row-reduced costs: u = row minimum over valid columns, v = 0. A row
    keeps its argmin column when no lower-index row claims the same column.

    Args:
      a: `(n_rows + 1, n_cols + 1)` costs with the dummy row and column 0.
      row_ok, col_ok: `(n_rows + 1,)`, `(n_cols + 1,)` bool, False on the dummies.

    Returns:
      `u (n_rows + 1,)` row potentials, `owner (n_cols + 1,)` int32 (the greedy rows' columns;
      0: free) and `greedy (n_rows + 1,)` bool, the rows assigned.
    """
    n_rows, n_cols = a.shape[0] - 1, a.shape[1] - 1
    rows = jnp.arange(n_rows + 1, dtype=jnp.int32)
    masked = jnp.where(col_ok[None, :], a, jnp.asarray(jnp.inf, a.dtype))
    u = jnp.where(row_ok, masked.min(axis=1), 0).astype(a.dtype)
    best_col = jnp.argmin(masked, axis=1).astype(jnp.int32)
    claimant = jnp.where(row_ok, rows, n_rows + 1)
    winner = jnp.full((n_cols + 1,), n_rows + 1, jnp.int32).at[best_col].min(claimant)
    greedy = row_ok & (winner[best_col] == rows)
    # rows that did not win write out of bounds (dropped)
    owner = (
        jnp.zeros((n_cols + 1,), jnp.int32)
        .at[jnp.where(greedy, best_col, n_cols + 1)]
        .set(rows, mode="drop")
    )
    return u, owner, greedy


def _next_row(pending: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """`(n_rows + 1,)` bool rows still to insert -> (the first, int32; 0 (the dummy, never
    pending) when none is left; the rest)."""
    row = jnp.argmax(pending).astype(jnp.int32)
    return row, pending & (jnp.arange(pending.shape[0], dtype=jnp.int32) != row)


def _initial_state(
    u: jnp.ndarray, owner: jnp.ndarray, pending: jnp.ndarray
) -> dict[str, jnp.ndarray]:
    """The loop state, with the first pending row being inserted.

    One flat loop for all rows: each step is either a Dijkstra step of the current row's
    search or one step of its augmentation, so that under vmap the images of a batch
    advance independently instead of meeting at every row.
    The potential of a row is kept on the column it owns (`pot[j] = u[owner[j]]`, column
    0 holding the row being inserted): the update of every used row's potential is then
    elementwise, and it travels with its row along an augmenting path.
    """
    n_cols = owner.shape[0] - 1
    inf = jnp.asarray(jnp.inf, u.dtype)
    row, pending = _next_row(pending)
    owner = owner.at[0].set(row)
    return {
        "owner": owner,  # (n_cols + 1,) int32
        "pot": u[owner],  # (n_cols + 1,)
        "v": jnp.zeros((n_cols + 1,), u.dtype),
        "way": jnp.zeros((n_cols + 1,), jnp.int32),
        "minv": jnp.full((n_cols + 1,), inf),
        "used": jnp.zeros((n_cols + 1,), bool),
        "j0": jnp.int32(0),
        "row": row,
        "pending": pending,  # (n_rows + 1,) bool
        "augmenting": jnp.bool_(False),
        "steps": jnp.int32(0),
    }


def _dijkstra_step(
    a: jnp.ndarray, col_ok: jnp.ndarray, s: dict[str, jnp.ndarray]
) -> dict[str, jnp.ndarray]:
    """One Dijkstra step from column j0 (owned by row i0) on reduced costs: the searched
    state's `pot`, `v`, `way`, `minv`, `used`, the next column `j1` and whether it is `stuck`
    (no free valid column left: only in the discarded branch of an infeasible orientation)."""
    owner, pot, v, way, minv, used, j0 = (
        s[k] for k in ("owner", "pot", "v", "way", "minv", "used", "j0")
    )
    inf = jnp.asarray(jnp.inf, a.dtype)
    cols = jnp.arange(a.shape[1], dtype=jnp.int32)
    # (one-hot selects instead of scatters: cheaper once vmapped)
    at_j0 = cols == j0
    used_s = used | at_j0
    i0 = owner[j0]
    reduced = a[i0] - pot[j0] - v  # (n_cols + 1,)
    free = ~used_s & col_ok
    better = free & (reduced < minv)
    minv_s = jnp.where(better, reduced, minv)
    way_s = jnp.where(better, j0, way)
    candidates = jnp.where(free, minv_s, inf)
    j1 = jnp.argmin(candidates).astype(jnp.int32)
    delta = candidates[j1]
    return {
        "pot": jnp.where(used_s, pot + delta, pot),
        "v": jnp.where(used_s, v - delta, v),
        "way": way_s,
        "minv": jnp.where(free, minv_s - delta, minv_s),
        "used": used_s,
        "j1": j1,
        "stuck": ~jnp.isfinite(delta),
    }


def _augment_step(u: jnp.ndarray, s: dict[str, jnp.ndarray]) -> dict[str, jnp.ndarray]:
    """One augmentation step from the free column j0 back towards the dummy column 0: the
    augmented `owner` and `pot`, the previous column `jw`, whether the path is `done`, and the
    next row to insert (`new_row`, `new_pending`), already placed on column 0 when done."""
    owner, pot, way, j0 = (s[k] for k in ("owner", "pot", "way", "j0"))
    cols = jnp.arange(owner.shape[0], dtype=jnp.int32)
    at_j0 = cols == j0
    jw = way[j0]
    owner_a = jnp.where(at_j0, owner[jw], owner)
    pot_a = jnp.where(at_j0, pot[jw], pot)
    done = jw == 0
    new_row, new_pending = _next_row(s["pending"])
    at_0 = done & (cols == 0)
    return {
        "owner": jnp.where(at_0, new_row, owner_a),
        "pot": jnp.where(at_0, u[new_row], pot_a),
        "jw": jw,
        "done": done,
        "new_row": new_row,
        "new_pending": new_pending,
    }


def _solver_step(
    a: jnp.ndarray, col_ok: jnp.ndarray, u: jnp.ndarray, s: dict[str, jnp.ndarray]
) -> dict[str, jnp.ndarray]:
    """The loop body: both steps are computed, the state's `augmenting` flag picks one."""
    search = _dijkstra_step(a, col_ok, s)
    back = _augment_step(u, s)
    aug, done = s["augmenting"], back["done"]
    finish = aug & done
    inf = jnp.asarray(jnp.inf, a.dtype)
    row = jnp.where(finish, back["new_row"], jnp.where(~aug & search["stuck"], 0, s["row"]))
    return {
        "owner": jnp.where(aug, back["owner"], s["owner"]),
        "pot": jnp.where(aug, back["pot"], search["pot"]),
        "v": jnp.where(aug, s["v"], search["v"]),
        "way": jnp.where(aug, s["way"], search["way"]),
        "minv": jnp.where(aug, jnp.where(done, inf, s["minv"]), search["minv"]),
        "used": jnp.where(aug, s["used"] & ~done, search["used"]),
        "j0": jnp.where(aug, back["jw"], search["j1"]),
        "row": row,
        "pending": jnp.where(finish, back["new_pending"], s["pending"]),
        "augmenting": jnp.where(aug, ~done, s["owner"][search["j1"]] == 0),
        "steps": s["steps"] + 1,
    }


def _column_of_row(owner: jnp.ndarray, row_valid: jnp.ndarray) -> jnp.ndarray:
    """`(n_cols + 1,)` final owners -> `(n_rows,)` int32 column of each row, -1 for invalid."""
    n_rows, n_cols = row_valid.shape[0], owner.shape[0] - 1
    cols = jnp.arange(n_cols + 1, dtype=jnp.int32)
    # (the dummy column 0 still names the last row added; skip it)
    assigned = (owner > 0) & (cols > 0)
    col_of_row = jnp.full((n_rows + 1,), -1, jnp.int32)
    col_of_row = col_of_row.at[jnp.where(assigned, owner, n_rows + 1)].set(cols - 1, mode="drop")
    return jnp.where(row_valid, col_of_row[1:], -1)


def _assign_one_jax(cost: jnp.ndarray, target_valid: jnp.ndarray):
    """One image: `(num_queries, max_boxes)` cost, `(max_boxes,)` mask -> (query_index, matched)."""
    num_queries, max_boxes = cost.shape
    all_queries = jnp.ones((num_queries,), bool)

    def targets_as_rows(cost, target_valid):
        # (max_boxes, num_queries): each valid target picks a distinct query
        query = _solve_rows(cost.T, target_valid, all_queries)
        return jnp.maximum(query, 0), query >= 0

    def queries_as_rows(cost, target_valid):
        # every query picks a distinct valid target; invert to the target's query
        target = _solve_rows(cost, all_queries, target_valid)
        target = jnp.where(target >= 0, target, max_boxes)  # (none expected) out of range
        query = jnp.full((max_boxes,), -1, jnp.int32)
        query = query.at[target].set(jnp.arange(num_queries, dtype=jnp.int32), mode="drop")
        return jnp.maximum(query, 0), query >= 0

    if max_boxes <= num_queries:
        return targets_as_rows(cost, target_valid)
    return lax.cond(
        target_valid.sum() <= num_queries, targets_as_rows, queries_as_rows, cost, target_valid
    )


# ----------------------------------------------------------------------------- scipy back end


def _assign_numpy(cost: np.ndarray, target_valid: np.ndarray):
    """Host side: `(..., num_queries, max_boxes)`, `(..., max_boxes)` -> (query_index, matched)."""
    num_queries, max_boxes = cost.shape[-2:]
    # (..., num_queries, max_boxes) -> (batch, num_queries, max_boxes)
    flat_cost = np.asarray(cost).reshape(-1, num_queries, max_boxes)
    flat_valid = np.asarray(target_valid).reshape(-1, max_boxes)
    query_index = np.zeros(flat_valid.shape, np.int32)
    matched = np.zeros(flat_valid.shape, bool)
    for b in range(flat_cost.shape[0]):
        columns = np.flatnonzero(flat_valid[b])
        if columns.size == 0:
            continue
        rows, picked = scipy.optimize.linear_sum_assignment(flat_cost[b][:, columns])
        query_index[b, columns[picked]] = rows
        matched[b, columns[picked]] = True
    return query_index.reshape(target_valid.shape), matched.reshape(target_valid.shape)


def _assign_scipy(cost: jnp.ndarray, target_valid: jnp.ndarray):
    out_shapes = (
        jax.ShapeDtypeStruct(target_valid.shape, jnp.int32),
        jax.ShapeDtypeStruct(target_valid.shape, jnp.bool_),
    )
    return jax.pure_callback(
        _assign_numpy, out_shapes, cost, target_valid, vmap_method="broadcast_all"
    )


# ----------------------------------------------------------------------------- public API


def linear_sum_assignment(cost: jnp.ndarray, target_valid: jnp.ndarray, *, backend: str = "jax"):
    """Exact minimum-cost one-to-one matching of queries to valid targets.

    Args:
      cost: `(bs, num_queries, max_boxes)` finite cost (see `sanitize_cost`).
      target_valid: `(bs, max_boxes)` bool; False columns (padding) are never matched.
      backend: `"jax"` (on-device solver) or `"scipy"` (host callback).

    Returns:
      `query_index (bs, max_boxes) int32` and `matched (bs, max_boxes) bool`; exactly
      `min(num_queries, target_valid[b].sum())` targets of image b are matched, to distinct
      queries, minimising the total cost. Gradients do not flow through the matching.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown matcher backend {backend!r}; expected one of {BACKENDS}")
    if cost.ndim != 3 or target_valid.shape != (cost.shape[0], cost.shape[2]):
        raise ValueError(
            f"expected cost (bs, num_queries, max_boxes) and target_valid (bs, max_boxes); "
            f"got {cost.shape=} {target_valid.shape=}"
        )
    cost = lax.stop_gradient(cost)
    target_valid = target_valid.astype(bool)
    if backend == "scipy":
        return _assign_scipy(cost, target_valid)
    return jax.vmap(_assign_one_jax)(cost, target_valid)


@functools.partial(jax.jit, static_argnames=("class_cost", "bbox_cost", "giou_cost", "backend"))
def hungarian_match(
    logits: jnp.ndarray,
    pred_boxes: jnp.ndarray,
    labels: jnp.ndarray,
    boxes: jnp.ndarray,
    mask: jnp.ndarray,
    *,
    class_cost: float,
    bbox_cost: float,
    giou_cost: float,
    backend: str = "jax",
):
    """Match predictions to padded targets with the Deformable DETR cost.

    Args:
      logits: `(bs, num_queries, num_labels)`; pred_boxes: `(bs, num_queries, 4)` cxcywh.
      labels: `(bs, max_boxes)` int; boxes: `(bs, max_boxes, 4)` cxcywh; mask: `(bs, max_boxes)`.
      class_cost, bbox_cost, giou_cost: weights of the three cost terms.
      backend: `"jax"` or `"scipy"`.

    Returns:
      `(query_index, matched)`, both `(bs, max_boxes)`; see `linear_sum_assignment`.
    """
    if class_cost == 0 and bbox_cost == 0 and giou_cost == 0:
        raise ValueError("all matching cost weights are 0; set class_cost, bbox_cost or giou_cost")
    # the cost in at least float32, without gradient
    dtype = jnp.promote_types(logits.dtype, jnp.float32)
    logits, pred_boxes, boxes = (
        lax.stop_gradient(x).astype(dtype) for x in (logits, pred_boxes, boxes)
    )
    num_labels = logits.shape[-1]
    # padded labels may hold anything; keep the gather in range
    labels = jnp.where(mask, labels, 0).clip(0, num_labels - 1)
    boxes = jnp.where(mask[..., None], boxes, 0.5)
    cost = matching_cost(
        logits,
        pred_boxes,
        labels,
        boxes,
        class_cost=class_cost,
        bbox_cost=bbox_cost,
        giou_cost=giou_cost,
    )
    return linear_sum_assignment(sanitize_cost(cost), mask, backend=backend)
