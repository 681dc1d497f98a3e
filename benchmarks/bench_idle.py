"""Idle: what `certrelay watch` costs the host while nothing is renewed.

The daemon waits weeks between renewals, so its idle cost is what it costs at all:
wake-ups (context switches of all its threads), CPU time and resident memory over
60 s, with the systemd watchdog on (WATCHDOG_USEC = 60 s: a ping every 30 s), after it
said READY=1. Baselines, side by side over the same 60 s: `inotifywait -m` (what a
shell-script watcher costs) and `sleep` (a process that does nothing). The pings
received are counted too: a daemon that is idle must still tell the watchdog it lives.
"""

import os
import subprocess
import time
from pathlib import Path

from harness import NOTES, PROCESSES, ROWS, Row, progress, ratio, require
from sandbox import NotifySocket, Sandbox, install_certrelay, start_watch
from tests.writeup import WRITE_UP_RULES

TOOLS = ("inotifywait",)  # without one, the rows that need it say "not measured"
IDLE_SECONDS = 60


def process_sample(pid):
    """Return {switches, ticks, runtime_ns, rss_kib} of process `pid`, all threads."""
    switches, runtime = 0, 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        for line in (task / "status").read_text().splitlines():
            if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                switches += int(line.split()[1])
        runtime += int((task / "schedstat").read_text().split()[0])
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    ticks = int(fields[11]) + int(fields[12])  # utime + stime (fields 14, 15)
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    return {"switches": switches, "ticks": ticks, "runtime": runtime, "rss": rss}


def side_by_side(processes, part, seconds=None):
    """Sample {label: process} (each started just before) over `seconds` (IDLE_SECONDS)
    after a second past start-up; return (before, after: {label: process_sample}, the
    monotonic start, the seconds elapsed)."""
    seconds = IDLE_SECONDS if seconds is None else seconds
    time.sleep(1.0)  # past start-up
    progress(f"{part}: {', '.join(processes)} side by side for {seconds} s")
    before = {label: process_sample(process.pid) for label, process in processes.items()}
    started = time.monotonic()
    time.sleep(seconds)
    after = {label: process_sample(process.pid) for label, process in processes.items()}
    return before, after, started, time.monotonic() - started


def run(work):
    missing = require(*TOOLS)
    wrapper = install_certrelay("", work / "install")
    sandbox = Sandbox(work / "site", WRITE_UP_RULES)
    notify = NotifySocket(work / "notify.sock")
    try:
        watch = start_watch(wrapper, sandbox, notify, work / "watch.log", WATCHDOG_USEC="60000000")
        processes = {"certrelay watch": watch}
        if not missing:
            other = work / "other-queue"
            other.mkdir()
            processes["inotifywait -m"] = PROCESSES.start(
                ["inotifywait", "-m", "-q", "-e", "moved_to,close_write", str(other)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        processes["sleep"] = PROCESSES.start(["sleep", str(IDLE_SECONDS + 30)])
        before, after, started, elapsed = side_by_side(processes, "idle")
        pings = notify.count("WATCHDOG=1", since=started)
        for process in processes.values():
            PROCESSES.stop(process)
    finally:
        notify.close()
    delta = {label: {key: after[label][key] - before[label][key] for key in ("switches", "ticks", "runtime")}
             for label in processes}
    tick = 1 / os.sysconf("SC_CLK_TCK")
    bases = [label for label in ("inotifywait -m", "sleep") if label in processes]
    ours = delta["certrelay watch"]
    for base in bases:
        theirs = delta[base]
        ROWS.append(Row("idle", f"wake-ups in {IDLE_SECONDS} s (context switches)", f"{ours['switches']}", base,
                        f"{theirs['switches']}", ratio(ours["switches"], theirs["switches"])))
    for base in bases:
        theirs = delta[base]
        ROWS.append(Row("idle", f"CPU time in {IDLE_SECONDS} s: utime+stime (schedstat run time; the ratio is of run time)",
                        f"{ours['ticks'] * tick * 1e3:.0f} ms ({ours['runtime'] / 1e6:.2f} ms)", base,
                        f"{theirs['ticks'] * tick * 1e3:.0f} ms ({theirs['runtime'] / 1e6:.2f} ms)",
                        ratio(ours["runtime"], theirs["runtime"])))
    for base in bases:
        ROWS.append(Row("idle", "RSS (VmRSS)", f"{after['certrelay watch']['rss'] / 1024:.1f} MiB", base,
                        f"{after[base]['rss'] / 1024:.1f} MiB", ratio(after["certrelay watch"]["rss"], after[base]["rss"])))
    ROWS.append(Row("idle", f"WATCHDOG=1 pings received in {IDLE_SECONDS} s (WATCHDOG_USEC = 60 s: one every 30 s)",
                    f"{pings}"))
    if missing:
        ROWS.append(Row("idle", "wake-ups", "—", "inotifywait -m", f"not measured: {missing}"))
    NOTES.append(
        f"idle: the three processes ran side by side over the same {elapsed:.1f} s, after start-up and after"
        " certrelay said READY=1 on a NOTIFY_SOCKET bound by the script (WATCHDOG_USEC=60000000). Wake-ups:"
        " voluntary + involuntary context switches of all threads (/proc/PID/task/*/status); CPU:"
        " utime+stime from /proc/PID/stat (10 ms ticks), and the exact run time from /proc/PID/task/*/schedstat."
        f" `sleep` is `sleep {IDLE_SECONDS + 30}`, so that it is still alive at the second reading."
    )
