"""The benchmarks' shared harness: progress, the result table, turn order, processes.

Every benchmark (bench_*.py) adds its rows to ROWS and its notes to NOTES; run.py
writes them to benchmarks/RESULTS.md at the end (`write_results`). Figures are given
with `seconds` and compared with `ratio`, so that every table cell reads alike.
Contenders that are measured in turn go in the order `rotated` gives.

Every process a benchmark starts goes through PROCESSES, so that run.py can end each
one by its PID when a benchmark ends, fails or is interrupted: nothing is left
running, and nothing is ended by name.

The Debian container (systemd-nspawn) that some benchmarks need is booted by
`ContainerOnDemand` on first need and once per run: booting takes long, and a run without
those benchmarks should not pay for it.
"""

import contextlib
import dataclasses
import datetime
import os
import platform
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import container as container_module

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
PYTHON = "/usr/bin/python3"
RESULTS = HERE / "RESULTS.md"


def progress(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- results ------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    part: str
    metric: str
    certrelay: str
    baseline: str = ""
    baseline_value: str = ""
    ratio: str = ""


ROWS = []
NOTES = []


def ratio(value, base, error=None):
    """Return value/base as text, '×' suffixed; with `error` (relative), '± ...'."""
    if base == 0:
        return "∞ (baseline 0)" if value else "— (both 0)"
    result = value / base
    text = f"{result:.3g}×" if result < 100 else f"{result:,.0f}×"
    if error is not None:
        text += f" ± {result * error:.2g}"
    if 0 < result < 0.1:
        text += f" (1/{1 / result:,.0f})"
    return text


def seconds(value):
    if value < 1e-3:
        return f"{value * 1e6:.0f} µs"
    if value < 1:
        return f"{value * 1e3:.3g} ms"
    return f"{value:.3g} s"


def seconds_row(part, metric, ours, baseline, theirs, shown=None):
    """Return the Row comparing two durations (s): certrelay's `ours` (shown as `shown`
    if given) against the baseline's `theirs`."""
    return Row(part, metric, shown or seconds(ours), baseline, seconds(theirs), ratio(ours, theirs))


def table():
    lines = [
        "| Part | Metric | certrelay | Baseline | Baseline value | Ratio (certrelay ÷ baseline) |",
        "|---|---|---|---|---|---|",
    ]
    for row in ROWS:
        cells = [row.part, row.metric, row.certrelay, row.baseline, row.baseline_value, row.ratio]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


def describe_host():
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    python = subprocess.run([PYTHON, "--version"], capture_output=True, text=True).stdout.strip()
    load = os.getloadavg()[0]
    return (f"{cpu}, {os.cpu_count()} cores, Linux {platform.release()}, {python} ({PYTHON}), "
            f"load average {load:.2f} at the start")


def write_results(parts, host, took):
    """Print the table and the notes, and write them to RESULTS: `parts` as run, `host`
    as describe_host said it (with the load at the end), `took` the run's seconds."""
    text = "\n".join([
        "# certrelay benchmarks",
        "",
        f"`benchmarks/run.py {' '.join(parts)}` on {datetime.date.today().isoformat()}, {host}; the run took"
        f" {took:.0f} s. Each ratio is certrelay's figure divided by the baseline's, both measured in this run.",
        "",
        table(),
        "",
        "Notes:",
        "",
        *[f"- {note}" for note in NOTES],
        "",
    ])
    print()
    print(text)
    RESULTS.write_text(text)
    progress(f"wrote {RESULTS.relative_to(REPO)}")


# --- turn order ---------------------------------------------------------------------


def rotated(items, turn):
    """Return the list `items` rotated left by `turn`: contenders taking turns start in
    a different order every turn, so that load drift hits all alike."""
    shift = turn % len(items)
    return items[shift:] + items[:shift]


# --- process bookkeeping ------------------------------------------------------------


class Processes:
    """Every process this script starts; `stop_all` ends them by PID (group if asked)."""

    def __init__(self):
        self.started = []  # (Popen, whole process group)

    def start(self, argv, group=False, **options):
        options.setdefault("stdin", subprocess.DEVNULL)
        process = subprocess.Popen(argv, start_new_session=group, **options)
        self.started.append((process, group))
        return process

    def stop(self, process, timeout=5.0):
        """End `process` (and its group, if started as one) by PID: SIGTERM, then SIGKILL."""
        group = any(p is process and g for p, g in self.started)

        def alive():
            return process.poll() is None or (group and group_alive(process.pid))

        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not alive():
                return
            with contextlib.suppress(ProcessLookupError):
                if group:
                    os.killpg(process.pid, sig)  # its own session: group id = its PID
                else:
                    process.send_signal(sig)
            deadline = time.monotonic() + timeout
            while alive() and time.monotonic() < deadline:
                time.sleep(0.02)

    def stop_all(self):
        for process, _ in reversed(self.started):
            self.stop(process)


def group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


PROCESSES = Processes()


def interrupt(signal_number, frame):
    raise KeyboardInterrupt(f"signal {signal_number}")


def wait_for(condition, timeout, what, interval=0.002):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


# --- what a benchmark needs ---------------------------------------------------------


def scratch(name):
    path = Path(tempfile.mkdtemp(prefix=f"certrelay-bench-{name}-", dir="/var/tmp"))
    path.chmod(0o755)
    return path


def require(*tools):
    """Return a message naming the missing tools, or None."""
    missing = [tool for tool in tools if shutil.which(tool) is None and not os.access(tool, os.X_OK)]
    if missing:
        packages = {"inotifywait": "inotify-tools", "wrk": "wrk",
                    "apache2": "apache2", "apachectl": "apache2", "bash": "bash",
                    "systemd-nspawn": "systemd-container", "nsenter": "util-linux", "ip": "iproute2",
                    "time": "time"}
        names = " ".join(sorted({packages.get(Path(tool).name, Path(tool).name) for tool in missing}))
        return f"missing {', '.join(missing)}: apt-get install {names}"
    return None


class ContainerOnDemand:
    """The run's Debian container (benchmarks/container.py), booted under `base` on the
    first call, by whichever benchmark needs it first; later calls get the same one.
    A call returns (container or None, the reason there is none)."""

    def __init__(self, base):
        self.base = base
        self.state = {}

    def __call__(self):
        """Boot the container once, on first need; return (container or None, reason)."""
        if "container" not in self.state:
            reason = container_module.unavailable_reason()
            if os.environ.get("BENCH_NO_CONTAINER"):
                reason = "BENCH_NO_CONTAINER is set"
            if reason is None:
                progress("booting a Debian container (systemd-nspawn) for the parts that need systemd")
                container = container_module.BenchContainer(self.base / "container", log=progress)
                self.state["container"] = container
                try:
                    container.prepare()
                    container.boot()
                except Exception as error:  # noqa: BLE001 - reported as "not measured"
                    reason = f"the container did not boot: {str(error).splitlines()[0]}"
                    container.stop()
                    self.state["container"] = None
            else:
                self.state["container"] = None
            self.state["reason"] = reason
        return self.state["container"], self.state.get("reason")

    def stop(self):
        """Stop the container if one was booted."""
        if self.state.get("container") is not None:
            progress("stopping the container")
            self.state["container"].stop()
