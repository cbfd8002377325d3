"""Tests of `pallas_kernels.ms_deform_attn`, one suite run unmodified for every implementation.

`MSDASuite` holds the tests; `TestXla`, `TestPallasGpu` and `TestPallasTpu` run it against
"xla", "pallas_gpu" and "pallas_tpu" (the Pallas kernels in interpret mode, as in CI on CPU);
`TestXlaRowChunks` and `TestXlaOffCpu` run "xla" through its CPU chunks and through the variant
it compiles for other platforms; `TestPallasGpuCompiled` / `TestPallasTpuCompiled` rerun it
with the kernels compiled, where a GPU / TPU is present. Each test compares the forward output
and `jax.grad` w.r.t. value, sampling_locations and attention_weights with

  - the plain jnp reference (`ms_deform_attn_reference`, `reference.py`) in the same dtype,
    and
  - the independent float64 NumPy oracle in `tests/msda_oracle.py`,

on fresh random inputs (fixed seeds) in which a third of the sampling points sit exactly on
pixel centres, on the borders 0 and 1, or on the lines one pixel outside a level, the rest
are uniform in [-0.25, 1.25] (so some fall outside the map), and the attention weights are
uniform in [-0.5, 1.5] (they do not sum to 1).

Tolerances, relative to the largest magnitude of the expected array (`_assert_close`):
float32 forward 1e-5 and gradients 1e-4 against the NumPy oracle, 1e-5 both against the
reference; float64 (interpret mode, `jax.enable_x64`) 1e-10; bfloat16 inputs (float32
accumulation, bfloat16 outputs and gradients) 2e-2 against the oracle evaluated on the same
bfloat16-rounded inputs. `TestReference` runs the suite on the reference itself, against the
NumPy oracle.

Every implementation's gradients are its own backward: "xla"'s (on CPU its hand-written VJP,
gathers and one scatter-add per chunk of rows; elsewhere autodiff's), "pallas_gpu"'s and
"pallas_tpu"'s backward kernels; the reference's are autodiff's of the plain formula.
"""

from __future__ import annotations

import dataclasses
import fractions
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels.ms_deform_attn import api, pallas_gpu, pallas_tpu, pallas_tpu_layout, xla
from pallas_kernels.ms_deform_attn.reference import ms_deform_attn_reference
from tests import msda_oracle

_enable_x64 = getattr(jax, "enable_x64", None)
if _enable_x64 is None:  # jax < 0.8
    from jax.experimental import enable_x64 as _enable_x64


@dataclasses.dataclass(frozen=True)
class Case:
    bs: int
    len_q: int
    nheads: int
    head_dim: int
    npoints: int
    spatial_shapes: tuple[tuple[int, int], ...]

    @property
    def len_v(self) -> int:
        return sum(h * w for h, w in self.spatial_shapes)


# Spread over the cases: non-power-of-two len_q, len_v, level sizes and head_dim; 1x1
# levels; nlevels 1, 3, 4, 5; npoints 1, 3, 4, 8; nheads 1, 3, 8, 16; head_dim 8..128.
CASES = {
    "mixed": Case(
        bs=2, len_q=37, nheads=3, head_dim=12, npoints=3, spatial_shapes=((5, 7), (4, 4), (1, 1))
    ),
    "wide": Case(bs=1, len_q=6, nheads=16, head_dim=128, npoints=8, spatial_shapes=((6, 8),)),
    "five_levels": Case(
        bs=3,
        len_q=19,
        nheads=1,
        head_dim=8,
        npoints=1,
        spatial_shapes=((6, 10), (3, 5), (2, 4), (1, 2), (1, 1)),
    ),
    # The model's encoder layout (8 heads, head_dim 32, 4 points, 4 levels, len_q == len_v).
    "model_like": Case(
        bs=2,
        len_q=77,
        nheads=8,
        head_dim=32,
        npoints=4,
        spatial_shapes=((6, 9), (3, 5), (2, 3), (1, 2)),
    ),
}

RTOL = {jnp.float32: (1e-5, 1e-4), jnp.float64: (1e-10, 1e-10), jnp.bfloat16: (2e-2, 2e-2)}
# Against the reference in the same dtype (bfloat16 is compared with the oracle only).
RTOL_REFERENCE = {jnp.float32: (1e-5, 1e-5), jnp.float64: (1e-10, 1e-10)}


def _on_integer(rounded: np.ndarray, size: int) -> np.ndarray:
    """Whether `rounded * size - 0.5` is exactly an integer (exact rational arithmetic)."""
    flat = [
        (fractions.Fraction(float(v)) * size - fractions.Fraction(1, 2)).denominator == 1
        for v in rounded.reshape(-1)
    ]
    return np.asarray(flat, bool).reshape(rounded.shape)


def _nudge_off_kinks(loc: np.ndarray, spatial_shapes, dtype) -> np.ndarray:
    """Moves points whose pixel coordinate is within 1e-3 of an integer, but not on it, away.

    The location gradient jumps where `x = loc * size - 0.5` crosses an integer. A point
    exactly on one is the same point for every implementation and the oracle; one a rounding
    error away is not (float32 kernels vs the float64 oracle, FMA contraction or not).
    """
    loc = loc.copy()
    for level, (height, width) in enumerate(spatial_shapes):
        for coord, size in ((0, width), (1, height)):
            part = loc[:, :, :, level, :, coord]
            for _ in range(3):
                rounded = np.asarray(jnp.asarray(part, dtype), np.float64)
                x = rounded * size - 0.5
                near = np.abs(x - np.round(x)) < 1e-3
                near[near] = ~_on_integer(rounded[near], size)
                if not near.any():
                    break
                part = np.where(near, part + 3e-3 / size, part)
            loc[:, :, :, level, :, coord] = part
    return loc


def make_inputs(case: Case, dtype, seed: int):
    """Random `(value, sampling_locations, attention_weights, grad_out)` as `dtype` arrays."""
    rng = np.random.default_rng(seed)
    nlevels = len(case.spatial_shapes)
    value = rng.standard_normal((case.bs, case.len_v, case.nheads, case.head_dim))
    loc_shape = (case.bs, case.len_q, case.nheads, nlevels, case.npoints)
    loc = rng.uniform(-0.25, 1.25, loc_shape + (2,))
    special = rng.random(loc_shape + (2,)) < 1 / 3
    for level, (height, width) in enumerate(case.spatial_shapes):
        for coord, size in ((0, width), (1, height)):
            # Pixel centres, the borders, and the centres one pixel outside the level.
            candidates = np.concatenate(
                [(np.arange(size) + 0.5) / size, [0.0, 1.0, -0.5 / size, 1.0 + 0.5 / size]]
            )
            pick = rng.choice(candidates, size=loc_shape[:3] + (case.npoints,))
            sel = special[:, :, :, level, :, coord]
            loc[:, :, :, level, :, coord] = np.where(sel, pick, loc[:, :, :, level, :, coord])
    loc = _nudge_off_kinks(loc, case.spatial_shapes, dtype)
    attn = rng.uniform(-0.5, 1.5, loc_shape)
    grad_out = rng.standard_normal((case.bs, case.len_q, case.nheads * case.head_dim))
    return (
        jnp.asarray(value, dtype),
        jnp.asarray(loc, dtype),
        jnp.asarray(attn, dtype),
        jnp.asarray(grad_out, jnp.promote_types(dtype, jnp.float32)),
    )


def _assert_close(actual, expected, rtol: float, what: str) -> None:
    """Elementwise `|actual - expected| <= rtol * (|expected| + max|expected|)`."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = float(np.max(np.abs(expected)))
    assert scale > 0, f"{what}: expected values are all zero, the test would prove nothing"
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale, err_msg=what)


# Small shapes where points on pixel centres exposed jaxlib 0.10.2's jit float64 gradient
# (`test_float64_jit_gradient_with_points_on_pixel_centres`): the case first.
PIXEL_CENTRE_CASES = {
    "issue": Case(bs=3, len_q=5, nheads=1, head_dim=32, npoints=2, spatial_shapes=((1, 3), (1, 1))),
    "three_levels": Case(
        bs=2, len_q=7, nheads=2, head_dim=16, npoints=3, spatial_shapes=((2, 5), (1, 3), (1, 1))
    ),
    "one_wide_level": Case(
        bs=4, len_q=6, nheads=1, head_dim=8, npoints=4, spatial_shapes=((3, 7),)
    ),
}


def _on_pixel_centres(case: Case, seed: int):
    """Inputs with locations uniform in [-0.15, 1.15], a third of the x coordinates on pixel
    centres and a fifth of the y coordinates on the bottom border, none nudged."""
    rng = np.random.default_rng(100 + seed)
    loc_shape = (case.bs, case.len_q, case.nheads, len(case.spatial_shapes), case.npoints)
    loc = rng.uniform(-0.15, 1.15, loc_shape + (2,))
    for level, (_, width) in enumerate(case.spatial_shapes):
        x = loc[:, :, :, level, :, 0]
        centre = (rng.integers(0, width, x.shape) + 0.5) / width
        loc[:, :, :, level, :, 0] = np.where(rng.random(x.shape) < 1 / 3, centre, x)
        y = loc[:, :, :, level, :, 1]
        loc[:, :, :, level, :, 1] = np.where(rng.random(y.shape) < 1 / 5, 1.0, y)
    value = rng.standard_normal((case.bs, case.len_v, case.nheads, case.head_dim))
    attn = rng.uniform(-0.5, 1.5, loc_shape)
    grad_out = rng.standard_normal((case.bs, case.len_q, case.nheads * case.head_dim))
    return tuple(jnp.asarray(a, jnp.float64) for a in (value, loc, attn, grad_out))


def _near_pixel_centre(loc: np.ndarray, spatial_shapes, tol: float = 1e-9) -> np.ndarray:
    """`(bs, len_q, nheads, nlevels, npoints, 2)` True where `loc * size - 0.5` is within `tol`
    of an integer (where the location gradient jumps)."""
    sizes = np.asarray([(w, h) for h, w in spatial_shapes], np.float64)[:, None, :]
    x = loc * sizes - 0.5
    return np.abs(x - np.round(x)) < tol


@functools.partial(jax.jit, static_argnames=("fn", "spatial_shapes"))
def _output_and_grads_jit(fn, value, spatial_shapes, loc, attn, grad_out):
    def loss(value, loc, attn):
        out = fn(value, spatial_shapes, loc, attn)
        return jnp.sum(out.astype(grad_out.dtype) * grad_out), out

    grads, out = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(value, loc, attn)
    return out, grads


def _output_and_grads(fn, value, spatial_shapes, loc, attn, grad_out):
    """`fn`'s output and `jax.grad` of `sum(output * grad_out)` w.r.t. its three inputs.

    Waits for the result: with jax 0.10.2, Pallas' TPU interpreter can deadlock on CPU when
    the Python thread dispatches other computations while an interpreted kernel runs (its
    callbacks dispatch XLA ops of their own), so nothing else may be in flight meanwhile.
    """
    jax.block_until_ready((value, loc, attn, grad_out))
    return jax.block_until_ready(
        _output_and_grads_jit(fn, value, spatial_shapes, loc, attn, grad_out)
    )


@functools.cache
def _expected(case_name: str, dtype_name: str, seed: int, with_reference: bool):
    """Inputs, oracle `(out, grads)` and reference `(out, grads)` (or None), cached per
    process: every implementation's subclass compares against the same values."""
    case = CASES[case_name]
    inputs = make_inputs(case, jnp.dtype(dtype_name), seed)
    value, loc, attn, grad_out = inputs
    shapes = case.spatial_shapes
    oracle = (
        msda_oracle.forward(value, shapes, loc, attn),
        msda_oracle.vjp(value, shapes, loc, attn, grad_out),
    )
    reference = None
    if with_reference:
        with jax.disable_jit():  # op by op, as the reference is meant to run
            reference = _output_and_grads(
                ms_deform_attn_reference, value, shapes, loc, attn, grad_out
            )
    return inputs, oracle, reference


class MSDASuite:
    """The shared suite. Subclasses set `implementation` (and `interpret`); `TestReference`
    also its own `_call`."""

    implementation: str
    interpret: bool = True

    def _call(self, value, spatial_shapes, loc, attn):
        return pallas_kernels.ms_deform_attn(
            value,
            spatial_shapes,
            loc,
            attn,
            implementation=self.implementation,
            interpret=self.interpret,
        )

    def _check(self, case_name: str, dtype, seed: int, against_reference: bool = True):
        case = CASES[case_name]
        (value, loc, attn, grad_out), oracle, reference = _expected(
            case_name,
            jnp.dtype(dtype).name,
            seed,
            against_reference and self.implementation != "reference",
        )
        shapes = case.spatial_shapes
        out, grads = _output_and_grads(self._call, value, shapes, loc, attn, grad_out)
        assert out.shape == (case.bs, case.len_q, case.nheads * case.head_dim)
        assert out.dtype == value.dtype
        assert [g.dtype for g in grads] == [value.dtype, loc.dtype, attn.dtype]
        names = ("grad value", "grad sampling_locations", "grad attention_weights")
        for what, want, rtols in (
            ("float64 oracle", oracle, RTOL),
            ("reference", reference, RTOL_REFERENCE),
        ):
            if want is None:
                continue
            rtol_fwd, rtol_grad = rtols[dtype]
            want_out, want_grads = want
            _assert_close(out, want_out, rtol_fwd, f"forward vs {what}")
            for name, grad, want_grad in zip(names, grads, want_grads):
                _assert_close(grad, want_grad, rtol_grad, f"{name} vs {what}")

    @pytest.mark.parametrize("case", sorted(CASES))
    def test_float32(self, case):
        self._check(case, jnp.float32, seed=1)

    @pytest.mark.parametrize("case", ["mixed"])
    def test_float64_exact(self, case):
        with _enable_x64(True):
            self._check(case, jnp.float64, seed=2)

    @pytest.mark.parametrize("case", ["mixed", "wide"])
    def test_bfloat16(self, case):
        # bf16 outputs and gradients round differently from the reference's; the oracle on
        # the same bf16-rounded inputs is the yardstick.
        self._check(case, jnp.bfloat16, seed=3, against_reference=False)

    def test_all_points_on_centres_and_borders(self):
        case = Case(
            bs=1, len_q=16, nheads=2, head_dim=8, npoints=2, spatial_shapes=((4, 8), (2, 2), (1, 1))
        )
        value, _, attn, grad_out = make_inputs(case, jnp.float32, seed=4)
        rng = np.random.default_rng(5)
        loc = np.empty((case.bs, case.len_q, case.nheads, 3, case.npoints, 2))
        for level, (height, width) in enumerate(case.spatial_shapes):
            for coord, size in ((0, width), (1, height)):
                candidates = np.concatenate(
                    [(np.arange(size) + 0.5) / size, [0.0, 1.0, -0.5 / size, 1.0 + 0.5 / size]]
                )
                loc[:, :, :, level, :, coord] = rng.choice(candidates, size=loc.shape[:3] + (2,))
        loc = jnp.asarray(loc, jnp.float32)
        out, grads = _output_and_grads(self._call, value, case.spatial_shapes, loc, attn, grad_out)
        _assert_close(out, msda_oracle.forward(value, case.spatial_shapes, loc, attn), 1e-5, "fwd")
        expected = msda_oracle.vjp(value, case.spatial_shapes, loc, attn, grad_out)
        for grad, want in zip(grads, expected):
            _assert_close(grad, want, 1e-4, "grad")

    @pytest.mark.parametrize("case", sorted(PIXEL_CENTRE_CASES))
    def test_float64_jit_gradient_with_points_on_pixel_centres(self, case):
        """The jitted float64 gradient against the oracle, points on pixel centres kept there.

        jaxlib 0.10.2 (Python 3.11's jax) contracted `loc * size - 0.5` into a fused
        multiply-add in some of XLA:CPU's fusions and not in others, so a point within an
        ulp of a pixel centre got its corner indices and its bilinear coefficients from
        different sides of the centre: value gradients off by up to 70% relative, only under
        jit, only in float64 (the first case is the smallest seen). The value and weight
        gradients are continuous in the locations, so they must match everywhere; the
        location gradient jumps at a centre (either side is right there), so it is compared
        away from the centres only.
        """
        spec = PIXEL_CENTRE_CASES[case]
        with _enable_x64(True):
            for seed in range(3):
                value, loc, attn, grad_out = _on_pixel_centres(spec, seed)
                shapes = spec.spatial_shapes
                _, grads = _output_and_grads(self._call, value, shapes, loc, attn, grad_out)
                want = msda_oracle.vjp(value, shapes, loc, attn, grad_out)
                _assert_close(grads[0], want[0], 1e-10, f"seed {seed} grad value")
                _assert_close(grads[2], want[2], 1e-10, f"seed {seed} grad attention_weights")
                away = ~_near_pixel_centre(np.asarray(loc), shapes)
                assert away.any() and not away.all()
                _assert_close(
                    np.asarray(grads[1])[away],
                    want[1][away],
                    1e-10,
                    f"seed {seed} grad sampling_locations",
                )

    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
    def test_locations_built_as_the_model_builds_them(self, dtype):
        """Locations computed inside the jit as the encoder computes them (reference point x
        valid ratio + offset / normaliser, the initial grid offsets times small integers), so
        that many points sit on pixel centres and the compiler sees the whole expression:
        XLA:CPU contracted it into fused multiply-adds in some fusions and not in others, and
        the "xla" core read one side of a centre while weighting the other (errors of whole
        pixels, forward, on jaxlib 0.10.2 and 0.12.1). Output and value/weight gradients
        against the float64 oracle; location gradients away from the centres, where they
        are continuous."""
        from deformable_detr_jax.modeling.deformable_attention import _grid_init_bias
        from deformable_detr_jax.modeling.transformer import encoder_reference_points

        shapes, bs, nheads, npoints, head_dim = ((12, 16), (6, 8), (3, 4), (2, 2)), 2, 8, 4, 8
        len_v = sum(h * w for h, w in shapes)
        rng = np.random.default_rng(31)
        with _enable_x64(dtype == jnp.float64):
            value = jnp.asarray(rng.standard_normal((bs, len_v, nheads, head_dim)), dtype)
            attn = jnp.asarray(rng.uniform(0.1, 1.0, (bs, len_v, nheads, 4, npoints)), dtype)
            grad_out = jnp.asarray(rng.standard_normal((bs, len_v, nheads * head_dim)), dtype)
            # image 0 unpadded, image 1 padded: ratios below 1 as the padded mask gives them
            ratios = jnp.asarray([[[1.0, 1.0]] * 4, [[0.75, 0.8125]] * 4], dtype)
            grid = _grid_init_bias(nheads, 4, npoints).reshape(nheads, 4, npoints, 2)
            scale = rng.integers(-1, 3, (bs, len_v, nheads, 4, npoints, 1))
            offsets = jnp.asarray(grid * scale, dtype)
            normaliser = jnp.asarray([[w, h] for h, w in shapes], dtype)

            def locations(offsets):
                ref = encoder_reference_points(shapes, ratios)
                return ref[:, :, None, :, None, :] + offsets / normaliser[:, None, :]

            @jax.jit
            def output_and_grads(value, offsets, attn):
                def loss(value, offsets, attn):
                    out = self._call(value, shapes, locations(offsets), attn)
                    return jnp.sum(out * grad_out), out

                return jax.grad(loss, (0, 1, 2), has_aux=True)(value, offsets, attn)

            (g_value, g_offsets, g_attn), out = jax.block_until_ready(
                output_and_grads(value, offsets, attn)
            )
            loc = np.asarray(jax.jit(locations)(offsets), np.float64)
        # within the rounding of the dtype the jit computed them in
        on_centre = _near_pixel_centre(loc, shapes, 1e-9 if dtype == jnp.float64 else 1e-4)
        assert 0.1 < on_centre.mean() < 0.9, on_centre.mean()
        want_out = msda_oracle.forward(value, shapes, loc, attn)
        want_value, want_loc, want_attn = msda_oracle.vjp(value, shapes, loc, attn, grad_out)
        rtol_fwd, rtol_grad = RTOL[dtype]
        _assert_close(out, want_out, rtol_fwd, "forward")
        _assert_close(g_value, want_value, rtol_grad, "grad value")
        _assert_close(g_attn, want_attn, rtol_grad, "grad attention_weights")
        want_offsets = want_loc / np.asarray(normaliser)[:, None, :]
        _assert_close(
            np.asarray(g_offsets)[~on_centre],
            want_offsets[~on_centre],
            rtol_grad,
            "grad offsets away from centres",
        )

    @pytest.mark.parametrize(
        "change, match",
        [
            (dict(len_v=44), "len_v"),
            (dict(loc_heads=2), "nheads"),
            (dict(loc_levels=2), "nlevels"),
            (dict(attn_points=3), "attention_weights.shape"),
            (dict(implementation="cuda"), "unknown implementation"),
        ],
    )
    def test_bad_input_raises_before_tracing(self, change, match, monkeypatch):
        def must_not_run(*args, **kwargs):
            raise AssertionError("the implementation ran on invalid input")

        row = api.IMPLEMENTATIONS[self.implementation]
        monkeypatch.setitem(
            api.IMPLEMENTATIONS, self.implementation, dataclasses.replace(row, fn=must_not_run)
        )
        shapes = ((5, 7), (3, 3), (1, 1))
        value = jnp.ones((2, change.get("len_v", 45), 4, 8))
        loc = jnp.ones((2, 10, change.get("loc_heads", 4), change.get("loc_levels", 3), 2, 2))
        attn = jnp.ones((2, 10, 4, 3, change.get("attn_points", 2)))
        with pytest.raises(ValueError, match=match):
            pallas_kernels.ms_deform_attn(
                value,
                shapes,
                loc,
                attn,
                implementation=change.get("implementation", self.implementation),
                interpret=True,
            )


class TestReference(MSDASuite):
    """The suite on the reference itself (called directly: it is no entry of the dispatch
    table), against the float64 NumPy oracle, evaluated op by op as it is meant to run (under
    jit, with the locations computed in the same program, jaxlib 0.12.1's XLA:CPU made its
    value gradient read pixels beside the ones it weighted: see reference.py)."""

    implementation = "reference"

    @pytest.fixture(autouse=True)
    def _op_by_op(self):
        with jax.disable_jit():
            yield

    def _call(self, value, spatial_shapes, loc, attn):
        return ms_deform_attn_reference(value, spatial_shapes, loc, attn)

    test_bad_input_raises_before_tracing = None  # validation is the dispatch's


class TestXla(MSDASuite):
    implementation = "xla"

    @pytest.mark.parametrize("chunk", [None, 5])
    @pytest.mark.parametrize("layout", ["corners", "neighbourhoods", "both"])
    @pytest.mark.parametrize("case", ["mixed", "five_levels"])
    def test_every_gather_layout(self, case, layout, chunk, monkeypatch):
        """Every level through one layout, four corner rows per sample (every level on CPU)
        or one 2x2-neighbourhood row (off CPU, levels with more samples than cells), or the
        levels of 3 rows and more through neighbourhoods and the others by corners (two
        gathers added up); all rows at once (GPU, TPU) or in chunks of 5 rows whose last one
        overlaps the one before (CPU), against the oracle and the reference."""
        rule = {
            "corners": lambda samples, height, width, on_cpu: False,
            "neighbourhoods": lambda samples, height, width, on_cpu: True,
            "both": lambda samples, height, width, on_cpu: height >= 3,
        }[layout]
        monkeypatch.setattr(xla, "_gathers_neighbourhoods", rule)
        monkeypatch.setattr(xla, "_row_chunk", lambda *args: chunk)
        (value, loc, attn, grad_out), oracle, reference = _expected(case, "float32", 1, True)
        fn = functools.partial(xla.ms_deform_attn_xla)  # a fresh jit cache entry
        shapes = CASES[case].spatial_shapes
        out, grads = _output_and_grads(fn, value, shapes, loc, attn, grad_out)
        for what, (want_out, want_grads), (rtol_fwd, rtol_grad) in (
            ("oracle", oracle, RTOL[jnp.float32]),
            ("reference", reference, RTOL_REFERENCE[jnp.float32]),
        ):
            _assert_close(out, want_out, rtol_fwd, f"forward vs {what}")
            for grad, want in zip(grads, want_grads):
                _assert_close(grad, want, rtol_grad, f"grad vs {what}")

    @pytest.mark.parametrize(
        "platforms, loops",
        [(["cpu"], True), (["cuda"], False), (["tpu"], False), (["cpu", "cuda"], True)],
    )
    def test_variant_follows_the_platform_lowered_for(self, platforms, loops):
        """The CPU variant (chunks of rows: a loop, forward and backward) is chosen by the
        platform the program is lowered for, not by this machine's default backend: exported
        for a GPU or TPU from this CPU, no loop; for several platforms, both variants, the
        one to run chosen where it is compiled."""
        forward, grad = _export_fwd_and_grad_for(xla.ms_deform_attn_xla, platforms)
        for what, text in (("forward", forward), ("grad", grad)):
            assert ("stablehlo.while" in text) == loops, (what, platforms)
        if len(platforms) > 1:
            assert "stablehlo.case" in forward


class TestXlaRowChunks(MSDASuite):
    """The shared suite through the CPU's chunks: the forward's loop and the hand-written
    chunked backward (`_gather_reduce_chunked`), in chunks of 5 (batch, query, head) rows that
    do not divide the rows, so that the last chunk overlaps the one before. On CPU the suite's
    small cases are otherwise one chunk."""

    implementation = "xla"

    @pytest.fixture(autouse=True)
    def _chunks_of_five(self, monkeypatch):
        monkeypatch.setattr(xla, "_row_chunk", lambda rows, bytes_per_row, on_cpu: min(rows, 5))


class TestXlaOffCpu(MSDASuite):
    """The shared suite through the variant "xla" compiles for GPU and TPU (no chunks,
    autodiff's backward, neighbourhood rows for the levels with more samples than cells), run
    here on CPU by making the CPU variant take the same decisions."""

    implementation = "xla"

    @pytest.fixture(autouse=True)
    def _as_off_cpu(self, monkeypatch):
        rule = xla._gathers_neighbourhoods
        monkeypatch.setattr(
            xla, "_gathers_neighbourhoods", lambda samples, h, w, on_cpu: rule(samples, h, w, False)
        )
        monkeypatch.setattr(xla, "_row_chunk", lambda rows, bytes_per_row, on_cpu: None)


class TestPallasGpu(MSDASuite):
    implementation = "pallas_gpu"

    def test_several_query_blocks(self):
        """Several query blocks with a tail, in forward and backward."""
        case = Case(
            bs=1, len_q=37, nheads=2, head_dim=8, npoints=2, spatial_shapes=((5, 7), (1, 1))
        )
        value, loc, attn, grad_out = make_inputs(case, jnp.float32, seed=6)
        fn = functools.partial(
            pallas_gpu.ms_deform_attn_pallas_gpu,
            block_sizes=pallas_gpu.BlockSizes(block_q=16, block_q_bwd=8),
            interpret=self.interpret,
        )
        out, grads = _output_and_grads(fn, value, case.spatial_shapes, loc, attn, grad_out)
        _assert_close(out, msda_oracle.forward(value, case.spatial_shapes, loc, attn), 1e-5, "fwd")
        expected = msda_oracle.vjp(value, case.spatial_shapes, loc, attn, grad_out)
        for grad, want in zip(grads, expected):
            _assert_close(grad, want, 1e-4, "grad")


class TestPallasTpu(MSDASuite):
    implementation = "pallas_tpu"

    def test_several_blocks_and_skipping(self):
        """Several query and pixel blocks per level, with blocks skipped by the range table.

        Queries sample near their own position (as in the encoder), so most (query block,
        pixel block) pairs are untouched and skipped; the result must not change.
        """
        case = Case(
            bs=1,
            len_q=300,
            nheads=2,
            head_dim=8,
            npoints=2,
            spatial_shapes=((20, 30), (10, 15), (1, 1)),
        )
        value, _, attn, grad_out = make_inputs(case, jnp.float32, seed=7)
        rng = np.random.default_rng(8)
        # Reference points along the first level in raster order, small offsets.
        q = np.arange(case.len_q)
        ref_xy = np.stack([(q % 30 + 0.5) / 30, (q // 30 + 0.5) / 20], -1)
        loc = ref_xy[None, :, None, None, None, :] + rng.normal(0, 0.05, (1, 300, 2, 3, 2, 2))
        loc = jnp.asarray(_nudge_off_kinks(loc, case.spatial_shapes, jnp.float32), jnp.float32)
        block_sizes = pallas_tpu.BlockSizes(block_q=128, block_v=128)
        level_blocks = pallas_tpu_layout.level_blocks(case.spatial_shapes, 128)
        ranges = np.asarray(
            pallas_tpu_layout.block_ranges(case.spatial_shapes, loc, level_blocks, 128, 128, 384)
        ).reshape(-1, 2)
        computed = sum(max(0, hi - lo + 1) for lo, hi in ranges)
        # 3 query blocks x 8 pixel blocks; local sampling needs 17 of them.
        assert computed <= 18, f"the range table keeps {computed} of 24 steps"
        fn = functools.partial(
            pallas_tpu.ms_deform_attn_pallas_tpu, block_sizes=block_sizes, interpret=self.interpret
        )
        jax.block_until_ready((value, loc, attn))  # see _output_and_grads
        out = jax.block_until_ready(
            jax.jit(fn, static_argnums=1)(value, case.spatial_shapes, loc, attn)
        )
        _assert_close(out, msda_oracle.forward(value, case.spatial_shapes, loc, attn), 1e-5, "fwd")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (Triton)")
class TestPallasGpuCompiled(TestPallasGpu):
    """The same suite with the kernels compiled by Triton, where a GPU is present."""

    interpret = False


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU (Mosaic)")
class TestPallasTpuCompiled(TestPallasTpu):
    """The same suite with the kernel compiled by Mosaic, where a TPU is present."""

    interpret = False


def test_auto_picks_xla_off_gpu():
    if jax.default_backend() == "gpu":
        pytest.skip("on a GPU 'auto' picks pallas_gpu")
    assert api._auto() == "xla"


@pytest.mark.parametrize("implementation", ["pallas_gpu", "pallas_tpu"])
def test_pallas_on_wrong_backend_raises(implementation):
    backend = api.IMPLEMENTATIONS[implementation].backend
    if jax.default_backend() == backend:
        pytest.skip(f"{implementation} can run on this {backend} backend")
    shapes = ((2, 3),)
    value = jnp.ones((1, 6, 2, 8))
    loc = jnp.full((1, 4, 2, 1, 2, 2), 0.5)
    attn = jnp.ones((1, 4, 2, 1, 2))
    with pytest.raises(ValueError, match="interpret=True"):
        pallas_kernels.ms_deform_attn(value, shapes, loc, attn, implementation=implementation)


def _export_fwd_and_grad(fn, platform, disabled_checks=()):
    """Lowers forward and `jax.grad` of `fn` for `platform` (no such device needed); returns
    the two modules' text (of the last dtype)."""
    return _export_fwd_and_grad_for(fn, [platform], disabled_checks)


def _export_fwd_and_grad_for(fn, platforms, disabled_checks=()):
    """`_export_fwd_and_grad` for a list of platforms (one module for all of them)."""
    shapes = ((5, 7), (3, 3), (1, 1))
    for dtype in (jnp.float32, jnp.bfloat16):
        value = jax.ShapeDtypeStruct((2, 45, 3, 12), dtype)
        loc = jax.ShapeDtypeStruct((2, 37, 3, 3, 3, 2), dtype)
        attn = jax.ShapeDtypeStruct((2, 37, 3, 3, 3), dtype)

        def forward(value, loc, attn):
            return fn(value, shapes, loc, attn)

        def grad(value, loc, attn):
            loss = lambda *args: jnp.sum(forward(*args).astype(jnp.float32))  # noqa: E731
            return jax.grad(loss, argnums=(0, 1, 2))(value, loc, attn)

        texts = []
        for f in (forward, grad):
            exported = jax.export.export(
                jax.jit(f), platforms=platforms, disabled_checks=disabled_checks
            )(value, loc, attn)
            texts.append(exported.mlir_module())
            assert texts[-1]
    return texts


def test_pallas_tpu_lowers_to_mosaic_without_a_tpu():
    """The Mosaic lowering of the forward and backward kernels succeeds, and the gradient is
    the backward kernel's (Mosaic's own passes run on TPU)."""
    forward, grad = _export_fwd_and_grad(pallas_tpu.ms_deform_attn_pallas_tpu, "tpu")
    assert 'kernel_name = "ms_deform_attn_fwd_tpu"' in forward
    assert 'kernel_name = "ms_deform_attn_bwd_tpu"' in grad
    assert "scatter" not in grad  # no XLA fallback for the value gradient
