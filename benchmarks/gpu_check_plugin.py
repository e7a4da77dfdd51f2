"""pytest plugin used by benchmarks/gpu_check.sh (``-p gpu_check_plugin``, benchmarks/ on PYTHONPATH).

* Incremental results: every test outcome is appended to ``$GPU_CHECK_RESULTS`` as soon as the
  test ends (``PASSED|FAILED|SKIPPED|ERROR  seconds  nodeid``, then the failure text indented),
  so a pytest step killed at its time limit (no junit XML then) still says what ran and what failed.
* ``# collected N`` (the tests selected) is written once collection ends, so the summary can
  say how many tests never ran.
* CUDA fault isolation: after each test that initialised CUDA the device is synchronised.  If
  that raises, a kernel faulted (illegal or misaligned address, launch failure) and the process's
  CUDA context is unusable: every later test in the process would fail with the same error.  The
  plugin then names the test and ends the process.  Under pytest-xdist the controller reports
  the test as crashed and starts a fresh worker (a new CUDA context) for the remaining tests;
  without xdist the session stops (``pytest.exit``), so the junit XML is still written.

Nothing here runs unless the plugin is loaded explicitly; CI never loads it.
"""

from __future__ import annotations

import os
import sys
import time

import pytest

_RESULTS = os.environ.get("GPU_CHECK_RESULTS")
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # set inside xdist workers only


def _append(text: str) -> None:
    if not _RESULTS:
        return
    with open(_RESULTS, "a") as f:
        f.write(text)


def pytest_runtest_logreport(report):
    """Runs in the controller (or the only process); workers' reports arrive here too."""
    if _WORKER:
        return
    if report.when == "call" or report.outcome != "passed":
        status = report.outcome.upper()
        if report.when != "call" and report.outcome == "failed":
            status = "ERROR"
        line = f"{status:7s} {report.duration:8.2f}s {report.nodeid}"
        if report.when != "call":
            line += f" [{report.when}]"
        text = line + "\n"
        if report.failed:
            longrepr = str(report.longrepr)
            if len(longrepr) > 4000:
                longrepr = longrepr[:1500] + "\n    ...\n" + longrepr[-2500:]
            text += "".join(f"    {ln}\n" for ln in longrepr.splitlines())
        _append(text)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return
    try:
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 -- any CUDA error here means the context is gone
        msg = (f"gpu_check_plugin: CUDA fault after {item.nodeid}: {type(e).__name__}: {e}; "
               f"the CUDA context of this process is unusable")
        print("\n" + msg, file=sys.stderr, flush=True)
        _append(f"CUDAERR {0.0:8.2f}s {item.nodeid}\n    {msg}\n")
        if _WORKER:
            sys.stderr.flush()
            os._exit(3)  # xdist replaces the worker; the remaining tests get a fresh context
        pytest.exit(msg, returncode=3)


_collected_written = False


def _write_collected(n: int) -> None:
    """``# collected N`` once: the summary's "not run" count (tests a time limit or a crash cut off)."""
    global _collected_written
    if not _collected_written:
        _collected_written = True
        _append(f"# collected {n}\n")


def pytest_collection_finish(session):
    """Without xdist: the selected tests (after -k deselection)."""
    if not _WORKER:
        _write_collected(len(session.items))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    """Under xdist the controller collects nothing itself; every worker reports the same ids."""
    _write_collected(len(ids))


def pytest_sessionstart(session):
    if not _WORKER:
        _append(f"# session start {time.strftime('%H:%M:%S')} pid {os.getpid()}\n")


def pytest_sessionfinish(session, exitstatus):
    if not _WORKER:
        _append(f"# session end {time.strftime('%H:%M:%S')} exit status {int(exitstatus)}\n")
