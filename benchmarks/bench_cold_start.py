"""Cold start: how long `certrelay run` takes when there is nothing to do.

certbot's deploy hook only queues; a cron job or a systemd path unit then runs
`certrelay run`, most of the time on an empty queue. That start-up is what every host
pays again and again, so it is measured against the least any click program costs:
`python3 -c 'import click'` in the same interpreter (the target: at most 1.15× that),
with `python3 -c pass` to show what click itself costs. Each interpreter is measured:
Debian's python3, and the newest Python with the newest click (.cache/venv-newest, when
`make test-newest` has made it). For reference: the same without .pyc files (a service
that cannot write __pycache__ and was never byte-compiled), `--force` (the full batch
instead of the idle memo) and the write-up's shell script (benchmarks/writeup-post.sh).
A note lists which imports beyond click cost what (-X importtime), the first place to
look when the target is missed.

The commands take turns, one run each, the order rotated every turn, so that load
drifting on the machine hits all of them alike.
"""

import os
import re
import statistics
import subprocess
import time

from harness import HERE, NOTES, PYTHON, REPO, ROWS, Row, progress, ratio, rotated
from sandbox import Sandbox, install_certrelay
from tests.writeup import WRITE_UP_RULES

# Python 3.13 with the newest click (`make test-newest` makes it): the cold start's second interpreter.
PYTHON_NEWEST = REPO / ".cache" / "venv-newest" / "bin" / "python"
COLD_WARMUPS = 5  # turns; the first leaves the idle memo, as a cron run's predecessor would
COLD_RUNS = 100  # measured turns: each command runs this often


def interpreters():
    """Return [(label, python)]: Debian's python3, and 3.13 from .cache/venv-newest if made."""
    found = [("Debian python3", PYTHON)]
    if os.access(PYTHON_NEWEST, os.X_OK):
        version = subprocess.run([str(PYTHON_NEWEST), "-c", "import sys; print(*sys.version_info[:2], sep='.')"],
                                 capture_output=True, text=True).stdout.strip()
        found.append((f"Python {version} (venv-newest)", str(PYTHON_NEWEST)))
    return found


IMPORT_LINE = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S.*)$")


def import_profile(python, argv, environment, runs=7):
    """Return {module: (median self µs, first importer)} for the modules `argv` imports
    beyond `python -c 'import click'`, from `python -X importtime`, `runs` times each."""

    def imported(command):
        text = subprocess.run([python, "-X", "importtime", *command], env=environment, capture_output=True,
                              text=True, timeout=60).stderr
        rows = [(int(m[1]), len(m[3]), m[4].strip()) for m in map(IMPORT_LINE.match, text.splitlines()) if m]
        importers = {}
        for index, (_, depth, module) in enumerate(rows):
            # -X importtime prints a module after those it imports, indented deeper.
            importers[module] = next((row[2] for row in rows[index + 1:] if row[1] < depth), "-")
        return {module: us for us, _, module in rows}, importers

    click_modules = set(imported(["-c", "import click"])[0])
    samples, importers = {}, {}
    for _ in range(runs):
        times, parents = imported(argv)
        for module, us in times.items():
            samples.setdefault(module, []).append(us)
        importers.update(parents)
    # Only what most runs import: the first may do more (a full batch, before the idle memo).
    return {module: (statistics.median(values), importers[module])
            for module, values in samples.items() if module not in click_modules and len(values) > runs // 2}


def import_summary(profile, count=8):
    """Return text: the total, and the heaviest imports beyond click grouped under the
    certrelay module that first imported them."""
    groups = {}
    for module, (us, importer) in profile.items():
        owner = module
        while owner in profile and not owner.startswith("certrelay"):
            owner = profile[owner][1]
        groups.setdefault(owner if owner.startswith("certrelay") else "(other)", []).append((us, module))
    ranked = sorted(groups.items(), key=lambda item: -sum(us for us, _ in item[1]))
    parts = []
    for owner, modules in ranked[:count]:
        heavy = [f"{module} {us / 1e3:.1f}" for us, module in sorted(modules, reverse=True)[:4] if us >= 300]
        parts.append(f"{owner} {sum(us for us, _ in modules) / 1e3:.1f} ms ({', '.join(heavy)})")
    total = sum(us for us, _ in profile.values()) / 1e3
    return f"{total:.0f} ms of self time in {len(profile)} modules beyond click; by first importer: " + "; ".join(parts)


def spawn_timed(argv, environment):
    """Run `argv` (no shell) with its output discarded; return (wall s, CPU s of the child)."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        started = time.perf_counter()
        pid = os.posix_spawn(argv[0], argv, environment,
                             file_actions=[(os.POSIX_SPAWN_DUP2, devnull, 1), (os.POSIX_SPAWN_DUP2, devnull, 2)])
        _, status, usage = os.wait4(pid, 0)
        wall = time.perf_counter() - started
    finally:
        os.close(devnull)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {os.waitstatus_to_exitcode(status)}")
    return wall, usage.ru_utime + usage.ru_stime


def run(work):
    sandbox = Sandbox(work / "site", WRITE_UP_RULES, systemctl=None)
    commands = [("writeup-post.sh", ["/bin/sh", str(HERE / "writeup-post.sh")])]
    wrappers, runs = {}, {}  # label: installed wrapper; label: its `certrelay run` argv

    def run_argv(wrapper, name, *flags):
        # A state dir per command: a host has one installation, and the idle memo is
        # only read by the Python that wrote it.
        return [str(wrapper), "run", *flags, "--config-dir", str(sandbox.config_dir), "--rules",
                str(sandbox.rules), "--state-dir", str(work / "state" / name)]

    for label, python in interpreters():
        slug = "newest" if python != PYTHON else "debian"
        wrappers[label] = install_certrelay("", work / f"compiled-{slug}", python=python)
        runs[label] = run_argv(wrappers[label], slug)
        commands += [
            (f"certrelay run, {label}", runs[label]),
            (f"import click, {label}", [str(python), "-c", "import click"]),
            (f"pass, {label}", [str(python), "-c", "pass"]),
        ]
        if python == PYTHON:
            source = install_certrelay("", work / "source", compile_=False)
            commands.append((f"certrelay run (no .pyc), {label}", run_argv(source, "source")))
            # The full batch that a changed input (or --force) brings, for reference.
            commands.append((f"certrelay run --force, {label}", run_argv(wrappers[label], "force", "--force")))
    # Other load on the machine drifts: the commands take turns, one run each, the
    # order rotated every turn, so that drift spreads over all of them alike.
    # The .pyc-less copy must stay so: Python must not write __pycache__ there.
    environment = sandbox.environment(PYTHONDONTWRITEBYTECODE="1")
    pooled = {name: {"times": [], "cpu": []} for name, _ in commands}
    progress(f"cold: {len(commands)} commands, {COLD_WARMUPS} + {COLD_RUNS} runs each, taking turns")
    for turn in range(COLD_WARMUPS + COLD_RUNS):
        for name, argv in rotated(commands, turn):
            wall, cpu = spawn_timed(argv, environment)
            if turn >= COLD_WARMUPS:
                pooled[name]["times"].append(wall)
                pooled[name]["cpu"].append(cpu)
    if any((work / "source" / "lib" / "certrelay").glob("__pycache__")):
        raise RuntimeError("the .pyc-less certrelay copy got a __pycache__")
    results = {
        name: {"mean": statistics.mean(data["times"]), "median": statistics.median(data["times"]),
               "stddev": statistics.stdev(data["times"]), "cpu": statistics.mean(data["cpu"]),
               "runs": len(data["times"])}
        for name, data in pooled.items()
    }

    def show(name):
        result = results[name]
        return (f"median {result['median'] * 1e3:.1f} ms, mean {result['mean'] * 1e3:.1f} ± "
                f"{result['stddev'] * 1e3:.1f} ms (CPU {result['cpu'] * 1e3:.1f} ms)")

    def compare(name, base):
        a, b = results[name], results[base]
        text = f"{ratio(a['median'], b['median'])} (medians); {ratio(a['cpu'], b['cpu'])} (CPU)"
        return text

    for label, python in interpreters():
        click = f"import click, {label}"
        for name, what in ((f"certrelay run, {label}", "(target ≤ 1.15× import click)"),
                           (f"certrelay run (no .pyc), {label}", "(reference: as installed, it is byte-compiled)")):
            if name in results:
                ROWS.append(Row("cold", f"{name}, empty queue {what}", show(name),
                                f"python -c 'import click', {label}", show(click), compare(name, click)))
        name = f"certrelay run --force, {label}"
        if name in results:
            ROWS.append(Row("cold", f"reference: {name}, empty queue: the full batch, not the idle memo", show(name),
                            f"python -c 'import click', {label}", show(click), compare(name, click)))
        ROWS.append(Row("cold", f"reference: bare interpreter, {label}", "", "python -c pass",
                        show(f"pass, {label}"), f"click alone = {compare(click, f'pass, {label}')}"))
        floor = results[click]["median"] - results[f"pass, {label}"]["median"]
        NOTES.append(f"cold, {label}: click's import costs {floor * 1e3:.0f} ms over the bare interpreter; the"
                     f" 1.15× target leaves certrelay {results[click]['median'] * 0.15 * 1e3:.0f} ms of its own.")
    name = "certrelay run, Debian python3"
    ROWS.append(Row("cold", f"{name}, empty queue", show(name), "writeup-post.sh", show("writeup-post.sh"),
                    compare(name, "writeup-post.sh")))
    for label, python in interpreters():
        progress(f"cold: -X importtime, {label}")
        profile = import_profile(python, runs[label], sandbox.environment())
        NOTES.append(f"cold, imports of `certrelay run` beyond click, {label} (-X importtime, median of 7;"
                     f" importtime's own overhead inflates these): {import_summary(profile)}.")
    NOTES.append(
        f"cold: the {len(commands)} commands take turns, one run each, the order rotated every turn:"
        f" {COLD_WARMUPS} turns of warm-up, then {COLD_RUNS} measured (posix_spawn, output to /dev/null, wall"
        " time around spawn and wait4, CPU time from wait4's rusage); the ratio is of medians (the least"
        " disturbed by other load), then of mean CPU time (user + system). certrelay is installed as `make"
        " install` lays it out (PKGLIBDIR/certrelay + the bin/certrelay wrapper) for each interpreter, each"
        " command with its own state dir. \"no .pyc\": the modules are compiled from source at"
        " every start, which is what happens when nothing byte-compiled them at install time and the service"
        " cannot write __pycache__ (ProtectSystem=strict). The warm-ups leave the idle memo (STATE_DIR/idle) that"
        " a cron run finds when nothing changed, so `certrelay run` measures that path; `--force` always runs"
        " the full batch (lock, spool, state files, lineage scan)."
    )
