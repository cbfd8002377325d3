"""Runs a command that dies with the test process that started it (Linux).

    python -I -S tests/die_with_parent.py PARENT_PID COMMAND [ARG ...]

sets the parent-death signal (`prctl(PR_SET_PDEATHSIG, SIGKILL)`), checks that the parent is
still `PARENT_PID` (it may have died before the call: then exits 1 at once) and replaces itself
with COMMAND (`execvp`; the signal survives the exec). `tests/subprocess_utils.start` puts it in
front of every command a test runs. A SIGKILLed pytest worker thus takes its children with it;
JAX's preemption handler would swallow a SIGTERM, hence SIGKILL.

It runs here, after the exec of a fresh interpreter, rather than in a `preexec_fn`: Python code
between fork and exec is unsafe in a process with threads (pytest's runs JAX's). Note that the
signal fires when the parent *thread* that started the child exits, so tests start processes
from the thread that waits for them. It imports only the standard library and runs without
`site` (`-I -S`), about 10 ms. Elsewhere than Linux it only runs COMMAND.
"""

import os
import sys

PR_SET_PDEATHSIG = 1
SIGKILL = 9


def main(argv: list[str]) -> None:
    if len(argv) < 2 or not argv[0].isdigit():
        sys.exit("usage: die_with_parent.py PARENT_PID COMMAND [ARG ...]")
    parent, command = int(argv[0]), argv[1:]
    if sys.platform.startswith("linux"):
        import ctypes

        if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, SIGKILL) != 0:
            sys.exit(f"die_with_parent: prctl failed (errno {ctypes.get_errno()})")
        if os.getppid() != parent:  # the parent died before the prctl
            os._exit(1)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
