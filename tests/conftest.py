"""Fixtures shared by the tests: a throw-away certbot config dir, rules, state dir and
a recording `systemctl` on PATH, with certrelay run as a real process."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

from certrelay import install
from tests import certs, wait
from tests.writeup import WRITE_UP_RULES

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOOK = os.path.join(REPOSITORY, "certrelay", "certrelay-hook")
FAKE_SYSTEMCTL = os.path.join(REPOSITORY, "tests", "fake_systemctl")

class Relay:
    """One certrelay installation in a temporary directory, driven as a user would."""

    def __init__(self, root):
        self.root = str(root)
        self.config_dir = os.path.join(self.root, "letsencrypt")
        self.spool = os.path.join(self.config_dir, "certrelay")
        self.rules_path = os.path.join(self.root, "etc", "rules.toml")
        self.state_dir = os.path.join(self.root, "state")
        self.bin = os.path.join(self.root, "bin")
        self.processes = []
        for directory in (self.config_dir, self.bin, os.path.dirname(self.rules_path)):
            os.makedirs(directory, mode=0o755)
        os.chmod(self.root, 0o755)
        shutil.copy(FAKE_SYSTEMCTL, os.path.join(self.bin, "systemctl"))
        for behaviour in ("fail", "hang", "block", "kill"):
            os.makedirs(os.path.join(self.bin, behaviour))
        self.write_rules(WRITE_UP_RULES)

    def write_rules(self, text):
        """Write the rules file. Tests act many times in a row, so unless `text` has its
        own [settings], they get `min-interval = 0`, appended to keep line numbers."""
        if "[settings]" not in text:
            text += "\n[settings]\nmin-interval = 0\n"
        with open(self.rules_path, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(self.rules_path, 0o644)

    def environment(self, **extra):
        environment = dict(os.environ, PYTHONPATH=REPOSITORY, PATH=self.bin + os.pathsep + os.environ["PATH"])
        for key in ("NOTIFY_SOCKET", "CERTRELAY_CONFIG_DIR", "CERTRELAY_RULES", "CERTRELAY_STATE_DIR"):
            environment.pop(key, None)
        environment.update(extra)
        return environment

    def renew(self, name):
        """Do what certbot's renewal does to the files (tests.certs.renew: a new,
        real certificate for NAME and *.NAME)."""
        certs.renew(self.config_dir, name)

    def publish(self, name, domains=None, renew=True):
        """Renew lineage `name` (unless not `renew`), then run the real deploy hook as
        certbot would."""
        if renew:
            self.renew(name)
        domains = f"{name} *.{name}" if domains is None else domains
        environment = dict(RENEWED_LINEAGE=os.path.join(self.config_dir, "live", name), RENEWED_DOMAINS=domains)
        subprocess.run(["sh", HOOK], env=dict(os.environ, **environment), check=True)

    def command(self, command="run", *arguments):
        return [
            sys.executable, "-m", "certrelay", command, "--config-dir", self.config_dir,
            "--rules", self.rules_path, "--state-dir", self.state_dir, *arguments,
        ]

    def run(self, *arguments, command="run", **extra_environment):
        """Run `certrelay COMMAND` to completion; return the CompletedProcess (text)."""
        return subprocess.run(
            self.command(command, *arguments), env=self.environment(**extra_environment),
            capture_output=True, text=True, timeout=120,
        )

    def start(self, *arguments, command="run", **extra_environment):
        """Start `certrelay COMMAND` in the background; it is killed when the test ends."""
        process = subprocess.Popen(
            self.command(command, *arguments), env=self.environment(**extra_environment),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.processes.append(process)
        return process

    def behave(self, behaviour, unit):
        """Make the fake systemctl `fail`, `hang`, `block` or `kill` for `unit`."""
        open(os.path.join(self.bin, behaviour, unit), "w").close()

    def argv_recorder(self):
        """Write a `run` program that appends each of its arguments as a line to a file;
        return (program path, record path)."""
        program, record = os.path.join(self.root, "record-argv"), os.path.join(self.root, "argv")
        with open(program, "w", encoding="utf-8") as file:
            file.write(f'#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done >> {record}\n')
        os.chmod(program, 0o755)
        return program, record

    def calls(self):
        """Return the fake systemctl's calls, one "VERB UNIT" string each."""
        try:
            with open(os.path.join(self.bin, "calls"), encoding="utf-8") as file:
                return file.read().splitlines()
        except FileNotFoundError:
            return []

    def wait_for_calls(self, count, timeout=wait.GENEROUS):
        wait.until(lambda: len(self.calls()) >= count, timeout, what=f"{count} systemctl call(s)",
                   explain=lambda: f"only these came: {self.calls()}")

    def entries(self, directory):
        """Return the sorted names in spool subdirectory `directory` (bytes names decoded)."""
        path = os.path.join(self.spool, directory)
        return sorted(os.fsdecode(name) for name in os.listdir(os.fsencode(path))) if os.path.isdir(path) else []

    def stop(self):
        """Kill what `start` started, and release any fake systemctl a test left
        blocked (`behave("block", ...)`): it outlives certrelay otherwise."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
            process.wait()
        open(os.path.join(self.bin, "release"), "w").close()


@pytest.fixture(autouse=True)
def certrelay_logger():
    """Give each test the "certrelay" logger as it found it: a command run in-process
    (click's CliRunner) sets up logging to stderr without propagation, and caplog in a
    later test would then see nothing."""
    import logging

    logger = logging.getLogger("certrelay")
    saved = logger.handlers[:], logger.propagate, logger.level
    yield
    logger.handlers[:], logger.propagate = saved[0], saved[1]
    logger.setLevel(saved[2])


@pytest.fixture
def relay(tmp_path):
    instance = Relay(tmp_path)
    yield instance
    instance.stop()


@pytest.fixture
def root(tmp_path):
    """A 0755 root-owned directory below which root may deliver: every directory above
    it is root-owned and writable by nobody else. pytest's tmp_path is below /tmp
    (sticky, writable by all), which install refuses; so is a clone below /tmp. Then
    use the repository's .cache/ or /run (root's tmpfs), whichever is safe."""
    if not install.directory_problems(str(tmp_path.parent), create_dirs=False):
        os.chmod(tmp_path, 0o755)
        yield str(tmp_path)
        return
    problems = []
    for base in (os.path.join(REPOSITORY, ".cache", "install-tests"), "/run/certrelay-install-tests"):
        try:
            os.makedirs(base, mode=0o755, exist_ok=True)
        except OSError as error:
            problems.append(f"{base}: {error.strerror}")
            continue
        found = install.directory_problems(base, create_dirs=False)
        if not found:
            break
        problems += found
    else:
        pytest.skip(f"no safe place for destinations: {problems}")
    directory = tempfile.mkdtemp(dir=base)
    os.chmod(directory, 0o755)
    yield directory
    shutil.rmtree(directory)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With CERTRELAY_NO_SKIP set (`make test` as root sets it, having installed every
    component first), a test that skips fails instead: a missing shell, tool or
    permission there is a broken setup, not a reason to test less."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("CERTRELAY_NO_SKIP") and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = (f"skipped ({reason}), but CERTRELAY_NO_SKIP is set: `make test` as root installs"
                           " every component, so this one is missing from the setup")
