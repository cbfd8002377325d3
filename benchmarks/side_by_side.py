"""Two benchmark subjects timed side by side in one run, each in its own process, interleaved.

On a CPU with few cores, JAX and PyTorch in one process slow each other down when their steps
alternate: each library's worker threads keep spinning for a while after its step and take the
cores the other's step needs (measured here on 2 cores: transformers' shapes_tiny step went from
about 0.1 s to 2.5 s when interleaved step by step with the JAX step in the same process). So
each subject lives in a subprocess of its own (`spawn`) and the parent alternates them in
blocks (`rounds` x `block` steps each): while one runs, the other waits on a pipe with its
threads idle. A change of machine load hits both alike.

    with Subject(make_jax_subject, args) as jax_side, Subject(make_torch_subject, args) as torch:
        times = interleave({"jax": jax_side, "torch": torch}, rounds=5, block=2)

A factory is a module-level function `factory(args) -> object` whose object has `first_step_s`
and `step()`; `Subject.call(name, ...)` calls any other method in the subprocess.

`Subject.faults()` reads a subprocess's major and minor page faults so far: a step that faults
in fresh memory every time (600,000+ minor faults) pays for it in system time, and more so
beside another process.
"""

from __future__ import annotations

import multiprocessing
import resource
import time
import traceback


def _faults() -> dict[str, int]:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"major": usage.ru_majflt, "minor": usage.ru_minflt}


def _serve(factory, args, conn) -> None:
    try:
        subject = factory(args)
        conn.send(("ok", {"first_step_s": subject.first_step_s}))
    except BaseException:  # report, do not hang the parent
        conn.send(("error", traceback.format_exc()))
        return
    while True:
        name, call_args = conn.recv()
        if name == "stop":
            return
        try:
            if name == "steps":
                times = []
                for _ in range(call_args[0]):
                    start = time.perf_counter()
                    subject.step()
                    times.append(time.perf_counter() - start)
                conn.send(("ok", times))
            elif name == "faults":
                conn.send(("ok", _faults()))
            else:
                conn.send(("ok", getattr(subject, name)(*call_args)))
        except BaseException:
            conn.send(("error", traceback.format_exc()))


class Subject:
    """A benchmark subject in a spawned subprocess (see the module docstring)."""

    def __init__(self, factory, args):
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(factory, args, child), daemon=True)
        self._process.start()
        self.info = self._receive()

    def _receive(self):
        status, value = self._conn.recv()
        if status == "error":
            raise RuntimeError(f"benchmark subprocess failed:\n{value}")
        return value

    def call(self, name: str, *args):
        self._conn.send((name, args))
        return self._receive()

    def steps(self, count: int) -> list[float]:
        """Seconds of each of `count` steps."""
        return self.call("steps", count)

    def faults(self) -> dict[str, int]:
        """The subprocess's page faults so far: `{"major": n, "minor": n}`."""
        return self.call("faults")

    def close(self) -> None:
        if self._process.is_alive():
            self._conn.send(("stop", ()))
            self._process.join(timeout=60)
        if self._process.is_alive():
            self._process.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def interleave(subjects: dict[str, Subject], *, rounds: int, block: int, warmup: int = 1):
    """`{name: [seconds per step]}`: `warmup` untimed blocks each, then `rounds` blocks of
    `block` steps of each subject in turn."""
    for _ in range(warmup):
        for subject in subjects.values():
            subject.steps(block)
    times = {name: [] for name in subjects}
    for _ in range(rounds):
        for name, subject in subjects.items():
            times[name].extend(subject.steps(block))
    return times
