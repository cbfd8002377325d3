"""Processes that tests start end with them (`tests/subprocess_utils.py`), even when the test
run is killed: a SIGKILLed process takes the children it started with `start` along, a test's
teardown kills its children's process groups, and an xdist worker dies with pytest's main
process. Each check also runs a process started without the helper, which must survive the
same kill: so the check can tell a helper that works from one that does not."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests import subprocess_utils

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GONE_WITHIN = 5.0  # seconds
SLEEPER = "import time; time.sleep(120)  # deformable_detr_jax test sleeper"

# Stands in for a pytest worker: starts one child the way the tests do and one with a plain
# Popen in a session of its own (the control), prints both pids, then waits to be killed.
PARENT = textwrap.dedent(
    """
    import subprocess, sys, time
    from tests import subprocess_utils
    helped = subprocess_utils.start([sys.executable, "-c", sys.argv[1]])
    plain = subprocess.Popen([sys.executable, "-c", sys.argv[1]], start_new_session=True)
    print(helped.pid, plain.pid, flush=True)
    time.sleep(120)
    """
)

# A child that starts a grandchild in its own process group, prints its pid, then waits.
WITH_GRANDCHILD = textwrap.dedent(
    """
    import subprocess, sys, time
    grandchild = subprocess.Popen([sys.executable, "-c", sys.argv[1]])
    print(grandchild.pid, flush=True)
    time.sleep(120)
    """
)


def _alive(pid: int) -> bool:
    """Running (a zombie, killed and not yet reaped by init, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return not _alive(pid)


def _kill_our_sleeper(pid: int) -> None:
    """Ends a control process this test started, checking that the pid is still that sleeper."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            ours = SLEEPER.encode() in f.read()
    except FileNotFoundError:
        return
    if ours:
        os.kill(pid, signal.SIGKILL)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_children_die_with_a_sigkilled_parent():
    parent = subprocess_utils.start(
        [sys.executable, "-c", PARENT, SLEEPER],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        text=True,
    )
    helped, plain = (int(pid) for pid in parent.stdout.readline().split())
    try:
        assert _alive(helped) and _alive(plain)
        parent.kill()  # SIGKILL: no handler, no finally runs in the parent
        parent.wait()
        assert _gone_within(helped, GONE_WITHIN), "a child started with start() outlived it"
        assert _alive(plain), "the control child died too: this test tells nothing"
    finally:
        parent.stdout.close()
        _kill_our_sleeper(plain)


def test_teardown_kills_the_process_group():
    child = subprocess_utils.start(
        [sys.executable, "-c", WITH_GRANDCHILD, SLEEPER], stdout=subprocess.PIPE, text=True
    )
    grandchild = int(child.stdout.readline())
    child.stdout.close()
    assert _alive(child.pid) and _alive(grandchild)
    subprocess_utils.kill_started()  # what conftest's autouse teardown calls
    assert child.returncode == -signal.SIGKILL
    assert _gone_within(grandchild, GONE_WITHIN), "the grandchild outlived the teardown"


def test_run_kills_the_group_on_timeout():
    began = time.monotonic()
    with pytest.raises(pytest.fail.Exception, match="timed out after 1 s"):
        subprocess_utils.run([sys.executable, "-c", SLEEPER], timeout=1, capture_output=True)
    assert time.monotonic() - began < 1 + GONE_WITHIN


WORKER_TEST = textwrap.dedent(
    """
    import os, sys, time
    from tests import subprocess_utils

    def test_sleeps():
        child = subprocess_utils.start([sys.executable, "-c", {sleeper!r}])
        with open({out!r}, "w") as f:
            f.write(f"{{os.getpid()}} {{child.pid}}")
        time.sleep(120)
    """
)


def test_xdist_worker_and_its_children_die_with_pytest(tmp_path):
    """The CI case: pytest's main process is killed while a worker waits on its child."""
    out = tmp_path / "pids"
    (tmp_path / "test_sleeps.py").write_text(WORKER_TEST.format(sleeper=SLEEPER, out=str(out)))
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    main = subprocess_utils.start(
        [sys.executable, "-m", "pytest", "-q", "-n", "1", "-p", "tests.conftest"]
        + ["-c", str(tmp_path / "pytest.ini"), "--rootdir", ROOT, str(tmp_path)],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not out.exists() or len(out.read_text().split()) < 2:
        assert main.poll() is None, f"pytest ended ({main.returncode}) before its test started"
        assert time.monotonic() < deadline, "the worker's test did not start within 120 s"
        time.sleep(0.1)
    worker, child = (int(pid) for pid in out.read_text().split())
    main.kill()
    main.wait()
    assert _gone_within(worker, GONE_WITHIN), "the xdist worker outlived pytest's main process"
    assert _gone_within(child, GONE_WITHIN), "the worker's child outlived it"
