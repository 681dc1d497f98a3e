"""Waiting in tests for an event (a condition that becomes true, a process that exits),
never for a while.

Every wait has a timeout: a generous deadline that turns a hang into a failure saying
what never happened. No test checks how long a wait took: speed is measured in
benchmarks/, not asserted here.

    wait.until(lambda: os.path.exists(path), what=f"{path} to appear")
    wait.gone(pid, what="the killed command")
"""

import errno
import os
import select
import time

#: Seconds a wait gives an event by default: far more than it ever takes.
GENEROUS = 30


def until(predicate, timeout=GENEROUS, what="the condition", explain=None, interval=0.02):
    """Call `predicate()` until it returns a true value; return that value.

    After `timeout` seconds without one, raise AssertionError saying that `what` never
    happened, followed by the text `explain()` returns (a log, the calls so far) if given.
    An exception `predicate` raises (an assertion that a process still runs) propagates.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = explain() if explain is not None else ""
            raise AssertionError(f"waited {timeout:g} s for {what}, in vain" + (f"\n{detail}" if detail else ""))
        time.sleep(interval)


def alive(pid):
    """Whether process `pid` exists and is not a zombie (which has exited)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as file:
            return file.read().rpartition(")")[2].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def gone(pid, timeout=GENEROUS, what=None):
    """Wait until process `pid` (any process, not only a child) has exited.

    A pidfd becomes readable when its process exits; without pidfd_open (Linux < 5.3),
    /proc is polled. Raise AssertionError naming `what` if it still runs after `timeout` s.
    """
    what = what or f"process {pid}"
    try:
        descriptor = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except OSError as error:
        if error.errno not in (errno.ENOSYS, errno.EPERM):
            raise
        until(lambda: not alive(pid), timeout, what=f"{what} to exit")
        return
    try:
        if not select.select([descriptor], [], [], timeout)[0] and alive(pid):
            raise AssertionError(f"waited {timeout:g} s for {what} to exit, in vain: it still runs")
    finally:
        os.close(descriptor)
