"""Where a training step's time goes, per part, for JAX (profiler trace) and PyTorch (torch.profiler).

    .venv/bin/python benchmarks/train_parts.py --model shapes_tiny --batch 8
    .venv/bin/python benchmarks/train_parts.py --model r50-box-refine --batch 2 --size 384 512

The step is `benchmarks/train_step.py`'s (the package's jitted `train_step`; transformers'
`DeformableDetrForObjectDetection` with `loss.backward()`, clipping and AdamW, layer2..4 of the
backbone trained on both sides). Parts: backbone, input_proj, encoder and decoder (without their
sampling cores), the sampling cores (`ms_deform_attn` / transformers' `MultiScaleDeformableAttention`),
the heads, the Hungarian matcher, the rest of the loss, the optimizer (clipping + AdamW); each
forward and backward where it has one.

JAX: the model code names its parts with `jax.named_scope` (`backbone`, `input_proj`,
`encoder`, `decoder`, `sampling_core`, `heads`; `matcher`, `loss`, `optimizer` in the loss
and step); a `jax.profiler` trace of `--profile-steps` steps gives each XLA thunk's time
(exclusive of the thunks it encloses, e.g. a loop's body), and the compiled HLO's `op_name`
metadata gives its part (innermost named scope) and direction (`transpose(...)`: backward).
XLA:CPU runs independent thunks on both cores at once, so the summed thunk time exceeds the
step's wall time: each part's figure is its share of the summed thunk time times the median
step time. PyTorch: module hooks open a `record_function` range per part; backward autograd
nodes are attributed to the part of the forward op that made them (same `sequence_nr`); self
CPU times per part, scaled the same way to the median step time. Both steps are timed
interleaved (`--block` steps of each in turn, each in its own process: `side_by_side.py`) before
the profiles are taken.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import train_step  # noqa: E402  (benchmarks/train_step.py)

# Innermost scope wins; "sampling_core" is reported per stack (encoder / decoder).
SCOPES = (
    "backbone",
    "input_proj",
    "encoder",
    "decoder",
    "sampling_core",
    "heads",
    "matcher",
    "loss",
    "optimizer",
)
ROWS = (
    "backbone",
    "input_proj",
    "encoder",
    "encoder sampling core",
    "decoder",
    "decoder sampling core",
    "heads",
    "matcher",
    "loss",
    "optimizer",
    "other",
)
_FRAMEWORK = (
    "$",
    "ThunkExecutor",
    "PjitFunction",
    "SlinkyThreadPool",
    "CommonPjRt",
    "ParseArguments",
    "Handle inputs",
    "end: ",
)


def _part(scopes: list[str]) -> str:
    if not scopes:
        return "other"
    inner = scopes[-1]
    if inner == "sampling_core":
        outer = [s for s in scopes if s in ("encoder", "decoder")]
        return f"{outer[-1]} sampling core" if outer else "encoder sampling core"
    return inner


def _jax_part(op_name: str) -> tuple[str, str]:
    """`(part, "forward" | "backward")` of an HLO instruction's `op_name`."""
    scopes = [t for t in re.split(r"[/()]", op_name) if t in SCOPES]
    part = _part(scopes)
    # autodiff's backward is `transpose(...)`; a custom VJP's backward is traced under the
    # forward's names, and the package's mark theirs with a "backward" scope
    backward = "transpose(" in op_name or "/backward/" in op_name
    direction = "backward" if backward else "forward"
    if part in ("matcher", "loss", "optimizer", "other"):
        direction = ""
    return part, direction


def _exclusive_times(events) -> collections.Counter:
    """Per event name, its duration minus the events nested inside it on the same thread."""
    by_thread = collections.defaultdict(list)
    for e in events:
        by_thread[e.get("tid")].append(e)
    totals = collections.Counter()
    for thread_events in by_thread.values():
        thread_events.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack = []  # [end, name, child time]
        for e in thread_events:
            while stack and e["ts"] >= stack[-1][0]:
                end, name, child = stack.pop()
                totals[name] -= child
            if stack:
                stack[-1][2] += e["dur"]
            totals[e["name"]] += e["dur"]
            stack.append([e["ts"] + e["dur"], e["name"], 0.0])
        while stack:
            _, name, child = stack.pop()
            totals[name] -= child
    return totals


def profile_jax(subject: train_step.JaxSubject, steps: int) -> dict[tuple[str, str], float]:
    """Summed exclusive thunk time (s) per (part, direction) over `steps` steps."""
    import jax

    hlo = subject.step_fn.lower(subject.state, subject.batch, subject.key).compile().as_text()
    op_names, shapes = {}, {}
    for line in hlo.split("\n"):
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+)", line)
        if m:
            shapes[m.group(1)] = m.group(2)
            name = re.search(r'op_name="([^"]*)"', line)
            op_names[m.group(1)] = name.group(1) if name else ""
    with tempfile.TemporaryDirectory() as directory:
        with jax.profiler.trace(directory, create_perfetto_trace=True):
            for _ in range(steps):
                subject.step()
        (path,) = glob.glob(os.path.join(directory, "**", "*.trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    ops = [e for e in events if not e["name"].startswith(_FRAMEWORK)]
    parts = collections.Counter()
    top = collections.defaultdict(collections.Counter)
    for name, micros in _exclusive_times(ops).items():
        part = _jax_part(op_names.get(name, ""))
        parts[part] += micros / 1e6
        top[part][f"{name} {shapes.get(name, '')} {op_names.get(name, '')[-70:]}"] += (
            micros / 1e6 / steps
        )
    if os.environ.get("TRAIN_PARTS_TOP"):  # the biggest thunks of each part (diagnosis)
        for part, thunks in sorted(top.items(), key=lambda kv: -parts[kv[0]]):
            print(f"-- {' '.join(part)}: {parts[part] / steps * 1e3:.1f} ms of thunk time/step")
            for thunk, seconds in thunks.most_common(int(os.environ["TRAIN_PARTS_TOP"])):
                print(f"   {seconds * 1e3:8.2f} ms  {thunk}")
    return parts


def profile_torch(subject: train_step.TorchSubject, steps: int) -> dict[tuple[str, str], float]:
    """Summed self CPU time (s) per (part, direction) over `steps` steps."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function
    from transformers.loss import loss_deformable_detr
    from transformers.models.deformable_detr import modeling_deformable_detr as hf

    handles, ranges = [], {}

    def hook(module, name):
        def pre(mod, args):
            ranges[id(mod)] = record_function(name)
            ranges[id(mod)].__enter__()

        def post(mod, args, out):
            ranges.pop(id(mod)).__exit__(None, None, None)

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))

    model = subject.model
    inner = model.model
    hook(inner.backbone, "backbone")
    for projection in inner.input_proj:
        hook(projection, "input_proj")
    hook(inner.encoder, "encoder")
    hook(inner.decoder, "decoder")
    for module in model.modules():
        if isinstance(module, hf.MultiScaleDeformableAttention):
            hook(module, "sampling_core")
    for head in [*model.class_embed, *model.bbox_embed]:
        hook(head, "heads")
    matcher_forward = loss_deformable_detr.DeformableDetrHungarianMatcher.forward
    loss_function = model.loss_function

    def matcher(self, *args, **kwargs):
        with record_function("matcher"):
            return matcher_forward(self, *args, **kwargs)

    def loss(*args, **kwargs):
        with record_function("loss"):
            return loss_function(*args, **kwargs)

    loss_deformable_detr.DeformableDetrHungarianMatcher.forward = matcher
    model.loss_function = loss
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                subject.step()
    finally:
        loss_deformable_detr.DeformableDetrHungarianMatcher.forward = matcher_forward
        model.loss_function = loss_function
        for handle in handles:
            handle.remove()

    events = prof.events()

    def scopes_of(event):
        names = []
        while event is not None:
            if event.name in SCOPES:
                names.append(event.name)
            event = event.cpu_parent
        return names[::-1]

    seq_part = {}
    for e in events:
        if e.sequence_nr >= 0 and not e.name.startswith("autograd::"):
            part = _part(scopes_of(e))
            seq_part.setdefault((e.thread, e.sequence_nr), part)
    parts = collections.Counter()
    for e in events:
        node = e
        while node is not None and not node.name.startswith("autograd::engine::evaluate_function"):
            node = node.cpu_parent
        if node is not None:  # inside a backward node: the part of its forward op
            part = seq_part.get((node.fwd_thread, node.sequence_nr), "other")
            direction = "backward"
        else:
            part, direction = _part(scopes_of(e)), "forward"
        if part in ("matcher", "loss", "optimizer", "other"):
            direction = ""
        parts[(part, direction)] += e.self_cpu_time_total / 1e6
    del torch
    return parts


class JaxParts(train_step.JaxSubject):
    def profile(self, steps: int):
        return profile_jax(self, steps)


class TorchParts(train_step.TorchSubject):
    def profile(self, steps: int):
        return profile_torch(self, steps)


def _scaled(parts, step_s: float) -> dict[tuple[str, str], float]:
    total = sum(parts.values())
    return {k: v / total * step_s for k, v in parts.items()} if total else {}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    train_step.add_arguments(parser)
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--json", default=None)
    parser.set_defaults(steps=4)
    args = parser.parse_args(argv)
    args.torch = not args.no_torch
    _, _, (height, width) = train_step.setup(args)
    load_before = os.getloadavg()
    measured, subjects = train_step.measure(args, JaxParts, TorchParts)
    try:
        step_s = {name: r["step_s"] for name, r in measured.items()}
        parts = {
            name: _scaled(subject.call("profile", args.profile_steps), step_s[name])
            for name, subject in subjects.items()
        }
    finally:
        for subject in subjects.values():
            subject.close()
    first = measured["jax"]["first_step_s"]
    load_after = os.getloadavg()
    print(
        f"{args.model}, batch {args.batch}, {height}x{width}, float32; JAX first step "
        f"{first:.1f} s; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after"
    )
    keys = []
    for row in ROWS:
        for direction in ("forward", "backward", ""):
            if any((row, direction) in p for p in parts.values()):
                keys.append((row, direction))
    header = "| part | JAX ms |" + (" PyTorch ms | JAX / PyTorch time |" if args.torch else "")
    print(header + "\n|---|---:|" + ("---:|---:|" if args.torch else ""))
    for key_ in keys:
        label = f"{key_[0]} {key_[1]}".strip()
        jax_ms = parts["jax"].get(key_, 0.0) * 1e3
        line = f"| {label} | {jax_ms:.1f} |"
        if args.torch:
            torch_ms = parts["torch"].get(key_, 0.0) * 1e3
            ratio = f"{jax_ms / torch_ms:.2f}" if torch_ms > 0.05 else "-"
            line += f" {torch_ms:.1f} | {ratio} |"
        print(line)
    total = "| **step (median)** | " + f"{step_s['jax'] * 1e3:.1f} |"
    if args.torch:
        total += f" {step_s['torch'] * 1e3:.1f} | {step_s['jax'] / step_s['torch']:.2f} |"
    print(total)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "step_s": step_s,
                    "first_step_s": first,
                    "load": [load_before, load_after],
                    "parts": {
                        n: {" ".join(k).strip(): v for k, v in p.items()} for n, p in parts.items()
                    },
                },
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
