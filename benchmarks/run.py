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

Everything started here is stopped by its PID when the script ends, on errors and on
Ctrl-C too. Scratch files live in a temporary directory under /var/tmp, removed at the end
(kept if the environment has BENCH_KEEP=1, for a look at the logs). BENCH_NO_CONTAINER=1
makes the parts that need systemd act as if no container could be booted.
Each part is bounded in time; the whole run takes about 5 minutes.
"""

import contextlib
import dataclasses
import datetime
import json
import os
import platform
import pstats
import random
import re
import selectors
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(REPO))
import container as container_module  # noqa: E402
from tests.writeup import WRITE_UP_RULES  # noqa: E402

PYTHON = "/usr/bin/python3"
# Python 3.13 with the newest click (`make test-newest` makes it): the cold start's second interpreter.
PYTHON_NEWEST = REPO / ".cache" / "venv-newest" / "bin" / "python"
FAKE_SYSTEMCTL = REPO / "tests" / "fake_systemctl"
RESULTS = HERE / "RESULTS.md"
PARTS = ("cold", "scale", "latency", "idle", "downtime", "verify", "reconcile")

COLD_WARMUPS = 5  # turns; the first leaves the idle memo, as a cron run's predecessor would
COLD_RUNS = 100  # measured turns: each command runs this often
SCALE_NOTIFICATIONS = 10_000
SCALE_SIZES = (2_500, 5_000, 10_000)  # notifications, under 100 rules: linear in notifications?
SCALE_RULE_COUNTS = (25, 50, 100)  # rules, under 10,000 notifications: linear in rules?
SCALE_REPEATS = 3  # runs per configuration, interleaved; the median counts
VERIFY_ENDPOINTS = 100
RECONCILE_LINEAGES = 10_000
RECONCILE_REPEATS = 7
SCALE_BASELINE_CAP = 150.0  # seconds: a slower naive loop is stopped and extrapolated
LATENCY_PUBLICATIONS = 50
IDLE_SECONDS = 60
WRK_SECONDS = 10
WRK_CONNECTIONS = 4

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


def table():
    lines = [
        "| Part | Metric | certrelay | Baseline | Baseline value | Ratio (certrelay ÷ baseline) |",
        "|---|---|---|---|---|---|",
    ]
    for row in ROWS:
        cells = [row.part, row.metric, row.certrelay, row.baseline, row.baseline_value, row.ratio]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines)


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


# --- a throw-away certrelay installation ---------------------------------------------


def install_certrelay(root, prefix, compile_=True, python=PYTHON):
    """Lay certrelay out under ROOT+PREFIX as `make install` does (PREFIX/lib/certrelay,
    PREFIX/bin/certrelay with the paths filled in), for the interpreter `python`;
    byte-compile it unless not `compile_`. Return the wrapper's path as seen with ROOT as /."""
    base = Path(str(root) + str(prefix))
    package = base / "lib" / "certrelay"
    package.mkdir(parents=True, exist_ok=True)
    for source in sorted((REPO / "certrelay").glob("*.py")):
        shutil.copy(source, package / source.name)
    if compile_:
        subprocess.run([str(python), "-m", "compileall", "-q", str(package)], check=True)
    wrapper = base / "bin" / "certrelay"
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    text = (REPO / "bin" / "certrelay.in").read_text()
    wrapper.write_text(text.replace("@PYTHON@", str(python)).replace("@PKGLIBDIR@", f"{prefix}/lib"))
    wrapper.chmod(0o755)
    return Path(prefix) / "bin" / "certrelay"


class Sandbox:
    """A certbot config dir, rules, state dir and a bin/ with a systemctl, under `root`.

    `inside` is the path the consumer sees for `root` (a container's path), default
    the same.
    """

    def __init__(self, root, rules, systemctl=FAKE_SYSTEMCTL, inside=None):
        self.root = Path(root)
        self.inside = Path(inside or root)
        self.config_dir = self.root / "letsencrypt"
        self.queue = self.config_dir / "certrelay" / "queue"
        self.tmp = self.config_dir / "certrelay" / "tmp"
        self.claimed = self.config_dir / "certrelay" / "claimed"
        self.rules = self.root / "etc" / "rules.toml"
        self.state_dir = self.root / "state"
        self.bin = self.root / "bin"
        for directory in (self.queue, self.tmp, self.rules.parent, self.bin):
            directory.mkdir(parents=True, exist_ok=True)
        for directory in (self.root, self.rules.parent):
            directory.chmod(0o755)  # certrelay refuses rules a non-root user could change
        self.rules.write_text(rules)
        self.rules.chmod(0o644)
        if systemctl:
            shutil.copy(systemctl, self.bin / "systemctl")
            (self.bin / "systemctl").chmod(0o755)

    def see(self, path):
        """Return `path` (under root) as the consumer sees it."""
        return self.inside / Path(path).relative_to(self.root)

    def arguments(self):
        return ["--config-dir", str(self.see(self.config_dir)), "--rules", str(self.see(self.rules)),
                "--state-dir", str(self.see(self.state_dir))]

    def environment(self, **extra):
        environment = dict(os.environ, PATH=f"{self.bin}:{os.environ.get('PATH', '/usr/bin:/bin')}")
        for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "PYTHONPATH",
                    "CERTRELAY_CONFIG_DIR", "CERTRELAY_RULES", "CERTRELAY_STATE_DIR"):
            environment.pop(key, None)
        environment.update(extra)
        return environment

    def renew(self, name, version=None, pem=None):
        """Do to the files what a certbot renewal does: archive/NAME/certN.pem, new
        content (`pem`, else a placeholder that only its fingerprint tells apart), and
        live/NAME/cert.pem a relative link to it."""
        archive = self.config_dir / "archive" / name
        live = self.config_dir / "live" / name
        archive.mkdir(parents=True, exist_ok=True)
        live.mkdir(parents=True, exist_ok=True)
        version = version or len(os.listdir(archive)) + 1
        if pem is None:
            pem = f"-----BEGIN CERTIFICATE-----\n{name} {version} {time.time_ns()}\n-----END CERTIFICATE-----\n".encode()
        (archive / f"cert{version}.pem").write_bytes(pem)
        link = live / "cert.pem"
        if os.path.lexists(link):
            link.unlink()
        os.symlink(f"../../archive/{name}/cert{version}.pem", link)

    def notification(self, name, domains):
        """Return the bytes the deploy hook writes for lineage `name`."""
        now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        lineage = self.see(self.config_dir / "live" / name)
        return (f"version=1\nname={name}\nlineage={lineage}\ndomains={' '.join(domains)}\ntime={now}\n").encode()

    def publish(self, name, domains):
        """Publish as the hook does: write tmp/NAME.PID, sync it, rename it into the
        queue. Return the wall-clock time (time.time()) taken just before the rename."""
        temporary = self.tmp / f"{name}.{os.getpid()}"
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(descriptor, self.notification(name, domains))
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        started = time.time()
        os.rename(temporary, self.queue / name)
        return started

    def calls(self):
        try:
            return (self.bin / "calls").read_text().splitlines()
        except FileNotFoundError:
            return []


class Certificates:
    """Real X.509 certificates for benchmark lineages, made once per run and reused.

    `pem(name, domains)` returns a PEM certificate for `domains` (subjectAltName; CN the
    first), each distinct (its own serial), all signed with one EC P-256 key: certrelay
    fingerprints and parses each as it would a Let's Encrypt certificate. Made with
    python3-cryptography; without it, one certificate made by openssl is copied for every
    lineage (and the notes say so). `key_path` is that key, for TLS servers.
    """

    def __init__(self, directory):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.key_path = self.directory / "key.pem"
        self.made = {}
        try:
            from cryptography import x509
            from cryptography.hazmat.primitives import hashes, serialization
            from cryptography.hazmat.primitives.asymmetric import ec
        except ImportError:
            self.how = "one certificate made by openssl, copied for every lineage (no python3-cryptography)"
            certificate = self.directory / "cert.pem"
            subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                            "-nodes", "-keyout", str(self.key_path), "-out", str(certificate), "-days", "90",
                            "-subj", "/CN=bench.example"], check=True, capture_output=True)
            self.shared = certificate.read_bytes()
            return
        self.how = "a distinct certificate per lineage (python3-cryptography, EC P-256, 90 days)"
        self.shared = None
        self.x509, self.hashes, self.serialization = x509, hashes, serialization
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.key_path.write_bytes(self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
        self.issuer = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "certrelay bench CA")])
        self.now = datetime.datetime.now(datetime.timezone.utc)

    def pem(self, name, domains):
        if self.shared is not None:
            return self.shared
        if name not in self.made:
            x509 = self.x509
            sans = x509.SubjectAlternativeName([x509.DNSName(domain) for domain in domains])
            certificate = (
                x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, domains[0])]))
                .issuer_name(self.issuer).public_key(self.key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(self.now - datetime.timedelta(days=1))
                .not_valid_after(self.now + datetime.timedelta(days=89))
                .add_extension(sans, critical=False)
                .sign(self.key, self.hashes.SHA256())
            )
            self.made[name] = certificate.public_bytes(self.serialization.Encoding.PEM)
        return self.made[name]


CERTIFICATES = {}  # the one Certificates of this run, made on first need


def certificates(base):
    if "pool" not in CERTIFICATES:
        CERTIFICATES["pool"] = Certificates(base)
    return CERTIFICATES["pool"]


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


def wait_for(condition, timeout, what, interval=0.002):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class NotifySocket:
    """An AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET.

    A thread keeps reading it, as systemd does: unread, its queue fills up after a few
    messages and the daemon's next sd_notify blocks."""

    def __init__(self, path):
        self.path = str(path)
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(self.path)
        self.socket.settimeout(0.1)
        self.messages = []  # (monotonic time, text)
        self.closing = threading.Event()
        self.reader = threading.Thread(target=self._read, name="notify-socket", daemon=True)
        self.reader.start()

    def _read(self):
        while not self.closing.is_set():
            try:
                data = self.socket.recv(4096)
            except (socket.timeout, BlockingIOError):
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode("utf-8", "replace")))

    def count(self, word, since=None):
        return sum(word in text.split("\n") for moment, text in list(self.messages) if since is None or moment >= since)

    def wait_for(self, word, timeout):
        wait_for(lambda: self.count(word) > 0, timeout, f"{word} on the notify socket", 0.01)

    def close(self):
        self.closing.set()
        self.reader.join()
        self.socket.close()


# --- 1. cold start --------------------------------------------------------------------


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


def rotated(items, turn):
    """Return the list `items` rotated left by `turn`: contenders taking turns start in
    a different order every turn, so that load drift hits all alike."""
    shift = turn % len(items)
    return items[shift:] + items[:shift]


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


def part_cold(work):
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


# --- 2. scale -------------------------------------------------------------------------

SCALE_UNITS = (
    "apache2", "nginx", "haproxy", "dovecot", "exim4", "postfix", "prosody", "ejabberd", "coturn",
    "mosquitto", "slapd", "vsftpd", "proftpd", "squid", "gitea", "grafana-server", "keycloak",
    "mumble-server", "znc", "inspircd",
)


def scale_certificates(count):
    """Return [(name, domains)]: names in 50 groups; some have a mail host or a wildcard."""
    certificates = []
    for index in range(count):
        group = index % 50
        name = f"n{index:05d}.g{group:02d}.example"
        domains = [name, f"www.{name}"]
        if index % 3 == 0:
            domains.append(f"mail.g{group:02d}.example")
        if index % 7 == 0:
            domains.append(f"*.{name}")
        certificates.append((name, domains))
    return certificates


def scale_rules(count=100):
    """Return `count` (at most 100) rules over up to 20 units: a catch-all, lineage-name
    globs, mail-host domains, domain globs, one rule naming a wildcard certificate's domain;
    all three verbs. Fewer than 100 takes an even spread of the 100, the catch-all first."""
    blocks = [['match = ["*"]', 'reload = ["apache2"]']]
    for group in range(1, 50):  # 49 rules: one unit per group of lineage names
        verb = "restart" if group % 5 == 0 else "reload"
        blocks.append([f'match = ["n*.g{group:02d}.example"]', f'{verb} = ["{SCALE_UNITS[1 + group % 19]}"]'])
    for group in range(25):  # 25 rules: the mail host's domain
        units = '"dovecot", "exim4"' if group % 2 == 0 else '"postfix"'
        blocks.append([f'domains = ["mail.g{group:02d}.example"]', f"restart = [{units}]"])
    for last in range(0, 96, 4):  # 24 rules: a domain glob on the last two digits
        blocks.append([f'domains = ["*{last:02d}.g*.example"]', f'reload-or-restart = ["{SCALE_UNITS[10 + last % 10]}"]'])
    blocks.append(['match = ["n0000*"]', 'domains = ["*.n09996.g46.example"]', 'reload-or-restart = ["haproxy"]'])
    assert len(blocks) == 100
    chosen = [blocks[index * len(blocks) // count] for index in range(count)]
    lines = ["[settings]", "min-interval = 0", ""]
    for block in chosen:
        lines += ["[[rule]]", *block, ""]
    return "\n".join(lines)


def run_measured(argv, env, log, timeout=None, group=False):
    """Run `argv` under /usr/bin/time to completion (or `timeout`), its output in the
    file `log`. Return (wall s, {"maxrss": KiB, "cpu": s} or None if killed, exit
    status, timed out, the log's text).

    /usr/bin/time, not wait4() here: a child forked from this (large) Python process
    would report this process's RSS as its peak (the kernel records the old memory's
    high-water mark at exec); /usr/bin/time is small."""
    usage_file = Path(log).with_suffix(".time")
    started = time.monotonic()
    with open(log, "wb") as output:
        process = PROCESSES.start(["/usr/bin/time", "-f", "%M %U %S", "-o", str(usage_file), *argv],
                                  group=group, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        process.wait(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        timed_out = True
        PROCESSES.stop(process)
    wall = time.monotonic() - started
    usage = None
    if not timed_out:
        maxrss, user, system = usage_file.read_text().split()[-3:]
        usage = {"maxrss": int(maxrss), "cpu": float(user) + float(system)}
    return wall, usage, process.returncode, timed_out, Path(log).read_text(errors="replace")


def hotspots(profile, count=6):
    """Return the certrelay functions with the largest cumulative time in the cProfile
    output `profile`, below the command's own entry points, as text."""
    stats = pstats.Stats(str(profile))
    total = max(entry[3] for entry in stats.stats.values())
    entry_points = {"run", "wrapper", "main", "process", "settle_batch", "<module>"}
    own = sorted(
        ((cumulative, f"{Path(file).stem}.{function}")
         for (file, _, function), (_, _, _, cumulative, _) in stats.stats.items()
         if f"{os.sep}certrelay{os.sep}" in file and function not in entry_points and not function.startswith("<")),
        reverse=True)
    return ", ".join(f"{name} {cumulative / total:.0%}" for cumulative, name in own[:count])


FLOOR = ("floor", 0)  # scale-floor.py's turn among the scale configurations


def part_scale(work):
    missing = require("/usr/bin/time")
    if missing:
        ROWS.append(Row("scale", "10,000 notifications", f"not measured: {missing}"))
        return
    sys.path.insert(0, str(REPO))
    try:
        from certrelay import matcher, plan as plan_module, rules as rules_module, spool as spool_module
    finally:
        sys.path.remove(str(REPO))
    # One config dir per size: certrelay looks at every lineage under live/ (reconcile,
    # expiry), so a smaller batch must come with fewer lineages, not just fewer notifications.
    sites = {count: Sandbox(work / f"site-{count}", scale_rules()) for count in SCALE_SIZES}
    sandbox = sites[SCALE_NOTIFICATIONS]
    wrapper = install_certrelay("", work / "install")
    rule_files = {}
    for count in SCALE_RULE_COUNTS:
        rule_files[count] = sandbox.rules.parent / f"rules-{count}.toml"
        rule_files[count].write_text(scale_rules(count))
        rule_files[count].chmod(0o644)
    rules = rules_module.load(str(sandbox.rules))
    certificates_ = scale_certificates(SCALE_NOTIFICATIONS)
    pool = certificates(work.parent / "certificates")
    progress(f"scale: making {len(certificates_):,} live certificates ({pool.how}) and notifications")
    contents = {count: {} for count in SCALE_SIZES}
    for index, (name, domains) in enumerate(certificates_):
        for count, site in sites.items():
            if index < count:
                site.renew(name, version=1, pem=pool.pem(name, domains))
                contents[count][name] = site.notification(name, domains)

    def fill_queue(count=SCALE_NOTIFICATIONS):
        for name, data in contents[count].items():
            (sites[count].queue / name).write_bytes(data)

    def run_batch(count, rule_count, tag):
        """`certrelay run` on `count` notifications under `rule_count` rules, with a fresh
        state dir (else every certificate is "unchanged"). Return (wall s, usage, calls, log)."""
        site = sites[count]
        fill_queue(count)
        arguments = ["--config-dir", str(site.config_dir), "--rules", str(rule_files[rule_count]),
                     "--state-dir", str(work / f"state-{tag}")]
        wall, usage, status, _, log = run_measured([str(wrapper), "run", *arguments], site.environment(),
                                                   work / f"certrelay-{tag}.log", timeout=300)
        calls = site.calls()
        (site.bin / "calls").unlink(missing_ok=True)
        left = os.listdir(site.queue) + os.listdir(site.claimed)
        if status != 0 or left:
            raise RuntimeError(f"certrelay run exited {status}, left {len(left)} entries:\n{log[-2000:]}")
        return wall, usage, calls, log

    def run_floor(tag):
        """scale-floor.py on the full queue: the least work any program does with it."""
        fill_queue()
        wall, _, status, _, log = run_measured([PYTHON, str(HERE / "scale-floor.py"), str(sandbox.config_dir)],
                                               sandbox.environment(), work / f"floor-{tag}.log", timeout=300)
        left = os.listdir(sandbox.queue) + os.listdir(sandbox.claimed)
        if status != 0 or left:
            raise RuntimeError(f"scale-floor.py exited {status}, left {len(left)} entries:\n{log[-2000:]}")
        return wall, None, None, log

    # Linearity: every configuration SCALE_REPEATS times, interleaved, the median run
    # counts; FLOOR (scale-floor.py) takes its turn among them.
    configs = [(count, 100) for count in SCALE_SIZES]
    configs += [(SCALE_NOTIFICATIONS, rule_count) for rule_count in SCALE_RULE_COUNTS if rule_count != 100]
    measured = {config: [] for config in configs + [FLOOR]}
    for round_number in range(SCALE_REPEATS):
        turns = configs + [FLOOR]
        for count, rule_count in rotated(turns, round_number):
            tag = f"{count}-{rule_count}-{round_number}"
            if (count, rule_count) == FLOOR:
                progress(f"scale: the floor, {SCALE_NOTIFICATIONS:,} notifications (round {round_number + 1})")
                measured[FLOOR].append(run_floor(tag))
                continue
            progress(f"scale: certrelay run, {count:,} notifications, {rule_count} rules"
                     f" (round {round_number + 1} of {SCALE_REPEATS})")
            measured[count, rule_count].append(run_batch(count, rule_count, tag))
    median_run = {config: sorted(runs, key=lambda run: run[0])[len(runs) // 2] for config, runs in measured.items()}
    wall, usage, calls, stderr = median_run[SCALE_NOTIFICATIONS, 100]
    certrelay_cpu, certrelay_rss = usage["cpu"], usage["maxrss"]
    log_lines = stderr.splitlines()
    longest = max((len(line.encode()) for line in log_lines), default=0)

    # Matching alone, in this process: the simple matcher (Rule.selects per rule) vs
    # certrelay.matcher (built once, included), on the same certificates, interleaved.
    timings = {"simple": [], "matcher": []}
    for _ in range(3):
        started = time.perf_counter()
        simple = [[rule.line for rule in rules.rules if rule.selects(name, domains)] for name, domains in certificates_]
        timings["simple"].append(time.perf_counter() - started)
        started = time.perf_counter()
        fast = matcher.Matcher(rules.rules)
        indexed = [[rule.line for rule in fast.matching(name, domains)] for name, domains in certificates_]
        timings["matcher"].append(time.perf_counter() - started)
        if indexed != simple:
            raise RuntimeError("certrelay.matcher disagrees with the simple matcher on the scale rules")

    # What each certificate needs, by certrelay's own matching: the naive loop's plan.
    plans, units = [], set()
    for name, domains in certificates_:
        notification = spool_module.Notification(entry=name, name=name, lineage="", domains=tuple(domains), time="")
        actions = plan_module.make_plan([notification], rules, str(sandbox.config_dir)).actions
        plans.append(f"{name} " + " ".join(f"{action.verb}:{action.target}" for action in actions))
        units |= {action.target for action in actions}
    (work / "plan.txt").write_text("\n".join(plans) + "\n")
    naive_calls = sum(len(line.split()) - 1 for line in plans)

    # Where the time goes: the same batch again under cProfile.
    fill_queue()
    progress("scale: certrelay run again under cProfile, for the hotspots")
    arguments = sandbox.arguments()
    arguments[arguments.index(str(sandbox.state_dir))] = str(work / "state-profile")
    done = subprocess.run([PYTHON, "-m", "cProfile", "-o", str(work / "run.prof"), str(wrapper), "run", *arguments],
                          env=sandbox.environment(), capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"certrelay run under cProfile exited {done.returncode}:\n{done.stderr[-2000:]}")
    NOTES.append("scale: cProfile of certrelay's batch, cumulative share of the run: " + hotspots(work / "run.prof"))
    (sandbox.bin / "calls").unlink(missing_ok=True)

    fill_queue()
    progress(f"scale: naive shell loop, {naive_calls:,} systemctl calls expected (stopped after {SCALE_BASELINE_CAP:g} s)")
    base_wall, base_usage, base_status, timed_out, base_stderr = run_measured(
        ["/bin/sh", str(HERE / "naive-loop.sh"), str(sandbox.queue), str(work / "plan.txt")],
        sandbox.environment(), work / "naive.log", timeout=SCALE_BASELINE_CAP, group=True)
    base_calls = len(sandbox.calls())
    if not timed_out and (base_status != 0 or base_calls != naive_calls):
        raise RuntimeError(f"naive loop exited {base_status} after {base_calls} calls:\n{base_stderr[-2000:]}")
    label = "naive loop (sh, per notification per unit)"
    if timed_out:
        base_wall /= base_calls / naive_calls
        label += f", extrapolated from {base_calls:,} of {naive_calls:,} calls"
        base_calls = naive_calls
    metric = f"{SCALE_NOTIFICATIONS:,} notifications, {len(rules.rules)} rules"
    walls = ", ".join(seconds(run[0]) for run in measured[SCALE_NOTIFICATIONS, 100])
    ROWS.append(Row("scale", f"{metric}: wall time (target ≤ 1 s)", f"{seconds(wall)} (median of {walls})", label,
                    seconds(base_wall), ratio(wall, base_wall)))
    floor = median_run.pop(FLOOR)[0]
    ROWS.append(Row("scale", f"{metric}: wall time against the floor", seconds(wall),
                    "the floor: scale-floor.py (claim, read and delete each notification; read, hash and parse"
                    " each certificate; nothing else)", seconds(floor), ratio(wall, floor)))
    if base_usage:
        ROWS.append(Row("scale", f"{metric}: CPU time (user+sys, with children)", seconds(certrelay_cpu), label,
                        seconds(base_usage["cpu"]), ratio(certrelay_cpu, base_usage["cpu"])))
    check = "= distinct units ✓" if len(calls) == len(units) else f"≠ {len(units)} distinct units ✗"
    ROWS.append(Row("scale", f"{metric}: systemctl calls", f"{len(calls)} ({check}: {len(units)})", label,
                    f"{base_calls:,}", ratio(len(calls), base_calls)))
    ROWS.append(Row("scale", f"{metric}: peak memory (max RSS of the process tree)", f"{certrelay_rss / 1024:.1f} MiB",
                    label, f"{base_usage['maxrss'] / 1024:.1f} MiB" if base_usage else "n/a (stopped)",
                    ratio(certrelay_rss, base_usage["maxrss"]) if base_usage else ""))
    # Linear: the wall time of each size against 10,000's scaled down in proportion.
    for count, rule_count in configs:
        if (count, rule_count) == (SCALE_NOTIFICATIONS, 100):
            continue
        share = count / SCALE_NOTIFICATIONS if rule_count == 100 else rule_count / 100
        what = f"{count:,} notifications, 100 rules" if rule_count == 100 else f"10,000 notifications, {rule_count} rules"
        ours = median_run[count, rule_count][0]
        ROWS.append(Row("scale", f"linearity: {what}: wall time", seconds(ours),
                        f"10,000 × 100 scaled by {share:g} (linear)", seconds(wall * share), ratio(ours, wall * share)))
    simple_time, matcher_time = statistics.median(timings["simple"]), statistics.median(timings["matcher"])
    ROWS.append(Row("scale", f"{metric}: rule matching alone, in process", f"certrelay.matcher {seconds(matcher_time)}",
                    "simple matcher (fnmatch per rule, per pattern, per domain)", seconds(simple_time),
                    ratio(matcher_time, simple_time)))
    NOTES.append(
        f"scale: {SCALE_NOTIFICATIONS:,} queue files in the hook's format, each with its live certificate: {pool.how};"
        " rules: one catch-all, 49 lineage-name globs, 25 mail-domain rules, 24 domain globs, 1 mixed (20 units,"
        " reload, restart, reload-or-restart; fewer rules: an even spread of these); every seventh certificate"
        " is a wildcard one. Each configuration ran"
        f" {SCALE_REPEATS} times, interleaved, each with a fresh state dir; the median run counts. Linearity: a"
        " ratio of 1 is linear; above 1 the smaller run costs more than its share (the fixed start-up cost"
        " shows there). Both use the recording fake systemctl (tests/fake_systemctl, about 3 ms a call). The"
        " naive loop gets each certificate's units precomputed (certrelay's own matching), so it measures the"
        " calls alone. Peak memory and CPU time: /usr/bin/time (%M: the largest RSS of the process and its"
        f" descendants; %U + %S). certrelay's log of this batch: {len(log_lines)} lines, the longest"
        f" {longest:,} bytes. Smaller batches: a config dir holding only their lineages. Matching alone: median of 3, the matcher's build included, results"
        " checked equal."
    )
    NOTES.append(
        "scale, the floor: benchmarks/scale-floor.py, same interpreter, same queue, its turn among the runs above;"
        " no check of names, sizes, links or contents, no rules, no state, no log. "
        + (f"The floor alone takes {seconds(floor)}: more than the 1 s target on this machine."
           if floor > 1 else f"The floor takes {seconds(floor)}: the 1 s target leaves certrelay {seconds(1 - floor)}"
           " for everything the floor skips.")
    )


# --- 3. latency -----------------------------------------------------------------------

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


def part_latency(work, get_container):
    missing = require("inotifywait", "bash")
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
        PROCESSES.start([str(wrapper), "watch", *sandbox.arguments()], env=sandbox.environment(NOTIFY_SOCKET=notify.path),
                        stdout=subprocess.DEVNULL, stderr=open(work / "watch.log", "wb"))
        notify.wait_for("READY=1", 30)
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


# --- 4. idle --------------------------------------------------------------------------


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


def part_idle(work):
    missing = require("inotifywait")
    wrapper = install_certrelay("", work / "install")
    sandbox = Sandbox(work / "site", WRITE_UP_RULES)
    notify = NotifySocket(work / "notify.sock")
    try:
        watch = PROCESSES.start(
            [str(wrapper), "watch", *sandbox.arguments()],
            env=sandbox.environment(NOTIFY_SOCKET=notify.path, WATCHDOG_USEC="60000000"),
            stdout=subprocess.DEVNULL, stderr=open(work / "watch.log", "wb"))
        notify.wait_for("READY=1", 30)
        processes = {"certrelay watch": watch}
        if not missing:
            other = work / "other-queue"
            other.mkdir()
            processes["inotifywait -m"] = PROCESSES.start(
                ["inotifywait", "-m", "-q", "-e", "moved_to,close_write", str(other)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        processes["sleep"] = PROCESSES.start(["sleep", str(IDLE_SECONDS + 30)])
        time.sleep(1.0)  # past start-up
        progress(f"idle: {', '.join(processes)} side by side for {IDLE_SECONDS} s")
        before = {label: process_sample(process.pid) for label, process in processes.items()}
        started = time.monotonic()
        time.sleep(IDLE_SECONDS)
        after = {label: process_sample(process.pid) for label, process in processes.items()}
        elapsed = time.monotonic() - started
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


# --- 5. downtime ----------------------------------------------------------------------

WRK_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
WRK_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")
WRK_REQUESTS = re.compile(r"(\d+) requests in")


def parse_wrk(text):
    errors = WRK_ERRORS.search(text)
    socket_errors = sum(int(value) for value in errors.groups()) if errors else 0
    non2xx = int(WRK_NON2XX.search(text).group(1)) if WRK_NON2XX.search(text) else 0
    requests = int(WRK_REQUESTS.search(text).group(1))
    detail = f"connect {errors.group(1)}, read {errors.group(2)}, write {errors.group(3)}, timeout {errors.group(4)}" \
        if errors else "no socket errors"
    return {"failed": socket_errors + non2xx, "requests": requests, "non2xx": non2xx, "detail": detail}


def load_run(wrk_prefix, trigger, label):
    """Run wrk for WRK_SECONDS; call `trigger()` half-way. Return parse_wrk's dict + trigger time."""
    argv = [*wrk_prefix, "wrk", "-t", "2", "-c", str(WRK_CONNECTIONS), "-d", f"{WRK_SECONDS}s", "https://127.0.0.1/"]
    progress(f"downtime: wrk {WRK_SECONDS} s, {WRK_CONNECTIONS} connections: {label}")
    process = PROCESSES.start(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    # A TLS handshake every 5 ms alongside, for the length of the outage.
    probe = PROCESSES.start([*wrk_prefix, PYTHON, str(HERE / "probe.py"), "127.0.0.1", "443", str(WRK_SECONDS - 1)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    time.sleep(WRK_SECONDS / 2)
    took = None
    if trigger is not None:
        started = time.monotonic()
        trigger()
        took = time.monotonic() - started
    output, _ = process.communicate(timeout=WRK_SECONDS + 30)
    text = output.decode(errors="replace")
    if process.returncode != 0 or not WRK_REQUESTS.search(text):
        raise RuntimeError(f"wrk failed ({process.returncode}):\n{text}")
    result = parse_wrk(text)
    result["took"] = took
    probed, _ = probe.communicate(timeout=30)
    try:
        result["probe"] = json.loads(probed.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise RuntimeError(f"the outage probe failed ({probe.returncode}):\n{probed.decode(errors='replace')}") from None
    return result


def downtime_rows(results, how):
    def show(result):
        text = f"{result['failed']:,} failed of {result['requests']:,} ({result['detail']}, non-2xx {result['non2xx']})"
        probe = result["probe"]
        text += f"; TLS probe every 5 ms: {probe['failures']} of {probe['probes']} failed"
        if probe["failures"]:
            text += f", longest outage {seconds(probe['longest_outage'])}"
        if result["took"] is not None:
            text += f"; renewal + certrelay run took {seconds(result['took'])}"
        return text

    ROWS.append(Row("downtime", f"failed requests, {how[0]} via certrelay", show(results["reload"]),
                    f"{how[1]} via certrelay", show(results["restart"]),
                    ratio(results["reload"]["failed"], results["restart"]["failed"])))
    ROWS.append(Row("downtime", "failed requests, no renewal (control)", "", "wrk alone", show(results["control"])))


def part_downtime(work, get_container):
    missing = require("wrk")
    if missing:
        ROWS.append(Row("downtime", "failed requests", f"not measured: {missing}"))
        return
    container, reason = get_container()
    if container is None:
        progress(f"downtime: no container ({reason}); apache2 in a network namespace instead")
        return part_downtime_netns(work, reason)
    container.run(["a2enmod", "-q", "ssl"])
    container.run(["a2ensite", "-q", "default-ssl"])
    container.run(["systemctl", "restart", "apache2"])
    probe = [*container.enter("n"), PYTHON, "-c",
             "import ssl, urllib.request; c = ssl._create_unverified_context();"
             " urllib.request.urlopen('https://127.0.0.1/', context=c, timeout=2).read()"]
    wait_for(lambda: subprocess.run(probe, capture_output=True).returncode == 0, 20, "apache2 to serve HTTPS", 0.2)
    wrapper = install_certrelay(container.root, "/opt/certrelay")
    results = {"control": load_run(container.enter("n"), None, "no renewal (control)")}
    for verb in ("reload", "restart"):
        site = container.host_path(f"/srv/downtime-{verb}")
        rules = f"[settings]\nmin-interval = 0\n\n[[rule]]\nmatch = [\"*\"]\n{verb} = [\"apache2\"]\n"
        sandbox = Sandbox(site, rules, systemctl=None, inside=f"/srv/downtime-{verb}")

        def trigger(sandbox=sandbox, verb=verb):
            sandbox.renew("example.org")
            sandbox.publish("example.org", ["example.org", "www.example.org"])
            done = container.run([str(wrapper), "run", *sandbox.arguments()], check=False)
            if done.returncode != 0 or f"done: {verb} apache2.service" not in done.stderr:
                raise RuntimeError(f"certrelay run ({verb}) failed ({done.returncode}):\n{done.stdout}{done.stderr}")

        container.run(["systemctl", "is-active", "apache2"])
        time.sleep(1.0)
        results[verb] = load_run(container.enter("n"), trigger, f"certrelay -> systemctl {verb} apache2")
    downtime_rows(results, ("`systemctl reload apache2`", "`systemctl restart apache2`"))
    NOTES.append(
        "downtime: apache2 2.4 (mpm_event, Debian's default-ssl site with the snakeoil certificate) under"
        " systemd in a booted Debian 12 container with its own network namespace; wrk (on the host, in that"
        f" namespace) -t2 -c{WRK_CONNECTIONS} -d{WRK_SECONDS}s https://127.0.0.1/; at {WRK_SECONDS / 2:g} s a"
        " certificate is renewed, a notification published, and `certrelay run` (inside the container) calls the"
        " real systemctl. Failed = wrk's socket errors (connect, read, write, timeout) + non-2xx responses."
        " Debian's apache2.service: reload = `apachectl graceful`, restart = graceful-stop + start. Alongside"
        " wrk, benchmarks/probe.py makes a fresh TLS handshake every 5 ms: the longest outage is the time from a"
        " failed handshake to the next good one."
    )


def part_downtime_netns(work, container_reason):
    """Fallback: apache2 started by hand in a private network namespace; certrelay's
    systemctl is a shim turning reload into `apache2 -k graceful`, restart into `-k restart`."""
    missing = require("apache2", "ip")
    if missing:
        ROWS.append(Row("downtime", "failed requests", f"not measured: no container ({container_reason}), and {missing}"))
        return
    namespace = f"certrelay-bench-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", namespace, "ip", "link", "set", "lo", "up"], check=True)
        site = work / "apache"
        (site / "logs").mkdir(parents=True)
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                        "-keyout", str(site / "key.pem"), "-out", str(site / "cert.pem"), "-days", "2",
                        "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
        (site / "htdocs").mkdir()
        (site / "htdocs" / "index.html").write_text("<html><body>" + "certrelay " * 1000 + "</body></html>\n")
        modules = "/usr/lib/apache2/modules"
        (site / "httpd.conf").write_text(f"""\
ServerRoot {site}
PidFile {site}/httpd.pid
ErrorLog {site}/logs/error.log
LoadModule mpm_event_module {modules}/mod_mpm_event.so
LoadModule authz_core_module {modules}/mod_authz_core.so
LoadModule mime_module {modules}/mod_mime.so
LoadModule dir_module {modules}/mod_dir.so
LoadModule socache_shmcb_module {modules}/mod_socache_shmcb.so
LoadModule ssl_module {modules}/mod_ssl.so
User www-data
Group www-data
Listen 127.0.0.1:443
ServerName 127.0.0.1
DocumentRoot {site}/htdocs
DirectoryIndex index.html
TypesConfig /etc/mime.types
SSLSessionCache shmcb:{site}/ssl_scache(512000)
<VirtualHost 127.0.0.1:443>
    SSLEngine on
    SSLCertificateFile {site}/cert.pem
    SSLCertificateKeyFile {site}/key.pem
</VirtualHost>
""")
        site.chmod(0o755)
        apache = [shutil.which("apache2"), "-f", str(site / "httpd.conf")]
        # The shim's systemctl: reload -> graceful (USR1), restart -> restart (HUP).
        shim = work / "shim-systemctl"
        shim.write_text("#!/bin/sh\ncase \"$1\" in reload) k=graceful;; restart) k=restart;; *) exit 0;; esac\n"
                        f"exec {' '.join(apache)} -k \"$k\"\n")
        shim.chmod(0o755)
        subprocess.run(["ip", "netns", "exec", namespace, *apache, "-k", "start"], check=True,
                       env=dict(os.environ, APACHE_RUN_DIR=str(site), APACHE_LOG_DIR=str(site / "logs")))
        pid_file = site / "httpd.pid"
        wait_for(pid_file.exists, 10, "apache2 to start", 0.05)
        apache_pid = int(pid_file.read_text())
        try:
            prefix = ["ip", "netns", "exec", namespace]
            wrapper = install_certrelay("", work / "install")
            results = {"control": load_run(prefix, None, "no renewal (control)")}
            for verb in ("reload", "restart"):
                rules = f"[settings]\nmin-interval = 0\n\n[[rule]]\nmatch = [\"*\"]\n{verb} = [\"apache2\"]\n"
                sandbox = Sandbox(work / f"site-{verb}", rules, systemctl=shim)

                def trigger(sandbox=sandbox, verb=verb):
                    sandbox.renew("example.org")
                    sandbox.publish("example.org", ["example.org"])
                    done = subprocess.run([str(wrapper), "run", *sandbox.arguments()],
                                          env=sandbox.environment(), capture_output=True, text=True, timeout=120)
                    if done.returncode != 0:
                        raise RuntimeError(f"certrelay run ({verb}) failed:\n{done.stderr}")
                    said = "SIGUSR1 received" if verb == "reload" else "SIGHUP received"
                    wait_for(lambda: said in (site / "logs" / "error.log").read_text(errors="replace"), 10,
                             f"apache2 to log {said!r}", 0.05)
                    (site / "logs" / "error.log").write_text("")

                time.sleep(1.0)
                results[verb] = load_run(prefix, trigger, "certrelay -> apache2 -k " + (
                    "graceful" if verb == "reload" else "restart"))
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(apache_pid, signal.SIGTERM)  # the apache2 parent we started
            wait_for(lambda: not Path(f"/proc/{apache_pid}").exists(), 15, "apache2 to stop", 0.05)
    finally:
        subprocess.run(["ip", "netns", "delete", namespace], check=False)
    downtime_rows(results, ("`apache2 -k graceful` (no systemd)", "`apache2 -k restart` (no systemd)"))
    NOTES.append(
        f"downtime: no systemd available ({container_reason}): apache2 started by hand in a private network"
        " namespace; certrelay's systemctl was a shim running `apache2 -k graceful` (reload) and `-k restart`"
        " (restart: SIGHUP, the parent keeps its listening socket, unlike systemctl restart)."
    )


# --- 6. verify -----------------------------------------------------------------------


class TLSServers:
    """TLS servers on 127.0.0.1, one port per (certificate file, key file), in this
    process: one thread accepts on every port, a thread per connection does the
    handshake (so that the servers are never the bottleneck) and answers one HTTP
    request with 200. `ports` lists the ports in the order of the pairs."""

    def __init__(self, pairs):
        self.selector = selectors.DefaultSelector()
        self.ports = []
        for certificate, key in pairs:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(certificate, key)
            listener = socket.socket()
            listener.bind(("127.0.0.1", 0))
            listener.listen(128)
            listener.setblocking(False)
            self.selector.register(listener, selectors.EVENT_READ, context)
            self.ports.append(listener.getsockname()[1])
        self.closing = threading.Event()
        self.acceptor = threading.Thread(target=self._accept, name="tls-accept", daemon=True)
        self.acceptor.start()

    def _accept(self):
        while not self.closing.is_set():
            for key, _ in self.selector.select(0.1):
                with contextlib.suppress(BlockingIOError):
                    connection, _ = key.fileobj.accept()
                    threading.Thread(target=self._serve, args=(connection, key.data), daemon=True).start()

    @staticmethod
    def _serve(connection, context):
        connection.setblocking(True)
        connection.settimeout(5)
        with contextlib.suppress(OSError), context.wrap_socket(connection, server_side=True) as tls:
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = tls.recv(4096)
                if not chunk:
                    return
                request += chunk
            tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    def close(self):
        self.closing.set()
        self.acceptor.join()
        for key in list(self.selector.get_map().values()):
            key.fileobj.close()
        self.selector.close()


def part_verify(work):
    wrapper = install_certrelay("", work / "install")
    pool = certificates(work.parent / "certificates")
    lineages = [(f"v{index:03d}.example", [f"v{index:03d}.example", f"www.v{index:03d}.example"])
                for index in range(VERIFY_ENDPOINTS)]
    sandbox = Sandbox(work / "site", "")
    pairs = []
    for name, domains in lineages:
        sandbox.renew(name, version=1, pem=pool.pem(name, domains))
        pairs.append((sandbox.config_dir / "live" / name / "cert.pem", pool.key_path))
    servers = TLSServers(pairs)
    try:
        rules = ["[settings]", "min-interval = 0", ""]
        for (name, _), port in zip(lineages, servers.ports):
            rules += ["[[rule]]", f'match = ["{name}"]', 'reload = ["apache2"]', f'verify = ["https://127.0.0.1:{port}"]', ""]
        sandbox.rules.write_text("\n".join(rules))
        command = [str(wrapper), "verify", *sandbox.arguments()]
        probe = subprocess.run([str(wrapper), "verify", "--help"], env=sandbox.environment(),
                               capture_output=True, text=True, timeout=60)
        if probe.returncode != 0:
            reason = (probe.stderr.strip().splitlines() or ["exit status " + str(probe.returncode)])[-1]
            ROWS.append(Row("verify", f"{VERIFY_ENDPOINTS} endpoints, all current (target ≤ 1 s)",
                            f"not available: `certrelay verify --help`: {reason[:160]}"))
            return
        # Baseline: what an admin's script does, one endpoint after the other.
        missing = require("openssl")
        loop = ("for port in \"$@\"; do openssl s_client -connect 127.0.0.1:$port </dev/null 2>/dev/null"
                " | openssl x509 -noout -fingerprint -sha256 >/dev/null || exit 1; done")
        baseline = None if missing else ["/bin/sh", "-c", loop, "sh", *map(str, servers.ports)]
        walls = {"certrelay": [], "openssl": []}
        for round_number in range(5):
            progress(f"verify: certrelay verify of {VERIFY_ENDPOINTS} endpoints, round {round_number + 1} of 5")
            started = time.monotonic()
            done = subprocess.run(command, env=sandbox.environment(), capture_output=True, text=True, timeout=300)
            walls["certrelay"].append(time.monotonic() - started)
            if done.returncode != 0:
                raise RuntimeError(f"certrelay verify exited {done.returncode}:\n{done.stderr[-2000:]}")
            if baseline:
                started = time.monotonic()
                subprocess.run(baseline, check=True, timeout=300, stdin=subprocess.DEVNULL)
                walls["openssl"].append(time.monotonic() - started)
        ours = statistics.median(walls["certrelay"])
        metric = f"{VERIFY_ENDPOINTS} endpoints on 127.0.0.1, all current: wall time (target ≤ 1 s)"
        if baseline:
            theirs = statistics.median(walls["openssl"])
            ROWS.append(Row("verify", metric, seconds(ours), "sequential `openssl s_client | openssl x509` loop (sh)",
                            seconds(theirs), ratio(ours, theirs)))
        else:
            ROWS.append(Row("verify", metric, seconds(ours), "openssl loop", f"not measured: {missing}"))
        NOTES.append(
            f"verify: {VERIFY_ENDPOINTS} lineages, each with its own certificate ({pool.how}), each served by its"
            " own TLS server on 127.0.0.1 made in the benchmark process (python ssl, a thread per connection);"
            " one rule per lineage with `verify = [\"https://127.0.0.1:PORT\"]`. 5 rounds, interleaved; medians."
        )
    finally:
        servers.close()


# --- 7. reconcile --------------------------------------------------------------------


def part_reconcile(work):
    wrapper = install_certrelay("", work / "install")
    pool = certificates(work.parent / "certificates")
    certificates_ = scale_certificates(RECONCILE_LINEAGES)
    full = Sandbox(work / "full", scale_rules())
    empty = Sandbox(work / "empty", scale_rules())
    progress(f"reconcile: {RECONCILE_LINEAGES:,} lineages, acted on once so that the ledger holds them all")
    for name, domains in certificates_:
        full.renew(name, version=1, pem=pool.pem(name, domains))
        (full.queue / name).write_bytes(full.notification(name, domains))
    for sandbox in (full, empty):
        done = subprocess.run([str(wrapper), "run", *sandbox.arguments()], env=sandbox.environment(),
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"certrelay run exited {done.returncode}:\n{done.stderr[-2000:]}")
        (sandbox.bin / "calls").unlink(missing_ok=True)
    # Plain runs find the idle memo that the first one left; --force runs the full batch
    # (lineage scan, reconcile, expiry) every time.
    walls = {"full": [], "empty": [], "full --force": [], "empty --force": []}
    for round_number in range(RECONCILE_REPEATS):
        runs = [(key + flag, sandbox, flag) for flag in ("", " --force") for key, sandbox in (("full", full),
                                                                                          ("empty", empty))]
        for key, sandbox, flag in runs[:: 1 if round_number % 2 else -1]:
            started = time.monotonic()
            done = subprocess.run([str(wrapper), "run", *flag.split(), *sandbox.arguments()],
                                  env=sandbox.environment(), capture_output=True, text=True, timeout=300)
            walls[key].append(time.monotonic() - started)
            if done.returncode != 0 or sandbox.calls():
                raise RuntimeError(f"certrelay run ({key}) exited {done.returncode} after {len(sandbox.calls())}"
                                   f" systemctl calls:\n{done.stderr[-2000:]}")
    ours, theirs = statistics.median(walls["full"]), statistics.median(walls["empty"])
    ROWS.append(Row("reconcile", f"`certrelay run`, empty queue, {RECONCILE_LINEAGES:,} unchanged lineages: wall time"
                    " (the idle memo: a stat per lineage)",
                    seconds(ours), "the same run with no lineages", seconds(theirs), ratio(ours, theirs)))
    ours, theirs = statistics.median(walls["full --force"]), statistics.median(walls["empty --force"])
    ROWS.append(Row("reconcile", "`certrelay run --force`, the same: the full batch (scan, reconcile, expiry)",
                    seconds(ours), "the same run with no lineages", seconds(theirs), ratio(ours, theirs)))
    NOTES.append(
        f"reconcile: {RECONCILE_LINEAGES:,} lineages under live/ ({pool.how}), all acted on once before (so the"
        f" ledger holds each), 100 rules; then `certrelay run` with nothing queued, {RECONCILE_REPEATS} times"
        " each, alternating with the same run on a config dir without lineages; medians; no systemctl call"
        " allowed. Where certrelay has no reconcile yet, both runs do the same work (ratio about 1)."
    )


# --- main -----------------------------------------------------------------------------


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
    missing = require(*sorted({tool for part, tools in (
        ("scale", ["/usr/bin/time"]), ("latency", ["inotifywait", "bash"]), ("idle", ["inotifywait"]),
        ("downtime", ["wrk"])) if part in parts for tool in tools}))
    if missing:
        print(f"warning: {missing}; the rows that need them will say \"not measured\"", file=sys.stderr)
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)
    started = time.monotonic()
    host = describe_host()
    base = scratch("run")
    container_state = {}

    def get_container():
        """Boot the container once, on first need; return (container or None, reason)."""
        if "container" not in container_state:
            reason = container_module.unavailable_reason()
            if os.environ.get("BENCH_NO_CONTAINER"):
                reason = "BENCH_NO_CONTAINER is set"
            if reason is None:
                progress("booting a Debian container (systemd-nspawn) for the parts that need systemd")
                container = container_module.BenchContainer(base / "container", log=progress)
                container_state["container"] = container
                try:
                    container.prepare()
                    container.boot()
                except Exception as error:  # noqa: BLE001 - reported as "not measured"
                    reason = f"the container did not boot: {str(error).splitlines()[0]}"
                    container.stop()
                    container_state["container"] = None
            else:
                container_state["container"] = None
            container_state["reason"] = reason
        return container_state["container"], container_state.get("reason")

    runners = {
        "cold": lambda work: part_cold(work),
        "scale": lambda work: part_scale(work),
        "latency": lambda work: part_latency(work, get_container),
        "idle": lambda work: part_idle(work),
        "downtime": lambda work: part_downtime(work, get_container),
        "verify": lambda work: part_verify(work),
        "reconcile": lambda work: part_reconcile(work),
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
        if container_state.get("container") is not None:
            progress("stopping the container")
            container_state["container"].stop()
        if os.environ.get("BENCH_KEEP"):
            progress(f"kept the scratch files in {base} (BENCH_KEEP is set)")
        else:
            subprocess.run(["rm", "-rf", "--one-file-system", "--", str(base)], check=False)
    took = time.monotonic() - started
    host += f", {os.getloadavg()[0]:.2f} at the end"
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
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        print("interrupted: everything started was stopped; benchmarks/RESULTS.md left as it was", file=sys.stderr)
        sys.exit(130)
