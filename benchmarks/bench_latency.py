"""Latency: from a renewal published to the service's systemctl call, in watch mode.

With `certrelay watch` (settle = 0) a renewed certificate should reach its service
about as fast as the simplest thing an admin would write instead: an `inotifywait -m`
loop in sh (inotify-loop.sh; the target: at most 1.3× its median), and a systemd path
unit starting a shell script. Also measured, to show how much of the gap any Python
daemon has: the floor, latency-floor.py (pyinotify, then systemctl through subprocess,
nothing else), and certrelay.path with `certrelay run`.

Each publication is what certbot and the deploy hook do: a new live certificate, then
a notification written to tmp/, synced, and renamed into the queue; the clock starts
just before the rename and stops at the stamp that stamp-systemctl appends. On the
host, certrelay watch, the inotifywait loop and the floor run side by side and take
turns, one publication each, so that load drift hits all three alike. The path units
need systemd: they run in the Debian container, or are reported "not measured".
"""

import os
import random
import statistics
import subprocess
import time

import container as container_module
from harness import HERE, NOTES, PROCESSES, PYTHON, ROWS, Row, progress, ratio, require, rotated, seconds, wait_for
from sandbox import NotifySocket, Sandbox, install_certrelay, start_watch

TOOLS = ("inotifywait", "bash")  # without one, the rows that need it say "not measured"
LATENCY_PUBLICATIONS = 50

LATENCY_RULES = """\
[settings]
settle = 0
min-interval = 0

[[rule]]
match = ["*"]
reload = ["apache2"]
"""


def measure_latency(sandbox, label, ready_to_publish, count=LATENCY_PUBLICATIONS, name="latency.example"):
    """Publish `count` notifications one at a time; return the latencies (s) from the
    rename into the queue to the stamp of the (stamping) systemctl."""
    stamps = sandbox.bin / "stamps"
    latencies = []
    for index in range(count):
        sandbox.renew(name)
        before = len(stamps.read_text().splitlines()) if stamps.exists() else 0
        published = sandbox.publish(name, [name])
        wait_for(lambda: stamps.exists() and len(stamps.read_text().splitlines()) > before, 15,
                 f"{label}: systemctl for publication {index + 1}")
        stamp = float(stamps.read_text().splitlines()[before].split()[0])
        latencies.append(stamp - published)
        wait_for(ready_to_publish, 15, f"{label}: the queue to empty", 0.02)
        time.sleep(0.05 + random.uniform(0, 0.05))
    return latencies


def latency_row(label, latencies, base_label=None, base=None):
    def show(values):
        p95 = statistics.quantiles(values, n=20)[18]
        return f"median {seconds(statistics.median(values))}, p95 {seconds(p95)}"

    if base is None:
        return Row("latency", label, show(latencies))
    text = f"{ratio(statistics.median(latencies), statistics.median(base))} (median), " \
           f"{ratio(statistics.quantiles(latencies, n=20)[18], statistics.quantiles(base, n=20)[18])} (p95)"
    return Row("latency", "publication → systemctl", f"{label}: {show(latencies)}", base_label, show(base), text)


def run(work, get_container):
    missing = require(*TOOLS)
    if missing:
        ROWS.append(Row("latency", "publication → systemctl", f"not measured: {missing}"))
        return
    wrapper = install_certrelay("", work / "install")
    results = {}

    # On the host, interleaved: certrelay watch, the inotifywait loop and the floor take
    # turns, one publication each, so that load drift hits all three alike.
    contenders = {}  # key: (label, sandbox, ready to publish)
    sandbox = Sandbox(work / "watch", LATENCY_RULES, systemctl=HERE / "stamp-systemctl")
    notify = NotifySocket(work / "notify.sock")
    try:
        start_watch(wrapper, sandbox, notify, work / "watch.log")
    finally:
        notify.close()
    contenders["watch"] = ("certrelay watch", sandbox,
                           lambda sandbox=sandbox: not os.listdir(sandbox.queue) and not os.listdir(sandbox.claimed))
    for key, label, argv, ready_line in (
        ("inotify", "inotifywait loop", ["/bin/sh", str(HERE / "inotify-loop.sh")], b"Watches established"),
        ("floor", "latency-floor.py", [PYTHON, str(HERE / "latency-floor.py")], b"watching "),
    ):
        sandbox = Sandbox(work / key, LATENCY_RULES, systemctl=HERE / "stamp-systemctl")
        log = work / f"{key}.log"
        with open(log, "wb") as output:
            PROCESSES.start([*argv, str(sandbox.queue), "apache2.service"], group=True, env=sandbox.environment(),
                            stdout=subprocess.DEVNULL, stderr=output)
        wait_for(lambda: ready_line in log.read_bytes(), 15, f"{label} to watch", 0.02)
        contenders[key] = (label, sandbox, lambda sandbox=sandbox: not os.listdir(sandbox.queue))
    progress(f"latency: certrelay watch (settle = 0), inotifywait loop, floor: {LATENCY_PUBLICATIONS} publications each")
    results = {key: [] for key in contenders}
    for index in range(LATENCY_PUBLICATIONS):
        keys = list(contenders)
        for key in rotated(keys, index):
            label, sandbox, ready = contenders[key]
            results[key] += measure_latency(sandbox, label, ready, count=1)
    PROCESSES.stop_all()

    base = results["inotify"]
    ROWS.append(latency_row("certrelay watch (settle = 0)", results["watch"],
                            "inotifywait -m loop (sh)", base))
    ROWS.append(latency_row("reference: latency-floor.py (pyinotify + subprocess, nothing else)", results["floor"],
                            "inotifywait -m loop (sh)", base))
    ROWS.append(latency_row("certrelay watch (settle = 0)", results["watch"],
                            "the floor: latency-floor.py", results["floor"]))

    # systemd path units in the container
    container, reason = get_container()
    if container is None:
        ROWS.append(Row("latency", "publication → systemctl", "—",
                        "systemd path unit + sh script", f"not measured: {reason}"))
    else:
        for key, label in (("path-sh", "path unit + sh script"), ("path-certrelay", "certrelay.path + certrelay run")):
            site = container.host_path(f"/srv/{key}")
            sandbox = Sandbox(site, LATENCY_RULES, systemctl=HERE / "stamp-systemctl", inside=f"/srv/{key}")
            if key == "path-sh":
                # The whole queue is handled by one script run; it removes what it acted on.
                script = site / "relay.sh"
                script.write_text(
                    "#!/bin/sh\n# An admin's relay script, started by a path unit.\n"
                    f"PATH=/srv/{key}/bin:$PATH\nfor f in /srv/{key}/letsencrypt/certrelay/queue/*; do\n"
                    '    [ -e "$f" ] || continue\n    systemctl reload apache2.service\n    rm -f -- "$f"\ndone\n')
                exec_start = f"/bin/sh /srv/{key}/relay.sh"
            else:
                wrapper_inside = install_certrelay(container.root, "/opt/certrelay")
                exec_start = f"{wrapper_inside} run --empty-queue-on-error {' '.join(sandbox.arguments())}"
            units = container.host_path("/etc/systemd/system")
            (units / f"bench-{key}.path").write_text(
                f"[Path]\nDirectoryNotEmpty=/srv/{key}/letsencrypt/certrelay/queue\nUnit=bench-{key}.service\n")
            (units / f"bench-{key}.service").write_text(
                "[Unit]\n# 50 starts in a row: no start rate limit.\nStartLimitIntervalSec=0\n\n"
                f"[Service]\nType=oneshot\nEnvironment=PATH=/srv/{key}/bin:{container_module.CONTAINER_PATH}\n"
                f"ExecStart={exec_start}\n")
            container.run(["systemctl", "daemon-reload"])
            container.run(["systemctl", "start", f"bench-{key}.path"])
            progress(f"latency: {label} in the container, {LATENCY_PUBLICATIONS} publications")

            def idle(sandbox=sandbox, key=key):
                if os.listdir(sandbox.queue) or (sandbox.claimed.exists() and os.listdir(sandbox.claimed)):
                    return False
                state = container.run(["systemctl", "show", "-P", "ActiveState", f"bench-{key}.service"],
                                      check=False).stdout.strip()
                return state in ("inactive", "failed")

            results[key] = measure_latency(sandbox, label, idle)
            container.run(["systemctl", "stop", f"bench-{key}.path"])
        ROWS.append(latency_row("certrelay watch (settle = 0)", results["watch"],
                                "systemd path unit + sh script (DirectoryNotEmpty=)", results["path-sh"]))
        ROWS.append(latency_row("certrelay.path + certrelay run", results["path-certrelay"],
                                "systemd path unit + sh script (DirectoryNotEmpty=)", results["path-sh"]))
    NOTES.append(
        f"latency: {LATENCY_PUBLICATIONS} publications each, one at a time: a new live certificate, then the"
        " hook's steps (write tmp/, fsync, rename into the queue); the clock starts just before the rename."
        " The systemctl is benchmarks/stamp-systemctl (bash, appends $EPOCHREALTIME: no fork), the same for"
        " all. The path units run in a booted Debian container (systemd-nspawn; Debian 12's systemd 252);"
        " the rename is done from the host on the container's overlay. On the host, certrelay watch, the"
        " inotifywait loop and latency-floor.py ran side by side and took turns, one publication each."
        " latency-floor.py is the least a Python daemon built like certrelay does: pyinotify, then"
        " subprocess with output captured, its own session and a timeout; it claims, reads, checks and"
        " records nothing."
    )
