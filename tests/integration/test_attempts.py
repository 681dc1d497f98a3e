"""The first failure, the same day: certbot's last renewal attempt as its post hook
recorded it (SPOOL/attempt) makes `run` report a failed renewal at once, then once a
day until the lineage renews; and certbot that stopped trying is said once a day."""

import os
import time

import pytest

from certrelay import attempts
from tests import certs

NAME = "herzbube.ch"
HOUR = 3600


def record(relay, when, failed="", renewed="", known=True):
    """Publish an attempt record as certrelay-post-hook does."""
    path = os.path.join(relay.config_dir, "certrelay", "attempt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))
    with open(path + ".new", "w", encoding="ascii") as file:
        file.write(f"version=1\ntime={stamp}\ndomains={'known' if known else 'unknown'}\n"
                   f"renewed={renewed}\nfailed={failed}\n")
    os.rename(path + ".new", path)


def install_post_hook(relay):
    path = os.path.join(relay.config_dir, "renewal-hooks", "post", "certrelay-post-hook")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="ascii") as file:
        file.write("#!/bin/sh\n")
    os.chmod(path, 0o755)


@pytest.fixture
def settled(relay):
    """herzbube.ch and moser-naef.ch, 61 days into 90 (certbot 5.8 renews at 60), seen
    (recorded, nothing done); overdue-grace long, so that only the attempt alarms speak."""
    relay.write_rules('[settings]\nmin-interval = 0\noverdue-grace = "20d"\n\n[[rule]]\nmatch = ["*"]\n'
                      'reload = ["apache2"]\n')
    for name in (NAME, "moser-naef.ch"):
        certs.renew(relay.config_dir, name, age_days=61)
    assert relay.run().returncode == 0
    return relay


def test_a_failed_renewal_is_said_at_once_then_daily_and_clears_when_the_lineage_renews(settled):
    relay = settled
    record(relay, time.time() - HOUR, failed=f"{NAME} *.{NAME}", renewed="")

    first, second = relay.run(), relay.run()

    assert first.returncode == 1, first.stderr
    assert f"error: {NAME}: renewal FAILED in the container at " in first.stderr
    assert "certbot's post hook named its domains as failed" in first.stderr
    assert "moser-naef.ch: renewal FAILED" not in first.stderr
    assert second.returncode == 0 and "FAILED" not in second.stderr  # said; again tomorrow

    record(relay, time.time() - 60, failed=f"{NAME} *.{NAME}")  # the next attempt fails too: said at once
    third = relay.run()
    assert third.returncode == 1 and f"{NAME}: renewal FAILED" in third.stderr

    certs.renew(relay.config_dir, NAME)  # renewed by hand: the failure clears
    fourth = relay.run()
    assert fourth.returncode == 0, fourth.stderr
    assert "FAILED" not in fourth.stderr


def test_without_failed_domains_a_lineage_due_at_the_attempt_that_did_not_change_failed(settled):
    relay = settled
    certs.renew(relay.config_dir, "moser-naef.ch")  # renewed at the attempt
    assert relay.run().returncode == 0
    record(relay, time.time() - HOUR // 2, known=False)

    result = relay.run()

    assert result.returncode == 1
    assert f"{NAME}: renewal FAILED in the container" in result.stderr
    assert "this certbot does not say which renewals failed" in result.stderr
    assert "moser-naef.ch: renewal FAILED" not in result.stderr


def test_certbot_that_stopped_trying_is_said_once_a_day_with_the_post_hook_installed(settled):
    relay = settled
    install_post_hook(relay)
    certs.renew(relay.config_dir, NAME, age_days=63)  # due since day 60: three days ago
    assert relay.run().returncode == 0
    record(relay, time.time() - 30 * 86400, renewed="old.example")  # the last attempt: a month ago

    first, second = relay.run(), relay.run()

    assert first.returncode == 1
    assert "certbot has recorded no renewal attempt since" in first.stderr
    assert "is the container's cron line, or certbot-docker-renew.timer, still running?" in first.stderr
    assert second.returncode == 0 and "no renewal attempt" not in second.stderr


def test_before_the_first_recorded_attempt_nothing_is_said(settled):
    install_post_hook(settled)

    result = settled.run()

    assert result.returncode == 0, result.stderr
    assert "attempt" not in result.stderr


@pytest.mark.parametrize("content, says", [
    (b"version=1\ntime=yesterday\ndomains=known\n", "needs version=1, time="),
    (b"version=1\ntime=2026-12-07T03:00:00Z\ndomains=known\nfailed=$(reboot)\n", "failed= holds '$(reboot)'"),
    (b"version=1\nversion=1\n", "unexpected line"),
    (b"\xff" * 10, "not ASCII"),
])
def test_a_record_not_written_by_the_post_hook_is_an_error_naming_the_file(settled, content, says):
    path = os.path.join(settled.config_dir, "certrelay", "attempt")
    with open(path, "wb") as file:
        file.write(content)

    result = settled.run()

    assert result.returncode == 1
    assert f"cannot tell whether certbot's renewals fail: {path}" in result.stderr and says in result.stderr
    assert settled.calls() == []  # nothing happened because of it


def test_a_record_linked_out_of_the_config_dir_is_refused(relay):
    os.makedirs(os.path.join(relay.config_dir, "certrelay"), exist_ok=True)
    os.symlink("/etc/passwd", os.path.join(relay.config_dir, "certrelay", "attempt"))

    with pytest.raises(attempts.AttemptError, match="lead"):
        attempts.read(relay.config_dir)
