#!/usr/bin/python3
"""certrelay benchmarks: measure, print a Markdown table, write benchmarks/RESULTS.md.

Usage: /usr/bin/python3 benchmarks/run.py [PART...]   (`make bench`; default: all parts)

Parts, each a ratio against a baseline measured in the same run:
  cold      `certrelay run` on an empty queue vs `python3 -c 'import click'` in the same
            interpreter (Debian's python3, and Python 3.13 from .cache/venv-newest when
            present) vs the write-up's shell script (benchmarks/writeup-post.sh), taking turns;
            plus which imports beyond click cost what (-X importtime)
  scale     10,000 pending notifications (real X.509 live certificates) and 100 rules: wall
            time, peak memory and systemctl calls, vs a naive shell loop calling systemctl
            per notification per unit; linearity (2,500/5,000/10,000 notifications, 25/50/100
            rules); rule matching alone, the simple matcher vs certrelay.matcher
  latency   watch mode (settle = 0): rename into the queue -> systemctl invoked, median and
            p95 over 50 publications, vs an inotifywait loop and a systemd path unit
  idle      `certrelay watch` (watchdog on) idle for 60 s: wake-ups, CPU time, RSS, vs
            `inotifywait -m` and `sleep`
  downtime  apache2 (systemd, container) under wrk load: failed requests when certrelay
            triggers `systemctl reload` vs `systemctl restart` mid-run
  verify    `certrelay verify` of 100 endpoints on 127.0.0.1 (TLS servers in this process),
            all serving their current certificate, vs a sequential `openssl s_client` loop;
            "not available" while certrelay has no verify command
  reconcile `certrelay run` on an empty queue with 10,000 unchanged lineages under live/
            (all in the ledger) vs the same run with no lineages
  docker    the README's cron line in the e2e world (booted Debian, real dockerd, certbot
            in the test image): `certrelay run` until apache2, dovecot and exim4 are proven
            current vs the `docker run ... renew` before it; "not measured" (and why)
            where no Docker engine can run
  fleet     a real etcd on loopback (tests/etcd.py): one renewal published for 1,000
            hosts until all 1,000 watches (held by this process) have it, vs a floor
            (files checked once, sealed per host, put 128 a transaction); 20 real
            `certrelay subscribe` processes from publishing to all acknowledged current;
            an idle subscriber's wake-ups and memory (apt-get install etcd-server
            etcd-client python3-nacl)

Needs: root; Debian's /usr/bin/python3 with python3-click, -pyinotify, -sdnotify; and
  apt-get install inotify-tools wrk bash time
The path-unit baseline (latency) and the downtime part boot a Debian container with
systemd-nspawn, reusing the e2e test's code read-only: tests/e2e/rootfs.py (the cached
root file system, built with mmdebstrap on first use, a few minutes) and
tests/e2e/container.py (boot, nsenter, poweroff): apt-get install systemd-container
mmdebstrap. Where no container can be booted, the path-unit row says "not measured" and
why, and the downtime part falls back to apache2 started by hand in a private network
namespace (apt-get install apache2 iproute2 openssl), `apache2 -k graceful` vs
`apache2 -k restart` (what `apachectl -k` runs), and says so in the table.

Each part is a module, bench_PART.py (cold: bench_cold_start.py), whose docstring says
what it measures and why. harness.py holds what they share: the result table and
RESULTS.md, the turn order, the processes started, the container; sandbox.py the common
setup: a throw-away certrelay installation, a config dir, certificates, the daemon
started as systemd would. This file checks what the run needs, runs the parts asked
for in the order above and writes the results.

Everything started here is stopped by its PID when the script ends, on errors and on
Ctrl-C too. Scratch files live in a temporary directory under /var/tmp, removed at the end
(kept if the environment has BENCH_KEEP=1, for a look at the logs). BENCH_NO_CONTAINER=1
makes the parts that need systemd act as if no container could be booted.
Each part is bounded in time; the whole run takes about 7 minutes (the docker part, on first
use, also builds the e2e image and root file system: a few minutes more).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(REPO))
import bench_cold_start  # noqa: E402
import bench_docker  # noqa: E402
import bench_downtime  # noqa: E402
import bench_fleet  # noqa: E402
import bench_idle  # noqa: E402
import bench_latency  # noqa: E402
import bench_reconcile  # noqa: E402
import bench_scale  # noqa: E402
import bench_verify  # noqa: E402
from harness import (PROCESSES, PYTHON, ROWS, ContainerOnDemand, Row, describe_host, interrupt,  # noqa: E402
                     progress, require, scratch, write_results)

PARTS = ("cold", "scale", "latency", "idle", "downtime", "verify", "reconcile", "docker", "fleet")
# The tools on PATH a part needs: checked first, for one warning before a long run.
TOOLS = {"scale": bench_scale.TOOLS, "latency": bench_latency.TOOLS, "idle": bench_idle.TOOLS,
         "downtime": bench_downtime.TOOLS}


def main(argv):
    parts = argv or list(PARTS)
    unknown = [part for part in parts if part not in PARTS]
    if unknown:
        sys.exit(f"unknown part(s) {', '.join(unknown)}; choose from: {' '.join(PARTS)}")
    if os.geteuid() != 0:
        sys.exit("run.py needs root (network namespaces, systemd-nspawn, certrelay's root checks)")
    if not os.access(PYTHON, os.X_OK):
        sys.exit(f"{PYTHON} is missing: this benchmarks Debian's python3 (apt-get install python3)")
    problem = subprocess.run([PYTHON, "-c", "import click, pyinotify, sdnotify"], capture_output=True, text=True)
    if problem.returncode != 0:
        sys.exit(f"{PYTHON} lacks certrelay's dependencies: apt-get install python3-click python3-pyinotify"
                 f" python3-sdnotify\n{problem.stderr.strip()}")
    missing = require(*sorted({tool for part, tools in TOOLS.items() if part in parts for tool in tools}))
    if missing:
        print(f"warning: {missing}; the rows that need them will say \"not measured\"", file=sys.stderr)
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)
    started = time.monotonic()
    host = describe_host()
    base = scratch("run")
    get_container = ContainerOnDemand(base)

    runners = {
        "cold": bench_cold_start.run,
        "scale": bench_scale.run,
        "latency": lambda work: bench_latency.run(work, get_container),
        "idle": bench_idle.run,
        "downtime": lambda work: bench_downtime.run(work, get_container),
        "verify": bench_verify.run,
        "reconcile": bench_reconcile.run,
        "docker": bench_docker.run,
        "fleet": bench_fleet.run,
    }
    failed = []
    try:
        for part in PARTS:
            if part not in parts:
                continue
            work = base / part
            work.mkdir()
            work.chmod(0o755)
            part_started = time.monotonic()
            try:
                runners[part](work)
            except KeyboardInterrupt:
                raise
            except Exception as error:  # noqa: BLE001 - one failed part must not lose the others
                failed.append(part)
                progress(f"{part}: FAILED: {error}")
                ROWS.append(Row(part, "—", f"not measured: failed: {str(error).splitlines()[0][:200]}"))
            finally:
                PROCESSES.stop_all()
            progress(f"{part}: {time.monotonic() - part_started:.0f} s")
    except KeyboardInterrupt:
        progress("interrupted: stopping everything started")
        raise
    finally:
        PROCESSES.stop_all()
        get_container.stop()
        if os.environ.get("BENCH_KEEP"):
            progress(f"kept the scratch files in {base} (BENCH_KEEP is set)")
        else:
            subprocess.run(["rm", "-rf", "--one-file-system", "--", str(base)], check=False)
    took = time.monotonic() - started
    host += f", {os.getloadavg()[0]:.2f} at the end"
    write_results(parts, host, took)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        print("interrupted: everything started was stopped; benchmarks/RESULTS.md left as it was", file=sys.stderr)
        sys.exit(130)
