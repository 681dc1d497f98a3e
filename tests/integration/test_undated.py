"""Certificates whose dates cannot be read are loud: python3-cryptography missing, or
a live certificate that does not parse. `run` says so with the fix, once a day, and
exits 1; `check` lists it; `status` shows it; reconcile still acts on a changed
certificate (fingerprints need no library)."""

import json
import os

import pytest

from certrelay import certinfo
from tests.conftest import REPOSITORY


@pytest.fixture
def without(tmp_path):
    """without(*modules) is a PYTHONPATH on which importing each of `modules` fails,
    as on a system where it is not installed."""

    def path(*modules):
        shadow = tmp_path / "shadow"
        for module in modules:
            (shadow / module).mkdir(parents=True, exist_ok=True)
            (shadow / module / "__init__.py").write_text(f"raise ImportError('no {module} here', name='{module}')\n")
        return f"{shadow}{os.pathsep}{REPOSITORY}"

    return path


def test_without_cryptography_run_says_so_once_a_day_exits_1_and_still_acts_on_renewals(relay, without):
    pythonpath = without("cryptography")
    relay.renew("herzbube.ch")
    assert relay.run(PYTHONPATH=pythonpath).returncode == 1  # the first run records what it sees
    relay.renew("herzbube.ch")  # renewed without a notification: found by its fingerprint
    relay.publish("moser-naef.ch")

    first = relay.run(PYTHONPATH=pythonpath)
    second = relay.run(PYTHONPATH=pythonpath)

    assert first.returncode == 0, first.stderr
    assert sorted(relay.calls()) == ["reload apache2.service", "restart dovecot.service", "restart exim4.service"]
    assert "herzbube.ch: its live certificate changed but no notification came" in first.stderr
    # The alarm was raised by the very first run today: not again.
    assert certinfo.NO_CRYPTOGRAPHY not in first.stderr + second.stderr
    assert second.returncode == 0, second.stderr


def test_without_cryptography_the_first_run_says_so_with_the_fix_and_exits_1(relay, without):
    relay.renew("herzbube.ch")
    relay.renew("moser-naef.ch")

    result = relay.run(PYTHONPATH=without("cryptography"))

    assert result.returncode == 1, result.stderr
    assert (f"error: 2 certificate(s) (herzbube.ch, moser-naef.ch) without dates: {certinfo.NO_CRYPTOGRAPHY}"
            in result.stderr)
    assert "2 certificate(s) whose dates cannot be read" in result.stderr
    assert "Traceback" not in result.stderr


def test_without_cryptography_check_and_status_say_so(relay, without):
    relay.renew("herzbube.ch")
    pythonpath = without("cryptography")
    relay.run(PYTHONPATH=pythonpath)

    checked = relay.run(command="check", PYTHONPATH=pythonpath)
    shown = relay.run("--json", command="status", PYTHONPATH=pythonpath)

    assert checked.returncode == 2
    assert certinfo.NO_CRYPTOGRAPHY in checked.stderr
    assert shown.returncode == 1, shown.stderr
    (certificate,) = json.loads(shown.stdout)["certificates"]
    assert certificate["state"] == "unreadable"
    assert certificate["error"] == certinfo.NO_CRYPTOGRAPHY


def test_an_unparsable_live_certificate_a_rule_selects_is_an_error_once_a_day(relay):
    relay.renew("herzbube.ch")
    os.makedirs(os.path.join(relay.config_dir, "archive", "grunzwanzling.ch"))
    os.makedirs(os.path.join(relay.config_dir, "live", "grunzwanzling.ch"))
    with open(os.path.join(relay.config_dir, "archive", "grunzwanzling.ch", "cert1.pem"), "w") as file:
        file.write("-----BEGIN CERTIFICATE-----\nnot base64 DER\n-----END CERTIFICATE-----\n")
    os.symlink("../../archive/grunzwanzling.ch/cert1.pem", os.path.join(relay.config_dir, "live", "grunzwanzling.ch",
                                                                          "cert.pem"))

    first, second = relay.run(), relay.run()
    checked = relay.run(command="check")

    assert first.returncode == 1, first.stderr
    assert ("error: grunzwanzling.ch: the dates of the live certificate cannot be read, so no expiry alarm can"
            " fire for it:") in first.stderr
    assert "herzbube.ch: the dates" not in first.stderr
    assert second.returncode == 0 and "grunzwanzling.ch: the dates" not in second.stderr  # once a day
    assert checked.returncode == 2 and "grunzwanzling.ch: the dates of the live certificate" in checked.stderr


def test_watch_without_pyinotify_says_what_to_install(relay, without):
    result = relay.run(command="watch", PYTHONPATH=without("pyinotify"))

    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "certrelay watch needs pyinotify, which cannot be imported" in result.stderr
    assert "apt-get install python3-pyinotify python3-sdnotify" in result.stderr
