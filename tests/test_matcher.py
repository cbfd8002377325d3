"""The on-device assignment solver against scipy (the matcher against transformers':
tests/test_matcher_vs_transformers.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from deformable_detr_jax.criterion.matcher import hungarian_match, linear_sum_assignment

# (num_queries, max_boxes): square, tall, wide (more targets than queries), empty
SHAPES = [
    (1, 0),
    (1, 1),
    (1, 7),
    (2, 9),
    (3, 100),
    (7, 3),
    (20, 20),
    (50, 100),
    (64, 64),
    (100, 37),
    (300, 1),
    (300, 20),
    (300, 100),
]


def _cost_batch(rng, num_queries, max_boxes):
    """Four images: continuous costs, integer ties, duplicated query rows, duplicated targets."""
    shape = (num_queries, max_boxes)
    continuous = rng.normal(size=shape) * rng.uniform(0.1, 10)
    ties = rng.integers(0, 3, size=shape).astype(np.float64)
    dup_rows = rng.normal(size=shape)
    if num_queries > 1:
        dup_rows[rng.integers(0, num_queries, num_queries // 2 + 1)] = dup_rows[0]
    dup_cols = rng.uniform(size=shape)
    if max_boxes > 1:
        dup_cols[:, rng.integers(0, max_boxes, max_boxes // 2 + 1)] = dup_cols[:, :1]
    cost = np.stack([continuous, ties, dup_rows, dup_cols])
    # padding anywhere (not only at the end); image 0 fully valid, image 3 sometimes empty
    mask = rng.random((4, max_boxes)) < rng.uniform(0.3, 0.9)
    mask[0] = True
    if rng.random() < 0.5:
        mask[3] = False
    return cost, mask


def _check_assignment(cost, mask, query_index, matched, rtol):
    """Valid one-to-one matching of size min(Q, valid) whose total equals scipy's optimum."""
    for b in range(cost.shape[0]):
        valid_cols = np.flatnonzero(mask[b])
        num_queries = cost.shape[1]
        assert not (matched[b] & ~mask[b]).any(), "a padded target was matched"
        assert matched[b].sum() == min(num_queries, valid_cols.size)
        queries = query_index[b][matched[b]]
        assert len(np.unique(queries)) == len(queries), "a query was matched twice"
        assert ((queries >= 0) & (queries < num_queries)).all()
        got = cost[b][queries, np.flatnonzero(matched[b])].sum()
        if valid_cols.size:
            rows, cols = scipy.optimize.linear_sum_assignment(cost[b][:, valid_cols])
            ref = cost[b][:, valid_cols][rows, cols].sum()
        else:
            ref = 0.0
        assert abs(got - ref) <= rtol * max(abs(ref), 1.0), (b, got, ref)


@pytest.mark.parametrize("num_queries,max_boxes", SHAPES)
def test_jax_solver_total_cost_equals_scipy(num_queries, max_boxes):
    rng = np.random.default_rng(1000 * num_queries + max_boxes)
    cost, mask = _cost_batch(rng, num_queries, max_boxes)
    with jax.enable_x64(True):
        solve = jax.jit(linear_sum_assignment)
        query_index, matched = solve(jnp.asarray(cost), jnp.asarray(mask))
        assert query_index.shape == mask.shape and matched.dtype == jnp.bool_
    _check_assignment(cost, mask, np.asarray(query_index), np.asarray(matched), rtol=1e-6)


def test_jax_solver_float32_is_optimal_up_to_rounding():
    rng = np.random.default_rng(7)
    cost = rng.uniform(-3, 10, size=(3, 300, 60))
    mask = rng.random((3, 60)) < 0.8
    query_index, matched = jax.jit(linear_sum_assignment)(
        jnp.asarray(cost, jnp.float32), jnp.asarray(mask)
    )
    _check_assignment(cost, mask, np.asarray(query_index), np.asarray(matched), rtol=1e-5)


def test_scipy_backend_equals_jax_backend_under_vmap():
    rng = np.random.default_rng(11)
    # (layers, bs, num_queries, max_boxes): vmap over a leading layer axis, as the aux losses do
    cost = jnp.asarray(rng.normal(size=(2, 3, 30, 12)), jnp.float32)
    mask = jnp.asarray(rng.random((2, 3, 12)) < 0.6)

    def run(backend):
        fn = jax.vmap(lambda c, m: linear_sum_assignment(c, m, backend=backend))
        return jax.jit(fn)(cost, mask)

    qj, mj = run("jax")
    qs, ms = run("scipy")
    np.testing.assert_array_equal(mj, ms)
    np.testing.assert_array_equal(np.where(mj, qj, -1), np.where(ms, qs, -1))
    assert int(np.asarray(mj).sum()) > 0


def random_outputs(rng, bs, num_queries, num_labels, counts, max_boxes):
    logits = rng.normal(scale=2.0, size=(bs, num_queries, num_labels))
    pred = np.concatenate(
        [rng.uniform(0.1, 0.9, (bs, num_queries, 2)), rng.uniform(0.05, 0.5, (bs, num_queries, 2))],
        -1,
    )
    labels = rng.integers(0, num_labels, size=(bs, max_boxes))
    boxes = np.concatenate(
        [rng.uniform(0.2, 0.8, (bs, max_boxes, 2)), rng.uniform(0.05, 0.4, (bs, max_boxes, 2))], -1
    )
    mask = np.arange(max_boxes)[None, :] < np.asarray(counts)[:, None]
    return logits, pred, labels, boxes, mask


def test_zero_targets_and_nan_predictions():
    rng = np.random.default_rng(9)
    logits, pred, labels, boxes, mask = random_outputs(rng, 3, 10, 4, [0, 4, 2], 6)
    logits[2, :3] = np.nan  # three broken queries in image 2
    pred[2, 5] = np.nan
    query_index, matched = hungarian_match(
        jnp.asarray(logits, jnp.float32),
        jnp.asarray(pred, jnp.float32),
        jnp.asarray(labels, jnp.int32),
        jnp.asarray(boxes, jnp.float32),
        jnp.asarray(mask),
        class_cost=1.0,
        bbox_cost=5.0,
        giou_cost=2.0,
    )
    query_index, matched = np.asarray(query_index), np.asarray(matched)
    assert not matched[0].any()
    np.testing.assert_array_equal(matched[1], mask[1])
    np.testing.assert_array_equal(matched[2], mask[2])
    used = query_index[2][matched[2]]
    assert len(set(used.tolist())) == 2
    assert not set(used.tolist()) & {0, 1, 2, 5}, (
        "NaN predictions matched while finite ones were free"
    )


def test_bad_arguments_raise():
    cost = jnp.zeros((2, 5, 3))
    with pytest.raises(ValueError, match="backend"):
        linear_sum_assignment(cost, jnp.ones((2, 3), bool), backend="munkres")
    with pytest.raises(ValueError, match="target_valid"):
        linear_sum_assignment(cost, jnp.ones((2, 4), bool))
