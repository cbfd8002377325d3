"""Registers, spills, shared memory and theoretical occupancy of the `pallas_gpu` kernels,
read on a machine without a GPU.

The route: `jax.export(..., platforms=["cuda"])` lowers both kernels through Pallas' own
Triton lowering (jax >= 0.11 asks the abstract device of `jax.sharding.use_abstract_mesh`
for the compute capability; jax 0.10.2 assumes 9.0 when no GPU is present); the custom call
`__gpu$xla.gpu.triton` of the exported module carries each kernel's Triton IR as MLIR
bytecode together with `num_warps` and `num_stages`; jaxlib's MLIR, with its Triton dialect
registered, prints that as text; the `triton` package compiles the text for
`GPUTarget("cuda", cc, 32)` down to a cubin, and the `cuobjdump --dump-resource-usage` it
ships reads registers, stack, local and static shared memory off the cubin.

What this proves and what it does not: the IR is exactly what Pallas hands to XLA, but on a
GPU XLA compiles it with the Triton bundled in jaxlib, whose version can differ from the
`triton` package used here; `ncu`'s `launch__registers_per_thread` on the GPU is the ground
truth (`benchmarks/gpu_check.sh` records it).

    python -m pallas_kernels.ms_deform_attn.resources                   # the standard table
    python -m pallas_kernels.ms_deform_attn.resources --shapes encoder --dtypes float32 \\
        --tiles block_q=32 num_warps=4                                   # one tiling
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import os
import platform
import re
import subprocess
import sys
import tempfile
import warnings

import jax
import jax.numpy as jnp

from pallas_kernels.ms_deform_attn import pallas_gpu

# An 800 x 1333 image through ResNet strides 8, 16, 32, 64.
ENCODER_LEVELS = ((100, 167), (50, 84), (25, 42), (13, 21))


@dataclasses.dataclass(frozen=True)
class Shape:
    """One call of the sampling core: `value (bs, len_v, nheads, head_dim)`, `len_q` queries."""

    bs: int
    len_q: int
    spatial_shapes: tuple[tuple[int, int], ...]
    nheads: int = 8
    head_dim: int = 32
    npoints: int = 4

    @property
    def len_v(self) -> int:
        return sum(h * w for h, w in self.spatial_shapes)

    def arguments(self, dtype) -> tuple[jax.ShapeDtypeStruct, ...]:
        """`(value, sampling_locations, attention_weights)` as shape-dtype structs."""
        nlevels = len(self.spatial_shapes)
        head = (self.bs, self.len_q, self.nheads, nlevels, self.npoints)
        return (
            jax.ShapeDtypeStruct((self.bs, self.len_v, self.nheads, self.head_dim), dtype),
            jax.ShapeDtypeStruct(head + (2,), dtype),
            jax.ShapeDtypeStruct(head, dtype),
        )


SHAPES = {
    # The encoder's self-attention at 800 x 1333 (len_q == len_v == 22223), batch 2.
    "encoder": Shape(
        bs=2, len_q=sum(h * w for h, w in ENCODER_LEVELS), spatial_shapes=ENCODER_LEVELS
    ),
    # The decoder's cross-attention: 300 queries, batch 8.
    "decoder": Shape(bs=8, len_q=300, spatial_shapes=ENCODER_LEVELS),
    # Five levels (a stride-128 one added), 8 points, 900 queries, batch 4.
    "five_levels": Shape(bs=4, len_q=900, spatial_shapes=ENCODER_LEVELS + ((7, 11),), npoints=8),
}

# Compute capability -> (abstract device kind for the lowering, per-SM limits): registers,
# warps, resident blocks, shared memory per SM and the most a block may take (bytes).
TARGETS = {
    90: ("NVIDIA H100", dict(regs=65536, warps=64, blocks=32, smem=233472, smem_block=232448)),
    80: ("NVIDIA A100", dict(regs=65536, warps=64, blocks=32, smem=167936, smem_block=166912)),
}
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256
SMEM_ALLOC_UNIT = 128
SMEM_RESERVED_PER_BLOCK = 1024  # the CUDA runtime's share of every block (sm_80 and later)
WARP_ALLOC_UNIT = 4  # warps per SM are granted in groups of four for the register limit

# The goals of issue 15: at default tiles no kernel above this many registers or with any
# stack/local bytes, on either target; the forward at the encoder shape at least this occupancy.
MAX_REGISTERS = 128
MIN_ENCODER_FORWARD_OCCUPANCY = 0.5


@dataclasses.dataclass(frozen=True)
class TritonKernel:
    """One `pallas_call` as Pallas handed it to XLA."""

    name: str
    ttir: str  # Triton IR, MLIR text
    num_warps: int
    num_stages: int
    grid: tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class Resources:
    """What one kernel takes per thread and per block on one target."""

    kernel: str
    cc: int
    num_warps: int
    registers: int
    stack: int
    local: int
    shared: int  # static (cuobjdump) + dynamic (Triton's launch metadata), bytes
    occupancy: float  # resident warps / the SM's maximum, from registers, shared memory, blocks
    wide_loads: int  # 16-byte global loads (LDG.E.128) in the SASS
    fences: int  # MEMBAR instructions in the SASS (acquire-release atomics bring one each)

    @property
    def spills(self) -> bool:
        return self.stack > 0 or self.local > 0


def occupancy(registers: int, shared: int, num_warps: int, cc: int) -> float:
    """Theoretical occupancy (resident warps / maximum warps per SM) of a `num_warps` block
    using `registers` per thread and `shared` bytes of shared memory, as CUDA's occupancy
    calculator computes it."""
    limits = TARGETS[cc][1]
    per_warp = -(-registers * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    warps_by_regs = limits["regs"] // per_warp // WARP_ALLOC_UNIT * WARP_ALLOC_UNIT
    blocks = min(limits["blocks"], warps_by_regs // num_warps, limits["warps"] // num_warps)
    if shared:
        block_smem = -(-(shared + SMEM_RESERVED_PER_BLOCK) // SMEM_ALLOC_UNIT) * SMEM_ALLOC_UNIT
        blocks = min(blocks, limits["smem"] // block_smem)
    return blocks * num_warps / limits["warps"]


@contextlib.contextmanager
def _lowering_target(cc: int):
    """On jax >= 0.11 the Triton lowering reads the compute capability off an (abstract)
    GPU device; jax 0.10.2 uses the local GPU's or, with none, 9.0."""
    abstract_device = getattr(jax.sharding, "AbstractDevice", None)
    use_abstract_mesh = getattr(jax.sharding, "use_abstract_mesh", None)
    if jax.__version_info__ <= (0, 10, 2) or abstract_device is None or use_abstract_mesh is None:
        yield
        return
    device = abstract_device(device_kind=TARGETS[cc][0], num_cores=None, platform="gpu")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    with use_abstract_mesh(mesh), warnings.catch_warnings():
        # jax 0.12 deprecates the Pallas Triton backend; what it lowers is what we report.
        warnings.filterwarnings("ignore", message=".*Pallas Triton backend is deprecated.*")
        yield


def lower(
    shape: Shape, dtype, block_sizes: pallas_gpu.BlockSizes | None = None, cc: int = 90
) -> list[TritonKernel]:
    """Both kernels (forward, backward) of `shape` in `dtype`, lowered for CUDA."""
    from jax._src.interpreters import mlir as jax_mlir
    from jaxlib.mlir import ir
    from jaxlib.triton import dialect as triton_dialect

    spatial_shapes = shape.spatial_shapes

    def forward_backward(value, loc, attn):
        def forward(value, loc, attn):
            return pallas_gpu.ms_deform_attn_pallas_gpu(
                value, spatial_shapes, loc, attn, block_sizes=block_sizes
            )

        out, vjp = jax.vjp(forward, value, loc, attn)
        return out, vjp(out)

    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    with _lowering_target(cc):
        exported = jax.export.export(
            jax.jit(forward_backward), platforms=["cuda"], disabled_checks=checks
        )(*shape.arguments(jnp.dtype(dtype)))

    context = jax_mlir.make_ir_context()
    triton_dialect.register_dialect(context)
    context.load_all_available_dialects()
    kernels = []
    with context:
        module = ir.Module.parse(exported.mlir_module())

        def visit(op):
            for region in op.regions:
                for block in region.blocks:
                    for child in block.operations:
                        child = child.operation
                        if child.name == "stablehlo.custom_call":
                            target = ir.StringAttr(child.attributes["call_target_name"]).value
                            if target == "__gpu$xla.gpu.triton":
                                kernels.append(_kernel(ir, child))
                        visit(child)

        visit(module.operation)
    return kernels


def _kernel(ir, op) -> TritonKernel:
    config = ir.DictAttr(op.attributes["mhlo.backend_config"])

    def integer(key):
        return int(ir.IntegerAttr(config[key]).value)

    triton_module = ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes)
    return TritonKernel(
        name=ir.StringAttr(config["name"]).value,
        ttir=triton_module.operation.get_asm(enable_debug_info=False),
        num_warps=integer("num_warps"),
        num_stages=integer("num_stages"),
        grid=(integer("grid_x"), integer("grid_y"), integer("grid_z")),
    )


def _cuobjdump() -> str:
    import triton

    knob = getattr(getattr(getattr(triton, "knobs", None), "nvidia", None), "cuobjdump", None)
    path = getattr(knob, "path", None)
    if path and os.path.exists(path):
        return path
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump")
    return bundled if os.path.exists(bundled) else "cuobjdump"


_RESOURCE = re.compile(r"(REG|STACK|SHARED|LOCAL):(\d+)")


def compile_kernel(kernel: TritonKernel, cc: int) -> Resources:
    """Compiles `kernel` for `sm_{cc}` with the `triton` package and reads its resources."""
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, said aloud
    import triton
    from triton.backends.compiler import GPUTarget

    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, f"{kernel.name}.ttir")
        with open(source, "w") as f:
            f.write(kernel.ttir)
        compiled = triton.compile(
            source,
            target=GPUTarget("cuda", cc, 32),
            options=dict(num_warps=kernel.num_warps, num_stages=kernel.num_stages),
        )
        cubin = os.path.join(tmp, f"{kernel.name}.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        dump, sass = (
            subprocess.run(
                [_cuobjdump(), flag, cubin], capture_output=True, text=True, check=True
            ).stdout
            for flag in ("--dump-resource-usage", "--dump-sass")
        )
    found = dict(_RESOURCE.findall(dump))
    if set(found) != {"REG", "STACK", "SHARED", "LOCAL"}:
        raise RuntimeError(f"cannot read the resource usage of {kernel.name} from:\n{dump}")
    registers, stack, local = int(found["REG"]), int(found["STACK"]), int(found["LOCAL"])
    shared = int(found["SHARED"]) + int(compiled.metadata.shared)
    return Resources(
        kernel=kernel.name,
        cc=cc,
        num_warps=kernel.num_warps,
        registers=registers,
        stack=stack,
        local=local,
        shared=shared,
        occupancy=occupancy(registers, shared, kernel.num_warps, cc),
        wide_loads=len(re.findall(r"\bLDG\.E\.128\b", sass)),
        fences=len(re.findall(r"\bMEMBAR\b", sass)),
    )


@functools.cache
def resources(
    shape_name: str,
    dtype_name: str,
    cc: int,
    block_sizes: pallas_gpu.BlockSizes | None = None,
) -> tuple[Resources, ...]:
    """`Resources` of the forward and backward kernels of `SHAPES[shape_name]` on `sm_{cc}`."""
    kernels = lower(SHAPES[shape_name], dtype_name, block_sizes, cc)
    return tuple(compile_kernel(kernel, cc) for kernel in kernels)


def violations(rows) -> list[str]:
    """The goals a table of `(shape, dtype, Resources)` rows misses, one line each."""
    problems = []
    for shape_name, dtype_name, r in rows:
        where = f"{r.kernel} {shape_name} {dtype_name} sm_{r.cc}"
        if r.registers > MAX_REGISTERS:
            problems.append(f"{where}: {r.registers} registers > {MAX_REGISTERS}")
        if r.spills:
            problems.append(f"{where}: spills (stack {r.stack} B, local {r.local} B)")
        if (
            shape_name == "encoder"
            and r.kernel.endswith("fwd")
            and r.occupancy < MIN_ENCODER_FORWARD_OCCUPANCY
        ):
            problems.append(
                f"{where}: occupancy {r.occupancy:.0%} < {MIN_ENCODER_FORWARD_OCCUPANCY:.0%}"
            )
    return problems


def _tiles(pairs: list[str]) -> pallas_gpu.BlockSizes | None:
    if not pairs:
        return None
    fields = {}
    for pair in pairs:
        key, _, text = pair.partition("=")
        fields[key] = text.lower() == "true" if text.lower() in ("true", "false") else int(text)
    return pallas_gpu.BlockSizes(**fields)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--cc", nargs="+", type=int, default=[90, 80], choices=list(TARGETS))
    parser.add_argument(
        "--tiles", nargs="*", default=[], help="BlockSizes fields (default: the tile table)"
    )
    args = parser.parse_args(argv)
    import triton

    block_sizes = _tiles(args.tiles)
    print(
        f"# {datetime.date.today()} jax {jax.__version__}, triton {triton.__version__}, "
        f"{platform.processor() or platform.machine()}; tiles: "
        f"{block_sizes or 'default (pallas_gpu.default_block_sizes)'}"
    )
    print(
        "| shape | dtype | kernel | target | block_q | warps | registers | stack | local "
        "| shared (B) | occupancy | LDG.E.128 | MEMBAR |"
    )
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for shape_name in args.shapes:
        shape = SHAPES[shape_name]
        for dtype_name in args.dtypes:
            tiles = block_sizes or pallas_gpu.default_block_sizes(dtype_name, shape.head_dim)
            for cc in args.cc:
                for r in resources(shape_name, dtype_name, cc, block_sizes):
                    block_q = tiles.block_q if r.kernel.endswith("fwd") else tiles.block_q_bwd
                    print(
                        f"| {shape_name} | {dtype_name} | {r.kernel} | sm_{cc} | {block_q} | "
                        f"{r.num_warps} | {r.registers} | {r.stack} | {r.local} | {r.shared} | "
                        f"{r.occupancy:.0%} | {r.wide_loads} | {r.fences} |",
                        flush=True,
                    )
                    rows.append((shape_name, dtype_name, r))
    problems = violations(rows)
    print(
        f"# goal <= {MAX_REGISTERS} registers, no spills, encoder forward >= "
        f"{MIN_ENCODER_FORWARD_OCCUPANCY:.0%} occupancy: {'FAIL' if problems else 'PASS'}"
    )
    for problem in problems:
        print(f"#   {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
