"""`pip install` as a user would: a wheel built from this tree, installed into a fresh
venv without system site packages (its dependencies from PyPI), then the README's
steps with the venv's own `certrelay`: install-hook, check, a notified renewal, an
unnotified one found by reconcile, status with dates, the metrics file.

Slow (a venv and PyPI downloads), so one test does it all, once per session.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests import certs
from tests.conftest import REPOSITORY

PYTHON = "/usr/bin/python3"  # Debian's, with python3-venv and python3-pip (tools/need)
REASON = None if os.path.exists(PYTHON) else f"{PYTHON} is missing"


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """Return the bin/ of a venv (no system site packages) with certrelay installed
    from a wheel of this tree."""
    base = tmp_path_factory.mktemp("pip")
    source = base / "source"  # a copy: building writes build/ and *.egg-info
    shutil.copytree(REPOSITORY, source, ignore=shutil.ignore_patterns(
        ".git", ".cache", "build", "dist", "mutants", "*.egg-info", "__pycache__", "tests", "benchmarks", "demo"))

    def run(*argv):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{' '.join(map(str, argv))}:\n{done.stdout}{done.stderr}"

    run(PYTHON, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", base / "wheels", source)
    (wheel,) = (base / "wheels").glob("certrelay-*.whl")
    run(PYTHON, "-m", "venv", base / "venv")
    run(base / "venv" / "bin" / "pip", "install", "--quiet", wheel)
    return base / "venv" / "bin"


@pytest.mark.skipif(REASON is not None, reason=REASON or "")
def test_a_wheel_in_a_fresh_venv_works_whole(venv, relay):
    metrics = os.path.join(relay.root, "certrelay.prom")
    relay.write_rules(f'[settings]\nmin-interval = 0\nmetrics = "{metrics}"\n\n'
                      '[[rule]]\nmatch = ["example.test"]\nrestart = ["dovecot"]\n')
    environment = relay.environment()
    del environment["PYTHONPATH"]  # the venv's certrelay, not this tree's

    def certrelay(command, *arguments):
        argv = [venv / "certrelay", command, *arguments]
        if command != "install-hook":
            argv += ["--config-dir", relay.config_dir, "--rules", relay.rules_path, "--state-dir", relay.state_dir]
        return subprocess.run(argv, env=environment, cwd=relay.root, capture_output=True, text=True, timeout=120)

    where = subprocess.run([venv / "python", "-c", "import certrelay, cryptography; print(certrelay.__file__)"],
                           capture_output=True, text=True, env=environment, cwd=relay.root, check=True).stdout
    assert where.startswith(str(venv.parent)), where  # the installed copy, cryptography with it
    certs.renew(relay.config_dir, "example.test")
    installed = certrelay("install-hook", "--config-dir", relay.config_dir)
    checked = certrelay("check")
    first = certrelay("run")  # seen for the first time: recorded, nothing done

    assert installed.returncode == 0, installed.stderr
    assert checked.returncode == 0, checked.stderr
    assert "certrelay-hook: current" in checked.stderr
    assert first.returncode == 0 and relay.calls() == [], first.stderr

    hook = os.path.join(relay.config_dir, "renewal-hooks", "deploy", "certrelay-hook")
    certs.renew(relay.config_dir, "example.test")
    subprocess.run(["sh", "-c", hook], check=True, env=dict(
        environment, RENEWED_LINEAGE=os.path.join(relay.config_dir, "live", "example.test"),
        RENEWED_DOMAINS="example.test *.example.test"))
    notified = certrelay("run")

    assert notified.returncode == 0, notified.stderr
    assert relay.calls() == ["restart dovecot.service"], notified.stderr

    certs.renew(relay.config_dir, "example.test")  # no hook ran: reconcile finds it
    unnotified = certrelay("run")
    status = certrelay("status", "--json")

    assert unnotified.returncode == 0, unnotified.stderr
    assert "example.test: its live certificate changed but no notification came" in unnotified.stderr
    assert relay.calls() == ["restart dovecot.service"] * 2
    assert status.returncode == 0, status.stderr
    (certificate,) = json.loads(status.stdout)["certificates"]
    assert certificate["state"] == "current" and certificate["not_after"] and certificate["days_left"] > 89
    with open(metrics, encoding="utf-8") as file:
        assert 'certrelay_certificate_not_after_timestamp_seconds{name="example.test"}' in file.read()
