"""The `pallas_gpu` kernels as a GPU would get them, checked on a CPU.

`pallas_kernels.ms_deform_attn.resources` lowers both kernels through Pallas' Triton
lowering and compiles them with the `triton` package for sm_90 and sm_80. Lowering needs
no `triton` package; compiling does (the test extra installs it on Linux x86-64).
"""

from __future__ import annotations

import dataclasses
import importlib.util

import jax.numpy as jnp
import pytest

from pallas_kernels.ms_deform_attn import pallas_gpu, resources, triton_atomics

SHAPE_DTYPES = [(shape, dtype) for shape in resources.SHAPES for dtype in ("float32", "bfloat16")]


@pytest.mark.parametrize("shape_name", sorted(resources.SHAPES))
def test_both_kernels_lower_for_cuda(shape_name):
    """What Pallas hands to XLA for a CUDA GPU, on this jax: the two kernels with the
    default tiles, the backward's adds relaxed (no fence around each)."""
    shape = resources.SHAPES[shape_name]
    tiles = pallas_gpu.default_block_sizes(jnp.float32, shape.head_dim)
    fwd, bwd = resources.lower(shape, "float32")
    assert (fwd.name, bwd.name) == ("ms_deform_attn_fwd", "ms_deform_attn_bwd")
    assert (fwd.num_warps, bwd.num_warps) == (tiles.num_warps, tiles.num_warps_bwd)
    blocks = [-(-shape.len_q // block) for block in (tiles.block_q, tiles.block_q_bwd)]
    assert [k.grid for k in (fwd, bwd)] == [(shape.nheads, n, shape.bs) for n in blocks]
    assert "tt.atomic_rmw" not in fwd.ttir
    semantic = "relaxed" if triton_atomics.AVAILABLE else "acq_rel"
    assert f"tt.atomic_rmw fadd, {semantic}, gpu" in bwd.ttir


needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="compiling needs the triton package (the test extra installs it on Linux x86-64)",
)


@needs_triton
@pytest.mark.parametrize("shape_name, dtype_name", SHAPE_DTYPES)
def test_default_tiles_fit_sm90_and_sm80(shape_name, dtype_name):
    """At the default tiles no kernel spills or takes more than 128 registers (sm_90 and
    sm_80), the encoder forward keeps >= 50% occupancy, the forward gathers 16 bytes per
    thread per corner and the backward's atomics carry no memory fence."""
    rows = [
        (shape_name, dtype_name, r)
        for cc in (90, 80)
        for r in resources.resources(shape_name, dtype_name, cc)
    ]
    assert resources.violations(rows) == []
    nlevels = len(resources.SHAPES[shape_name].spatial_shapes)
    for _, _, r in rows:
        if r.kernel.endswith("fwd"):
            assert r.wide_loads >= 4 * nlevels, r  # four corners per level, LDG.E.128
        if triton_atomics.AVAILABLE:
            assert r.fences == 0, r


@needs_triton
def test_report_flags_oversized_tiles():
    """The check can fail: tiles 8x the default take more than 128 registers."""
    tiles = pallas_gpu.BlockSizes(block_q=128, block_q_bwd=64)
    rows = [("decoder", "float32", r) for r in resources.resources("decoder", "float32", 90, tiles)]
    problems = resources.violations(rows)
    assert any("ms_deform_attn_fwd" in p and "registers > 128" in p for p in problems), problems
    assert any("ms_deform_attn_bwd" in p and "registers > 128" in p for p in problems), problems


def test_violations_and_occupancy_arithmetic():
    ok = resources.Resources("ms_deform_attn_fwd", 90, 4, 32, 0, 0, 0, 1.0, 16, 0)
    assert resources.violations([("encoder", "float32", ok)]) == []
    spill = dataclasses.replace(ok, stack=8)
    local = dataclasses.replace(ok, local=4)
    slow = dataclasses.replace(ok, registers=96, occupancy=0.375)
    assert resources.violations([("decoder", "float32", spill)]) == [
        "ms_deform_attn_fwd decoder float32 sm_90: spills (stack 8 B, local 0 B)"
    ]
    assert "spills (stack 0 B, local 4 B)" in resources.violations([("decoder", "f", local)])[0]
    assert resources.violations([("encoder", "f", slow)]) == [
        "ms_deform_attn_fwd encoder f sm_90: occupancy 38% < 50%"
    ]
    assert resources.violations([("decoder", "f", slow)]) == []  # occupancy: encoder only
    # The figure: 255 registers x 128 threads leave 2 blocks, 8 of 64 warps.
    assert resources.occupancy(255, 0, 4, 90) == 8 / 64
    assert resources.occupancy(64, 0, 4, 90) == 32 / 64
    assert resources.occupancy(65, 0, 4, 90) == 28 / 64  # 72 per thread after rounding
    assert resources.occupancy(40, 0, 4, 80) == 48 / 64
    assert resources.occupancy(32, 0, 4, 90) == 1.0
    # 100 kB of shared memory (+1 kB reserved) per block: 2 blocks in sm_90's 228 kB.
    assert resources.occupancy(32, 100_000, 4, 90) == 8 / 64
    assert resources.occupancy(32, 100_000, 4, 80) == 4 / 64  # one in sm_80's 164 kB
