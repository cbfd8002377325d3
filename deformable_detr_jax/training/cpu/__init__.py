"""What makes the training step fast on a CPU host, in one room, applied by the step factory.

`training.step.make_train_step` asks this room what to apply when its mesh is on CPU
(`applies`); nothing else in the package, the model least of all, knows about it:

- `prepare_model(model)`: the model merged inside the train step's trace computes its dense
  layers' and 1x1 convolutions' products with a filter gradient that YNNPACK runs
  (`filter_gradients`);
- `compiler_options(mesh)`: the steps' XLA:CPU options (`compiler`; with `rematerialised`,
  the optimization barriers of `jax.checkpoint` kept, without which XLA:CPU undoes a
  `backbone_remat`);
- `sized_train_step(jitted, mesh)`: the jitted train step compiled once per batch shape with
  its temporaries split to fit glibc's heaps (`sized_step`);
- `configure_process()`: process-wide, once, at a training entry point: glibc keeps the memory
  the process frees, for the next step to reuse (`host_memory`).

Each one was measured on and off on the R50 box-refinement step (BENCHMARKS.md, "CPU
speed-ups, each on and off"; `benchmarks/cpu_speedups.py`).
"""

from __future__ import annotations

from collections.abc import Callable

from flax import nnx
from jax.sharding import Mesh

from deformable_detr_jax.training.cpu.compiler import step_compiler_options
from deformable_detr_jax.training.cpu.filter_gradients import use_filter_gradients
from deformable_detr_jax.training.cpu.host_memory import configure_process
from deformable_detr_jax.training.cpu.sized_step import CpuTrainStep


def applies(mesh: Mesh) -> bool:
    """Whether `mesh`'s devices are CPUs (where this room's speed-ups apply)."""
    return mesh.devices.flat[0].platform == "cpu"


def prepare_model(model: nnx.Module) -> nnx.Module:
    """`model` (merged inside the train step's trace) with the CPU filter gradients."""
    return use_filter_gradients(model)


def compiler_options(mesh: Mesh, *, rematerialised: bool = False) -> dict[str, str | int] | None:
    """The XLA options for a step on `mesh` (`rematerialised`: of a model with
    `backbone_remat`): None (the default compile) off the CPU."""
    return step_compiler_options(mesh, rematerialised=rematerialised)


def sized_train_step(jitted: Callable, mesh: Mesh) -> CpuTrainStep:
    """The jitted train step, compiled per batch shape with its sized options."""
    return CpuTrainStep(jitted, mesh)


__all__ = [
    "CpuTrainStep",
    "applies",
    "compiler_options",
    "configure_process",
    "prepare_model",
    "sized_train_step",
]
