"""A relaxed atomic add for kernels lowered by Pallas' Triton backend.

`plgpu.atomic_add` (and `jax.ref.addupdate`) lower to `tt.atomic_rmw` with acquire-release
semantics at GPU scope (jax 0.10 to 0.12 hard-code it), and ptxas brackets every such
atomic with `MEMBAR.ALL.GPU` (wait until every earlier memory access of the thread is
visible GPU-wide) and `CCTL.IVALL` (drop the whole L1 cache): read off the sm_90 SASS of the
backward kernel. An accumulation needs no ordering between its adds, so `atomic_add` here
emits the same operation with relaxed semantics, which is what CUDA's `atomicAdd` is
(`RED.E.ADD.F32` in SASS, no barrier, no invalidation).

It is a primitive of our own with a Triton lowering rule, so it leans on Pallas' private
lowering API (`jax._src.pallas.triton.lowering`). `AVAILABLE` is False when that API is not
where this file expects it; the kernels then use `plgpu.atomic_add`. It has no interpret
rule: in interpret mode the kernels scatter with `jax.ref.addupdate` (see `pallas_gpu.py`,
`pallas_gpu_kernels._scatter_add`).
"""

from __future__ import annotations

from jax import tree_util
from jax.experimental.pallas import triton as plgpu

try:
    from jax._src import core as jax_core
    from jax._src import state
    from jax._src.lib.mlir import ir
    from jax._src.lib.mlir.dialects import arith as arith_dialect
    from jax._src.lib.triton import dialect as tt_dialect
    from jax._src.pallas import primitives as pallas_primitives
    from jax._src.pallas.triton import lowering as triton_lowering
    from jax._src.state import indexing
    from jax._src.state import primitives as state_primitives

    _PRIVATE_API = (
        triton_lowering.register_lowering,
        triton_lowering._compute_pointers_from_indices,
        triton_lowering._ensure_ir_value,
        tt_dialect.atomic_rmw,
        tt_dialect.MemSemantic.RELAXED,
        tt_dialect.MemSyncScope.GPU,
        state_primitives.get_ref_and_transforms,
        pallas_primitives._swap_abstract_eval,
    )
except (ImportError, AttributeError):  # a jax whose internals moved
    AVAILABLE = False
else:
    AVAILABLE = True


def atomic_add(ref, offsets, values, mask) -> None:
    """`ref[offsets] += values` where `mask`, atomically, relaxed (no ordering)."""
    if not AVAILABLE:
        plgpu.atomic_add(ref, offsets, values, mask=mask)
        return
    x_ref, transforms = state_primitives.get_ref_and_transforms(ref, offsets, "atomic_add")
    args_flat, args_tree = tree_util.tree_flatten((x_ref, transforms, values, mask))
    relaxed_add_p.bind(*args_flat, args_tree=args_tree)


if AVAILABLE:
    relaxed_add_p = jax_core.Primitive("msda_relaxed_atomic_add")

    @relaxed_add_p.def_effectful_abstract_eval
    def _abstract_eval(*avals_flat, args_tree):
        # Shape/dtype checks and the write effect on the ref, as for a store.
        return pallas_primitives._swap_abstract_eval(*avals_flat, args_tree=args_tree)

    @triton_lowering.register_lowering(relaxed_add_p)
    def _lowering(ctx, *args_flat, args_tree):
        block_info, *_ = ctx.block_infos
        ptr, transforms, val, mask = args_tree.unflatten(args_flat)
        *_, value_aval, mask_aval = args_tree.unflatten(ctx.avals_in)
        transforms = list(transforms)
        if not transforms or not isinstance(transforms[-1], indexing.NDIndexer):
            ref_aval = state.transform_type(transforms, ctx.avals_in[0])
            transforms.append(indexing.NDIndexer.make_trivial_indexer(ref_aval.shape))
        if len(transforms) != 1:
            raise NotImplementedError("relaxed atomic_add takes one indexer")
        ptr = triton_lowering._compute_pointers_from_indices(ptr, block_info, transforms[0])
        bounds_mask = None
        if isinstance(ptr, tuple):  # jax >= 0.11 also returns a mask of in-bounds offsets
            ptr, bounds_mask = ptr
        val = triton_lowering._ensure_ir_value(val, value_aval)
        if mask is not None:
            mask = triton_lowering._ensure_ir_value(mask, mask_aval)
        if bounds_mask is not None:
            mask = bounds_mask if mask is None else arith_dialect.andi(mask, bounds_mask)
        op = tt_dialect.RMWOp.FADD
        if isinstance(ir.RankedTensorType(val.type).element_type, ir.IntegerType):
            op = tt_dialect.RMWOp.ADD
        ptr_type = ir.RankedTensorType(ptr.type)
        result_type = ir.RankedTensorType.get(
            ptr_type.shape,
            tt_dialect.PointerType(ptr_type.element_type).pointee_type,
            ptr_type.encoding,
        )
        return tt_dialect.atomic_rmw(
            result_type,
            op,
            ptr,
            val,
            mask=mask,
            sem=tt_dialect.MemSemantic.RELAXED,
            scope=tt_dialect.MemSyncScope.GPU,
        )
