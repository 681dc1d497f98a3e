"""Renewal overdue, by certbot's own policy (renewal/NAME.conf): an error naming the
lineage, since when and where to look, exit 1, once a day; `status`, the metrics and
`verify --nagios` show when renewal was due and whether it is overdue."""

import json
import os

import pytest

from tests import certs

NAME = "herzbube.ch"


@pytest.fixture
def metrics(relay, tmp_path):
    path = tmp_path / "certrelay.prom"
    relay.write_rules(f'[settings]\nmin-interval = 0\nmetrics = "{path}"\n\n'
                      f'[[rule]]\nmatch = ["{NAME}"]\nrestart = ["dovecot"]\n')
    return path


def test_a_lineage_not_renewed_a_day_after_certbots_policy_is_overdue_once_a_day(relay, metrics):
    certs.renew(relay.config_dir, NAME, age_days=62)  # certbot 5.8 renews 90-day certificates at day 60

    first, second = relay.run(), relay.run()
    status = json.loads(relay.run("--json", command="status").stdout)["certificates"][0]
    nagios = relay.run("--nagios", command="verify")

    assert first.returncode == 1, first.stderr
    assert f"error: {NAME}: renewal OVERDUE: certbot should have renewed it from" in first.stderr
    assert "(certbot's default from 4.0: a third of the lifetime left) and has not for 2d" in first.stderr
    assert "look at the output of the certbot container" in first.stderr
    assert second.returncode == 0 and "OVERDUE" not in second.stderr  # once a day
    assert status["overdue"] is True and status["renew_at"].endswith("Z")
    text = metrics.read_text()
    assert f'certrelay_certificate_overdue{{name="{NAME}"}} 1\n' in text
    assert f'certrelay_certificate_renew_timestamp_seconds{{name="{NAME}"}} ' in text
    assert nagios.returncode == 1 and f"{NAME}: renewal OVERDUE" in nagios.stdout


@pytest.mark.parametrize("conf, age", [
    ("version = 5.8.0\n", 59.5),  # not yet due
    ("version = 5.8.0\n", 60.5),  # due, within the day of grace
    ("version = 2.1.0\n", 59.5),  # certbot 2.x: 30 days before expiry, i.e. day 60
    ("version = 5.8.0\nrenew_before_expiry = 20 days\n", 68),
    ("version = 5.8.0\n[renewalparams]\nautorenew = False\n", 89),
], ids=["not-due", "in-grace", "certbot-2", "renew-before-expiry", "autorenew-off"])
def test_not_overdue(relay, metrics, conf, age):
    certs.renew(relay.config_dir, NAME, age_days=age)
    with open(os.path.join(relay.config_dir, "renewal", f"{NAME}.conf"), "w", encoding="utf-8") as file:
        file.write(conf)

    result = relay.run()
    status = json.loads(relay.run("--json", command="status").stdout)["certificates"][0]

    assert "OVERDUE" not in result.stderr
    assert status["overdue"] is False
    assert f'certrelay_certificate_overdue{{name="{NAME}"}} 0\n' in metrics.read_text()


def test_a_renewal_conf_certrelay_cannot_read_is_said_once_a_day(relay, metrics):
    certs.renew(relay.config_dir, NAME)
    os.unlink(os.path.join(relay.config_dir, "renewal", f"{NAME}.conf"))
    os.symlink("/etc/shadow", os.path.join(relay.config_dir, "renewal", f"{NAME}.conf"))

    first, second = relay.run(), relay.run()
    status = json.loads(relay.run("--json", command="status").stdout)["certificates"][0]

    assert first.returncode == 1
    assert f"error: {NAME}: cannot tell whether its renewal is overdue:" in first.stderr
    assert "renewal/herzbube.ch.conf" in first.stderr
    assert second.returncode == 0
    assert status["overdue"] is None and "renewal/herzbube.ch.conf" in status["renewal_error"]
